"""EventBridge schedule: refresh every connection whose access token is due."""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, Any

import boto3
from aws_lambda_powertools import Logger, Metrics
from botocore.config import Config

from core.clock import utc_now
from core.config import load_settings
from core.refresh import Refresher, RefreshPolicy
from core.report import report_outcomes
from core.servicenow import ServiceNowClient, build_session
from core.store import ConnectionStore

if TYPE_CHECKING:
    from aws_lambda_powertools.utilities.typing import LambdaContext

logger = Logger()
metrics = Metrics()
settings = load_settings()
refresher = Refresher(
    ConnectionStore(
        boto3.client("secretsmanager", config=Config(retries={"mode": "standard", "max_attempts": 5})),
        prefix=settings.secret_prefix,
        allowed_hosts=settings.allowed_hosts,
    ),
    ServiceNowClient(build_session(pool_maxsize=settings.refresh_concurrency)),
    clock=utc_now,
    policy=RefreshPolicy(
        leeway=timedelta(seconds=settings.refresh_leeway_seconds),
        refresh_warning=timedelta(days=settings.refresh_token_warning_days),
    ),
)


@metrics.log_metrics
@logger.inject_lambda_context(log_event=False)
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, int]:
    """EventBridge scheduled event (the event's content is not used)."""
    outcomes = refresher.sweep(max_workers=settings.refresh_concurrency)
    return report_outcomes(outcomes, logger, metrics, utc_now())
