"""A connection's life as one pure state machine: everything that decides what happens next lives here.

The model is h11's `_state.py`: no I/O and no clock reads in this file. The edges (the sweep in
refresh.py, the callback, rotation, the CLI) observe what happened - a due check, ServiceNow's answer,
a secret write, an AppFlow push, a consent, a revoke, an operator's change - and feed it in as an
`Outcome`; `advance` answers with the connection's new health (written to its secret's tags) and
the change events to publish. `plan` decides, from a `ListSecrets` entry alone, whether a sweep reads
a connection at all. The states, and what moves a connection between them:

    PENDING  --consented-->  HEALTHY  --failed / write_failed-->  FAILING  --refreshed / not_due-->  HEALTHY
    any      --reauthorization_required (a definitive 401, re-checked)-->  REJECTED
    REJECTED --the secret changes (operator fix, new consent)--> read again; a blip on that retry is
               FAILING (backing off, retried), never REJECTED: only a definitive answer parks it again

`tests/test_lifecycle_model.py` drives the real code through generated histories of faults,
concurrency and operator actions and checks the README's guarantees after every step.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

from core.health import CANDIDATE, Health, backoff, current_version

if TYPE_CHECKING:
    from core.config import Settings
    from core.errors import FailureKind
    from core.secret import Connection

Result = Literal[
    "refreshed",
    "not_due",
    "backing_off",
    "needs_person",
    "failed",
    "reauthorization_required",
    "invalid",
    "write_failed",
    "queued",
    "deferred",
    "consented",
    "revoked",
]
Decision = Literal["read", "not_due", "backing_off", "needs_person"]
Action = Literal["refresh", "not_due", "needs_person", "backing_off"]


class State(enum.Enum):
    """Where a connection stands, derived from its health (never stored separately)."""

    UNKNOWN = "unknown"  # no health recorded yet
    PENDING = "pending_authorization"  # no credential: only a first consent helps
    HEALTHY = "healthy"
    FAILING = "failing"  # attempts fail (unavailable, rate limited, transient, write failed): backing off
    REJECTED = "reauthorization_required"  # ServiceNow refused this very secret version: a person must act


# The state an outcome leads to (needs_person is PENDING or REJECTED depending on the document's status).
TRANSITIONS: dict[Result, State] = {
    "consented": State.HEALTHY,
    "refreshed": State.HEALTHY,
    "not_due": State.HEALTHY,
    "failed": State.FAILING,
    "write_failed": State.FAILING,
    "reauthorization_required": State.REJECTED,
    "revoked": State.REJECTED,
    "needs_person": State.PENDING,
}


# A sweep may reach a connection up to its 240 s timeout after it starts, and start a minute late.
LEEWAY_MARGIN = timedelta(minutes=5)


@dataclass(frozen=True)
class RefreshPolicy:
    """When a connection is due, when to warn, and how to back off and alert after failures."""

    leeway: timedelta = timedelta(seconds=600)
    refresh_warning: timedelta = timedelta(days=14)
    interval: timedelta = timedelta(minutes=5)  # the sweep schedule: the first backoff step
    backoff_cap: timedelta = timedelta(seconds=3600)
    alert_after: timedelta = timedelta(seconds=3600)

    @classmethod
    def from_settings(cls, settings: Settings) -> RefreshPolicy:
        interval = timedelta(minutes=settings.refresh_interval_minutes)
        return cls(
            # A token not due at one sweep must still live when the next reaches it: an interval and a margin
            # (RefreshLeewaySeconds 600 with RefreshIntervalMinutes 20 let tokens lapse between sweeps).
            leeway=max(timedelta(seconds=settings.refresh_leeway_seconds), interval + LEEWAY_MARGIN),
            refresh_warning=timedelta(days=settings.refresh_token_warning_days),
            interval=interval,
            backoff_cap=timedelta(seconds=settings.failure_backoff_max_seconds),
            alert_after=timedelta(seconds=settings.failure_alert_after_seconds),
        )

    @property
    def slack(self) -> timedelta:
        """A retry is due when the sweep comes up to half an interval early (schedules jitter; an attempt
        that took 40 s must not push its retry past the next sweep)."""
        return self.interval / 2


@dataclass(frozen=True)
class Outcome:
    """What happened to one connection: the input of `advance`; safe to log as-is (no secret material)."""

    connection: str
    result: Result
    failure: FailureKind | None = None
    detail: str | None = None
    access_token_expires_at: datetime | None = None
    refresh_token_expires_at: datetime | None = None
    refresh_token_expiring: bool = False
    appflow_synced: tuple[str, ...] = ()
    appflow_failed: tuple[str, ...] = ()  # "profile (ErrorCode)"
    # Where the connection stands now (for its health tags and events):
    arn: str | None = None
    version_id: str | None = None
    status: str | None = None
    instance: str | None = None
    grant: str | None = None
    needs_person: bool = False
    retry_after: float | None = None
    client_secret_promoted: bool = False
    jwt_key_promoted: bool = False
    # The refresh token may have rotated without being stored (answer lost after sending, or every write failed):
    rotation_unseen: bool = False
    appflow_owed: bool = False  # a consent stored new tokens for AppFlow profiles: push on the next sweep
    events: tuple[str, ...] = ()  # change events published for this outcome
    events_failed: int = 0  # change events EventBridge did not take (not re-sent: ChangeEventsNotPublished)
    health_unsaved: bool = False  # the health tags could not be written: it lives in the container's memory


def state_of(health: Health) -> State:
    if health.version is None:
        return State.UNKNOWN
    if health.needs_person:
        return State.REJECTED if health.status == "reauthorization_required" else State.PENDING
    if health.consecutive_failures:
        return State.FAILING
    return State.HEALTHY


def rejected_version(health: Health) -> str | None:
    """The secret version ServiceNow refused; older health (before this tag existed) names it by `version`."""
    if health.rejected_version:
        return health.rejected_version
    return health.version if state_of(health) is State.REJECTED else None


def plan(listing: Mapping[str, Any], now: datetime, policy: RefreshPolicy) -> Decision:
    """What a sweep does with a connection from its ListSecrets entry alone (no value read, no API call).

    The order is the point: a refused credential waits for its secret to change; a failing one waits out
    its backoff whatever else is owed (an AppFlow push, a warning); anything the tags cannot vouch for is read.
    """
    health = Health.from_tags(listing.get("Tags"))
    version = current_version(listing)
    stages = listing.get("SecretVersionsToStages", {})
    candidate = next((v for v, labels in stages.items() if CANDIDATE in labels), None)
    if health.version is None or candidate not in (None, version):
        return "read"  # no health yet, or a write left a version to adopt or clear
    if health.version != version:
        return "read"  # changed since: an operator's fix, a consent, or our own write whose tag write failed
    state = state_of(health)
    if state is State.REJECTED and health.alerted_rejected != rejected_version(health):
        return "read"  # the refusal stood since it was marked: its alert is owed (`advance`)
    if state in (State.REJECTED, State.PENDING):
        return "needs_person"
    if health.next_attempt and now < health.next_attempt - policy.slack:
        return "backing_off"
    expiring = health.refresh_expires and health.refresh_expires - now <= policy.refresh_warning
    if expiring and not health.alerted_expiring:
        return "read"  # the refresh-token warning is owed
    if health.appflow_pending and (
        health.appflow_next_attempt is None or now >= health.appflow_next_attempt - policy.slack
    ):
        return "read"  # an AppFlow push is owed (and not backing off)
    if health.access_expires and health.access_expires - now > policy.leeway:
        return "not_due"
    return "read"


def without_credential(connection: Connection) -> bool:
    """An authorization-code connection with no refresh token: only a (first or new) consent helps."""
    return connection.grant_type == "authorization_code" and not connection.refresh_token


def needs_person(connection: Connection) -> bool:
    """True when only a person can produce a token: no consent yet, or the last one was refused."""
    return connection.status == "reauthorization_required" or without_credential(connection)


def is_due(connection: Connection, now: datetime, leeway: timedelta) -> bool:
    """Due when the access token is missing or expires within the leeway (and a machine can refresh it)."""
    if needs_person(connection):
        return False
    expires = connection.access_token_expires_at
    return not connection.access_token or expires is None or expires - now <= leeway


def decide(
    connection: Connection,
    version_id: str,
    health: Health | None,
    now: datetime,
    policy: RefreshPolicy,
    *,
    force: bool = False,
) -> Action:
    """What to do with a connection whose value was read (`plan` already let it through).

    A refused credential is tried again once its secret is a newer version than the one ServiceNow refused
    (a fixed password or client secret, a new refresh token); unknown health counts as unchanged, so nothing
    is retried blindly. The version the stack marked names itself in the document (`markedVersion`), so it
    stays refused even where the health tags could not record it. `force` (the operator's
    `make refresh FORCE=1`) tries now. Without any credential only a consent helps.
    """
    refused = rejected_version(health) if health is not None else None
    marked = connection.marked_version
    changed = version_id not in (refused, marked) and (refused is not None or marked is not None)
    retrying = connection.status == "reauthorization_required" and (force or changed)
    if without_credential(connection) or (connection.status == "reauthorization_required" and not retrying):
        return "needs_person"
    if not force and not retrying and not is_due(connection, now, policy.leeway):
        return "not_due"
    if (
        not force
        and health is not None
        and health.next_attempt is not None
        and now < health.next_attempt - policy.slack
        and not (retrying and health.version != version_id)
    ):
        # Read for another reason (a candidate to adopt, an AppFlow push, a credential changed while the instance
        # was failing: a new secret does not bring an instance back), but still backing off: no attempt. Only a
        # refused credential that changed since is tried at once.
        return "backing_off"
    return "refresh"


def retry_allowed(health: Health) -> bool:
    """Whether the HTTP layer may repeat the request within this attempt: only on a connection not already
    failing (one 500 must not cost a sweep; an outage is retried across sweeps, with backoff, instead)."""
    return health.consecutive_failures == 0


def advance(old: Health, outcome: Outcome, now: datetime, policy: RefreshPolicy) -> tuple[Health, tuple[str, ...]]:
    """Fold one outcome into a connection's health: the new health and the change events to publish."""
    if outcome.result in ("invalid", "queued", "deferred", "backing_off"):
        return old, ()
    if outcome.result == "not_due" and outcome.status == "reauthorization_required":
        # Read while someone changed a refused secret (credential changed while refreshing): nothing was tried,
        # so the old health stands and the next sweep, seeing a new version, tries the change.
        return old, ()
    before = state_of(old)
    new = replace(
        old,
        version=outcome.version_id,
        status=outcome.status,
        instance=outcome.instance,
        grant=outcome.grant,
        access_expires=outcome.access_token_expires_at,
        refresh_expires=outcome.refresh_token_expires_at,
    )
    target = TRANSITIONS.get(outcome.result)
    if outcome.result == "needs_person" and outcome.status == "reauthorization_required":
        target = State.REJECTED
    kinds: list[str] = []
    if target is State.HEALTHY:
        if outcome.result == "consented":
            kinds.append("authorized")
            new = replace(new, alerted_expiring=False)
        elif before in (State.REJECTED, State.FAILING) and (old.alerted_rejected or old.alerted_failing):
            # A page went out in this stretch (a refusal, or failing for too long), even if a blip on the retry of a
            # fix made it FAILING since: the person paged hears that it recovered.
            kinds.append("recovered")
        new = replace(new.succeeded(now), needs_person=False, rejected_version=None, rotation_unseen=False)
    elif target is State.FAILING:
        # A blip, even on the retry of a fixed credential: back off and retry; never park it.
        new = new.failed(
            outcome.failure or "transient",
            now,
            interval=policy.interval,
            cap=policy.backoff_cap,
            retry_after=outcome.retry_after,
        )
        new = replace(new, needs_person=False, rotation_unseen=old.rotation_unseen or outcome.rotation_unseen)
    elif target is State.REJECTED:
        refused = outcome.version_id  # a needs_person outcome is read at the version decide found unchanged
        new = replace(
            new,
            needs_person=True,
            rejected_version=refused,
            last_failure=now if outcome.result != "needs_person" else new.last_failure,
            failure_class="rejected",
            next_attempt=None,
        )
        if outcome.result == "needs_person" and rejected_version(old) == refused and old.alerted_rejected != refused:
            # Announced by a later run that finds the refusal its tags record still standing, never by the run that
            # marked it: a 401 for a refresh token another run had just spent (rotating mode) is marked, then
            # overwritten within seconds by that run's new tokens; it must not page anyone, nor announce a recovery.
            kinds.append("reauthorization_required")
            new = replace(new, alerted_rejected=refused)
    elif target is State.PENDING:
        new = replace(new, needs_person=True)
    if outcome.appflow_failed:
        # A push that keeps failing (say, AccessDenied) backs off like a refresh does.
        pushes = old.appflow_failures + 1
        wait = backoff(pushes, policy.interval, policy.backoff_cap)
        new = replace(new, appflow_pending=True, appflow_failures=pushes, appflow_next_attempt=now + wait)
    elif outcome.appflow_synced:
        new = replace(new, appflow_pending=False, appflow_failures=0, appflow_next_attempt=None)
    elif outcome.result == "consented" and outcome.appflow_owed:
        new = replace(new, appflow_pending=True, appflow_failures=0, appflow_next_attempt=None)
    if new.refresh_expires != old.refresh_expires:
        new = replace(new, alerted_expiring=False)  # a new refresh token deserves its own warning
    if outcome.client_secret_promoted:
        kinds.append("client_secret_promoted")
    if outcome.jwt_key_promoted:
        kinds.append("jwt_key_promoted")
    if new.failing_since and now - new.failing_since >= policy.alert_after and not new.alerted_failing:
        kinds.append("failing")
        new = replace(new, alerted_failing=True)
    if outcome.refresh_token_expiring and not new.alerted_expiring:
        kinds.append("refresh_token_expiring")
        new = replace(new, alerted_expiring=True)
    return new, tuple(kinds)


def event_state(health: Health) -> str:
    """A one-word state for events: the stored status, or `failing` while attempts fail."""
    if health.needs_person and health.status != "active":
        return health.status or "pending_authorization"
    if health.consecutive_failures:
        return "failing"
    return health.status or "unknown"
