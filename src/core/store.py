"""Reads and writes connection secrets in Secrets Manager, with a compare-and-swap write.

A plain `PutSecretValue` moves AWSCURRENT unconditionally, so two writers would silently overwrite
each other. Instead a write puts the new version under a private staging label, then moves
AWSCURRENT with `UpdateSecretVersionStage(RemoveFromVersionId=<the version we read>)`, which
Secrets Manager refuses when AWSCURRENT has moved on. The loser's version is left unlabelled and
expires; the winner's value is never touched. The old version keeps AWSPREVIOUS.
"""

from __future__ import annotations

import hashlib
import re
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import suppress
from dataclasses import dataclass, replace
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from core.errors import ConcurrentUpdate, ConnectionNotFound, InvalidName, SecretFormatError
from core.health import CANDIDATE, WRITING
from core.secret import Connection, parse_connection

AWSCURRENT = "AWSCURRENT"
AWSPREVIOUS = "AWSPREVIOUS"
AWSPENDING = "AWSPENDING"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class StoredConnection:
    """A connection together with the version it was read from: the base of a compare-and-swap."""

    connection: Connection
    version_id: str
    arn: str
    tags: Mapping[str, str] | None = None  # from a listing; None when read without one


class SecretWriteFailed(ClientError):  # type: ignore[misc]
    """A compare-and-swap that kept failing on AWS's side; `staged` says whether the new value was at least
    stored as a candidate version (which the next run adopts, if it was built by `adoptable_token`)."""

    def __init__(self, error: ClientError, *, staged: bool) -> None:
        super().__init__(error.response, error.operation_name)
        self.staged = staged


def as_client_error(error: ClientError | BotoCoreError) -> ClientError:
    """A timeout, reset or endpoint failure (botocore raises them outside ClientError) as a ClientError whose code
    is the error's class name, so callers handle every AWS-side failure in one place."""
    if isinstance(error, ClientError):
        return error
    return ClientError({"Error": {"Code": type(error).__name__, "Message": str(error)}}, "SecretsManager")


def error_code(error: ClientError | BotoCoreError) -> str:
    return str(as_client_error(error).response.get("Error", {}).get("Code", "ClientError"))


def adoptable_token(base_version: str, spent_refresh_token: str | None = None) -> str:
    """A version id (58 characters; Secrets Manager allows 64) naming the version the candidate was built on
    and the refresh token its refresh spent (truncated SHA-256 marks, never the token), so a later run can
    tell, without any other record, that the candidate supersedes the current value: adopt it when built on
    the current version, or rebase its tokens onto a newer value that still holds the spent refresh token."""
    return f"{_mark(base_version)}-{_mark(spent_refresh_token or '')}-{uuid.uuid4().hex[:24]}"


def _mark(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()[:16]


def _candidate_marks(candidate: str) -> tuple[str, str] | None:
    """(base mark, spent-token mark) of a candidate version id built by `adoptable_token`, else None."""
    parts = candidate.split("-")
    if len(parts) == 3 and len(parts[0]) == len(parts[1]) == 16:
        return parts[0], parts[1]
    if len(parts) == 2 and len(parts[0]) == 24:  # the earlier format: base mark only (24 hex)
        return parts[0][:16], ""
    return None


def with_tokens_of(base: Connection, source: Connection) -> Connection:
    """`base` with the tokens (and what describes them) of `source`: everything else stays `base`'s."""
    return replace(
        base,
        access_token=source.access_token,
        refresh_token=source.refresh_token,
        token_type=source.token_type,
        access_token_expires_at=source.access_token_expires_at,
        refresh_token_expires_at=source.refresh_token_expires_at,
        rotates_refresh_token=source.rotates_refresh_token or base.rotates_refresh_token,
        status=source.status,
        marked_version=source.marked_version,
        updated_at=source.updated_at,
    )


def validate_name(name: str) -> str:
    """Connection names become secret names and URL path segments: keep them boring."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise InvalidName(
            "a connection name must be 1-64 characters of letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


class ConnectionStore:
    """All Secrets Manager access for connection secrets; the client is injected (moto in tests)."""

    def __init__(
        self,
        client: Any,
        *,
        prefix: str,
        allowed_hosts: Iterable[str],
        write_attempts: int = 4,
        write_backoff_seconds: float = 0.5,
        sleep: Callable[[float], None] = time.sleep,
        superseded: Callable[[Connection, Connection], None] | None = None,
    ) -> None:
        self.client = client
        # Called with (current, dropped) for a candidate cleared because newer tokens were stored meanwhile (a
        # consent won the race): its refresh token may be live in ServiceNow, so the refresher revokes it.
        self.superseded = superseded
        self.prefix = prefix
        self.allowed_hosts = tuple(allowed_hosts)
        self.write_attempts = write_attempts
        self.write_backoff_seconds = write_backoff_seconds
        self._sleep = sleep

    def secret_id(self, name: str) -> str:
        return f"{self.prefix}{validate_name(name)}"

    def name_of(self, secret_name: str) -> str | None:
        """The connection name for a secret name under the prefix, or None for anything else."""
        if not secret_name.startswith(self.prefix):
            return None
        name = secret_name[len(self.prefix) :]
        return name if NAME_PATTERN.match(name) else None

    def listing(self, page_size: int = 100) -> Iterator[dict[str, Any]]:
        """Every secret under the prefix from ListSecrets (100 per page, tags and stages included, no value);
        planned deletions are not listed."""
        paginator = self.client.get_paginator("list_secrets")
        pages = paginator.paginate(
            Filters=[{"Key": "name", "Values": [self.prefix]}], PaginationConfig={"PageSize": page_size}
        )
        for page in pages:
            for entry in page.get("SecretList", []):
                if self.name_of(entry["Name"]):
                    yield entry

    def parse(
        self, name: str, secret_string: str, version_id: str, arn: str, tags: Mapping[str, str] | None = None
    ) -> StoredConnection:
        return StoredConnection(parse_connection(name, secret_string, self.allowed_hosts), version_id, arn, tags)

    def get(self, name: str, *, version_stage: str = AWSCURRENT) -> StoredConnection:
        """Read and validate one connection.

        Raises:
            ConnectionNotFound: no such secret (or it is scheduled for deletion).
            SecretFormatError: the value is not a valid connection document.
        """
        secret_id = self.secret_id(name)
        try:
            answer = self.client.get_secret_value(SecretId=secret_id, VersionStage=version_stage)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("ResourceNotFoundException", "InvalidRequestException"):
                raise ConnectionNotFound(name, secret_id) from None
            raise
        if "SecretString" not in answer:
            raise SecretFormatError(name, "(document)", "must be a SecretString, not binary")
        return self.parse(name, answer["SecretString"], answer["VersionId"], answer["ARN"])

    def create(
        self,
        connection: Connection,
        *,
        description: str | None = None,
        kms_key_id: str | None = None,
        tags: Mapping[str, str] | None = None,
        replicas: Mapping[str, str | None] | None = None,
    ) -> StoredConnection:
        """Create the secret for a new connection (fails if it exists: never overwrite by accident), replicated
        to `replicas` (region -> its KMS key, None for that region's AWS managed key): read-only copies that
        Secrets Manager keeps in step; only this primary is ever written."""
        token = str(uuid.uuid4())
        kwargs: dict[str, Any] = {
            "Name": self.secret_id(connection.name),
            "ClientRequestToken": token,
            "SecretString": connection.to_json(),
            "Description": description or f"ServiceNow OAuth connection {connection.name} ({connection.host})",
        }
        if kms_key_id:
            kwargs["KmsKeyId"] = kms_key_id
        if tags:
            kwargs["Tags"] = [{"Key": key, "Value": value} for key, value in tags.items()]
        if replicas:
            kwargs["AddReplicaRegions"] = [
                {"Region": region, **({"KmsKeyId": key} if key else {})} for region, key in replicas.items()
            ]
        answer = self.client.create_secret(**kwargs)
        return StoredConnection(connection, answer["VersionId"], answer["ARN"])

    def compare_and_swap(
        self, read: StoredConnection, new: Connection, *, request_token: str | None = None, label: str = WRITING
    ) -> StoredConnection:
        """Make `new` the current value only if AWSCURRENT is still the version `read` came from.

        `label` stages the new version until it is promoted: CANDIDATE only for a refresh's tokens (built by
        `adoptable_token`: the next run adopts them if the stage move fails), WRITING for everyone else.

        An AWS-side failure (throttling beyond boto3's own retries, a 5xx) is retried with backoff; every
        attempt uses the same `request_token`, which becomes the VersionId, so retries are idempotent.

        Raises:
            ConcurrentUpdate: someone else wrote first; their value stays current.
            SecretWriteFailed: the write kept failing; nothing was promoted.
        """
        token = request_token or str(uuid.uuid4())
        staged = False
        for attempt in range(self.write_attempts):
            try:
                if not staged:
                    self.client.put_secret_value(
                        SecretId=read.arn,
                        ClientRequestToken=token,
                        SecretString=new.to_json(),
                        VersionStages=[label],
                    )
                    staged = True
                written = self._promote(read, new, token)
                if label != CANDIDATE:
                    self._retire_candidate(read)
                return written
            except BotoCoreError as failure:
                # A timeout or a reset that botocore already retried (standard mode does, 6 attempts): another
                # round here would multiply the wait (4 x 6 calls). Reported as a failed write (alarmed); if the put
                # landed unseen, its version is a candidate the next run adopts (its id names its base).
                raise SecretWriteFailed(as_client_error(failure), staged=staged) from None
            except ClientError as failure:
                if attempt == self.write_attempts - 1:
                    raise SecretWriteFailed(failure, staged=staged) from None
            self._sleep(self.write_backoff_seconds * 2**attempt)
        raise AssertionError("unreachable")

    def _retire_candidate(self, read: StoredConnection) -> None:
        """Take CANDIDATE off the version just replaced, where a refresh's promoted candidate leaves it (a refresh's
        own put moves it on; this write's did not): left there, it would look like tokens waiting to be adopted,
        and be rebased over this write. Conditional on the label being on that very version, so a newer candidate
        still waiting elsewhere keeps it. Best effort: one call, only for the writes that are not refreshes."""
        with suppress(ClientError, BotoCoreError):
            self._clear_candidate(read, read.version_id)

    def _promote(self, read: StoredConnection, new: Connection, token: str) -> StoredConnection:
        """Move AWSCURRENT from the version read to the candidate: refused if AWSCURRENT moved meanwhile."""
        try:
            self.client.update_secret_version_stage(
                SecretId=read.arn, VersionStage=AWSCURRENT, MoveToVersionId=token, RemoveFromVersionId=read.version_id
            )
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "InvalidParameterException":
                if self._current_version(read.arn) == token:
                    # A retried call whose first attempt already promoted this very version (or a run adopted it).
                    return StoredConnection(new, token, read.arn)
                raise ConcurrentUpdate(new.name) from None
            raise
        return StoredConnection(new, token, read.arn)

    def _current_version(self, secret_id: str) -> str | None:
        stages = self.client.describe_secret(SecretId=secret_id).get("VersionIdsToStages", {})
        return next((version for version, labels in stages.items() if AWSCURRENT in labels), None)

    def get_latest(self, name: str) -> StoredConnection:
        """`get`, then adopt a candidate version a failed write left behind (one DescribeSecret more, which
        also brings the health tags)."""
        read = self.get(name)
        described = self.client.describe_secret(SecretId=read.arn)
        tags = {tag["Key"]: tag["Value"] for tag in described.get("Tags", [])}
        read = StoredConnection(read.connection, read.version_id, read.arn, tags)
        return self.adopt(read, described.get("VersionIdsToStages", {}))

    def adopt(self, read: StoredConnection, stages: Mapping[str, Any]) -> StoredConnection:
        """Take up the tokens a refresh whose stage move failed left in a candidate version (in rotating mode
        the only copy of the live refresh token): promote the candidate if it was built on `read`; if a newer
        value was written meanwhile that still holds the refresh token the candidate's refresh spent (an
        operator's change made without adopting), write the candidate's tokens onto it; clear any other.

        Returns the connection as it now stands: with the candidate's tokens, or `read` itself.
        """
        candidate = next((v for v, labels in stages.items() if CANDIDATE in labels), None)
        if candidate is None or candidate == read.version_id:
            return read
        name = read.connection.name
        marks = _candidate_marks(candidate)
        built_on_read = marks is not None and marks[0] == _mark(read.version_id)
        spent = read.connection.refresh_token
        rebase = marks is not None and not built_on_read and spent is not None and marks[1] == _mark(spent)
        current = next((version for version, labels in stages.items() if AWSCURRENT in labels), None)
        if not built_on_read and current is not None and current != read.version_id:
            # The value read and the stages disagree (one is stale: a write landed between the two reads, say a
            # sweep's listing before a mark and its read after it). The candidate may be built on the newer value
            # and about to be promoted, or spent and look waiting: neither cleared, revoked nor rebased on such a
            # view; the next run decides. (Promoting one built on the value read is a compare-and-swap on it.)
            return read
        if not (built_on_read or rebase):
            # Built on an older value whose tokens were superseded (a lost race, a consent): never over newer data.
            if self.superseded is not None:
                self._drop(read, candidate, self.superseded)
            self._clear_candidate(read, candidate)
            return read
        adopted = self._version(read, candidate)
        if rebase and AWSPREVIOUS in stages[candidate] and adopted.refresh_token == spent:
            # Promoted once, then replaced by a write that did not move the label on (its retire was lost), and it
            # holds no refresh token the current value lacks: spent. Rebased, its older access token and status
            # would undo that write (in default mode over a mark: the refused credential asked again). One that
            # holds a rotated token the current value lacks (a console save of an older value) is rebased.
            self._clear_candidate(read, candidate)
            return read
        try:
            if built_on_read:
                return self._promote(read, adopted, candidate)
            rebased = with_tokens_of(read.connection, adopted)
            return self.compare_and_swap(
                read, rebased, request_token=adoptable_token(read.version_id, spent), label=CANDIDATE
            )
        except ConcurrentUpdate:
            return self.get_latest(name)

    def _clear_candidate(self, read: StoredConnection, candidate: str) -> None:
        """Take CANDIDATE off `candidate` (refused if the label is not on that very version)."""
        self.client.update_secret_version_stage(
            SecretId=read.arn, VersionStage=CANDIDATE, RemoveFromVersionId=candidate
        )

    def _version(self, read: StoredConnection, version_id: str) -> Connection:
        """The connection as one version of `read`'s secret holds it (a candidate)."""
        answer = self.client.get_secret_value(SecretId=read.arn, VersionId=version_id)
        return self.parse(read.connection.name, answer["SecretString"], version_id, read.arn, read.tags).connection

    def _drop(
        self, read: StoredConnection, candidate: str, superseded: Callable[[Connection, Connection], None]
    ) -> None:
        """Hand a superseded candidate's tokens to `superseded` (best effort: unreadable, it is cleared anyway; a
        revocation ServiceNow cannot take leaves the token live until it expires, the README's documented limit).

        Only a refresh's candidate (its id carries the marks): a version without them is an earlier writer's
        whose stage move is still under way. And never a token AWSCURRENT holds now (read again: it may have moved
        since `read`)."""
        if _candidate_marks(candidate) is None:
            return
        try:
            dropped = self._version(read, candidate)
            if dropped.refresh_token in (None, read.connection.refresh_token):
                return
            now_stored = self.get(read.connection.name).connection
        except (ClientError, BotoCoreError, SecretFormatError, ConnectionNotFound):
            return
        if dropped.refresh_token != now_stored.refresh_token:
            superseded(now_stored, dropped)

    def update(self, name: str, change: Any, *, attempts: int = 3) -> StoredConnection:
        """Read, apply `change(connection) -> connection`, and compare-and-swap; re-read on a lost race.

        `change` sees the freshest value each time, so a concurrent writer's update is built on, not lost.
        """
        for attempt in range(attempts):
            read = self.get_latest(name)  # a candidate's tokens first: a change must never drop them
            new = change(read.connection)
            try:
                return self.compare_and_swap(read, new)
            except ConcurrentUpdate:
                if attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")
