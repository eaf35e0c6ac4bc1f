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


@pytest.mark.parametrize(
    ("fan_out_above", "remaining_ms"),
    [("0", 240_000), (None, 60_000)],
    ids=["FanOutAbove=0 queues every due connection", "a sweep short of time defers it to the queue"],
)
def test_a_sweep_that_queues_an_expired_connection_reports_it_expired(
    env: None,  # noqa: F811
    aws: str,
    secretsmanager: Any,
    emulator: ServiceNowEmulator,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    fan_out_above: str | None,
    remaining_ms: int,
) -> None:
    """The sweep queues a connection that has had no access token for an hour (FanOutAbove=0, allowed by the
    template, or too little time left): its "queued" outcome carried no expiry, so the figure said 86,400 ("none
    should hold one") and AccessTokenExpiringAlarm stayed OK for as long as the worker did not get to it."""
    sqs = boto3.client("sqs", endpoint_url=aws, region_name=REGION)
    monkeypatch.setenv("REFRESH_QUEUE_URL", sqs.create_queue(QueueName="refresh")["QueueUrl"])
    if fan_out_above is not None:
        monkeypatch.setenv("FAN_OUT_ABOVE", fan_out_above)
    add_expired_connection(secretsmanager, emulator, "dead")
    import handlers.refresh

    handler = importlib.reload(handlers.refresh)
    assert handler.lambda_handler({}, FakeContext(remaining_ms=remaining_ms)) == {"queued": 1}
    figures = emitted(capsys.readouterr().out)
    assert figures["SweepsCompleted"] == [1.0]
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
