"""The admin CLI against moto server and the emulator: every command, bad input, and no secret in output."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest

from admin.cli import main
from core.signing import verify_authorize_link
from local.servicenow_emulator import ServiceNowEmulator
from tests.conftest import CLIENT_ID, CLIENT_SECRET

KEY = "s" * 64
ADD = ("connections", "add")


def run(*argv: str, stdin: str = "") -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(["--allowed-hosts", "*.service-now.com,127.0.0.1", *argv], out=out, err=err, stdin=io.StringIO(stdin))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def prod(aws: str, emulator: ServiceNowEmulator, secretsmanager: Any) -> ServiceNowEmulator:
    code, out, err = run(
        "connections",
        "add",
        "prod",
        "--instance-url",
        emulator.url,
        "--client-id",
        CLIENT_ID,
        stdin=CLIENT_SECRET + "\n",
    )
    assert (code, err) == (0, ""), err
    assert "pending_authorization" in out and CLIENT_SECRET not in out
    return emulator


def add_password_connection(emulator: ServiceNowEmulator) -> tuple[int, str, str]:
    """A password-grant connection needs no consent: the CLI alone takes it through its whole life."""
    argv = ["--instance-url", emulator.url, "--client-id", CLIENT_ID, "--grant-type", "password"]
    return run(*ADD, "pw", *argv, "--username", "svc.integration", stdin=f"{CLIENT_SECRET}\nPa55w0rd-emulator\n")


def document(secretsmanager: Any, name: str = "prod") -> dict[str, Any]:
    value = secretsmanager.get_secret_value(SecretId=f"servicenow-oauth/{name}", VersionStage="AWSCURRENT")
    return json.loads(value["SecretString"])


def test_add_stores_a_pending_connection_with_the_secret_from_stdin(
    prod: ServiceNowEmulator, secretsmanager: Any
) -> None:
    stored = document(secretsmanager)
    assert stored["clientSecret"] == CLIENT_SECRET and stored["status"] == "pending_authorization"
    assert stored["instanceUrl"] == prod.url


@pytest.mark.parametrize(
    ("argv", "stdin", "phrase"),
    [
        (
            ["connections", "add", "x", "--instance-url", "https://evil.example", "--client-id", "c"],
            "s\n",
            "not allowed",
        ),
        (
            ["connections", "add", "../x", "--instance-url", "https://a.service-now.com", "--client-id", "c"],
            "s\n",
            "name",
        ),
        (
            ["connections", "add", "x", "--instance-url", "https://a.service-now.com", "--client-id", "c"],
            "",
            "no value",
        ),
        (
            ["connections", "add", "x", "--instance-url", "https://a.service-now.com", "--client-id", ""],
            "s\n",
            "'clientId'",
        ),
        (
            [
                "connections",
                "add",
                "x",
                "--instance-url",
                "https://a.service-now.com",
                "--client-id",
                "c",
                "--grant-type",
                "password",
            ],
            "s\npw\n",
            "--username",
        ),
        (["refresh", "missing"], "", "not found"),
        (["revoke", "missing"], "", "not found"),
        (["authorize-url", "missing", "--api-url", "https://x.example"], "", "not found"),
    ],
)
def test_bad_input_is_refused_with_exit_2_and_changes_nothing(
    aws: str, secretsmanager: Any, argv: list[str], stdin: str, phrase: str
) -> None:
    code, out, err = run(*argv, stdin=stdin)
    assert code == 2 and phrase in err and out == ""
    assert secretsmanager.list_secrets()["SecretList"] == []


def test_adding_twice_is_refused(prod: ServiceNowEmulator, secretsmanager: Any) -> None:
    code, _, err = run("connections", "add", "prod", "--instance-url", prod.url, "--client-id", "c", stdin="other\n")
    assert code == 2 and "already exists" in err
    assert document(secretsmanager)["clientSecret"] == CLIENT_SECRET


def test_authorize_url_is_signed_for_the_connection(prod: ServiceNowEmulator, secretsmanager: Any) -> None:
    secretsmanager.create_secret(Name="servicenow-oauth-state-key", SecretString=KEY)
    code, out, _ = run("authorize-url", "prod", "--api-url", "https://api.example/", "--ttl-minutes", "5")
    assert code == 0
    link = urlsplit(out.strip())
    assert link.path == "/connections/prod/authorize"
    query = dict(parse_qsl(link.query))
    verify_authorize_link(KEY.encode(), "prod", query["expires"], query["signature"], datetime.now(UTC))
    assert int(query["expires"]) - datetime.now(UTC).timestamp() <= 300


def test_refresh_revoke_and_list(prod: ServiceNowEmulator, secretsmanager: Any, leak_check: list) -> None:
    code, _, err = add_password_connection(prod)
    assert code == 0, err
    code, out, _ = run("refresh", "pw")
    assert code == 0 and "pw: refreshed" in out
    leak_check.append(out)
    code, out, _ = run("refresh", "pw")
    assert code == 0 and "not_due" in out
    code, out, _ = run("refresh", "pw", "--force")
    assert code == 0 and "refreshed" in out
    tokens = document(secretsmanager, "pw")
    code, out, _ = run("connections", "list")
    leak_check.append(out)
    assert code == 0
    assert "pw" in out and "active" in out and "prod" in out and "pending_authorization" in out
    for value in (tokens["accessToken"], tokens["refreshToken"], CLIENT_SECRET, "Pa55w0rd-emulator"):
        assert value not in out
    code, out, _ = run("revoke", "pw")
    assert code == 0 and "reauthorization_required" in out
    after = document(secretsmanager, "pw")
    assert after["status"] == "reauthorization_required" and "accessToken" not in after and "refreshToken" not in after
    assert not prod.token_info(tokens["refreshToken"])["active"]
    assert not prod.token_info(tokens["accessToken"])["active"]


def test_revoke_keeps_tokens_when_servicenow_is_unreachable(prod: ServiceNowEmulator, secretsmanager: Any) -> None:
    add_password_connection(prod)
    run("refresh", "pw")
    before = document(secretsmanager, "pw")
    prod.inject("hibernate", path="/oauth_revoke_token.do", count=5)
    code, _, err = run("revoke", "pw")
    assert code == 1 and "hibernating" in err
    assert document(secretsmanager, "pw") == before


def test_an_aws_problem_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    monkeypatch.delenv("AWS_REGION", raising=False)
    code, out, err = run("connections", "list")
    assert code == 1 and err.startswith("error: AWS said:") and "region" in err and out == ""
