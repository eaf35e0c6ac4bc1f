"""The leak check itself must be able to fail: a secret logged by a handler is found in what it scans."""

from __future__ import annotations

import importlib
from typing import Any

import pytest

from local.servicenow_emulator import ServiceNowEmulator
from tests.conftest import CLIENT_SECRET


def test_a_secret_logged_by_a_handler_is_seen_by_the_leak_check(
    aws: str, emulator: ServiceNowEmulator, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("POWERTOOLS_SERVICE_NAME", "servicenow-oauth")
    handler: Any = importlib.reload(importlib.import_module("handlers.refresh"))
    # Bypass redaction on purpose (a key the redactor does not know, a value that is not token-shaped).
    handler.logger.info("deliberate leak", extra={"harmless_looking": CLIENT_SECRET})
    out, _ = capfd.readouterr()
    assert CLIENT_SECRET in emulator.secret_values()
    assert CLIENT_SECRET in out  # so leak_check, which scans this same output, would fail such a test
