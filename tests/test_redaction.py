"""Redaction by construction: a whole secret document logged through every handler's logger leaks nothing."""

from __future__ import annotations

import importlib
import io
import json
from typing import Any

import pytest

from core.redaction import REDACTED, redact, redact_text
from tests.conftest import rebind

DOCUMENT = {
    "instanceUrl": "https://acme.service-now.com",
    "clientId": "3f1c0a7e9b2d4c6e8a0b1c2d3e4f5a6b",
    "clientSecret": "Zx81!q-not-token-shaped",
    "password": "hunter2",
    "accessToken": "30huTHr_W_YvZvuG0PKBiJ5t9nGlfNVrfUxhEBt1sR5rCY6gh_v0nr_vV8kEJILI",
    "refreshToken": "rDKSRhnugVt8GkUCchl4S6wVyUeatjJDqE6bCshamx-i6W6tQbBcBjJHoOuOjrSP",
    "status": "active",
}
SECRETS = [DOCUMENT[key] for key in ("clientSecret", "password", "accessToken", "refreshToken")]
HANDLERS = ["handlers.callback", "handlers.refresh", "handlers.worker", "handlers.rotation"]


@pytest.fixture
def handler_env(aws: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POWERTOOLS_SERVICE_NAME", "servicenow-oauth")
    monkeypatch.setenv("POWERTOOLS_METRICS_NAMESPACE", "ServiceNowOAuth")


def log_everything(logger: Any) -> None:
    text = json.dumps(DOCUMENT)
    logger.info("document as extra", extra={"document": DOCUMENT})
    logger.info(DOCUMENT)
    logger.info(f"document as text {text}")
    logger.info(text)
    logger.warning("form body client_secret=%s&refresh_token=%s", DOCUMENT["clientSecret"], DOCUMENT["refreshToken"])
    logger.info("header Authorization: Bearer %s", DOCUMENT["accessToken"])
    logger.info("a bare token %s in a sentence", DOCUMENT["refreshToken"])
    try:
        raise ValueError(f"failed with {text}")
    except ValueError:
        logger.exception("exception carrying the document")


@pytest.mark.parametrize("module", HANDLERS)
def test_every_handler_logger_redacts_a_whole_secret_document(handler_env: None, module: str) -> None:
    logger = importlib.reload(importlib.import_module(module)).logger
    buffer = io.StringIO()
    previous = rebind(logger.registered_handler, buffer)  # the handler's own stream, formatter and all
    try:
        log_everything(logger)
    finally:
        rebind(logger.registered_handler, previous)
    output = buffer.getvalue()
    lines = output.strip().splitlines()
    assert len(lines) == 8 and all(json.loads(line) for line in lines)
    for secret in SECRETS:
        assert secret not in output, f"{module} leaked a value"
    assert "acme.service-now.com" in output and "active" in output  # the useful parts survive


def test_ids_arns_and_times_survive() -> None:
    text = (
        "request 9bb0ea6a-096a-43eb-b3da-07a93cbc1b66 arn:aws:secretsmanager:us-east-1:123456789012:secret:"
        "servicenow-oauth/prod-AbCdEf at 2026-11-22T18:30:00Z error_code=ThrottlingException grant=authorization_code"
    )
    assert redact_text(text) == text


def test_structures_are_redacted_by_key_at_any_depth() -> None:
    value = {"outer": [{"refresh_token": "x"}, {"Authorization": "Bearer y"}], "connection": "prod"}
    assert redact(value) == {"outer": [{"refresh_token": REDACTED}, {"Authorization": REDACTED}], "connection": "prod"}
