"""The grant client against the emulator over real HTTP: every grant and every error class."""

from __future__ import annotations

from datetime import timedelta
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from core.errors import CredentialRejected, InstanceUnavailable, RateLimited, TransientProviderError
from core.servicenow import (
    OAuthApp,
    ServiceNowClient,
    authorization_url,
    build_session,
    code_challenge,
    new_code_verifier,
)
from local.servicenow_emulator import ServiceNowEmulator
from tests.conftest import CLIENT_ID, CLIENT_SECRET, REDIRECT_URI, FakeClock, press_consent


@pytest.fixture
def app(emulator: ServiceNowEmulator) -> OAuthApp:
    return OAuthApp(emulator.url, CLIENT_ID, CLIENT_SECRET)


@pytest.fixture
def client(clock: FakeClock) -> ServiceNowClient:
    # Fast backoff keeps retry tests quick; the retry *count* is what they check.
    return ServiceNowClient(build_session(backoff_factor=0.01, backoff_max=0.05), clock=clock.now, timeout=(1, 1))


def consent(app: OAuthApp, *, scope: str | None = None) -> tuple[str, str]:
    verifier = new_code_verifier()
    url = authorization_url(
        app, redirect_uri=REDIRECT_URI, state="st4te", challenge=code_challenge(verifier), scope=scope
    )
    redirect = press_consent(url)
    assert redirect["state"] == "st4te"
    return redirect["code"], verifier


def test_authorization_url_has_every_parameter(app: OAuthApp) -> None:
    url = authorization_url(app, redirect_uri=REDIRECT_URI, state="abc", challenge="ch", scope="useraccount")
    parts = urlsplit(url)
    assert parts.path == "/oauth_auth.do"
    assert parse_qs(parts.query) == {
        "response_type": ["code"],
        "client_id": [CLIENT_ID],
        "redirect_uri": [REDIRECT_URI],
        "state": ["abc"],
        "code_challenge": ["ch"],
        "code_challenge_method": ["S256"],
        "scope": ["useraccount"],
    }
    assert CLIENT_SECRET not in url


def test_pkce_challenge_is_rfc7636_s256() -> None:
    # RFC 7636 appendix B test vector.
    assert (
        code_challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk") == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
    )
    assert 43 <= len(new_code_verifier()) <= 128


def test_code_exchange_with_pkce(app: OAuthApp, client: ServiceNowClient, clock: FakeClock, leak_check) -> None:
    code, verifier = consent(app)
    token = client.exchange_code(app, code=code, redirect_uri=REDIRECT_URI, code_verifier=verifier)
    assert token.token_type == "Bearer"
    assert token.refresh_token
    assert token.access_token_expires_at == clock.now() + timedelta(seconds=1799)
    assert client.current_user(app.instance_url, token.access_token) == "admin"


def test_code_is_single_use_and_never_retried(
    app: OAuthApp, client: ServiceNowClient, emulator: ServiceNowEmulator, leak_check
) -> None:
    code, verifier = consent(app)
    client.exchange_code(app, code=code, redirect_uri=REDIRECT_URI, code_verifier=verifier)
    with pytest.raises(CredentialRejected) as raised:
        client.exchange_code(app, code=code, redirect_uri=REDIRECT_URI, code_verifier=verifier)
    leak_check.append(raised.value)
    assert "authorization_code" in str(raised.value) and emulator.url.split("//")[1] in str(raised.value)

    code, verifier = consent(app)
    emulator.inject("server_error")
    before = emulator.token_requests("authorization_code")
    with pytest.raises(TransientProviderError):
        client.exchange_code(app, code=code, redirect_uri=REDIRECT_URI, code_verifier=verifier)
    assert emulator.token_requests("authorization_code") == before + 1  # exactly one attempt


def test_wrong_verifier_is_rejected(app: OAuthApp, client: ServiceNowClient, leak_check) -> None:
    code, _ = consent(app)
    with pytest.raises(CredentialRejected):
        client.exchange_code(app, code=code, redirect_uri=REDIRECT_URI, code_verifier=new_code_verifier())


def test_refresh_returns_same_refresh_token_and_current_access_token(
    app: OAuthApp, client: ServiceNowClient, clock: FakeClock, leak_check
) -> None:
    code, verifier = consent(app)
    first = client.exchange_code(app, code=code, redirect_uri=REDIRECT_URI, code_verifier=verifier)
    assert first.refresh_token
    clock.advance(600)
    again = client.refresh(app, first.refresh_token)
    assert again.refresh_token == first.refresh_token
    assert again.access_token == first.access_token  # still valid, so ServiceNow hands it back...
    assert again.access_token_expires_at == clock.now() + timedelta(seconds=1799)  # ...with the expiry moved out
    clock.advance(1800)
    later = client.refresh(app, first.refresh_token)
    assert later.access_token != first.access_token


def test_expired_refresh_token_is_rejected(
    app: OAuthApp, client: ServiceNowClient, clock: FakeClock, leak_check
) -> None:
    code, verifier = consent(app)
    token = client.exchange_code(app, code=code, redirect_uri=REDIRECT_URI, code_verifier=verifier)
    assert token.refresh_token
    clock.advance(8_640_000 + 1)
    with pytest.raises(CredentialRejected) as raised:
        client.refresh(app, token.refresh_token)
    leak_check.append(raised.value)
    assert not raised.value.retryable


def test_password_and_client_credentials_grants(
    app: OAuthApp, client: ServiceNowClient, emulator: ServiceNowEmulator, leak_check
) -> None:
    token = client.password_grant(app, username="svc.integration", password="Pa55w0rd-emulator")
    assert token.refresh_token
    assert client.current_user(app.instance_url, token.access_token) == "svc.integration"
    with pytest.raises(CredentialRejected):
        client.password_grant(app, username="svc.integration", password="wrong-password")
    with pytest.raises(CredentialRejected):  # no OAuth Application User: ServiceNow says 401
        client.client_credentials(app)
    emulator.register_client("cc-client", "cc-secret-value", client_credentials_user="svc.integration")
    cc = client.client_credentials(OAuthApp(emulator.url, "cc-client", "cc-secret-value"), scope="useraccount")
    assert cc.refresh_token is None
    assert cc.scope == "useraccount"


def test_wrong_client_secret_is_rejected(emulator: ServiceNowEmulator, client: ServiceNowClient, leak_check) -> None:
    bad = OAuthApp(emulator.url, CLIENT_ID, "not-the-secret-123")
    with pytest.raises(CredentialRejected) as raised:
        client.password_grant(bad, username="svc.integration", password="Pa55w0rd-emulator")
    leak_check.append(raised.value)
    assert "server_error/access_denied" in str(raised.value)
    assert "not-the-secret-123" not in str(raised.value)


def test_hibernating_instance_is_unavailable_not_rejected(
    app: OAuthApp, client: ServiceNowClient, emulator: ServiceNowEmulator, leak_check
) -> None:
    emulator.inject("hibernate", count=5)
    with pytest.raises(InstanceUnavailable) as raised:
        client.password_grant(app, username="svc.integration", password="Pa55w0rd-emulator")
    leak_check.append(raised.value)
    assert raised.value.retryable and raised.value.kind == "unavailable"
    assert "hibernating" in str(raised.value)


def test_transient_failures_are_retried_then_succeed(
    app: OAuthApp, client: ServiceNowClient, emulator: ServiceNowEmulator, leak_check
) -> None:
    for fault in ("server_error", "rate_limit", "drop"):
        emulator.inject(fault, count=2, retry_after=0)
        before = emulator.token_requests("password")
        token = client.password_grant(app, username="svc.integration", password="Pa55w0rd-emulator")
        assert token.access_token
        assert emulator.token_requests("password") == before + 3, fault


@pytest.mark.parametrize(
    ("fault", "error", "kind"),
    [
        ("server_error", TransientProviderError, "transient"),
        ("rate_limit", RateLimited, "rate_limited"),
        ("drop", TransientProviderError, "transient"),
    ],
)
def test_persistent_failures_end_after_the_retry_budget(
    app: OAuthApp,
    client: ServiceNowClient,
    emulator: ServiceNowEmulator,
    fault: str,
    error: type,
    kind: str,
    leak_check,
) -> None:
    emulator.inject(fault, count=10, retry_after=0)
    before = emulator.token_requests("password")
    with pytest.raises(error) as raised:
        client.password_grant(app, username="svc.integration", password="Pa55w0rd-emulator")
    leak_check.append(raised.value)
    assert raised.value.kind == kind
    assert emulator.token_requests("password") == before + 3  # one try plus two retries, no more


def test_long_retry_after_ends_the_attempt_instead_of_sleeping(
    app: OAuthApp, client: ServiceNowClient, emulator: ServiceNowEmulator
) -> None:
    emulator.inject("rate_limit", count=5, retry_after=3600)
    before = emulator.token_requests("password")
    with pytest.raises(RateLimited):
        client.password_grant(app, username="svc.integration", password="Pa55w0rd-emulator")
    assert emulator.token_requests("password") == before + 1


def test_timeout_is_transient(app: OAuthApp, client: ServiceNowClient, emulator: ServiceNowEmulator) -> None:
    emulator.inject("slow", count=3, delay=1.5)
    with pytest.raises(TransientProviderError, match=r"timed out|connection failed"):
        client.password_grant(app, username="svc.integration", password="Pa55w0rd-emulator")


def test_revoke_kills_the_tokens(app: OAuthApp, client: ServiceNowClient, leak_check) -> None:
    token = client.password_grant(app, username="svc.integration", password="Pa55w0rd-emulator")
    assert token.refresh_token
    client.revoke(app, token.refresh_token)
    with pytest.raises(CredentialRejected):
        client.refresh(app, token.refresh_token)
    with pytest.raises(CredentialRejected):
        client.current_user(app.instance_url, token.access_token)


def test_connection_is_reused_across_grants(app: OAuthApp, emulator: ServiceNowEmulator, clock: FakeClock) -> None:
    session = build_session()
    client = ServiceNowClient(session, clock=clock.now)
    for _ in range(3):
        client.password_grant(app, username="svc.integration", password="Pa55w0rd-emulator")
    pools = list(session.pools._container.values())
    assert [(pool.num_connections, pool.num_requests) for pool in pools] == [(1, 3)]


def test_unreachable_instance_is_transient(client: ServiceNowClient) -> None:
    from tests.conftest import free_port

    app = OAuthApp(f"http://127.0.0.1:{free_port()}", CLIENT_ID, CLIENT_SECRET)
    with pytest.raises(TransientProviderError) as raised:
        client.refresh(app, "whatever-token")
    assert isinstance(raised.value.__cause__, type(None))
    assert not isinstance(raised.value, requests.RequestException)


def test_a_value_http_client_refuses_to_send_is_transient_and_never_in_the_message(
    app: OAuthApp, client: ServiceNowClient, emulator: ServiceNowEmulator
) -> None:
    """Found by review: http.client raises a plain ValueError naming the header value (a token with CR/LF) before
    anything is sent; it escaped the client with the token in its message."""
    before = emulator.token_requests()
    with pytest.raises(TransientProviderError) as raised:
        client.current_user(app.instance_url, "AT-SECRET-VALUE\r\nX-Evil: 1")
    assert "AT-SECRET-VALUE" not in str(raised.value) and "could not send the request" in str(raised.value)
    assert not raised.value.maybe_processed and emulator.token_requests() == before
