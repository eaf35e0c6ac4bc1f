"""`make smoke` against moto (a stack's outputs, a registered function, an alarm, a topic) and the real callback
function behind the local API: what moto cannot answer (the function's real code) is said, not faked."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
import requests

from admin.smoke import smoke
from local.api import LocalApi
from tests.conftest import REGION, register_rotation_lambda
from tests.test_callback import Stack
from tests.test_callback import stack as callback_stack  # noqa: F401 (the fixture, under a name of its own)

STACK = "smoke"


@pytest.fixture
def deployed(aws: str, callback_stack: Stack) -> Iterator[dict[str, Any]]:  # noqa: F811
    """A stand-in deployment: the stack's outputs in CloudFormation, its topic, one alarm, the refresher."""
    clients = {
        name: boto3.client(name, endpoint_url=aws, region_name=REGION)
        for name in ("cloudformation", "lambda", "cloudwatch", "sns")
    }
    function = register_rotation_lambda(aws, name="smoke-refresh")
    with LocalApi(callback_stack.handler.lambda_handler) as api:
        template = {
            "Resources": {"AlarmTopic": {"Type": "AWS::SNS::Topic"}},
            "Outputs": {
                "CallbackUrl": {"Value": f"{api.url}/callback"},
                "AlarmTopicArn": {"Value": {"Ref": "AlarmTopic"}},
                "RefreshFunctionName": {"Value": function.rsplit(":", 1)[-1]},
            },
        }
        clients["cloudformation"].create_stack(StackName=STACK, TemplateBody=json.dumps(template))
        outputs = clients["cloudformation"].describe_stacks(StackName=STACK)["Stacks"][0]["Outputs"]
        topic = next(o["OutputValue"] for o in outputs if o["OutputKey"] == "AlarmTopicArn")
        clients["cloudwatch"].put_metric_alarm(
            AlarmName=f"{STACK}-DeadLetter",
            Namespace="AWS/SQS",
            MetricName="ApproximateNumberOfMessagesVisible",
            Statistic="Maximum",
            Period=300,
            EvaluationPeriods=1,
            Threshold=1,
            ComparisonOperator="GreaterThanOrEqualToThreshold",
            AlarmActions=[topic],
        )
        yield {**clients, "topic": topic, "api": api}


def run(deployed: dict[str, Any]) -> tuple[int, str]:
    out = io.StringIO()
    code = smoke(
        STACK,
        cloudformation=deployed["cloudformation"],
        lambda_client=deployed["lambda"],
        cloudwatch=deployed["cloudwatch"],
        sns=deployed["sns"],
        http=requests.Session(),
        out=out,
    )
    return code, out.getvalue()


def test_smoke_checks_outputs_callback_refresher_and_alarm_path(deployed: dict[str, Any], leak_check: list) -> None:
    deployed["sns"].subscribe(TopicArn=deployed["topic"], Protocol="email", Endpoint="ops@example.com")
    code, report = run(deployed)
    leak_check.append(report)
    assert "CallbackUrl = http://127.0.0.1:" in report
    assert "ok   callback: GET" in report and "HTTP 400, the callback function's error page" in report
    assert "ok   refresher: smoke-refresh" in report
    assert (
        "ok   alarm path: smoke-DeadLetter set to ALARM: a notification should arrive at email:ops@example.com"
        in report
    )
    [alarm] = deployed["cloudwatch"].describe_alarms(AlarmNames=[f"{STACK}-DeadLetter"])["MetricAlarms"]
    assert alarm["StateValue"] == "ALARM"
    assert code == 0, report


def test_smoke_fails_loudly_where_the_deploy_is_incomplete(deployed: dict[str, Any]) -> None:
    """No subscriber on the topic, and the callback URL pointing at something that is not our function."""
    deployed["cloudformation"].update_stack(
        StackName=STACK,
        TemplateBody=json.dumps(
            {
                "Resources": {"AlarmTopic": {"Type": "AWS::SNS::Topic"}},
                "Outputs": {
                    "CallbackUrl": {"Value": f"{deployed['api'].url}/not-the-callback"},
                    "AlarmTopicArn": {"Value": {"Ref": "AlarmTopic"}},
                },
            }
        ),
    )
    code, report = run(deployed)
    assert code == 1
    assert "FAIL callback:" in report and "HTTP 404, not the callback function's page" in report
    assert "FAIL refresher: KeyError" in report and "RefreshFunctionName" in report
    assert "FAIL alarm path:" in report and "has no subscription" in report
