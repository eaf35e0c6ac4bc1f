"""One hostile or broken instance cannot hurt the others (issue #29): a gzip bomb, a drip-fed answer and answers
that cannot be right are each a transient failure of that connection alone, recorded and backed off, while the
sweep refreshes every other connection. The hostile instance is a second emulator, on its own port."""

from __future__ import annotations

import importlib
import json
import threading
import tracemalloc
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from core.bounded import MAX_ANSWER_BYTES
from core.errors import TransientProviderError
from core.health import Health
from core.servicenow import MAX_TOKEN_CHARS, OAuthApp, ServiceNowClient, build_session
from local.servicenow_emulator import ServiceNowEmulator
from tests.conftest import CLIENT_ID, CLIENT_SECRET, FakeClock
from tests.test_callback import FakeContext
from tests.test_refresh_handlers import PREFIX, add_due_connection, env  # noqa: F401 (fixture)

ORDINARY = [f"ok{i}" for i in range(5)]


@pytest.fixture
def hostile(clock: FakeClock) -> Iterator[ServiceNowEmulator]:
    with ServiceNowEmulator(clock=clock.time) as server:
        server.register_client(CLIENT_ID, CLIENT_SECRET, ["http://127.0.0.1:9/callback"])
        server.add_user("svc.integration", "Pa55w0rd-emulator")
        yield server


def stored(secretsmanager: Any, name: str) -> dict[str, Any]:
    value = secretsmanager.get_secret_value(SecretId=f"{PREFIX}{name}", VersionStage="AWSCURRENT")
    return dict(json.loads(value["SecretString"]))


def health(secretsmanager: Any, name: str) -> Health:
    return Health.from_tags(secretsmanager.describe_secret(SecretId=f"{PREFIX}{name}").get("Tags", []))


def populate(secretsmanager: Any, emulator: ServiceNowEmulator, hostile: ServiceNowEmulator) -> None:
    for name in ORDINARY:
        add_due_connection(secretsmanager, emulator, name)
    add_due_connection(secretsmanager, hostile, "hostile")


def sweep_beside(*, request_seconds: float = 30.0) -> tuple[dict[str, int], Any]:
    import handlers.refresh

    handler = importlib.reload(handlers.refresh)
    handler.refresher.client.request_seconds = request_seconds  # the deployed 30 s, shortened for the test's sake
    return handler.lambda_handler({}, FakeContext()), handler


def test_a_gzip_bomb_is_refused_within_the_size_bound_and_the_sweep_refreshes_the_others(
    env: None,  # noqa: F811
    secretsmanager: Any,
    emulator: ServiceNowEmulator,
    hostile: ServiceNowEmulator,
    leak_check: list,
) -> None:
    """On main before #29 the whole 64 MB answer was decoded (and, being valid JSON, its 64 MB access token
    stored); now the read stops at 64 KiB of decoded bytes, whatever the compressed size."""
    populate(secretsmanager, emulator, hostile)
    hostile.inject("bomb", size=64 << 20, count=10)
    tracemalloc.start()
    try:
        counts, _ = sweep_beside()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert counts == {"refreshed": 5, "failed": 1}
    assert peak < 32 << 20, f"peak Python allocation {peak / 2**20:.0f} MiB while refusing a 64 MiB answer"
    kept = stored(secretsmanager, "hostile")
    assert len(kept["accessToken"]) < 1000  # the old token stays, nothing of the bomb
    state = health(secretsmanager, "hostile")
    assert state.failure_class == "transient" and state.consecutive_failures == 1
    assert state.next_attempt is not None and state.next_attempt > datetime.now(UTC)


def test_a_drip_fed_answer_ends_at_the_request_deadline_and_backs_off(
    env: None,  # noqa: F811
    secretsmanager: Any,
    emulator: ServiceNowEmulator,
    hostile: ServiceNowEmulator,
    leak_check: list,
) -> None:
    """The instance processes the refresh, then sends its answer one byte every 0.2 s (each read well inside the
    10 s read timeout): on main the sweep waited the whole minute for it. Now the request ends at its deadline,
    the connection is recorded as failing, and the next sweep leaves it to its back-off (no request)."""
    populate(secretsmanager, emulator, hostile)
    hostile.inject("drip", delay=0.2, count=10)
    before = hostile.token_requests()
    outcome: dict[str, Any] = {}
    # A thread only so that a regression hangs this test for a bounded time, not the suite.
    runner = threading.Thread(target=lambda: outcome.update(run=sweep_beside(request_seconds=2.0)))
    runner.start()
    runner.join(timeout=300)
    assert not runner.is_alive(), "the sweep is still waiting on the drip-fed answer"
    counts, handler = outcome["run"]
    assert counts == {"refreshed": 5, "failed": 1}
    state = health(secretsmanager, "hostile")
    assert state.failure_class == "transient" and state.next_attempt is not None
    assert hostile.token_requests() == before + 1  # the deadline covers the retries: none went out after it
    again = handler.lambda_handler({}, FakeContext())
    assert again.get("backing_off") == 1 and hostile.token_requests() == before + 1


def test_token_requests_of_one_attempt_share_its_budget(emulator: ServiceNowEmulator, clock: FakeClock) -> None:
    """Each request ends at its deadline; within a budget, the next starts with what is left, and none is sent
    once it is spent (one refresh attempt makes up to five: a retry, a new assertion, staged credentials)."""
    emulator.inject("drip", delay=0.2, count=10)
    client = ServiceNowClient(build_session(), clock=clock.now, request_seconds=2.0)
    app = OAuthApp(emulator.url, CLIENT_ID, CLIENT_SECRET)
    failures: list[TransientProviderError] = []
    with client.budget(3.0):  # the second request starts with about 1 s left: a loaded machine keeps it positive
        for _ in range(3):
            with pytest.raises(TransientProviderError) as failed:
                client.client_credentials(app)
            failures.append(failed.value)
    assert [f.maybe_processed for f in failures] == [True, True, False]
    assert "deadline" in str(failures[0]) and "not sent" in str(failures[2])
    assert emulator.token_requests() == 2


UNUSABLE = {
    "negative expiry": {"access_token": "a" * 40, "expires_in": -5},
    "zero expiry": {"access_token": "a" * 40, "expires_in": 0},
    "absurd expiry": {"access_token": "a" * 40, "expires_in": 10**9},
    "expiry as text": {"access_token": "a" * 40, "expires_in": "soon"},
    "expiry as bool": {"access_token": "a" * 40, "expires_in": True},
    "access token not a string": {"access_token": 12345, "expires_in": 1799},
    "access token with a newline": {"access_token": "abc\ndef-ghi", "expires_in": 1799},
    "access token with non-ASCII": {"access_token": "abc\u00e9def", "expires_in": 1799},
    "access token too long to store": {"access_token": "a" * (MAX_TOKEN_CHARS + 1), "expires_in": 1799},
    "refresh token not a string": {"access_token": "a" * 40, "refresh_token": ["x"], "expires_in": 1799},
    "refresh token with a control character": {"access_token": "a" * 40, "refresh_token": "r\x00r", "expires_in": 1},
    "token type not a word": {"access_token": "a" * 40, "token_type": "Bearer\r\nX: y", "expires_in": 1799},
    "no access token": {"token_type": "Bearer", "expires_in": 1799},
}


@pytest.mark.parametrize("payload", UNUSABLE.values(), ids=UNUSABLE.keys())
def test_an_answer_that_cannot_be_right_is_refused_and_nothing_is_stored(
    env: None,  # noqa: F811
    secretsmanager: Any,
    emulator: ServiceNowEmulator,
    payload: dict[str, Any],
    capsys: pytest.CaptureFixture[str],
) -> None:
    add_due_connection(secretsmanager, emulator, "prod")
    before = stored(secretsmanager, "prod")
    emulator.inject("answer", payload=payload, count=10)
    import handlers.refresh

    counts = importlib.reload(handlers.refresh).lambda_handler({}, FakeContext())
    assert counts == {"failed": 1}
    assert stored(secretsmanager, "prod") == before
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("{") and json.loads(line).get("connection") == "prod"]
    assert len(lines) == 1 and "answered 200 with" in json.loads(lines[0])["message"], lines
    for value in payload.values():
        if isinstance(value, str) and len(value) > 3:
            assert value not in out


def test_answers_larger_than_a_secret_are_refused_before_they_are_read(emulator: ServiceNowEmulator) -> None:
    emulator.inject("answer", payload={"access_token": "a" * MAX_ANSWER_BYTES, "expires_in": 1799})
    client = ServiceNowClient(build_session())
    with pytest.raises(TransientProviderError, match="larger than 64 KiB"):
        client.client_credentials(OAuthApp(emulator.url, CLIENT_ID, CLIENT_SECRET))


class SplitContext(FakeContext):
    """The sweep's threads see time to start a refresh; the sweep itself, waiting for them (it asks once a second),
    sees plenty for its first 5 s (the ordinary refreshes end, even on a loaded machine), then 9 s left: below the
    10 s it keeps to report, so a hang no deadline reaches meets the sweep's wall without minutes of waiting."""

    asked = 0

    def get_remaining_time_in_millis(self) -> int:
        if threading.current_thread() is not threading.main_thread():
            return 200_000
        SplitContext.asked += 1
        return 200_000 if SplitContext.asked <= 5 else 9_000


def test_a_refresh_no_deadline_reaches_is_reported_when_the_sweep_must_end(
    env: None,  # noqa: F811
    secretsmanager: Any,
    emulator: ServiceNowEmulator,
    hostile: ServiceNowEmulator,
) -> None:
    """The second wall, for what a request's deadline cannot cut (a TLS handshake drip-fed by the server): here a
    drip-fed answer with the deadline lifted. The sweep stops waiting before its end, reports the hostile
    connection failed and the five others refreshed; the stuck refresh is left to end on its own."""
    populate(secretsmanager, emulator, hostile)
    hostile.inject("drip", delay=0.5, count=10)
    import handlers.refresh

    handler = importlib.reload(handlers.refresh)
    handler.refresher.client.request_seconds = 3600.0
    counts = handler.lambda_handler({}, SplitContext())
    assert counts == {"refreshed": 5, "failed": 1}
    hostile.stop()  # the stuck request fails now; wait for its thread to record it before moto is reset
    for _ in range(300):
        if health(secretsmanager, "hostile").consecutive_failures:
            break
        threading.Event().wait(0.1)
    # Cut mid-answer by the stop: as a lost connection, or (cut in its headers) as a page that is not the token API.
    assert health(secretsmanager, "hostile").failure_class in ("transient", "unavailable")
