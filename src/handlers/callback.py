"""HTTP API (payload 2.0): GET /connections/{name}/authorize starts a consent, GET /callback completes it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aws_lambda_powertools import Metrics
from aws_lambda_powertools.event_handler import APIGatewayHttpResolver, Response
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
    ProviderError,
    RateLimited,
    SecretFormatError,
    ServiceNowOAuthError,
)
from core.pages import SECURITY_HEADERS, authorized_page, error_page
from core.servicenow import ServiceNowClient, build_session
from handlers.runtime import CachedSecret, build_logger, build_monitor, build_store

if TYPE_CHECKING:
    from aws_lambda_powertools.utilities.typing import LambdaContext

logger = build_logger()
metrics = Metrics()
app = APIGatewayHttpResolver()
settings = load_settings()
store = build_store(settings)
monitor = build_monitor(settings, store.client, logger)
state_key = CachedSecret(store.client, settings.state_key_secret_id, max_age=300)
servicenow = ServiceNowClient(build_session())

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


def _state_key() -> bytes:
    return state_key.get()


def _callback_url() -> str:
    if settings.callback_url:
        return settings.callback_url
    context = app.current_event.request_context
    stage = "" if context.stage in ("$default", "", None) else f"/{context.stage}"
    return f"https://{context.domain_name}{stage}/callback"


def _html(status: int, body: str, extra_headers: dict[str, str] | None = None) -> Response[str]:
    return Response(
        status_code=status,
        content_type="text/html; charset=utf-8",
        body=body,
        headers={**SECURITY_HEADERS, **(extra_headers or {})},
    )


def _query(name: str) -> str | None:
    return (app.current_event.query_string_parameters or {}).get(name)


@app.get("/connections/<name>/authorize")
def authorize(name: str) -> Response[str]:
    location = start_consent(
        store,
        _state_key(),
        name,
        expires=_query("expires"),
        signature=_query("signature"),
        callback_url=_callback_url(),
        now=utc_now(),
    )
    logger.info("consent started", extra={"connection": name})
    metrics.add_metric(name="ConsentStarted", unit=MetricUnit.Count, value=1)
    return Response(status_code=302, body="", headers={**SECURITY_HEADERS, "Location": location})


@app.get("/callback")
def callback() -> Response[str]:
    stored = complete_consent(
        store,
        servicenow,
        _state_key(),
        state=_query("state"),
        code=_query("code"),
        error=_query("error"),
        callback_url=_callback_url(),
        now=utc_now(),
    )
    monitor.after_consent(stored)
    connection = stored.connection
    logger.info("consent completed", extra={"connection": connection.name, "instance": connection.host})
    metrics.add_metric(name="ConsentCompleted", unit=MetricUnit.Count, value=1)
    return _html(200, authorized_page(connection))


@app.exception_handler(ServiceNowOAuthError)  # type: ignore[untyped-decorator]
def refused(error: ServiceNowOAuthError) -> Response[str]:
    """Every refusal gets its own page and one structured log line; the secret was not written."""
    status, title = 500, "Request refused"
    if isinstance(error, ConsentError):
        status, title = error.status, "Authorization not completed"
    else:
        status, title = next(((code, text) for kind, code, text in _STATUS if isinstance(error, kind)), (status, title))
    connection = getattr(error, "connection", None)
    reason = getattr(error, "reason", None) or getattr(error, "kind", None) or type(error).__name__
    logger.warning("consent refused", extra={"connection": connection, "reason": reason, "status": status})
    metrics.add_metric(name="ConsentRefused", unit=MetricUnit.Count, value=1)
    headers = {"Retry-After": "60"} if status == 503 else None
    return _html(status, error_page(title, str(error), connection), headers)


@app.exception_handler(Exception)  # type: ignore[untyped-decorator]
def unexpected(error: Exception) -> Response[str]:
    """No traceback page: log the type (not the message, which a library may have filled with a URL)."""
    logger.error("consent failed unexpectedly", extra={"error_type": type(error).__name__})
    return _html(500, error_page("Internal error", "Something went wrong; nothing was changed. Try again later."))


@app.not_found
def not_found(_: Exception) -> Response[str]:
    return _html(404, error_page("Not found", "There is nothing here."))


@metrics.log_metrics
@logger.inject_lambda_context(log_event=False)
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    """API Gateway HTTP API trigger."""
    return app.resolve(event, context)
