"""The ServiceNow emulator must behave like ServiceNow over real HTTP, or every other test proves nothing.

Everything here goes through sockets with `requests`; time is moved with an injected clock, never slept.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import secrets
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import urllib3

from local.servicenow_emulator import ConsentForm, ServiceNowEmulator

CID = "emu-test-client-0001"
CSECRET = "emu-test-secret-Q9!x7"
REDIRECT = "https://app.example.test/callback"
OTHER_REDIRECT = "https://app.example.test/other?tenant=7"
USER = "svc.integration"
PASSWORD = "emu-test-password-4711"
ACCESS_DENIED = {"error_description": "access_denied", "error": "server_error"}
NOT_AUTHENTICATED = {
    "error": {"message": "User Not Authenticated", "detail": "Required to provide Auth information"},
    "status": "failure",
}
TIMEOUT = 10


class Clock:
    """Epoch-seconds clock the tests move by hand."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def fake_clock() -> Clock:
    return Clock()


def make_emulator(clock: Clock, **kwargs: Any) -> ServiceNowEmulator:
    emu = ServiceNowEmulator(clock=clock, **kwargs)
    emu.register_client(CID, CSECRET, [REDIRECT, OTHER_REDIRECT])
    emu.add_user(USER, PASSWORD)
    return emu


@pytest.fixture
def snow(fake_clock: Clock) -> Iterator[ServiceNowEmulator]:
    with make_emulator(fake_clock) as emu:
        yield emu


# ----------------------------------------------------------------------------- helpers
def s256(verifier: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()


def auth_params(**overrides: str | None) -> dict[str, str]:
    params: dict[str, str | None] = {
        "response_type": "code",
        "client_id": CID,
        "redirect_uri": REDIRECT,
        "state": "st_" + secrets.token_urlsafe(12),
    }
    params.update(overrides)
    return {k: v for k, v in params.items() if v is not None}


def consent(
    emu: ServiceNowEmulator, action: str = "allow", **overrides: str | None
) -> tuple[str, dict[str, list[str]]]:
    """GET the consent page, submit its own form like a browser would; returns (Location, parsed query)."""
    page = requests.get(f"{emu.url}/oauth_auth.do", params=auth_params(**overrides), timeout=TIMEOUT)
    assert page.status_code == 200, page.text
    parser = ConsentForm()
    parser.feed(page.text)
    assert parser.method.lower() == "post"
    data = dict(parser.fields, action=parser.buttons[action]["value"])
    answer = requests.post(
        urllib.parse.urljoin(emu.url, parser.action), data=data, allow_redirects=False, timeout=TIMEOUT
    )
    assert answer.status_code == 302
    location = answer.headers["Location"]
    return location, urllib.parse.parse_qs(urllib.parse.urlsplit(location).query)


def get_code(emu: ServiceNowEmulator, **overrides: str | None) -> str:
    _, query = consent(emu, **overrides)
    return query["code"][0]


def token(emu: ServiceNowEmulator, **form: str) -> requests.Response:
    body = {"client_id": CID, "client_secret": CSECRET, **form}
    return requests.post(f"{emu.url}/oauth_token.do", data=body, timeout=TIMEOUT)


def exchange(emu: ServiceNowEmulator, code: str, redirect_uri: str = REDIRECT, **extra: str) -> requests.Response:
    return token(emu, grant_type="authorization_code", code=code, redirect_uri=redirect_uri, **extra)


def password_grant(emu: ServiceNowEmulator, **extra: str) -> requests.Response:
    form = {"grant_type": "password", "username": USER, "password": PASSWORD}
    return token(emu, **{**form, **extra})


def refresh(emu: ServiceNowEmulator, refresh_token: str) -> requests.Response:
    return token(emu, grant_type="refresh_token", refresh_token=refresh_token)


def assert_denied(response: requests.Response) -> None:
    assert response.status_code == 401
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.json() == ACCESS_DENIED


def whoami(emu: ServiceNowEmulator, access_token: str) -> requests.Response:
    return requests.get(
        f"{emu.url}/api/now/table/sys_user",
        params={"sysparm_query": "user_name=javascript:gs.getUserName()", "sysparm_fields": "user_name,sys_id"},
        headers={"Authorization": f"Bearer {access_token}", "Accept": "application/json"},
        timeout=TIMEOUT,
    )


# ----------------------------------------------------------------------------- lifecycle
def test_url_start_stop_and_restart_on_same_port(fake_clock: Clock) -> None:
    emu = make_emulator(fake_clock)
    with pytest.raises(RuntimeError):
        _ = emu.url
    assert emu.start() is emu
    url = emu.url
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", url)
    session = requests.Session()
    assert session.get(f"{url}/nope", timeout=TIMEOUT).status_code == 404
    emu.stop()
    with pytest.raises(requests.ConnectionError):
        session.get(f"{url}/nope", timeout=TIMEOUT)  # kept-alive connection is cut too
    session.close()
    emu.start()
    try:
        assert emu.url == url
        assert requests.get(f"{url}/nope", timeout=TIMEOUT).status_code == 404
    finally:
        emu.stop()
    emu.stop()  # idempotent


def test_unknown_paths_are_404(snow: ServiceNowEmulator) -> None:
    assert requests.get(f"{snow.url}/nothing.do", timeout=TIMEOUT).status_code == 404
    api = requests.get(f"{snow.url}/api/now/nothing", timeout=TIMEOUT)
    assert api.status_code == 404
    assert api.json()["status"] == "failure"


# ----------------------------------------------------------------------------- consent page
def test_consent_page_is_html_form_with_escaped_hidden_fields(snow: ServiceNowEmulator) -> None:
    snow.consent_user = "jane.doe"
    state = 'abc"<x>'
    page = requests.get(
        f"{snow.url}/oauth_auth.do",
        params=auth_params(state=state, scope="useraccount", code_challenge="c" * 43, code_challenge_method="S256"),
        timeout=TIMEOUT,
    )
    assert page.status_code == 200
    assert page.headers["Content-Type"].startswith("text/html")
    assert CID in page.text and "jane.doe" in page.text
    assert '<form method="post" action="/oauth_auth.do">' in page.text
    assert '<button type="submit" name="action" value="allow" id="allow">Allow</button>' in page.text
    assert 'value="deny" id="deny">Deny</button>' in page.text
    assert 'abc"<x>' not in page.text  # escaped, not injected
    parser = ConsentForm()
    parser.feed(page.text)
    assert parser.fields == {
        "response_type": "code",
        "client_id": CID,
        "redirect_uri": REDIRECT,
        "state": state,
        "scope": "useraccount",
        "code_challenge": "c" * 43,
        "code_challenge_method": "S256",
    }


def test_allow_redirects_with_code_and_state(snow: ServiceNowEmulator) -> None:
    location, query = consent(snow, state="s1")
    assert location.startswith(REDIRECT + "?")
    assert query["state"] == ["s1"]
    assert re.fullmatch(r"[A-Za-z0-9_-]{20,}", query["code"][0])


def test_allow_appends_to_redirect_uri_with_query(snow: ServiceNowEmulator) -> None:
    location, query = consent(snow, redirect_uri=OTHER_REDIRECT, state="s2")
    assert location.startswith(OTHER_REDIRECT + "&code=")
    assert query["tenant"] == ["7"] and query["state"] == ["s2"]


def test_deny_redirects_with_access_denied(snow: ServiceNowEmulator) -> None:
    location, query = consent(snow, action="deny", state="s3")
    assert location.startswith(REDIRECT + "?")
    assert query["error"] == ["access_denied"]
    assert query["error_description"][0]
    assert query["state"] == ["s3"]
    assert "code" not in query


def test_unregistered_redirect_uri_silently_uses_first(snow: ServiceNowEmulator) -> None:
    location, query = consent(snow, redirect_uri="https://evil.example/cb")
    assert location.startswith(REDIRECT + "?")
    # the code is bound to the URI actually used
    assert_denied(exchange(snow, query["code"][0], redirect_uri="https://evil.example/cb"))
    _, query = consent(snow, redirect_uri="https://evil.example/cb")
    assert exchange(snow, query["code"][0], redirect_uri=REDIRECT).status_code == 200


@pytest.mark.parametrize("state", [None, ""])
def test_missing_state_page(snow: ServiceNowEmulator, state: str | None) -> None:
    page = requests.get(f"{snow.url}/oauth_auth.do", params=auth_params(state=state), timeout=TIMEOUT)
    assert page.status_code == 400
    assert page.headers["Content-Type"].startswith("text/html")
    assert "Missing State parameter in request" in page.text


@pytest.mark.parametrize(
    "overrides",
    [
        {"client_id": "unknown"},
        {"response_type": "token"},
        {"code_challenge": "x" * 43, "code_challenge_method": "plain"},
    ],
)
def test_bad_authorize_requests_are_400_html(snow: ServiceNowEmulator, overrides: dict[str, str]) -> None:
    page = requests.get(f"{snow.url}/oauth_auth.do", params=auth_params(**overrides), timeout=TIMEOUT)
    assert page.status_code == 400
    assert page.headers["Content-Type"].startswith("text/html")
    assert "<form" not in page.text


# ----------------------------------------------------------------------------- authorization_code
def test_authorization_code_grant(snow: ServiceNowEmulator) -> None:
    answer = exchange(snow, get_code(snow))
    assert answer.status_code == 200
    assert answer.headers["Content-Type"].startswith("application/json")
    body = answer.json()
    assert set(body) == {"access_token", "refresh_token", "scope", "token_type", "expires_in"}
    assert body["scope"] == "useraccount" and body["token_type"] == "Bearer"
    assert body["expires_in"] == 1799
    assert len(body["access_token"]) >= 60 and len(body["refresh_token"]) >= 60
    assert body["access_token"] != body["refresh_token"]
    assert whoami(snow, body["access_token"]).json()["result"][0]["user_name"] == "admin"


def test_requested_scope_is_echoed(snow: ServiceNowEmulator) -> None:
    body = exchange(snow, get_code(snow, scope="useraccount custom_scope")).json()
    assert body["scope"] == "useraccount custom_scope"


def test_code_is_single_use(snow: ServiceNowEmulator) -> None:
    code = get_code(snow)
    assert exchange(snow, code).status_code == 200
    assert_denied(exchange(snow, code))


def test_code_expires(fake_clock: Clock) -> None:
    with make_emulator(fake_clock, code_lifespan=60) as emu:
        code = get_code(emu)
        fake_clock.advance(61)
        assert_denied(exchange(emu, code))
        code = get_code(emu)
        fake_clock.advance(59)
        assert exchange(emu, code).status_code == 200


def test_code_bound_to_redirect_uri_and_client(snow: ServiceNowEmulator) -> None:
    snow.register_client("other-client", "other-secret", [REDIRECT])
    code = get_code(snow)
    other = requests.post(
        f"{snow.url}/oauth_token.do",
        data={
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT,
            "client_id": "other-client",
            "client_secret": "other-secret",
        },
        timeout=TIMEOUT,
    )
    assert_denied(other)
    assert_denied(exchange(snow, get_code(snow), redirect_uri=OTHER_REDIRECT))
    assert_denied(token(snow, grant_type="authorization_code", code=get_code(snow)))  # no redirect_uri


def test_pkce(snow: ServiceNowEmulator) -> None:
    verifier = secrets.token_urlsafe(48)
    challenge = {"code_challenge": s256(verifier), "code_challenge_method": "S256"}
    assert_denied(exchange(snow, get_code(snow, **challenge), code_verifier=secrets.token_urlsafe(48)))
    assert_denied(exchange(snow, get_code(snow, **challenge)))  # verifier missing
    assert exchange(snow, get_code(snow, **challenge), code_verifier=verifier).status_code == 200


def test_wrong_client_secret_and_unknown_client(snow: ServiceNowEmulator) -> None:
    code = get_code(snow)
    assert_denied(token(snow, grant_type="authorization_code", code=code, redirect_uri=REDIRECT, client_secret="x"))
    assert_denied(token(snow, grant_type="password", username=USER, password=PASSWORD, client_id="nope"))


def test_set_client_secret(snow: ServiceNowEmulator) -> None:
    snow.set_client_secret(CID, "rotated-secret-123")
    assert_denied(password_grant(snow))
    assert password_grant(snow, client_secret="rotated-secret-123").status_code == 200


# ----------------------------------------------------------------------------- refresh_token
def test_refresh_returns_same_refresh_and_current_access_with_moved_expiry(
    snow: ServiceNowEmulator, fake_clock: Clock
) -> None:
    first = exchange(snow, get_code(snow)).json()
    fake_clock.advance(600)
    again = refresh(snow, first["refresh_token"])
    assert again.status_code == 200
    body = again.json()
    assert body["refresh_token"] == first["refresh_token"]
    assert body["access_token"] == first["access_token"]  # still valid → the current one again
    assert body["expires_in"] == 1799
    info = snow.token_info(body["access_token"])
    assert info is not None and info["expires_at"] == fake_clock.now + 1800  # moved out
    fake_clock.advance(1700)  # 2300 s after issue: alive only because the expiry moved
    assert whoami(snow, body["access_token"]).status_code == 200
    fake_clock.advance(101)
    assert whoami(snow, body["access_token"]).status_code == 401
    newer = refresh(snow, first["refresh_token"]).json()
    assert newer["access_token"] != first["access_token"]
    assert newer["refresh_token"] == first["refresh_token"]
    assert whoami(snow, newer["access_token"]).status_code == 200


def test_refresh_does_not_extend_refresh_expiry(fake_clock: Clock) -> None:
    with make_emulator(fake_clock, refresh_lifespan=10_000) as emu:
        first = password_grant(emu).json()
        fake_clock.advance(9_000)
        assert refresh(emu, first["refresh_token"]).status_code == 200
        fake_clock.advance(999)
        assert refresh(emu, first["refresh_token"]).status_code == 200
        fake_clock.advance(2)  # 10_001 s after issue, despite two refreshes
        assert_denied(refresh(emu, first["refresh_token"]))


def test_default_refresh_lifespan_is_100_days(snow: ServiceNowEmulator, fake_clock: Clock) -> None:
    first = password_grant(snow).json()
    fake_clock.advance(8_640_000 - 1)
    assert refresh(snow, first["refresh_token"]).status_code == 200
    fake_clock.advance(1)
    assert_denied(refresh(snow, first["refresh_token"]))


def test_password_grant_issues_fresh_refresh_token(fake_clock: Clock) -> None:
    with make_emulator(fake_clock, refresh_lifespan=10_000) as emu:
        first = password_grant(emu)
        assert first.status_code == 200
        body = first.json()
        assert body["expires_in"] == 1799 and body["scope"] == "useraccount"
        assert whoami(emu, body["access_token"]).json()["result"][0]["user_name"] == USER
        fake_clock.advance(9_000)
        second = password_grant(emu).json()
        assert second["refresh_token"] != body["refresh_token"]
        fake_clock.advance(2_000)  # first refresh token is past its life, the new one is not
        assert_denied(refresh(emu, body["refresh_token"]))
        assert refresh(emu, second["refresh_token"]).status_code == 200


def test_password_grant_bad_password_and_unknown_user(snow: ServiceNowEmulator) -> None:
    assert_denied(password_grant(snow, password="wrong"))
    assert_denied(password_grant(snow, username="ghost"))


def test_rotate_refresh_tokens_mode(fake_clock: Clock) -> None:
    with make_emulator(fake_clock, rotate_refresh_tokens=True, refresh_lifespan=10_000) as emu:
        first = password_grant(emu).json()
        fake_clock.advance(5_000)
        second = refresh(emu, first["refresh_token"]).json()
        assert second["refresh_token"] != first["refresh_token"]
        assert_denied(refresh(emu, first["refresh_token"]))  # the old one is dead
        fake_clock.advance(4_999)
        third = refresh(emu, second["refresh_token"]).json()
        fake_clock.advance(2)  # original expiry kept across rotations
        assert_denied(refresh(emu, third["refresh_token"]))


def test_refresh_token_belongs_to_its_client(snow: ServiceNowEmulator) -> None:
    snow.register_client("other-client", "other-secret", [REDIRECT])
    rt = password_grant(snow).json()["refresh_token"]
    assert_denied(
        token(
            snow, grant_type="refresh_token", refresh_token=rt, client_id="other-client", client_secret="other-secret"
        )
    )


def test_per_client_lifespans(snow: ServiceNowEmulator, fake_clock: Clock) -> None:
    snow.register_client("short", "short-secret", [REDIRECT], access_lifespan=300, refresh_lifespan=600)
    body = token(
        snow, grant_type="password", username=USER, password=PASSWORD, client_id="short", client_secret="short-secret"
    ).json()
    assert body["expires_in"] == 299
    fake_clock.advance(601)
    assert_denied(
        token(
            snow,
            grant_type="refresh_token",
            refresh_token=body["refresh_token"],
            client_id="short",
            client_secret="short-secret",
        )
    )


# ----------------------------------------------------------------------------- client_credentials
def test_client_credentials_refused_without_application_user(snow: ServiceNowEmulator) -> None:
    assert_denied(token(snow, grant_type="client_credentials"))


def test_client_credentials_with_application_user(snow: ServiceNowEmulator) -> None:
    snow.register_client("machine", "machine-secret", client_credentials_user="app.user")
    answer = token(snow, grant_type="client_credentials", client_id="machine", client_secret="machine-secret")
    assert answer.status_code == 200
    body = answer.json()
    assert "refresh_token" not in body
    assert body["token_type"] == "Bearer" and body["expires_in"] == 1799 and body["scope"] == "useraccount"
    assert whoami(snow, body["access_token"]).json()["result"][0]["user_name"] == "app.user"
    scoped = token(
        snow, grant_type="client_credentials", client_id="machine", client_secret="machine-secret", scope="x_app.read"
    )
    assert scoped.json()["scope"] == "x_app.read"
    assert_denied(token(snow, grant_type="client_credentials", client_id="machine", client_secret="bad"))


# ----------------------------------------------------------------------------- failure shapes
@pytest.mark.parametrize(
    "form",
    [
        {"grant_type": "urn:ietf:params:oauth:grant-type:unknown"},
        {"grant_type": "refresh_token", "refresh_token": "not-a-token"},
        {"grant_type": "refresh_token"},
        {"grant_type": "authorization_code", "code": "bogus", "redirect_uri": REDIRECT},
        {},
    ],
)
def test_every_token_failure_is_servicenow_401(snow: ServiceNowEmulator, form: dict[str, str]) -> None:
    assert_denied(token(snow, **form))


def test_json_body_refused(snow: ServiceNowEmulator) -> None:
    answer = requests.post(
        f"{snow.url}/oauth_token.do",
        json={
            "grant_type": "password",
            "username": USER,
            "password": PASSWORD,
            "client_id": CID,
            "client_secret": CSECRET,
        },
        timeout=TIMEOUT,
    )
    assert_denied(answer)
    assert snow.active_access_token_count() == 0


@pytest.mark.parametrize("field", ["client_secret", "password", "refresh_token", "code"])
def test_credentials_in_query_string_refused(snow: ServiceNowEmulator, field: str) -> None:
    good = {
        "grant_type": "password",
        "username": USER,
        "password": PASSWORD,
        "client_id": CID,
        "client_secret": CSECRET,
    }
    answer = requests.post(
        f"{snow.url}/oauth_token.do", params={field: good.get(field, "x")}, data=good, timeout=TIMEOUT
    )
    assert_denied(answer)
    # the same body without the query string works
    assert requests.post(f"{snow.url}/oauth_token.do", data=good, timeout=TIMEOUT).status_code == 200


# ----------------------------------------------------------------------------- revoke
def test_revoke_access_token(snow: ServiceNowEmulator) -> None:
    body = password_grant(snow).json()
    assert whoami(snow, body["access_token"]).status_code == 200
    answer = requests.post(f"{snow.url}/oauth_revoke_token.do", data={"token": body["access_token"]}, timeout=TIMEOUT)
    assert answer.status_code == 200 and answer.content == b""
    assert whoami(snow, body["access_token"]).status_code == 401
    # the refresh token still works and hands out a new access token
    again = refresh(snow, body["refresh_token"]).json()
    assert again["access_token"] != body["access_token"]
    assert whoami(snow, again["access_token"]).status_code == 200


def test_revoke_refresh_token_kills_its_access_tokens(snow: ServiceNowEmulator) -> None:
    body = password_grant(snow).json()
    other = password_grant(snow).json()
    answer = requests.post(
        f"{snow.url}/oauth_revoke_token.do",
        data={"token": body["refresh_token"], "client_id": CID, "client_secret": CSECRET},
        timeout=TIMEOUT,
    )
    assert answer.status_code == 200
    assert_denied(refresh(snow, body["refresh_token"]))
    assert whoami(snow, body["access_token"]).status_code == 401
    assert whoami(snow, other["access_token"]).status_code == 200  # other grants untouched


def test_revoke_with_bad_client_secret_refused(snow: ServiceNowEmulator) -> None:
    body = password_grant(snow).json()
    answer = requests.post(
        f"{snow.url}/oauth_revoke_token.do",
        data={"token": body["access_token"], "client_id": CID, "client_secret": "bad"},
        timeout=TIMEOUT,
    )
    assert answer.status_code == 401
    assert whoami(snow, body["access_token"]).status_code == 200


def test_revoke_user_tokens(snow: ServiceNowEmulator) -> None:
    mine = password_grant(snow).json()
    admins = exchange(snow, get_code(snow)).json()
    snow.revoke_user_tokens(USER)
    assert_denied(refresh(snow, mine["refresh_token"]))
    assert whoami(snow, mine["access_token"]).status_code == 401
    assert refresh(snow, admins["refresh_token"]).status_code == 200


# ----------------------------------------------------------------------------- REST API
def test_table_api_requires_valid_bearer(snow: ServiceNowEmulator, fake_clock: Clock) -> None:
    url = f"{snow.url}/api/now/table/incident"
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {CSECRET}"}):
        answer = requests.get(url, headers=headers, timeout=TIMEOUT)
        assert answer.status_code == 401
        assert answer.json() == NOT_AUTHENTICATED
    access = password_grant(snow).json()["access_token"]
    ok = requests.get(url, headers={"Authorization": f"Bearer {access}"}, timeout=TIMEOUT)
    assert ok.status_code == 200 and ok.json() == {"result": []}
    fake_clock.advance(1800)
    expired = requests.get(url, headers={"Authorization": f"Bearer {access}"}, timeout=TIMEOUT)
    assert expired.status_code == 401 and expired.json() == NOT_AUTHENTICATED


def test_sys_user_whoami_and_current_user(snow: ServiceNowEmulator) -> None:
    access = password_grant(snow).json()["access_token"]
    first = whoami(snow, access).json()
    assert first["result"][0]["user_name"] == USER
    assert re.fullmatch(r"[0-9a-f]{32}", first["result"][0]["sys_id"])
    other = password_grant(snow).json()["access_token"]
    assert whoami(snow, other).json() == first  # stable sys_id
    current = requests.get(
        f"{snow.url}/api/now/ui/user/current_user", headers={"Authorization": f"Bearer {access}"}, timeout=TIMEOUT
    ).json()
    assert current == {"result": {"user_name": USER, "user_sys_id": first["result"][0]["sys_id"]}}
    admin = exchange(snow, get_code(snow)).json()["access_token"]
    assert whoami(snow, admin).json()["result"][0]["user_name"] == "admin"
    assert whoami(snow, admin).json()["result"][0]["sys_id"] != first["result"][0]["sys_id"]


def test_add_record(snow: ServiceNowEmulator) -> None:
    row = snow.add_record("incident", {"number": "INC0010001"})
    access = password_grant(snow).json()["access_token"]
    answer = requests.get(
        f"{snow.url}/api/now/table/incident", headers={"Authorization": f"Bearer {access}"}, timeout=TIMEOUT
    )
    assert answer.json() == {"result": [{"number": "INC0010001", "sys_id": row["sys_id"]}]}


# ----------------------------------------------------------------------------- faults
def test_fault_hibernate(snow: ServiceNowEmulator) -> None:
    snow.inject("hibernate")
    answer = password_grant(snow)
    assert answer.status_code == 200
    assert answer.headers["Content-Type"].startswith("text/html")
    assert '<div class="instance-hibernating-page"><h1>Your instance is hibernating</h1>' in answer.text
    assert password_grant(snow).json()["token_type"] == "Bearer"  # count=1: next one is normal


def test_fault_rate_limit(snow: ServiceNowEmulator) -> None:
    snow.inject("rate_limit", count=2, retry_after=7)
    for _ in range(2):
        answer = password_grant(snow)
        assert answer.status_code == 429
        assert answer.headers["Retry-After"] == "7"
        assert int(answer.headers["X-RateLimit-Limit"]) > 0
        body = answer.json()
        assert body["status"] == "failure"
        assert body["error"]["message"] == "Rate limit exceeded" and body["error"]["detail"]
    assert password_grant(snow).status_code == 200


def test_fault_server_error(snow: ServiceNowEmulator) -> None:
    snow.inject("server_error")
    answer = password_grant(snow)
    assert answer.status_code == 500 and answer.text
    assert password_grant(snow).status_code == 200


def test_fault_slow(snow: ServiceNowEmulator) -> None:
    snow.inject("slow", delay=0.3)
    started = time.monotonic()
    answer = password_grant(snow)
    assert time.monotonic() - started >= 0.3
    assert answer.status_code == 200
    snow.inject("slow", delay=2.0)
    with pytest.raises(requests.Timeout):
        requests.post(
            f"{snow.url}/oauth_token.do",
            data={
                "grant_type": "password",
                "username": USER,
                "password": PASSWORD,
                "client_id": CID,
                "client_secret": CSECRET,
            },
            timeout=0.3,
        )


def test_fault_drop(snow: ServiceNowEmulator) -> None:
    snow.inject("drop")
    with pytest.raises(requests.ConnectionError):
        password_grant(snow)
    assert password_grant(snow).status_code == 200
    assert snow.requests_log[0]["status"] is None


def assert_lost(excinfo: pytest.ExceptionInfo[requests.ConnectionError]) -> None:
    """The request was sent and the server hung up before answering: a read error, not a connect error."""
    cause = excinfo.value.args[0]
    assert isinstance(cause, urllib3.exceptions.ProtocolError), type(cause)
    assert not isinstance(excinfo.value, requests.ConnectTimeout)


def test_fault_lost_rotated_refresh_is_applied_but_unanswered(fake_clock: Clock) -> None:
    with make_emulator(fake_clock, rotate_refresh_tokens=True) as emu:
        old = password_grant(emu).json()["refresh_token"]
        emu.inject("lost")
        with pytest.raises(requests.ConnectionError) as excinfo:
            refresh(emu, old)
        assert_lost(excinfo)
        assert_denied(refresh(emu, old))  # rotated even though the client never saw the new token
        live = emu.live_refresh_tokens(CID)
        assert len(live) == 1 and old not in live
        (new,) = live
        assert refresh(emu, new).status_code == 200
        assert emu.token_requests("refresh_token") == 3  # the lost one is counted
        assert emu.requests_log[1]["status"] is None


def test_fault_lost_without_rotation_keeps_refresh_token(snow: ServiceNowEmulator) -> None:
    body = password_grant(snow).json()
    snow.inject("lost")
    with pytest.raises(requests.ConnectionError) as excinfo:
        refresh(snow, body["refresh_token"])
    assert_lost(excinfo)
    again = refresh(snow, body["refresh_token"])
    assert again.status_code == 200
    assert again.json()["refresh_token"] == body["refresh_token"]
    assert snow.live_refresh_tokens() == {body["refresh_token"]}


def test_fault_lost_burns_code_and_applies_revoke(snow: ServiceNowEmulator) -> None:
    code = get_code(snow)
    snow.inject("lost")
    with pytest.raises(requests.ConnectionError):
        exchange(snow, code)
    assert len(snow.live_refresh_tokens()) == 1  # the grant was issued
    assert_denied(exchange(snow, code))  # and the code is spent
    (rt,) = snow.live_refresh_tokens()
    snow.inject("lost", path="/oauth_revoke_token.do")
    with pytest.raises(requests.ConnectionError):
        requests.post(f"{snow.url}/oauth_revoke_token.do", data={"token": rt}, timeout=TIMEOUT)
    assert_denied(refresh(snow, rt))
    assert snow.live_refresh_tokens() == set()


def test_fault_path_scoping_and_wildcard(snow: ServiceNowEmulator) -> None:
    snow.inject("server_error", path="/api/now/table/sys_user")
    assert password_grant(snow).status_code == 200  # token endpoint untouched
    access = password_grant(snow).json()["access_token"]
    failing = whoami(snow, access)
    assert failing.status_code == 500 and failing.json()["status"] == "failure"
    assert whoami(snow, access).status_code == 200
    snow.inject("hibernate", path="*", count=2)
    assert "hibernating" in requests.get(f"{snow.url}/oauth_auth.do", params=auth_params(), timeout=TIMEOUT).text
    assert "hibernating" in whoami(snow, access).text
    assert whoami(snow, access).status_code == 200


def test_clear_faults_and_unknown_fault(snow: ServiceNowEmulator) -> None:
    snow.inject("rate_limit", count=5)
    snow.clear_faults()
    assert password_grant(snow).status_code == 200
    with pytest.raises(ValueError):
        snow.inject("explode")


def test_latency_applies_to_token_endpoint_only(snow: ServiceNowEmulator) -> None:
    access = password_grant(snow).json()["access_token"]
    snow.latency = 0.5
    started = time.monotonic()
    assert password_grant(snow).status_code == 200
    assert time.monotonic() - started >= 0.5
    started = time.monotonic()
    assert whoami(snow, access).status_code == 200
    assert time.monotonic() - started < 0.45


# ----------------------------------------------------------------------------- logging and introspection
def test_requests_log_and_counters_hold_no_secrets(snow: ServiceNowEmulator) -> None:
    snow.register_client("machine", "machine-secret-xyz", client_credentials_user="app.user")
    verifier = secrets.token_urlsafe(48)
    code = get_code(snow, code_challenge=s256(verifier), code_challenge_method="S256")
    tokens = exchange(snow, code, code_verifier=verifier).json()
    refreshed = refresh(snow, tokens["refresh_token"]).json()
    pw = password_grant(snow).json()
    cc = token(snow, grant_type="client_credentials", client_id="machine", client_secret="machine-secret-xyz").json()
    whoami(snow, pw["access_token"])
    requests.post(f"{snow.url}/oauth_revoke_token.do", data={"token": pw["refresh_token"]}, timeout=TIMEOUT)
    snow.inject("drop")
    with pytest.raises(requests.ConnectionError):
        refresh(snow, tokens["refresh_token"])

    assert snow.token_requests() == 5
    assert snow.token_requests("refresh_token") == 2
    assert snow.token_requests("authorization_code") == 1
    assert snow.token_requests("client_credentials") == 1
    for entry in snow.requests_log:
        assert set(entry) == {"method", "path", "grant_type", "status"}
        assert "?" not in entry["path"]
    assert {"method": "GET", "path": "/oauth_auth.do", "grant_type": None, "status": 200} in snow.requests_log
    assert {"method": "POST", "path": "/oauth_auth.do", "grant_type": None, "status": 302} in snow.requests_log

    stats = requests.get(f"{snow.url}/_emulator/stats", timeout=TIMEOUT).text
    haystack = json.dumps(snow.requests_log) + stats
    values = {
        code,
        verifier,
        CSECRET,
        PASSWORD,
        "machine-secret-xyz",
        cc["access_token"],
        pw["refresh_token"],
        tokens["access_token"],
        tokens["refresh_token"],
        refreshed["access_token"],
        pw["access_token"],
    }
    assert values <= snow.secret_values()
    assert not [value for value in values if value in haystack]


def test_active_token_counts(snow: ServiceNowEmulator, fake_clock: Clock) -> None:
    assert snow.active_access_token_count() == 0
    body = password_grant(snow).json()
    refresh(snow, body["refresh_token"])  # same access token → still one
    assert snow.active_access_token_count() == 1
    assert snow.active_refresh_token_count() == 1
    fake_clock.advance(1800)
    assert snow.active_access_token_count() == 0
    assert snow.active_refresh_token_count() == 1


def test_live_tokens(snow: ServiceNowEmulator, fake_clock: Clock) -> None:
    snow.register_client("other-client", "other-secret", [REDIRECT])
    mine = password_grant(snow).json()
    kept = password_grant(snow).json()
    theirs = token(
        snow,
        grant_type="password",
        username=USER,
        password=PASSWORD,
        client_id="other-client",
        client_secret="other-secret",
    ).json()
    assert snow.live_refresh_tokens() == {mine["refresh_token"], kept["refresh_token"], theirs["refresh_token"]}
    assert snow.live_refresh_tokens(CID) == {mine["refresh_token"], kept["refresh_token"]}
    assert snow.live_access_tokens("other-client") == {theirs["access_token"]}
    revoked = requests.post(f"{snow.url}/oauth_revoke_token.do", data={"token": mine["refresh_token"]}, timeout=10)
    assert revoked.status_code == 200
    assert snow.live_refresh_tokens(CID) == {kept["refresh_token"]}
    assert snow.live_access_tokens(CID) == {kept["access_token"]}  # revoke took its access token along
    fake_clock.advance(1800)
    assert snow.live_access_tokens() == set()
    assert snow.live_refresh_tokens(CID) == {kept["refresh_token"]}


# ----------------------------------------------------------------------------- admin endpoints
def test_admin_endpoints(snow: ServiceNowEmulator) -> None:
    admin = f"{snow.url}/_emulator"
    created = requests.post(
        f"{admin}/clients",
        json={
            "client_id": "remote",
            "client_secret": "remote-secret",
            "redirect_uris": [REDIRECT],
            "client_credentials_user": "remote.app",
            "access_lifespan": 600,
        },
        timeout=TIMEOUT,
    )
    assert created.status_code == 200
    assert "remote-secret" not in created.text
    assert requests.post(f"{admin}/users", json={"username": "bob", "password": "bob-pass-1"}, timeout=TIMEOUT).ok
    bob = token(
        snow,
        grant_type="password",
        username="bob",
        password="bob-pass-1",
        client_id="remote",
        client_secret="remote-secret",
    )
    assert bob.status_code == 200 and bob.json()["expires_in"] == 599
    cc = token(snow, grant_type="client_credentials", client_id="remote", client_secret="remote-secret")
    assert whoami(snow, cc.json()["access_token"]).json()["result"][0]["user_name"] == "remote.app"

    fault = requests.post(f"{admin}/faults", json={"fault": "rate_limit", "count": 3, "retry_after": 4}, timeout=10)
    assert fault.status_code == 200
    assert password_grant(snow).headers["Retry-After"] == "4"
    assert requests.get(f"{admin}/stats", timeout=TIMEOUT).json()["pending_faults"] == 2
    assert requests.delete(f"{admin}/faults", timeout=TIMEOUT).status_code == 200
    assert password_grant(snow).status_code == 200

    assert requests.post(f"{admin}/faults", json={"fault": "explode"}, timeout=TIMEOUT).status_code == 400
    assert requests.post(f"{admin}/clients", json={"client_id": "x"}, timeout=TIMEOUT).status_code == 400
    assert requests.post(f"{admin}/nothing", json={}, timeout=TIMEOUT).status_code == 404

    stats = requests.get(f"{admin}/stats", timeout=TIMEOUT).json()
    assert stats["token_requests"] == 4 == snow.token_requests()
    assert stats["token_requests_by_grant"] == {"password": 3, "client_credentials": 1}
    assert stats["by_status"]["429"] == 1
    assert all(not entry["path"].startswith("/_emulator") for entry in stats["requests_log"])


def test_admin_secret_rotation_revoke_and_settings(snow: ServiceNowEmulator) -> None:
    admin = f"{snow.url}/_emulator"
    body = password_grant(snow).json()
    assert requests.post(f"{admin}/revoke_user", json={"username": USER}, timeout=TIMEOUT).ok
    assert_denied(refresh(snow, body["refresh_token"]))
    rotated = requests.post(f"{admin}/client_secret", json={"client_id": CID, "client_secret": "new-one-1"}, timeout=10)
    assert rotated.ok
    assert_denied(password_grant(snow))
    assert password_grant(snow, client_secret="new-one-1").status_code == 200
    assert requests.post(f"{admin}/settings", json={"latency": 0.25, "consent_user": "carol"}, timeout=TIMEOUT).ok
    assert snow.latency == 0.25 and snow.consent_user == "carol"


def test_admin_injects_lost_fault(snow: ServiceNowEmulator) -> None:
    answer = requests.post(f"{snow.url}/_emulator/faults", json={"fault": "lost"}, timeout=TIMEOUT)
    assert answer.status_code == 200
    assert requests.get(f"{snow.url}/_emulator/stats", timeout=TIMEOUT).json()["pending_faults"] == 1
    with pytest.raises(requests.ConnectionError) as excinfo:
        password_grant(snow)
    assert_lost(excinfo)
    assert len(snow.live_refresh_tokens(CID)) == 1  # issued, but its answer was lost
    stats = requests.get(f"{snow.url}/_emulator/stats", timeout=TIMEOUT).json()
    assert stats["pending_faults"] == 0 and stats["token_requests"] == 1
    assert password_grant(snow).status_code == 200


def test_admin_endpoints_are_not_faulted(snow: ServiceNowEmulator) -> None:
    snow.inject("drop", path="*", count=5)
    assert requests.delete(f"{snow.url}/_emulator/faults", timeout=TIMEOUT).status_code == 200
    assert password_grant(snow).status_code == 200


# ----------------------------------------------------------------------------- command line
def test_command_line_runs_in_foreground(tmp_path: Path) -> None:
    env = dict(os.environ, EMU_TEST_SECRET="cli-secret-value-1")
    root = Path(__file__).resolve().parent.parent
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "local.servicenow_emulator",
            "--port",
            "0",
            "--client-id",
            "cli-client",
            "--client-secret-env",
            "EMU_TEST_SECRET",
            "--redirect-uri",
            REDIRECT,
        ],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        url = process.stdout.readline().strip()
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", url)
        requests.post(f"{url}/_emulator/users", json={"username": "u1", "password": "p1-secret"}, timeout=TIMEOUT)
        answer = requests.post(
            f"{url}/oauth_token.do",
            data={
                "grant_type": "password",
                "username": "u1",
                "password": "p1-secret",
                "client_id": "cli-client",
                "client_secret": "cli-secret-value-1",
            },
            timeout=TIMEOUT,
        )
        assert answer.status_code == 200
        access = answer.json()["access_token"]
    finally:
        process.terminate()
        out, err = process.communicate(timeout=10)
    assert process.returncode == 0
    assert out == "" and err == ""  # nothing after the URL, and never a token or the secret
    assert access not in out + err


def test_command_line_requires_secret_env() -> None:
    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "EMU_TEST_UNSET"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "local.servicenow_emulator",
            "--port",
            "0",
            "--client-id",
            "c",
            "--client-secret-env",
            "EMU_TEST_UNSET",
        ],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert result.stdout == ""
