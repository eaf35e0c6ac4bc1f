"""Each function that writes connections, on a connection encrypted with a customer-managed key.

The per-role least-privilege table (tests/permissions.py) found that only the sweep's tests ever used
ConnectionWriterPolicy's SecretsKmsKey statement: the callback, the worker and rotation had run only on the AWS
managed key. Here each of them reads and writes a connection on its own key, through Secrets Manager, and each
of their roles must allow the kms:Decrypt and kms:GenerateDataKey that Secrets Manager makes on their behalf.
"""

from __future__ import annotations

import copy
import importlib
import json
from typing import Any

import boto3
import permissions
import pytest

from local.servicenow_emulator import press_consent
from tests.conftest import REDIRECT_URI
from tests.test_callback import EVENTS, FakeContext, Stack, stack  # noqa: F401 (the fixture)
from tests.test_refresh_handlers import add_due_connection
from tests.test_rotation import SECRET, connection, start_rotation

KMS_ACTIONS = {"kms:Decrypt", "kms:GenerateDataKey"}


def on_a_customer_managed_key(secretsmanager: Any, secret_id: str) -> str:
    key = str(boto3.client("kms").create_key()["KeyMetadata"]["Arn"])
    secretsmanager.update_secret(SecretId=secret_id, KmsKeyId=key)
    return key


def key_use(checker: permissions.Checker, calls: list[Any], actor: str, key: str) -> set[str]:
    """The KMS actions Secrets Manager made on `key` for `actor`, each allowed through SecretsKmsKey."""
    found = set()
    for call in calls:
        if call.actor != actor:
            continue
        for verdict in checker.verdicts(call):
            if verdict.authorization.resource == key:
                assert verdict.decision.allowed, str(verdict)
                assert "ConnectionWriterPolicy/SecretsKmsKey" in verdict.decision.used
                found.add(verdict.authorization.action)
    return found


def recorded() -> list[Any]:
    calls = permissions.RECORDER.take()
    permissions.RECORDER.give_back(calls)  # conftest's check still sees them
    return calls


def test_the_callback_consents_on_a_customer_managed_key(stack: Stack, permission_checker: permissions.Checker) -> None:  # noqa: F811
    stack.create_connection()
    key = on_a_customer_managed_key(stack.secretsmanager, "servicenow-oauth/prod")
    permissions.RECORDER.take()
    page = stack.get("/callback", press_consent(stack.start()))
    assert page["statusCode"] == 200 and stack.document()["redirectUri"] == REDIRECT_URI
    assert key_use(permission_checker, recorded(), "CallbackFunction", key) == KMS_ACTIONS


def test_the_worker_refreshes_on_a_customer_managed_key(
    aws: str,
    secretsmanager: Any,
    emulator: Any,
    monkeypatch: pytest.MonkeyPatch,
    permission_checker: permissions.Checker,
) -> None:
    monkeypatch.setenv("SERVICENOW_ALLOWED_HOSTS", "127.0.0.1")
    monkeypatch.setenv("POWERTOOLS_SERVICE_NAME", "servicenow-oauth")
    monkeypatch.setenv("POWERTOOLS_METRICS_NAMESPACE", "ServiceNowOAuth")
    add_due_connection(secretsmanager, emulator, "prod")
    key = on_a_customer_managed_key(secretsmanager, "servicenow-oauth/prod")
    record = copy.deepcopy(json.loads((EVENTS / "sqs-refresh.json").read_text())["Records"][0])
    record.update(body=json.dumps({"connection": "prod"}))
    import handlers.worker

    worker = importlib.reload(handlers.worker)
    permissions.RECORDER.take()
    assert worker.lambda_handler({"Records": [record]}, FakeContext()) == {"batchItemFailures": []}
    assert key_use(permission_checker, recorded(), "WorkerFunction", key) == KMS_ACTIONS


def test_rotation_on_a_customer_managed_key(
    aws: str, secretsmanager: Any, emulator: Any, rotation_lambda: str, monkeypatch: pytest.MonkeyPatch,
    permission_checker: permissions.Checker,
) -> None:  # fmt: skip
    monkeypatch.setenv("SERVICENOW_ALLOWED_HOSTS", "127.0.0.1")
    monkeypatch.setenv("POWERTOOLS_SERVICE_NAME", "servicenow-oauth")
    secretsmanager.create_secret(Name=SECRET, SecretString=connection(emulator))
    key = on_a_customer_managed_key(secretsmanager, SECRET)
    token = "9a1b2c3d-4e5f-4a6b-8c7d-0e1f2a3b4c5d"
    start_rotation(secretsmanager, rotation_lambda, token)
    import handlers.rotation

    handler = importlib.reload(handlers.rotation)
    permissions.RECORDER.take()
    handler.lambda_handler({"Step": "createSecret", "SecretId": SECRET, "ClientRequestToken": token}, FakeContext())
    assert key_use(permission_checker, recorded(), "RotationFunction", key) == KMS_ACTIONS
