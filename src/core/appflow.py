"""Pushes a connection's current tokens into the AWS AppFlow connector profiles it names.

AppFlow keeps connector credentials in its own `appflow!…` secret and cannot read ours, so after
every token change the profile is updated with `UpdateConnectorProfile`. A failed push never undoes
the secret write: the secret is the source of truth, and the next sweep pushes again (the last
pushed version is remembered in a secret tag, which adds no secret version).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from core.secret import Connection

PROFILES_KEY = "appflowConnectorProfiles"
SYNCED_TAG = "servicenow-oauth:appflow-synced-version"
_PROFILE_NAME = re.compile(r"^[\w/!@#+=.-]{1,256}$")


def profile_names(connection: Connection) -> tuple[str, ...]:
    """The connector profiles a connection feeds; malformed entries are ignored rather than sent."""
    names = connection.extra.get(PROFILES_KEY) or []
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, list):
        return ()
    return tuple(name for name in names if isinstance(name, str) and _PROFILE_NAME.match(name))


def update_request(connection: Connection, profile: str, version_id: str) -> dict[str, Any]:
    """The UpdateConnectorProfile request for one profile (pure; tests check it against the service model).

    `clientToken` is derived from the secret version and the profile, so a retried push of the same
    tokens is idempotent and a push of new tokens is not mistaken for a retry.
    """
    credentials = {"clientId": connection.client_id, "clientSecret": connection.client_secret}
    if connection.access_token:
        credentials["accessToken"] = connection.access_token
    if connection.refresh_token:
        credentials["refreshToken"] = connection.refresh_token
    return {
        "connectorProfileName": profile,
        "connectionMode": "Public",
        "connectorProfileConfig": {
            "connectorProfileProperties": {"ServiceNow": {"instanceUrl": connection.instance_url}},
            "connectorProfileCredentials": {"ServiceNow": {"oAuth2Credentials": credentials}},
        },
        "clientToken": str(uuid.uuid5(uuid.NAMESPACE_URL, f"servicenow-oauth:{version_id}:{profile}")),
    }


@dataclass(frozen=True)
class SyncResult:
    """Per profile: None when pushed, else the AWS error code (never a message, which could echo input)."""

    profile: str
    error: str | None = None


class AppFlowSync:
    """Updates connector profiles through an injected AppFlow client and records progress in a secret tag."""

    def __init__(self, appflow: Any, secretsmanager: Any) -> None:
        self.appflow = appflow
        self.secretsmanager = secretsmanager

    def needs_sync(self, connection: Connection, version_id: str, tags: Mapping[str, str] | None) -> bool:
        """Profiles named, a token to push, and this version not yet pushed (unknown tags: push, idempotently)."""
        pushed = (tags or {}).get(SYNCED_TAG)
        return bool(profile_names(connection)) and connection.access_token is not None and pushed != version_id

    def sync(self, connection: Connection, version_id: str, arn: str) -> list[SyncResult]:
        """Push to every named profile; tag the secret with the version only if all succeeded."""
        results: list[SyncResult] = []
        for profile in profile_names(connection):
            try:
                self.appflow.update_connector_profile(**update_request(connection, profile, version_id))
                results.append(SyncResult(profile))
            except ClientError as error:
                results.append(SyncResult(profile, error.response.get("Error", {}).get("Code", "ClientError")))
            except BotoCoreError as error:
                results.append(SyncResult(profile, type(error).__name__))
        if results and all(result.error is None for result in results):
            # If tagging fails the next sweep pushes once more; the same clientToken keeps that harmless.
            with suppress(ClientError, BotoCoreError):
                self.secretsmanager.tag_resource(SecretId=arn, Tags=[{"Key": SYNCED_TAG, "Value": version_id}])
        return results
