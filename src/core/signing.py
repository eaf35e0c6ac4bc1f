"""HMAC-signed authorize links and OAuth `state`, with a key that lives only in Secrets Manager.

The state is stateless to issue (no table to write at /authorize) yet unforgeable, bound to one
connection and short-lived; single use is enforced at the callback by the connection secret itself
(see `consent.py`). The PKCE verifier is derived from the state's nonce with the same key, so it is
never sent anywhere and an intercepted code is useless without the key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from urllib.parse import urlencode

from core.errors import InvalidLink, InvalidState

STATE_TTL = timedelta(minutes=10)
LINK_TTL = timedelta(minutes=15)
_MAC_BYTES = 32


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(key: bytes, purpose: str, message: bytes) -> bytes:
    # The purpose prefix keeps a link signature from ever validating as a state, and vice versa.
    return hmac.new(key, purpose.encode() + b"\x00" + message, hashlib.sha256).digest()


def sign_authorize_link(key: bytes, api_url: str, name: str, now: datetime, ttl: timedelta = LINK_TTL) -> str:
    """The short-lived link an operator opens to start a consent for `name`."""
    expires = int((now + ttl).timestamp())
    signature = _b64(_mac(key, "authorize", f"{name}\n{expires}".encode()))
    query = urlencode({"expires": expires, "signature": signature})
    return f"{api_url.rstrip('/')}/connections/{name}/authorize?{query}"


def verify_authorize_link(key: bytes, name: str, expires: str | None, signature: str | None, now: datetime) -> None:
    """Raise `InvalidLink` unless the link was signed for this connection and has not expired."""
    if not expires or not signature:
        raise InvalidLink(
            "this authorize link is not signed; ask an operator for a new one (make authorize-url)", connection=name
        )
    if not expires.isascii() or not expires.isdigit() or len(expires) > 12 or len(signature) > 64:
        raise InvalidLink("this authorize link is malformed; ask an operator for a new one", connection=name)
    expected = _b64(_mac(key, "authorize", f"{name}\n{expires}".encode()))
    # Bytes, not str: compare_digest refuses non-ASCII str (a TypeError would have become a 500).
    if not hmac.compare_digest(expected.encode(), signature.encode("utf-8", "surrogateescape")):
        raise InvalidLink(
            "this authorize link's signature is not valid for this connection; ask an operator for a new one",
            connection=name,
        )
    if int(expires) < now.timestamp():
        raise InvalidLink("this authorize link has expired; ask an operator for a new one", connection=name)


@dataclass(frozen=True)
class ConsentState:
    """What a valid `state` proves: which connection, when issued, and its one-time nonce."""

    connection: str
    issued_at: int
    nonce: str

    @property
    def fingerprint(self) -> str:
        """A non-secret identifier recorded in the secret once the state is used (single use)."""
        return hashlib.sha256(self.nonce.encode()).hexdigest()[:32]


def issue_state(key: bytes, name: str, now: datetime) -> tuple[str, ConsentState]:
    """A new `state` for a consent of `name`: URL-safe base64 without padding, as ServiceNow requires."""
    state = ConsentState(name, int(now.timestamp()), _b64(secrets.token_bytes(16)))
    payload = json.dumps({"c": state.connection, "i": state.issued_at, "n": state.nonce}, separators=(",", ":"))
    raw = payload.encode()
    return _b64(raw + _mac(key, "state", raw)), state


def verify_state(key: bytes, text: str | None, now: datetime, ttl: timedelta = STATE_TTL) -> ConsentState:
    """Decode and check a `state` from the callback.

    Raises:
        InvalidState: missing, malformed, forged or expired (the message says which, never the value).
    """
    if not text:
        raise InvalidState("the request has no state; start again from a new authorize link")
    try:
        if len(text) > 512:
            raise ValueError("too long")
        blob = _unb64(text)
        raw, mac = blob[:-_MAC_BYTES], blob[-_MAC_BYTES:]
        if len(raw) < 2:
            raise ValueError("too short")
    except ValueError:
        raise InvalidState("the state is malformed; start again from a new authorize link") from None
    if not hmac.compare_digest(mac, _mac(key, "state", raw)):
        raise InvalidState("the state was not issued by this service; start again from a new authorize link")
    fields = json.loads(raw)
    state = ConsentState(str(fields["c"]), int(fields["i"]), str(fields["n"]))
    if now.timestamp() - state.issued_at > ttl.total_seconds():
        raise InvalidState(
            "the consent took longer than 10 minutes and its state expired; start again from a new authorize link",
            connection=state.connection,
        )
    return state


def code_verifier_for(key: bytes, state: ConsentState) -> str:
    """The PKCE verifier for a state: recomputed at the callback, never stored or put in a URL."""
    return _b64(_mac(key, "pkce", state.nonce.encode()))
