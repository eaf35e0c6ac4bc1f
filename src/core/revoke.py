"""Retiring a connection's tokens: revoke them in ServiceNow, then clear them from the secret."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime

from core.errors import ConcurrentUpdate
from core.servicenow import ServiceNowClient
from core.store import ConnectionStore, StoredConnection


def revoke_connection(store: ConnectionStore, client: ServiceNowClient, name: str, now: datetime) -> StoredConnection:
    """Revoke the refresh and access tokens at ServiceNow, then store the connection without them.

    ServiceNow is asked first: if it cannot be reached the secret keeps its tokens (nothing is lost
    and the operator can retry), and the tokens are only cleared once they are dead. The clearing write is a
    compare-and-swap on the very version whose tokens were revoked: if another writer stored new tokens
    meanwhile (a refresh that rotated the refresh token, a consent), they are revoked in turn before they are
    cleared, so no live token is left stored nowhere.

    Raises:
        ProviderError: ServiceNow refused or could not be reached; the secret is unchanged.
        ConcurrentUpdate: the secret kept changing under the revoke; run it again.
    """
    for attempt in range(3):
        read = store.get_latest(name)  # a candidate's live refresh token is revoked too, never left behind
        for token in (read.connection.refresh_token, read.connection.access_token):
            if token:
                client.revoke(read.connection.app, token)
        cleared = replace(
            read.connection,
            access_token=None,
            refresh_token=None,
            token_type=None,
            access_token_expires_at=None,
            refresh_token_expires_at=None,
            status="reauthorization_required",
            updated_at=now,
        )
        try:
            return store.compare_and_swap(read, cleared)
        except ConcurrentUpdate:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")
