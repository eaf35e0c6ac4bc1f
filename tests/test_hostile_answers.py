"""Found by an adversarial review of d2b2cdd (#29): an answer is read only up to 64 KiB, headers included, and a
200 token answer whose tokens cannot be right is refused as a TransientProviderError, nothing stored. Every test
here failed on d2b2cdd (a final newline passed `$`, huge numbers and deep nesting escaped as other exceptions,
6 MB of headers were read)."""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from core.errors import TransientProviderError
from core.servicenow import OAuthApp, ServiceNowClient, build_session
from local.servicenow_emulator import ServiceNowEmulator
from tests.conftest import CLIENT_ID, CLIENT_SECRET
from tests.test_callback import FakeContext
from tests.test_hostile_deadlines import Server
from tests.test_refresh_handlers import PREFIX, add_due_connection, env  # noqa: F401 (fixture)

TOKEN = "Ab3dEf6hIj9kLm2nOp5qRs8tUv1wXy4z-review-token"
MIB = 1024 * 1024


@pytest.fixture
def serve() -> Iterator[Callable[[bytes], Server]]:
    """Servers that answer every request with the same raw bytes (status line, headers, body), then hang up."""
    servers: list[Server] = []

    def start(wire: bytes) -> Server:
        servers.append(Server(lambda body: (0.0, wire), close_after=True))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def _json_wire(status: int, body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\n%sContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (
        status,
        extra,
        len(body),
        body,
    )


def _refresh(url: str) -> Any:
    client = ServiceNowClient(build_session(retries=0))
    return client.refresh(OAuthApp(url, CLIENT_ID, CLIENT_SECRET), "any-refresh-token-value")


def _digest(document: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------- 1. a trailing newline passes every character check
@pytest.mark.parametrize(
    "field,value",
    [
        ("access_token", TOKEN + "\n"),
        ("refresh_token", TOKEN + "-r\n"),
        ("token_type", "Bearer\n"),
        ("scope", "useraccount\n"),
    ],
)
def test_a_field_ending_in_a_newline_is_refused(emulator: ServiceNowEmulator, field: str, value: str) -> None:
    """`_TOKEN_CHARS`, `_TOKEN_TYPE` and `_SCOPE_CHARS` end in `$`, which re.match lets match before a final
    newline: a control character the guarantee says is refused is accepted."""
    payload: dict[str, Any] = {"access_token": TOKEN, "expires_in": 1800, "token_type": "Bearer"}
    payload[field] = value
    emulator.inject("answer", payload=payload)
    with pytest.raises(TransientProviderError):
        _refresh(emulator.url)


def test_an_access_token_ending_in_a_newline_is_not_stored_by_the_sweep(
    env: None,  # noqa: F811
    secretsmanager: Any,
    emulator: ServiceNowEmulator,
) -> None:
    add_due_connection(secretsmanager, emulator, "prod")
    before = json.loads(
        secretsmanager.get_secret_value(SecretId=f"{PREFIX}prod", VersionStage="AWSCURRENT")["SecretString"]
    )
    emulator.inject("answer", payload={"access_token": TOKEN + "\n", "expires_in": 1800}, count=10)
    import handlers.refresh

    counts = importlib.reload(handlers.refresh).lambda_handler({}, FakeContext())
    after = json.loads(
        secretsmanager.get_secret_value(SecretId=f"{PREFIX}prod", VersionStage="AWSCURRENT")["SecretString"]
    )
    stored_newline = after.get("accessToken", "").endswith("\n")
    assert not stored_newline, f"a token ending in a newline was stored (sweep counts {counts})"
    assert counts == {"failed": 1}
    assert _digest(after) == _digest(before), "the secret was rewritten"


# ---------------------------------------------------------------- 2. expires_in too long for Python's int()
def test_a_quoted_expires_in_of_5000_digits_is_a_transient_refusal(emulator: ServiceNowEmulator) -> None:
    """`_expires_in` calls int() on a quoted number: over 4,300 digits int() raises ValueError, which escapes
    parse_token instead of a TransientProviderError."""
    emulator.inject("answer", payload={"access_token": TOKEN, "expires_in": "9" * 5000, "token_type": "Bearer"})
    with pytest.raises(TransientProviderError):
        _refresh(emulator.url)


def test_a_numeric_expires_in_of_5000_digits_is_a_transient_refusal(serve: Callable[[bytes], Server]) -> None:
    """json.loads refuses the 5,000-digit number (ValueError), `_json_body` turns that into None and the 200 is
    reported as InstanceUnavailable "non-JSON page (hibernating, maintenance or wrong URL)"."""
    body = b'{"access_token": "%s", "token_type": "Bearer", "expires_in": %s}' % (TOKEN.encode(), b"9" * 5000)
    server = serve(_json_wire(200, body))
    with pytest.raises(TransientProviderError):
        _refresh(server.url)


# ---------------------------------------------------------------- 3. deep nesting: RecursionError escapes
@pytest.mark.parametrize("status", [200, 400, 500])
def test_a_deeply_nested_answer_is_refused_as_a_provider_error(serve: Callable[[bytes], Server], status: int) -> None:
    """60 KB of brackets (inside the 64 KiB bound): json.loads raises RecursionError, not a ValueError, so
    `_json_body` (used by parse_token and classify_failure alike) lets it escape."""
    body = b'{"access_token": "%s", "expires_in": 1800, "x": %s%s}' % (TOKEN.encode(), b"[" * 30000, b"]" * 30000)
    assert len(body) < 64 * 1024
    server = serve(_json_wire(status, body))
    with pytest.raises(TransientProviderError if status != 400 else Exception) as raised:
        _refresh(server.url)
    assert not isinstance(raised.value, RecursionError), "RecursionError escaped the client"


def test_a_deeply_nested_table_api_answer_is_refused_as_a_provider_error(serve: Callable[[bytes], Server]) -> None:
    server = serve(_json_wire(200, b"[" * 30000 + b"]" * 30000))
    client = ServiceNowClient(build_session(retries=0))
    try:
        client.current_user(server.url, TOKEN)
    except RecursionError:
        pytest.fail("RecursionError escaped current_user")
    except Exception:
        pass


# ---------------------------------------------------------------- 4. a 200 JSON answer that is not an object
@pytest.mark.parametrize("body", [b"[]", b'"x"', b"null"])
def test_a_200_json_answer_that_is_not_an_object_is_a_transient_refusal(
    serve: Callable[[bytes], Server], body: bytes
) -> None:
    """It holds no access_token (refused as transient when the object lacks one), yet is raised as
    InstanceUnavailable ("unexpected HTTP 200" / "non-JSON page")."""
    server = serve(_json_wire(200, body))
    with pytest.raises(TransientProviderError):
        _refresh(server.url)


# ---------------------------------------------------------------- 5. the header section is not bounded
def test_a_huge_header_section_is_refused_before_it_fills_memory(serve: Callable[[bytes], Server]) -> None:
    """95 headers of 65,000 bytes (6 MB; http.client's own limits are 100 lines of 64 KiB): nothing bounds them,
    the answer is accepted and the client peaks near 47 MiB of Python allocations."""
    pad = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 65000) for i in range(95))
    body = b'{"access_token": "%s", "expires_in": 1800}' % TOKEN.encode()
    server = serve(_json_wire(200, body, pad))
    tracemalloc.start()
    try:
        with contextlib.suppress(Exception):
            _refresh(server.url)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * MIB, f"peak Python allocation {peak / MIB:.1f} MiB for a 6 MB header section"


@pytest.mark.parametrize(
    "wire",
    [b"HTTP/1.1 200 OK\r\nContent-Type: applica", b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"],
    ids=["inside a header", "before the blank line"],
)
def test_an_answer_cut_inside_its_header_section_may_have_been_processed(
    serve: Callable[[bytes], Server], wire: bytes
) -> None:
    """Found while closing #29: http.client ends a header section at end of file, so an answer cut there read as a
    whole 200 with no body, "a non-JSON page" (hibernating), which says nothing was processed. ServiceNow answered
    200: it processed the grant, and a rotated refresh token in the lost answer must be marked unseen."""
    server = serve(wire)
    with pytest.raises(TransientProviderError) as failed:
        _refresh(server.url)
    assert failed.value.maybe_processed, str(failed.value)
