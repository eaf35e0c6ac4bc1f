"""Instance URLs are refused unless they name an allowed ServiceNow host: no SSRF through a secret or a link."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from urllib.parse import urlsplit

from core.errors import InstanceNotAllowed

DEFAULT_ALLOWED_HOSTS = ("*.service-now.com", "*.servicenowservices.com")
_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def parse_allowed_hosts(value: str | None) -> tuple[str, ...]:
    """Split the comma-separated SERVICENOW_ALLOWED_HOSTS setting; empty means the ServiceNow defaults."""
    patterns = tuple(p.strip().lower() for p in (value or "").split(",") if p.strip())
    return patterns or DEFAULT_ALLOWED_HOSTS


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_matches(host: str, pattern: str) -> bool:
    if pattern.startswith("*."):
        suffix = pattern[1:]
        prefix = host[: -len(suffix)] if host.endswith(suffix) else ""
        return bool(prefix) and all(_LABEL.match(label) for label in prefix.split("."))
    return host == pattern


def normalize_instance_url(url: str, allowed: Iterable[str]) -> str:
    """Return `scheme://host[:port]` for an allowed instance URL, or raise `InstanceNotAllowed`.

    https is required; plain http only for a loopback host the allowlist names exactly (local runs
    and tests). Paths, queries, fragments and user info are refused rather than silently dropped.

    Raises:
        InstanceNotAllowed: with a message that names the host (never credentials) and the fix.
    """
    allowed = tuple(allowed)
    if not isinstance(url, str) or len(url) > 300:
        raise InstanceNotAllowed("instance URL must be a string like https://<name>.service-now.com")
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        raise InstanceNotAllowed("instance URL is not a valid URL; expected https://<name>.service-now.com") from None
    host = (parts.hostname or "").lower()
    if parts.username or parts.password or parts.query or parts.fragment or parts.path not in ("", "/"):
        raise InstanceNotAllowed(
            f"instance URL for host {host!r} must be only scheme and host, like https://<name>.service-now.com"
        )
    if parts.scheme == "https" and port in (None, 443) and any(_host_matches(host, p) for p in allowed):
        return f"https://{host}"
    if parts.scheme == "http" and _is_loopback(host) and host in allowed:
        netloc = f"[{host}]" if ":" in host else host
        return f"http://{netloc}" + (f":{port}" if port else "")
    raise InstanceNotAllowed(
        f"instance host {host!r} ({parts.scheme or 'no scheme'}) is not allowed; "
        f"allowed: {', '.join(allowed)} over https (set SERVICENOW_ALLOWED_HOSTS to change)"
    )
