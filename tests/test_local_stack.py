"""The local stack end to end over real HTTP: signed link, emulator consent, callback, secret in moto.

Also the API Gateway adapter on its own (event shape, routing, response mapping, silence) and
`python -m local.stack` as a process (banner, SIGTERM cleanup).
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urljoin, urlsplit

import pytest
import requests

from local.api import LocalApi
from local.servicenow_emulator import ConsentForm, ServiceNowEmulator
from local.stack import LocalStack, RealInstance, free_port, instance_from_env

ROOT = Path(__file__).resolve().parent.parent
EVENTS = ROOT / "events"


@pytest.fixture(scope="module")
def stack() -> Iterator[LocalStack]:
    with LocalStack() as running:
        yield running


def snapshot(stack: LocalStack, name: str | None = None) -> tuple[str, str]:
    value = stack.read_secret(name)
    return value["VersionId"], value["SecretString"]


def consent(session: requests.Session, authorize_url: str, button: str) -> requests.Response:
    """What a browser does on the consent page: load it, submit the form, follow ServiceNow's redirect."""
    page = session.get(authorize_url, timeout=10)
    assert page.status_code == 200, page.status_code
    form = ConsentForm()
    form.feed(page.text)
    return session.post(
        urljoin(authorize_url, form.action), data={**form.fields, "action": form.buttons[button]["value"]}, timeout=10
    )


def test_signed_link_consent_and_callback_store_tokens(stack: LocalStack, capfd: pytest.CaptureFixture[str]) -> None:
    session = requests.Session()
    start = session.get(stack.authorize_link(), allow_redirects=False, timeout=10)
    assert start.status_code == 302, start.text
    location = start.headers["Location"]
    assert location.startswith(f"{stack.instance_url}/oauth_auth.do?")
    assert dict(parse_qsl(urlsplit(location).query))["redirect_uri"] == stack.callback_url

    page = consent(session, location, "allow")
    assert [r.status_code for r in page.history] == [302]
    assert page.url.startswith(f"{stack.callback_url}?")
    assert page.status_code == 200, page.text
    assert page.headers["Content-Type"].startswith("text/html")
    host = urlsplit(stack.instance_url).netloc
    assert f"Connection <code>demo</code> to <code>{host}</code> is authorized." in page.text

    document = json.loads(snapshot(stack)[1])
    assert document["status"] == "active"
    assert document["accessToken"] and document["refreshToken"]
    assert document["accessToken"] not in page.text and document["refreshToken"] not in page.text
    assert stack.emulator is not None
    assert stack.emulator.token_info(document["refreshToken"]) is not None

    # Neither the adapter nor the handler printed anything secret (the callback's code included).
    out, err = capfd.readouterr()
    leaked = [value[:4] for value in stack.emulator.secret_values() if len(value) >= 8 and value in out + err]
    assert not leaked, f"secret values printed (prefixes): {leaked}"


def test_unsigned_link_is_refused_and_changes_nothing(stack: LocalStack) -> None:
    stack.create_connection("unsigned")
    before = snapshot(stack, "unsigned")
    answer = requests.get(f"{stack.api.url}/connections/unsigned/authorize", allow_redirects=False, timeout=10)
    assert answer.status_code == 403
    assert "not signed" in answer.text
    assert snapshot(stack, "unsigned") == before


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/"),
        ("GET", "/nope"),
        ("GET", "/callback/"),
        ("POST", "/callback"),
        ("HEAD", "/callback"),
        ("GET", "/connections/demo/authorize/more"),
        ("GET", "/connections//authorize"),
        ("DELETE", "/connections/demo/authorize"),
    ],
)
def test_paths_outside_the_two_routes_are_api_gateway_404s(stack: LocalStack, method: str, path: str) -> None:
    answer = requests.request(method, f"{stack.api.url}{path}", allow_redirects=False, timeout=10)
    assert answer.status_code == 404
    if method != "HEAD":
        assert answer.content == b'{"message":"Not Found"}'
        assert answer.headers["Content-Type"] == "application/json"


# ---------------------------------------------------------------------------- the adapter alone


@pytest.fixture
def recorded() -> Iterator[tuple[LocalApi, list[dict[str, Any]]]]:
    events: list[dict[str, Any]] = []

    def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
        assert context.aws_request_id and context.get_remaining_time_in_millis() > 0
        events.append(event)
        return {"statusCode": 204, "headers": {"X-Seen": "yes"}, "body": ""}

    with LocalApi(handler) as api:
        yield api, events


def test_callback_event_has_the_shape_of_api_gateways(
    recorded: tuple[LocalApi, list[dict[str, Any]]], capfd: pytest.CaptureFixture[str]
) -> None:
    api, events = recorded
    answer = requests.get(
        f"{api.url}/callback?code=abc%2Fdef&state=s1&a=1&a=2&empty=",
        headers={"X-Mixed-Case": "v", "Cookie": "one=1; two=2"},
        timeout=10,
    )
    assert answer.status_code == 204 and answer.headers["X-Seen"] == "yes"
    (event,) = events
    template = json.loads((EVENTS / "callback.json").read_text())
    assert set(template) <= set(event)
    assert set(template["requestContext"]) <= set(event["requestContext"])
    assert set(template["requestContext"]["http"]) <= set(event["requestContext"]["http"])
    assert event["version"] == "2.0" and event["routeKey"] == "GET /callback"
    assert event["rawPath"] == "/callback"
    assert event["rawQueryString"] == "code=abc%2Fdef&state=s1&a=1&a=2&empty="
    assert event["queryStringParameters"] == {"code": "abc/def", "state": "s1", "a": "1,2", "empty": ""}
    assert "pathParameters" not in event
    assert event["headers"]["x-mixed-case"] == "v"
    assert all(name == name.lower() for name in event["headers"])
    assert "cookie" not in event["headers"] and event["cookies"] == ["one=1", "two=2"]
    context = event["requestContext"]
    assert context["domainName"] == f"127.0.0.1:{api.port}"
    assert context["stage"] == "$default" and context["routeKey"] == "GET /callback"
    assert context["http"] == {
        "method": "GET",
        "path": "/callback",
        "protocol": "HTTP/1.1",
        "sourceIp": "127.0.0.1",
        "userAgent": answer.request.headers["User-Agent"],
    }
    assert context["requestId"] and isinstance(context["timeEpoch"], int)
    assert event["isBase64Encoded"] is False
    out, err = capfd.readouterr()
    assert (out, err) == ("", ""), "the adapter printed something for a request"


def test_authorize_event_carries_the_decoded_path_parameter(recorded: tuple[LocalApi, list[dict[str, Any]]]) -> None:
    api, events = recorded
    requests.get(f"{api.url}/connections/my%20conn/authorize", timeout=10)
    (event,) = events
    assert event["routeKey"] == "GET /connections/{name}/authorize"
    assert event["rawPath"] == "/connections/my%20conn/authorize"
    assert event["pathParameters"] == {"name": "my conn"}
    assert "queryStringParameters" not in event and event["rawQueryString"] == ""


def test_results_map_to_http_like_api_gateway() -> None:
    results: list[Any] = [
        {
            "statusCode": 201,
            "headers": {"Content-Type": "application/octet-stream"},
            "cookies": ["a=1; Secure", "b=2"],
            "body": "AAEC",
            "isBase64Encoded": True,
        },
        {"ok": True},
    ]

    def handler(event: dict[str, Any], context: Any) -> Any:
        if not results:
            raise RuntimeError("https://example.invalid/?code=secret-in-a-message")
        return results.pop(0)

    with LocalApi(handler) as api:
        binary = requests.get(f"{api.url}/callback", timeout=10)
        inferred = requests.get(f"{api.url}/callback", timeout=10)
        failed = requests.get(f"{api.url}/callback", timeout=10)
    assert binary.status_code == 201 and binary.content == b"\x00\x01\x02"
    assert binary.raw.headers.getlist("Set-Cookie") == ["a=1; Secure", "b=2"]
    assert inferred.status_code == 200 and inferred.json() == {"ok": True}
    assert failed.status_code == 500 and failed.json() == {"message": "Internal Server Error"}
    assert "secret-in-a-message" not in failed.text


def test_a_stopped_api_refuses_connections() -> None:
    api = LocalApi(lambda event, context: {"statusCode": 200, "body": ""}).start()
    url = api.url
    assert requests.get(f"{url}/callback", timeout=10).status_code == 200
    api.stop()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/callback", timeout=10)


# ---------------------------------------------------------------------------- lifecycle and configuration


def test_stop_restores_the_environment_and_kills_moto() -> None:
    before = dict(os.environ)
    stack = LocalStack().start()
    try:
        assert os.environ["AWS_ENDPOINT_URL"] == stack.moto.url
        assert os.environ["CALLBACK_URL"] == stack.callback_url
        moto_url, api_url = stack.moto.url, stack.api.url
    finally:
        stack.stop()
    assert dict(os.environ) == before
    assert not stack.moto.running
    for url in (f"{moto_url}/moto-api/", f"{api_url}/callback"):
        with pytest.raises(requests.ConnectionError):
            requests.get(url, timeout=5)


def test_real_instance_settings_from_the_environment() -> None:
    assert instance_from_env({}) is None
    instance = instance_from_env(
        {"SERVICENOW_INSTANCE": "dev12345", "SERVICENOW_CLIENT_ID": "id", "SERVICENOW_CLIENT_SECRET": "s3cr3t-value"}
    )
    assert instance == RealInstance("https://dev12345.service-now.com", "id", "s3cr3t-value")
    assert "s3cr3t-value" not in repr(instance)
    with pytest.raises(ValueError, match="missing: SERVICENOW_CLIENT_SECRET"):
        instance_from_env({"SERVICENOW_INSTANCE": "https://dev1.service-now.com", "SERVICENOW_CLIENT_ID": "id"})


def test_a_separately_running_instance_is_used_instead_of_the_emulator() -> None:
    """The real-instance path, with an emulator in the role of the instance (its redirect URL pre-registered)."""
    port = free_port()
    with ServiceNowEmulator() as instance:
        instance.register_client("real-client", "real-client-secret-1", [f"http://127.0.0.1:{port}/callback"])
        settings = instance_from_env(
            {
                "SERVICENOW_INSTANCE": instance.url,
                "SERVICENOW_CLIENT_ID": "real-client",
                "SERVICENOW_CLIENT_SECRET": "real-client-secret-1",
            }
        )
        with LocalStack(instance=settings, api_port=port) as stack:
            assert stack.emulator is None and stack.instance_url == instance.url
            assert "127.0.0.1" in os.environ["SERVICENOW_ALLOWED_HOSTS"].split(",")
            session = requests.Session()
            location = session.get(stack.authorize_link(), allow_redirects=False, timeout=10).headers["Location"]
            assert location.startswith(f"{instance.url}/oauth_auth.do?")
            page = consent(session, location, "allow")
            assert page.status_code == 200, page.text
            assert json.loads(snapshot(stack)[1])["status"] == "active"


def test_make_local_prints_the_banner_and_cleans_up_on_sigterm() -> None:
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(["src", "."])}
    for name in ("SERVICENOW_INSTANCE", "SERVICENOW_CLIENT_ID", "SERVICENOW_CLIENT_SECRET"):
        environment.pop(name, None)
    process = subprocess.Popen(
        [sys.executable, "-m", "local.stack"],
        cwd=ROOT,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:  # a reader thread, so a hung process fails the test at a timeout instead of hanging it
        for line in process.stdout or ():
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    try:
        banner: list[str] = []
        while not banner or "Ctrl-C stops everything." not in banner[-1]:
            banner.append(lines.get(timeout=60))
        api = next(line.split()[-1] for line in banner if line.startswith("  API "))
        moto = next(line.split()[-1] for line in banner if line.startswith("  Secrets Manager (moto) "))
        link = next(line.strip() for line in banner if "/authorize?" in line)
        assert link.startswith(f"{api}/connections/demo/authorize?expires=")
        assert requests.get(link, allow_redirects=False, timeout=10).status_code == 302
        assert requests.get(f"{moto}/moto-api/", timeout=10).status_code == 200
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{moto}/moto-api/", timeout=5)
