"""The test world: a real moto_server process for AWS and the ServiceNow emulator on 127.0.0.1.

Every test that touches a credential also gets `leak_check`, which fails the test if any value the
emulator issued or was configured with (token, code, client secret, password) shows up in logs,
captured output or the exceptions the test saw.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import os
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest
import requests
from botocore.config import Config

from core.redaction import quiet_libraries
from local.servicenow_emulator import ServiceNowEmulator, press_consent  # noqa: F401 (re-exported for tests)

REGION = "us-east-1"
# The libraries' loggers kept at WARNING, as every entry point keeps them (handlers.runtime.build_logger,
# admin.cli.main); tests/test_debug_logs.py proves each entry point does so in a fresh interpreter at root DEBUG.
quiet_libraries()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """A real moto server process for the whole session; reset between tests by `aws`."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            if requests.get(f"{url}/moto-api/", timeout=1).status_code < 500:
                break
        except requests.RequestException:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError("moto_server did not start")
        time.sleep(0.1)
    os.environ.update(
        {
            "AWS_ENDPOINT_URL": url,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_SESSION_TOKEN": "testing",
        }
    )
    yield url
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()


@pytest.fixture
def aws(moto_server: str) -> str:
    """A clean moto state for each test."""
    requests.post(f"{moto_server}/moto-api/reset", timeout=10).raise_for_status()
    return moto_server


def register_rotation_lambda(url: str, name: str = "rotation") -> str:
    """moto stages AWSPENDING only for a secret with a rotation Lambda; with `use_docker: false` it registers
    one without running it, and the test then plays Secrets Manager's part by calling the real handler's steps."""
    requests.post(f"{url}/moto-api/config", json={"lambda": {"use_docker": False}}, timeout=5).raise_for_status()
    iam = boto3.client("iam", endpoint_url=url, region_name=REGION)
    role = iam.create_role(RoleName=name, AssumeRolePolicyDocument="{}")["Role"]["Arn"]
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("handlers/rotation.py", "# stand-in: moto registers it, the test runs the real one\n")
    functions = boto3.client("lambda", endpoint_url=url, region_name=REGION)
    created = functions.create_function(
        FunctionName=name,
        Runtime="python3.12",
        Role=role,
        Handler="handlers.rotation.lambda_handler",
        Code={"ZipFile": archive.getvalue()},
    )
    return str(created["FunctionArn"])


@pytest.fixture
def rotation_lambda(aws: str) -> str:
    return register_rotation_lambda(aws)


@pytest.fixture
def secretsmanager(aws: str):  # type: ignore[no-untyped-def]
    return boto3.client(
        "secretsmanager", endpoint_url=aws, region_name=REGION, config=Config(retries={"mode": "standard"})
    )


@dataclass
class FakeClock:
    """One clock for the code under test (datetime) and the emulator (epoch seconds)."""

    moment: datetime = field(default_factory=lambda: datetime(2026, 11, 22, 12, 0, tzinfo=UTC))

    def now(self) -> datetime:
        return self.moment

    def time(self) -> float:
        return self.moment.timestamp()

    def advance(self, seconds: float) -> None:
        self.moment += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


CLIENT_ID = "3f1c0a7e9b2d4c6e8a0b1c2d3e4f5a6b"
CLIENT_SECRET = "emulator-client-secret-Zx81!q"
REDIRECT_URI = "http://127.0.0.1:9/callback"


@pytest.fixture
def emulator(clock: FakeClock) -> Iterator[ServiceNowEmulator]:
    """A fresh emulator per test, sharing the test's clock."""
    with ServiceNowEmulator(clock=clock.time) as server:
        server.register_client(CLIENT_ID, CLIENT_SECRET, [REDIRECT_URI])
        server.add_user("svc.integration", "Pa55w0rd-emulator")
        yield server


@pytest.fixture
def kms(aws: str) -> Any:
    """KMS on the moto server (the `aws` fixture's environment)."""
    return boto3.client("kms")


def new_key(kms: Any, spec: str = "RSA_2048", usage: str = "SIGN_VERIFY") -> str:
    """A fresh KMS key (by default one that signs RS256, as a JWT connection's); its ARN."""
    return str(kms.create_key(KeySpec=spec, KeyUsage=usage)["KeyMetadata"]["Arn"])


def secret_values(emulator: ServiceNowEmulator) -> set[str]:
    """Everything secret the emulator knows: configured secrets plus every token and code it issued."""
    return {value for value in emulator.secret_values() if value and len(value) >= 8}


class _CurrentStdout:
    """Writes to whatever sys.stdout is now (each test's capture), not the one of first import."""

    def write(self, text: str) -> int:
        return sys.stdout.write(text)

    def flush(self) -> None:
        sys.stdout.flush()


@pytest.fixture(autouse=True)
def _powertools_logs_to_current_stdout() -> None:
    """Powertools binds its handler to the sys.stdout of the moment it was created; point it at the
    current one so pytest's capture (and `leak_check`) sees the handlers' log lines."""
    for handler in logging.getLogger("servicenow-oauth").handlers:
        if isinstance(handler, logging.StreamHandler):
            rebind(handler, _CurrentStdout())


def rebind(handler: logging.StreamHandler, stream: Any) -> Any:  # type: ignore[type-arg]
    """Point a handler at another stream without flushing the old one (pytest may have closed it)."""
    with handler.lock or contextlib.nullcontext():
        previous, handler.stream = handler.stream, stream
    return previous


@pytest.fixture
def leak_check(emulator: ServiceNowEmulator, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]):  # type: ignore[no-untyped-def]
    """Fail the test if a secret value appears in any log record, captured output or recorded exception."""
    caplog.set_level(logging.DEBUG)  # the root at DEBUG, as Lambda's ApplicationLogLevel DEBUG sets it
    seen_exceptions: list[BaseException] = []
    yield seen_exceptions
    out, err = capfd.readouterr()
    haystacks = [caplog.text, out, err, *(str(e) for e in seen_exceptions), *(repr(e) for e in seen_exceptions)]
    haystacks += [str(record.args) for record in caplog.records]
    leaked = [value[:4] + "…" for value in secret_values(emulator) if any(value in text for text in haystacks)]
    assert not leaked, f"secret values leaked into logs/output/exceptions (prefixes): {leaked}"


# ------------------------------------------------------------------ every AWS call recorded (tests/permissions.py)
import permissions  # noqa: E402

permissions.install()


@functools.cache
def _checker() -> permissions.Checker:
    """One translation of the template per session, for the tests and for the session's end."""
    from local.template_check import translate

    return permissions.Checker(translate())


@pytest.fixture(scope="session")
def permission_checker() -> permissions.Checker:
    return _checker()


@pytest.fixture(autouse=True)
def _aws_calls_recorded(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every AWS call the code under test made in this test is allowed by the role that made it
    (tests/permissions.py: the role from the SAM-translated template, the operator's and consumers' in docs/)."""
    permissions.RECORDER.take()
    permissions.RECORDER.lookup.cache.clear()
    yield
    calls = [call for call in permissions.RECORDER.take() if call.actor != permissions.SETUP]
    if not calls:
        return
    checker = request.getfixturevalue("permission_checker")
    verdicts = [verdict for call in calls + checker.invocations(calls) for verdict in checker.verdicts(call)]
    permissions.LEDGER.add(verdicts)
    denied = sorted({str(v) for v in verdicts if not v.decision.allowed})
    assert not denied, "AWS calls the role that made them does not allow:\n" + "\n".join(denied)


_PERMISSIONS_TABLE: dict[str, Any] = {}
README = Path(__file__).resolve().parent.parent / "README.md"
TABLE_START, TABLE_END = "<!-- permissions table: written by make test -->", "<!-- end of permissions table -->"


def pytest_deselected(items: list[Any]) -> None:
    _PERMISSIONS_TABLE["partial"] = True


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """After the whole suite, least privilege measured: every statement of every role is used by some test's
    call or explained (permissions.UNUSED_BECAUSE), and the README's table is this run's."""
    config = session.config
    whole = (
        exitstatus == 0
        and not _PERMISSIONS_TABLE.get("partial")
        and not config.option.keyword
        and not config.option.markexpr
        and [Path(arg).resolve() for arg in config.args] == [Path(config.rootpath, "tests").resolve()]
    )
    if not whole:
        return
    table, unexplained = permissions.statement_table(_checker(), permissions.LEDGER.used)
    modelled = permissions.modelled_table(permissions.LEDGER.modelled)
    Path(config.rootpath, "test-artifacts").mkdir(exist_ok=True)
    Path(config.rootpath, "test-artifacts", "permissions.md").write_text(table + "\n" + modelled)
    used = {
        actor: {label: sorted(actions) for label, actions in sorted(labels.items())}
        for actor, labels in sorted(permissions.LEDGER.used.items())
    }
    Path(config.rootpath, "test-artifacts", "permissions-used.json").write_text(json.dumps(used, indent=1))
    text = README.read_text()
    written = (
        text[text.index(TABLE_START) + len(TABLE_START) : text.index(TABLE_END)].strip() if TABLE_START in text else ""
    )
    problems = [f"statement used by no test and not explained (permissions.UNUSED_BECAUSE): {u}" for u in unexplained]
    if written != table.strip():
        problems.append(
            "README.md's permissions table is not this run's: copy the first table of "
            "test-artifacts/permissions.md into it"
        )
    _PERMISSIONS_TABLE["problems"] = problems
    if problems:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for problem in _PERMISSIONS_TABLE.get("problems", []):
        terminalreporter.write_line(f"PERMISSIONS FAILED: {problem}", red=True)
    ledger = permissions.LEDGER
    if ledger.actors:
        terminalreporter.write_line(
            f"AWS authorizations checked: {sum(ledger.actors.values())} "
            f"({', '.join(f'{k} {v}' for k, v in sorted(ledger.actors.items()))}); denied: {ledger.denied}"
        )
