"""Reads and writes connection secrets in Secrets Manager, with a compare-and-swap write.

A plain `PutSecretValue` moves AWSCURRENT unconditionally, so two writers would silently overwrite
each other. Instead a write puts the new version under a private staging label, then moves
AWSCURRENT with `UpdateSecretVersionStage(RemoveFromVersionId=<the version we read>)`, which
Secrets Manager refuses when AWSCURRENT has moved on. The loser's version is left unlabelled and
expires; the winner's value is never touched. The old version keeps AWSPREVIOUS.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import ClientError

from core.errors import ConcurrentUpdate, ConnectionNotFound, InvalidName, SecretFormatError
from core.secret import Connection, parse_connection

AWSCURRENT = "AWSCURRENT"
AWSPREVIOUS = "AWSPREVIOUS"
AWSPENDING = "AWSPENDING"
# Label for a version written but not yet promoted; distinct from AWSPENDING, which rotation owns.
CANDIDATE = "SNOWCANDIDATE"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class StoredConnection:
    """A connection together with the version it was read from: the base of a compare-and-swap."""

    connection: Connection
    version_id: str
    arn: str
    tags: Mapping[str, str] | None = None  # from a listing; None when read without one


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
    ) -> None:
        self.client = client
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
    ) -> StoredConnection:
        """Create the secret for a new connection (fails if it exists: never overwrite by accident)."""
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
        answer = self.client.create_secret(**kwargs)
        return StoredConnection(connection, answer["VersionId"], answer["ARN"])

    def compare_and_swap(
        self, read: StoredConnection, new: Connection, *, request_token: str | None = None
    ) -> StoredConnection:
        """Make `new` the current value only if AWSCURRENT is still the version `read` came from.

        An AWS-side failure (throttling beyond boto3's own retries, a 5xx) is retried with backoff; every
        attempt uses the same `request_token`, which becomes the VersionId, so retries are idempotent.

        Raises:
            ConcurrentUpdate: someone else wrote first; their value stays current.
            ClientError: the write kept failing; nothing was promoted.
        """
        token = request_token or str(uuid.uuid4())
        for attempt in range(self.write_attempts):
            try:
                return self._compare_and_swap_once(read, new, token)
            except ClientError:
                if attempt == self.write_attempts - 1:
                    raise
                self._sleep(self.write_backoff_seconds * 2**attempt)
        raise AssertionError("unreachable")

    def _compare_and_swap_once(self, read: StoredConnection, new: Connection, token: str) -> StoredConnection:
        secret_id = read.arn
        self.client.put_secret_value(
            SecretId=secret_id, ClientRequestToken=token, SecretString=new.to_json(), VersionStages=[CANDIDATE]
        )
        try:
            self.client.update_secret_version_stage(
                SecretId=secret_id, VersionStage=AWSCURRENT, MoveToVersionId=token, RemoveFromVersionId=read.version_id
            )
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "InvalidParameterException":
                if self._current_version(secret_id) == token:
                    # A retried call whose first attempt already promoted this very version.
                    return StoredConnection(new, token, read.arn)
                raise ConcurrentUpdate(new.name) from None
            raise
        return StoredConnection(new, token, read.arn)

    def _current_version(self, secret_id: str) -> str | None:
        stages = self.client.describe_secret(SecretId=secret_id).get("VersionIdsToStages", {})
        return next((version for version, labels in stages.items() if AWSCURRENT in labels), None)

    def update(self, name: str, change: Any, *, attempts: int = 3) -> StoredConnection:
        """Read, apply `change(connection) -> connection`, and compare-and-swap; re-read on a lost race.

        `change` sees the freshest value each time, so a concurrent writer's update is built on, not lost.
        """
        for attempt in range(attempts):
            read = self.get(name)
            new = change(read.connection)
            try:
                return self.compare_and_swap(read, new)
            except ConcurrentUpdate:
                if attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")
