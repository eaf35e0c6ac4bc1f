"""Time in one place, so tests move it instead of sleeping and every timestamp has one format."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    """The real clock; core functions take a `Clock` so tests can inject their own."""
    return datetime.now(UTC)


def to_iso(moment: datetime) -> str:
    """ISO-8601 UTC with a `Z`, whole seconds: the secret's documented timestamp format."""
    return moment.astimezone(UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def from_iso(text: str) -> datetime:
    """Parse a timestamp written by `to_iso` (or any ISO-8601 string with an offset)."""
    moment = datetime.fromisoformat(text.replace("Z", "+00:00") if text.endswith("Z") else text)
    if moment.tzinfo is None:
        raise ValueError("timestamp has no UTC offset")
    return moment.astimezone(UTC)
