"""Refreshing one connection: the sweep, the SQS worker and rotation share this.

The rules that keep a credential alive: write only with compare-and-swap on the version read; store
a new refresh token in the same write as its access token; before declaring a credential dead,
re-read the secret (someone may just have re-consented); leave the secret untouched on any failure
that a later run can fix.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

from botocore.exceptions import BotoCoreError, ClientError

from core.appflow import AppFlowSync
from core.clock import utc_now
from core.errors import (
    ConcurrentUpdate,
    CredentialRejected,
    InstanceUnavailable,
    KeyUnusable,
    ProviderError,
    TransientProviderError,
)
from core.health import CANDIDATE, Health
from core.jwt_bearer import JwtKey, KmsSigner
from core.lifecycle import Outcome, RefreshPolicy, Result, decide, is_due, needs_person, retry_allowed
from core.secret import Connection
from core.servicenow import ServiceNowClient
from core.store import (
    ConnectionStore,
    SecretWriteFailed,
    StoredConnection,
    adoptable_token,
    error_code,
)
from core.tokens import Token

if TYPE_CHECKING:
    from core.monitor import Monitor

__all__ = ["Outcome", "RefreshPolicy", "Refresher", "request_token"]
NEXT_CLIENT_SECRET = "clientSecretNext"
# The longest one refresh can take (template.yaml states the arithmetic). Its token requests (a retry, a new
# assertion, staged credentials) end within TOKEN_REQUESTS_SECONDS all together, whatever the instance sends
# (`ServiceNowClient.budget`, enforced by each request's deadline); a revocation after a lost race has its own
# 15 s (servicenow.REVOKE_DEADLINE_SECONDS); the compare-and-swap writes and botocore's retries have the rest.
TOKEN_REQUESTS_SECONDS = 45.0
ATTEMPT_WORST_SECONDS = 75.0
START_MARGIN_SECONDS = 20.0  # after the last refresh: queue the rest, report


def time_for_a_refresh(seconds_left: float) -> bool:
    """Whether an invocation with `seconds_left` may start one more refresh (the sweep's and the worker's guard:
    a refresh cut off by the timeout between ServiceNow's answer and the write can lose a rotated token)."""
    return seconds_left >= ATTEMPT_WORST_SECONDS + START_MARGIN_SECONDS


def request_token(
    client: ServiceNowClient,
    connection: Connection,
    *,
    replay: bool = True,
    signer: KmsSigner | None = None,
    now: datetime | None = None,
) -> tuple[Token, str]:
    """The grant this connection refreshes with: refresh_token, password, client_credentials or jwt_bearer.

    `replay=False` (a connection already failing) lets the HTTP layer retry only failed connects; a refresh
    token that rotates is never re-sent either way, since a lost answer may already have spent it. A JWT
    assertion is never re-sent (ServiceNow refuses a reused `jti`): its one retry signs a new one.
    """
    app = connection.app
    if connection.grant_type == "password":
        assert connection.username and connection.password  # parse_connection guarantees both
        token = client.password_grant(
            app, username=connection.username, password=connection.password, scope=connection.scope, replay=replay
        )
        return token, "password"
    if connection.grant_type == "client_credentials":
        return client.client_credentials(app, scope=connection.scope, replay=replay), "client_credentials"
    if connection.grant_type == "jwt_bearer":
        return _jwt_bearer(client, connection, signer, now or utc_now(), replay=replay), "jwt_bearer"
    assert connection.refresh_token  # is_due / needs_person guarantee it
    replay = replay and not connection.rotates_refresh_token
    return client.refresh(app, connection.refresh_token, replay=replay), "refresh_token"


def _jwt_bearer(
    client: ServiceNowClient, connection: Connection, signer: KmsSigner | None, now: datetime, *, replay: bool
) -> Token:
    key, subject = connection.jwt_key, connection.jwt_subject
    assert key is not None and subject  # parse_connection guarantees them
    if signer is None:
        raise InstanceUnavailable(connection.host, "jwt_bearer", "no KMS signer is configured in this function")
    for attempt in range(2 if replay else 1):
        assertion = signer.assertion(connection.client_id, subject, key, now, host=connection.host)
        try:
            return client.jwt_bearer(connection.app, assertion)
        except TransientProviderError:  # a 5xx or a lost answer: sign anew (a 429 ends the attempt, as elsewhere)
            if attempt or not replay:
                raise
    raise AssertionError("unreachable")


def _credential(connection: Connection) -> tuple[Any, ...]:
    return (
        connection.client_id,
        connection.client_secret,
        connection.refresh_token,
        connection.password,
        connection.status,
        connection.extra.get(NEXT_CLIENT_SECRET),
        connection.jwt_subject,
        connection.jwt_key,
        connection.jwt_key_next,
    )


def _same_credential(a: Connection, b: Connection) -> bool:
    """Whether a re-read secret still holds the credential that was just refused (a newly staged
    `clientSecretNext` counts as a change: it deserves its own try)."""
    return _credential(a) == _credential(b)


def _expiring(connection: Connection, now: datetime, policy: RefreshPolicy) -> bool:
    expires = connection.refresh_token_expires_at
    return (
        connection.grant_type == "authorization_code"
        and expires is not None
        and expires - now <= policy.refresh_warning
    )


class Refresher:
    """Refreshes connections through injected collaborators (moto and the emulator in tests)."""

    def __init__(
        self,
        store: ConnectionStore,
        client: ServiceNowClient,
        *,
        clock: Callable[[], datetime],
        policy: RefreshPolicy | None = None,
        appflow: AppFlowSync | None = None,
        monitor: Monitor | None = None,
        signer: KmsSigner | None = None,
    ) -> None:
        self.store = store
        if store.superseded is None:
            store.superseded = self._revoke_superseded  # the store has no ServiceNow client: revoking is ours
        self.signer = signer
        self.appflow = appflow
        self.monitor = monitor
        self.client = client
        self.clock = clock
        self.policy = policy or RefreshPolicy()

    def _sync_appflow(self, stored: StoredConnection, force: bool = False) -> dict[str, tuple[str, ...]]:
        """Push tokens to the connection's AppFlow profiles; failures are reported, never raised."""
        if self.appflow is None or not (
            force or self.appflow.needs_sync(stored.connection, stored.version_id, stored.tags)
        ):
            return {}
        results = self.appflow.sync(stored.connection, stored.version_id, stored.arn)
        return {
            "appflow_synced": tuple(r.profile for r in results if r.error is None),
            "appflow_failed": tuple(f"{r.profile} ({r.error})" for r in results if r.error is not None),
        }

    def done(
        self,
        connection: Connection,
        result: Result,
        now: datetime,
        *,
        at: StoredConnection | None = None,
        **kwargs: Any,
    ) -> Outcome:
        """The outcome `result` for `connection` as read `at` a version, with what its report and health show."""
        return Outcome(
            connection.name,
            result,
            access_token_expires_at=connection.access_token_expires_at,
            refresh_token_expires_at=connection.refresh_token_expires_at,
            refresh_token_expiring=_expiring(connection, now, self.policy),
            arn=at.arn if at else None,
            version_id=at.version_id if at else None,
            status=connection.status,
            instance=connection.host,
            grant=connection.grant_type,
            needs_person=needs_person(connection),
            **kwargs,
        )

    def refresh(self, read: StoredConnection, *, force: bool = False) -> Outcome:
        """Refresh one connection if it is due (or `force`d), never losing what the secret holds;
        then record its health and announce any change (when a monitor is configured)."""
        with self.client.budget(TOKEN_REQUESTS_SECONDS):
            outcome = self._refresh(read, force)
        if self.monitor is not None:
            outcome = self.monitor.observe(read, outcome)
        return outcome

    def safe_refresh(self, read: StoredConnection) -> Outcome:
        """`refresh`, with anything unexpected (an AWS call that timed out mid-way) recorded as a transient failure
        that backs off like any other, instead of raised (the sweep's other connections, the worker's batch)."""
        try:
            return self.refresh(read)
        except Exception as error:  # one broken connection must never stop the others
            failed = self.done(
                read.connection, "failed", self.clock(), at=read, failure="transient", detail=type(error).__name__
            )
            try:
                return self.observe(read, failed)  # recorded, so it backs off like any other failure
            except Exception:
                return failed

    def observe(self, read: StoredConnection, outcome: Outcome) -> Outcome:
        """Record an outcome produced outside `refresh` (rotation) in the connection's health and events."""
        return self.monitor.observe(read, outcome) if self.monitor is not None else outcome

    def _health(self, read: StoredConnection) -> Health | None:
        """The health the read's tags record, or what a failed tag write left in the monitor's memory."""
        if read.tags is None:
            return None
        if self.monitor is None or read.arn is None:
            return Health.from_tags(read.tags)
        return Health.from_tags(self.monitor.recall(read.arn, read.tags))

    def _refresh(self, read: StoredConnection, force: bool) -> Outcome:
        now = self.clock()
        connection = read.connection
        health = self._health(read)
        action = decide(connection, read.version_id, health, now, self.policy, force=force)
        if action == "needs_person":
            return self.done(connection, "needs_person", now, at=read)
        if action == "backing_off":
            return self.done(connection, "backing_off", now, at=read)
        if action == "not_due":
            # Not due, but a push to AppFlow may still be owed from an earlier run.
            return self.done(connection, "not_due", now, at=read, **self._sync_appflow(read))
        health = health or Health()
        try:
            token, grant = request_token(
                self.client, connection, replay=retry_allowed(health), signer=self.signer, now=now
            )
        except CredentialRejected as error:
            unusable: list[str] = []
            return self._try_staged(read, unusable) or self.mark_rejected(read, error, also=unusable)
        except ProviderError as error:
            return self._failed(read, error, now)
        return self._store_token(read, token, grant, now)

    def _failed(self, read: StoredConnection, error: ProviderError, now: datetime) -> Outcome:
        """Unavailable, rate limited or transient: the stored token stays; a later run retries."""
        connection = read.connection
        unseen = (
            isinstance(error, TransientProviderError)
            and error.maybe_processed
            and connection.grant_type == "authorization_code"
            and bool(connection.rotates_refresh_token)
        )
        detail = str(error)
        if unseen:
            detail += "; ServiceNow may have rotated the refresh token in the lost answer"
        retry_after = getattr(error, "retry_after", None)
        return self.done(
            connection,
            "failed",
            now,
            at=read,
            failure=error.kind,
            detail=detail,
            retry_after=retry_after,
            rotation_unseen=unseen,
        )

    def promote_staged_key(self, read: StoredConnection) -> Outcome | None:
        """The end of a JWT key rollover on the operator's word: a token from an assertion signed by the staged
        key, stored in the same write that makes it the current key. None when ServiceNow refuses the staged key
        (it does not trust it yet): nothing is written."""
        staged_key = read.connection.jwt_key_next if read.connection.grant_type == "jwt_bearer" else None
        if staged_key is None:
            return None
        return self._try_promoted(read, ("jwt_key",), None, staged_key)

    def _try_staged(self, read: StoredConnection, unusable: list[str]) -> Outcome | None:
        """Rollover without downtime: on a refusal, try what the operator staged once - the next client secret
        (`clientSecretNext`), the next JWT signing key (`jwtKeyIdNext` + `kmsKeyIdNext`), then both together;
        if ServiceNow takes it, promote it in the same write that stores the new tokens. A staged key KMS cannot
        sign with is noted in `unusable` and the refusal stands: were it a failure that backs off, every attempt
        would spend the refused requests again (2 of them, 54 a day) and the refusal would never be marked."""
        connection = read.connection
        staged = connection.extra.get(NEXT_CLIENT_SECRET)
        staged_key = connection.jwt_key_next if connection.grant_type == "jwt_bearer" else None
        rollovers: list[tuple[str, ...]] = []
        if isinstance(staged, str) and staged and staged != connection.client_secret:
            rollovers.append(("client_secret",))
        if staged_key is not None and staged_key != connection.jwt_key:
            rollovers.append(("jwt_key",))
        if len(rollovers) == 2:
            rollovers.append(("client_secret", "jwt_key"))
        for parts in rollovers:
            if "jwt_key" in parts and unusable:
                continue  # the staged key cannot sign: no request with it
            try:
                outcome = self._try_promoted(read, parts, staged, staged_key)
            except KeyUnusable as error:
                unusable.append(f"the staged signing key cannot be used either ({error.detail})")
                continue
            if outcome is not None:
                return outcome
        return None

    def _try_promoted(
        self, read: StoredConnection, parts: tuple[str, ...], staged: Any, staged_key: JwtKey | None
    ) -> Outcome | None:
        promoted: dict[str, bool] = {}

        def promote(current: Connection) -> Connection:
            # Applied to each value a write builds on: what the operator staged meanwhile is left alone.
            promoted.clear()
            if "client_secret" in parts:
                promoted["client_secret"] = current.extra.get(NEXT_CLIENT_SECRET) == staged
                if promoted["client_secret"]:
                    extra = {key: value for key, value in current.extra.items() if key != NEXT_CLIENT_SECRET}
                    current = replace(current, client_secret=staged, extra=extra)
            if "jwt_key" in parts and staged_key is not None:
                promoted["jwt_key"] = current.jwt_key_next == staged_key
                if promoted["jwt_key"]:
                    current = replace(
                        current,
                        jwt_key_id=staged_key.key_id,
                        kms_key_id=staged_key.kms_key_id,
                        jwt_key_id_next=None,
                        kms_key_id_next=None,
                    )
            return current

        now = self.clock()
        try:
            token, grant = request_token(
                self.client, promote(read.connection), replay=False, signer=self.signer, now=now
            )
        except CredentialRejected:
            return None  # the staged credential is not live either: the refusal stands
        except KeyUnusable:
            raise  # the staged key cannot sign: `_try_staged` notes it, the refusal stands
        except ProviderError as failure:
            return self._failed(read, failure, now)
        outcome = self._store_token(read, token, grant, now, adjust=promote)
        if outcome.result != "refreshed":
            return outcome
        # Announced only what the stored value really took up (not what was staged again meanwhile).
        return replace(
            outcome,
            client_secret_promoted=promoted.get("client_secret", False),
            jwt_key_promoted=promoted.get("jwt_key", False),
        )

    def _store_token(
        self,
        read: StoredConnection,
        token: Token,
        grant: str,
        now: datetime,
        *,
        adjust: Callable[[Connection], Connection] = lambda connection: connection,
        **flags: Any,
    ) -> Outcome:
        """Write the new tokens onto the freshest value; never leave a new refresh token only in memory.

        Each attempt is a compare-and-swap whose version id names its base, so a stage move that fails
        leaves a candidate the next run adopts. After a lost race: if the winner still holds the refresh
        token this refresh spent, ours supersede it (in rotating mode it is dead) and are written onto the
        winner's value; if the winner stored other tokens (a consent), ours are revoked, not left alive.
        """
        spent = read.connection.refresh_token
        new_refresh = token.refresh_token is not None and token.refresh_token != spent
        for _ in range(5):
            new = adjust(read.connection).with_token(token, grant=grant, now=now)
            try:
                token_id = adoptable_token(read.version_id, spent)
                written = self.store.compare_and_swap(read, new, request_token=token_id, label=CANDIDATE)
            except ConcurrentUpdate:
                read = self.store.get_latest(read.connection.name)
                stored = read.connection.refresh_token
                if new_refresh and stored == token.refresh_token:
                    # Our candidate was taken up by the re-read (written onto the winner's value): stored.
                    return self.done(
                        read.connection, "refreshed", now, at=read, detail="written onto a concurrent change"
                    )
                if new_refresh and stored == spent:
                    continue  # the winner kept the token we spent: ours supersede it
                if new_refresh:
                    self._discard(read.connection, token)
                if not is_due(read.connection, now, self.policy.leeway):
                    return self.done(read.connection, "not_due", now, at=read, detail="updated concurrently")
                if new_refresh:
                    return self.done(read.connection, "failed", now, at=read, failure="transient", detail="raced")
                continue
            except SecretWriteFailed as error:
                code = error_code(error)
                lost = new_refresh and not error.staged and grant == "refresh_token"
                detail = f"secret write failed ({code})"
                if error.staged:
                    detail += "; the new tokens wait in a candidate version the next run adopts"
                elif lost:
                    detail += "; the refresh token ServiceNow rotated could not be stored anywhere"
                return self.done(
                    read.connection,
                    "write_failed",
                    now,
                    at=read,
                    failure="transient",
                    detail=detail,
                    rotation_unseen=lost,
                )
            appflow = self._sync_appflow(written, force=True)
            return self.done(written.connection, "refreshed", now, at=written, **appflow, **flags)
        return self.done(read.connection, "failed", now, at=read, failure="transient", detail="kept losing write races")

    def _discard(self, connection: Connection, token: Token) -> None:
        """Best effort: revoke tokens nobody will store, so no live refresh token is left unknown."""
        secret = token.refresh_token or token.access_token
        with suppress(ProviderError):
            self.client.revoke(connection.app, secret)

    def _revoke_superseded(self, current: Connection, dropped: Connection) -> None:
        """A candidate's tokens that lost to newer ones (a consent): revoked, so no live refresh token is left
        unknown (best effort, with the freshest client credentials for the same client)."""
        app = current.app if current.client_id == dropped.client_id else dropped.app
        with suppress(ProviderError):
            self.client.revoke(app, dropped.refresh_token or "")

    def mark_rejected(self, read: StoredConnection, error: CredentialRejected, *, also: Sequence[str] = ()) -> Outcome:
        """Mark `reauthorization_required` only if the refused credential is still the current one."""
        now = self.clock()
        health = self._health(read) or Health()
        detail = "; ".join([str(error), *also])
        if health.rotation_unseen:
            detail += (
                " - expected: an earlier refresh's answer was lost (or its write failed) after ServiceNow "
                "rotated the refresh token, so the stored one is dead; re-authorize (make authorize-url)"
            )

        def already_refused(fresh: StoredConnection) -> Outcome:
            return self.done(
                fresh.connection, "reauthorization_required", now, at=fresh, failure="rejected", detail=detail
            )

        for _ in range(3):
            fresh = self.store.get_latest(read.connection.name)
            if not _same_credential(fresh.connection, read.connection):
                changed = "credential changed while refreshing"
                return self.done(fresh.connection, "not_due", now, at=fresh, detail=changed)
            if fresh.connection.status == "reauthorization_required" and fresh.connection.marked_version == (
                fresh.version_id
            ):
                return already_refused(fresh)  # another run (an overlapping sweep, another container) marked it
            # The write names itself (its VersionId is chosen here), so the document alone says this version
            # was refused even if the health tags are never written (lifecycle.decide).
            version = str(uuid.uuid4())
            marked = replace(
                fresh.connection, status="reauthorization_required", marked_version=version, updated_at=now
            )
            try:
                written = self.store.compare_and_swap(fresh, marked, request_token=version)
                return self.done(marked, "reauthorization_required", now, at=written, failure="rejected", detail=detail)
            except ConcurrentUpdate:
                continue
            except (ClientError, BotoCoreError):
                if fresh.connection.status == "reauthorization_required":
                    # Already marked (an operator's fix that ServiceNow refused too): the tags record the
                    # refusal of this version, so it waits for the next change instead of backing off.
                    return already_refused(fresh)
                break
        return self.done(read.connection, "failed", now, at=read, failure="rejected", detail=detail)
