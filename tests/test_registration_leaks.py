"""Found by review: a ServiceNow admin password outside latin-1 escaped `servicenow-client` in an exception's repr
(requests encodes Basic auth as latin-1); Basic auth is now UTF-8 (RFC 7617) and the CLI prints a bug's type only."""

from __future__ import annotations

import io
import logging
import traceback
from collections.abc import Iterator
from typing import Any

import pytest

from admin.cli import main
from local.servicenow_emulator import ServiceNowEmulator

API = "https://abc123.execute-api.us-east-1.amazonaws.com"
# A real ServiceNow password may hold any character; this one has a euro sign (not latin-1).
NON_LATIN1_PASSWORD = "Adm1n-pass€word-2026"


@pytest.fixture
def instance(aws: str, secretsmanager: Any) -> Iterator[ServiceNowEmulator]:
    secretsmanager.create_secret(Name="servicenow-oauth-state-key", SecretString="k" * 64)
    with ServiceNowEmulator() as server:
        server.add_user("euro.admin", NON_LATIN1_PASSWORD, roles={"admin"})
        yield server


def leaked(instance: ServiceNowEmulator, *texts: str) -> list[str]:
    values = {value for value in instance.secret_values() if len(value) >= 8}
    return [value[:4] + "…" for value in values if any(value in text for text in texts)]


def test_a_non_latin1_admin_password_works_and_never_escapes(
    instance: ServiceNowEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    out, err = io.StringIO(), io.StringIO()
    argv = [
        "--allowed-hosts", "*.service-now.com,127.0.0.1",
        "servicenow-client", "prod", "--instance-url", instance.url, "--api-url", API,
    ]  # fmt: skip
    escaped: BaseException | None = None
    try:
        main(argv, out=out, err=err, stdin=io.StringIO(f"euro.admin\n{NON_LATIN1_PASSWORD}\n"))
    except BaseException as error:  # what the operator's terminal / a wrapper's log would show
        escaped = error
    texts = {"stdout": out.getvalue(), "stderr": err.getvalue(), "logs": caplog.text}
    if escaped is not None:
        texts.update(
            {"str(exception)": str(escaped), "repr(exception)": repr(escaped),
             "traceback": "".join(traceback.format_exception(escaped))}
        )  # fmt: skip
    where = {label: leaked(instance, text) for label, text in texts.items() if leaked(instance, text)}
    assert not where, (type(escaped).__name__, where)
    assert escaped is None and err.getvalue() == "", err.getvalue()
    assert "created the Application Registry entry" in out.getvalue()
