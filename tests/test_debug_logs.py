"""No log level reveals a secret (issue #29): every path runs in a fresh interpreter with the root logger at DEBUG,
as Lambda's `ApplicationLogLevel: DEBUG` sets it, and everything it prints is scanned for every value the
emulator issued or was configured with, and the state-signing key. On main before #29 botocore printed the raw
Secrets Manager traffic (tokens, client secrets, the signing key) at that level; the planted run shows the scan
still sees it when the libraries' loggers are not kept at WARNING."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest

from core.signing import sign_authorize_link
from local.servicenow_emulator import ServiceNowEmulator
from tests.conftest import REDIRECT_URI, secret_values
from tests.test_callback import API, STATE_KEY
from tests.test_refresh_handlers import EVENTS, PREFIX, add_due_connection
from tests.test_rotation import SECRET, STEPS, connection, start_rotation

ROOT = Path(__file__).resolve().parent.parent
ENVIRONMENT = {
    "CONNECTION_SECRET_PREFIX": PREFIX,
    "SERVICENOW_ALLOWED_HOSTS": "127.0.0.1",
    "STATE_KEY_SECRET_ID": "servicenow-oauth-state-key",
    "CALLBACK_URL": REDIRECT_URI,
    "POWERTOOLS_SERVICE_NAME": "servicenow-oauth",
    "POWERTOOLS_METRICS_NAMESPACE": "ServiceNowOAuth",
}


def run(spec: dict[str, Any], emulator: ServiceNowEmulator) -> str:
    """The entry point's whole output at root DEBUG (stdout and stderr), after it ran to the end. A failure shows
    its tail with every known secret masked: this test's own output must not leak what it looks for."""
    done = subprocess.run(
        [sys.executable, "-m", "tests.debug_entry", json.dumps(spec)],
        cwd=ROOT,
        env={**os.environ, **ENVIRONMENT, "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = done.stdout + done.stderr
    if done.returncode != 0:
        tail = output[-2000:]
        for value in needles(emulator):
            tail = tail.replace(value, value[:4] + "…")
        pytest.fail(f"exit {done.returncode}: {tail}")
    assert f"ROOT-LEVEL {logging.DEBUG}" in output  # the root logger was at DEBUG to the end
    return output


def needles(emulator: ServiceNowEmulator) -> set[str]:
    return secret_values(emulator) | {STATE_KEY}


def leaked(output: str, emulator: ServiceNowEmulator) -> list[str]:
    """Prefixes only of the secret values found."""
    return sorted(value[:4] + "…" for value in needles(emulator) if value in output)


@pytest.fixture
def world(aws: str, secretsmanager: Any, emulator: ServiceNowEmulator) -> Any:
    secretsmanager.create_secret(Name="servicenow-oauth-state-key", SecretString=STATE_KEY)
    add_due_connection(secretsmanager, emulator, "prod")
    return secretsmanager


def sweep() -> dict[str, Any]:
    return {"module": "handlers.refresh", "events": [json.loads((EVENTS / "schedule.json").read_text())]}


def worker() -> dict[str, Any]:
    record = json.loads((EVENTS / "sqs-refresh.json").read_text())["Records"][0]
    record["body"] = json.dumps({"connection": "prod"})
    return {"module": "handlers.worker", "events": [{"Records": [record]}]}


def dashboard() -> dict[str, Any]:
    return {"module": "handlers.dashboard", "events": [json.loads((EVENTS / "dashboard.json").read_text())]}


def callback() -> dict[str, Any]:
    link = sign_authorize_link(STATE_KEY.encode(), API, "prod", datetime.now(UTC))
    query = dict(parse_qsl(urlsplit(link).query))
    return {"module": "handlers.callback", "name": "prod", "consent": query}


def cli() -> dict[str, Any]:
    return {"cli": ["refresh", "prod"]}


PATHS = {"sweep": sweep, "worker": worker, "dashboard": dashboard, "callback": callback, "cli": cli}


@pytest.mark.parametrize("path", PATHS)
def test_no_secret_reaches_the_output_at_root_debug(world: Any, emulator: ServiceNowEmulator, path: str) -> None:
    before = emulator.token_requests()
    found = leaked(run(PATHS[path](), emulator), emulator)  # locals: pytest prints a failing call's arguments
    asked = emulator.token_requests() > before
    assert asked or path == "dashboard", "the path never reached ServiceNow"
    assert not found, f"secret values at root DEBUG (prefixes): {found}"


def test_rotation_at_root_debug_leaks_nothing(
    aws: str, secretsmanager: Any, emulator: ServiceNowEmulator, rotation_lambda: str
) -> None:
    secretsmanager.create_secret(Name=SECRET, SecretString=connection(emulator))
    token = "0b8f4a53-4a5e-4f61-9d1c-0d2a6c7e9b11"
    start_rotation(secretsmanager, rotation_lambda, token)
    events = [{"Step": step, "SecretId": SECRET, "ClientRequestToken": token} for step in STEPS]
    found = leaked(run({"module": "handlers.rotation", "events": events}, emulator), emulator)
    assert not found, f"secret values at root DEBUG (prefixes): {found}"
    stages = secretsmanager.describe_secret(SecretId=SECRET)["VersionIdsToStages"]
    assert "AWSCURRENT" in stages[token]  # the rotation really ran to the end


@pytest.mark.parametrize("path", ["sweep", "cli"])
def test_the_scan_sees_what_unpinned_libraries_print(world: Any, emulator: ServiceNowEmulator, path: str) -> None:
    """The planted regression: the same run with the libraries' loggers left at the root's DEBUG prints secrets."""
    found = leaked(run({**PATHS[path](), "unpin": True}, emulator), emulator)
    assert found, "the planted run printed no secret: the scan would miss a leak"
