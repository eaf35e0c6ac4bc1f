"""EventBridge schedule: refresh every connection whose access token is due (or queue them when many are)."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

from aws_lambda_powertools import Metrics

from core.clock import utc_now
from core.config import load_settings
from core.fanout import send_connections
from core.report import report_outcomes
from core.sweep import LISTING, Sweep
from handlers.runtime import LazyClient, build_logger, build_refresher

if TYPE_CHECKING:
    from aws_lambda_powertools.utilities.typing import LambdaContext


class ListingIncomplete(RuntimeError):
    """A ListSecrets page after the first failed: the listed connections were swept and reported."""


logger = build_logger()
metrics = Metrics()
settings = load_settings()
refresher = build_refresher(settings, logger)
fan_out = (
    partial(send_connections, LazyClient("sqs"), settings.refresh_queue_url) if settings.refresh_queue_url else None
)


@metrics.log_metrics
@logger.inject_lambda_context(log_event=False)
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, int]:
    """EventBridge scheduled event (its content is not used)."""
    outcomes = Sweep(refresher).run(
        max_workers=settings.refresh_concurrency,
        fan_out=fan_out,
        fan_out_above=settings.fan_out_above,
        time_left=lambda: context.get_remaining_time_in_millis() / 1000,
    )
    counts = report_outcomes(outcomes, logger, metrics, utc_now())
    if any(outcome.connection == LISTING for outcome in outcomes):
        # Reported first; then the invocation fails (no retry: MaximumRetryAttempts 0) so that a listing that
        # keeps failing, whose unlisted connections are never observed, reaches RefreshErrorsAlarm.
        raise ListingIncomplete("the sweep could not list every connection secret; the next sweep tries again")
    return counts
