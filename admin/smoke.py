"""`make smoke STACK=…`: check a deployed stack before trusting it, with your own AWS credentials.

Read-only toward connections: it reads the stack's outputs, sends the callback a request without a code
(it must answer with the project's own 4xx page, not API Gateway's), invokes the refresher once (exactly
what the schedule does every few minutes) and reports its summary, and sets one alarm to ALARM so a test
notification goes through the alarm topic, saying where it should arrive. Clients are injected (moto in
the tests); nothing printed carries a secret value.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

import requests

TEST_ALARM = "DeadLetter"  # notifies the topic; CloudWatch sets it back to OK at its next evaluation


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def smoke(
    stack: str,
    *,
    cloudformation: Any,
    lambda_client: Any,
    cloudwatch: Any,
    sns: Any,
    http: requests.Session,
    out: TextIO,
) -> int:
    """Run every check, print one line each, and return 0 only if all passed."""
    described = cloudformation.describe_stacks(StackName=stack)["Stacks"][0]
    outputs = {output["OutputKey"]: output["OutputValue"] for output in described.get("Outputs", [])}
    out.write(f"stack {stack}: {described.get('StackStatus', '?')}\n")
    for key in sorted(outputs):
        out.write(f"  {key} = {outputs[key]}\n")
    checks: list[tuple[str, Callable[[], Check]]] = [
        ("callback", lambda: _callback(http, outputs)),
        ("refresher", lambda: _refresher(lambda_client, outputs)),
        ("alarm path", lambda: _alarm_path(cloudwatch, sns, stack, outputs)),
    ]
    results = []
    for name, check in checks:
        try:
            result = check()
        except Exception as error:  # one failing check must not hide the others; AWS's words carry no secret
            result = Check(name, False, f"{type(error).__name__}: {error}")
        results.append(result)
        out.write(f"{'ok  ' if result.ok else 'FAIL'} {result.name}: {result.detail}\n")
    out.write(
        "not checked here: a real consent (run make authorize-url and press Allow), and that ServiceNow can "
        "reach the callback URL from its network\n"
    )
    return 0 if all(result.ok for result in results) else 1


def _output(outputs: dict[str, str], key: str) -> str:
    if key not in outputs:
        raise KeyError(f"the stack has no output {key!r}: deploy this version of template.yaml")
    return outputs[key]


def _callback(http: requests.Session, outputs: dict[str, str]) -> Check:
    """A callback without code and state must get our own error page (HTML, with our security headers)."""
    url = _output(outputs, "CallbackUrl")
    answer = http.get(url, timeout=10, allow_redirects=False)
    ours = "text/html" in answer.headers.get("Content-Type", "") and "Content-Security-Policy" in answer.headers
    ok = 400 <= answer.status_code < 500 and ours
    what = "the callback function's error page" if ours else "not the callback function's page"
    return Check("callback", ok, f"GET {url} without a code: HTTP {answer.status_code}, {what}")


def _refresher(lambda_client: Any, outputs: dict[str, str]) -> Check:
    """One sweep, as the schedule runs it: its answer is the count of connections by result."""
    function = _output(outputs, "RefreshFunctionName")
    answer = lambda_client.invoke(FunctionName=function, InvocationType="RequestResponse", Payload=b"{}")
    payload = answer["Payload"].read().decode("utf-8", "replace")
    if answer.get("FunctionError"):
        try:
            kind = json.loads(payload).get("errorType", "error")
        except (ValueError, AttributeError):
            kind = "error"
        return Check("refresher", False, f"{function} failed ({kind}); see its CloudWatch logs")
    try:
        counts = json.loads(payload)
        summary = ", ".join(f"{key} {value}" for key, value in sorted(counts.items())) or "no connections yet"
    except (ValueError, AttributeError):
        summary = f"answered {payload[:80]!r}"
    return Check("refresher", True, f"{function}: {summary}")


def _alarm_path(cloudwatch: Any, sns: Any, stack: str, outputs: dict[str, str]) -> Check:
    """Set one notifying alarm to ALARM: its notification travels the same path as every real one."""
    topic = _output(outputs, "AlarmTopicArn")
    alarm = f"{stack}-{TEST_ALARM}"
    # From OK, so the ALARM transition (which is what notifies) happens even if it was already in ALARM.
    cloudwatch.set_alarm_state(AlarmName=alarm, StateValue="OK", StateReason="make smoke: reset before the test")
    cloudwatch.set_alarm_state(
        AlarmName=alarm,
        StateValue="ALARM",
        StateReason="make smoke: a test notification; the alarm returns to OK at its next evaluation",
    )
    subscriptions = sns.list_subscriptions_by_topic(TopicArn=topic).get("Subscriptions", [])
    if not subscriptions:
        return Check("alarm path", False, f"{alarm} set to ALARM, but {topic} has no subscription (set AlarmEmail)")
    confirmed = [s for s in subscriptions if s["SubscriptionArn"] != "PendingConfirmation"]
    pending = [s for s in subscriptions if s not in confirmed]
    where = ", ".join(f"{s['Protocol']}:{s['Endpoint']}" for s in confirmed) or "nobody yet"
    if pending:
        where += "; not confirmed yet (open the confirmation e-mail): " + ", ".join(s["Endpoint"] for s in pending)
    return Check("alarm path", bool(confirmed), f"{alarm} set to ALARM: a notification should arrive at {where}")
