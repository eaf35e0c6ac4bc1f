"""`make smoke` against moto and the real functions: the stack's outputs in CloudFormation, its topic, alarm and
connection secrets on moto, the callback behind the local API, and each function's real handler run in-process
when smoke invokes it (moto cannot run Lambda code; a before-call hook answers Invoke with what the handler
returned or raised, in the Lambda runtime's shape).

moto runs neither alarm actions nor EventBridge targets and has no alarm history: DescribeAlarmHistory is answered
by a hook in the API's shape, with the outcome each test chooses (AWS records "Successfully executed action …" or
"Failed to execute action …"). The rule's AWS/Events metrics are put into moto's CloudWatch as AWS would publish
them. Every check is shown to fail on the breakage it exists for.
"""

from __future__ import annotations

import importlib
import io
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import unquote

import boto3
import pytest
import requests
from botocore.awsrequest import AWSResponse
from botocore.response import StreamingBody

from admin.smoke import NOT_A_CONNECTION, TEST_DETAIL_TYPE, Clients, smoke
from core.clock import to_iso
from core.health import Health
from local.api import LocalApi
from tests.conftest import REGION, register_rotation_lambda
from tests.test_callback import FakeContext, Stack
from tests.test_callback import stack as callback_stack  # noqa: F401 (the fixture, under a name of its own)

STACK = "servicenow-oauth"  # samconfig.toml's, the stack docs/operator-policy.json names
PREFIX = "servicenow-oauth/"
RULE = "smoke-AttentionEventsRule"
HANDLERS = {
    f"{STACK}-RefreshFunction-AbC123": "refresh",
    f"{STACK}-WorkerFunction-AbC123": "worker",
    f"{STACK}-RotationFunction-AbC123": "rotation",
    f"{STACK}-DashboardFunction-AbC123": "dashboard",
}


class World:
    """The stand-in deployment and the knobs a test turns to break one part of it."""

    def __init__(self, aws: str, api: LocalApi) -> None:
        self.clients = {
            name: boto3.client(name, endpoint_url=aws, region_name=REGION)
            for name in ("cloudformation", "lambda", "cloudwatch", "sns", "events", "secretsmanager")
        }
        self.api = api
        self.functions = {name: register_rotation_lambda(aws, name=name) for name in HANDLERS}
        self.handlers = {
            name: importlib.reload(importlib.import_module(f"handlers.{module}")) for name, module in HANDLERS.items()
        }
        self.broken: dict[str, str] = {}  # function name -> the error type its invocation raises instead
        self.alarm_history: list[dict[str, Any]] | None = None  # None: a delivered notification
        self.rule_outcome: str | None = "Invocations"  # what EventBridge publishes once the test event is matched
        self.invoked: list[tuple[str, Any]] = []
        self.outputs = {
            "CallbackUrl": f"{api.url}/callback",
            "ApiUrl": api.url,
            "AlarmTopicArn": {"Ref": "AlarmTopic"},
            "RefreshFunctionName": f"{STACK}-RefreshFunction-AbC123",
            "WorkerFunctionName": f"{STACK}-WorkerFunction-AbC123",
            "RotationFunctionArn": self.functions[f"{STACK}-RotationFunction-AbC123"],
            "DashboardFunctionName": f"{STACK}-DashboardFunction-AbC123",
            "ConnectionSecretPrefix": PREFIX,
            "AttentionEventsRuleName": RULE,
            "EventSource": f"servicenow-oauth.{STACK}",
            "ReplicaRegions": "",
            "ReplicaKmsKeyArns": "",
        }
        self.deploy()
        self.topic = self.output("AlarmTopicArn")
        self.clients["cloudwatch"].put_metric_alarm(
            AlarmName=f"{STACK}-DeadLetter",
            Namespace="AWS/SQS",
            MetricName="ApproximateNumberOfMessagesVisible",
            Statistic="Maximum",
            Period=300,
            EvaluationPeriods=1,
            Threshold=1,
            ComparisonOperator="GreaterThanOrEqualToThreshold",
            AlarmActions=[self.topic],
        )
        self.clients["sns"].subscribe(TopicArn=self.topic, Protocol="email", Endpoint="ops@example.com")
        self.clients["lambda"].meta.events.register("before-call.lambda.Invoke", self._invoke)
        self.clients["cloudwatch"].meta.events.register("before-call.cloudwatch.DescribeAlarmHistory", self._history)
        self.clients["events"].meta.events.register("before-call.events.PutEvents", self._matched)

    def deploy(self, **changed: Any) -> None:
        self.outputs.update(changed)
        template = {
            "Resources": {"AlarmTopic": {"Type": "AWS::SNS::Topic"}},
            "Outputs": {key: {"Value": value} for key, value in self.outputs.items() if value is not None},
        }
        cloudformation = self.clients["cloudformation"]
        if cloudformation.list_stacks()["StackSummaries"]:
            cloudformation.update_stack(StackName=STACK, TemplateBody=json.dumps(template))
        else:
            cloudformation.create_stack(StackName=STACK, TemplateBody=json.dumps(template))

    def output(self, key: str) -> str:
        outputs = self.clients["cloudformation"].describe_stacks(StackName=STACK)["Stacks"][0]["Outputs"]
        return str(next(o["OutputValue"] for o in outputs if o["OutputKey"] == key))

    def _invoke(self, params: dict[str, Any], **_: Any) -> Any:
        """Lambda's answer for the function's real handler: its return value, or the runtime's error shape."""
        name = unquote(params["url_path"].split("/functions/")[1].split("/")[0]).rsplit(":", 1)[-1]
        event = json.loads(params["body"])
        self.invoked.append((name, event))
        headers: dict[str, str] = {}
        try:
            if name in self.broken:
                raise type(self.broken[name], (Exception,), {})("planted")
            body = json.dumps(self.handlers[name].lambda_handler(event, FakeContext()))
        except Exception as error:
            body = json.dumps({"errorType": type(error).__name__, "errorMessage": "(not shown)"})
            headers["FunctionError"] = "Unhandled"
        data = body.encode()
        parsed = {"StatusCode": 200, "Payload": StreamingBody(io.BytesIO(data), len(data)), **headers}
        return AWSResponse("http://lambda", 200, {}, None), parsed

    def _history(self, **_: Any) -> Any:
        items = self.alarm_history
        if items is None:
            items = [{"HistoryItemType": "Action", "HistorySummary": f"Successfully executed action {self.topic}"}]
        return AWSResponse("http://monitoring", 200, {}, None), {"AlarmHistoryItems": items}

    def _matched(self, params: dict[str, Any], **_: Any) -> None:
        """The attention rule's pattern matched the test event: the rule's metric, as AWS publishes it."""
        [entry] = json.loads(params["body"])["Entries"]
        pattern = {"source": f"servicenow-oauth.{STACK}", "detail-type": TEST_DETAIL_TYPE}
        if self.rule_outcome and entry["Source"] == pattern["source"] and entry["DetailType"] == pattern["detail-type"]:
            self.rule_delivered(self.rule_outcome)

    def rule_delivered(self, metric: str = "Invocations", when: datetime | None = None) -> None:
        """What EventBridge publishes for the rule a minute after it matched the test event."""
        self.clients["cloudwatch"].put_metric_data(
            Namespace="AWS/Events",
            MetricData=[
                {
                    "MetricName": metric,
                    "Dimensions": [{"Name": "RuleName", "Value": RULE}],
                    "Value": 1,
                    "Timestamp": when or datetime.now(UTC),
                }
            ],
        )

    def add_connection(self, name: str, health: Health, *, unreachable: bool = False) -> None:
        """A connection whose access token is not due: the sweep reads it and asks ServiceNow nothing (or, with
        `unreachable`, one due on an instance where nothing listens: the sweep's attempt fails)."""
        document = {
            "instanceUrl": "http://127.0.0.1:9" if unreachable else "https://acme.service-now.com",
            "clientId": "c1",
            "clientSecret": "not-a-real-secret-1",
            "status": health.status,
            "accessToken": "not-a-real-token-1",
            "refreshToken": "not-a-real-token-2",
            "accessTokenExpiresAt": to_iso(datetime.now(UTC) + timedelta(minutes=1 if unreachable else 25)),
            "refreshTokenExpiresAt": to_iso(datetime.now(UTC) + timedelta(days=90)),
        }
        tags = [{"Key": key, "Value": value} for key, value in health.to_tags().items()]
        self.clients["secretsmanager"].create_secret(
            Name=f"{PREFIX}{name}", SecretString=json.dumps(document), Tags=tags
        )

    def run(self) -> tuple[int, str]:
        out = io.StringIO()
        clients = Clients(
            cloudformation=self.clients["cloudformation"],
            lambda_client=self.clients["lambda"],
            cloudwatch=self.clients["cloudwatch"],
            sns=self.clients["sns"],
            events=self.clients["events"],
            secretsmanager=self.clients["secretsmanager"],
            http=requests.Session(),
        )
        code = smoke(STACK, clients, out=out, wait=0.0, sleep=lambda _: None)
        return code, out.getvalue()


@pytest.fixture
def world(aws: str, callback_stack: Stack, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:  # noqa: F811
    monkeypatch.setenv("SERVICENOW_ALLOWED_HOSTS", "127.0.0.1,*.service-now.com")
    with LocalApi(callback_stack.handler.lambda_handler) as api:
        yield World(aws, api)


def line(report: str, check: str) -> str:
    return next(text for text in report.splitlines() if text[5:].startswith(f"{check}:"))


def test_a_healthy_deploy_passes_every_check_and_changes_no_connection(world: World, leak_check: list) -> None:
    world.add_connection("prod", Health(status="active", instance="acme.service-now.com", grant="refresh_token"))
    before = world.clients["secretsmanager"].describe_secret(SecretId=f"{PREFIX}prod")["VersionIdsToStages"]
    code, report = world.run()
    leak_check.append(report)
    for check in ("parameters", "callback", "authorize route", "refresher", "connections", "worker", "rotation",
                  "dashboard", "alarm path", "event path"):  # fmt: skip
        assert line(report, check).startswith("ok   "), line(report, check)
    assert "HTTP 400, the callback function's error page" in line(report, "callback")
    assert "1 connection(s), all active" in line(report, "connections")
    assert "notification delivered to the topic" in line(report, "alarm path")
    assert code == 0, report
    # Read-only toward connections: the same versions, no secret for the name the worker and rotation were given.
    after = world.clients["secretsmanager"].describe_secret(SecretId=f"{PREFIX}prod")["VersionIdsToStages"]
    assert after == before
    names = [s["Name"] for s in world.clients["secretsmanager"].list_secrets()["SecretList"]]
    assert f"{PREFIX}{NOT_A_CONNECTION}" not in names
    [alarm] = world.clients["cloudwatch"].describe_alarms(AlarmNames=[f"{STACK}-DeadLetter"])["MetricAlarms"]
    assert alarm["StateValue"] == "ALARM"
    assert {name for name, _ in world.invoked} == set(HANDLERS)


def test_a_notification_the_topic_refuses_fails_with_the_reason(world: World) -> None:
    """A broken key or topic policy: the alarm history says the action failed, and why."""
    reason = "Failed to execute action arn:aws:sns:us-east-1:123456789012:smoke-AlarmTopic"
    data = json.dumps({"actionState": "Failed", "error": "KMS key is not accessible (AccessDenied)"})
    world.alarm_history = [{"HistoryItemType": "Action", "HistorySummary": reason, "HistoryData": data}]
    code, report = world.run()
    assert code == 1 and "the topic refused the notification: KMS key is not accessible" in line(report, "alarm path")
    world.alarm_history = []  # nothing delivered at all within the wait
    code, report = world.run()
    assert code == 1 and "no notification action in its history" in line(report, "alarm path")


def test_an_event_path_that_does_not_deliver_fails(world: World) -> None:
    world.rule_outcome = None  # the rule never matched (disabled, or its pattern lost the test's detail-type)
    code, report = world.run()
    assert code == 1 and "no delivery of the test event" in line(report, "event path")
    world.rule_outcome = "FailedInvocations"  # matched, and the topic refused it (a key or topic policy)
    code, report = world.run()
    assert code == 1 and "could not deliver the test event" in line(report, "event path")


def test_an_earlier_delivery_by_the_rule_is_not_taken_for_the_test_events(world: World) -> None:
    """Found by review: the rule had delivered some other event 50 s before smoke started, and smoke counted it."""
    world.rule_delivered("Invocations", when=datetime.now(UTC) - timedelta(seconds=50))
    world.rule_outcome = None
    code, report = world.run()
    assert code == 1 and "no delivery of the test event" in line(report, "event path"), report


def test_an_output_missing_at_the_wait_fails_its_check_and_hides_no_other(world: World) -> None:
    """Found by review: the wait for deliveries ran outside the per-check guard, so an output missing there (a
    stack from an older template) raised out of smoke and no FAIL line was printed at all."""
    world.broken[f"{STACK}-WorkerFunction-AbC123"] = "Runtime.ImportModuleError"
    world.deploy(AttentionEventsRuleName=None)
    code, report = world.run()
    assert code == 1
    assert line(report, "worker").startswith("FAIL") and line(report, "event path").startswith("FAIL")
    assert "AttentionEventsRuleName" in line(report, "event path")


def test_the_test_event_is_labelled_and_goes_to_the_stacks_own_source(world: World) -> None:
    """A queue stands in for the topic behind a rule with the attention rule's pattern: what the person would get."""
    sqs = boto3.client("sqs", endpoint_url=world.clients["events"].meta.endpoint_url, region_name=REGION)
    queue = sqs.create_queue(QueueName="smoke-events")["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    pattern = {"source": [f"servicenow-oauth.{STACK}"], "detail-type": [TEST_DETAIL_TYPE]}
    world.clients["events"].put_rule(Name="stand-in", EventPattern=json.dumps(pattern))
    world.clients["events"].put_targets(Rule="stand-in", Targets=[{"Id": "q", "Arn": arn}])
    world.run()
    [message] = sqs.receive_message(QueueUrl=queue, WaitTimeSeconds=1)["Messages"]
    event = json.loads(message["Body"])
    assert event["detail"]["change"] == "smoke_test" and event["detail"]["connection"] is None


def test_a_connection_that_is_not_active_fails_the_smoke(world: World) -> None:
    world.add_connection("prod", Health(status="active"))
    world.add_connection("erp", Health(status="reauthorization_required", needs_person=True))
    world.add_connection("hr", Health(status="active"), unreachable=True)
    code, report = world.run()
    assert code == 1
    assert "failed 1" in line(report, "refresher") and line(report, "refresher").startswith("FAIL")
    troubled = line(report, "connections")
    assert (
        "2 of 3 not active: erp (reauthorization_required" in troubled
        and "hr (active, failing (transient))" in troubled
    )


@pytest.mark.parametrize(
    ("function", "error", "check"),
    [
        (f"{STACK}-RefreshFunction-AbC123", "Runtime.ImportModuleError", "refresher"),
        (f"{STACK}-WorkerFunction-AbC123", "Runtime.ImportModuleError", "worker"),
        (f"{STACK}-RotationFunction-AbC123", "AccessDeniedException", "rotation"),
        (f"{STACK}-DashboardFunction-AbC123", "Sandbox.Timedout", "dashboard"),
    ],
)
def test_a_function_that_does_not_run_fails_its_check(world: World, function: str, error: str, check: str) -> None:
    world.broken[function] = error
    code, report = world.run()
    assert code == 1 and line(report, check).startswith("FAIL") and error in line(report, check), report
    assert all(line(report, other).startswith("ok") for other in ("callback", "authorize route", "alarm path"))


def test_a_broken_route_and_mismatched_replica_keys_fail(world: World) -> None:
    key = "arn:aws:kms:eu-west-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    world.deploy(ApiUrl=f"{world.api.url}/not-the-api", ReplicaRegions="eu-west-1,eu-central-1", ReplicaKmsKeyArns=key)
    code, report = world.run()
    assert code == 1
    assert "HTTP 404, not the callback function's page" in line(report, "authorize route")
    assert "names 1 key(s) for 2 ReplicaRegions" in line(report, "parameters")


def test_smoke_fails_loudly_where_the_deploy_is_incomplete(world: World) -> None:
    """No confirmed subscriber on the topic, the callback URL pointing elsewhere, an output missing."""
    for subscription in world.clients["sns"].list_subscriptions_by_topic(TopicArn=world.topic)["Subscriptions"]:
        world.clients["sns"].unsubscribe(SubscriptionArn=subscription["SubscriptionArn"])
    world.deploy(CallbackUrl=f"{world.api.url}/not-the-callback", RefreshFunctionName=None)
    code, report = world.run()
    assert code == 1
    assert "HTTP 404, not the callback function's page" in line(report, "callback")
    assert line(report, "refresher").startswith("FAIL refresher: KeyError") and "RefreshFunctionName" in report
    assert "has no confirmed subscriber" in line(report, "alarm path")
