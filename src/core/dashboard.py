"""Every connection's health at a glance: a pure function from health records to one HTML page.

The CloudWatch custom widget (handlers/dashboard.py) and the local stack's `/status` only fetch the listing
and call `render`. The health comes from the secrets' tags (lifecycle.py's states), never from a secret value,
so the page can hold no token. Everything shown is escaped, the page needs no script, and status is always
said in words, never by colour alone. At a thousand connections it stays one short page: what needs a look
is listed in full (worst first), the healthy ones are folded into a collapsed list.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from html import escape
from typing import Any

from core.clock import to_iso
from core.health import Health, unreadable_tags
from core.lifecycle import RefreshPolicy, State, state_of

ACCESS_SCALE = timedelta(seconds=1800)  # ServiceNow's default access-token life: a full bar
REFRESH_SCALE = timedelta(days=100)  # ServiceNow's default refresh-token life
ATTENTION_ROWS = 300  # rows listed in full before the rest are counted, not shown
HEALTHY_ROWS = 1000


@dataclass(frozen=True)
class Row:
    """One connection as the page shows it; `health` is None when its tags could not be read."""

    name: str
    health: Health | None


def health_of(tags: Mapping[str, str] | list[dict[str, str]] | None) -> Health | None:
    """The health the tags record, or None when one of ours does not read back (garbled): shown as unknown."""
    if isinstance(tags, list):
        try:
            tags = {str(tag["Key"]): str(tag["Value"]) for tag in tags}
        except (KeyError, TypeError):
            return None
    tags = tags or {}
    return None if unreadable_tags(tags) else Health.from_tags(tags)


def rows_from_listing(entries: Iterable[Mapping[str, Any]], name_of: Any) -> list[Row]:
    """Rows from ListSecrets entries (their tags only)."""
    return [Row(str(name_of(entry["Name"]) or entry["Name"]), health_of(entry.get("Tags"))) for entry in entries]


# ------------------------------------------------------------------------------------------------ judging
_WORDS = {
    "rejected": ("Needs re-authorization", "bad"),
    "pending": ("Awaiting first consent", "bad"),
    "failing": ("Failing", "warn"),
    "unknown": ("Unknown health", "unknown"),
    "expired": ("Access token expired", "warn"),
    "expiring": ("Refresh token expiring", "warn"),
    "new": ("Not yet swept", "unknown"),
    "healthy": ("Healthy", "ok"),
}
_ORDER = {key: n for n, key in enumerate(_WORDS)}


def verdict(row: Row, now: datetime, policy: RefreshPolicy) -> str:
    """One word for where a connection stands (a key of `_WORDS`): the order of `_WORDS` is worst first."""
    health = row.health
    if health is None:
        return "unknown"
    if health.version is None and health.needs_person and health.status == "pending_authorization":
        return "pending"  # added by the CLI, not swept yet: it is waiting for its consent all the same
    state = state_of(health)
    if state is State.REJECTED:
        return "rejected"
    if state is State.PENDING:
        return "pending"
    if state is State.FAILING:
        return "failing"
    if state is State.UNKNOWN:
        return "new"
    if health.access_expires is not None and health.access_expires <= now:
        return "expired"
    if health.refresh_expires is not None and health.refresh_expires - now <= policy.refresh_warning:
        return "expiring"
    return "healthy"


def _sort_key(row: Row, now: datetime, policy: RefreshPolicy) -> tuple[int, float, str]:
    """Worst state first; within a state, whatever runs out first (the refresh token for "expiring")."""
    word = verdict(row, now, policy)
    health = row.health
    left = None
    if health is not None:
        left = health.refresh_expires if word == "expiring" else health.access_expires
    return _ORDER[word], (left - now).total_seconds() if left else 0.0, row.name


# ------------------------------------------------------------------------------------------------ rendering
_STYLE = (
    ".snow{font:13px system-ui,sans-serif;color:#1f2933}.snow table{border-collapse:collapse;width:100%}"
    ".snow th,.snow td{padding:3px 6px;border-bottom:1px solid #e4e7eb;text-align:left;vertical-align:top}"
    ".snow .badge{display:inline-block;padding:0 6px;border-radius:3px;font-weight:600}"
    ".snow .ok{background:#d3f2dc;color:#0b4d21}.snow .warn{background:#fff0c2;color:#5c4400}"
    ".snow .bad{background:#fbd5d5;color:#7a1212}.snow .unknown{background:#e4e7eb;color:#323f4b}"
    ".snow .bar{position:relative;width:120px;height:8px;background:#e4e7eb;margin-top:2px}"
    ".snow .fill{height:8px;background:#3e7bfa}.snow .low .fill{background:#d64545}"
    ".snow .mark{position:absolute;top:-2px;width:2px;height:12px;background:#1f2933}"
    ".snow summary{cursor:pointer;margin:8px 0}.snow .muted{color:#616e7c}"
)


def _e(value: object) -> str:
    return escape(str(value), quote=True)


def _when(moment: datetime | None) -> str:
    return _e(to_iso(moment)) if moment else "&ndash;"


def _duration(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    if seconds < 0:
        return "expired"
    if seconds < 3600:
        return f"{seconds // 60} min left"
    if seconds < 2 * 86400:
        return f"{seconds // 3600} h left"
    return f"{seconds // 86400} days left"


def _bar(left: timedelta, scale: timedelta, *, low: bool, mark: timedelta | None = None) -> str:
    share = max(0.0, min(1.0, left / scale))
    marker = ""
    if mark is not None:
        marker = f'<span class="mark" style="left:{min(100.0, 100 * (mark / scale)):.1f}%"></span>'
    return (
        f'<div class="bar{" low" if low else ""}" role="img" aria-label="{_e(_duration(left))}">'
        f'<div class="fill" style="width:{100 * share:.1f}%"></div>{marker}</div>'
    )


def _access(health: Health | None, now: datetime, policy: RefreshPolicy) -> str:
    if health is None or health.access_expires is None:
        return "&ndash;"
    left = health.access_expires - now
    return f"{_e(_duration(left))}{_bar(left, ACCESS_SCALE, low=left <= policy.leeway)}"


def _refresh(health: Health | None, now: datetime, policy: RefreshPolicy) -> str:
    if health is None or health.refresh_expires is None:
        if health is not None and health.grant in ("client_credentials", "jwt_bearer"):
            return '<span class="muted">none (this grant has no refresh token)</span>'
        return "&ndash;"
    left = health.refresh_expires - now
    low = left <= policy.refresh_warning
    return f"{_e(_duration(left))}{_bar(left, REFRESH_SCALE, low=low, mark=policy.refresh_warning)}"


def _row(row: Row, now: datetime, policy: RefreshPolicy) -> str:
    word = verdict(row, now, policy)
    text, tone = _WORDS[word]
    health = row.health
    if health is None:
        cells = ["&ndash;"] * 8
        cells[0] = '<span class="muted">tags unreadable: the next sweep rewrites them</span>'
    else:
        failing = "&ndash;"
        if health.failing_since or health.failure_class:
            failing = f"{_when(health.failing_since)} ({_e(health.failure_class or 'failing')}"
            failing += f", {health.consecutive_failures}&times;)" if health.consecutive_failures else ")"
        person = "No"
        if health.needs_person:
            person = "Yes: fix the credential or re-authorize" if word == "rejected" else "Yes: authorize it"
        cells = [
            _e(health.instance or "?"),
            _e(health.grant or "?"),
            _access(health, now, policy),
            _refresh(health, now, policy),
            _when(health.last_success),
            failing,
            _when(health.next_attempt),
            _e(person),
        ]
    badge = f'<span class="badge {tone}">{_e(text)}</span>'
    return (
        f'<tr data-state="{word}"><td>{_e(row.name)}</td><td>{badge}</td>'
        + "".join(f"<td>{cell}</td>" for cell in cells)
        + "</tr>"
    )


_HEAD = (
    "<tr><th>Connection</th><th>Status</th><th>Instance</th><th>Grant</th><th>Access token</th>"
    "<th>Refresh token</th><th>Last success</th><th>Failing since</th><th>Next try</th><th>Needs a person</th></tr>"
)


def _table(rows: list[Row], now: datetime, policy: RefreshPolicy, limit: int, table_id: str) -> str:
    shown = "".join(_row(row, now, policy) for row in rows[:limit])
    more = ""
    if len(rows) > limit:
        more = f'<p class="muted">and {len(rows) - limit} more (make connections lists every one)</p>'
    return f'<table id="{table_id}"><thead>{_HEAD}</thead><tbody>{shown}</tbody></table>{more}'


def render(rows: Iterable[Row], now: datetime, policy: RefreshPolicy | None = None, *, title: str = "") -> str:
    """The page (an HTML fragment the widget returns; `page` wraps it for a browser)."""
    policy = policy or RefreshPolicy()
    ordered = sorted(rows, key=lambda row: _sort_key(row, now, policy))
    counts = Counter(verdict(row, now, policy) for row in ordered)
    attention = [row for row in ordered if verdict(row, now, policy) != "healthy"]
    healthy = [row for row in ordered if verdict(row, now, policy) == "healthy"]
    summary = " &middot; ".join(
        f'<span class="badge {_WORDS[word][1]}">{_e(_WORDS[word][0])}: {counts[word]}</span>'
        for word in _WORDS
        if counts[word]
    )
    parts = [
        f'<div class="snow"><style>{_STYLE}</style>',
        f"<h2>{_e(title)}</h2>" if title else "",
        f'<p id="summary">{len(ordered)} connections &middot; {summary or "none yet"} '
        f'<span class="muted">as of {_e(to_iso(now))}, from the secrets\' health tags</span></p>',
    ]
    if attention:
        parts.append(f"<h3>Needs a look ({len(attention)})</h3>")
        parts.append(_table(attention, now, policy, ATTENTION_ROWS, "attention"))
    if healthy:
        parts.append(f"<details><summary>Healthy ({len(healthy)})</summary>")
        parts.append(_table(healthy, now, policy, HEALTHY_ROWS, "healthy") + "</details>")
    parts.append("</div>")
    return "".join(parts)


def page(fragment: str, title: str = "ServiceNow connections") -> str:
    """A whole document around `render`'s fragment, for a browser (the local stack's /status)."""
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width,initial-scale=1"><title>{_e(title)}</title></head>'
        f'<body style="margin:1rem">{fragment}</body></html>'
    )
