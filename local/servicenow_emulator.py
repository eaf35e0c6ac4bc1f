"""A faithful ServiceNow OAuth 2.0 provider emulator served over real HTTP on 127.0.0.1.

Why: the project's refresh, consent and Secrets Manager code must be tested against ServiceNow's real quirks
(401 ``server_error`` for every failure, the same refresh token returned without extending it, the current
access token handed out again, hibernating instances answering 200 HTML, ...) without a live instance.
Behaviour follows /work/shared/domain-notes.md, "ServiceNow as OAuth provider".

Nothing is ever printed or logged that could carry a secret: request logging is switched off (query strings
carry authorization codes) and ``requests_log`` records only method, path, grant type and status.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import html
import json
import os
import secrets
import signal
import threading
import time
import urllib.parse
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import Any

from local.servicenow_tables import ADMIN_TABLES, NOT_AUTHENTICATED, AdminTables, basic_user, split_table_path
from local.serving import BackgroundServer, TrackedHandler

TOKEN_PATH = "/oauth_token.do"
AUTH_PATH = "/oauth_auth.do"
REVOKE_PATH = "/oauth_revoke_token.do"
TABLE_PREFIX = "/api/now/table/"
CURRENT_USER_PATH = "/api/now/ui/user/current_user"
ADMIN_PREFIX = "/_emulator/"

DEFAULT_SCOPE = "useraccount"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
FORM_TYPE = "application/x-www-form-urlencoded"
# "drop" hangs up without processing the request; "lost" processes it, then hangs up (the answer is lost).
# A hostile or broken instance: "bomb" answers 200 with a gzip body that inflates to `size` bytes of a token
# answer; "drip" processes the request, then sends its answer one byte every `delay` seconds; "answer" answers
# 200 with the JSON `payload` given (a token answer that cannot be right).
FAULT_KINDS = frozenset({"hibernate", "rate_limit", "server_error", "slow", "drop", "lost", "bomb", "drip", "answer"})
# ServiceNow with glide.oauth.allow.parameters.in.post.body.only refuses these in the query string.
QUERY_CREDENTIALS = frozenset({"client_secret", "password", "refresh_token", "code", "code_verifier", "assertion"})
WHOAMI_QUERY = "user_name=javascript:gs.getUserName()"
RATE_LIMIT = 100
# How long the instance keeps a JWKS URL's keys, and how soon an unknown kid may fetch them again (assumed:
# ServiceNow does not document its JWKS cache; see docs/servicenow-tables.md).
JWKS_CACHE_SECONDS = 3600
JWKS_REFETCH_SECONDS = 60
MAX_BODY = 1_000_000

ACCESS_DENIED = {"error_description": "access_denied", "error": "server_error"}
HIBERNATE_HTML = (
    "<!DOCTYPE html><html><head><title>Instance Hibernating page</title></head><body>"
    '<div class="instance-hibernating-page"><h1>Your instance is hibernating</h1>'
    "<p>Developer instances hibernate when not in use. Sign in to the developer site to wake it up.</p>"
    "</div></body></html>"
)
SERVER_ERROR_HTML = (
    "<!DOCTYPE html><html><head><title>500 Internal Server Error</title></head><body>"
    "<h1>Internal Server Error</h1><p>The server encountered an unexpected condition.</p></body></html>"
)


class OAuthFailure(Exception):
    """Raised inside grant handling; always rendered as ServiceNow's single 401 shape."""


@dataclass
class _JwtVerifier:
    """A JWT Verifier Map row: a key id and the sys_certificate whose public key checks the signature."""

    certificate_pem: str
    public_key: Any


@dataclass
class _JwtEndpoint:
    """The "OAuth JWT API endpoint for external clients" part of a registry entry."""

    verifiers: dict[str, _JwtVerifier] = field(default_factory=dict)
    jwks_url: str | None = None  # Zurich+: keys fetched from this URL (cached) for kids no verifier map has
    jwks_cache_seconds: int = 0  # the entry's JWKS cache lifespan (0: JWKS_CACHE_SECONDS)
    user_field: str = "user_name"  # sys_user field that `sub` is matched against: user_name, email or sys_id
    jti_verification: bool = True  # ServiceNow's default: a jti is accepted once
    clock_skew: int = 300  # seconds allowed on exp and nbf (ServiceNow's default)


@dataclass
class _Client:
    """An OAuth registry entry (oauth_entity)."""

    secret: str
    redirect_uris: list[str]
    client_credentials_user: str | None
    access_lifespan: int | None
    refresh_lifespan: int | None
    jwt: _JwtEndpoint = field(default_factory=_JwtEndpoint)


@dataclass
class _Code:
    """An authorization code; single use, short-lived."""

    client_id: str
    user: str
    redirect_uri: str
    scope: str
    code_challenge: str | None
    expires_at: float
    used: bool = False


@dataclass
class _Refresh:
    """A refresh token row in oauth_credential; ``family`` survives rotation so revocation reaches its tokens."""

    client_id: str
    user: str
    scope: str
    expires_at: float
    family: str
    current_access: str | None = None


@dataclass
class _Access:
    """An access token row in oauth_credential."""

    client_id: str
    user: str
    scope: str
    expires_at: float
    family: str | None


@dataclass
class _Fault:
    """A queued fault for the next ``remaining`` requests to ``path``."""

    kind: str
    path: str
    remaining: int
    retry_after: int
    delay: float
    size: int = 0
    payload: Any = None


@dataclass
class _Reply:
    """A fully built HTTP answer; ``drop`` means close the socket without answering (faults drop and lost)."""

    status: int
    body: bytes = b""
    content_type: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    drop: bool = False
    drip: float = 0.0  # seconds between bytes of the answer (headers included)


def _json_reply(status: int, payload: Any, headers: dict[str, str] | None = None) -> _Reply:
    """JSON answers are how ServiceNow's OAuth and REST endpoints speak."""
    return _Reply(status, json.dumps(payload).encode(), "application/json;charset=UTF-8", headers or {})


_BOMBS: dict[int, bytes] = {}


def gzip_bomb(size: int) -> bytes:
    """A gzip body that inflates to a `size`-byte token answer (about 1,000:1), built once per size."""
    if size not in _BOMBS:
        packer = zlib.compressobj(9, zlib.DEFLATED, 31)
        head, tail = b'{"access_token": "', b'", "token_type": "Bearer", "expires_in": 1799}'
        parts, left, chunk = [packer.compress(head)], max(0, size - len(head) - len(tail)), b"A" * (1 << 20)
        while left:
            parts.append(packer.compress(chunk[: min(left, len(chunk))]))
            left -= min(left, len(chunk))
        _BOMBS[size] = b"".join([*parts, packer.compress(tail), packer.flush()])
    return _BOMBS[size]


def _html_reply(status: int, text: str) -> _Reply:
    """HTML answers for browser-facing pages and for the glitches clients must not mistake for JSON."""
    return _Reply(status, text.encode(), "text/html;charset=UTF-8")


def _html_page(title: str, body: str) -> str:
    """Wrap a fragment in a minimal but valid document so browsers (and Playwright) render it."""
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title></head>'
        f"<body>{body}</body></html>"
    )


def _error_page(message: str) -> _Reply:
    """ServiceNow shows an HTML error page (400) instead of redirecting for bad authorize requests."""
    return _html_reply(
        400, _html_page("OAuth error", f'<div class="oauth-error"><h1>{html.escape(message)}</h1></div>')
    )


def _fetch_jwks(url: str) -> dict[str, Any]:
    """kid -> RSA public key of a JWK Set (RFC 7517); an unreachable URL or a bad document trusts nothing."""
    import requests
    from cryptography.hazmat.primitives.asymmetric import rsa

    try:
        document = requests.get(url, timeout=5).json()
        keys: dict[str, Any] = {}
        for jwk in document["keys"]:
            if jwk.get("kty") == "RSA" and isinstance(jwk.get("kid"), str):
                n, e = (int.from_bytes(_b64url_decode(jwk[name]), "big") for name in ("n", "e"))
                keys[jwk["kid"]] = rsa.RSAPublicNumbers(e, n).public_key()
        return keys
    except (requests.RequestException, ValueError, KeyError, TypeError):
        return {}


def _first(params: dict[str, list[str]], name: str) -> str | None:
    """First value of a parsed form field; duplicates are ignored like most servlet containers do."""
    values = params.get(name)
    return values[0] if values else None


def _s256(verifier: str) -> str:
    """PKCE S256 transform (RFC 7636): BASE64URL(SHA256(verifier)) without padding."""
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode("ascii", "replace")).digest()).rstrip(b"=").decode()


def _b64url_decode(text: str) -> bytes:
    """base64url without padding, strictly (a JWT segment)."""
    if not text or any(c not in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_" for c in text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _sys_id(username: str) -> str:
    """Stable 32-hex sys_id derived from the user name so repeated lookups agree."""
    return hashlib.sha256(f"sys_user:{username}".encode()).hexdigest()[:32]


def _add_query(uri: str, params: dict[str, str]) -> str:
    """Append params to a redirect URI, with '&' when it already carries a query."""
    separator = "&" if "?" in uri else "?"
    return uri + separator + urllib.parse.urlencode(params)


class ServiceNowEmulator(BackgroundServer):
    """In-memory ServiceNow instance: OAuth endpoints, a sliver of the Table API, fault injection."""

    thread_name = "servicenow-emulator"

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        access_lifespan: int = 1800,
        refresh_lifespan: int = 8_640_000,
        code_lifespan: int = 60,
        clock: Callable[[], float] = time.time,
        rotate_refresh_tokens: bool = False,
    ) -> None:
        super().__init__(host, port)
        self.access_lifespan = access_lifespan
        self.refresh_lifespan = refresh_lifespan
        self.code_lifespan = code_lifespan
        self.clock = clock
        self._lock = threading.Lock()
        self.reset(rotate_refresh_tokens=rotate_refresh_tokens)

    def reset(self, *, rotate_refresh_tokens: bool = False) -> None:
        """A new, empty instance on the same server (the explorer runs thousands of schedules against one)."""
        self.rotate_refresh_tokens = rotate_refresh_tokens
        self.consent_user = "admin"
        self.latency = 0.0
        self.requests_log: list[dict[str, Any]] = []
        self._clients: dict[str, _Client] = {}
        self._users: dict[str, str] = {}
        self._roles: dict[str, set[str]] = {}
        self.supports_jwks = True  # a Zurich or later release: JWT entries may name a JWKS URL
        self._jwks: dict[str, tuple[float, dict[str, Any]]] = {}  # JWKS URL -> (fetched at, kid -> public key)
        self.jwks_fetches = 0
        self._emails: dict[str, str] = {}  # sys_user.email -> user_name
        self._jtis: dict[str, float] = {}  # jti -> when it may be forgotten (its assertion expired)
        self._codes: dict[str, _Code] = {}
        self._refresh: dict[str, _Refresh] = {}
        self._access: dict[str, _Access] = {}
        self._faults: list[_Fault] = []
        self._records: dict[str, list[dict[str, Any]]] = {}
        self._issued: set[str] = set()  # every secret value ever configured or issued, for leak checks
        self.admin_password = secrets.token_urlsafe(16)
        self.add_user("admin", self.admin_password, roles={"admin"})
        self.tables = AdminTables(self, lambda: self.url)
        self._tables_lock = threading.Lock()

    # ------------------------------------------------------------------ lifecycle (BackgroundServer)
    # ------------------------------------------------------------------ configuration
    def register_client(
        self,
        client_id: str,
        client_secret: str,
        redirect_uris: list[str] | None = None,
        *,
        client_credentials_user: str | None = None,
        access_lifespan: int | None = None,
        refresh_lifespan: int | None = None,
    ) -> None:
        """Create or replace an OAuth registry entry; client_credentials needs an "OAuth Application User"."""
        with self._lock:
            self._clients[client_id] = _Client(
                client_secret, list(redirect_uris or []), client_credentials_user, access_lifespan, refresh_lifespan
            )
            self._issued.add(client_secret)

    def configure_client(
        self,
        client_id: str,
        client_secret: str,
        redirect_uris: list[str],
        *,
        access_lifespan: int | None,
        refresh_lifespan: int | None,
        user_field: str | None = None,
        jwks_url: str | None = None,
        jti_verification: bool = True,
        clock_skew: int | None = None,
        jwks_cache_minutes: int | None = None,
    ) -> None:
        """What the Table API's writes to oauth_entity (and oauth_jwt) mean: create or change an entry, keeping
        its verifiers."""
        with self._lock:
            known = self._clients.get(client_id)
            client = _Client(client_secret, list(redirect_uris), None, access_lifespan, refresh_lifespan)
            if known is not None:
                client.jwt = known.jwt
                client.client_credentials_user = known.client_credentials_user
            client.jwt.user_field = user_field or client.jwt.user_field
            client.jwt.jwks_url = jwks_url
            client.jwt.jti_verification = jti_verification
            client.jwt.clock_skew = clock_skew if clock_skew is not None else client.jwt.clock_skew
            client.jwt.jwks_cache_seconds = (jwks_cache_minutes or 0) * 60
            self._clients[client_id] = client
            self._issued.add(client_secret)

    def unregister_client(self, client_id: str) -> None:
        """An entry deleted or made inactive: its client id is unknown at every endpoint."""
        with self._lock:
            self._clients.pop(client_id, None)

    def set_client_secret(self, client_id: str, new_secret: str) -> None:
        """Operator rotates the client secret in ServiceNow; issued tokens stay valid."""
        with self._lock:
            self._clients[client_id].secret = new_secret
            self._issued.add(new_secret)

    def add_user(
        self, username: str, password: str, *, email: str | None = None, roles: set[str] | frozenset[str] = frozenset()
    ) -> None:
        """Create or update a sys_user usable by the password grant (and by `sub` of a JWT), with its roles."""
        with self._lock:
            self._users[username] = password
            self._roles[username] = set(roles)
            self._issued.add(password)
            if email:
                self._emails[email] = username

    def roles_of(self, username: str) -> set[str]:
        with self._lock:
            return set(self._roles.get(username, ()))

    def check_password(self, username: str, password: str) -> bool:
        """Basic authentication of a REST request (the Table API's admin side)."""
        with self._lock:
            known = self._users.get(username)
            if len(password) >= 8:
                self._issued.add(password)  # a wrong admin password is as secret as the right one
        return known is not None and secrets.compare_digest(known.encode(), password.encode())

    @staticmethod
    def parse_certificate(certificate_pem: str) -> Any:
        """The public key of one PEM certificate (sys_certificate refuses anything else)."""
        from cryptography import x509  # a dev dependency: the emulator never ships

        try:
            return x509.load_pem_x509_certificate(certificate_pem.encode("ascii")).public_key()
        except (ValueError, UnicodeEncodeError) as error:
            raise ValueError("certificate must be one PEM-encoded X.509 certificate") from error

    def add_jwt_verifier(
        self,
        client_id: str,
        kid: str,
        certificate_pem: str,
        *,
        user_field: str | None = None,
        jti_verification: bool | None = None,
    ) -> None:
        """Upload a certificate to sys_certificate and map it to `kid` in the entry's JWT Verifier Maps."""
        public_key = self.parse_certificate(certificate_pem)
        if user_field not in (None, "user_name", "email", "sys_id"):
            raise ValueError("user_field must be user_name, email or sys_id")
        with self._lock:
            endpoint = self._clients[client_id].jwt
            endpoint.verifiers[kid] = _JwtVerifier(certificate_pem, public_key)
            endpoint.user_field = user_field or endpoint.user_field
            if jti_verification is not None:
                endpoint.jti_verification = jti_verification

    def remove_jwt_verifier(self, client_id: str, kid: str) -> None:
        """Delete a verifier map (the end of a key rollover): assertions with that kid are refused."""
        with self._lock:
            self._clients[client_id].jwt.verifiers.pop(kid, None)

    def jwt_key_ids(self, client_id: str) -> set[str]:
        """The key ids the entry's JWT verifier maps trust now."""
        with self._lock:
            return set(self._clients[client_id].jwt.verifiers)

    def add_record(self, table: str, record: dict[str, Any]) -> dict[str, Any]:
        """Add a row returned by GET /api/now/table/<table>; a sys_id is generated if absent."""
        row = dict(record)
        row.setdefault("sys_id", secrets.token_hex(16))
        with self._lock:
            self._records.setdefault(table, []).append(row)
        return dict(row)

    def revoke_user_tokens(self, username: str) -> None:
        """Delete every oauth_credential row of a user, as an admin would in Manage Tokens."""
        with self._lock:
            for token in [t for t, r in self._refresh.items() if r.user == username]:
                del self._refresh[token]
            for token in [t for t, a in self._access.items() if a.user == username]:
                del self._access[token]

    def inject(
        self,
        fault: str,
        *,
        path: str = TOKEN_PATH,
        count: int = 1,
        retry_after: int = 1,
        delay: float = 0.0,
        size: int = 0,
        payload: Any = None,
    ) -> None:
        """Queue a fault for the next ``count`` requests to ``path`` ("*" = any non-admin path)."""
        if fault not in FAULT_KINDS:
            raise ValueError(f"unknown fault {fault!r}; expected one of {sorted(FAULT_KINDS)}")
        if count < 1:
            raise ValueError("count must be >= 1")
        with self._lock:
            self._faults.append(_Fault(fault, path, count, int(retry_after), float(delay), int(size), payload))

    def clear_faults(self) -> None:
        """Drop every queued fault."""
        with self._lock:
            self._faults.clear()

    # ------------------------------------------------------------------ introspection (never secrets)
    def token_requests(self, grant_type: str | None = None) -> int:
        """How many requests reached /oauth_token.do (faulted ones included), optionally for one grant."""
        with self._lock:
            return sum(
                1
                for entry in self.requests_log
                if entry["path"] == TOKEN_PATH and (grant_type is None or entry["grant_type"] == grant_type)
            )

    def live_refresh_tokens(self, client_id: str | None = None) -> set[str]:
        """Refresh tokens a refresh grant would honour now, so tests can check that ServiceNow's live token is
        the stored one. Secret values: in-process only, never served or logged."""
        with self._lock:
            now = self.clock()
            return {
                token
                for token, row in self._refresh.items()
                if row.expires_at > now and (client_id is None or row.client_id == client_id)
            }

    def live_access_tokens(self, client_id: str | None = None) -> set[str]:
        """Access tokens that would authenticate a REST call now. Secret values: in-process only."""
        with self._lock:
            now = self.clock()
            return {
                token
                for token, row in self._access.items()
                if row.expires_at > now and (client_id is None or row.client_id == client_id)
            }

    def active_access_token_count(self) -> int:
        """Access tokens that would authenticate a REST call right now."""
        with self._lock:
            now = self.clock()
            return sum(1 for a in self._access.values() if a.expires_at > now)

    def active_refresh_token_count(self) -> int:
        """Refresh tokens that would be accepted by a refresh grant right now."""
        with self._lock:
            now = self.clock()
            return sum(1 for r in self._refresh.values() if r.expires_at > now)

    def token_info(self, token: str) -> dict[str, Any] | None:
        """Metadata of an access or refresh token (kind, user, client, scope, expires_at, active); no secrets."""
        with self._lock:
            now = self.clock()
            row: _Access | _Refresh | None = self._access.get(token)
            kind = "access"
            if row is None:
                row, kind = self._refresh.get(token), "refresh"
            if row is None:
                return None
            return {
                "kind": kind,
                "user": row.user,
                "client_id": row.client_id,
                "scope": row.scope,
                "expires_at": row.expires_at,
                "active": row.expires_at > now,
            }

    def secret_values(self) -> set[str]:
        """Every secret ever configured, issued or received (client secrets, passwords, codes, PKCE verifiers,
        tokens), so tests can assert none of them leaked into logs or output. In-process only, never served."""
        with self._lock:
            return set(self._issued)

    def stats(self) -> dict[str, Any]:
        """Counters for the admin endpoint and out-of-process tests; contains no secret material."""
        with self._lock:
            now = self.clock()
            log = [dict(entry) for entry in self.requests_log]
            by_path: dict[str, int] = {}
            by_status: dict[str, int] = {}
            by_grant: dict[str, int] = {}
            for entry in log:
                by_path[entry["path"]] = by_path.get(entry["path"], 0) + 1
                status = str(entry["status"])
                by_status[status] = by_status.get(status, 0) + 1
                if entry["path"] == TOKEN_PATH:
                    grant = str(entry["grant_type"])
                    by_grant[grant] = by_grant.get(grant, 0) + 1
            return {
                "requests": len(log),
                "by_path": by_path,
                "by_status": by_status,
                "token_requests": sum(by_grant.values()),
                "token_requests_by_grant": by_grant,
                "active_access_tokens": sum(1 for a in self._access.values() if a.expires_at > now),
                "active_refresh_tokens": sum(1 for r in self._refresh.values() if r.expires_at > now),
                "pending_faults": sum(f.remaining for f in self._faults),
                "requests_log": log,
            }

    # ------------------------------------------------------------------ request handling
    def _take_fault(self, path: str) -> _Fault | None:
        """Pop one use of the first queued fault matching this path."""
        with self._lock:
            for fault in self._faults:
                if fault.path in ("*", path):
                    fault.remaining -= 1
                    if fault.remaining <= 0:
                        self._faults.remove(fault)
                    return fault
        return None

    def _log(self, method: str, path: str, grant_type: str | None, status: int | None) -> None:
        """Record a request without anything secret: no query string, no body values except grant_type."""
        with self._lock:
            self.requests_log.append({"method": method, "path": path, "grant_type": grant_type, "status": status})

    def _fault_reply(self, fault: _Fault, path: str) -> _Reply | None:
        """Build the answer for a fault; None means process normally (slow, and lost which hangs up afterwards)."""
        if fault.kind == "slow":
            time.sleep(fault.delay)
            return None
        if fault.kind in ("lost", "drip"):
            return None
        if fault.kind == "bomb":
            return _Reply(200, gzip_bomb(fault.size), "application/json", {"Content-Encoding": "gzip"})
        if fault.kind == "answer":
            return _json_reply(200, fault.payload)
        if fault.kind == "drop":
            return _Reply(0, drop=True)
        if fault.kind == "hibernate":
            return _html_reply(200, HIBERNATE_HTML)
        if fault.kind == "rate_limit":
            reset = int(self.clock()) + fault.retry_after
            return _json_reply(
                429,
                {
                    "error": {
                        "message": "Rate limit exceeded",
                        "detail": f"Rate limit of {RATE_LIMIT} requests per hour exceeded; retry later",
                    },
                    "status": "failure",
                },
                {
                    "Retry-After": str(fault.retry_after),
                    "X-RateLimit-Limit": str(RATE_LIMIT),
                    "X-RateLimit-Reset": str(reset),
                },
            )
        if path.startswith("/api/"):
            return _json_reply(
                500,
                {"error": {"message": "Internal Server Error", "detail": "Transaction failed"}, "status": "failure"},
            )
        return _html_reply(500, SERVER_ERROR_HTML)

    def handle(self, method: str, raw_path: str, headers: Any, body: bytes) -> tuple[_Reply, str | None]:
        """Route one request; returns the reply and the grant_type to log."""
        parsed = urllib.parse.urlsplit(raw_path)
        path = parsed.path
        query = urllib.parse.parse_qs(parsed.query, keep_blank_values=True)
        content_type = (headers.get("Content-Type") or "").split(";")[0].strip().lower()
        form: dict[str, list[str]] = {}
        if content_type == FORM_TYPE:
            form = urllib.parse.parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
        grant_type = _first(form, "grant_type") if path == TOKEN_PATH else None

        fault = self._take_fault(path)
        if fault is not None:
            reply = self._fault_reply(fault, path)
            if reply is not None:
                return reply, grant_type
        if path == TOKEN_PATH and self.latency > 0:
            time.sleep(self.latency)

        reply = self._route(method, path, query, headers, form if content_type == FORM_TYPE else None, body)
        if fault is not None and fault.kind == "lost":
            reply.drop = True  # every effect happened; only the answer never reaches the client
        if fault is not None and fault.kind == "drip":
            reply.drip = fault.delay  # every effect happened; the answer comes a byte at a time
        return reply, grant_type

    def _admin_table(
        self, method: str, target: tuple[str, str | None], query: dict[str, list[str]], authorization: str, body: bytes
    ) -> _Reply:
        """The Table API with Basic auth: admin tables for admins only, in ServiceNow's shapes."""
        table, sys_id = target
        user = basic_user(authorization, self.check_password)
        if table not in ADMIN_TABLES:
            return self._not_found(f"{TABLE_PREFIX}{table}") if user else _json_reply(401, NOT_AUTHENTICATED)
        with self._tables_lock:
            answer = self.tables.handle(method, table, sys_id, query, body, user)
        if answer.status == 204:
            return _Reply(204)
        return _json_reply(answer.status, answer.payload)

    def _route(
        self,
        method: str,
        path: str,
        query: dict[str, list[str]],
        headers: Any,
        form: dict[str, list[str]] | None,
        body: bytes = b"",
    ) -> _Reply:
        """Do the real work of a request; ``form`` is None unless the body was form-encoded."""
        if path == AUTH_PATH:
            if method == "GET":
                return self._authorize_page(query)
            if method == "POST":
                return self._authorize_decision(form)
            return self._not_allowed("GET, POST")
        if path == TOKEN_PATH:
            if method != "POST":
                return self._not_allowed("POST")
            return self._token(query, form)
        if path == REVOKE_PATH:
            if method != "POST":
                return self._not_allowed("POST")
            return self._revoke(form or {})
        if path.startswith(TABLE_PREFIX):
            authorization = headers.get("Authorization") or ""
            target = split_table_path(path, TABLE_PREFIX)
            if target is not None and (target[0] in ADMIN_TABLES or authorization.lower().startswith("basic ")):
                return self._admin_table(method, target, query, authorization, body)
        if path == CURRENT_USER_PATH or path.startswith(TABLE_PREFIX):
            if method != "GET":
                return self._not_allowed("GET")
            return self._rest(path, query, headers.get("Authorization") or "")
        return self._not_found(path)

    @staticmethod
    def _not_allowed(allow: str) -> _Reply:
        reply = _json_reply(405, {"error": {"message": "Method not Supported", "detail": None}, "status": "failure"})
        reply.headers["Allow"] = allow
        return reply

    @staticmethod
    def _not_found(path: str) -> _Reply:
        if path.startswith("/api/"):
            return _json_reply(
                404,
                {
                    "error": {"message": "Requested URI does not represent any resource", "detail": None},
                    "status": "failure",
                },
            )
        return _html_reply(404, _html_page("Not Found", "<h1>404 - Not Found</h1>"))

    # ---------------------------------------------------------------- /oauth_auth.do
    def _check_authorize(self, params: dict[str, list[str]]) -> tuple[_Reply | None, str]:
        """Validate authorize parameters; returns (error page or None, effective redirect URI)."""
        client_id = _first(params, "client_id") or ""
        with self._lock:
            client = self._clients.get(client_id)
            redirect_uris = list(client.redirect_uris) if client else []
        if client is None:
            return _error_page("Invalid client_id"), ""
        if _first(params, "response_type") != "code":
            return _error_page("Unsupported response_type"), ""
        if not _first(params, "state"):
            return _error_page("Missing State parameter in request"), ""
        method = _first(params, "code_challenge_method")
        if method is not None and method != "S256":
            return _error_page("Unsupported code_challenge_method: only S256 is supported"), ""
        if method is not None and not _first(params, "code_challenge"):
            return _error_page("Missing code_challenge parameter in request"), ""
        if not redirect_uris:
            return _error_page("No redirect URL is configured for this OAuth application"), ""
        requested = _first(params, "redirect_uri")
        return None, requested if requested in redirect_uris else redirect_uris[0]

    def _authorize_page(self, query: dict[str, list[str]]) -> _Reply:
        """The consent ("Connect") page the logged-in user sees."""
        error, _ = self._check_authorize(query)
        if error is not None:
            return error
        client_id = _first(query, "client_id") or ""
        names = (
            "response_type",
            "client_id",
            "redirect_uri",
            "state",
            "scope",
            "code_challenge",
            "code_challenge_method",
        )
        hidden = "".join(
            f'<input type="hidden" name="{name}" value="{html.escape(value)}">'
            for name in names
            if (value := _first(query, name)) is not None
        )
        scope = _first(query, "scope") or DEFAULT_SCOPE
        body = (
            '<div class="oauth-consent"><h1>Connect</h1>'
            f'<p><span id="client-id">{html.escape(client_id)}</span> would like to connect to your account '
            f'<span id="user">{html.escape(self.consent_user)}</span>.</p>'
            f'<p>Requested scope: <span id="scope">{html.escape(scope)}</span></p>'
            f'<form method="post" action="{AUTH_PATH}">{hidden}'
            '<button type="submit" name="action" value="allow" id="allow">Allow</button>'
            '<button type="submit" name="action" value="deny" id="deny">Deny</button>'
            "</form></div>"
        )
        return _html_reply(200, _html_page("OAuth consent", body))

    def _authorize_decision(self, form: dict[str, list[str]] | None) -> _Reply:
        """The user pressed Allow or Deny: redirect with a code, or with error=access_denied."""
        if form is None:
            return _error_page("Invalid request")
        error, redirect_uri = self._check_authorize(form)
        if error is not None:
            return error
        state = _first(form, "state") or ""
        action = _first(form, "action")
        if action == "deny":
            location = _add_query(
                redirect_uri,
                {"error": "access_denied", "error_description": "The user denied the request", "state": state},
            )
            return _Reply(302, headers={"Location": location})
        if action != "allow":
            return _error_page("Invalid request")
        code = secrets.token_urlsafe(32)
        with self._lock:
            self._issued.add(code)
            self._codes[code] = _Code(
                client_id=_first(form, "client_id") or "",
                user=self.consent_user,
                redirect_uri=redirect_uri,
                scope=_first(form, "scope") or DEFAULT_SCOPE,
                code_challenge=_first(form, "code_challenge") or None,
                expires_at=self.clock() + self.code_lifespan,
            )
        return _Reply(302, headers={"Location": _add_query(redirect_uri, {"code": code, "state": state})})

    # ---------------------------------------------------------------- /oauth_token.do
    def _token(self, query: dict[str, list[str]], form: dict[str, list[str]] | None) -> _Reply:
        """Token endpoint: every failure is ServiceNow's 401 server_error/access_denied."""
        if form is None or QUERY_CREDENTIALS.intersection(query):
            return _json_reply(401, ACCESS_DENIED)
        try:
            with self._lock:
                payload = self._grant(form)
        except OAuthFailure:
            return _json_reply(401, ACCESS_DENIED)
        return _json_reply(200, payload, {"Cache-Control": "no-store", "Pragma": "no-cache"})

    def _authenticate_client(self, form: dict[str, list[str]]) -> tuple[str, _Client]:
        """Check client_id/client_secret from the body (caller holds the lock)."""
        client_id = _first(form, "client_id") or ""
        secret = _first(form, "client_secret") or ""
        client = self._clients.get(client_id)
        if client is None or not secrets.compare_digest(client.secret.encode(), secret.encode()):
            raise OAuthFailure
        return client_id, client

    def _lifespans(self, client: _Client) -> tuple[int, int]:
        """Per-registry-entry lifespans, falling back to the instance defaults."""
        access = client.access_lifespan if client.access_lifespan is not None else self.access_lifespan
        refresh = client.refresh_lifespan if client.refresh_lifespan is not None else self.refresh_lifespan
        return access, refresh

    def _new_access(self, client_id: str, user: str, scope: str, lifespan: int, family: str | None) -> str:
        token = secrets.token_urlsafe(48)
        self._issued.add(token)
        self._access[token] = _Access(client_id, user, scope, self.clock() + lifespan, family)
        return token

    def _new_grant(self, client_id: str, client: _Client, user: str, scope: str) -> dict[str, Any]:
        """Fresh refresh token (full lifespan) plus access token: auth code and password grants."""
        access_life, refresh_life = self._lifespans(client)
        refresh = secrets.token_urlsafe(48)
        self._issued.add(refresh)
        family = secrets.token_hex(8)
        record = _Refresh(client_id, user, scope, self.clock() + refresh_life, family)
        record.current_access = self._new_access(client_id, user, scope, access_life, family)
        self._refresh[refresh] = record
        return self._payload(record.current_access, refresh, scope, access_life)

    @staticmethod
    def _payload(access: str, refresh: str | None, scope: str, access_life: int) -> dict[str, Any]:
        payload: dict[str, Any] = {"access_token": access}
        if refresh is not None:
            payload["refresh_token"] = refresh
        payload.update({"scope": scope, "token_type": "Bearer", "expires_in": access_life - 1})
        return payload

    def _grant(self, form: dict[str, list[str]]) -> dict[str, Any]:
        """Dispatch on grant_type (caller holds the lock)."""
        grant_type = _first(form, "grant_type")
        client_id, client = self._authenticate_client(form)
        now = self.clock()
        if grant_type == "authorization_code":
            code = self._codes.get(_first(form, "code") or "")
            if code is None or code.used or code.client_id != client_id:
                raise OAuthFailure
            code.used = True  # any exchange attempt by the owning client burns the code
            if code.expires_at <= now or _first(form, "redirect_uri") != code.redirect_uri:
                raise OAuthFailure
            if code.code_challenge is not None:
                verifier = _first(form, "code_verifier")
                if verifier:
                    self._issued.add(verifier)  # a PKCE verifier is as secret as the code it unlocks
                if not verifier or not secrets.compare_digest(_s256(verifier), code.code_challenge):
                    raise OAuthFailure
            return self._new_grant(client_id, client, code.user, code.scope)
        if grant_type == "password":
            username = _first(form, "username") or ""
            password = _first(form, "password") or ""
            known = self._users.get(username)
            if known is None or not secrets.compare_digest(known.encode(), password.encode()):
                raise OAuthFailure
            return self._new_grant(client_id, client, username, _first(form, "scope") or DEFAULT_SCOPE)
        if grant_type == "refresh_token":
            return self._refresh_grant(client_id, client, _first(form, "refresh_token") or "", now)
        if grant_type == JWT_BEARER:
            assertion = _first(form, "assertion") or ""
            self._issued.add(assertion)  # a bearer credential for its few minutes
            user = self._verify_assertion(client_id, client, assertion, now)
            access_life, _ = self._lifespans(client)
            scope = _first(form, "scope") or DEFAULT_SCOPE
            access = self._new_access(client_id, user, scope, access_life, None)
            return self._payload(access, None, scope, access_life)  # the JWT grant issues no refresh token
        if grant_type == "client_credentials":
            if not client.client_credentials_user:
                raise OAuthFailure
            access_life, _ = self._lifespans(client)
            scope = _first(form, "scope") or DEFAULT_SCOPE
            access = self._new_access(client_id, client.client_credentials_user, scope, access_life, None)
            return self._payload(access, None, scope, access_life)
        raise OAuthFailure

    def _verify_assertion(self, client_id: str, client: _Client, assertion: str, now: float) -> str:
        """ServiceNow's checks of an inbound JWT: RS256 signature by the certificate its `kid` maps to, `aud`
        and `iss` = the client id, `exp`/`nbf` within the clock skew, the `sub` user, and a `jti` used once.
        Returns the user name (caller holds the lock)."""
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        parts = assertion.split(".")
        if len(parts) != 3:
            raise OAuthFailure
        try:
            header = json.loads(_b64url_decode(parts[0]))
            claims = json.loads(_b64url_decode(parts[1]))
            signature = _b64url_decode(parts[2])
        except ValueError:
            raise OAuthFailure from None
        if not isinstance(header, dict) or not isinstance(claims, dict) or header.get("alg") != "RS256":
            raise OAuthFailure
        endpoint = client.jwt
        verifier = endpoint.verifiers.get(str(header.get("kid")))
        public_key = verifier.public_key if verifier else self._jwks_key(endpoint, str(header.get("kid")), now)
        if public_key is None:
            raise OAuthFailure
        try:
            public_key.verify(signature, f"{parts[0]}.{parts[1]}".encode("ascii"), padding.PKCS1v15(), hashes.SHA256())
        except (InvalidSignature, ValueError, TypeError):
            raise OAuthFailure from None
        if claims.get("aud") != client_id or claims.get("iss") != client_id:
            raise OAuthFailure
        exp, nbf = claims.get("exp"), claims.get("nbf")
        if not isinstance(exp, int) or exp + endpoint.clock_skew <= now:
            raise OAuthFailure
        if nbf is not None and (not isinstance(nbf, int) or nbf - endpoint.clock_skew > now):
            raise OAuthFailure
        user = self._user_by(endpoint.user_field, claims.get("sub"))
        if user is None:
            raise OAuthFailure
        if endpoint.jti_verification:
            jti = claims.get("jti")
            self._jtis = {known: until for known, until in self._jtis.items() if until > now}
            if not isinstance(jti, str) or not jti or jti in self._jtis:
                raise OAuthFailure
            self._jtis[jti] = exp + endpoint.clock_skew
        return user

    def _jwks_key(self, endpoint: _JwtEndpoint, kid: str, now: float) -> Any:
        """The key the entry's JWKS URL publishes for `kid`: fetched once per cache lifespan (the entry's, else
        JWKS_CACHE_SECONDS), or again for a kid the cached set lacks once JWKS_REFETCH_SECONDS have passed
        (caller holds the lock)."""
        url = endpoint.jwks_url
        if not url or not self.supports_jwks:
            return None
        fetched_at, keys = self._jwks.get(url, (float("-inf"), {}))
        age = now - fetched_at
        lifespan = endpoint.jwks_cache_seconds or JWKS_CACHE_SECONDS
        if age >= lifespan or (kid not in keys and age >= JWKS_REFETCH_SECONDS):
            keys = _fetch_jwks(url)
            self.jwks_fetches += 1
            self._jwks[url] = (now, keys)
        return keys.get(kid)

    def _user_by(self, user_field: str, subject: Any) -> str | None:
        if not isinstance(subject, str) or not subject:
            return None
        if user_field == "email":
            return self._emails.get(subject)
        if user_field == "sys_id":
            return next((name for name in self._users if _sys_id(name) == subject), None)
        return subject if subject in self._users else None

    def _refresh_grant(self, client_id: str, client: _Client, token: str, now: float) -> dict[str, Any]:
        """Same refresh token, expiry untouched; the current access token is reused while it lives."""
        record = self._refresh.get(token)
        if record is None or record.client_id != client_id or record.expires_at <= now:
            raise OAuthFailure
        access_life, _ = self._lifespans(client)
        current = self._access.get(record.current_access or "")
        if current is not None and current.expires_at > now:
            current.expires_at = now + access_life
            access = record.current_access or ""
        else:
            access = self._new_access(client_id, record.user, record.scope, access_life, record.family)
            record.current_access = access
        if self.rotate_refresh_tokens:
            del self._refresh[token]
            token = secrets.token_urlsafe(48)
            self._issued.add(token)
            self._refresh[token] = record
        return self._payload(access, token, record.scope, access_life)

    # ---------------------------------------------------------------- /oauth_revoke_token.do
    def _revoke(self, form: dict[str, list[str]]) -> _Reply:
        """Mark a token expired; a refresh token takes the access tokens issued from it along."""
        token = _first(form, "token") or ""
        with self._lock:
            if _first(form, "client_id") is not None:
                try:
                    self._authenticate_client(form)
                except OAuthFailure:
                    return _json_reply(401, ACCESS_DENIED)
            now = self.clock()
            access = self._access.get(token)
            if access is not None:
                access.expires_at = min(access.expires_at, now)
            record = self._refresh.get(token)
            if record is not None:
                record.expires_at = min(record.expires_at, now)
                for row in self._access.values():
                    if row.family == record.family:
                        row.expires_at = min(row.expires_at, now)
        return _Reply(200)

    # ---------------------------------------------------------------- REST API
    def _rest(self, path: str, query: dict[str, list[str]], authorization: str) -> _Reply:
        """Bearer-protected Table API and current_user, enough to ask "who owns this token"."""
        scheme, _, token = authorization.partition(" ")
        with self._lock:
            access = self._access.get(token.strip()) if scheme.lower() == "bearer" else None
            if access is None or access.expires_at <= self.clock():
                return _json_reply(401, NOT_AUTHENTICATED)
            user = access.user
            if path == CURRENT_USER_PATH:
                return _json_reply(200, {"result": {"user_name": user, "user_sys_id": _sys_id(user)}})
            table = path[len(TABLE_PREFIX) :]
            if not table or "/" in table:
                return self._not_found(path)
            sysparm_query = _first(query, "sysparm_query") or ""
            if table == "sys_user" and WHOAMI_QUERY in sysparm_query:
                rows: list[dict[str, Any]] = [{"user_name": user, "sys_id": _sys_id(user)}]
            else:
                rows = [dict(row) for row in self._records.get(table, [])]
        limit = _first(query, "sysparm_limit")
        if limit and limit.isdigit():
            rows = rows[: int(limit)]
        return _json_reply(200, {"result": rows})

    # ---------------------------------------------------------------- /_emulator/ admin
    def _known(self, client_id: str) -> bool:
        with self._lock:
            return client_id in self._clients

    def handle_admin(self, method: str, path: str, body: bytes) -> _Reply:
        """JSON control plane for an emulator running in another process."""
        try:
            data = json.loads(body or b"{}") if method == "POST" else {}
            if not isinstance(data, dict):
                raise ValueError("body must be a JSON object")
            if path == "/_emulator/stats" and method == "GET":
                return _json_reply(200, self.stats())
            if path == "/_emulator/faults" and method == "DELETE":
                self.clear_faults()
                return _json_reply(200, {"ok": True})
            if method != "POST":
                return _json_reply(404, {"error": "unknown admin endpoint"})
            if path == "/_emulator/clients":
                self.register_client(
                    _req_str(data, "client_id"),
                    _req_str(data, "client_secret"),
                    _opt_list(data, "redirect_uris"),
                    client_credentials_user=_opt_str(data, "client_credentials_user"),
                    access_lifespan=_opt_int(data, "access_lifespan"),
                    refresh_lifespan=_opt_int(data, "refresh_lifespan"),
                )
            elif path == "/_emulator/client_secret":
                client_id = _req_str(data, "client_id")
                if not self._known(client_id):
                    return _json_reply(404, {"error": "unknown client"})
                self.set_client_secret(client_id, _req_str(data, "client_secret"))
            elif path == "/_emulator/users":
                self.add_user(_req_str(data, "username"), _req_str(data, "password"), email=_opt_str(data, "email"))
            elif path == "/_emulator/jwt_verifiers":
                client_id = _req_str(data, "client_id")
                if not self._known(client_id):
                    return _json_reply(404, {"error": "unknown client"})
                self.add_jwt_verifier(
                    client_id,
                    _req_str(data, "kid"),
                    _req_str(data, "certificate"),
                    user_field=_opt_str(data, "user_field"),
                )
            elif path == "/_emulator/revoke_user":
                self.revoke_user_tokens(_req_str(data, "username"))
            elif path == "/_emulator/faults":
                self.inject(
                    _req_str(data, "fault"),
                    path=_opt_str(data, "path") or TOKEN_PATH,
                    count=_opt_int(data, "count") or 1,
                    retry_after=_opt_int(data, "retry_after") or 1,
                    delay=float(data.get("delay") or 0.0),
                    size=_opt_int(data, "size") or 0,
                    payload=data.get("payload"),
                )
            elif path == "/_emulator/settings":
                if "supports_jwks" in data:
                    self.supports_jwks = bool(data["supports_jwks"])
                if "latency" in data:
                    self.latency = float(data["latency"])
                if "consent_user" in data:
                    self.consent_user = _req_str(data, "consent_user")
            else:
                return _json_reply(404, {"error": "unknown admin endpoint"})
        except (ValueError, TypeError) as exc:
            return _json_reply(400, {"error": str(exc)})
        return _json_reply(200, {"ok": True})


def _req_str(data: dict[str, Any], key: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{key} must be a non-empty string")
    return value


def _opt_str(data: dict[str, Any], key: str) -> str | None:
    value = data.get(key)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{key} must be a string")
    return value


def _opt_int(data: dict[str, Any], key: str) -> int | None:
    value = data.get(key)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
        raise ValueError(f"{key} must be an integer")
    return value


def _opt_list(data: dict[str, Any], key: str) -> list[str] | None:
    value = data.get(key)
    if value is not None and (not isinstance(value, list) or not all(isinstance(v, str) for v in value)):
        raise ValueError(f"{key} must be a list of strings")
    return value


class _Handler(TrackedHandler):
    """Translates HTTP/1.1 requests into ServiceNowEmulator.handle calls."""

    server_version = "ServiceNow"
    sys_version = ""
    timeout = 60

    def _dispatch(self) -> None:
        emulator = self.server.owner
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            self._send(_json_reply(413, {"error": "body too large"}))
            self.close_connection = True
            return
        body = self.rfile.read(length) if length > 0 else b""
        path = urllib.parse.urlsplit(self.path).path
        if path.startswith(ADMIN_PREFIX):
            self._send(emulator.handle_admin(self.command, path, body))
            return
        try:
            reply, grant_type = emulator.handle(self.command, self.path, self.headers, body)
        except Exception:  # an emulator bug must look like a 500, never hang the client
            reply, grant_type = _html_reply(500, SERVER_ERROR_HTML), None
        emulator._log(self.command, path, grant_type, None if reply.drop else reply.status)
        if reply.drop:
            self.close_connection = True
            return
        self._send(reply)

    def _send(self, reply: _Reply) -> None:
        try:
            if reply.drip:
                self._send_dripping(reply)
                return
            self.send_response(reply.status)
            if reply.content_type:
                self.send_header("Content-Type", reply.content_type)
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(reply.body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(reply.body)
        except OSError:
            self.close_connection = True

    def _send_dripping(self, reply: _Reply) -> None:
        """The whole answer, status line included, one byte every `reply.drip` seconds (each well inside any
        per-read timeout)."""
        head = f"HTTP/1.1 {reply.status} OK\r\nContent-Type: {reply.content_type}\r\n"
        head += f"Content-Length: {len(reply.body)}\r\n\r\n"
        self.close_connection = True
        for byte in head.encode() + reply.body:  # an OSError (the client hung up, the server stopped) ends it
            self.wfile.write(bytes([byte]))
            self.wfile.flush()
            time.sleep(reply.drip)

    do_GET = do_POST = do_DELETE = do_PUT = do_PATCH = _dispatch


ServiceNowEmulator.handler_class = _Handler


class ConsentForm(HTMLParser):
    """Reads the consent page's form as a browser would: action, method, hidden fields, submit buttons."""

    def __init__(self) -> None:
        super().__init__()
        self.action = ""
        self.method = ""
        self.fields: dict[str, str] = {}
        self.buttons: dict[str, dict[str, str]] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {key: value or "" for key, value in attrs}
        if tag == "form":
            self.action, self.method = attributes.get("action", ""), attributes.get("method", "get")
        elif tag == "input" and attributes.get("type") == "hidden" and attributes.get("name"):
            self.fields[attributes["name"]] = attributes.get("value", "")
        elif tag == "button":
            self.buttons[attributes.get("id", "")] = attributes


def press_consent(authorize_url: str, button: str = "allow") -> dict[str, str]:
    """Do what a browser does on the consent page, without one: load it, submit the form (tests, demo).

    Returns the query of the redirect ServiceNow sends the browser to (code/state or error/state).
    """
    import requests  # only the client side needs it; the server itself is standard library only

    page = requests.get(authorize_url, timeout=5)
    assert page.status_code == 200, page.status_code
    form = ConsentForm()
    form.feed(page.text)
    base = urllib.parse.urlsplit(authorize_url)
    answer = requests.post(
        f"{base.scheme}://{base.netloc}{form.action}",
        data={**form.fields, "action": form.buttons[button]["value"]},
        allow_redirects=False,
        timeout=5,
    )
    assert answer.status_code == 302, answer.status_code
    return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(answer.headers["Location"]).query))


def main(argv: list[str] | None = None) -> None:
    """Run in the foreground for a local stack; prints only the URL (secrets come from the environment)."""
    parser = argparse.ArgumentParser(description="ServiceNow OAuth emulator")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--client-id")
    parser.add_argument("--client-secret-env", help="name of the environment variable holding the client secret")
    parser.add_argument("--redirect-uri", action="append", default=[], help="repeatable; first one is the default")
    parser.add_argument("--client-credentials-user")
    parser.add_argument("--access-lifespan", type=int, default=1800)
    parser.add_argument("--refresh-lifespan", type=int, default=8_640_000)
    parser.add_argument("--rotate-refresh-tokens", action="store_true")
    args = parser.parse_args(argv)

    emulator = ServiceNowEmulator(
        args.host,
        args.port,
        access_lifespan=args.access_lifespan,
        refresh_lifespan=args.refresh_lifespan,
        rotate_refresh_tokens=args.rotate_refresh_tokens,
    )
    if args.client_id:
        if not args.client_secret_env:
            parser.error("--client-id needs --client-secret-env")
        secret = os.environ.get(args.client_secret_env)
        if not secret:
            parser.error(f"environment variable {args.client_secret_env} is not set")
        emulator.register_client(
            args.client_id, secret, args.redirect_uri, client_credentials_user=args.client_credentials_user
        )
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    emulator.start()
    print(emulator.url, flush=True)
    try:
        while not stopped.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        emulator.stop()


if __name__ == "__main__":
    main()
