import json
from datetime import UTC, datetime, timedelta

import pytest

from core.errors import SecretFormatError
from core.secret import Connection, parse_connection
from core.servicenow import Token

HOSTS = ("*.service-now.com",)
NOW = datetime(2026, 11, 22, 18, 30, tzinfo=UTC)
MINIMAL = {"instanceUrl": "https://acme.service-now.com", "clientId": "cid", "clientSecret": "csecret-value-1"}


def parse(document: dict) -> Connection:
    return parse_connection("prod", json.dumps(document), HOSTS)


def test_minimal_document_gets_documented_defaults() -> None:
    connection = parse(MINIMAL)
    assert connection.grant_type == "authorization_code"
    assert connection.status == "pending_authorization"
    assert connection.refresh_token_lifespan_seconds == 8_640_000
    assert connection.access_token is None


def test_round_trip_keeps_unknown_keys_and_formats_timestamps() -> None:
    document = {
        **MINIMAL,
        "accessToken": "at-1",
        "refreshToken": "rt-1",
        "accessTokenExpiresAt": "2026-11-22T19:00:00Z",
        "status": "active",
        "appflowConnectorProfiles": ["snow-prod"],
        "team": {"owner": "integration"},
    }
    connection = parse(document)
    assert connection.access_token_expires_at == datetime(2026, 11, 22, 19, 0, tzinfo=UTC)
    written = connection.to_document()
    assert written["appflowConnectorProfiles"] == ["snow-prod"]
    assert written["team"] == {"owner": "integration"}
    assert written["accessTokenExpiresAt"] == "2026-11-22T19:00:00Z"
    assert parse(written) == connection


def test_secrets_stay_out_of_repr() -> None:
    connection = parse({**MINIMAL, "accessToken": "at-secret-xyz", "refreshToken": "rt-secret-xyz"})
    text = repr(connection)
    for secret in ("csecret-value-1", "at-secret-xyz", "rt-secret-xyz"):
        assert secret not in text


@pytest.mark.parametrize(
    ("document", "key"),
    [
        ({k: v for k, v in MINIMAL.items() if k != "instanceUrl"}, "instanceUrl"),
        ({k: v for k, v in MINIMAL.items() if k != "clientSecret"}, "clientSecret"),
        ({**MINIMAL, "clientId": 42}, "clientId"),
        ({**MINIMAL, "instanceUrl": "https://evil.example"}, "instanceUrl"),
        ({**MINIMAL, "grantType": "implicit"}, "grantType"),
        ({**MINIMAL, "status": "great"}, "status"),
        ({**MINIMAL, "accessTokenExpiresAt": "tomorrow"}, "accessTokenExpiresAt"),
        ({**MINIMAL, "accessTokenExpiresAt": "2026-11-22T19:00:00"}, "accessTokenExpiresAt"),
        ({**MINIMAL, "refreshTokenLifespanSeconds": -5}, "refreshTokenLifespanSeconds"),
        ({**MINIMAL, "grantType": "password", "username": "u"}, "username/password"),
    ],
)
def test_bad_documents_name_the_key_not_the_value(document: dict, key: str) -> None:
    with pytest.raises(SecretFormatError) as raised:
        parse(document)
    assert raised.value.key == key
    message = str(raised.value)
    assert "'prod'" in message and key in message
    assert "csecret-value-1" not in message


@pytest.mark.parametrize("raw", ["not json", "[1, 2]", '"text"', "{" * 10])
def test_non_objects_are_refused(raw: str) -> None:
    with pytest.raises(SecretFormatError, match="document"):
        parse_connection("prod", raw, HOSTS)


def _token(refresh: str | None) -> Token:
    return Token("at-new", "Bearer", NOW + timedelta(seconds=1799), "useraccount", refresh)


def test_consent_starts_a_new_refresh_token_life() -> None:
    connection = parse(MINIMAL).with_token(_token("rt-new"), grant="authorization_code", now=NOW)
    assert connection.status == "active"
    assert connection.refresh_token == "rt-new"
    assert connection.refresh_token_expires_at == NOW + timedelta(days=100)
    assert connection.access_token_expires_at == NOW + timedelta(seconds=1799)


def test_refresh_grant_does_not_extend_the_refresh_token() -> None:
    expires = NOW + timedelta(days=3)
    connection = parse(
        {**MINIMAL, "refreshToken": "rt-old", "refreshTokenExpiresAt": "2026-11-25T18:30:00Z", "status": "active"}
    )
    same = connection.with_token(_token("rt-old"), grant="refresh_token", now=NOW)
    assert same.refresh_token_expires_at == expires
    rotated = connection.with_token(_token("rt-rotated"), grant="refresh_token", now=NOW)
    assert rotated.refresh_token == "rt-rotated"
    assert rotated.refresh_token_expires_at == expires  # never claim more life than ServiceNow promised


def test_answer_without_refresh_token_keeps_the_stored_one() -> None:
    connection = parse({**MINIMAL, "refreshToken": "rt-old", "refreshTokenExpiresAt": "2026-11-25T18:30:00Z"})
    after = connection.with_token(_token(None), grant="refresh_token", now=NOW)
    assert after.refresh_token == "rt-old"
    assert after.refresh_token_expires_at == connection.refresh_token_expires_at


def test_client_credentials_has_no_refresh_token() -> None:
    connection = parse({**MINIMAL, "grantType": "client_credentials"})
    after = connection.with_token(_token(None), grant="client_credentials", now=NOW)
    assert after.refresh_token is None and after.refresh_token_expires_at is None
    assert "refreshToken" not in after.to_document()
