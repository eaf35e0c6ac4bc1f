"""`make smoke STACK=…`: check a deployed stack before trusting it, with your own AWS credentials; exit 1, with one
`FAIL` line per failed check, when any part of it is broken.

It changes no connection. It reads the stack's outputs; sends the callback and the authorize route a request each
without a code or a signature (each must answer with the project's own 4xx page, not API Gateway's); invokes the
refresher once (exactly what the schedule does), the worker with a record for a connection that does not exist,
rotation with a step for a secret that does not exist (it must refuse it as not found: its code loaded and its
role reached Secrets Manager) and the dashboard widget's description; reads every connection's health from the
listing (each must be `active`); sets one alarm to ALARM and reads the alarm's history until the notification
was delivered or refused (the refusal's reason is printed); sends one labelled test event through the attention
rule and reads the rule's metrics until it was delivered or failed. Clients are injected (moto in the tests);
nothing printed carries a secret value.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

import requests

from core.health import Health

TEST_ALARM = "DeadLetter"  # notifies the topic; CloudWatch sets it back to OK at its next evaluation
TEST_DETAIL_TYPE = "ServiceNow OAuth Smoke Test"  # forwarded by AttentionEventsRule, named as a test
# A sweep that ran but could not keep a connection alive is not a working deploy.
BAD_RESULTS = frozenset({"failed", "write_failed", "invalid", "reauthorization_required"})
NOT_A_CONNECTION = "make-smoke-check"  # a connection name nobody has: the worker and rotation find nothing
WAIT_SECONDS = 180.0  # alarm history and EventBridge metrics take a minute or two to show a delivery
EVENTS = Path(__file__).resolve().parent.parent / "events"


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class Clients:
    cloudformation: Any
    lambda_client: Any
    cloudwatch: Any
    sns: Any
    events: Any
    secretsmanager: Any
    http: requests.Session


def smoke(
    stack: str,
    clients: Clients,
    *,
    out: TextIO,
    wait: float = WAIT_SECONDS,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> int:
    """Run every check, print one line each, and return 0 only if all passed."""
    described = clients.cloudformation.describe_stacks(StackName=stack)["Stacks"][0]
    outputs = {output["OutputKey"]: output["OutputValue"] for output in described.get("Outputs", [])}
    out.write(f"stack {stack}: {described.get('StackStatus', '?')}\n")
    for key in sorted(outputs):
        out.write(f"  {key} = {outputs[key]}\n")
    started = clock()
    rule: dict[str, float] = {}  # the rule's counts before the test event (earlier deliveries are not ours)
    checks: list[tuple[str, Callable[[], Check]]] = [
        ("parameters", lambda: _parameters(outputs)),
        ("callback", lambda: _callback(clients.http, outputs)),
        ("authorize route", lambda: _authorize(clients.http, outputs)),
        ("refresher", lambda: _refresher(clients.lambda_client, outputs)),
        ("connections", lambda: _connections(clients.secretsmanager, outputs)),
        ("worker", lambda: _worker(clients.lambda_client, outputs)),
        ("rotation", lambda: _rotation(clients.lambda_client, outputs)),
        ("dashboard", lambda: _dashboard(clients.lambda_client, outputs)),
        ("alarm path", lambda: _alarm_sent(clients, stack, outputs)),
        ("event path", lambda: _event_sent(clients, outputs, started, clock, rule)),
    ]
    results = [_run(name, check) for name, check in checks]
    # Both notifications travel at once; their delivery shows in the alarm's history and the rule's metrics.
    deadline = time.monotonic() + wait
    waiting = [
        index for index, result in enumerate(results) if result.ok and result.name in ("alarm path", "event path")
    ]
    while waiting:
        for index in list(waiting):
            verdict = _verdict(clients, stack, outputs, results[index].name, started, clock, rule, final=False)
            if verdict is not None:
                results[index] = verdict
                waiting.remove(index)
        if waiting and time.monotonic() >= deadline:
            for index in waiting:
                verdict = _verdict(clients, stack, outputs, results[index].name, started, clock, rule, final=True)
                results[index] = verdict or Check(results[index].name, False, "no verdict")
            waiting = []
        elif waiting:
            sleep(10)
    for result in results:
        out.write(f"{'ok  ' if result.ok else 'FAIL'} {result.name}: {result.detail}\n")
    out.write(
        "not checked here: a real consent (run make authorize-url and press Allow), that ServiceNow can reach the "
        "callback URL from its network, and that the topic's e-mail subscribers read their mail\n"
    )
    return 0 if all(result.ok for result in results) else 1


def _run(name: str, check: Callable[[], Check]) -> Check:
    try:
        return check()
    except Exception as error:  # one failing check must not hide the others; AWS's words carry no secret
        return Check(name, False, f"{type(error).__name__}: {error}")


def _output(outputs: dict[str, str], key: str) -> str:
    if key not in outputs:
        raise KeyError(f"the stack has no output {key!r}: deploy this version of template.yaml")
    return outputs[key]


def _split(value: str | None) -> list[str]:
    return [item.strip() for item in (value or "").split(",") if item.strip()]


def _parameters(outputs: dict[str, str]) -> Check:
    """What CloudFormation Rules cannot count: one replica key per replica region, in that region."""
    regions, keys = _split(outputs.get("ReplicaRegions")), _split(outputs.get("ReplicaKmsKeyArns"))
    if keys and (len(keys) != len(regions) or any(k.split(":")[3] != r for r, k in zip(regions, keys, strict=False))):
        return Check(
            "parameters",
            False,
            f"ReplicaKmsKeyArns names {len(keys)} key(s) for {len(regions)} ReplicaRegions: one key per region, in "
            "the same order, each in its region (make connection-add STACK=... refuses to replicate until then)",
        )
    return Check("parameters", True, f"{len(regions)} replica region(s), {len(keys) or 'managed'} replica key(s)")


def _page_is_ours(answer: requests.Response) -> bool:
    return "text/html" in answer.headers.get("Content-Type", "") and "Content-Security-Policy" in answer.headers


def _callback(http: requests.Session, outputs: dict[str, str]) -> Check:
    """A callback without code and state must get our own error page (HTML, with our security headers)."""
    url = _output(outputs, "CallbackUrl")
    answer = http.get(url, timeout=10, allow_redirects=False)
    ok = 400 <= answer.status_code < 500 and _page_is_ours(answer)
    what = "the callback function's error page" if _page_is_ours(answer) else "not the callback function's page"
    return Check("callback", ok, f"GET {url} without a code: HTTP {answer.status_code}, {what}")


def _authorize(http: requests.Session, outputs: dict[str, str]) -> Check:
    """An unsigned consent link must be refused by our function with its own 4xx page, never started."""
    url = f"{_output(outputs, 'ApiUrl')}/connections/{NOT_A_CONNECTION}/authorize"
    answer = http.get(url, timeout=10, allow_redirects=False)
    ok = 400 <= answer.status_code < 500 and _page_is_ours(answer)
    what = "the callback function's refusal page" if _page_is_ours(answer) else "not the callback function's page"
    return Check("authorize route", ok, f"GET an unsigned link: HTTP {answer.status_code}, {what}")


def _invoke(lambda_client: Any, function: str, event: dict[str, Any]) -> tuple[str | None, Any]:
    """(the error type if the function failed, its answer)."""
    answer = lambda_client.invoke(FunctionName=function, InvocationType="RequestResponse", Payload=json.dumps(event))
    payload = answer["Payload"].read().decode("utf-8", "replace")
    try:
        body = json.loads(payload)
    except ValueError:
        body = payload
    if answer.get("FunctionError"):
        kind = body.get("errorType", "error") if isinstance(body, dict) else "error"
        return str(kind), body
    return None, body


def _refresher(lambda_client: Any, outputs: dict[str, str]) -> Check:
    """One sweep, as the schedule runs it: its answer is the count of connections by result."""
    function = _output(outputs, "RefreshFunctionName")
    error, counts = _invoke(lambda_client, function, {})
    if error:
        return Check("refresher", False, f"{function} failed ({error}); see its CloudWatch logs")
    if not isinstance(counts, dict):
        return Check("refresher", False, f"{function} answered {str(counts)[:80]!r}, not a sweep's counts")
    summary = ", ".join(f"{key} {value}" for key, value in sorted(counts.items())) or "no connections yet"
    bad = sorted(result for result in counts if result in BAD_RESULTS)
    if bad:
        return Check("refresher", False, f"{function}: {summary} ({', '.join(bad)}: see make connections)")
    return Check("refresher", True, f"{function}: {summary}")


def _connections(secretsmanager: Any, outputs: dict[str, str]) -> Check:
    """Every connection's health, from the listing's tags (no value read): each must be `active`."""
    prefix = _output(outputs, "ConnectionSecretPrefix")
    pages = secretsmanager.get_paginator("list_secrets").paginate(Filters=[{"Key": "name", "Values": [prefix]}])
    entries = [entry for page in pages for entry in page.get("SecretList", []) if entry["Name"].startswith(prefix)]
    troubled = []
    for entry in entries:
        health = Health.from_tags(entry.get("Tags"))
        if health.status != "active" or health.failure_class:
            state = health.status or "no health yet"
            if health.failure_class:
                state += f", failing ({health.failure_class})"
            troubled.append(f"{entry['Name'][len(prefix) :]} ({state})")
    if troubled:
        return Check("connections", False, f"{len(troubled)} of {len(entries)} not active: {', '.join(troubled)}")
    return Check("connections", True, f"{len(entries)} connection(s), all active")


def _worker(lambda_client: Any, outputs: dict[str, str]) -> Check:
    """A queue record for a connection nobody has: the worker loads, looks, finds nothing and reports no failure."""
    function = _output(outputs, "WorkerFunctionName")
    record = json.loads((EVENTS / "sqs-refresh.json").read_text())["Records"][0]
    record.update(messageId="make-smoke", body=json.dumps({"connection": NOT_A_CONNECTION}))
    error, answer = _invoke(lambda_client, function, {"Records": [record]})
    ok = error is None and answer == {"batchItemFailures": []}
    detail = f"failed ({error})" if error else f"answered {json.dumps(answer)[:80]}"
    return Check("worker", ok, f"{function}: a record for no connection {detail}")


def _rotation(lambda_client: Any, outputs: dict[str, str]) -> Check:
    """A step for a secret that does not exist: refused as not found, so its code loaded and its role reached
    Secrets Manager (AccessDenied or an import error would be a broken deploy)."""
    function = _output(outputs, "RotationFunctionArn")
    secret = f"{_output(outputs, 'ConnectionSecretPrefix')}{NOT_A_CONNECTION}"
    event = {"Step": "testSecret", "SecretId": secret, "ClientRequestToken": "make-smoke"}
    error, _ = _invoke(lambda_client, function, event)
    ok = error == "ResourceNotFoundException"
    return Check("rotation", ok, f"a step for no secret: {error or 'no error'} (expected ResourceNotFoundException)")


def _dashboard(lambda_client: Any, outputs: dict[str, str]) -> Check:
    function = _output(outputs, "DashboardFunctionName")
    error, answer = _invoke(lambda_client, function, json.loads((EVENTS / "dashboard-describe.json").read_text()))
    ok = error is None and isinstance(answer, str) and bool(answer)
    return Check("dashboard", ok, f"{function}: " + (f"failed ({error})" if error else "described its widget"))


def _alarm_sent(clients: Clients, stack: str, outputs: dict[str, str]) -> Check:
    """Set one notifying alarm to ALARM: its notification travels the same path as every real one."""
    topic = _output(outputs, "AlarmTopicArn")
    alarm = f"{stack}-{TEST_ALARM}"
    # From OK, so the ALARM transition (which is what notifies) happens even if it was already in ALARM.
    clients.cloudwatch.set_alarm_state(AlarmName=alarm, StateValue="OK", StateReason="make smoke: reset before test")
    clients.cloudwatch.set_alarm_state(
        AlarmName=alarm,
        StateValue="ALARM",
        StateReason="make smoke: a test notification; the alarm returns to OK at its next evaluation",
    )
    subscriptions = clients.sns.list_subscriptions_by_topic(TopicArn=topic).get("Subscriptions", [])
    confirmed = [s for s in subscriptions if s["SubscriptionArn"] != "PendingConfirmation"]
    pending = [s for s in subscriptions if s not in confirmed]
    where = ", ".join(f"{s['Protocol']}:{s['Endpoint']}" for s in confirmed) or "nobody"
    if pending:
        where += "; not confirmed yet (open the confirmation e-mail): " + ", ".join(s["Endpoint"] for s in pending)
    if not confirmed:
        return Check("alarm path", False, f"{alarm} set to ALARM, but {topic} has no confirmed subscriber ({where})")
    return Check("alarm path", True, f"{alarm} set to ALARM; subscribers: {where}")


def _event_sent(
    clients: Clients, outputs: dict[str, str], started: datetime, clock: Callable[[], datetime], rule: dict[str, float]
) -> Check:
    """One event the attention rule forwards, labelled as a test, naming no connection. The rule's counts in the
    window are read first, so the delivery of some earlier event is never taken for this one's."""
    rule.update(_rule_counts(clients, outputs, started, clock))
    detail = {"change": "smoke_test", "connection": None, "note": "a test from make smoke; no connection changed"}
    answer = clients.events.put_events(
        Entries=[
            {
                "Source": _output(outputs, "EventSource"),
                "DetailType": TEST_DETAIL_TYPE,
                "Detail": json.dumps(detail),
                "Time": clock(),
            }
        ]
    )
    if answer.get("FailedEntryCount"):
        code = answer["Entries"][0].get("ErrorCode", "?")
        return Check("event path", False, f"EventBridge refused the test event ({code})")
    return Check("event path", True, "test event sent")


def _rule_counts(
    clients: Clients, outputs: dict[str, str], started: datetime, clock: Callable[[], datetime]
) -> dict[str, float]:
    """The attention rule's Invocations and FailedInvocations since the minute smoke started (EventBridge publishes
    them by the minute, so the start's own minute is in)."""
    rule = _output(outputs, "AttentionEventsRuleName")
    figures = {}
    for metric in ("Invocations", "FailedInvocations"):
        points = clients.cloudwatch.get_metric_statistics(
            Namespace="AWS/Events",
            MetricName=metric,
            Dimensions=[{"Name": "RuleName", "Value": rule}],
            StartTime=started.replace(second=0, microsecond=0),
            EndTime=clock() + timedelta(minutes=1),
            Period=60,
            Statistics=["Sum"],
        ).get("Datapoints", [])
        figures[metric] = float(sum(point.get("Sum", 0) for point in points))
    return figures


def _verdict(
    clients: Clients,
    stack: str,
    outputs: dict[str, str],
    name: str,
    started: datetime,
    clock: Callable[[], datetime],
    rule: dict[str, float],
    *,
    final: bool,
) -> Check | None:
    """The verdict on one notification path once AWS shows it (None: not yet; `final`: say it never showed).
    Anything raised (an output missing, AWS refusing a read) is a failed check, not a crash hiding the others."""
    try:
        if name == "alarm path":
            return _alarm_delivered(clients, stack, started, clock, final=final)
        return _event_delivered(clients, outputs, started, clock, rule, final=final)
    except Exception as error:  # AWS's words carry no secret
        return Check(name, False, f"could not read the delivery: {type(error).__name__}: {error}")


def _alarm_delivered(
    clients: Clients, stack: str, started: datetime, clock: Callable[[], datetime], *, final: bool
) -> Check | None:
    name, alarm = "alarm path", f"{stack}-{TEST_ALARM}"
    items = clients.cloudwatch.describe_alarm_history(
        AlarmName=alarm, HistoryItemType="Action", StartDate=started - timedelta(seconds=5), EndDate=clock()
    ).get("AlarmHistoryItems", [])
    for item in items:
        summary = item.get("HistorySummary", "")
        if summary.startswith("Failed"):
            try:
                reason = json.loads(item.get("HistoryData") or "{}").get("error", summary)
            except ValueError:
                reason = summary
            return Check(name, False, f"{alarm}: the topic refused the notification: {reason}")
        if summary.startswith("Successfully executed action"):
            return Check(name, True, f"{alarm}: notification delivered to the topic ({summary})")
    if final:
        return Check(name, False, f"{alarm}: no notification action in its history after waiting")
    return None


def _event_delivered(
    clients: Clients,
    outputs: dict[str, str],
    started: datetime,
    clock: Callable[[], datetime],
    before: dict[str, float],
    *,
    final: bool,
) -> Check | None:
    name, rule = "event path", _output(outputs, "AttentionEventsRuleName")
    now = _rule_counts(clients, outputs, started, clock)
    failed, delivered = (now[metric] - before.get(metric, 0.0) for metric in ("FailedInvocations", "Invocations"))
    if failed:
        return Check(
            name,
            False,
            f"rule {rule} could not deliver the test event to the topic ({failed:.0f} failed invocations): check the "
            "topic's key and access policies",
        )
    if delivered:
        return Check(name, True, f"rule {rule} delivered the test event to the topic")
    if final:
        return Check(name, False, f"rule {rule}: no delivery of the test event after waiting")
    return None
