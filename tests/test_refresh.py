"""The refresher on a real moto server and the emulator, with one injected clock for both."""

from __future__ import annotations

import json
import threading
from collections import Counter
from datetime import timedelta
from typing import Any

import pytest

from core.refresh import Refresher, RefreshPolicy
from core.secret import Connection
from core.servicenow import OAuthApp, ServiceNowClient, build_session
from core.store import ConnectionStore
from core.sweep import Sweep
from local.servicenow_emulator import ServiceNowEmulator
from tests.conftest import CLIENT_ID, CLIENT_SECRET, FakeClock

PREFIX = "servicenow-oauth/"
USER, PASSWORD = "svc.integration", "Pa55w0rd-emulator"


class World:
    """Connections in moto, tokens from the emulator, and a call counter on the Secrets Manager client."""

    def __init__(self, secretsmanager: Any, emulator: ServiceNowEmulator, clock: FakeClock) -> None:
        self.sm = secretsmanager
        self.emulator = emulator
        self.clock = clock
        self.calls: Counter[str] = Counter()
        secretsmanager.meta.events.register("before-call.secretsmanager.*", self._count)
        self.store = ConnectionStore(secretsmanager, prefix=PREFIX, allowed_hosts=("127.0.0.1",), sleep=lambda _: None)
        self.client = ServiceNowClient(
            build_session(backoff_factor=0.01, backoff_max=0.05), clock=clock.now, timeout=(1, 1)
        )

    def _count(self, model: Any, **_: Any) -> None:
        self.calls[model.name] += 1

    def refresher(self, **policy: Any) -> Refresher:
        return Refresher(self.store, self.client, clock=self.clock.now, policy=RefreshPolicy(**policy))

    def add(self, name: str = "prod", *, consented: bool = True, **fields: Any) -> Connection:
        """A connection as the callback would have left it: consented now, tokens from the emulator."""
        connection = Connection(
            name=name, instance_url=self.emulator.url, client_id=CLIENT_ID, client_secret=CLIENT_SECRET
        )
        if consented:
            token = self.client.password_grant(
                OAuthApp(self.emulator.url, CLIENT_ID, CLIENT_SECRET), username=USER, password=PASSWORD
            )
            connection = connection.with_token(token, grant="authorization_code", now=self.clock.now())
        document = {**connection.to_document(), **fields}
        self.sm.create_secret(Name=f"{PREFIX}{name}", SecretString=json.dumps(document))
        return connection

    def value(self, name: str = "prod") -> tuple[str, dict[str, Any]]:
        answer = self.sm.get_secret_value(SecretId=f"{PREFIX}{name}", VersionStage="AWSCURRENT")
        return answer["VersionId"], json.loads(answer["SecretString"])

    def versions(self, name: str = "prod") -> int:
        return len(self.sm.list_secret_version_ids(SecretId=f"{PREFIX}{name}", IncludeDeprecated=True)["Versions"])


@pytest.fixture
def world(secretsmanager: Any, emulator: ServiceNowEmulator, clock: FakeClock) -> World:
    return World(secretsmanager, emulator, clock)


def test_not_due_connections_cost_no_write(world: World) -> None:
    world.add()
    before = world.value()
    world.clock.advance(600)
    world.calls.clear()
    [outcome] = Sweep(world.refresher()).run()
    assert world.calls == Counter({"ListSecrets": 1, "BatchGetSecretValue": 1})
    assert outcome.result == "not_due"
    assert world.value() == before


def test_due_connection_is_refreshed_keeping_the_refresh_token_life(world: World, leak_check: list) -> None:
    original = world.add()
    world.clock.advance(1799 - 300)  # inside the 600 s leeway
    [outcome] = Sweep(world.refresher()).run()
    assert outcome.result == "refreshed"
    _, document = world.value()
    assert document["status"] == "active"
    assert document["refreshToken"] == original.refresh_token
    assert document["refreshTokenExpiresAt"] == original.to_document()["refreshTokenExpiresAt"]
    assert document["accessTokenExpiresAt"] == (world.clock.now() + timedelta(seconds=1799)).strftime(
        "%Y-%m-%dT%H:%M:%SZ"
    )
    assert world.versions() == 2


def test_password_and_client_credentials_connections_get_tokens_without_a_person(
    world: World, leak_check: list
) -> None:
    world.add("pw", consented=False, grantType="password", username=USER, password=PASSWORD)
    world.emulator.register_client("cc-client", "cc-secret-value-1", client_credentials_user=USER)
    world.add(
        "cc", consented=False, grantType="client_credentials", clientId="cc-client", clientSecret="cc-secret-value-1"
    )
    world.add("waiting", consented=False)  # authorization_code without consent: needs a person
    outcomes = {o.connection: o.result for o in Sweep(world.refresher()).run()}
    assert outcomes == {"pw": "refreshed", "cc": "refreshed", "waiting": "needs_person"}
    _, pw = world.value("pw")
    assert pw["refreshToken"] and pw["refreshTokenExpiresAt"] and pw["status"] == "active"
    _, cc = world.value("cc")
    assert cc["accessToken"] and "refreshToken" not in cc


def test_a_rotated_refresh_token_is_stored_with_its_access_token(world: World, leak_check: list) -> None:
    world.emulator.rotate_refresh_tokens = True
    original = world.add()
    world.clock.advance(1700)
    [outcome] = Sweep(world.refresher()).run()
    assert outcome.result == "refreshed"
    _, document = world.value()
    assert document["refreshToken"] != original.refresh_token
    assert world.emulator.token_info(document["refreshToken"])["active"]
    assert world.emulator.token_info(document["accessToken"])["active"]


@pytest.mark.parametrize(
    ("fault", "failure"),
    [
        ("hibernate", "unavailable"),
        ("rate_limit", "rate_limited"),
        ("server_error", "transient"),
        ("drop", "transient"),
        ("slow", "transient"),
    ],
)
def test_provider_failures_leave_the_secret_untouched(world: World, fault: str, failure: str, leak_check: list) -> None:
    world.add()
    world.clock.advance(1700)
    before = world.value()
    world.emulator.inject(fault, count=10, retry_after=0, delay=1.5)
    [outcome] = Sweep(world.refresher()).run()
    assert (outcome.result, outcome.failure) == ("failed", failure)
    assert world.value() == before and world.versions() == 1
    world.emulator.clear_faults()
    [outcome] = Sweep(world.refresher()).run()  # the next run recovers
    assert outcome.result == "refreshed"


def test_a_rejected_credential_is_marked_with_the_old_tokens_kept(world: World, leak_check: list) -> None:
    original = world.add()
    world.emulator.revoke_user_tokens(USER)
    world.clock.advance(1700)
    [outcome] = Sweep(world.refresher()).run()
    leak_check.append(outcome.detail)
    assert outcome.result == "reauthorization_required"
    _, document = world.value()
    assert document["status"] == "reauthorization_required"
    assert document["refreshToken"] == original.refresh_token and document["accessToken"] == original.access_token
    requests_before = world.emulator.token_requests()
    [again] = Sweep(world.refresher()).run()
    assert again.result == "needs_person" and world.emulator.token_requests() == requests_before


def test_a_reconsent_racing_the_refresh_is_not_marked_dead(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    world.add()
    world.emulator.revoke_user_tokens(USER)
    world.clock.advance(1700)
    refresher = world.refresher()
    real_refresh = world.client.refresh

    def refresh_while_someone_reconsents(app: OAuthApp, refresh_token: str, **_: Any) -> Any:
        # While our request is in flight, an operator completes a new consent.
        token = world.client.password_grant(app, username=USER, password=PASSWORD)
        read = world.store.get("prod")
        world.store.compare_and_swap(
            read, read.connection.with_token(token, grant="authorization_code", now=world.clock.now())
        )
        return real_refresh(app, refresh_token)

    monkeypatch.setattr(world.client, "refresh", refresh_while_someone_reconsents)
    [outcome] = Sweep(refresher).run()
    assert outcome.result == "not_due" and outcome.detail == "credential changed while refreshing"
    _, document = world.value()
    assert document["status"] == "active"
    assert world.emulator.token_info(document["refreshToken"])["active"]


def test_concurrent_sweeps_end_consistent(world: World) -> None:
    for i in range(6):
        world.add(f"c{i}")
    world.clock.advance(1700)
    results: list[list[Any]] = []
    sweeps = [
        threading.Thread(target=lambda: results.append(Sweep(world.refresher()).run(max_workers=3))) for _ in range(2)
    ]
    for thread in sweeps:
        thread.start()
    for thread in sweeps:
        thread.join()
    for i in range(6):
        _, document = world.value(f"c{i}")
        assert document["status"] == "active"
        assert world.emulator.token_info(document["accessToken"])["active"]
        assert world.emulator.token_info(document["refreshToken"])["active"]
    per_connection = Counter(o.connection for sweep in results for o in sweep if o.result == "refreshed")
    assert all(count >= 1 for count in per_connection.values()) and len(per_connection) == 6


def test_one_broken_connection_does_not_stop_the_others(world: World) -> None:
    world.add("good")
    world.sm.create_secret(Name=f"{PREFIX}broken", SecretString="{not json")
    world.add("other")
    world.clock.advance(1700)
    outcomes = {o.connection: o.result for o in Sweep(world.refresher()).run()}
    assert outcomes == {"good": "refreshed", "broken": "invalid", "other": "refreshed"}


def test_expiring_refresh_token_is_flagged_but_still_refreshed(world: World) -> None:
    world.add()
    world.clock.advance(86 * 86400 + 60)  # 14 days before the 100-day refresh token dies
    [outcome] = Sweep(world.refresher()).run()
    assert outcome.result == "refreshed" and outcome.refresh_token_expiring


def test_a_sweep_of_200_idle_connections_reads_in_batches(world: World) -> None:
    template = world.add("c000")
    document = template.to_document()
    for i in range(1, 200):
        world.sm.create_secret(Name=f"{PREFIX}c{i:03d}", SecretString=json.dumps(document))
    world.calls.clear()
    outcomes = Sweep(world.refresher()).run()
    assert len(outcomes) == 200 and {o.result for o in outcomes} == {"not_due"}
    assert world.calls == Counter({"ListSecrets": 2, "BatchGetSecretValue": 10})


def _fail_writes(world: World, times: int) -> list[str]:
    """Make the next `times` PutSecretValue calls fail as if boto3 had exhausted its throttling retries."""
    from botocore.exceptions import ClientError

    failed: list[str] = []

    def throttle(model: Any, **_: Any) -> None:
        if model.name == "PutSecretValue" and len(failed) < times:
            failed.append(model.name)
            raise ClientError({"Error": {"Code": "ThrottlingException", "Message": "Rate exceeded"}}, model.name)

    world.sm.meta.events.register("before-call.secretsmanager.PutSecretValue", throttle)
    return failed


def test_a_failed_write_is_retried_with_the_same_version(world: World, leak_check: list) -> None:
    world.add()
    world.clock.advance(1700)
    failed = _fail_writes(world, 2)
    [outcome] = Sweep(world.refresher()).run()
    assert outcome.result == "refreshed" and len(failed) == 2
    assert world.versions() == 2  # retries reuse one ClientRequestToken: one new version, not three


def test_a_write_that_keeps_failing_is_loud_and_changes_nothing(world: World, leak_check: list) -> None:
    world.add()
    world.clock.advance(1700)
    before = world.value()
    _fail_writes(world, 100)
    [outcome] = Sweep(world.refresher()).run()
    assert (outcome.result, outcome.failure) == ("write_failed", "transient")
    assert outcome.detail == "secret write failed (ThrottlingException)"
    assert world.value() == before


def test_a_sweep_without_time_for_a_worst_case_attempt_defers_due_connections(world: World) -> None:
    world.add()
    world.clock.advance(1500)
    before, requests_before = world.value(), world.emulator.token_requests()
    [outcome] = Sweep(world.refresher()).run(time_left=lambda: 30.0)
    assert outcome.result == "deferred"
    assert world.value() == before and world.emulator.token_requests() == requests_before
    [outcome] = Sweep(world.refresher()).run(time_left=lambda: 200.0)
    assert outcome.result == "refreshed"
