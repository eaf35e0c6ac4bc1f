"""The connection store against a real moto server: read/validate, create, and the compare-and-swap write."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from core.errors import ConcurrentUpdate, ConnectionNotFound, InvalidName, SecretFormatError
from core.secret import Connection
from core.store import AWSCURRENT, AWSPREVIOUS, ConnectionStore

HOSTS = ("*.service-now.com",)


@pytest.fixture
def store(secretsmanager) -> ConnectionStore:  # type: ignore[no-untyped-def]
    return ConnectionStore(secretsmanager, prefix="servicenow-oauth/", allowed_hosts=HOSTS)


def new_connection(name: str = "prod") -> Connection:
    return Connection(
        name=name, instance_url="https://acme.service-now.com", client_id="cid", client_secret="client-secret-1"
    )


def current_value(secretsmanager, secret_id: str) -> dict:  # type: ignore[no-untyped-def]
    return json.loads(secretsmanager.get_secret_value(SecretId=secret_id, VersionStage=AWSCURRENT)["SecretString"])


def test_create_then_get_round_trips(store: ConnectionStore, secretsmanager) -> None:  # type: ignore[no-untyped-def]
    created = store.create(replace(new_connection(), extra={"team": "integration"}))
    read = store.get("prod")
    assert read.version_id == created.version_id
    assert read.connection.client_secret == "client-secret-1"
    assert current_value(secretsmanager, "servicenow-oauth/prod")["team"] == "integration"


def test_unknown_connection_says_so(store: ConnectionStore) -> None:
    with pytest.raises(ConnectionNotFound, match=r"'missing'.*servicenow-oauth/missing"):
        store.get("missing")


@pytest.mark.parametrize("name", ["", "../etc", "a b", "x" * 65, "_state-key", "prod/other"])
def test_bad_names_are_refused_before_any_call(store: ConnectionStore, name: str) -> None:
    with pytest.raises(InvalidName, match="connection name"):
        store.get(name)


def test_a_bad_document_names_the_connection_and_key(store: ConnectionStore, secretsmanager) -> None:  # type: ignore[no-untyped-def]
    secretsmanager.create_secret(
        Name="servicenow-oauth/broken", SecretString=json.dumps({"instanceUrl": "https://acme.service-now.com"})
    )
    with pytest.raises(SecretFormatError) as raised:
        store.get("broken")
    assert raised.value.connection == "broken" and raised.value.key == "clientId"


def test_compare_and_swap_promotes_and_keeps_previous(store: ConnectionStore, secretsmanager) -> None:  # type: ignore[no-untyped-def]
    created = store.create(new_connection())
    written = store.compare_and_swap(created, replace(created.connection, access_token="at-1", status="active"))
    assert current_value(secretsmanager, created.arn)["accessToken"] == "at-1"
    stages = secretsmanager.describe_secret(SecretId=created.arn)["VersionIdsToStages"]
    assert AWSCURRENT in stages[written.version_id]
    assert AWSPREVIOUS in stages[created.version_id]


def test_a_concurrent_writer_makes_the_second_promote_fail(store: ConnectionStore, secretsmanager) -> None:  # type: ignore[no-untyped-def]
    created = store.create(new_connection())
    first_reader = store.get("prod")
    second_reader = store.get("prod")
    store.compare_and_swap(first_reader, replace(first_reader.connection, access_token="winner"))
    with pytest.raises(ConcurrentUpdate, match="'prod'"):
        store.compare_and_swap(second_reader, replace(second_reader.connection, access_token="loser"))
    assert current_value(secretsmanager, created.arn)["accessToken"] == "winner"


def test_a_retried_write_with_the_same_token_is_idempotent(store: ConnectionStore, secretsmanager) -> None:  # type: ignore[no-untyped-def]
    created = store.create(new_connection())
    new = replace(created.connection, access_token="at-1")
    token = "0b0e0f6c-6a55-4d0c-9a43-3d1d9bbd7a01"
    first = store.compare_and_swap(created, new, request_token=token)
    again = store.compare_and_swap(created, new, request_token=token)  # e.g. the first answer was lost
    assert first.version_id == again.version_id == token
    assert current_value(secretsmanager, created.arn)["accessToken"] == "at-1"


def test_update_builds_on_the_newest_value(store: ConnectionStore, secretsmanager) -> None:  # type: ignore[no-untyped-def]
    created = store.create(new_connection())
    calls: list[str | None] = []

    def change(connection: Connection) -> Connection:
        calls.append(connection.access_token)
        if len(calls) == 1:  # someone else writes between our read and our promote
            other = store.get("prod")
            store.compare_and_swap(other, replace(other.connection, access_token="theirs", scope="theirs"))
        return replace(connection, refresh_token="ours")

    store.update("prod", change)
    value = current_value(secretsmanager, created.arn)
    assert calls == [None, "theirs"]
    assert value["accessToken"] == "theirs" and value["refreshToken"] == "ours"
