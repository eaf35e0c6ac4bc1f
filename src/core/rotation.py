"""Secrets Manager's rotation protocol (createSecret, setSecret, testSecret, finishSecret) for a connection.

The shape follows AWS's SecretsManagerRotationTemplate: every step first checks that rotation is
enabled and the token is staged AWSPENDING, and returns early when the token is already current, so
re-delivered steps are harmless. The refresh itself is the refresher's, writes and all, not a fork of it:
OAuth tokens are live from the moment ServiceNow issues them, so they are stored at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from botocore.exceptions import ClientError

from core.errors import RotationError
from core.health import CANDIDATE
from core.lifecycle import needs_person
from core.refresh import Refresher
from core.store import AWSCURRENT, AWSPENDING

Step = Callable[["Rotation", str, str, str], None]
BASE_TAG = "servicenow-oauth:rotation-base"  # "<pending version> <version it was built on>"


class Rotation:
    """Runs one rotation step for one secret; collaborators come from the refresher (store, client, clock)."""

    def __init__(self, refresher: Refresher, logger: Any) -> None:
        self.refresher = refresher
        self.store = refresher.store
        self.client = refresher.store.client
        self.logger = logger

    def run(self, step: str, secret_id: str, token: str) -> None:
        """Guard like AWS's template, then dispatch.

        Raises:
            RotationError: rotation disabled, unknown token, token not pending, unknown step, or a failed test.
        """
        metadata = self.client.describe_secret(SecretId=secret_id)
        name = self.store.name_of(metadata["Name"])
        if name is None:
            raise RotationError(f"secret {metadata['Name']!r} is not a connection under {self.store.prefix!r}")
        if not metadata.get("RotationEnabled"):
            raise RotationError(f"connection {name!r}: rotation is not enabled for its secret")
        versions = metadata.get("VersionIdsToStages", {})
        if token not in versions:
            raise RotationError(f"connection {name!r}: version {token} has no stage for rotation")
        if AWSCURRENT in versions[token]:
            # Already current: a re-delivered event, nothing to do.
            self.logger.info(f"{step}: version already current", extra={"connection": name})
            return
        if AWSPENDING not in versions[token]:
            raise RotationError(f"connection {name!r}: version {token} is not AWSPENDING")
        handler = STEPS.get(step)
        if handler is None:
            raise RotationError(f"connection {name!r}: unknown rotation step {step!r}")
        handler(self, metadata["ARN"], name, token)

    def create_secret(self, arn: str, name: str, token: str) -> None:
        """Refresh through the sweep's own path, then stage a copy of the result as AWSPENDING.

        ServiceNow makes the new tokens live the moment it answers (and, if its refresh tokens rotate, kills
        the old one), so they go to AWSCURRENT at once - with the sweep's compare-and-swap, candidate
        adoption and rejection rules - never only to AWSPENDING, where a failed testSecret or a sweep
        running before finishSecret would strand them. The pending copy remembers the version it copies,
        so finishSecret refuses to promote it over anything written since.
        """
        try:
            self.client.get_secret_value(SecretId=arn, VersionId=token, VersionStage=AWSPENDING)
            self.logger.info("createSecret: pending version already exists", extra={"connection": name})
            return
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") != "ResourceNotFoundException":
                raise
        current = self.store.get_latest(name)
        if needs_person(current.connection):
            raise RotationError(f"connection {name!r} needs a person first ({current.connection.status}); not rotating")
        outcome = self.refresher.refresh(current, force=True)
        if outcome.result != "refreshed":
            raise RotationError(
                f"connection {name!r}: no new token ({outcome.result}: {outcome.detail or 'see the refresher'}); "
                "the current version is unchanged or already holds what ServiceNow issued - rotate again later"
            )
        written = self.store.get(name)
        self.client.tag_resource(SecretId=arn, Tags=[{"Key": BASE_TAG, "Value": f"{token} {written.version_id}"}])
        self.client.put_secret_value(
            SecretId=arn,
            ClientRequestToken=token,
            SecretString=written.connection.to_json(),
            VersionStages=[AWSPENDING],
        )
        self.logger.info("createSecret: tokens stored, pending copy staged", extra={"connection": name})

    def set_secret(self, arn: str, name: str, token: str) -> None:
        """Nothing to set: ServiceNow itself issued the pending token in createSecret."""
        self.logger.info("setSecret: nothing to do for OAuth tokens", extra={"connection": name})

    def test_secret(self, arn: str, name: str, token: str) -> None:
        """Prove the pending access token works against ServiceNow's Table API."""
        pending = self.store.get(name, version_stage=AWSPENDING)
        if pending.version_id != token or not pending.connection.access_token:
            raise RotationError(f"connection {name!r}: the pending version holds no access token")
        user = self.refresher.client.current_user(pending.connection.instance_url, pending.connection.access_token)
        self.logger.info("testSecret: pending token works", extra={"connection": name, "servicenow_user": user})

    def finish_secret(self, arn: str, name: str, token: str) -> None:
        """Move AWSCURRENT to the pending version, naming the version it leaves (as AWS's template does) -
        but only if that is still the version the pending one was built on: never over a newer write."""
        metadata = self.client.describe_secret(SecretId=arn)
        current = next((v for v, labels in metadata["VersionIdsToStages"].items() if AWSCURRENT in labels), None)
        if current == token:
            return
        tags = {tag["Key"]: tag["Value"] for tag in metadata.get("Tags", [])}
        if any(CANDIDATE in labels and AWSCURRENT not in labels for labels in metadata["VersionIdsToStages"].values()):
            raise RotationError(
                f"connection {name!r}: a newer refresh waits in a candidate version (its write did not finish); "
                "not promoting the pending copy over it - the next sweep adopts it, then rotate again"
            )
        if tags.get(BASE_TAG) != f"{token} {current}":
            raise RotationError(
                f"connection {name!r} changed after createSecret (or was not created by it); not promoting a "
                "stale version over it - rotate again"
            )
        self.client.update_secret_version_stage(
            SecretId=arn, VersionStage=AWSCURRENT, MoveToVersionId=token, RemoveFromVersionId=current
        )
        self.client.untag_resource(SecretId=arn, TagKeys=[BASE_TAG])
        self.logger.info("finishSecret: pending version is now current", extra={"connection": name})


STEPS: dict[str, Step] = {
    "createSecret": Rotation.create_secret,
    "setSecret": Rotation.set_secret,
    "testSecret": Rotation.test_secret,
    "finishSecret": Rotation.finish_secret,
}
