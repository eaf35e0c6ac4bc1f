"""Found by an adversarial review of #26 "silence is an alarm": a sweep that queued, deferred or could not read a
connection dropped its access-token expiry, and reported 86,400 s left (no token to hold) for tokens already dead."""

from __future__ import annotations

import importlib
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError

from core.clock import to_iso
from local.servicenow_emulator import ServiceNowEmulator
from tests.conftest import REGION
from tests.test_refresh_handlers import PREFIX, FakeContext, add_due_connection, emitted, env  # noqa: F401


def add_expired_connection(secretsmanager: Any, emulator: ServiceNowEmulator, name: str) -> None:
    """A refreshable connection whose access token died an hour ago (instance down for hours, say)."""
    add_due_connection(secretsmanager, emulator, name)
    value = json.loads(secretsmanager.get_secret_value(SecretId=f"{PREFIX}{name}")["SecretString"])
    value["accessTokenExpiresAt"] = to_iso(datetime.now(UTC) - timedelta(hours=1))
    secretsmanager.put_secret_value(SecretId=f"{PREFIX}{name}", SecretString=json.dumps(value))


def test_a_sweep_that_queues_an_expired_connection_reports_it_expired(
    env: None,  # noqa: F811
    aws: str,
    secretsmanager: Any,
    emulator: ServiceNowEmulator,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """FanOutAbove=0 (allowed by the template): the sweep queues every due connection. The one it queued has had
    no access token for an hour, yet the sweep's MinAccessTokenSecondsLeft says 86,400 ("none should hold one"),
    so AccessTokenExpiringAlarm stays OK for as long as the worker does not get to it (throttled, failing)."""
    sqs = boto3.client("sqs", endpoint_url=aws, region_name=REGION)
    monkeypatch.setenv("REFRESH_QUEUE_URL", sqs.create_queue(QueueName="refresh")["QueueUrl"])
    monkeypatch.setenv("FAN_OUT_ABOVE", "0")
    add_expired_connection(secretsmanager, emulator, "dead")
    import handlers.refresh

    handler = importlib.reload(handlers.refresh)
    assert handler.lambda_handler({}, FakeContext()) == {"queued": 1}
    figures = emitted(capsys.readouterr().out)
    assert figures["SweepsCompleted"] == [1.0]
    assert figures["MinAccessTokenSecondsLeft"][0] < 60, figures["MinAccessTokenSecondsLeft"]


def test_a_sweep_short_of_time_that_defers_an_expired_connection_reports_it_expired(
    env: None,  # noqa: F811
    aws: str,
    secretsmanager: Any,
    emulator: ServiceNowEmulator,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Default FanOutAbove: a sweep short of time hands its due connections to the queue ("queued" outcomes carry
    no expiry), so the expired connection is left out of the minimum and the figure is 86,400."""
    sqs = boto3.client("sqs", endpoint_url=aws, region_name=REGION)
    monkeypatch.setenv("REFRESH_QUEUE_URL", sqs.create_queue(QueueName="refresh")["QueueUrl"])
    add_expired_connection(secretsmanager, emulator, "dead")
    import handlers.refresh

    handler = importlib.reload(handlers.refresh)
    assert handler.lambda_handler({}, FakeContext(remaining_ms=60_000)) == {"queued": 1}
    figures = emitted(capsys.readouterr().out)
    assert figures["MinAccessTokenSecondsLeft"][0] < 60, figures["MinAccessTokenSecondsLeft"]


def test_a_sweep_that_cannot_read_a_connection_whose_tags_say_it_expired_reports_it_expired(
    env: None,  # noqa: F811
    secretsmanager: Any,
    emulator: ServiceNowEmulator,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A healthy sweep writes the connection's health tags (access_expires). An hour later (no sweep since) the
    batch read is refused (throttled past retries, or BatchGetSecretValue denied): the listing's tags say the token
    died half an hour ago, but the `_unread` outcome carries no expiry, so the figure is 86,400."""
    add_due_connection(secretsmanager, emulator, "prod")
    import handlers.refresh

    handler = importlib.reload(handlers.refresh)
    assert handler.lambda_handler({}, FakeContext()) == {"refreshed": 1}
    capsys.readouterr()

    later = datetime.now(UTC) + timedelta(hours=1)
    monkeypatch.setattr(handler.refresher, "clock", lambda: later)
    monkeypatch.setattr(handler, "utc_now", lambda: later)

    def refused(**_: Any) -> Any:
        raise ClientError({"Error": {"Code": "ThrottlingException", "Message": "Rate exceeded"}}, "BatchGetSecretValue")

    monkeypatch.setattr(handler.refresher.store.client, "batch_get_secret_value", refused)
    counts = handler.lambda_handler({}, FakeContext())
    assert counts == {"failed": 1}
    figures = emitted(capsys.readouterr().out)
    assert figures["SweepsCompleted"] == [1.0]
    assert figures["MinAccessTokenSecondsLeft"][0] < 60, figures["MinAccessTokenSecondsLeft"]
