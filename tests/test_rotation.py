"""The rotation handler's four steps on moto, in the state RotateSecret really leaves a secret in.

moto stages AWSPENDING (no value yet) and enables rotation only when a rotation Lambda exists; with
`use_docker: false` it registers one without running it, and the test then plays Secrets Manager's
part by calling the handler's steps in order, as the service would.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from typing import Any

import pytest

from core.errors import RotationError
from local.servicenow_emulator import ServiceNowEmulator
from tests.conftest import CLIENT_ID, CLIENT_SECRET
from tests.test_callback import FakeContext

STEPS = ("createSecret", "setSecret", "testSecret", "finishSecret")
SECRET = "servicenow-oauth/prod"


@pytest.fixture
def handler(aws: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("SERVICENOW_ALLOWED_HOSTS", "127.0.0.1")
    monkeypatch.setenv("POWERTOOLS_SERVICE_NAME", "servicenow-oauth")
    import handlers.rotation

    return importlib.reload(handlers.rotation)


def connection(emulator: ServiceNowEmulator, **fields: Any) -> str:
    return json.dumps(
        {
            "instanceUrl": emulator.url,
            "clientId": CLIENT_ID,
            "clientSecret": CLIENT_SECRET,
            "grantType": "password",
            "username": "svc.integration",
            "password": "Pa55w0rd-emulator",
            **fields,
        }
    )


def start_rotation(secretsmanager: Any, function_arn: str, token: str) -> None:
    secretsmanager.rotate_secret(
        SecretId=SECRET,
        RotationLambdaARN=function_arn,
        RotationRules={"AutomaticallyAfterDays": 1},
        RotateImmediately=True,
        ClientRequestToken=token,
    )


def stages(secretsmanager: Any) -> dict[str, list[str]]:
    return secretsmanager.describe_secret(SecretId=SECRET)["VersionIdsToStages"]


def current(secretsmanager: Any) -> dict[str, Any]:
    return json.loads(secretsmanager.get_secret_value(SecretId=SECRET, VersionStage="AWSCURRENT")["SecretString"])


def test_full_rotation_with_every_step_repeated(
    handler: Any, secretsmanager: Any, emulator: ServiceNowEmulator, rotation_lambda: str, leak_check: list
) -> None:
    secretsmanager.create_secret(Name=SECRET, SecretString=connection(emulator))
    token = "0b8f4a53-4a5e-4f61-9d1c-0d2a6c7e9b11"
    start_rotation(secretsmanager, rotation_lambda, token)
    invoke: Callable[[str], None] = lambda step: handler.lambda_handler(  # noqa: E731
        {"Step": step, "SecretId": SECRET, "ClientRequestToken": token}, FakeContext()
    )
    for step in STEPS:
        invoke(step)
        grants = emulator.token_requests()
        invoke(step)  # Secrets Manager may deliver a step twice
        assert emulator.token_requests() == grants, f"repeated {step} asked ServiceNow again"
    assert "AWSCURRENT" in stages(secretsmanager)[token]
    document = current(secretsmanager)
    assert document["status"] == "active" and emulator.token_info(document["accessToken"])["active"]


def test_guard_refuses_unknown_and_non_pending_tokens(
    handler: Any, secretsmanager: Any, emulator: ServiceNowEmulator, rotation_lambda: str
) -> None:
    secretsmanager.create_secret(Name=SECRET, SecretString=connection(emulator))
    event = {"Step": "createSecret", "SecretId": SECRET, "ClientRequestToken": "not-a-version-of-this-secret"}
    start_rotation(secretsmanager, rotation_lambda, "7c9e6679-7425-40de-944b-e07fc1f90ae7")
    with pytest.raises(RotationError, match="no stage"):
        handler.lambda_handler(event, FakeContext())
    with pytest.raises(RotationError, match="unknown rotation step"):
        handler.lambda_handler(
            {"Step": "explodeSecret", "SecretId": SECRET, "ClientRequestToken": "7c9e6679-7425-40de-944b-e07fc1f90ae7"},
            FakeContext(),
        )


def test_rotation_disabled_is_refused(handler: Any, secretsmanager: Any, emulator: ServiceNowEmulator) -> None:
    version = secretsmanager.create_secret(Name=SECRET, SecretString=connection(emulator))["VersionId"]
    with pytest.raises(RotationError, match="not enabled"):
        handler.lambda_handler(
            {"Step": "createSecret", "SecretId": SECRET, "ClientRequestToken": version}, FakeContext()
        )


def test_rejected_credential_fails_rotation_and_keeps_current(
    handler: Any, secretsmanager: Any, emulator: ServiceNowEmulator, rotation_lambda: str, leak_check: list
) -> None:
    secretsmanager.create_secret(Name=SECRET, SecretString=connection(emulator, password="wrong-password-1"))
    token = "3d1f1f5e-1c5d-4f11-8b1e-2f4d4a6e8c10"
    start_rotation(secretsmanager, rotation_lambda, token)
    with pytest.raises(RotationError) as raised:
        handler.lambda_handler({"Step": "createSecret", "SecretId": SECRET, "ClientRequestToken": token}, FakeContext())
    leak_check.append(raised.value)
    document = current(secretsmanager)
    assert document["status"] == "reauthorization_required" and document["password"] == "wrong-password-1"


def test_test_step_fails_when_the_pending_token_does_not_work(
    handler: Any, secretsmanager: Any, emulator: ServiceNowEmulator, rotation_lambda: str
) -> None:
    secretsmanager.create_secret(Name=SECRET, SecretString=connection(emulator))
    token = "5a0c7e2b-9d8f-4b1a-a3c6-1e2f3a4b5c6d"
    start_rotation(secretsmanager, rotation_lambda, token)
    event = {"SecretId": SECRET, "ClientRequestToken": token}
    handler.lambda_handler({**event, "Step": "createSecret"}, FakeContext())
    emulator.revoke_user_tokens("svc.integration")
    with pytest.raises(Exception, match="rejected"):
        handler.lambda_handler({**event, "Step": "testSecret"}, FakeContext())
    assert token not in [v for v, labels in stages(secretsmanager).items() if "AWSCURRENT" in labels]


def test_finish_never_promotes_over_a_write_made_since_create(
    handler: Any, secretsmanager: Any, emulator: ServiceNowEmulator, rotation_lambda: str
) -> None:
    from dataclasses import replace

    secretsmanager.create_secret(Name=SECRET, SecretString=connection(emulator))
    token = "6e1c2b3a-0f4d-4a7b-9c8e-2d1f0a9b8c7d"
    start_rotation(secretsmanager, rotation_lambda, token)
    event = {"SecretId": SECRET, "ClientRequestToken": token}
    for step in ("createSecret", "setSecret", "testSecret"):
        handler.lambda_handler({**event, "Step": step}, FakeContext())
    store = handler.rotation.store
    store.update("prod", lambda c: replace(c, password="fixed-by-operator-7"))  # a write in between
    with pytest.raises(RotationError, match="changed after createSecret"):
        handler.lambda_handler({**event, "Step": "finishSecret"}, FakeContext())
    assert current(secretsmanager)["password"] == "fixed-by-operator-7"
    assert token not in [v for v, labels in stages(secretsmanager).items() if "AWSCURRENT" in labels]


def test_a_rejection_during_rotation_is_recorded_like_the_sweeps(
    handler: Any, secretsmanager: Any, emulator: ServiceNowEmulator, rotation_lambda: str
) -> None:
    secretsmanager.create_secret(Name=SECRET, SecretString=connection(emulator, password="wrong-password-8"))
    token = "0f9e8d7c-6b5a-4c3d-8e2f-1a0b9c8d7e6f"
    start_rotation(secretsmanager, rotation_lambda, token)
    with pytest.raises(RotationError):
        handler.lambda_handler({"Step": "createSecret", "SecretId": SECRET, "ClientRequestToken": token}, FakeContext())
    tags = {t["Key"]: t["Value"] for t in secretsmanager.describe_secret(SecretId=SECRET).get("Tags", [])}
    assert tags["servicenow-oauth:status"] == "reauthorization_required"
    assert tags["servicenow-oauth:needs-person"] == "true"
