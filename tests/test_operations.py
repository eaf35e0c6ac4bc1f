"""Operations on moto + the emulator with an injected clock: bounded failure cost, health in tags,
change events observed through a real EventBridge rule (to an SQS queue), client-secret rollover."""

from __future__ import annotations

import io
import json
from datetime import timedelta
from typing import Any

import boto3
import pytest

from admin.cli import main as cli
from core.health import Health
from core.monitor import SOURCE, Monitor
from core.refresh import Refresher, RefreshPolicy
from core.sweep import Sweep
from local.servicenow_emulator import ServiceNowEmulator
from local.template_check import translate
from tests.conftest import CLIENT_ID, CLIENT_SECRET, REGION, FakeClock
from tests.test_refresh import World

PREFIX = "servicenow-oauth/"


class Ops(World):
    """World plus a real EventBridge rule that delivers this project's events to an SQS queue."""

    def __init__(self, secretsmanager: Any, emulator: ServiceNowEmulator, clock: FakeClock, aws: str) -> None:
        super().__init__(secretsmanager, emulator, clock)
        self.events = boto3.client("events", endpoint_url=aws, region_name=REGION)
        self.sqs = boto3.client("sqs", endpoint_url=aws, region_name=REGION)
        self.queue = self.sqs.create_queue(QueueName="servicenow-oauth-events")["QueueUrl"]
        queue_arn = self.sqs.get_queue_attributes(QueueUrl=self.queue, AttributeNames=["QueueArn"])["Attributes"][
            "QueueArn"
        ]
        self.events.put_rule(Name="all-changes", EventPattern=json.dumps({"source": [SOURCE]}))
        self.events.put_targets(Rule="all-changes", Targets=[{"Id": "queue", "Arn": queue_arn}])
        self.received: list[dict[str, Any]] = []

    def refresher(self, **policy: Any) -> Refresher:
        refresher = super().refresher(**policy)
        refresher.monitor = Monitor(self.sm, self.events, clock=self.clock.now, policy=refresher.policy)
        return refresher

    def sweep_every(self, minutes: int, hours: float, refresher: Refresher) -> list[Any]:
        outcomes = []
        for _ in range(int(hours * 60 / minutes)):
            self.clock.advance(minutes * 60)
            outcomes += Sweep(refresher).run()
        return outcomes

    def drain(self) -> list[dict[str, Any]]:
        """Events delivered since the last drain (all of them are also kept in `received`)."""
        new: list[dict[str, Any]] = []
        while True:
            answer = self.sqs.receive_message(QueueUrl=self.queue, MaxNumberOfMessages=10)
            messages = answer.get("Messages", [])
            if not messages:
                self.received += new
                return new
            for message in messages:
                new.append(json.loads(message["Body"]))
                self.sqs.delete_message(QueueUrl=self.queue, ReceiptHandle=message["ReceiptHandle"])

    def kinds(self) -> list[str]:
        return [event["detail"]["change"] for event in self.drain()]

    def tags(self, name: str = "prod") -> dict[str, str]:
        listed = self.sm.describe_secret(SecretId=f"{PREFIX}{name}").get("Tags", [])
        return {tag["Key"]: tag["Value"] for tag in listed}


@pytest.fixture
def ops(secretsmanager: Any, emulator: ServiceNowEmulator, clock: FakeClock, aws: str) -> Ops:
    return Ops(secretsmanager, emulator, clock, aws)


def test_a_day_of_hibernation_costs_few_requests_no_versions_and_one_recovery(ops: Ops, leak_check: list) -> None:
    ops.add()
    refresher = ops.refresher()
    Sweep(refresher).run()  # first sighting: health tags written
    ops.clock.advance(1500)
    ops.emulator.inject("hibernate", path="*", count=10**6)
    versions, requests_before = ops.versions(), ops.emulator.token_requests()

    outcomes = ops.sweep_every(5, 24, refresher)
    spent = ops.emulator.token_requests() - requests_before
    assert spent <= 40, f"{spent} token requests in 24 hours"
    assert ops.versions() == versions, "a failing connection added secret versions"
    assert {o.result for o in outcomes} <= {"failed", "backing_off"}
    health = Health.from_tags(ops.tags())
    assert health.failure_class == "unavailable" and health.consecutive_failures == spent
    assert ops.kinds() == ["failing"]  # once, not every sweep

    ops.emulator.clear_faults()
    attempted = []
    while not attempted:
        ops.clock.advance(300)
        attempted = [o for o in Sweep(refresher).run() if o.result != "backing_off"]
    assert [o.result for o in attempted] == ["refreshed"]  # the first attempt after the outage succeeds
    assert ops.kinds() == ["recovered"]
    assert Health.from_tags(ops.tags()).consecutive_failures == 0
    ops.sweep_every(5, 1, refresher)
    assert ops.kinds() == []
    leak_check.extend(json.dumps(event) for event in ops.received)
    leak_check.append(json.dumps(ops.tags()))


def test_a_rejected_credential_costs_one_request_and_one_event_forever(ops: Ops, leak_check: list) -> None:
    original = ops.add()
    refresher = ops.refresher()
    ops.clock.advance(1700)
    ops.emulator.revoke_user_tokens("svc.integration")
    before = ops.emulator.token_requests()
    outcomes = ops.sweep_every(5, 12, refresher)
    assert ops.emulator.token_requests() - before == 1
    assert ops.kinds() == ["reauthorization_required"]
    assert outcomes[0].result == "reauthorization_required"
    assert {o.result for o in outcomes[1:]} == {"needs_person"}
    _, document = ops.value()
    assert document["status"] == "reauthorization_required" and document["refreshToken"] == original.refresh_token
    leak_check.extend(json.dumps(event) for event in ops.received)


def test_refresh_token_expiring_is_announced_once(ops: Ops) -> None:
    ops.add()
    refresher = ops.refresher()
    ops.clock.advance(86 * 86400 + 60)
    ops.sweep_every(5, 2, refresher)
    assert ops.kinds().count("refresh_token_expiring") == 1


def run_cli(*argv: str, stdin: str = "") -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = cli(["--allowed-hosts", "127.0.0.1", *argv], out=out, err=err, stdin=io.StringIO(stdin))
    return code, out.getvalue(), err.getvalue()


def _listed(value: Any) -> list[str]:
    return value if isinstance(value, list) else [value]


def test_cli_list_shows_health_with_only_the_monitoring_policy(
    ops: Ops, monkeypatch: pytest.MonkeyPatch, leak_check: list
) -> None:
    ops.add()
    ops.add("other")
    ops.emulator.inject("server_error", count=10)
    ops.clock.advance(1700)
    Sweep(ops.refresher()).run()
    statements = translate()["Resources"]["MonitoringPolicy"]["Properties"]["PolicyDocument"]["Statement"]
    actions = [a for statement in statements for a in _listed(statement["Action"])]
    allowed = {action.split(":")[1] for action in actions}
    assert allowed == {"ListSecrets", "DescribeSecret", "GetResourcePolicy"}  # no secret value, no write

    made: list[str] = []
    real_client = boto3.client

    def counting_client(*args: Any, **kwargs: Any) -> Any:
        client = real_client(*args, **kwargs)
        client.meta.events.register("before-call.*.*", lambda model, **_: made.append(model.name))
        return client

    monkeypatch.setattr(boto3, "client", counting_client)
    code, out, err = run_cli("connections", "list")
    assert code == 0, err
    assert set(made) <= allowed, made
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["CONNECTION", "INSTANCE", "STATUS"]
    prod = next(line for line in lines if line.startswith("prod "))
    assert "active" in prod and "transient x1" in prod, out
    leak_check.append(out)


def test_client_secret_rollover_promotes_in_the_token_write(ops: Ops, leak_check: list) -> None:
    ops.add()
    assert run_cli("connections", "stage-secret", "prod", stdin="rolled-client-secret-2\n")[0] == 0
    refresher = ops.refresher()
    ops.clock.advance(1700)
    [outcome] = Sweep(refresher).run()  # ServiceNow still has the old secret: nothing changes, nothing is lost
    assert outcome.result == "refreshed" and not outcome.client_secret_promoted
    _, document = ops.value()
    assert document["clientSecret"] == CLIENT_SECRET and document["clientSecretNext"] == "rolled-client-secret-2"

    ops.emulator.set_client_secret(CLIENT_ID, "rolled-client-secret-2")  # the operator rotates it in ServiceNow
    ops.clock.advance(1700)
    [outcome] = Sweep(refresher).run()
    assert outcome.result == "refreshed" and outcome.client_secret_promoted
    _, document = ops.value()
    assert document["clientSecret"] == "rolled-client-secret-2" and "clientSecretNext" not in document
    assert ops.emulator.token_info(document["accessToken"])["active"]
    assert "client_secret_promoted" in ops.kinds()
    leak_check.extend(json.dumps(event) for event in ops.received)


def test_a_staged_secret_that_is_not_live_leaves_the_old_tokens(ops: Ops) -> None:
    original = ops.add(clientSecretNext="never-made-live-3")
    ops.emulator.set_client_secret(CLIENT_ID, "something-else-entirely")
    ops.clock.advance(1700)
    [outcome] = Sweep(ops.refresher()).run()
    assert outcome.result == "reauthorization_required"
    _, document = ops.value()
    assert document["refreshToken"] == original.refresh_token and document["accessToken"] == original.access_token
    assert document["clientSecret"] == CLIENT_SECRET and document["clientSecretNext"] == "never-made-live-3"


def test_events_and_tags_carry_no_secrets(ops: Ops) -> None:
    original = ops.add(clientSecretNext="staged-secret-value-4")
    refresher = ops.refresher()
    ops.clock.advance(1700)
    ops.emulator.inject("rate_limit", count=10**6, retry_after=0)
    ops.sweep_every(5, 3, refresher)
    ops.emulator.clear_faults()
    ops.sweep_every(5, 2, refresher)
    ops.emulator.revoke_user_tokens("svc.integration")
    ops.sweep_every(5, 2, refresher)
    ops.drain()
    texts = [json.dumps(event) for event in ops.received] + [json.dumps(ops.tags())]
    assert len(ops.received) >= 3
    secrets = {CLIENT_SECRET, "staged-secret-value-4", original.refresh_token, original.access_token}
    secrets |= set(ops.emulator.secret_values())
    assert not [s for s in secrets if s and len(s) >= 8 and any(s in t for t in texts)]
    for event in ops.received:
        assert event["source"] == SOURCE and event["detail"]["connection"] == "prod"


def test_backoff_doubles_from_the_interval_up_to_the_cap() -> None:
    from datetime import UTC, datetime

    now = datetime(2026, 11, 22, tzinfo=UTC)
    health = Health()
    waits = []
    for _ in range(7):
        health = health.failed(
            "unavailable", now, interval=timedelta(minutes=5), cap=timedelta(hours=1), retry_after=None
        )
        assert health.next_attempt
        waits.append((health.next_attempt - now).total_seconds())
    assert waits == [300, 600, 1200, 2400, 3600, 3600, 3600]
    assert RefreshPolicy().backoff_cap == timedelta(hours=1)


def test_a_fixed_password_is_tried_again_once_the_secret_changes(ops: Ops) -> None:
    from dataclasses import replace

    ops.add("pw", consented=False, grantType="password", username="svc.integration", password="wrong-password-5")
    refresher = ops.refresher()
    [marked] = Sweep(refresher).run()
    assert marked.result == "reauthorization_required"
    requests_before = ops.emulator.token_requests()
    ops.sweep_every(5, 1, refresher)
    assert ops.emulator.token_requests() == requests_before  # unchanged secret: not retried
    ops.store.update("pw", lambda c: replace(c, password="Pa55w0rd-emulator"))  # the operator fixes it
    [retried] = Sweep(refresher).run()
    assert retried.result == "refreshed" and ops.value("pw")[1]["status"] == "active"
    assert ops.emulator.token_requests() == requests_before + 1


def test_force_tries_a_marked_connection_now(ops: Ops) -> None:
    ops.add("pw", consented=False, grantType="password", username="svc.integration", password="Pa55w0rd-emulator")
    ops.emulator.add_user("svc.integration", "rotated-password-6")  # the password changes in ServiceNow
    refresher = ops.refresher()
    assert Sweep(refresher).run()[0].result == "reauthorization_required"
    ops.emulator.add_user("svc.integration", "Pa55w0rd-emulator")  # and is changed back
    assert refresher.refresh(ops.store.get("pw")).result == "needs_person"
    assert refresher.refresh(ops.store.get("pw"), force=True).result == "refreshed"
