"""The callback Lambda in-process, on payload-2.0 events from events/, against moto server and the emulator."""

from __future__ import annotations

import copy
import importlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import pytest
from aws_lambda_powertools.utilities import parameters

from core.signing import sign_authorize_link
from local.servicenow_emulator import ServiceNowEmulator
from tests.conftest import CLIENT_ID, CLIENT_SECRET, REDIRECT_URI, press_consent

EVENTS = Path(__file__).resolve().parent.parent / "events"
STATE_KEY = "k" * 64
API = "https://abc123defg.execute-api.us-east-1.amazonaws.com"


@dataclass
class FakeContext:
    function_name: str = "callback"
    memory_limit_in_mb: int = 256
    invoked_function_arn: str = "arn:aws:lambda:us-east-1:123456789012:function:callback"
    aws_request_id: str = "0f5bd1a5-7d3c-4a5e-9d5b-6c1f8e2a9b10"
    remaining_ms: int = 240_000

    def get_remaining_time_in_millis(self) -> int:
        return self.remaining_ms


@dataclass
class Stack:
    handler: Any
    secretsmanager: Any
    emulator: ServiceNowEmulator

    def create_connection(self, name: str = "prod", **extra: Any) -> None:
        document = {"instanceUrl": self.emulator.url, "clientId": CLIENT_ID, "clientSecret": CLIENT_SECRET, **extra}
        self.secretsmanager.create_secret(Name=f"servicenow-oauth/{name}", SecretString=json.dumps(document))

    def snapshot(self, name: str = "prod") -> tuple[str, str]:
        value = self.secretsmanager.get_secret_value(SecretId=f"servicenow-oauth/{name}", VersionStage="AWSCURRENT")
        return value["VersionId"], value["SecretString"]

    def document(self, name: str = "prod") -> dict[str, Any]:
        return json.loads(self.snapshot(name)[1])

    def get(self, path: str, query: dict[str, str] | None = None) -> dict[str, Any]:
        template = "authorize.json" if path.endswith("/authorize") else "callback.json"
        event = copy.deepcopy(json.loads((EVENTS / template).read_text()))
        event["rawPath"] = event["requestContext"]["http"]["path"] = path
        event["rawQueryString"] = urlencode(query or {})
        event["queryStringParameters"] = query or None
        if path.endswith("/authorize"):
            event["pathParameters"] = {"name": path.split("/")[2]}
        return self.handler.lambda_handler(event, FakeContext())

    def signed_link(self, name: str = "prod", now: datetime | None = None) -> dict[str, str]:
        url = sign_authorize_link(STATE_KEY.encode(), API, name, now or datetime.now(UTC))
        return dict(parse_qsl(urlsplit(url).query))

    def start(self, name: str = "prod") -> str:
        answer = self.get(f"/connections/{name}/authorize", self.signed_link(name))
        assert answer["statusCode"] == 302, answer["body"]
        return answer["headers"]["Location"]


@pytest.fixture
def stack(
    aws: str, secretsmanager: Any, emulator: ServiceNowEmulator, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Stack]:
    monkeypatch.setenv("CONNECTION_SECRET_PREFIX", "servicenow-oauth/")
    monkeypatch.setenv("SERVICENOW_ALLOWED_HOSTS", "*.service-now.com,127.0.0.1")
    monkeypatch.setenv("STATE_KEY_SECRET_ID", "servicenow-oauth-state-key")
    monkeypatch.setenv("CALLBACK_URL", REDIRECT_URI)
    monkeypatch.setenv("POWERTOOLS_SERVICE_NAME", "servicenow-oauth")
    monkeypatch.setenv("POWERTOOLS_METRICS_NAMESPACE", "ServiceNowOAuth")
    secretsmanager.create_secret(Name="servicenow-oauth-state-key", SecretString=STATE_KEY)
    parameters.clear_caches()
    import handlers.callback

    yield Stack(importlib.reload(handlers.callback), secretsmanager, emulator)
    parameters.clear_caches()


def test_one_click_consent_stores_tokens_and_shows_expiries(stack: Stack, leak_check: list) -> None:
    stack.create_connection(scope="useraccount")
    location = stack.start()
    authorize = urlsplit(location)
    query = dict(parse_qsl(authorize.query))
    assert location.startswith(f"{stack.emulator.url}/oauth_auth.do?")
    assert query["redirect_uri"] == REDIRECT_URI and query["client_id"] == CLIENT_ID
    assert query["code_challenge_method"] == "S256" and query["scope"] == "useraccount"
    assert "code_verifier" not in location and CLIENT_SECRET not in location

    redirect = press_consent(location)
    page = stack.get("/callback", redirect)
    leak_check.append(page["body"])
    assert page["statusCode"] == 200
    assert page["headers"]["Referrer-Policy"] == "no-referrer"
    assert "Connection <code>prod</code> to <code>127.0.0.1:" in page["body"]
    document = stack.document()
    assert document["status"] == "active"
    assert document["accessToken"] and document["refreshToken"]
    assert document["accessToken"] not in page["body"] and document["refreshToken"] not in page["body"]
    assert document["redirectUri"] == REDIRECT_URI
    assert document["accessTokenExpiresAt"] in page["body"] and document["refreshTokenExpiresAt"] in page["body"]
    assert stack.emulator.token_info(document["refreshToken"])["user"] == "admin"


def assert_refused(stack: Stack, answer: dict[str, Any], status: int, phrase: str, before: tuple[str, str]) -> None:
    assert answer["statusCode"] == status, answer["body"]
    assert answer["headers"]["Content-Type"].startswith("text/html")
    assert phrase in answer["body"]
    assert "Traceback" not in answer["body"]
    assert stack.snapshot() == before, "a refused request changed the secret"


@pytest.mark.parametrize(
    ("query", "phrase"),
    [
        ({}, "not signed"),
        ({"expires": "9999999999"}, "not signed"),
        ({"expires": "9999999999", "signature": "AAAA"}, "not valid for this connection"),
        ({"expires": "soon", "signature": "AAAA"}, "malformed"),
    ],
)
def test_authorize_refuses_unsigned_or_forged_links(stack: Stack, query: dict[str, str], phrase: str) -> None:
    stack.create_connection()
    before = stack.snapshot()
    assert_refused(stack, stack.get("/connections/prod/authorize", query), 403, phrase, before)


def test_authorize_refuses_expired_links_and_links_for_another_connection(stack: Stack) -> None:
    stack.create_connection()
    before = stack.snapshot()
    old = stack.signed_link(now=datetime.now(UTC) - timedelta(hours=1))
    assert_refused(stack, stack.get("/connections/prod/authorize", old), 403, "expired", before)
    other = stack.signed_link("staging")
    assert_refused(stack, stack.get("/connections/prod/authorize", other), 403, "not valid for this connection", before)


def test_authorize_for_unknown_or_bad_connection_names(stack: Stack) -> None:
    answer = stack.get("/connections/nope/authorize", stack.signed_link("nope"))
    assert answer["statusCode"] == 404 and "nope" in answer["body"]
    answer = stack.get("/connections/<script>/authorize", stack.signed_link("<script>"))
    assert answer["statusCode"] in (400, 404)
    assert "<script>" not in answer["body"]


def test_deny_gets_a_page_and_changes_nothing(stack: Stack, leak_check: list) -> None:
    stack.create_connection()
    before = stack.snapshot()
    redirect = press_consent(stack.start(), "deny")
    answer = stack.get("/callback", redirect)
    leak_check.append(answer["body"])
    assert_refused(stack, answer, 400, "pressed Deny", before)
    assert '<code id="connection">prod</code>' in answer["body"]


@pytest.mark.parametrize(
    ("query", "phrase"),
    [
        ({"code": "abc"}, "no state"),
        ({"state": "AAAA"}, "malformed"),
        ({"code": "abc", "state": "x" * 80}, "not issued by this service"),
        ({"code": "abc", "state": "<script>alert(1)</script>"}, "malformed"),
        ({"error": "<img src=x onerror=alert(1)>"}, "(error)"),
    ],
)
def test_callback_refuses_bad_input_with_escaped_pages(stack: Stack, query: dict[str, str], phrase: str) -> None:
    stack.create_connection()
    before = stack.snapshot()
    answer = stack.get("/callback", query)
    assert_refused(stack, answer, 400, phrase, before)
    assert "<script>" not in answer["body"] and "<img" not in answer["body"]


def test_missing_code_with_a_valid_state(stack: Stack) -> None:
    stack.create_connection()
    before = stack.snapshot()
    redirect = press_consent(stack.start())
    assert_refused(stack, stack.get("/callback", {"state": redirect["state"]}), 400, "no code", before)


def test_replayed_state_is_refused(stack: Stack, leak_check: list) -> None:
    stack.create_connection()
    redirect = press_consent(stack.start())
    assert stack.get("/callback", redirect)["statusCode"] == 200
    after_first = stack.snapshot()
    answer = stack.get("/callback", redirect)
    leak_check.append(answer["body"])
    assert_refused(stack, answer, 400, "already completed", after_first)


def test_an_older_state_dies_when_a_newer_consent_completes(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    stack.create_connection()
    first = stack.start()
    monkeypatch.setattr(stack.handler, "utc_now", lambda: datetime.now(UTC) + timedelta(seconds=5))
    second = stack.start()
    assert stack.get("/callback", press_consent(second))["statusCode"] == 200
    after = stack.snapshot()
    assert_refused(stack, stack.get("/callback", press_consent(first)), 400, "newer consent", after)


def test_expired_state_is_refused(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    stack.create_connection()
    before = stack.snapshot()
    redirect = press_consent(stack.start())
    monkeypatch.setattr(stack.handler, "utc_now", lambda: datetime.now(UTC) + timedelta(minutes=11))
    assert_refused(stack, stack.get("/callback", redirect), 400, "longer than 10 minutes", before)


def test_hibernating_instance_at_exchange(stack: Stack, leak_check: list) -> None:
    stack.create_connection()
    before = stack.snapshot()
    redirect = press_consent(stack.start())
    stack.emulator.inject("hibernate")
    answer = stack.get("/callback", redirect)
    leak_check.append(answer["body"])
    assert_refused(stack, answer, 503, "hibernating", before)
    assert answer["headers"]["Retry-After"] == "60"


def test_wrong_client_secret_is_a_clear_page(stack: Stack, leak_check: list) -> None:
    stack.create_connection()
    before = stack.snapshot()
    redirect = press_consent(stack.start())
    stack.emulator.set_client_secret(CLIENT_ID, "rotated-in-servicenow-secret")
    answer = stack.get("/callback", redirect)
    leak_check.append(answer["body"])
    assert_refused(stack, answer, 502, "check the client id and secret", before)


def test_a_secret_that_does_not_parse(stack: Stack) -> None:
    stack.secretsmanager.create_secret(Name="servicenow-oauth/prod", SecretString='{"instanceUrl": 5}')
    before = stack.snapshot()
    answer = stack.get("/connections/prod/authorize", stack.signed_link())
    assert_refused(stack, answer, 500, "instanceUrl", before)


def test_expected_user_mismatch_keeps_the_old_tokens(stack: Stack, leak_check: list) -> None:
    stack.create_connection(expectedUser="svc.integration")
    stack.emulator.consent_user = "svc.integration"
    assert stack.get("/callback", press_consent(stack.start()))["statusCode"] == 200
    good = stack.snapshot()
    stack.emulator.consent_user = "admin"
    before = stack.emulator.active_refresh_token_count()
    answer = stack.get("/callback", press_consent(stack.start()))
    leak_check.append(answer["body"])
    assert_refused(stack, answer, 403, "admin", good)
    assert "svc.integration" in answer["body"]
    assert stack.emulator.active_refresh_token_count() == before  # the wrong user's token was revoked again


def test_unknown_routes_are_404_pages(stack: Stack) -> None:
    answer = stack.get("/connections/prod/other")
    assert answer["statusCode"] == 404


def test_password_connections_need_no_consent(stack: Stack) -> None:
    stack.create_connection(grantType="password", username="svc.integration", password="Pa55w0rd-emulator")
    before = stack.snapshot()
    assert_refused(
        stack, stack.get("/connections/prod/authorize", stack.signed_link()), 400, "needs no consent", before
    )


def test_an_unverifiable_expected_user_revokes_the_new_tokens(stack: Stack, leak_check: list) -> None:
    stack.create_connection(expectedUser="svc.integration")
    before = stack.snapshot()
    redirect = press_consent(stack.start())
    stack.emulator.inject("server_error", path="/api/now/table/sys_user", count=10)
    active = stack.emulator.active_refresh_token_count()
    answer = stack.get("/callback", redirect)
    leak_check.append(answer["body"])
    assert_refused(stack, answer, 502, "could not check which ServiceNow user", before)
    assert stack.emulator.active_refresh_token_count() == active  # the unstored tokens were revoked


def test_a_secret_write_that_keeps_failing_revokes_the_unstored_tokens(stack: Stack, leak_check: list) -> None:
    from botocore.exceptions import ClientError

    stack.create_connection()
    before = stack.snapshot()
    redirect = press_consent(stack.start())

    def throttle(**_: Any) -> None:
        raise ClientError({"Error": {"Code": "ThrottlingException", "Message": "injected"}}, "PutSecretValue")

    client = stack.handler.store.client
    client.meta.events.register("before-call.secretsmanager.PutSecretValue", throttle)
    try:
        active = stack.emulator.active_refresh_token_count()
        answer = stack.get("/callback", redirect)
    finally:
        client.meta.events.unregister("before-call.secretsmanager.PutSecretValue", throttle)
    leak_check.append(answer["body"])
    assert answer["statusCode"] == 500 and stack.snapshot() == before
    assert stack.emulator.active_refresh_token_count() == active


def revoke_requests(stack: Stack) -> list[dict[str, Any]]:
    return [entry for entry in stack.emulator.requests_log if entry["path"] == "/oauth_revoke_token.do"]


def assert_only_the_stored_tokens_live(stack: Stack) -> None:
    """Every token ServiceNow issued to the client is either in the secret or revoked (counts, never values,
    in a failure message)."""
    document = stack.document()
    for kind, live in (
        ("refresh", stack.emulator.live_refresh_tokens(CLIENT_ID)),
        ("access", stack.emulator.live_access_tokens(CLIENT_ID)),
    ):
        stored = document[f"{kind}Token"]
        unknown, stored_is_live = len(live - {stored}), stored in live
        assert (unknown, stored_is_live) == (0, True), f"{kind}: {unknown} live token(s) not stored"


def live_token_counts(stack: Stack) -> tuple[int, int]:
    return len(stack.emulator.live_refresh_tokens(CLIENT_ID)), len(stack.emulator.live_access_tokens(CLIENT_ID))


def test_a_double_callback_leaves_only_the_stored_tokens_alive(
    stack: Stack, leak_check: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The browser follows oauth_auth.do twice: two codes for one state, both exchanged; the second to store
    finds the state spent (inside the compare-and-swap) and must revoke what it obtained."""
    stack.create_connection()
    location = stack.start()
    first, second = press_consent(location), press_consent(location)
    assert first["state"] == second["state"] and first["code"] != second["code"]
    exchange = stack.handler.servicenow.exchange_code
    completed: list[tuple[dict[str, Any], tuple[str, str]]] = []  # the first callback's page and the secret after

    def exchange_while_the_first_callback_completes(*args: Any, **kwargs: Any) -> Any:
        token = exchange(*args, **kwargs)
        if not completed:  # in the second callback: the first one runs now, start to finish
            completed.append(({}, ("", "")))
            completed[0] = (stack.get("/callback", first), stack.snapshot())
        return token

    monkeypatch.setattr(stack.handler.servicenow, "exchange_code", exchange_while_the_first_callback_completes)
    late = stack.get("/callback", second)
    ((early, after_first),) = completed
    leak_check.extend([early["body"], late["body"]])
    assert early["statusCode"] == 200, early["body"]
    assert stack.emulator.token_requests("authorization_code") == 2  # both codes really were exchanged
    assert_refused(stack, late, 400, "already completed", after_first)
    assert_only_the_stored_tokens_live(stack)


@pytest.mark.parametrize(("change", "status"), [("delete", 404), ("corrupt", 500)])
def test_a_secret_gone_or_broken_after_the_exchange_revokes_the_new_tokens(
    stack: Stack, leak_check: list, monkeypatch: pytest.MonkeyPatch, change: str, status: int
) -> None:
    stack.create_connection()
    redirect = press_consent(stack.start())
    exchange = stack.handler.servicenow.exchange_code

    def exchange_then_change_the_secret(*args: Any, **kwargs: Any) -> Any:
        token = exchange(*args, **kwargs)
        if change == "delete":
            stack.secretsmanager.delete_secret(SecretId="servicenow-oauth/prod", ForceDeleteWithoutRecovery=True)
        else:
            stack.secretsmanager.put_secret_value(SecretId="servicenow-oauth/prod", SecretString='{"instanceUrl": 5}')
        return token

    monkeypatch.setattr(stack.handler.servicenow, "exchange_code", exchange_then_change_the_secret)
    answer = stack.get("/callback", redirect)
    leak_check.append(answer["body"])
    assert answer["statusCode"] == status, answer["body"]
    assert "Traceback" not in answer["body"]
    assert stack.emulator.token_requests("authorization_code") == 1
    assert live_token_counts(stack) == (0, 0)  # the unstored tokens were revoked


def test_a_re_consent_revokes_the_refresh_token_it_replaced(stack: Stack, leak_check: list) -> None:
    stack.create_connection()
    assert stack.get("/callback", press_consent(stack.start()))["statusCode"] == 200
    replaced = stack.document()["refreshToken"]
    assert revoke_requests(stack) == []
    page = stack.get("/callback", press_consent(stack.start()))
    leak_check.append(page["body"])
    assert page["statusCode"] == 200, page["body"]
    assert stack.document()["refreshToken"] != replaced
    assert stack.emulator.token_info(replaced)["active"] is False
    assert_only_the_stored_tokens_live(stack)
    assert len(revoke_requests(stack)) == 1


@pytest.mark.parametrize("failure", ["hibernate", "drop", "unexpected"])
def test_a_failing_revoke_does_not_fail_the_consent(
    stack: Stack, leak_check: list, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    stack.create_connection()
    assert stack.get("/callback", press_consent(stack.start()))["statusCode"] == 200
    replaced = stack.document()["refreshToken"]
    redirect = press_consent(stack.start())
    if failure == "unexpected":

        def revoke(*_: Any) -> None:
            raise RuntimeError("not a ProviderError")

        monkeypatch.setattr(stack.handler.servicenow, "revoke", revoke)
    else:
        stack.emulator.inject(failure, path="/oauth_revoke_token.do", count=10)
    page = stack.get("/callback", redirect)
    leak_check.append(page["body"])
    assert page["statusCode"] == 200, page["body"]
    assert "Connection <code>prod</code> to <code>127.0.0.1:" in page["body"]
    document = stack.document()
    assert document["status"] == "active" and document["refreshToken"] != replaced
    assert document["consentState"] and stack.emulator.token_info(document["refreshToken"])["active"] is True
    if failure != "unexpected":
        assert revoke_requests(stack), "the revoke was never attempted"
    assert stack.emulator.token_info(replaced)["active"] is True  # the revoke failed: best effort only


@pytest.mark.parametrize("fault", [{"fault": "drip", "delay": 0.3}, {"fault": "slow", "delay": 1.5}], ids=str)
def test_a_code_exchange_cut_off_says_to_start_again_not_to_retry(stack: Stack, fault: dict, leak_check: list) -> None:
    """Found by review (#29): an exchange whose answer the deadline cut off (drip-fed, or merely slower than the
    deadline) is lost: the code is spent and ServiceNow may hold tokens the stack never saw (README, Security). The
    page said "retry later"; it now says the answer was lost and to start again from a new authorize link. The
    deployed deadline is 10 s, as long as the read timeout gave a slow instance before."""
    assert stack.handler.servicenow.request_seconds == 10.0
    stack.create_connection()
    stack.handler.servicenow.request_seconds = 1.0  # the deployed 10 s, shortened for the test's sake
    redirect = press_consent(stack.start())
    stack.emulator.inject(fault["fault"], delay=fault["delay"], count=1)
    page = stack.get("/callback", redirect)
    leak_check.append(page["body"])
    assert page["statusCode"] == 503 and "ServiceNow&#x27;s answer was lost" in page["body"], page["body"]
    assert "start again from a new authorize link" in page["body"]
    assert "refreshToken" not in stack.document()  # nothing stored: still pending, so the sweep asks nobody
