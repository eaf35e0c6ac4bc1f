"""CloudWatch custom widget: every connection's health, from ListSecrets alone (never a secret value)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from core.clock import utc_now
from core.config import load_settings
from core.dashboard import render, rows_from_listing
from core.lifecycle import RefreshPolicy
from core.store import ConnectionStore
from handlers.runtime import aws_client, build_logger

if TYPE_CHECKING:
    from aws_lambda_powertools.utilities.typing import LambdaContext

DOCS = """## ServiceNow OAuth connections

One row per connection, worst first: status (in words and colour), access token and refresh token time left
(the mark is the refresh-token warning threshold), last success, failing since and class, next try, and
whether a person must act. Read from the connection secrets' health tags with `secretsmanager:ListSecrets`
only; no secret value is read, so no token can appear. Parameter `title` (optional) heads the widget.
"""

logger = build_logger()
settings = load_settings()
store = ConnectionStore(aws_client("secretsmanager"), prefix=settings.secret_prefix, allowed_hosts=())
policy = RefreshPolicy.from_settings(settings)


@logger.inject_lambda_context(log_event=False)
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> str:
    """The custom-widget contract: `describe` asks for the documentation, anything else for the HTML."""
    if event.get("describe"):
        return DOCS
    rows = rows_from_listing(store.listing(), store.name_of)
    title = event.get("title")
    html = render(rows, utc_now(), policy, title=title if isinstance(title, str) else "")
    logger.info("rendered", extra={"connections": len(rows)})
    return html
