"""HTTP API (payload 2.0): GET /connections/{name}/authorize starts a consent, GET /callback completes it,
GET /connections/{name}/jwks.json publishes a jwt_bearer connection's public keys."""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

from aws_lambda_powertools import Metrics
from aws_lambda_powertools.metrics import MetricUnit

from core.clock import utc_now
from core.config import load_settings
from core.consent import complete_consent, start_consent
from core.errors import (
    ConcurrentUpdate,
    ConnectionNotFound,
    ConsentError,
    CredentialRejected,
    InvalidName,
    NoPublicKeys,
    ProviderError,
    PublicKeyUnavailable,
    RateLimited,
    SecretFormatError,
    ServiceNowOAuthError,
    TransientProviderError,
)
from core.jwks import CACHE_SECONDS, KeyPublisher
from core.pages import SECURITY_HEADERS, authorized_page, error_page
from core.servicenow import ServiceNowClient, build_session
from handlers.runtime import KMS_CONFIG, CachedSecret, LazyClient, build_logger, build_monitor, build_store

if TYPE_CHECKING:
    from collections.abc import Callable

    from aws_lambda_powertools.utilities.typing import LambdaContext

logger = build_logger()
metrics = Metrics()
settings = load_settings()
store = build_store(settings)
monitor = build_monitor(settings, store.client, logger)
state_key = CachedSecret(store.client, settings.state_key_secret_id, max_age=300)
# Each request to the instance (the code exchange, the user check, a revocation) ends within 10 s, whole answer
# included, whatever the instance sends: as long as the 10 s read timeout gave a slow instance before, since an
# exchange cut off is lost (its code is spent, and ServiceNow may hold tokens the stack never saw). The function
# has 29 s (template.yaml): the exchange, the user check and the writes; a revocation only after a failure.
servicenow = ServiceNowClient(build_session(), request_seconds=10.0)
# The KMS client is made on the first JWKS request: a consent never pays for it.
publisher = KeyPublisher(store, LazyClient("kms", config=KMS_CONFIG), max_age=CACHE_SECONDS)

# Upstream failures the person can do nothing about in this request get 5xx; their own request, 4xx.
_STATUS: list[tuple[type[Exception], int, str]] = [
    (InvalidName, 400, "Unknown connection"),
    (ConnectionNotFound, 404, "Unknown connection"),
    (ConcurrentUpdate, 409, "Connection changed during the consent"),
    (SecretFormatError, 500, "Connection is misconfigured"),
    (CredentialRejected, 502, "ServiceNow refused the request"),
    (RateLimited, 503, "ServiceNow is rate limiting"),
    (ProviderError, 503, "ServiceNow is unavailable"),
]


Event = dict[str, Any]
Answer = dict[str, Any]  # payload 2.0: statusCode, body, isBase64Encoded, headers, cookies


def _state_key() -> bytes:
    return state_key.get()


def _answer(status: int, body: str, headers: dict[str, str]) -> Answer:
    return {"statusCode": status, "body": body, "isBase64Encoded": False, "headers": headers, "cookies": []}


def _html(status: int, body: str, extra_headers: dict[str, str] | None = None) -> Answer:
    return _answer(
        status, body, {**SECURITY_HEADERS, **(extra_headers or {}), "Content-Type": "text/html; charset=utf-8"}
    )


def _query(event: Event, name: str) -> str | None:
    return (event.get("queryStringParameters") or {}).get(name)


def _callback_url(event: Event) -> str:
    if settings.callback_url:
        return settings.callback_url
    context = event["requestContext"]
    stage = "" if context.get("stage") in ("$default", "", None) else f"/{context['stage']}"
    return f"https://{context['domainName']}{stage}/callback"


def authorize(event: Event, name: str) -> Answer:
    location = start_consent(
        store,
        _state_key(),
        name,
        expires=_query(event, "expires"),
        signature=_query(event, "signature"),
        callback_url=_callback_url(event),
        now=utc_now(),
    )
    logger.info("consent started", extra={"connection": name})
    metrics.add_metric(name="ConsentStarted", unit=MetricUnit.Count, value=1)
    return _answer(302, "", {**SECURITY_HEADERS, "Location": location})


def callback(event: Event) -> Answer:
    stored = complete_consent(
        store,
        servicenow,
        _state_key(),
        state=_query(event, "state"),
        code=_query(event, "code"),
        error=_query(event, "error"),
        callback_url=_callback_url(event),
        now=utc_now(),
    )
    monitor.after_consent(stored)
    connection = stored.connection
    logger.info("consent completed", extra={"connection": connection.name, "instance": connection.host})
    metrics.add_metric(name="ConsentCompleted", unit=MetricUnit.Count, value=1)
    return _html(200, authorized_page(connection))


def _json(status: int, body: Any, headers: dict[str, str]) -> Answer:
    return _answer(status, json.dumps(body, separators=(",", ":")), {"X-Content-Type-Options": "nosniff", **headers})


def _key_unavailable(error: PublicKeyUnavailable, status: int) -> None:
    logger.warning(
        "jwks: public key unavailable",
        extra={"connection": error.connection, "signing_key": error.which, "reason": error.reason, "status": status},
    )
    metrics.add_metric(name="JwksKeyUnavailable", unit=MetricUnit.Count, value=1)


def jwks(event: Event, name: str) -> Answer:
    """The connection's JWK Set. An unknown name, a non-JWT connection and a broken secret get one and the same
    404 (API Gateway's own body), so the public endpoint tells no grant types apart. A staged key the stack cannot
    read is left out with a warning: the current key, which the connection signs with, is always published."""
    problems: list[PublicKeyUnavailable] = []
    try:
        keys = publisher.jwks(name, problems)
    except NoPublicKeys as error:
        logger.info("jwks: nothing to publish", extra={"connection": error.connection, "reason": error.reason})
        return _json(404, {"message": "Not Found"}, {"Content-Type": "application/json", "Cache-Control": "no-store"})
    except PublicKeyUnavailable as error:
        status = 503 if error.retryable else 502
        _key_unavailable(error, status)
        headers = {"Content-Type": "application/json", "Cache-Control": "no-store"}
        if error.retryable:
            headers["Retry-After"] = "60"
        return _json(status, {"message": str(error), "connection": error.connection}, headers)
    for problem in problems:
        _key_unavailable(problem, 200)
    headers = {"Content-Type": "application/jwk-set+json", "Cache-Control": f"public, max-age={CACHE_SECONDS}"}
    return _json(200, keys, headers)


def refused(error: ServiceNowOAuthError) -> Answer:
    """Every refusal gets its own page and one structured log line; the secret was not written."""
    status, title = 500, "Request refused"
    if isinstance(error, ConsentError):
        status, title = error.status, "Authorization not completed"
    else:
        status, title = next(((code, text) for kind, code, text in _STATUS if isinstance(error, kind)), (status, title))
    connection = getattr(error, "connection", None)
    message = str(error)
    if isinstance(error, TransientProviderError) and error.maybe_processed and error.grant == "authorization_code":
        # Not "retry later": the code is single-use and may be spent, with tokens issued for it that never arrived.
        title = "ServiceNow's answer was lost"
        message += "; the authorization code may already be spent: start again from a new authorize link"
    reason = getattr(error, "reason", None) or getattr(error, "kind", None) or type(error).__name__
    logger.warning("consent refused", extra={"connection": connection, "reason": reason, "status": status})
    metrics.add_metric(name="ConsentRefused", unit=MetricUnit.Count, value=1)
    headers = {"Retry-After": "60"} if status == 503 else None
    return _html(status, error_page(title, message, connection), headers)


def unexpected(error: Exception) -> Answer:
    """No traceback page: log the type (not the message, which a library may have filled with a URL)."""
    logger.error("consent failed unexpectedly", extra={"error_type": type(error).__name__})
    return _html(500, error_page("Internal error", "Something went wrong; nothing was changed. Try again later."))


def not_found() -> Answer:
    return _html(404, error_page("Not found", "There is nothing here."))


# The API's routes, matched on the path as Powertools' resolver did (a path segment: RFC 3986's unreserved and
# sub-delims, plus what browsers send unencoded); its event_handler package costs more cold start than the rest of
# this handler, to route three GETs. API Gateway only invokes the function for these routes anyway.
_SEGMENT = r"[-._~()'!*:@,;=+&$%<> \[\]{}|^\w]+"
_ROUTES: list[tuple[re.Pattern[str], Callable[..., Answer]]] = [
    (re.compile(r"^/callback$"), callback),
    (re.compile(rf"^/connections/(?P<name>{_SEGMENT})/authorize$"), authorize),
    # Any segment: a name the store refuses gets the same 404 as every other name with nothing to publish.
    (re.compile(r"^/connections/(?P<name>[^/]+)/jwks\.json$"), jwks),
]


def _path(event: Event) -> str:
    """The request path without the stage (payload 2.0's rawPath carries a named stage)."""
    stage = event["requestContext"].get("stage", "$default")
    raw: str = event.get("rawPath") or "/"
    return raw[len(f"/{stage}") :] if stage != "$default" else raw


def route(event: Event) -> Answer:
    """One request to its page: a route's answer, its refusal page, or 404."""
    method = event["requestContext"]["http"]["method"].upper()
    path = _path(event)
    try:
        for pattern, handler in _ROUTES:
            match = pattern.match(path) if method == "GET" else None
            if match:
                return handler(event, **match.groupdict())
        return not_found()
    except ServiceNowOAuthError as error:
        return refused(error)
    except Exception as error:
        return unexpected(error)


@metrics.log_metrics
@logger.inject_lambda_context(log_event=False)
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    """API Gateway HTTP API trigger."""
    return route(event)
