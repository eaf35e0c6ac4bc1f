"""The consumer helper against the emulator's Table API, reading the secret from the moto server."""

from __future__ import annotations

import json
from typing import Any

import pytest
from aws_lambda_powertools.utilities.parameters import SecretsProvider

from core.consumer import servicenow_session
from core.servicenow import OAuthApp, ServiceNowClient, build_session
from local.servicenow_emulator import ServiceNowEmulator
from tests.conftest import CLIENT_ID, CLIENT_SECRET

SECRET = "servicenow-oauth/prod"


def new_token(emulator: ServiceNowEmulator) -> str:
    app = OAuthApp(emulator.url, CLIENT_ID, CLIENT_SECRET)
    return (
        ServiceNowClient(build_session())
        .password_grant(app, username="svc.integration", password="Pa55w0rd-emulator")
        .access_token
    )


def table_requests(emulator: ServiceNowEmulator) -> int:
    return sum(1 for entry in emulator.requests_log if entry["path"].startswith("/api/now/table/"))


@pytest.fixture
def secret(secretsmanager: Any, emulator: ServiceNowEmulator) -> Any:
    def write(token: str, *, create: bool = False) -> None:
        value = json.dumps(
            {"instanceUrl": emulator.url, "clientId": CLIENT_ID, "accessToken": token, "status": "active"}
        )
        if create:
            secretsmanager.create_secret(Name=SECRET, SecretString=value)
        else:
            secretsmanager.put_secret_value(SecretId=SECRET, SecretString=value)

    return write


def test_bearer_from_the_secret_and_one_refetch_on_401(
    secret: Any, emulator: ServiceNowEmulator, leak_check: list
) -> None:
    secret(new_token(emulator), create=True)
    session, base = servicenow_session(SECRET, provider=SecretsProvider())
    assert base == emulator.url
    answer = session.get(f"{base}/api/now/table/incident", timeout=5)
    assert answer.status_code == 200 and table_requests(emulator) == 1

    # The refresher replaces the token; this process still has the old one cached (max_age 60 s).
    emulator.revoke_user_tokens("svc.integration")
    secret(new_token(emulator))
    answer = session.get(f"{base}/api/now/table/incident", timeout=5)
    assert answer.status_code == 200
    assert [r.status_code for r in answer.history] == [401]
    assert table_requests(emulator) == 3


def test_a_dead_token_gives_the_401_after_exactly_one_retry(
    secret: Any, emulator: ServiceNowEmulator, leak_check: list
) -> None:
    secret(new_token(emulator), create=True)
    session, base = servicenow_session(SECRET, provider=SecretsProvider())
    emulator.revoke_user_tokens("svc.integration")
    answer = session.get(f"{base}/api/now/table/incident", timeout=5)
    assert answer.status_code == 401
    assert table_requests(emulator) == 2  # one try, one retry after the refetch: never a loop


def test_a_connection_without_a_token_says_so(secretsmanager: Any, emulator: ServiceNowEmulator) -> None:
    secretsmanager.create_secret(
        Name=SECRET, SecretString=json.dumps({"instanceUrl": emulator.url, "status": "pending_authorization"})
    )
    with pytest.raises(RuntimeError, match=r"no access token yet.*pending_authorization"):
        servicenow_session(SECRET, provider=SecretsProvider())


def test_the_token_never_goes_to_another_host(secret: Any, emulator: ServiceNowEmulator, leak_check: list) -> None:
    secret(new_token(emulator), create=True)
    session, _ = servicenow_session(SECRET, provider=SecretsProvider())
    other = ServiceNowEmulator().start()
    try:
        with pytest.raises(ValueError, match="another host"):
            session.get(f"{other.url}/api/now/table/incident", timeout=5)
        assert table_requests(other) == 0
    finally:
        other.stop()
