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
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from core.appflow import profile_names
from core.clock import to_iso
from core.health import Health
from core.lifecycle import ONE_SHOT_EVENTS, Outcome, RefreshPolicy, advance, event_state
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
        """Fold one outcome into the connection's health (lifecycle.advance); returns it with the events sent."""
        if outcome.arn is None or outcome.result in ("invalid", "queued", "deferred"):
            return outcome
        old = Health.from_tags(read.tags if read.tags is not None else self._tags(outcome.arn))
        new, kinds = advance(old, outcome, self.clock(), self.policy)
        if not self.save(outcome.arn, old, new):
            # The tags still describe the old health, so the next run derives the same change again and
            # announces it then: publishing it now would announce it twice. Only what no later run can
            # derive (a consent, a promoted client secret) goes out now.
            kinds = tuple(kind for kind in kinds if kind in ONE_SHOT_EVENTS)
        failed = self.publish(outcome.connection, list(kinds), old, new)
        return replace(outcome, events=kinds, events_failed=failed)

    def after_consent(self, stored: StoredConnection, *, old_tags: Mapping[str, str] | None = None) -> None:
        """A completed consent: healthy again, failures forgotten, and one "authorized" event."""
        connection = stored.connection
        outcome = Outcome(
            connection.name,
            "consented",
            access_token_expires_at=connection.access_token_expires_at,
            refresh_token_expires_at=connection.refresh_token_expires_at,
            arn=stored.arn,
            version_id=stored.version_id,
            status=connection.status,
            instance=connection.host,
            grant=connection.grant_type,
            appflow_owed=bool(profile_names(connection)),  # push the new tokens on the next sweep
        )
        read = StoredConnection(connection, stored.version_id, stored.arn, old_tags)
        self.observe(read, outcome)

    # ----------------------------------------------------------------------------------- plumbing
    def _tags(self, arn: str) -> list[dict[str, str]]:
        try:
            tags: list[dict[str, str]] = self.secretsmanager.describe_secret(SecretId=arn).get("Tags", [])
            return tags
        except (ClientError, BotoCoreError):
            return []

    def save(self, arn: str, old: Health, new: Health) -> bool:
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
            return False
        return True

    def publish(self, connection: str, kinds: list[str], old: Health, new: Health) -> int:
        """Send the change events; returns how many EventBridge did not take (logged and counted, not re-sent)."""
        if not kinds or self.events is None:
            return 0
        detail = {
            "connection": connection,
            "instance": new.instance,
            "previousState": event_state(old),
            "state": event_state(new),
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
        except (ClientError, BotoCoreError) as error:
            self._warn("change events not published", error)
            return len(entries)
        failed = int(answer.get("FailedEntryCount") or 0)
        if failed:
            self._warn("some change events were not accepted", None)
        return failed

    def _warn(self, message: str, error: Exception | None) -> None:
        if self.logger is not None:
            self.logger.warning(message, extra={"error_type": type(error).__name__ if error else None})
