"""Turns refresh outcomes into one log line per event worth a look, and CloudWatch metrics (EMF).

Logger and metrics are injected (Powertools objects in Lambda), so the sweep, the SQS worker and
rotation report the same way. Outcomes carry no secret material by construction.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from core.clock import to_iso
from core.lifecycle import Outcome

_METRIC_BY_RESULT = {
    "refreshed": "Refreshed",
    "not_due": "SkippedNotDue",
    "needs_person": "NeedsAuthorization",
    "failed": "RefreshFailed",
    "write_failed": "SecretWriteFailed",
    "reauthorization_required": "ReauthorizationRequired",
    "invalid": "InvalidConnectionSecret",
}
NO_LIVE_TOKEN_SECONDS = 86_400  # MinAccessTokenSecondsLeft when no connection should hold a live token
_METRIC_BY_FAILURE = {
    "unavailable": "FailedUnavailable",
    "rate_limited": "FailedRateLimited",
    "transient": "FailedTransient",
    "rejected": "FailedRejected",
}


def report_outcomes(
    outcomes: Iterable[Outcome], logger: Any, metrics: Any, now: datetime, *, whole_sweep: bool = True
) -> dict[str, int]:
    """Log and count; returns the counts by result (the Lambda's return value).

    Gauges over all connections (ConnectionsFailing) are emitted only by a whole sweep, not by a worker's batch.
    """
    from aws_lambda_powertools.metrics import MetricUnit

    outcomes = list(outcomes)
    counts: Counter[str] = Counter(outcome.result for outcome in outcomes)
    failures: Counter[str] = Counter(outcome.failure for outcome in outcomes if outcome.failure)
    for result, metric in _METRIC_BY_RESULT.items():
        metrics.add_metric(name=metric, unit=MetricUnit.Count, value=counts.get(result, 0))
    for failure, metric in _METRIC_BY_FAILURE.items():
        if failures.get(failure):
            metrics.add_metric(name=metric, unit=MetricUnit.Count, value=failures[failure])
    not_published = sum(outcome.events_failed for outcome in outcomes)
    if not_published:
        metrics.add_metric(name="ChangeEventsNotPublished", unit=MetricUnit.Count, value=not_published)
    unsaved = sum(1 for outcome in outcomes if outcome.health_unsaved)
    if unsaved:
        # Connections whose health (backoff, alerts sent) lives only in this container: tag writes are refused.
        metrics.add_metric(name="HealthTagsNotWritten", unit=MetricUnit.Count, value=unsaved)
    synced = sum(len(outcome.appflow_synced) for outcome in outcomes)
    failed_pushes = sum(len(outcome.appflow_failed) for outcome in outcomes)
    if synced or failed_pushes:
        metrics.add_metric(name="AppFlowSynced", unit=MetricUnit.Count, value=synced)
        metrics.add_metric(name="AppFlowSyncFailed", unit=MetricUnit.Count, value=failed_pushes)
    # A gauge, not a count of attempts: with backoff most sweeps make no attempt for a failing connection.
    if whole_sweep:
        failing = sum(1 for outcome in outcomes if outcome.result in ("failed", "write_failed", "backing_off"))
        metrics.add_metric(name="ConnectionsFailing", unit=MetricUnit.Count, value=failing)
    expiring = [outcome for outcome in outcomes if outcome.refresh_token_expiring]
    metrics.add_metric(name="RefreshTokenExpiring", unit=MetricUnit.Count, value=len(expiring))
    # The least access-token time left among the connections that should hold a live one (not those waiting for a
    # person: ReauthorizationRequired speaks for them). A whole sweep always emits it, a day when none should, so
    # that its absence means the sweep stopped (AccessTokenExpiringAlarm treats missing data as breaching).
    access_left = [
        (o.access_token_expires_at - now).total_seconds()
        for o in outcomes
        if o.access_token_expires_at and o.result not in ("needs_person", "reauthorization_required", "invalid")
    ]
    if access_left or whole_sweep:
        least = max(0.0, min(access_left)) if access_left else float(NO_LIVE_TOKEN_SECONDS)
        metrics.add_metric(name="MinAccessTokenSecondsLeft", unit=MetricUnit.Seconds, value=least)
    if whole_sweep:
        # One per completed sweep, connections or not: RefresherSilentAlarm fires when none arrives.
        metrics.add_metric(name="SweepsCompleted", unit=MetricUnit.Count, value=1)
    refresh_left = [(o.refresh_token_expires_at - now).total_seconds() for o in outcomes if o.refresh_token_expires_at]
    if refresh_left:
        metrics.add_metric(
            name="MinRefreshTokenDaysLeft", unit=MetricUnit.Count, value=max(0.0, min(refresh_left)) / 86400
        )

    for outcome in outcomes:
        fields = {"connection": outcome.connection, "result": outcome.result, "failure": outcome.failure}
        if outcome.access_token_expires_at:
            fields["access_token_expires_at"] = to_iso(outcome.access_token_expires_at)
        if outcome.result == "refreshed":
            logger.info("refreshed", extra=fields)
        elif outcome.result in ("reauthorization_required", "write_failed", "invalid"):
            logger.error(outcome.detail or outcome.result, extra=fields)
        elif outcome.result == "failed":
            logger.warning(outcome.detail or "refresh failed", extra=fields)
        if outcome.appflow_failed:
            logger.warning(
                "AppFlow connector profile update failed; the secret is current and the next sweep retries",
                extra={**fields, "appflow_failed": list(outcome.appflow_failed)},
            )
        if outcome.refresh_token_expiring and outcome.refresh_token_expires_at:
            logger.warning(
                "refresh token expires soon: re-authorize the connection (make authorize-url)",
                extra={**fields, "refresh_token_expires_at": to_iso(outcome.refresh_token_expires_at)},
            )
    return dict(counts)
