"""The connections dashboard: the pure renderer against crafted health (every state, hostile names), the
CloudWatch custom-widget handler against moto with the MonitoringPolicy's two actions only, and the local
stack's /status page in a real headless Chromium (screenshot in test-artifacts/)."""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import boto3
import pytest
import requests
from botocore.awsrequest import AWSResponse

from core.dashboard import Row, health_of, render, rows_from_listing, verdict
from core.health import Health
from core.lifecycle import RefreshPolicy
from local.stack import LocalStack
from tests.test_callback import FakeContext

EVENTS = Path(__file__).resolve().parent.parent / "events"
NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
POLICY = RefreshPolicy()
HOSTILE = '<script>alert("x")</script>&"\''


def crafted(NOW: datetime = NOW) -> dict[str, Health | None]:
    """One connection in every state the page distinguishes (times from `NOW`)."""
    base = Health(status="active", version="v1", instance="acme.service-now.com", grant="authorization_code")
    return {
        "healthy": _with(base, access_expires=NOW + timedelta(minutes=25), refresh_expires=NOW + timedelta(days=80),
                         last_success=NOW - timedelta(minutes=5)),
        "expiring": _with(base, access_expires=NOW + timedelta(minutes=25), refresh_expires=NOW + timedelta(days=3)),
        "expired": _with(base, access_expires=NOW - timedelta(minutes=1), refresh_expires=NOW + timedelta(days=50)),
        "failing": _with(base, access_expires=NOW + timedelta(minutes=9), consecutive_failures=3,
                         failing_since=NOW - timedelta(minutes=40), failure_class="unavailable",
                         next_attempt=NOW + timedelta(minutes=20)),
        "rejected": _with(base, status="reauthorization_required", needs_person=True, failure_class="rejected",
                          rejected_version="v1"),
        "pending": _with(base, status="pending_authorization", needs_person=True),
        "new": Health(),
        "unknown": None,
        "jwt": _with(base, grant="jwt_bearer", access_expires=NOW + timedelta(minutes=20)),
    }  # fmt: skip


def _with(health: Health, **fields: Any) -> Health:
    from dataclasses import replace

    return replace(health, **fields)


class Cells(HTMLParser):
    """The rows of the rendered tables, as text per cell, and every tag seen."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict[str, Any]] = []
        self.tags: set[str] = set()
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        if tag == "tr" and dict(attrs).get("data-state"):
            self.rows.append({"state": dict(attrs)["data-state"], "cells": []})
        elif tag == "td" and self.rows:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None:
            self.rows[-1]["cells"].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def parse(html: str) -> Cells:
    cells = Cells()
    cells.feed(html)
    return cells


def test_every_state_is_shown_in_words_worst_first() -> None:
    rows = [Row(name, health) for name, health in crafted().items()]
    html = render(rows, NOW, POLICY)
    shown = parse(html)
    states = [row["state"] for row in shown.rows]
    assert states == ["rejected", "pending", "failing", "unknown", "expired", "expiring", "new", "healthy", "healthy"]
    words = {row["state"]: row["cells"][1] for row in shown.rows}
    assert words["rejected"] == "Needs re-authorization" and words["failing"] == "Failing"
    assert words["unknown"] == "Unknown health" and words["healthy"] == "Healthy"  # never colour alone
    failing = next(row["cells"] for row in shown.rows if row["state"] == "failing")
    assert failing[0] == "failing" and "unavailable, 3" in failing[7] and failing[8] == "2026-11-22T12:20:00Z"
    assert failing[4] == "9 min left"
    rejected = next(row["cells"] for row in shown.rows if row["state"] == "rejected")
    assert rejected[9].startswith("Yes")
    jwt = next(row["cells"] for row in shown.rows if row["cells"][0] == "jwt")
    assert "no refresh token" in jwt[5]
    assert "<script" not in shown.tags and "script" not in shown.tags  # no script needed, none sent
    assert 'id="summary"' in html and "9 connections" in html


def test_hostile_names_and_instances_are_escaped() -> None:
    health = _with(crafted()["failing"] or Health(), instance=HOSTILE, failure_class=HOSTILE, grant=HOSTILE)
    html = render([Row(HOSTILE, health)], NOW, POLICY, title=HOSTILE)
    assert "<script>" not in html and 'alert("x")' not in html
    assert "&lt;script&gt;" in html
    assert parse(html).rows[0]["cells"][0] == HOSTILE  # shown as text, exactly


def test_garbled_or_foreign_tags_show_as_unknown_and_never_break_the_page() -> None:
    good = crafted()["failing"]
    assert good is not None
    tags = [{"Key": key, "Value": value} for key, value in good.to_tags().items()]
    assert health_of(tags) == good
    foreign = [*tags, {"Key": "team", "Value": "erp"}, {"Key": "servicenow-oauth:from-the-future", "Value": "x"}]
    assert health_of(foreign) == good  # other tags, and ours we do not know, are left alone
    for key, value in [
        ("servicenow-oauth:next-attempt", "tomorrow"),
        ("servicenow-oauth:consecutive-failures", "-1"),
        ("servicenow-oauth:needs-person", "yes"),
    ]:
        garbled = [t for t in tags if t["Key"] != key] + [{"Key": key, "Value": value}]
        assert health_of(garbled) is None, key
    assert health_of([{"Value": "no key"}]) is None  # type: ignore[list-item]
    entries = [{"Name": "servicenow-oauth/a", "Tags": [{"Key": "servicenow-oauth:last-success", "Value": "2026-99"}]}]
    rows = rows_from_listing(entries, lambda name: name.split("/", 1)[1])
    assert verdict(rows[0], NOW, POLICY) == "unknown"
    assert parse(render(rows, NOW, POLICY)).rows[0]["state"] == "unknown"


def test_a_thousand_connections_stay_one_readable_page() -> None:
    """What needs a look is listed in full, the healthy ones folded; the rest are counted, not dropped."""
    states = crafted()
    rows = [Row(f"conn-{n:04}", states["healthy"]) for n in range(1000)]
    rows += [Row(f"bad-{n:03}", states["failing"]) for n in range(40)]
    html = render(rows, NOW, POLICY)
    shown = parse(html)
    assert sum(1 for row in shown.rows if row["state"] == "failing") == 40
    assert "1040 connections" in html and "<details><summary>Healthy (1000)</summary>" in html
    many = [Row(f"bad-{n:04}", states["failing"]) for n in range(400)]
    assert "and 100 more (make connections lists every one)" in render(many, NOW, POLICY)


# ------------------------------------------------------------------------------------------------ the widget
@pytest.fixture
def widget(aws: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """handlers.dashboard as deployed, whose client may call only what MonitoringPolicy allows."""
    monkeypatch.setenv("POWERTOOLS_SERVICE_NAME", "servicenow-oauth")
    import handlers.dashboard

    handler = importlib.reload(handlers.dashboard)
    called: list[str] = []

    def only_monitoring(model: Any, **_: Any) -> Any:
        called.append(model.name)
        if model.name not in ("ListSecrets", "DescribeSecret"):  # the MonitoringPolicy's actions
            parsed = {"Error": {"Code": "AccessDeniedException", "Message": "not in MonitoringPolicy"}}
            return AWSResponse("http://test", 400, {}, None), parsed

    handler.store.client.meta.events.register("before-call.secrets-manager.*", only_monitoring)
    handler.called = called
    yield handler


def test_the_widget_renders_from_list_secrets_alone(widget: Any) -> None:
    sm = boto3.client("secretsmanager")
    for name, health in crafted().items():
        tags = [{"Key": k, "Value": v} for k, v in (health.to_tags() if health else {}).items()]
        if health is None:
            tags = [{"Key": "servicenow-oauth:access-expires", "Value": "garbled"}]
        sm.create_secret(Name=f"servicenow-oauth/{name}", SecretString='{"accessToken":"never-shown-T0"}', Tags=tags)
    sm.create_secret(Name="other-app/secret", SecretString="{}")  # outside the prefix: not shown
    html = widget.lambda_handler(json.loads((EVENTS / "dashboard.json").read_text()), FakeContext())
    assert set(widget.called) == {"ListSecrets"}
    names = {row["cells"][0] for row in parse(html).rows}
    assert names == set(crafted()) and "never-shown-T0" not in html
    docs = widget.lambda_handler(json.loads((EVENTS / "dashboard-describe.json").read_text()), FakeContext())
    assert docs.startswith("## ServiceNow OAuth connections") and "ListSecrets" in docs


# ------------------------------------------------------------------------------------------------ the browser
@pytest.mark.browser
def test_the_local_status_page_in_chromium(emulator: Any) -> None:
    from playwright.sync_api import sync_playwright

    from tests.test_browser import CHROMIUM, CHROMIUM_ARGS, screenshot

    with LocalStack(refresh_interval=None) as stack:
        stack.create_jwt_connection("jwt-machine")
        stack.sweep()
        sm = stack.secretsmanager
        for name, health in crafted(datetime.now(UTC)).items():
            if health is None:
                tags = [{"Key": "servicenow-oauth:failing-since", "Value": "<b>garbled</b>"}]
            else:
                own = _with(health, instance=health.instance and f"{name}.service-now.com")
                tags = [{"Key": k, "Value": v} for k, v in own.to_tags().items()]
            sm.create_secret(Name=f"servicenow-oauth/{name}", SecretString="{}", Tags=tags)
        answer = requests.get(f"{stack.api.url}/status", timeout=30)
        assert answer.status_code == 200 and "default-src 'none'" in answer.headers["Content-Security-Policy"]
        assert stack.emulator is not None
        issued = stack.emulator.secret_values()  # every token, secret and assertion the emulator ever saw
        assert json.loads(stack.read_secret("jwt-machine")["SecretString"])["accessToken"] in issued
        assert not [value for value in issued if value in answer.text], "secret material reached the status page"
        assert requests.post(f"{stack.api.url}/status", timeout=10).status_code == 404  # GET only, local only
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 900}, java_script_enabled=False)
            page.goto(f"{stack.api.url}/status")
            attention = page.locator("#attention tbody tr")
            states = [attention.nth(i).get_attribute("data-state") for i in range(attention.count())]
            seen = list(dict.fromkeys(states))  # worst first: each state's rows together, in this order
            assert seen == ["rejected", "pending", "failing", "unknown", "expired", "expiring", "new"], states
            page.locator("summary").click()  # the healthy list unfolds without JavaScript
            healthy = page.locator("#healthy tbody tr")
            assert healthy.count() >= 3  # the demo connection's kin: healthy, jwt, and the swept JWT connection
            assert page.locator("#healthy").get_by_text("jwt-machine").is_visible()
            screenshot(page, "status-page.png")
            browser.close()
    assert re.search(r"\d+ connections", answer.text)


@pytest.mark.parametrize("value", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00", "0001-01-01T00:00:00Z"])
def test_a_timestamp_at_the_edge_of_time_is_unknown_health_not_a_crash(widget: Any, value: str) -> None:
    """Found by the review: such a value raised OverflowError, which took down the page, `make connections` and
    every refresh of the sweep. One connection's tags must never break anything but its own row."""
    from core.lifecycle import plan

    tags = [
        {"Key": "servicenow-oauth:next-attempt", "Value": value},
        {"Key": "servicenow-oauth:version", "Value": "v1"},
    ]
    assert health_of(tags) is None
    entry = {"Name": "servicenow-oauth/a", "Tags": tags, "SecretVersionsToStages": {"v1": ["AWSCURRENT"]}}
    assert plan(entry, NOW, POLICY) in ("read", "not_due", "backing_off", "needs_person")
    sm = boto3.client("secretsmanager")
    sm.create_secret(Name="servicenow-oauth/edge", SecretString="{}", Tags=tags)
    sm.create_secret(Name="servicenow-oauth/fine", SecretString="{}")
    html = widget.lambda_handler(json.loads((EVENTS / "dashboard.json").read_text()), FakeContext())
    states = {row["cells"][0]: row["state"] for row in parse(html).rows}
    assert states == {"edge": "unknown", "fine": "new"}


def test_expiring_rows_are_ordered_by_the_refresh_token_and_new_pending_ones_await_consent() -> None:
    """Found by the review: "expiring" rows were ordered by the access token, and a connection the CLI had just
    added (pending, not swept) showed "Not yet swept" instead of "Awaiting first consent"."""
    base = crafted()["expiring"]
    assert base is not None
    day, minute = timedelta(days=1), timedelta(minutes=1)
    rows = [
        Row("dies-in-13-days", _with(base, refresh_expires=NOW + 13 * day, access_expires=NOW + 5 * minute)),
        Row("dies-in-1-day", _with(base, refresh_expires=NOW + day, access_expires=NOW + 25 * minute)),
        Row("just-added", Health(status="pending_authorization", grant="authorization_code", needs_person=True)),
    ]
    shown = [(row["state"], row["cells"][0]) for row in parse(render(rows, NOW, POLICY)).rows]
    assert shown == [("pending", "just-added"), ("expiring", "dies-in-1-day"), ("expiring", "dies-in-13-days")]
