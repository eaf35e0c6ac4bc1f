"""The small HTML pages a person sees at the end of a consent. Everything shown is escaped; no token ever is."""

from __future__ import annotations

from html import escape

from core.clock import to_iso
from core.secret import Connection

SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    # The callback URL carries the code: never send it onward as a Referer.
    "Referrer-Policy": "no-referrer",
}

_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:40rem;margin:4rem auto;padding:0 1rem;color:#1f2933}"
    "h1{font-size:1.4rem}.ok{color:#146c2e}.err{color:#a61b1b}code{background:#f1f3f5;padding:0 .2rem}"
    "dl{display:grid;grid-template-columns:max-content auto;gap:.3rem 1rem}dt{font-weight:600}"
)


def _page(title: str, heading_class: str, body: str) -> str:
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width,initial-scale=1"><title>{escape(title)}</title>'
        f'<style>{_STYLE}</style></head><body><h1 class="{heading_class}">{escape(title)}</h1>{body}</body></html>'
    )


def authorized_page(connection: Connection) -> str:
    """Success: which connection, which instance, and how long its tokens live."""
    access = to_iso(connection.access_token_expires_at) if connection.access_token_expires_at else "unknown"
    refresh = to_iso(connection.refresh_token_expires_at) if connection.refresh_token_expires_at else "unknown"
    body = (
        f'<p id="summary">Connection <code>{escape(connection.name)}</code> to '
        f"<code>{escape(connection.host)}</code> is authorized.</p>"
        f'<dl><dt>Access token valid until</dt><dd id="access-expiry">{access}</dd>'
        f'<dt>Refresh token valid until</dt><dd id="refresh-expiry">{refresh}</dd></dl>'
        "<p>The tokens are stored in AWS Secrets Manager and refreshed automatically. You can close this page.</p>"
    )
    return _page("Connection authorized", "ok", body)


def error_page(title: str, message: str, connection: str | None = None) -> str:
    """A refusal: what went wrong, for which connection, and what to do next; nothing was changed."""
    about = f'<p>Connection: <code id="connection">{escape(connection)}</code></p>' if connection else ""
    body = f'{about}<p id="message">{escape(message)}</p><p>The stored credentials were not changed.</p>'
    return _page(title, "err", body)
