"""After every attempt: record the connection's health in its tags, and announce each change once.

Events go to EventBridge (source `servicenow-oauth`, schema in docs/events.md) only on a change of
state: authorized, recovered, reauthorization required, refresh token expiring, failing for longer
than the alert threshold, client secret promoted. Which of them were already sent is part of the
health tags, so a connection that stays broken produces one event, and one more when it recovers.
No event, tag or log carries a token, code, password or client secret.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

from botocore.exceptions import BotoCoreError, ClientError

from core.appflow import profile_names
from core.clock import to_iso
from core.health import Health, backoff

if TYPE_CHECKING:
    from core.refresh import Outcome, RefreshPolicy
    from core.store import StoredConnection

SOURCE = "servicenow-oauth"
DETAIL_TYPES = {
    "authorized": "ServiceNow Connection Authorized",
    "recovered": "ServiceNow Connection Recovered",
    "reauthorization_required": "ServiceNow Connection Reauthorization Required",
    "refresh_token_expiring": "ServiceNow Refresh Token Expiring",
    "failing": "ServiceNow Connection Failing",
    "client_secret_promoted": "ServiceNow Client Secret Promoted",
}


class Monitor:
    """Writes health tags and publishes change events through injected clients (moto in tests)."""

    def __init__(
        self,
        secretsmanager: Any,
        events: Any | None,
        *,
        clock: Callable[[], datetime],
        policy: RefreshPolicy,
        bus: str = "default",
        logger: Any = None,
    ) -> None:
        self.secretsmanager = secretsmanager
        self.events = events
        self.clock = clock
        self.policy = policy
        self.bus = bus
        self.logger = logger

    def observe(self, read: StoredConnection, outcome: Outcome) -> Outcome:
        """Fold one refresh outcome into the connection's health; returns the outcome with the events sent."""
        if outcome.arn is None or outcome.result in ("invalid", "queued"):
            return outcome
        now = self.clock()
        old = Health.from_tags(read.tags if read.tags is not None else self._tags(outcome.arn))
        new = replace(
            old,
            version=outcome.version_id,
            status=outcome.status,
            instance=outcome.instance,
            grant=outcome.grant,
            needs_person=outcome.needs_person,
            access_expires=outcome.access_token_expires_at,
            refresh_expires=outcome.refresh_token_expires_at,
        )
        if outcome.appflow_failed:
            # A push that keeps failing (say, AccessDenied) backs off like a refresh does.
            pushes = old.appflow_failures + 1
            wait = backoff(pushes, self.policy.interval, self.policy.backoff_cap)
            new = replace(new, appflow_pending=True, appflow_failures=pushes, appflow_next_attempt=now + wait)
        elif outcome.appflow_synced:
            new = replace(new, appflow_pending=False, appflow_failures=0, appflow_next_attempt=None)
        if new.refresh_expires != old.refresh_expires:
            new = replace(new, alerted_expiring=False)  # a new refresh token deserves its own warning
        kinds: list[str] = []
        # A refresh here, or a valid token found after failures (someone else refreshed it): healthy again.
        recovered = outcome.result == "refreshed" or (outcome.result == "not_due" and old.consecutive_failures > 0)
        if recovered:
            if old.alerted_failing:
                kinds.append("recovered")
            new = new.succeeded(now)
        elif outcome.result in ("failed", "write_failed"):
            new = new.failed(
                outcome.failure or "transient",
                now,
                interval=self.policy.interval,
                cap=self.policy.backoff_cap,
                retry_after=outcome.retry_after,
            )
        elif outcome.result == "reauthorization_required":
            new = replace(new, last_failure=now, failure_class="rejected", next_attempt=None)
            kinds.append("reauthorization_required")
        if outcome.client_secret_promoted:
            kinds.append("client_secret_promoted")
        if new.failing_since and now - new.failing_since >= self.policy.alert_after and not new.alerted_failing:
            kinds.append("failing")
            new = replace(new, alerted_failing=True)
        if outcome.refresh_token_expiring and not new.alerted_expiring:
            kinds.append("refresh_token_expiring")
            new = replace(new, alerted_expiring=True)
        self.save(outcome.arn, old, new)
        self.publish(outcome.connection, kinds, old, new)
        return replace(outcome, events=tuple(kinds))

    def after_consent(self, stored: StoredConnection, *, old_tags: Mapping[str, str] | None = None) -> None:
        """A completed consent: healthy again, failures forgotten, and one "authorized" event."""
        now = self.clock()
        connection = stored.connection
        old = Health.from_tags(old_tags if old_tags is not None else self._tags(stored.arn))
        new = replace(
            old,
            version=stored.version_id,
            status=connection.status,
            instance=connection.host,
            grant=connection.grant_type,
            needs_person=False,
            access_expires=connection.access_token_expires_at,
            refresh_expires=connection.refresh_token_expires_at,
            alerted_expiring=False,
            appflow_pending=bool(profile_names(connection)),  # push the new tokens on the next sweep
        ).succeeded(now)
        self.save(stored.arn, old, new)
        self.publish(connection.name, ["authorized"], old, new)

    # ----------------------------------------------------------------------------------- plumbing
    def _tags(self, arn: str) -> list[dict[str, str]]:
        try:
            tags: list[dict[str, str]] = self.secretsmanager.describe_secret(SecretId=arn).get("Tags", [])
            return tags
        except (ClientError, BotoCoreError):
            return []

    def save(self, arn: str, old: Health, new: Health) -> None:
        """Write only what changed; a failed tag write is logged and costs nothing but a re-read next sweep."""
        before, after = old.to_tags(), new.to_tags()
        changed = [{"Key": key, "Value": value} for key, value in after.items() if before.get(key) != value]
        removed = [key for key in before if key not in after]
        try:
            if changed:
                self.secretsmanager.tag_resource(SecretId=arn, Tags=changed)
            if removed:
                self.secretsmanager.untag_resource(SecretId=arn, TagKeys=removed)
        except (ClientError, BotoCoreError) as error:
            self._warn("health tags not written", error)

    def publish(self, connection: str, kinds: list[str], old: Health, new: Health) -> None:
        if not kinds or self.events is None:
            return
        detail = {
            "connection": connection,
            "instance": new.instance,
            "previousState": _state(old),
            "state": _state(new),
            "failureClass": new.failure_class,
            "consecutiveFailures": new.consecutive_failures,
            "failingSince": to_iso(new.failing_since) if new.failing_since else None,
            "nextAttempt": to_iso(new.next_attempt) if new.next_attempt else None,
            "accessTokenExpiresAt": to_iso(new.access_expires) if new.access_expires else None,
            "refreshTokenExpiresAt": to_iso(new.refresh_expires) if new.refresh_expires else None,
        }
        entries = [
            {
                "Source": SOURCE,
                "DetailType": DETAIL_TYPES[kind],
                "Detail": json.dumps({**detail, "change": kind}),
                "EventBusName": self.bus,
                "Time": self.clock(),
            }
            for kind in kinds
        ]
        try:
            answer = self.events.put_events(Entries=entries)
            if answer.get("FailedEntryCount"):
                self._warn("some change events were not accepted", None)
        except (ClientError, BotoCoreError) as error:
            self._warn("change events not published", error)

    def _warn(self, message: str, error: Exception | None) -> None:
        if self.logger is not None:
            self.logger.warning(message, extra={"error_type": type(error).__name__ if error else None})


def _state(health: Health) -> str:
    """A one-word state for events: the stored status, or `failing` while attempts fail."""
    if health.needs_person and health.status != "active":
        return health.status or "pending_authorization"
    if health.consecutive_failures:
        return "failing"
    return health.status or "unknown"
