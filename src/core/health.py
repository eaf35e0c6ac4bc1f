"""Connection health in secret tags: readable with ListSecrets alone, writable without a secret version.

This file is the health's data and its tag encoding; what moves it (and `plan`) is core/lifecycle.py.

`TagResource` adds no version and `ListSecrets` returns tags, so the sweep decides "not due",
"backing off" and "needs a person" from one listing, operators see every connection's health
without `GetSecretValue`, and a failing connection adds zero secret versions. The tags also
remember which change events were already sent, so each change is announced once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from core.clock import from_iso, to_iso

PREFIX = "servicenow-oauth:"
# Staging label of a version written but not (yet) made current (store.py's compare-and-swap). A run that
# finds one built on the current version adopts it: that is where a refresh whose stage move failed left
# its tokens.
CANDIDATE = "SNOWCANDIDATE"
# Every other writer's (the CLI, a consent, a revoke, a mark) staging label: were it CANDIDATE too, its put would
# take the label off a refresh's candidate waiting to be adopted, leaving the only copy of a rotated refresh
# token in an unlabelled version nothing adopts. What such a write leaves behind is never adopted (its writer
# saw the failure and retries).
WRITING = "SNOWWRITE"
_TIMES = (
    "last_success",
    "last_failure",
    "failing_since",
    "next_attempt",
    "access_expires",
    "refresh_expires",
    "appflow_next_attempt",
)
_TEXTS = ("status", "version", "instance", "failure_class", "grant", "rejected_version", "alerted_rejected")
_FLAGS = ("needs_person", "appflow_pending", "alerted_failing", "alerted_expiring", "rotation_unseen")


def _tag(attribute: str) -> str:
    return PREFIX + attribute.replace("_", "-")


# The tags `Health` owns (the stack's other tags under the prefix, e.g. appflow-synced-version, are not health).
HEALTH_TAGS = frozenset(_tag(name) for name in (*_TIMES, *_TEXTS, *_FLAGS, "consecutive_failures", "appflow_failures"))


@dataclass(frozen=True)
class Health:
    """What the sweep knows about a connection between runs; every field is safe to show anyone."""

    status: str | None = None
    version: str | None = None  # the secret version this health describes
    instance: str | None = None
    grant: str | None = None
    needs_person: bool = False
    last_success: datetime | None = None
    last_failure: datetime | None = None
    failure_class: str | None = None
    consecutive_failures: int = 0
    failing_since: datetime | None = None
    next_attempt: datetime | None = None
    access_expires: datetime | None = None
    refresh_expires: datetime | None = None
    appflow_pending: bool = False
    appflow_failures: int = 0
    appflow_next_attempt: datetime | None = None
    alerted_failing: bool = False
    alerted_expiring: bool = False
    # The refused version whose "reauthorization required" went out (once the refusal stood for a sweep); kept
    # while a person's fixes are refused too, so their right fix is announced as "recovered".
    alerted_rejected: str | None = None
    rejected_version: str | None = None  # the version ServiceNow refused: retried once the secret changes
    rotation_unseen: bool = False  # a refresh token may have rotated without being stored (see lifecycle.py)
    extra: Mapping[str, str] = field(default_factory=dict, compare=False)

    @classmethod
    def from_tags(cls, tags: Mapping[str, str] | list[dict[str, str]] | None) -> Health:
        if isinstance(tags, list):
            tags = {tag["Key"]: tag["Value"] for tag in tags}
        tags = tags or {}
        values: dict[str, Any] = {}
        for name in _TEXTS:
            values[name] = tags.get(_tag(name)) or None
        for name in _FLAGS:
            values[name] = tags.get(_tag(name)) == "true"
        for name in _TIMES:
            raw = tags.get(_tag(name))
            try:
                values[name] = from_iso(raw) if raw else None
            except ValueError:
                values[name] = None
        for name in ("consecutive_failures", "appflow_failures"):
            try:
                values[name] = int(tags.get(_tag(name), "0"))
            except ValueError:
                values[name] = 0
        return cls(**values, extra={k: v for k, v in tags.items() if not k.startswith(PREFIX)})

    def to_tags(self) -> dict[str, str]:
        """Our tags only (others' are left alone); absent values are absent keys."""
        tags: dict[str, str] = {}
        for name in _TEXTS:
            if getattr(self, name):
                tags[_tag(name)] = str(getattr(self, name))
        for name in _FLAGS:
            if getattr(self, name):
                tags[_tag(name)] = "true"
        for name in _TIMES:
            if getattr(self, name):
                tags[_tag(name)] = to_iso(getattr(self, name))
        for name in ("consecutive_failures", "appflow_failures"):
            if getattr(self, name):
                tags[_tag(name)] = str(getattr(self, name))
        return tags

    def tag_write(self) -> list[dict[str, str]]:
        """Every health tag for one TagResource: the fields this health lacks as empty values (read as absent),
        so the write replaces whatever health the tags held, whoever wrote it, without an UntagResource."""
        tags = self.to_tags()
        return [{"Key": key, "Value": tags.get(key, "")} for key in sorted(HEALTH_TAGS)]

    def succeeded(self, now: datetime) -> Health:
        return replace(
            self,
            last_success=now,
            failure_class=None,
            consecutive_failures=0,
            failing_since=None,
            next_attempt=None,
            alerted_failing=False,
            alerted_rejected=None,
        )

    def failed(
        self, kind: str, now: datetime, *, interval: timedelta, cap: timedelta, retry_after: float | None
    ) -> Health:
        """One more failure: back off exponentially (one interval, 2x, 4x, ... up to the cap)."""
        failures = self.consecutive_failures + 1
        delay = backoff(failures, interval, cap)
        if retry_after and retry_after > 0:
            # Honour a longer Retry-After, but never beyond the cap: a server must not park a connection for a year.
            delay = min(max(delay, timedelta(seconds=min(retry_after, cap.total_seconds()))), cap)
        return replace(
            self,
            last_failure=now,
            failure_class=kind,
            consecutive_failures=failures,
            failing_since=self.failing_since or now,
            next_attempt=now + delay,
        )


def unreadable_tags(tags: Mapping[str, str]) -> list[str]:
    """Our tags whose value does not read back (hand-edited, truncated, from a future encoding): the dashboard
    shows such a connection as "unknown health" instead of trusting half of it."""
    bad = []
    for name in _FLAGS:
        if tags.get(_tag(name), "true") not in ("true", ""):  # an empty value is an absent field (`tag_write`)
            bad.append(_tag(name))
    for name in _TIMES:
        raw = tags.get(_tag(name))
        try:
            if raw:
                from_iso(raw)
        except ValueError:
            bad.append(_tag(name))
    for name in ("consecutive_failures", "appflow_failures"):
        raw = tags.get(_tag(name))
        if raw and not (raw.isascii() and raw.isdigit()):
            bad.append(_tag(name))
    return bad


def backoff(failures: int, interval: timedelta, cap: timedelta) -> timedelta:
    """One interval after the first failure, then 2x, 4x, ... never more than the cap."""
    return min(interval * (1 << min(max(failures - 1, 0), 30)), cap)


def current_version(listing: Mapping[str, Any]) -> str | None:
    """The AWSCURRENT version id from a ListSecrets entry."""
    stages = listing.get("SecretVersionsToStages", {})
    return next((version for version, labels in stages.items() if "AWSCURRENT" in labels), None)
