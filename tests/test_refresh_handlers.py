"""The scheduled refresher and the SQS worker as Lambda handlers, on events from events/."""

from __future__ import annotations

import copy
import importlib
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest
from aws_lambda_powertools.utilities.batch.exceptions import BatchProcessingError

from core.clock import to_iso
from core.servicenow import OAuthApp, ServiceNowClient, build_session
from local.servicenow_emulator import ServiceNowEmulator
from tests.conftest import CLIENT_ID, CLIENT_SECRET, REGION
from tests.test_callback import FakeContext

EVENTS = Path(__file__).resolve().parent.parent / "events"
PREFIX = "servicenow-oauth/"


@pytest.fixture
def env(aws: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SERVICENOW_ALLOWED_HOSTS", "127.0.0.1")
    monkeypatch.setenv("POWERTOOLS_SERVICE_NAME", "servicenow-oauth")
    monkeypatch.setenv("POWERTOOLS_METRICS_NAMESPACE", "ServiceNowOAuth")


def add_due_connection(secretsmanager: Any, emulator: ServiceNowEmulator, name: str) -> str:
    token = ServiceNowClient(build_session()).password_grant(
        OAuthApp(emulator.url, CLIENT_ID, CLIENT_SECRET), username="svc.integration", password="Pa55w0rd-emulator"
    )
    document = {
        "instanceUrl": emulator.url,
        "clientId": CLIENT_ID,
        "clientSecret": CLIENT_SECRET,
        "status": "active",
        "accessToken": token.access_token,
        "refreshToken": token.refresh_token,
        "accessTokenExpiresAt": to_iso(datetime.now(UTC) + timedelta(seconds=60)),
        "refreshTokenExpiresAt": to_iso(datetime.now(UTC) + timedelta(days=99)),
    }
    secretsmanager.create_secret(Name=f"{PREFIX}{name}", SecretString=json.dumps(document))
    return token.access_token


def expiry(secretsmanager: Any, name: str) -> datetime:
    value = secretsmanager.get_secret_value(SecretId=f"{PREFIX}{name}", VersionStage="AWSCURRENT")
    return datetime.fromisoformat(json.loads(value["SecretString"])["accessTokenExpiresAt"].replace("Z", "+00:00"))


def test_scheduled_sweep_refreshes_due_connections(
    env: None, secretsmanager: Any, emulator: ServiceNowEmulator, leak_check: list
) -> None:
    add_due_connection(secretsmanager, emulator, "prod")
    import handlers.refresh

    handler = importlib.reload(handlers.refresh)
    counts = handler.lambda_handler(json.loads((EVENTS / "schedule.json").read_text()), FakeContext())
    assert counts == {"refreshed": 1}
    assert expiry(secretsmanager, "prod") > datetime.now(UTC) + timedelta(minutes=20)


def test_many_due_connections_fan_out_through_sqs(
    env: None,
    aws: str,
    secretsmanager: Any,
    emulator: ServiceNowEmulator,
    monkeypatch: pytest.MonkeyPatch,
    leak_check: list,
) -> None:
    sqs = boto3.client("sqs", endpoint_url=aws, region_name=REGION)
    queue_url = sqs.create_queue(QueueName="refresh")["QueueUrl"]
    monkeypatch.setenv("REFRESH_QUEUE_URL", queue_url)
    monkeypatch.setenv("FAN_OUT_ABOVE", "2")
    names = [f"c{i}" for i in range(5)]
    for name in names:
        add_due_connection(secretsmanager, emulator, name)
    import handlers.refresh
    import handlers.worker

    counts = importlib.reload(handlers.refresh).lambda_handler({}, FakeContext())
    assert counts == {"refreshed": 2, "queued": 3}  # the sweep refreshes FAN_OUT_ABOVE itself, queues the rest
    queued = [name for name in names if expiry(secretsmanager, name) < datetime.now(UTC) + timedelta(minutes=2)]
    assert len(queued) == 3

    messages: list[dict[str, Any]] = []
    while len(messages) < 3:
        answer = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=1)
        messages += answer.get("Messages", [])
    template = json.loads((EVENTS / "sqs-refresh.json").read_text())["Records"][0]
    records = []
    for message in messages:
        record = copy.deepcopy(template)
        record.update(messageId=message["MessageId"], receiptHandle=message["ReceiptHandle"], body=message["Body"])
        records.append(record)
    poison = copy.deepcopy(template)
    poison.update(messageId="poison-1", body="not json")
    gone = copy.deepcopy(template)
    gone.update(messageId="gone-1", body=json.dumps({"connection": "deleted-meanwhile"}))

    worker = importlib.reload(handlers.worker)
    response = worker.lambda_handler({"Records": [*records, poison, gone]}, FakeContext())
    assert response == {"batchItemFailures": [{"itemIdentifier": "poison-1"}]}
    assert all(expiry(secretsmanager, name) > datetime.now(UTC) + timedelta(minutes=20) for name in names)
    assert sorted(json.loads(message["Body"])["connection"] for message in messages) == sorted(queued)  # names only


def test_a_sweep_short_of_time_starts_no_refresh_it_might_not_finish_and_queues_them(
    env: None, aws: str, secretsmanager: Any, emulator: ServiceNowEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sweep whose remaining time is below one worst-case attempt (75 s) hands the due connections to the
    queue instead of starting them (a timed-out sweep would be cut off mid-write)."""
    sqs = boto3.client("sqs", endpoint_url=aws, region_name=REGION)
    queue_url = sqs.create_queue(QueueName="refresh")["QueueUrl"]
    monkeypatch.setenv("REFRESH_QUEUE_URL", queue_url)
    for name in ("a", "b"):
        add_due_connection(secretsmanager, emulator, name)
    import handlers.refresh

    handler = importlib.reload(handlers.refresh)
    before = emulator.token_requests()
    assert handler.lambda_handler({}, FakeContext(remaining_ms=60_000)) == {"queued": 2}
    assert emulator.token_requests() == before
    bodies = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=1)["Messages"]
    assert sorted(json.loads(m["Body"])["connection"] for m in bodies) == ["a", "b"]
    assert handler.lambda_handler({}, FakeContext(remaining_ms=200_000)) == {"refreshed": 2}


def test_a_worker_short_of_time_starts_no_refresh_and_hands_the_record_back(
    env: None, aws: str, secretsmanager: Any, emulator: ServiceNowEmulator
) -> None:
    """Found by review: the worker refreshed its records one after another with no time guard, so the third of a
    slow batch could be cut off by the timeout between ServiceNow's answer and the write. Like the sweep, it now
    starts no refresh it might not finish; the record is reported failed, so SQS delivers it again."""
    template = json.loads((EVENTS / "sqs-refresh.json").read_text())["Records"][0]
    records = []
    for name in ("a", "b"):
        add_due_connection(secretsmanager, emulator, name)
        records.append({**template, "messageId": f"m-{name}", "body": json.dumps({"connection": name})})

    class SlowBatch(FakeContext):
        """The first record leaves 60 s of the invocation: too little to start the second."""

        def get_remaining_time_in_millis(self) -> int:
            self.remaining_ms, left = 60_000, self.remaining_ms
            return left

    import handlers.worker

    worker = importlib.reload(handlers.worker)
    before = emulator.token_requests()
    response = worker.lambda_handler({"Records": records}, SlowBatch(remaining_ms=280_000))
    assert response == {"batchItemFailures": [{"itemIdentifier": "m-b"}]}
    assert emulator.token_requests() == before + 1
    assert expiry(secretsmanager, "a") > datetime.now(UTC) + timedelta(minutes=20)


def emitted(out: str) -> dict[str, Any]:
    """The metrics of the EMF blob a handler printed."""
    [blob] = [json.loads(line) for line in out.splitlines() if line.startswith('{"_aws"')]
    names = {m["Name"] for m in blob["_aws"]["CloudWatchMetrics"][0]["Metrics"]}
    return {name: blob[name] for name in names}


def test_every_sweep_emits_the_figures_the_silence_alarms_watch(
    env: None, secretsmanager: Any, emulator: ServiceNowEmulator, capsys: pytest.CaptureFixture[str]
) -> None:
    """RefresherSilentAlarm and AccessTokenExpiringAlarm treat a missing figure as breaching, so every sweep sends
    both, with no connection at all too; a connection waiting for a person does not pin the least time at 0."""
    import handlers.refresh

    handler = importlib.reload(handlers.refresh)
    assert handler.lambda_handler({}, FakeContext()) == {}
    figures = emitted(capsys.readouterr().out)
    assert figures["SweepsCompleted"] == [1.0] and figures["MinAccessTokenSecondsLeft"] == [86_400.0]

    add_due_connection(secretsmanager, emulator, "live")
    unconsented = {"instanceUrl": emulator.url, "clientId": CLIENT_ID, "clientSecret": CLIENT_SECRET}
    secretsmanager.create_secret(Name=f"{PREFIX}waiting", SecretString=json.dumps(unconsented))
    counts = handler.lambda_handler({}, FakeContext())
    assert counts == {"refreshed": 1, "needs_person": 1}
    figures = emitted(capsys.readouterr().out)
    assert figures["SweepsCompleted"] == [1.0] and 1700 < figures["MinAccessTokenSecondsLeft"][0] <= 1800


def test_a_record_failing_on_its_last_delivery_is_announced_by_name(
    env: None, aws: str, secretsmanager: Any, emulator: ServiceNowEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by review (#26): the DeadLetter alarm notifies only on its change to ALARM, so dead letters arriving
    period after period reached nobody. The worker announces each record it fails on the last delivery SQS makes
    (the queue's maxReceiveCount) with an event naming the connection; earlier deliveries announce nothing."""
    sqs = boto3.client("sqs", endpoint_url=aws, region_name=REGION)
    events = boto3.client("events", endpoint_url=aws, region_name=REGION)
    inbox = sqs.create_queue(QueueName="inbox")["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=inbox, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    events.put_rule(Name="dead", EventPattern=json.dumps({"detail-type": ["ServiceNow Refresh Dead-Lettered"]}))
    events.put_targets(Rule="dead", Targets=[{"Id": "inbox", "Arn": arn}])
    monkeypatch.setenv("MAX_RECEIVE_COUNT", "5")
    add_due_connection(secretsmanager, emulator, "prod")
    import handlers.worker

    worker = importlib.reload(handlers.worker)
    template = json.loads((EVENTS / "sqs-refresh.json").read_text())["Records"][0]
    short = FakeContext(remaining_ms=30_000)  # too little time for a refresh: the record fails (NotStarted)
    for receives in ("4", "5"):
        record = copy.deepcopy(template)
        record["attributes"]["ApproximateReceiveCount"] = receives
        with pytest.raises(BatchProcessingError):  # a batch whose every record failed fails the invocation
            worker.lambda_handler({"Records": [record]}, short)
    [message] = sqs.receive_message(QueueUrl=inbox, MaxNumberOfMessages=10, WaitTimeSeconds=1)["Messages"]
    detail = json.loads(message["Body"])["detail"]
    assert detail == {"change": "dead_lettered", "connection": "prod", "reason": "NotStarted"}
