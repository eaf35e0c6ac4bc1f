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
    """Parse a timestamp written by `to_iso` (or any ISO-8601 string with an offset).

    Raises ValueError for anything else, including moments outside 1970-9000: at the edges of `datetime`'s range a
    conversion to UTC or a backoff's arithmetic overflows (OverflowError), and one hand-edited tag must not stop a
    sweep."""
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00") if text.endswith("Z") else text)
        if moment.tzinfo is None:
            raise ValueError("timestamp has no UTC offset")
        moment = moment.astimezone(UTC)
    except OverflowError:
        raise ValueError("timestamp out of range") from None
    if not 1970 <= moment.year <= 9000:
        raise ValueError("timestamp out of range")
    return moment
