"""`servicenow-client`: the OAuth client registered through the emulator's Table API, idempotently, with every
refusal one clear line that writes nothing, a half-done run finished by a rerun, and JWT keys trusted and rolled
with verifier maps. The emulator runs on the real clock here: the CLI signs assertions with the real time."""

from __future__ import annotations

import copy
import json
import logging
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import boto3
import pytest
import requests
from botocore.exceptions import ClientError

from admin.registration import MARK, VERIFIER_MAP
from core.signing import verify_authorize_link
from core.store import ConnectionStore
from local.servicenow_emulator import ServiceNowEmulator, press_consent
from local.stack import LocalStack, free_port
from tests.conftest import new_key
from tests.test_cli import document, run

API = "https://abc123.execute-api.us-east-1.amazonaws.com"
CALLBACK = f"{API}/callback"
KEY = "k" * 64


@pytest.fixture
def instance(aws: str, secretsmanager: Any) -> Iterator[ServiceNowEmulator]:
    secretsmanager.create_secret(Name="servicenow-oauth-state-key", SecretString=KEY)
    with ServiceNowEmulator() as server:
        server.add_user("svc.integration", "Pa55w0rd-emulator")
        yield server


def admin(instance: ServiceNowEmulator) -> str:
    return f"admin\n{instance.admin_password}\n"


def register(instance: ServiceNowEmulator, *more: str, stdin: str | None = None) -> tuple[int, str, str]:
    argv = ["servicenow-client", "prod", "--instance-url", instance.url, "--api-url", API, *more]
    return run(*argv, stdin=admin(instance) if stdin is None else stdin)


def connections(secretsmanager: Any) -> list[str]:
    names = [entry["Name"] for entry in secretsmanager.list_secrets()["SecretList"]]
    return [name for name in names if name.startswith("servicenow-oauth/")]


def versions(secretsmanager: Any, name: str = "prod") -> int:
    return len(secretsmanager.list_secret_version_ids(SecretId=f"servicenow-oauth/{name}")["Versions"])


def table(instance: ServiceNowEmulator, name: str) -> list[dict[str, Any]]:
    answer = requests.get(
        f"{instance.url}/api/now/table/{name}", auth=("admin", instance.admin_password), timeout=5
    ).json()
    return list(answer["result"])


def accepted(instance: ServiceNowEmulator, client_id: str, client_secret: str) -> bool:
    """The client secret works at the token endpoint (a password grant for a known user)."""
    answer = requests.post(
        f"{instance.url}/oauth_token.do",
        data={
            "grant_type": "password",
            "client_id": client_id,
            "client_secret": client_secret,
            "username": "svc.integration",
            "password": "Pa55w0rd-emulator",
        },
        timeout=5,
    )
    return answer.status_code == 200


def no_secret_in(instance: ServiceNowEmulator, *texts: str) -> None:
    values = {value for value in instance.secret_values() if len(value) >= 8}
    leaked = [value[:4] + "…" for value in values if any(value in text for text in texts)]
    assert not leaked, leaked


def test_an_empty_instance_gets_the_client_and_the_connection_its_secret(
    instance: ServiceNowEmulator, secretsmanager: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    code, out, err = register(instance)
    assert (code, err) == (0, ""), err
    [entry] = table(instance, "oauth_entity")
    assert entry["name"] == "servicenow-oauth prod" and entry["redirect_url"] == CALLBACK
    assert (entry["access_token_lifespan"], entry["refresh_token_lifespan"]) == ("1800", "8640000")
    assert MARK in entry["comments"] and entry["active"] == "true"
    stored = document(secretsmanager)
    assert stored["clientId"] == entry["client_id"] and stored["status"] == "pending_authorization"
    assert stored["servicenowEntry"] == "servicenow-oauth prod"
    # The secret made here is the one ServiceNow holds, and the Table API never shows it back.
    assert accepted(instance, stored["clientId"], stored["clientSecret"])
    assert stored["clientSecret"] not in json.dumps(entry)
    link = out.strip().splitlines()[-1]
    assert link.startswith(f"{API}/connections/prod/authorize?")
    no_secret_in(instance, out, err, caplog.text)


def test_a_rerun_changes_nothing_in_either_system(instance: ServiceNowEmulator, secretsmanager: Any) -> None:
    assert register(instance)[0] == 0
    rows, before = copy.deepcopy(instance.tables.rows), versions(secretsmanager)
    secret = document(secretsmanager)["clientSecret"]
    code, out, err = register(instance)
    assert (code, err) == (0, "")
    assert "nothing changed" in out
    assert instance.tables.rows == rows and versions(secretsmanager) == before
    assert accepted(instance, document(secretsmanager)["clientId"], secret)


def test_someone_elses_entry_is_refused_then_adopted_keeping_its_redirect_urls(
    instance: ServiceNowEmulator, secretsmanager: Any
) -> None:
    theirs = "https://a.example/cb,https://b.example/cb"
    requests.post(
        f"{instance.url}/api/now/table/oauth_entity",
        json={"name": "shared", "redirect_url": theirs, "client_secret": "their-secret-123"},
        auth=("admin", instance.admin_password),
        timeout=5,
    ).raise_for_status()
    rows = copy.deepcopy(instance.tables.rows)
    code, out, err = register(instance, "--entry-name", "shared")
    assert code == 1 and out == "" and err.count("\n") == 1
    assert "did not create" in err and "--adopt 'shared'" in err and "nothing was written" in err
    assert instance.tables.rows == rows and not connections(secretsmanager)

    code, out, err = register(instance, "--adopt", "shared")
    assert (code, err) == (0, ""), err
    [entry] = table(instance, "oauth_entity")
    assert entry["redirect_url"] == f"{theirs},{CALLBACK}"
    assert accepted(instance, entry["client_id"], document(secretsmanager)["clientSecret"])
    # ServiceNow sends the code to the URL the authorize request names when it is registered, not the first one.
    consent = press_consent(
        f"{instance.url}/oauth_auth.do?response_type=code&client_id={entry['client_id']}&state=s"
        f"&redirect_uri={CALLBACK}"
    )
    assert "code" in consent


def test_an_entry_lacking_the_callback_url_gains_it(instance: ServiceNowEmulator, secretsmanager: Any) -> None:
    assert register(instance, "--api-url", "https://old.example")[0] == 0
    code, out, _err = register(instance)
    assert code == 0 and "added the callback URL" in out
    [entry] = table(instance, "oauth_entity")
    assert entry["redirect_url"] == f"https://old.example/callback,{CALLBACK}"


@pytest.mark.parametrize("problem", ["password", "role", "hibernating", "down", "lifespan", "instance"])
def test_each_bad_input_is_one_clear_line_and_writes_nothing(
    instance: ServiceNowEmulator, secretsmanager: Any, caplog: pytest.LogCaptureFixture, problem: str
) -> None:
    caplog.set_level(logging.DEBUG)
    url, more, stdin = instance.url, [], admin(instance)
    phrase = {
        "password": "refused the admin credentials (401)",
        "role": "needs the admin or oauth_admin role",
        "hibernating": "is hibernating",
        "down": "could not be reached",
        "lifespan": "--access-lifespan must be",
        "instance": "not allowed",
    }[problem]
    if problem == "password":
        stdin = "admin\nnot-the-password-9\n"
    elif problem == "role":
        instance.add_user("itil.person", "itil-password-42")
        stdin = "itil.person\nitil-password-42\n"
    elif problem == "hibernating":
        instance.inject("hibernate", path="*", count=10)
    elif problem == "down":
        url = f"http://127.0.0.1:{free_port()}"
    elif problem == "lifespan":
        more = ["--access-lifespan", "5"]
    elif problem == "instance":
        url = "https://evil.example.com"
    code, out, err = run("servicenow-client", "prod", "--instance-url", url, "--api-url", API, *more, stdin=stdin)
    assert code != 0 and out == "" and err.count("\n") == 1, err
    assert phrase in err and "'prod'" in err, err
    assert "nothing was written" in err or problem == "instance"
    instance.clear_faults()
    assert table(instance, "oauth_entity") == [] and not connections(secretsmanager)
    no_secret_in(instance, out, err, caplog.text)


def test_an_oauth_admin_without_admin_may_register(instance: ServiceNowEmulator, secretsmanager: Any) -> None:
    instance.add_user("oauth.keeper", "oauth-admin-password-7", roles={"oauth_admin"})
    code, _, err = register(instance, stdin="oauth.keeper\noauth-admin-password-7\n")
    assert (code, err) == (0, ""), err
    stored = document(secretsmanager)
    assert accepted(instance, stored["clientId"], stored["clientSecret"])


def test_a_failed_secret_write_is_finished_by_a_rerun(
    instance: ServiceNowEmulator, secretsmanager: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_create = ConnectionStore.create

    def refused(*args: Any, **kwargs: Any) -> Any:
        raise ClientError({"Error": {"Code": "AccessDeniedException", "Message": "no"}}, "CreateSecret")

    monkeypatch.setattr(ConnectionStore, "create", refused)
    code, out, err = register(instance)
    assert code == 1 and "run the same command again to finish" in err and err.count("\n") == 1
    [entry] = table(instance, "oauth_entity")  # ServiceNow's side is done
    assert not connections(secretsmanager)
    first = {v for v in instance.secret_values() if len(v) >= 32}

    monkeypatch.setattr(ConnectionStore, "create", real_create)
    code, out, err = register(instance)
    assert (code, err) == (0, ""), err
    assert "set a new client secret" in out
    stored = document(secretsmanager)
    assert stored["clientId"] == entry["client_id"] and accepted(instance, stored["clientId"], stored["clientSecret"])
    # The secret of the half-done run, which nobody holds, no longer opens anything.
    assert not any(accepted(instance, entry["client_id"], value) for value in first - {stored["clientSecret"]})
    assert len(table(instance, "oauth_entity")) == 1


def test_a_connection_holding_another_clients_tokens_is_not_repointed(
    instance: ServiceNowEmulator, secretsmanager: Any
) -> None:
    assert register(instance)[0] == 0
    secretsmanager.put_secret_value(
        SecretId="servicenow-oauth/prod",
        SecretString=json.dumps({**document(secretsmanager), "refreshToken": "r" * 40, "status": "active"}),
    )
    before = versions(secretsmanager)
    code, _out, err = register(instance, "--entry-name", "another")
    assert code == 1 and "orphan" in err and err.count("\n") == 1
    assert versions(secretsmanager) == before and len(table(instance, "oauth_entity")) == 1


# ---------------------------------------------------------------- JWT: certificate and verifier maps


def test_a_jwt_rollover_through_verifier_maps_needs_one_command_each_way(
    instance: ServiceNowEmulator, secretsmanager: Any, kms: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    instance.supports_jwks = False  # a release before Zurich: no JWKS URL field
    instance.add_user("svc.jwt", "jwt-user-password-1")
    old, new = new_key(kms), new_key(kms)
    jwt = ["--grant-type", "jwt_bearer", "--jwt-subject", "svc.jwt", "--jwt-key-id", "key-1", "--jwt-kms-key", old]
    code, out, err = register(instance, *jwt)
    assert (code, err) == (0, ""), err
    assert "verifier map" in out
    stored = document(secretsmanager)
    assert stored["servicenowTrust"] == "verifier_map" and instance.jwt_key_ids(stored["clientId"]) == {"key-1"}
    # An "OAuth JWT API endpoint": a row of oauth_jwt (which oauth_entity answers too), its map pointing at it.
    [entry] = table(instance, "oauth_jwt")
    [parent] = table(instance, "oauth_entity")
    assert parent["sys_id"] == entry["sys_id"] and parent["sys_class_name"] == "oauth_jwt"
    assert (entry["user_field"], entry["enable_jti_verification"], entry["clock_skew"]) == ("user_name", "true", "300")
    [mapping] = table(instance, VERIFIER_MAP)
    assert mapping["oauth_jwt"]["value"] == entry["sys_id"] and mapping["kid"] == "key-1"
    outputs = [out]

    code, out, err = run("refresh", "prod")
    assert (code, err) == (0, "") and "refreshed" in out, (out, err)
    outputs.append(out)

    stage = ["connections", "stage-jwt-key", "prod", "--jwt-key-id", "key-2", "--jwt-kms-key", new]
    code, out, err = run(*stage, stdin=admin(instance))
    assert (code, err) == (0, ""), err
    assert instance.jwt_key_ids(stored["clientId"]) == {"key-1", "key-2"}
    outputs.append(out)

    code, out, err = run("connections", "retire-jwt-key", "prod", stdin=admin(instance))
    assert (code, err) == (0, ""), err
    assert instance.jwt_key_ids(stored["clientId"]) == {"key-2"}
    after = document(secretsmanager)
    assert after["jwtKeyId"] == "key-2" and "jwtKeyIdNext" not in after
    assert [row["kid"] for row in table(instance, VERIFIER_MAP)] == ["key-2"]
    outputs.append(out)

    code, out, err = run("refresh", "prod", "--force")
    assert (code, err) == (0, "") and "refreshed" in out, (out, err)
    no_secret_in(instance, *outputs, out, err, caplog.text)


def test_retiring_before_servicenow_trusts_the_staged_key_changes_nothing(
    instance: ServiceNowEmulator, secretsmanager: Any, kms: Any
) -> None:
    instance.add_user("svc.jwt", "jwt-user-password-1")
    old, new = new_key(kms), new_key(kms)
    jwt = ["--grant-type", "jwt_bearer", "--jwt-subject", "svc.jwt", "--jwt-key-id", "key-1", "--jwt-kms-key", old]
    assert register(instance, *jwt, "--trust", "verifier_map")[0] == 0
    client_id = document(secretsmanager)["clientId"]
    # Staged in the secret only (as a connection registered by hand would be): ServiceNow has no map for it.
    secretsmanager.put_secret_value(
        SecretId="servicenow-oauth/prod",
        SecretString=json.dumps({**document(secretsmanager), "jwtKeyIdNext": "key-2", "kmsKeyIdNext": new}),
    )
    before = versions(secretsmanager)
    code, _out, err = run("connections", "retire-jwt-key", "prod", stdin=admin(instance))
    assert code == 1 and "does not trust it yet" in err and "nothing changed" in err and err.count("\n") == 1
    assert versions(secretsmanager) == before and instance.jwt_key_ids(client_id) == {"key-1"}


def test_the_authorize_link_printed_is_signed_for_the_connection(instance: ServiceNowEmulator) -> None:
    _code, out, _ = register(instance)
    query = dict(parse_qsl(urlsplit(out.strip().splitlines()[-1]).query))
    verify_authorize_link(KEY.encode(), "prod", query["expires"], query["signature"], datetime.now(UTC))


# ---------------------------------------------------------------- JWT: a JWKS URL (Zurich and later)


def test_a_jwks_rollover_needs_no_upload_and_no_console(monkeypatch: pytest.MonkeyPatch) -> None:
    with LocalStack(refresh_interval=None) as stack:
        assert stack.emulator is not None
        emulator = stack.emulator
        stack.create_jwt_connection("machine", key_id="key-1", trust="jwks")
        assert "trusts the keys published at" in stack.registered["machine"]
        assert stack.sweep().get("refreshed") == 1 and emulator.jwks_fetches == 1
        client_id = json.loads(stack.read_secret("machine")["SecretString"])["clientId"]
        assert emulator.jwt_key_ids(client_id) == set()  # no verifier map: the JWKS URL alone
        entries = emulator.tables.rows["oauth_jwt"].values()
        assert [e["jwks_url"] for e in entries] == [f"{stack.api.url}/connections/machine/jwks.json"]
        writes = len(emulator.requests_log)

        new = stack.new_signing_key()
        code, out, err = stack.admin(
            "connections", "stage-jwt-key", "machine", "--jwt-key-id", "key-2", "--jwt-kms-key", new
        )
        assert (code, err) == (0, "") and "nothing to upload" in out
        # Until ServiceNow has fetched the staged key, retiring the current one is refused and changes nothing.
        before = stack.secretsmanager.list_secret_version_ids(SecretId=stack.secret_id("machine"))["Versions"]
        code, out, err = stack.admin("connections", "retire-jwt-key", "machine")
        assert code == 1 and "does not trust it yet" in err, err
        after = stack.secretsmanager.list_secret_version_ids(SecretId=stack.secret_id("machine"))["Versions"]
        assert len(after) == len(before)

        # The stack's 300 s cache and ServiceNow's wait before refetching for an unknown kid (60 s) have passed.
        assert stack.handler is not None
        monkeypatch.setattr(stack.handler.publisher, "max_age", 0)
        later = time.time() + 61
        monkeypatch.setattr(emulator, "clock", lambda: later)
        code, out, err = stack.admin("connections", "retire-jwt-key", "machine")
        assert (code, err) == (0, ""), err
        assert "key-2 is now the current key" in out and "publishes only key id key-2" in out
        document = json.loads(stack.read_secret("machine")["SecretString"])
        assert document["jwtKeyId"] == "key-2" and "jwtKeyIdNext" not in document
        published = requests.get(f"{stack.api.url}/connections/machine/jwks.json", timeout=10).json()
        assert [key["kid"] for key in published["keys"]] == ["key-2"]
        table_calls = [e for e in emulator.requests_log[writes:] if e["path"].startswith("/api/now/table/")]
        assert table_calls == []  # the rollover never touched ServiceNow's tables
        no_secret_in(emulator, out, err, stack.registered["machine"])


# ---------------------------------------------------------------- found by review (each failed before its fix)


@pytest.mark.parametrize("bad", ["consumer", "replica region", "signing key"])
def test_a_bad_option_is_refused_before_servicenow_is_written(
    instance: ServiceNowEmulator, secretsmanager: Any, bad: str
) -> None:
    """Each was refused only after the Application Registry entry was inserted, leaving a row in ServiceNow: a
    --consumer that is not an account id or role ARN, a --replica-region naming no region, and (--trust verifier_map)
    a KMS key that is not an RSA signing key, whose certificate was made after the insert. Readers and replicas are
    now parsed, and the key checked and its certificate made, before any write."""
    options = {"consumer": ["--consumer", "not-a-principal"], "replica region": ["--replica-region", "mars-north-9"]}
    if bad == "signing key":
        instance.add_user("svc.jwt", "jwt-user-password-1")
        symmetric = boto3.client("kms").create_key()["KeyMetadata"]["Arn"]
        jwt = ["--grant-type", "jwt_bearer", "--jwt-subject", "svc.jwt", "--jwt-key-id", "key-1"]
        options[bad] = [*jwt, "--jwt-kms-key", symmetric, "--trust", "verifier_map"]
    code, _out, err = register(instance, *options[bad])
    assert code != 0 and err.count("\n") == 1, err
    assert not connections(secretsmanager)
    assert table(instance, "oauth_entity") == [], f"a refused bad option wrote a ServiceNow entry; stderr: {err}"


def test_a_consent_landing_during_the_run_is_not_repointed_to_another_client(
    instance: ServiceNowEmulator, secretsmanager: Any
) -> None:
    """The token check was made on the connection read at the start only, so tokens stored meanwhile (a consent for
    the held client) ended up in a connection repointed to a new client; the final conditional write checks too."""
    assert register(instance)[0] == 0
    held = document(secretsmanager)["clientId"]
    instance.inject("slow", path="/api/now/table/oauth_entity", count=1, delay=2.0)

    def consent_lands() -> None:  # what the callback does when the person presses Allow
        deadline = time.monotonic() + 10
        while instance._faults and time.monotonic() < deadline:
            time.sleep(0.02)
        secretsmanager.put_secret_value(
            SecretId="servicenow-oauth/prod",
            SecretString=json.dumps({**document(secretsmanager), "refreshToken": "r" * 40, "status": "active"}),
        )

    thread = threading.Thread(target=consent_lands)
    thread.start()
    code, _out, err = register(instance, "--entry-name", "another")
    thread.join()
    stored = document(secretsmanager)
    assert stored.get("refreshToken") == "r" * 40
    assert stored["clientId"] == held, (
        f"the connection holding tokens of {held[:8]} was repointed to {stored['clientId'][:8]} (exit {code}, {err!r})"
    )
