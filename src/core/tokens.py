"""What ServiceNow's token endpoint hands out, and to whom: plain data, no HTTP.

Apart from `servicenow.py` so that the connection document (and the dashboard, which only reads health) never
imports `requests`: about a tenth of a cold start.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from urllib.parse import urlsplit


@dataclass(frozen=True)
class OAuthApp:
    """A ServiceNow Application Registry entry as seen by its client: where, who, and the shared secret."""

    instance_url: str
    client_id: str
    client_secret: str = field(repr=False)

    @property
    def host(self) -> str:
        return urlsplit(self.instance_url).netloc


@dataclass(frozen=True)
class Token:
    """One token response; the absolute expiry is fixed at receipt so it never depends on when it is read."""

    access_token: str = field(repr=False)
    token_type: str
    access_token_expires_at: datetime
    scope: str | None = None
    refresh_token: str | None = field(default=None, repr=False)
