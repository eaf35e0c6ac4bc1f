"""The consent flow: a signed link starts it, ServiceNow's redirect completes it, tokens land in the secret.

Nothing is written until a code has been exchanged and checked; every refusal leaves the secret as it was.
Every refresh token an exchange obtains ends up stored or revoked: tokens that could not be stored are
revoked before the error propagates, and a consent that replaces another refresh token revokes that one.
"""

from __future__ import annotations

import re
from contextlib import suppress
from dataclasses import replace
from datetime import datetime

from botocore.exceptions import BotoCoreError, ClientError

from core.clock import from_iso, to_iso
from core.errors import (
    ConcurrentUpdate,
    ConsentDenied,
    ConsentError,
    IdentityUnverified,
    InvalidState,
    ProviderError,
    WrongUser,
)
from core.secret import Connection
from core.servicenow import ServiceNowClient, authorization_url, code_challenge
from core.signing import ConsentState, code_verifier_for, issue_state, verify_authorize_link, verify_state
from core.store import ConnectionStore, SecretWriteFailed, StoredConnection
from core.tokens import Token

AUTHORIZED_AT = "authorizedAt"
CONSENT_STATE = "consentState"
_SAFE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def _require_consent_grant(connection: Connection) -> None:
    if connection.grant_type != "authorization_code":
        raise ConsentError(
            f"connection {connection.name!r} uses the {connection.grant_type} grant and needs no consent; "
            "the scheduled refresher obtains its tokens",
            connection=connection.name,
        )


def start_consent(
    store: ConnectionStore,
    key: bytes,
    name: str,
    *,
    expires: str | None,
    signature: str | None,
    callback_url: str,
    now: datetime,
) -> str:
    """Check the operator's signed link and return the `oauth_auth.do` URL to redirect the browser to."""
    verify_authorize_link(key, name, expires, signature, now)
    connection = store.get(name).connection
    _require_consent_grant(connection)
    state, consent_state = issue_state(key, name, now)
    challenge = code_challenge(code_verifier_for(key, consent_state))
    return authorization_url(
        connection.app, redirect_uri=callback_url, state=state, challenge=challenge, scope=connection.scope
    )


def _check_unused(connection: Connection, state: ConsentState) -> None:
    """Single use: a state is spent once its consent is stored, and older states die with a newer consent."""
    if connection.extra.get(CONSENT_STATE) == state.fingerprint:
        raise InvalidState(
            "this consent was already completed; start again from a new authorize link to re-authorize",
            connection=connection.name,
        )
    authorized = connection.extra.get(AUTHORIZED_AT)
    if isinstance(authorized, str):
        try:
            newer = from_iso(authorized).timestamp() > state.issued_at
        except ValueError:
            newer = False
        if newer:
            raise InvalidState(
                "a newer consent for this connection was completed after this link was issued; nothing changed",
                connection=connection.name,
            )


def describe_denial(error: str) -> str:
    """ServiceNow's error code for the page, only if it is a plain identifier (never reflected raw)."""
    return error if _SAFE.match(error) else "error"


def complete_consent(
    store: ConnectionStore,
    client: ServiceNowClient,
    key: bytes,
    *,
    state: str | None,
    code: str | None,
    error: str | None,
    callback_url: str,
    now: datetime,
) -> StoredConnection:
    """Exchange the code from ServiceNow's redirect and store the tokens (compare-and-swap).

    Raises:
        ConsentError subclasses, ConnectionNotFound, SecretFormatError, ProviderError, ConcurrentUpdate,
        ClientError: all without a write; if the code had already been exchanged, its tokens were revoked.
    """
    if error:
        connection = None
        with suppress(InvalidState):  # name the connection on the page only if the state is genuine
            connection = verify_state(key, state, now).connection
        raise ConsentDenied(
            f"ServiceNow did not authorize the connection ({describe_denial(error)}): the person pressed Deny "
            "or the request was refused. Start again from a new authorize link.",
            connection=connection,
        )
    consent_state = verify_state(key, state, now)
    name = consent_state.connection
    if not code:
        raise InvalidState(
            "ServiceNow's redirect carried no code; start again from a new authorize link", connection=name
        )
    read = store.get(name)
    _require_consent_grant(read.connection)
    _check_unused(read.connection, consent_state)
    token = client.exchange_code(
        read.connection.app,
        code=code,
        redirect_uri=callback_url,
        code_verifier=code_verifier_for(key, consent_state),
    )
    # The code is spent and ServiceNow has issued tokens: from here on, anything that stops them from being
    # stored (a wrong or unverifiable user, a state spent by a second callback in the meantime, a secret
    # that vanished or no longer parses, a write that keeps failing) revokes them, so no live refresh
    # token is left in ServiceNow unknown to the stack; the original error then propagates unchanged.
    replaced: list[str | None] = [None]

    def store_tokens(current: Connection) -> Connection:
        _check_unused(current, consent_state)
        updated = current.with_token(token, grant="authorization_code", now=now)
        extra = {**current.extra, AUTHORIZED_AT: to_iso(now), CONSENT_STATE: consent_state.fingerprint}
        # The store may call this again after a lost race: the last call's base is the value overwritten.
        replaced[0] = current.refresh_token if current.refresh_token != updated.refresh_token else None
        return replace(updated, redirect_uri=callback_url, extra=extra)

    issued = token.refresh_token or token.access_token
    _check_user_or_discard(client, read.connection, token.access_token, issued)
    try:
        stored = store.update(name, store_tokens)
    except (ClientError, BotoCoreError, ConcurrentUpdate) as failure:
        # A failing write can hide one that landed (a stage move whose answer was lost): revoke only what is
        # certainly not stored; if that cannot be told, keep the tokens alive (never a dead secret). A failure
        # before our write (reading the secret) or a race lost every time stored nothing: no need to ask.
        landed = _stored(store, name, token) if isinstance(failure, SecretWriteFailed) else False
        if landed is None:
            raise
        if not landed:
            _discard(client, read.connection, issued)
            raise
        stored = store.get(name)
    except BaseException:
        _discard(client, read.connection, issued)  # a spent state, a vanished or broken secret: never stored
        raise
    if replaced[0]:
        # The consent superseded another refresh token (a re-consent): nobody uses it any more, so revoke it
        # rather than leave it alive in ServiceNow for up to 100 days. Best effort: the consent stands.
        _discard(client, stored.connection, replaced[0])
    return stored


def _check_user_or_discard(client: ServiceNowClient, connection: Connection, access_token: str, issued: str) -> None:
    try:
        _check_user(client, connection, access_token)
    except BaseException:
        _discard(client, connection, issued)
        raise


def _stored(store: ConnectionStore, name: str, token: Token) -> bool | None:
    """Whether AWSCURRENT holds these tokens now; None when Secrets Manager cannot say."""
    try:
        current = store.get(name).connection
    except Exception:
        return None
    return current.access_token == token.access_token or (
        token.refresh_token is not None and current.refresh_token == token.refresh_token
    )


def _check_user(client: ServiceNowClient, connection: Connection, access_token: str) -> None:
    """If `expectedUser` is set, the consent must come from that ServiceNow user."""
    name = connection.name
    expected_user = connection.extra.get("expectedUser")
    if not expected_user:
        return
    try:
        actual = client.current_user(connection.instance_url, access_token)
    except ProviderError as failure:
        raise IdentityUnverified(
            f"could not check which ServiceNow user gave the consent (expectedUser is set): {failure.detail}. "
            "The new tokens were revoked and the existing ones kept; try again with a new authorize link.",
            connection=name,
        ) from None
    if actual != expected_user:
        raise WrongUser(
            f"the consent was given by ServiceNow user {actual!r}, but connection {name!r} expects "
            f"{expected_user!r}; sign in to ServiceNow as {expected_user!r} and use a new authorize link. "
            "The existing tokens were kept.",
            connection=name,
        )


def _discard(client: ServiceNowClient, connection: Connection, token: str) -> None:
    """Best effort and silent: revoke a token nobody will use (a refresh token takes its access tokens along).

    Nothing is logged or raised: a failed revocation must neither replace the error being reported nor fail
    a consent that was stored, and the token itself never reaches a message.
    """
    with suppress(Exception):
        client.revoke(connection.app, token)
