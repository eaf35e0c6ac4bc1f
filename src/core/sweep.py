"""The sweep over all connections, as the schedule runs it: the listing's health tags settle most connections
without a read, the rest are read by BatchGetSecretValue 20 at a time, and the due ones are refreshed here or,
beyond `fan_out_above`, queued to SQS for the worker. No refresh starts that the Lambda's remaining time might
cut off between ServiceNow's answer and the write (a rotated refresh token would be lost).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import replace
from datetime import datetime
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from core.errors import ConnectionNotFound, SecretFormatError
from core.health import Health
from core.lifecycle import Outcome, Result, is_due, plan
from core.refresh import Refresher, time_for_a_refresh
from core.store import AWSCURRENT, StoredConnection, error_code

__all__ = ["BATCH_READ_SIZE", "LISTING", "LIST_PAGE_SIZE", "Sweep", "from_listing"]
LIST_PAGE_SIZE = 100  # ListSecrets' maximum per page
BATCH_READ_SIZE = 20  # BatchGetSecretValue's maximum per call
REPORT_SECONDS = 10.0  # what the sweep keeps, whatever its threads do, to report and return
LISTING = "(listing)"  # the outcome of a listing that stopped part-way (the connections not listed wait)


class Sweep:
    """Every connection under the prefix, each refreshed (or reported) through `refresher`."""

    def __init__(self, refresher: Refresher) -> None:
        self.refresher = refresher

    def list_connection_secrets(self) -> Iterator[dict[str, Any]]:
        """Every secret under the prefix, 100 per ListSecrets page (planned deletions excluded)."""
        return self.refresher.store.listing(LIST_PAGE_SIZE)

    def read_batch(self, entries: list[dict[str, Any]]) -> Iterator[StoredConnection | Outcome]:
        """One BatchGetSecretValue for up to 20 secrets; unreadable ones come back as `invalid` outcomes."""
        store = self.refresher.store
        try:
            answer = store.client.batch_get_secret_value(SecretIdList=[entry["ARN"] for entry in entries])
        except (ClientError, BotoCoreError) as error:
            code = error_code(error)
            if code == "ResourceNotFoundException":
                # The batch reads each secret's default version and failed as a whole on one of them (moto does
                # when a rotation left its default on a version that was never created; AWS reports such a
                # secret in Errors): read these one by one at AWSCURRENT, so one secret holds up no other.
                yield from self._read_one_by_one(entries)
                return
            # Throttled beyond botocore's retries, or timed out: these wait for the next sweep; the rest go on.
            for entry in entries:
                yield self._unread(entry, error)
            return
        tags = {entry["ARN"]: {t["Key"]: t["Value"] for t in entry.get("Tags", [])} for entry in entries}
        stages = {entry["ARN"]: entry.get("SecretVersionsToStages", {}) for entry in entries}
        for value in answer.get("SecretValues", []):
            name = store.name_of(value["Name"]) or value["Name"]
            try:
                if AWSCURRENT not in value.get("VersionStages", [AWSCURRENT]):
                    # Not the current version (moto answers with a stale default after a stage move);
                    # compare-and-swap must start from AWSCURRENT, so read that one explicitly.
                    read = replace(store.get(name), tags=tags.get(value["ARN"], {}))
                else:
                    read = store.parse(
                        name, value["SecretString"], value["VersionId"], value["ARN"], tags.get(value["ARN"])
                    )
                yield self._adopt(read, stages.get(value["ARN"], {}))
            except (SecretFormatError, ConnectionNotFound, KeyError) as error:
                # Unreadable, or deleted between the listing and the read: report it, keep sweeping.
                yield Outcome(name, "invalid", detail=str(error) if not isinstance(error, KeyError) else None)
            except (ClientError, BotoCoreError) as error:  # the read at AWSCURRENT refused or timed out
                yield self._unread(value, error)
        for failure in answer.get("Errors", []):
            name = store.name_of(failure.get("SecretId", "")) or str(failure.get("SecretId"))
            yield Outcome(name, "invalid", detail=f"could not read the secret ({failure.get('ErrorCode')})")

    def _read_one_by_one(self, entries: list[dict[str, Any]]) -> Iterator[StoredConnection | Outcome]:
        store = self.refresher.store
        for entry in entries:
            name = store.name_of(entry["Name"]) or entry["Name"]
            tags = {t["Key"]: t["Value"] for t in entry.get("Tags", [])}
            try:
                read = replace(store.get(name), tags=tags)
            except (SecretFormatError, ConnectionNotFound) as error:
                yield Outcome(name, "invalid", detail=str(error))
                continue
            except (ClientError, BotoCoreError) as error:
                yield self._unread(entry, error)
                continue
            yield self._adopt(read, entry.get("SecretVersionsToStages", {}))

    def _unread(self, entry: dict[str, Any], error: ClientError | BotoCoreError) -> Outcome:
        """A connection whose secret could not be read this sweep: a transient failure, retried by the next."""
        code = error_code(error)
        name = self.refresher.store.name_of(entry["Name"]) or entry["Name"]
        # The expiry the listing's tags hold: a fleet whose secrets cannot be read still shows its tokens dying.
        return Outcome(
            name,
            "failed",
            failure="transient",
            detail=f"could not read the secret ({code})",
            access_token_expires_at=Health.from_tags(entry.get("Tags")).access_expires,
        )

    def _adopt(self, read: StoredConnection, stages: dict[str, Any]) -> StoredConnection:
        """Take up tokens an earlier write left in a candidate version; on an AWS error go on with `read`
        (a refusal of its refresh token is re-checked with `get_latest`, which adopts again)."""
        try:
            return self.refresher.store.adopt(read, stages)
        except (ClientError, BotoCoreError):
            return read

    def scan(self) -> tuple[list[Outcome], list[StoredConnection]]:
        """Read every connection in batches: outcomes for those that need nothing, and the due ones."""
        outcomes: list[Outcome] = []
        due: list[StoredConnection] = []
        store, monitor, policy = self.refresher.store, self.refresher.monitor, self.refresher.policy
        now = self.refresher.clock()
        batch: list[dict[str, Any]] = []

        def flush() -> None:
            for item in self.read_batch(batch):
                if isinstance(item, Outcome):
                    outcomes.append(item)
                elif is_due(item.connection, now, policy.leeway):
                    due.append(item)
                else:
                    outcomes.append(self.refresher.refresh(item))  # not due: decided locally, no API call
            batch.clear()

        listing_failed: list[Outcome] = []

        def listed() -> Iterator[dict[str, Any]]:
            listed_any = False
            try:
                for entry in self.list_connection_secrets():
                    listed_any = True
                    yield entry
            except (ClientError, BotoCoreError) as error:
                if not listed_any:
                    raise  # nothing listed: the invocation fails loudly (RefreshErrorsAlarm), nothing was written
                # A later page refused or timed out: the connections listed so far are swept, the rest wait.
                detail = (
                    f"could not list the connection secrets ({error_code(error)}); the rest wait for the next sweep"
                )
                listing_failed.append(Outcome(LISTING, "failed", failure="transient", detail=detail))

        for entry in listed():
            unsaved = False
            planned = entry
            if monitor is not None and monitor.unsaved(entry["ARN"]):
                # Planned on the health memory holds, but the batch keeps the tags as read: `refresh` recalls
                # against them again, and remembered tags taken for read ones would look as if the tags had
                # moved on (and drop the memory) once another thread's outcome changed it.
                tags = monitor.recall(entry["ARN"], entry.get("Tags"))
                planned = {**entry, "Tags": [{"Key": key, "Value": value} for key, value in tags.items()]}
                unsaved = monitor.unsaved(entry["ARN"])
            # The listing's health tags settle most connections without reading a value.
            decision = plan(planned, now, policy)
            if decision != "read":
                if unsaved and monitor is not None:
                    # Nothing to do here but the tag write that failed: try it again (one TagResource, while
                    # memory stands in), so the health does not stay in this container until the next refresh.
                    unsaved = not monitor.flush(entry["ARN"])
                name = store.name_of(entry["Name"]) or entry["Name"]
                outcomes.append(replace(from_listing(planned, decision, name), health_unsaved=unsaved))
                continue
            batch.append(entry)
            if len(batch) == BATCH_READ_SIZE:
                flush()
        if batch:
            flush()
        return outcomes + listing_failed, due

    def run(
        self,
        *,
        max_workers: int = 8,
        fan_out: Callable[[list[str]], list[str]] | None = None,
        fan_out_above: int | None = None,
        time_left: Callable[[], float] | None = None,
    ) -> list[Outcome]:
        """Refresh every due connection here with a bounded pool, up to `fan_out_above` of them; the ones beyond
        go to `fan_out` (the SQS queue's workers, which re-read each: two Secrets Manager calls more a refresh),
        which returns the names it could not queue: reported as transient failures, tried by the next sweep.

        With `time_left` (the Lambda's remaining seconds), no refresh starts that might not finish: the
        ones left are handed to `fan_out` too, or wait for the next sweep ("deferred") without one.
        """
        outcomes, due = self.scan()
        if fan_out is not None and fan_out_above is not None and len(due) > fan_out_above:
            due, overflow = due[:fan_out_above], due[fan_out_above:]
            outcomes += self._queued(overflow, fan_out([read.connection.name for read in overflow]))

        def refresh_in_time(read: StoredConnection) -> Outcome:
            if time_left is not None and not time_for_a_refresh(time_left()):
                return Outcome(read.connection.name, "deferred", access_token_expires_at=_expiry(read))
            return self.refresher.safe_refresh(read)

        refreshed = self._refresh_all(due, refresh_in_time, max_workers, time_left)
        deferred = [outcome.connection for outcome in refreshed if outcome.result == "deferred"]
        if deferred and fan_out is not None:
            unqueued = set(fan_out(deferred))
            refreshed = [
                replace(o, result="queued") if o.result == "deferred" and o.connection not in unqueued else o
                for o in refreshed
            ]
        return outcomes + refreshed

    def _refresh_all(
        self,
        due: list[StoredConnection],
        refresh: Callable[[StoredConnection], Outcome],
        max_workers: int,
        time_left: Callable[[], float] | None,
    ) -> list[Outcome]:
        """Each due connection refreshed on the pool. With `time_left`, the sweep stops waiting REPORT_SECONDS
        before its end whatever a thread is doing, so it always reports: every request to an instance has a hard
        deadline and an attempt ends within ATTEMPT_WORST_SECONDS, so this wall stands only for what those cannot
        reach (a TLS handshake the server drip-feeds); such a refresh is reported failed and left to finish."""
        pool = ThreadPoolExecutor(max_workers=max(1, max_workers))
        futures = [pool.submit(refresh, read) for read in due]
        pending = set(futures)
        while pending:  # the remaining time is asked once a second, and only while a refresh is still running
            pending = wait(pending, timeout=None if time_left is None else 1.0).not_done
            if pending and time_left is not None and time_left() <= REPORT_SECONDS:
                break
        pool.shutdown(wait=False, cancel_futures=True)
        return [
            future.result()
            if future.done() and not future.cancelled()
            else Outcome(
                read.connection.name,
                "failed",
                failure="transient",
                detail="did not finish before the sweep had to report; the next sweep tries again",
                access_token_expires_at=_expiry(read),
            )
            for read, future in zip(due, futures, strict=True)
        ]

    def _queued(self, overflow: list[StoredConnection], unqueued: list[str]) -> list[Outcome]:
        now, left = self.refresher.clock(), set(unqueued)
        return [
            self.refresher.done(
                read.connection,
                "failed",
                now,
                at=read,
                failure="transient",
                detail="could not be queued for refresh (SQS refused or timed out); the next sweep tries again",
            )
            if read.connection.name in left
            else Outcome(read.connection.name, "queued", access_token_expires_at=_expiry(read))
            for read in overflow
        ]


def _expiry(read: StoredConnection) -> datetime | None:
    """Every outcome of a connection the sweep read carries its access token's expiry, whatever it did with it
    (queued, deferred, cut off): AccessTokenExpiringAlarm reads the least of them."""
    return read.connection.access_token_expires_at


def from_listing(entry: dict[str, Any], decision: str, name: str) -> Outcome:
    """An outcome decided from a ListSecrets entry's health tags: no value read, no request made."""
    health = Health.from_tags(entry.get("Tags"))
    result: Result = (
        "backing_off" if decision == "backing_off" else "needs_person" if decision == "needs_person" else "not_due"
    )
    return Outcome(
        name,
        result,
        failure=health.failure_class if decision == "backing_off" else None,  # type: ignore[arg-type]
        access_token_expires_at=health.access_expires,
        refresh_token_expires_at=health.refresh_expires,
        arn=entry.get("ARN"),
        version_id=health.version,
        status=health.status,
        instance=health.instance,
        grant=health.grant,
        needs_person=health.needs_person,
    )
