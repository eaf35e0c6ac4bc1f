"""After every attempt: record the connection's health in its tags, and announce each change once.

Events go to EventBridge (source `servicenow-oauth.<stack>`, schema in docs/events.md) only on a change of
state: authorized, recovered, reauthorization required, refresh token expiring, failing for longer
than the alert threshold, client secret promoted. Which of them were already sent is part of the
health tags, so a connection that stays broken produces one event, and one more when it recovers.
No event, tag or log carries a token, code, password or client secret.

When Secrets Manager refuses the tag write (throttling beyond botocore's retries, a missing
`TagResource` right), the health it should have recorded is kept in this container's memory and
used in place of the stale tags until a write lands, so a failing connection still backs off and
a change is still announced once. Such outcomes carry `health_unsaved` (metric HealthTagsNotWritten,
alarmed). The memory is this container's own: a cold start or another warm container goes back to the
backoff the tags last recorded and may announce a change again (README, "A connection's life").
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import datetime
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from core.appflow import profile_names
from core.clock import to_iso
from core.health import HEALTH_TAGS, Health
from core.lifecycle import Outcome, RefreshPolicy, advance, event_state
from core.store import StoredConnection

# What the default stack (samconfig.toml's stack_name) sends; every deployed stack sends its own (EVENT_SOURCE in
# template.yaml), the one source its functions' IAM condition allows (ConnectionWriterPolicy's ChangeEvents).
SOURCE = "servicenow-oauth.servicenow-oauth"
DETAIL_TYPES = {
    "authorized": "ServiceNow Connection Authorized",
    "recovered": "ServiceNow Connection Recovered",
    "reauthorization_required": "ServiceNow Connection Reauthorization Required",
    "refresh_token_expiring": "ServiceNow Refresh Token Expiring",
    "failing": "ServiceNow Connection Failing",
    "client_secret_promoted": "ServiceNow Client Secret Promoted",
    "jwt_key_promoted": "ServiceNow JWT Signing Key Promoted",
    "dead_lettered": "ServiceNow Refresh Dead-Lettered",
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
        source: str = SOURCE,
        logger: Any = None,
    ) -> None:
        self.secretsmanager = secretsmanager
        self.events = events
        self.clock = clock
        self.policy = policy
        self.bus = bus
        self.source = source
        self.logger = logger
        # arn -> (the health its tags hold, None where they could not be read; the health they should hold):
        # tag writes that failed.
        self._unsaved: dict[str, tuple[Health | None, Health]] = {}
        self._lock = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}

    def observe(self, read: StoredConnection, outcome: Outcome) -> Outcome:
        """Fold one outcome into the connection's health (lifecycle.advance); returns it with the events sent."""
        if outcome.arn is None or outcome.result in ("invalid", "queued", "deferred"):
            return outcome
        with self._connection_lock(outcome.arn):  # recall, advance and save as one step per connection
            tags = read.tags if read.tags is not None else self._tags(outcome.arn)
            old = Health.from_tags(self.recall(outcome.arn, tags))
            new, kinds = advance(old, outcome, self.clock(), self.policy)
            saved = self.save(outcome.arn, old, new, known=tags is not None)
        # Announced now even when the tags could not be written: the health remembered in place of them keeps
        # a later run in this container from deriving (and announcing) the same change again.
        failed = self.publish(outcome.connection, list(kinds), old, new)
        return replace(outcome, events=kinds, events_failed=failed, health_unsaved=not saved)

    def _connection_lock(self, arn: str) -> threading.Lock:
        with self._lock:
            return self._locks.setdefault(arn, threading.Lock())

    def recall(self, arn: str, tags: Mapping[str, str] | list[dict[str, str]] | None) -> dict[str, str]:
        """The connection's tags as they should be: read tags, or the health a failed tag write left in memory
        while the tags still hold what they held after that write (anyone else's newer tags win). Tags that are
        not health (AppFlow's synced version, rotation's base) are always the read ones."""
        plain = {tag["Key"]: tag["Value"] for tag in tags} if isinstance(tags, list) else dict(tags or {})
        with self._lock:
            held = self._unsaved.get(arn)
            if held is None:
                return plain
            actual, intended = held
            read = Health.from_tags(plain)
            if tags is None:
                pass  # not read (Secrets Manager did not answer): memory stands
            elif actual is None:  # written over tags it could not read: these are the ones it failed to replace
                self._unsaved[arn] = (read, intended)
            elif read not in (actual, intended):
                del self._unsaved[arn]  # the tags moved on without us: theirs stand
                return plain
        return {key: value for key, value in plain.items() if key not in HEALTH_TAGS} | intended.to_tags()

    def flush(self, arn: str) -> bool:
        """Write the health memory holds for this connection in place of its tags; True once nothing is held."""
        with self._connection_lock(arn):
            with self._lock:
                held = self._unsaved.get(arn)
            return held is None or self.save(arn, held[1], held[1])

    def unsaved(self, arn: str) -> bool:
        """Whether this connection's health lives only in this container's memory (its tag write failed)."""
        with self._lock:
            return arn in self._unsaved

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
    def _tags(self, arn: str) -> list[dict[str, str]] | None:
        """The connection's tags, or None when Secrets Manager did not answer."""
        try:
            tags: list[dict[str, str]] = self.secretsmanager.describe_secret(SecretId=arn).get("Tags", [])
            return tags
        except (ClientError, BotoCoreError):
            return None

    def save(self, arn: str, old: Health, new: Health, *, known: bool = True) -> bool:
        """Write the whole health in one TagResource, fields it lacks as empty values (health.py), only when it
        changed; on failure remember `new` in place of the tags (see the module's note). Whole, never a diff
        against tags read earlier: another writer may have tagged since (a mark's needs-person), and a diff
        would leave its tags beside ours and park a healthy connection. One call lands all or nothing."""
        with self._lock:
            held = self._unsaved.get(arn)
        # What the tags really hold: while memory stands in for them, the tags it recorded (another thread's newer
        # memory may already have replaced the health this outcome started from; comparing with that instead
        # would find nothing to write and drop the memory with the tags never written). None: unknown.
        actual = held[0] if held is not None else old if known else None
        after = new.to_tags()
        try:
            if actual is None or actual.to_tags() != after:
                self.secretsmanager.tag_resource(SecretId=arn, Tags=new.tag_write())
        except (ClientError, BotoCoreError) as error:
            self._warn("health tags not written; kept in memory until a write lands", error)
            with self._lock:
                # As the tags read back now (times to the second), so `recall` recognises them.
                self._unsaved[arn] = (actual, Health.from_tags(after))
            return False
        with self._lock:
            self._unsaved.pop(arn, None)
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
        return self._put([{**detail, "change": kind} for kind in kinds], "change events")

    def dead_lettered(self, connection: str | None, reason: str) -> int:
        """A queued refresh that failed for the last time SQS will deliver it (it moves to the dead-letter queue):
        one event each, naming the connection, so every dead letter reaches a person (an alarm on the queue notifies
        only on its change to ALARM). Returns 1 if EventBridge did not take it."""
        if self.events is None:
            return 0
        return self._put(
            [{"change": "dead_lettered", "connection": connection, "reason": reason}], "dead-letter events"
        )

    def _put(self, details: list[dict[str, Any]], what: str) -> int:
        """One PutEvents for these details (each names its `change`); how many EventBridge did not take."""
        assert self.events is not None  # the callers return 0 without an events client
        entries = [
            {
                "Source": self.source,
                "DetailType": DETAIL_TYPES[detail["change"]],
                "Detail": json.dumps(detail),
                "EventBusName": self.bus,
                "Time": self.clock(),
            }
            for detail in details
        ]
        try:
            answer = self.events.put_events(Entries=entries)
        except (ClientError, BotoCoreError) as error:
            self._warn(f"{what} not published", error)
            return len(entries)
        failed = int(answer.get("FailedEntryCount") or 0)
        if failed:
            self._warn(f"some {what} were not accepted", None)
        return failed

    def _warn(self, message: str, error: Exception | None) -> None:
        if self.logger is not None:
            self.logger.warning(message, extra={"error_type": type(error).__name__ if error else None})
