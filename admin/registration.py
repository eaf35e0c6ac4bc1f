"""The ServiceNow side of a connection, written through the Table API: the Application Registry entry with the
stack's callback URL, a client secret made here, and for JWT connections the trust in the signing keys (a JWKS
URL on Zurich and later, else a certificate and a verifier map).

Why here and not by hand: a person pasting the callback URL picks the wrong one (ServiceNow silently falls back to
the first registered URL), pastes the client secret into a chat, or uploads the certificate of the wrong key.
Every read comes before the first write, so wrong credentials, a missing role, a hibernating instance or a name
someone else owns are refused with nothing written; every write is found again by a rerun, which finishes the job.
The admin's password is held for this run only: never stored, logged, or put into an error message.
Table and field names, and which are confirmed: docs/servicenow-tables.md.
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

TABLE_PATH = "/api/now/table/"
OAUTH_ENTITY = "oauth_entity"
JWT_ENTITY = "oauth_jwt"  # "OAuth JWT API endpoint for external clients": a child table of oauth_entity
CERTIFICATE = "sys_certificate"
VERIFIER_MAP = "jwt_verifier_map"
MAP_ENTRY = "oauth_jwt"  # the verifier map's reference to its JWT entry
DICTIONARY = "sys_dictionary"
JWKS_URL_FIELD = "jwks_url"
CLIENT_TYPE = "client"
# How an entry says this tool made it (its Comments); an entry without it is someone else's.
MARK = "Managed by servicenow-oauth"
REQUEST_SECONDS = 20.0
DEFAULT_ACCESS_LIFESPAN = 1800
DEFAULT_REFRESH_LIFESPAN = 8_640_000  # 100 days
JWKS = "jwks"
VERIFIER_MAPS = "verifier_map"


class RegistrationError(Exception):
    """A refusal whose message is safe to print: what was wrong, which connection, what to do."""


@dataclass(frozen=True)
class AdminCredentials:
    username: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class JwtTrust:
    """What ServiceNow must trust for a JWT connection's assertions."""

    key_id: str
    user_field: str
    jwks_url: str
    certificate: Callable[[], str]  # the PEM for the key (made by kms:Sign only when a verifier map needs it)
    public_key: Any  # the key's public half (cryptography's RSAPublicKey), to recognise its certificates
    mode: str = "auto"  # auto (JWKS where the release has it), jwks, verifier_map
    known: bool = False  # the mode an earlier run recorded in the connection: kept, whatever the release says


@dataclass(frozen=True)
class Plan:
    connection: str
    entry_name: str
    callback_url: str
    access_lifespan: int = DEFAULT_ACCESS_LIFESPAN
    refresh_lifespan: int = DEFAULT_REFRESH_LIFESPAN
    adopt: bool = False
    jwt: JwtTrust | None = None


@dataclass
class Registered:
    """The entry as this run leaves it; `client_secret` is set only when this run set a new one."""

    client_id: str
    sys_id: str
    client_secret: str | None = field(default=None, repr=False)
    trust: str | None = None
    changes: list[str] = field(default_factory=list)


def _value(field_value: Any) -> str:
    """A Table API value: a string, or a reference's `value`."""
    if isinstance(field_value, Mapping):
        return str(field_value.get("value") or "")
    return "" if field_value is None else str(field_value)


def admin_session() -> requests.Session:
    """Reads are retried on a busy instance (urllib3's Retry, honouring Retry-After); writes never are: a
    lost answer to an insert is found again by the next run's read instead of being inserted twice."""
    session = requests.Session()
    retry = Retry(
        total=2,
        connect=2,
        read=0,
        status=2,
        backoff_factor=1.0,
        status_forcelist=(429, 502, 503, 504),
        allowed_methods=frozenset({"GET"}),
        respect_retry_after_header=True,
        raise_on_status=False,
    )
    session.mount("https://", HTTPAdapter(max_retries=retry))
    session.mount("http://", HTTPAdapter(max_retries=retry))
    return session


class TableApi:
    """ServiceNow's Table API as one admin, with every failure turned into one clear line."""

    def __init__(self, session: requests.Session, instance_url: str, admin: AdminCredentials, connection: str) -> None:
        self.session = session
        self.instance_url = instance_url.rstrip("/")
        self.host = urlsplit(self.instance_url).hostname or self.instance_url
        self.admin = admin
        self.connection = connection
        self.written: list[str] = []  # what this run changed in ServiceNow, for an error's last words

    def refused(self, what: str) -> RegistrationError:
        done = (
            f"already done in ServiceNow: {'; '.join(self.written)}; run the same command again to finish"
            if self.written
            else "nothing was written"
        )
        return RegistrationError(f"connection {self.connection!r}: {what}; {done}")

    def call(self, method: str, table: str, sys_id: str | None = None, **kwargs: Any) -> Any:
        url = f"{self.instance_url}{TABLE_PATH}{table}" + (f"/{quote(sys_id, safe='')}" if sys_id else "")
        # Basic auth in UTF-8 (RFC 7617): requests would encode latin-1 and raise with the password in the error.
        basic = base64.b64encode(f"{self.admin.username}:{self.admin.password}".encode()).decode("ascii")
        try:
            answer = self.session.request(
                method,
                url,
                headers={"Accept": "application/json", "Authorization": f"Basic {basic}"},
                timeout=REQUEST_SECONDS,
                allow_redirects=False,
                **kwargs,
            )
        except requests.RequestException as error:
            raise self.refused(
                f"ServiceNow at {self.host} could not be reached ({type(error).__name__}): check the instance URL "
                "and that it is up"
            ) from None
        status = answer.status_code
        if status == 401:
            raise self.refused(
                f"ServiceNow at {self.host} refused the admin credentials (401): check the user name and password"
            )
        if status == 403:
            verb = {"GET": "read", "POST": "create", "PATCH": "change", "DELETE": "delete"}.get(method, method)
            raise self.refused(
                f"ServiceNow user {self.admin.username!r} may not {verb} {table} (403): it needs the admin or "
                "oauth_admin role"
            )
        content_type = answer.headers.get("Content-Type", "").lower()
        if status in (200, 201) and "json" not in content_type:
            if "hibernat" in answer.text.lower():
                raise self.refused(
                    f"ServiceNow at {self.host} is hibernating: wake it up (developer.servicenow.com) and run again"
                )
            raise self.refused(f"ServiceNow at {self.host} answered with a page, not the Table API (an instance?)")
        if status == 404 and sys_id is None:
            raise self.refused(f"ServiceNow at {self.host} has no table {table} (404): see docs/servicenow-tables.md")
        if status == 429:
            raise self.refused(f"ServiceNow at {self.host} is rate limiting (429): run again later")
        if status >= 500:
            raise self.refused(f"ServiceNow at {self.host} failed ({status}): run again later")
        if status == 204 or (method == "DELETE" and status == 404):
            return None
        if status not in (200, 201):
            raise self.refused(f"ServiceNow at {self.host} refused {method} {table} ({status})")
        try:
            return answer.json()["result"]
        except (ValueError, KeyError, TypeError):
            raise self.refused(f"ServiceNow at {self.host} answered {table} without a Table API result") from None

    def find(self, table: str, **equals: str) -> list[dict[str, Any]]:
        query = "^".join(f"{name}={value}" for name, value in equals.items())
        rows = self.call("GET", table, params={"sysparm_query": query, "sysparm_limit": "10"})
        return [row for row in rows if isinstance(row, dict)] if isinstance(rows, list) else []

    def insert(self, table: str, fields: dict[str, Any], what: str) -> dict[str, Any]:
        row = self.call("POST", table, json=fields)
        self.written.append(what)
        return dict(row) if isinstance(row, dict) else {}

    def update(self, table: str, sys_id: str, fields: dict[str, Any], what: str) -> None:
        self.call("PATCH", table, sys_id, json=fields)
        self.written.append(what)

    def delete(self, table: str, sys_id: str, what: str) -> None:
        self.call("DELETE", table, sys_id)
        self.written.append(what)

    def has_field(self, table: str, element: str) -> bool:
        return bool(self.find(DICTIONARY, name=table, element=element))


def _redirect_urls(entry: Mapping[str, Any]) -> list[str]:
    return [url.strip() for url in _value(entry.get("redirect_url")).split(",") if url.strip()]


def register_client(
    api: TableApi,
    plan: Plan,
    *,
    holds_client_id: str | None,
    tokens_of: str | None,
    new_secret: Callable[[], str] = lambda: secrets.token_urlsafe(36),
) -> Registered:
    """Create or find the connection's Application Registry entry and make it serve this stack.

    Args:
        holds_client_id: the client id the connection secret holds now (its secret is then known), if any.
        tokens_of: the client id whose tokens the connection holds, if it holds any: another client is refused,
            since its tokens would be orphaned.
    """
    found = api.find(OAUTH_ENTITY, name=plan.entry_name)
    if len(found) > 1:
        raise api.refused(f"{len(found)} Application Registry entries are named {plan.entry_name!r}: keep one")
    mode = _trust_mode(api, plan) if plan.jwt is not None else None
    if not found:
        if tokens_of is not None:
            raise api.refused(
                f"the connection holds tokens of client {tokens_of[:8]}…, which a new entry would orphan: adopt "
                "that client's entry with --adopt NAME"
            )
        return _create(api, plan, mode, new_secret)
    entry = found[0]
    client_id, sys_id = _value(entry.get("client_id")), _value(entry.get("sys_id"))
    owned = MARK in _value(entry.get("comments"))
    if not owned and not plan.adopt:
        raise api.refused(
            f"an Application Registry entry named {plan.entry_name!r} exists that this tool did not create: pass "
            f"--adopt {plan.entry_name!r} to use it (its other redirect URLs are kept), or choose another --entry-name"
        )
    # A query of oauth_entity answers its child tables' rows too, each naming its class.
    kind = _value(entry.get("sys_class_name")) or OAUTH_ENTITY
    if kind != _table(plan):
        raise api.refused(
            f"the entry {plan.entry_name!r} is a {kind}, not a {_table(plan)}: choose another --entry-name"
        )
    if tokens_of is not None and tokens_of != client_id:
        raise api.refused(
            f"the connection holds tokens of client {tokens_of[:8]}…, not of the entry {plan.entry_name!r}: "
            "revoke it first (make revoke) or register another connection"
        )
    registered = Registered(client_id=client_id, sys_id=sys_id)
    changed: dict[str, Any] = {}
    urls = _redirect_urls(entry)
    if plan.callback_url not in urls:
        changed["redirect_url"] = ",".join([*urls, plan.callback_url])
        registered.changes.append(f"added the callback URL to the entry's {len(urls)} other redirect URL(s)")
    if holds_client_id != client_id:
        registered.client_secret = new_secret()
        changed["client_secret"] = registered.client_secret
        registered.changes.append("set a new client secret (made here; kept only in the connection secret)")
    if plan.jwt is not None and mode == JWKS and _value(entry.get(JWKS_URL_FIELD)) != plan.jwt.jwks_url:
        changed[JWKS_URL_FIELD] = plan.jwt.jwks_url
        registered.changes.append("set the JWKS URL")
    if plan.jwt is not None and mode == VERIFIER_MAPS:  # its certificate (kms:Sign) comes before any write
        registered.changes += ensure_verifier_map(
            api, plan.connection, sys_id, plan.jwt.key_id, plan.jwt.certificate, plan.jwt.public_key
        )
    if changed:
        api.update(_table(plan), sys_id, changed, f"updated entry {plan.entry_name!r}")
    registered.trust = mode
    return registered


def _trust_mode(api: TableApi, plan: Plan) -> str:
    assert plan.jwt is not None
    if plan.jwt.known:
        return plan.jwt.mode  # a rerun keeps how ServiceNow trusts the keys, so it changes nothing
    supports = api.has_field(JWT_ENTITY, JWKS_URL_FIELD)
    if plan.jwt.mode == JWKS and not supports:
        raise api.refused(
            f"ServiceNow at {api.host} has no JWKS URL field ({JWT_ENTITY}.{JWKS_URL_FIELD}, Zurich and later): "
            "use --trust verifier_map"
        )
    if plan.jwt.mode == VERIFIER_MAPS or not supports:
        return VERIFIER_MAPS
    return JWKS


def _table(plan: Plan) -> str:
    return JWT_ENTITY if plan.jwt is not None else OAUTH_ENTITY


def _create(api: TableApi, plan: Plan, mode: str | None, new_secret: Callable[[], str]) -> Registered:
    # A verifier map's certificate is made (kms:Sign) before the first write, so a key that cannot sign writes nothing.
    pem = plan.jwt.certificate() if plan.jwt is not None and mode == VERIFIER_MAPS else None
    client_secret = new_secret()
    fields: dict[str, Any] = {
        "name": plan.entry_name,
        "redirect_url": plan.callback_url,
        "access_token_lifespan": str(plan.access_lifespan),
        "refresh_token_lifespan": str(plan.refresh_lifespan),
        "active": "true",
        "client_secret": client_secret,
        "comments": f"{MARK} for connection {plan.connection}; the client secret is in its connection secret.",
    }
    if plan.jwt is None:
        fields["type"] = CLIENT_TYPE
    else:  # ServiceNow's documented defaults, set explicitly (its pages disagree on the clock skew's)
        fields.update({"user_field": plan.jwt.user_field, "enable_jti_verification": "true", "clock_skew": "300"})
        if mode == JWKS:
            fields[JWKS_URL_FIELD] = plan.jwt.jwks_url
    row = api.insert(_table(plan), fields, f"created entry {plan.entry_name!r}")
    client_id, sys_id = _value(row.get("client_id")), _value(row.get("sys_id"))
    if not client_id or not sys_id:
        raise api.refused("ServiceNow created the entry but did not answer its client id")
    registered = Registered(
        client_id=client_id,
        sys_id=sys_id,
        client_secret=client_secret,
        trust=mode,
        changes=[
            f"created the Application Registry entry {plan.entry_name!r} (redirect URL {plan.callback_url}, "
            f"tokens {plan.access_lifespan} s / {plan.refresh_lifespan} s)"
        ],
    )
    if plan.jwt is not None and mode == JWKS:
        registered.changes.append(f"trusts the keys published at {plan.jwt.jwks_url}")
    if plan.jwt is not None and pem is not None:
        registered.changes += ensure_verifier_map(
            api, plan.connection, sys_id, plan.jwt.key_id, lambda: pem, plan.jwt.public_key
        )
    return registered


def certificate_name(connection: str, key_id: str) -> str:
    return f"servicenow-oauth {connection} {key_id}"


def _of_key(pem: str, public_key: Any) -> bool:
    """Whether a certificate in ServiceNow certifies this very key."""
    from cryptography import x509

    try:
        found = x509.load_pem_x509_certificate(pem.encode("ascii")).public_key()
        return bool(found.public_numbers() == public_key.public_numbers())
    except (ValueError, UnicodeEncodeError, AttributeError):
        return False


def ensure_verifier_map(
    api: TableApi,
    connection: str,
    entity_sys_id: str,
    key_id: str,
    certificate: Callable[[], str],
    public_key: Any,
) -> list[str]:
    """The certificate of `key_id` in sys_certificate and a verifier map from the kid to it (found, or made).
    What is found must certify this key: a map or certificate of another key under the same kid is refused."""
    name = certificate_name(connection, key_id)
    maps = api.find(VERIFIER_MAP, **{MAP_ENTRY: entity_sys_id, "kid": key_id})
    if maps:
        mapped = _value(maps[0].get("sys_certificate"))
        row = api.call("GET", CERTIFICATE, mapped) if mapped else None
        if not isinstance(row, dict) or not _of_key(_value(row.get("pem_certificate")), public_key):
            raise api.refused(
                f"ServiceNow's verifier map for key id {key_id!r} trusts a certificate of another key: remove that "
                "map, or use another --jwt-key-id"
            )
        return []
    certificates = api.find(CERTIFICATE, name=name)
    if certificates:
        if not _of_key(_value(certificates[0].get("pem_certificate")), public_key):
            raise api.refused(
                f"ServiceNow's certificate {name!r} is of another key: delete it, or use another --jwt-key-id"
            )
        certificate_id = _value(certificates[0].get("sys_id"))
    else:
        row = api.insert(
            CERTIFICATE,
            {
                "name": name,
                "format": "PEM",
                "type": "trust_store",
                "pem_certificate": certificate(),
                "active": "true",
            },
            f"uploaded certificate {name!r}",
        )
        certificate_id = _value(row.get("sys_id"))
    api.insert(
        VERIFIER_MAP,
        {"name": name, "kid": key_id, "sys_certificate": certificate_id, MAP_ENTRY: entity_sys_id},
        f"added verifier map {key_id!r}",
    )
    return [f"trusts key id {key_id!r} through a verifier map (certificate {name!r})"]


def remove_verifier_maps(api: TableApi, connection: str, entity_sys_id: str, keep: set[str]) -> list[str]:
    """Delete the entry's verifier maps for every kid not in `keep`, and the certificates this tool uploaded
    for them; the end of a key rollover, on an explicit command only."""
    removed = []
    for mapping in api.find(VERIFIER_MAP, **{MAP_ENTRY: entity_sys_id}):
        kid = _value(mapping.get("kid"))
        if kid in keep:
            continue
        api.delete(VERIFIER_MAP, _value(mapping.get("sys_id")), f"removed verifier map {kid!r}")
        for certificate in api.find(CERTIFICATE, name=certificate_name(connection, kid)):
            api.delete(CERTIFICATE, _value(certificate.get("sys_id")), f"removed certificate of {kid!r}")
        removed.append(kid)
    return removed


def find_entry(api: TableApi, entry_name: str) -> dict[str, Any]:
    found = api.find(JWT_ENTITY, name=entry_name)
    if len(found) != 1:
        raise api.refused(f"found {len(found)} Application Registry entries named {entry_name!r}, expected one")
    return found[0]
