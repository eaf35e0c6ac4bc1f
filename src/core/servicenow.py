"""ServiceNow's OAuth endpoints (`oauth_auth.do`, `oauth_token.do`, `oauth_revoke_token.do`) and their quirks.

Building requests and parsing answers are pure functions; `ServiceNowClient` only adds the HTTP
session. Every failure is raised as one of `core.errors`' classes, decided here and nowhere else.

HTTP goes through urllib3 directly, the pool and `Retry` that botocore already loads: `requests` would add its
own import (with charset_normalizer, idna and http.cookiejar) to every cold start for a form POST and a JSON
answer (benchmarks/RESULTS.md, cold start). `core.consumer`, for the services that call ServiceNow, stays on
`requests`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal
from urllib.parse import urlencode

from urllib3 import BaseHTTPResponse, PoolManager, Timeout
from urllib3.exceptions import ConnectTimeoutError, HTTPError, MaxRetryError, ReadTimeoutError, ResponseError
from urllib3.util.retry import Retry

from core import bounded
from core.bounded import MAX_ANSWER_BYTES, AnswerTooLarge, Deadline, read_bounded, watched
from core.clock import Clock, utc_now
from core.errors import (
    CredentialRejected,
    InstanceUnavailable,
    ProviderError,
    RateLimited,
    TransientProviderError,
)
from core.tokens import OAuthApp, Token

GrantType = Literal[
    "authorization_code",
    "refresh_token",
    "password",
    "client_credentials",
    "urn:ietf:params:oauth:grant-type:jwt-bearer",
]
JWT_BEARER: GrantType = "urn:ietf:params:oauth:grant-type:jwt-bearer"

AUTHORIZE_PATH = "/oauth_auth.do"
TOKEN_PATH = "/oauth_token.do"
REVOKE_PATH = "/oauth_revoke_token.do"

# (connect, read) seconds: a token call that takes longer than this is failing, and Lambda bills the wait.
DEFAULT_TIMEOUT = (3.05, 10.0)
# The hard end of one request: its connects, retries, Retry-After waits and whole answer (core.bounded.Deadline).
# The timeouts above bound each socket operation only; a drip-fed answer passes every one of them.
REQUEST_DEADLINE_SECONDS = 30.0
# A revocation is cleanup after a lost race or a failed consent: never skipped for a spent budget, but short.
REVOKE_DEADLINE_SECONDS = 15.0
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
_SAFE_ERROR_CODE = re.compile(r"[a-z_]{1,40}")  # with fullmatch
# What a token answer may hold: RFC 6749's token characters (printable ASCII, no space), within a length that fits
# a secret with room for the rest (ServiceNow's tokens are ~90 characters, its JWT access tokens ~1-2 KB), and a
# lifetime of 1 s to a year (ServiceNow's default is 1,800 s; a longer one would stop refreshes for its length).
MAX_TOKEN_CHARS = 16 * 1024
MAX_EXPIRES_IN = 366 * 86_400
_TOKEN_CHARS = re.compile(r"[\x21-\x7e]+")  # each used with fullmatch: `$` would let a final newline through
_SCOPE_CHARS = re.compile(r"[\x20-\x7e]{0,1024}")
_TOKEN_TYPE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,39}")
_UNREADABLE = object()  # a JSON answer that does not parse


class _BoundedRetry(Retry):
    """urllib3 `Retry` that gives up instead of sleeping through a `Retry-After` longer than the budget.

    urllib3's own `retry_after_max` only shortens the sleep and retries anyway; a Lambda with a
    5-minute sweep should instead stop, report rate limiting, and try on a later run.
    """

    retry_after_budget: float = 10.0

    def new(self, **kwargs: Any) -> _BoundedRetry:
        fresh = super().new(**kwargs)
        fresh.retry_after_budget = self.retry_after_budget
        return fresh

    def increment(self, method=None, url=None, response=None, error=None, _pool=None, _stacktrace=None):  # type: ignore[no-untyped-def]
        if bounded.remaining() == 0:  # the request's deadline has passed: no retry can end in time
            raise MaxRetryError(_pool, url, error or ResponseError("the request's deadline passed"))
        if response is not None:
            retry_after = self.get_retry_after(response)
            if retry_after is not None and retry_after > self.retry_after_budget:
                raise MaxRetryError(_pool, url, ResponseError(f"Retry-After {retry_after:.0f}s exceeds budget"))
        return super().increment(method, url, response, error, _pool, _stacktrace)

    def sleep(self, response: BaseHTTPResponse | None = None) -> None:
        """urllib3's wait (Retry-After, else backoff), never past the request's deadline: the next try would fail."""
        left = bounded.remaining()
        if left is None:
            return super().sleep(response)
        retry_after = (
            self.get_retry_after(response) if response is not None and self.respect_retry_after_header else None
        )
        time.sleep(max(0.0, min(retry_after if retry_after else self.get_backoff_time(), left)))


HEADERS = {"Accept": "application/json", "Accept-Encoding": "gzip, deflate", "User-Agent": "servicenow-oauth-aws"}


def retry_policy(
    *,
    retries: int = 2,
    backoff_factor: float = 0.5,
    backoff_max: float = 4.0,
    retry_after_max: float = 10.0,
    retry_methods: tuple[str, ...] = ("GET", "POST"),
    replay: bool = True,
) -> Retry:
    """Bounded retries: backoff with jitter, honouring `Retry-After` up to a budget.

    POST is retried on purpose: refresh, password and client_credentials grants are safe to repeat
    (ServiceNow hands back the still-valid token). With `replay=False` only connection failures are
    retried - a request that never reached the server: nothing that may have been processed is sent
    twice (the single-use code exchange, a refresh token that rotates, a connection already failing).
    """
    retry = _BoundedRetry(
        total=retries,
        connect=retries,
        read=retries if replay else False,
        status=retries if replay else 0,
        other=0,
        allowed_methods=frozenset(retry_methods),
        status_forcelist=RETRY_STATUSES if replay else frozenset(),
        backoff_factor=backoff_factor,
        backoff_max=backoff_max,
        backoff_jitter=backoff_factor,
        respect_retry_after_header=replay,
        raise_on_status=False,
        raise_on_redirect=False,
        retry_after_max=86_400,  # read the real value; the budget below decides
    )
    retry.retry_after_budget = retry_after_max
    return retry


def build_session(*, pool_connections: int = 64, pool_maxsize: int = 16, **retry: Any) -> PoolManager:
    """One pooled session (a urllib3 pool manager) with `retry_policy(**retry)`, whose connections obey the
    deadline of the request that uses them."""
    return watched(
        PoolManager(num_pools=pool_connections, maxsize=pool_maxsize, retries=retry_policy(**retry), headers=HEADERS)
    )


@dataclass(frozen=True)
class Answer:
    """A whole answer from the instance, read within the size and time bounds (`core.bounded`)."""

    status: int
    headers: Mapping[str, str]
    body: bytes


def new_code_verifier() -> str:
    """PKCE verifier: 64 URL-safe characters (RFC 7636 allows 43-128)."""
    return secrets.token_urlsafe(48)


def code_challenge(verifier: str) -> str:
    """PKCE S256 challenge: base64url(SHA-256(verifier)) without padding."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def authorization_url(app: OAuthApp, *, redirect_uri: str, state: str, challenge: str, scope: str | None = None) -> str:
    """The `oauth_auth.do` link a person opens to consent (authorization code flow with PKCE S256)."""
    params = {
        "response_type": "code",
        "client_id": app.client_id,
        "redirect_uri": redirect_uri,
        "state": state,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    if scope:
        params["scope"] = scope
    return f"{app.instance_url}{AUTHORIZE_PATH}?{urlencode(params)}"


def grant_form(app: OAuthApp, grant: GrantType, **values: str | None) -> dict[str, str]:
    """The form body for a token grant; credentials go in the body only (ServiceNow refuses them in the query)."""
    form = {"grant_type": grant, "client_id": app.client_id, "client_secret": app.client_secret}
    form.update({key: value for key, value in values.items() if value})
    return form


def _is_json(response: Answer) -> bool:
    return "json" in response.headers.get("Content-Type", "").lower()


def _json_body(response: Answer, unreadable: Any = None) -> Any:
    """The parsed JSON answer; None when it is not JSON, `unreadable` when it says JSON and does not parse (not
    UTF-8, invalid, a number of thousands of digits, nesting deep enough to exhaust the parser's recursion)."""
    if not _is_json(response):
        return None
    try:
        return json.loads(response.body.decode("utf-8"))
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return unreadable


def _retry_after(response: Answer) -> float | None:
    """Seconds from a numeric Retry-After, within 0..1 day (anything else is ignored, not trusted)."""
    try:
        seconds = float(response.headers.get("Retry-After", ""))
    except ValueError:
        return None
    return seconds if 0 <= seconds <= 86_400 else None


def classify_failure(app: OAuthApp, grant: str, response: Answer) -> ProviderError:
    """Map a non-success answer to its error class; the body's text is never copied into the message."""
    status = response.status
    body = _json_body(response)
    if status == 429:
        return RateLimited(app.host, grant, "rate limited (HTTP 429); retry later", _retry_after(response))
    if status >= 500:
        return TransientProviderError(app.host, grant, f"server error (HTTP {status}); retry later")
    if body is None:
        return InstanceUnavailable(
            app.host,
            grant,
            f"instance answered HTTP {status} with a non-JSON page (hibernating, maintenance or wrong URL); "
            "wake the instance or check instanceUrl",
        )
    if status in (400, 401, 403) and isinstance(body, Mapping):
        code = str(body.get("error", ""))
        described = str(body.get("error_description", ""))
        shown = "/".join(c for c in (code, described) if _SAFE_ERROR_CODE.fullmatch(c)) or "error"
        return CredentialRejected(
            app.host,
            grant,
            f"credential rejected (HTTP {status} {shown}); check the client id and secret, "
            "or re-authorize the connection if its refresh token expired or was revoked",
        )
    return InstanceUnavailable(app.host, grant, f"unexpected HTTP {status} from the token endpoint; check instanceUrl")


def _unusable(app: OAuthApp, grant: str, what: str) -> TransientProviderError:
    """A 200 whose tokens cannot be right: nothing is stored. ServiceNow may have processed the grant (a rotated
    refresh token in an answer we refuse is lost like one in a lost answer), so it counts as `maybe_processed`."""
    return TransientProviderError(
        app.host,
        grant,
        f"token endpoint answered 200 with {what}; nothing was stored, retry later",
        maybe_processed=True,
    )


def _token_field(app: OAuthApp, grant: str, body: Mapping[str, Any], name: str, *, required: bool) -> str | None:
    value = body.get(name)
    if value is None or (value == "" and not required):
        if required:
            raise _unusable(app, grant, f"no {name}")
        return None
    if not isinstance(value, str):
        raise _unusable(app, grant, f"a {name} that is not a string ({type(value).__name__})")
    if len(value) > MAX_TOKEN_CHARS:
        raise _unusable(app, grant, f"a {name} of {len(value):,} characters (at most {MAX_TOKEN_CHARS:,} are stored)")
    if not _TOKEN_CHARS.fullmatch(value):
        raise _unusable(app, grant, f"a {name} holding characters no token has (space, control or non-ASCII)")
    return value


def _expires_in(app: OAuthApp, grant: str, value: Any) -> int:
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 9:
        value = int(value)  # some gateways quote numbers (a longer one is out of range anyway)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _unusable(app, grant, f"an expires_in that is not a whole number ({type(value).__name__})")
    if not 0 < value <= MAX_EXPIRES_IN:
        raise _unusable(app, grant, f"an expires_in of {value} s (expected 1 s to {MAX_EXPIRES_IN:,} s)")
    return value


def parse_token(app: OAuthApp, grant: str, response: Answer, received_at: datetime) -> Token:
    """Turn a 200 JSON answer into a `Token`, or raise the classified error. An answer that cannot be right is
    refused with what was wrong, never the value."""
    if response.status != 200 or not _is_json(response):
        raise classify_failure(app, grant, response)
    body = _json_body(response, unreadable=_UNREADABLE)
    if body is _UNREADABLE:
        raise _unusable(app, grant, "a JSON body that does not parse")
    if not isinstance(body, Mapping):
        raise _unusable(app, grant, f"a JSON {type(body).__name__} instead of an object")
    access_token = _token_field(app, grant, body, "access_token", required=True)
    assert access_token is not None
    refresh_token = _token_field(app, grant, body, "refresh_token", required=False)
    expires_in = _expires_in(app, grant, body.get("expires_in"))
    token_type = body.get("token_type") or "Bearer"
    if not isinstance(token_type, str) or not _TOKEN_TYPE.fullmatch(token_type):
        raise _unusable(app, grant, "a token_type that is not a short word")
    scope = body.get("scope")
    if scope is not None and (not isinstance(scope, str) or not _SCOPE_CHARS.fullmatch(scope)):
        raise _unusable(app, grant, "a scope that is not up to 1,024 printable characters")
    return Token(
        access_token=access_token,
        token_type=token_type,
        access_token_expires_at=received_at + timedelta(seconds=expires_in),
        scope=scope or None,
        refresh_token=refresh_token,
    )


def _reason(exc: Exception) -> BaseException | None:
    """The failure itself: urllib3 wraps it in a MaxRetryError once its retries are spent."""
    return exc.reason if isinstance(exc, MaxRetryError) else exc


class ServiceNowClient:
    """Calls one ServiceNow endpoint set through an injected session; tests point it at the emulator.

    Every request ends by `request_seconds` (connects, retries, waits and the whole answer); within a `budget`,
    token requests also end by the budget's end, so one refresh attempt cannot outlast its share of the Lambda's
    time whatever the instance does. A revocation is cleanup that must not be skipped: only its own deadline applies.
    """

    def __init__(
        self,
        session: PoolManager,
        *,
        single_shot: PoolManager | None = None,
        clock: Clock = utc_now,
        timeout: tuple[float, float] = DEFAULT_TIMEOUT,
        request_seconds: float = REQUEST_DEADLINE_SECONDS,
    ) -> None:
        self._session = session
        # Never re-sends what may have reached ServiceNow (built once, beside the retrying session).
        self._single_shot = single_shot or build_session(replay=False)
        self._clock = clock
        self._timeout = timeout
        self.request_seconds = request_seconds
        self._budget = threading.local()

    @contextmanager
    def budget(self, seconds: float) -> Iterator[None]:
        """Token requests this thread sends within the block end by `seconds` from now, all together."""
        outer = getattr(self._budget, "end", None)
        end = time.monotonic() + seconds
        self._budget.end = end if outer is None else min(outer, end)
        try:
            yield
        finally:
            self._budget.end = outer

    def _seconds_for(self, grant: str) -> float:
        if grant == "revoke":
            return min(self.request_seconds, REVOKE_DEADLINE_SECONDS)
        end: float | None = getattr(self._budget, "end", None)
        if end is None:
            return self.request_seconds
        return min(self.request_seconds, end - time.monotonic())

    def _post(self, session: PoolManager, app: OAuthApp, path: str, grant: str, form: dict[str, str]) -> Answer:
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        return self._send(session, app, grant, "POST", f"{app.instance_url}{path}", urlencode(form).encode(), headers)

    def _send(
        self,
        session: PoolManager,
        app: OAuthApp,
        grant: str,
        method: str,
        url: str,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Answer:
        seconds = self._seconds_for(grant)
        if seconds <= 0:
            raise TransientProviderError(
                app.host, grant, "not sent: this attempt's time for token requests is spent; retry later"
            )
        with Deadline(seconds) as deadline:
            try:
                answer = self._exchange(session, method, url, body, headers)
            except AnswerTooLarge:
                raise TransientProviderError(
                    app.host,
                    grant,
                    f"answer larger than {MAX_ANSWER_BYTES // 1024} KiB (after decompression) refused; retry later",
                    maybe_processed=True,
                ) from None
            except (HTTPError, ValueError) as exc:
                if deadline.expired:
                    raise self._late(app, grant, deadline) from None
                raise self._transport_failure(app, grant, exc) from None
            if deadline.expired:
                # Even a "whole" answer: one cut off by the deadline may look complete (no Content-Length).
                raise self._late(app, grant, deadline)
            return answer

    @staticmethod
    def _late(app: OAuthApp, grant: str, deadline: Deadline) -> TransientProviderError:
        return TransientProviderError(
            app.host,
            grant,
            f"no whole answer within {deadline.seconds:.0f} s (the request's deadline); retry later",
            maybe_processed=True,
        )

    def _exchange(
        self, session: PoolManager, method: str, url: str, body: bytes | None, headers: Mapping[str, str] | None
    ) -> Answer:
        response: BaseHTTPResponse = session.urlopen(
            method,
            url,
            body=body,
            headers={**session.headers, **(headers or {})},
            timeout=Timeout(connect=self._timeout[0], read=self._timeout[1]),
            redirect=False,
            preload_content=False,
        )
        content = read_bounded(response)
        return Answer(response.status, response.headers, content)

    @staticmethod
    def _transport_failure(app: OAuthApp, grant: str, exc: Exception) -> TransientProviderError:
        if isinstance(exc, ValueError):
            # http.client refused to build the request (a header value with CR/LF, a character it cannot encode;
            # its message would hold the value, a token), or urllib3 could not parse an answer's Retry-After on a
            # retrying session (never used for a refresh token that rotates).
            return TransientProviderError(
                app.host, grant, f"could not send the request or read its answer ({type(exc).__name__}); retry later"
            )
        reason = _reason(exc)  # urllib3's HTTPError: every transport failure, after its retries
        if isinstance(reason, ConnectTimeoutError):
            # No connection was made (NewConnectionError is a ConnectTimeoutError too): nothing was sent.
            return TransientProviderError(app.host, grant, f"could not connect ({type(reason).__name__}); retry later")
        what = "timed out" if isinstance(reason, ReadTimeoutError) else f"connection lost ({type(reason).__name__})"
        return TransientProviderError(
            app.host, grant, f"{what} after the request was sent; retry later", maybe_processed=True
        )

    def _grant(self, app: OAuthApp, grant: GrantType, *, replay: bool = True, **values: str | None) -> Token:
        session = self._session if replay else self._single_shot
        label = "jwt_bearer" if grant == JWT_BEARER else grant  # what messages call it
        response = self._post(session, app, TOKEN_PATH, label, grant_form(app, grant, **values))
        return parse_token(app, label, response, self._clock())

    def exchange_code(self, app: OAuthApp, *, code: str, redirect_uri: str, code_verifier: str) -> Token:
        """authorization_code grant. Never retried: the code is single-use, and a retry after a lost
        answer would be refused and hide the success."""
        return self._grant(
            app, "authorization_code", replay=False, code=code, redirect_uri=redirect_uri, code_verifier=code_verifier
        )

    def refresh(self, app: OAuthApp, refresh_token: str, *, replay: bool = True) -> Token:
        """refresh_token grant: ServiceNow returns the same refresh token and does not extend its life.

        Pass `replay=False` when the refresh token rotates: a re-sent request after a lost answer would
        spend a token that is already dead."""
        return self._grant(app, "refresh_token", replay=replay, refresh_token=refresh_token)

    def password_grant(
        self, app: OAuthApp, *, username: str, password: str, scope: str | None = None, replay: bool = True
    ) -> Token:
        """password grant: also issues a refresh token with a fresh lifespan."""
        return self._grant(app, "password", replay=replay, username=username, password=password, scope=scope)

    def client_credentials(self, app: OAuthApp, *, scope: str | None = None, replay: bool = True) -> Token:
        """client_credentials grant (Washington DC or later, with an OAuth Application User): no refresh token."""
        return self._grant(app, "client_credentials", replay=replay, scope=scope)

    def jwt_bearer(self, app: OAuthApp, assertion: str) -> Token:
        """JWT bearer grant (an assertion signed by the connection's KMS key): no refresh token. Never re-sent
        by the HTTP layer - ServiceNow refuses a reused `jti` by default, so a retry needs a new assertion."""
        return self._grant(app, JWT_BEARER, replay=False, assertion=assertion)

    def revoke(self, app: OAuthApp, token: str) -> None:
        """Mark a token expired in ServiceNow (`oauth_revoke_token.do`); the response body is undocumented."""
        form = {"token": token, "client_id": app.client_id, "client_secret": app.client_secret}
        response = self._post(self._session, app, REVOKE_PATH, "revoke", form)
        # A 200 HTML page is the hibernation or login page, not a revocation.
        if response.status >= 300 or "html" in response.headers.get("Content-Type", "").lower():
            raise classify_failure(app, "revoke", response)

    def current_user(self, instance_url: str, access_token: str) -> str:
        """The user name a token acts as (for `expectedUser` checks), via the Table API."""
        app = OAuthApp(instance_url, "", "")
        query = urlencode({"sysparm_query": "user_name=javascript:gs.getUserName()", "sysparm_fields": "user_name"})
        url = f"{instance_url}/api/now/table/sys_user?{query}"
        response = self._send(
            self._session, app, "whoami", "GET", url, headers={"Authorization": f"Bearer {access_token}"}
        )
        body = _json_body(response)
        if response.status != 200 or not isinstance(body, Mapping):
            raise classify_failure(app, "whoami", response)
        result = body.get("result") or []
        if not result or not isinstance(result[0], Mapping) or not result[0].get("user_name"):
            raise InstanceUnavailable(app.host, "whoami", "Table API returned no user for the token")
        return str(result[0]["user_name"])
