"""The life-cycle issue's scenarios where two states meet, end to end: the deployed handlers (the scheduled
refresher and the rotation function, as Lambda runs them) against the moto server and the emulator, with one
injected clock. Each failed on the main branch before core/lifecycle.py; the double callback (scenario 6) is
in tests/test_callback.py. The same states meet at random in tests/test_lifecycle_model.py."""

from __future__ import annotations

import importlib
import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from botocore.awsrequest import AWSResponse
from hypothesis import given, settings
from hypothesis import strategies as st

from core.health import Health
from core.servicenow import build_session
from local.servicenow_emulator import ServiceNowEmulator
from tests.conftest import CLIENT_ID, FakeClock
from tests.test_callback import FakeContext
from tests.test_refresh import World
from tests.test_rotation import start_rotation

EVENTS = Path(__file__).resolve().parent.parent / "events"
SECRET = "servicenow-oauth/prod"
PROFILE = "snow-prod"


def refused(code: str, operation: str) -> tuple[AWSResponse, dict[str, Any]]:
    """What botocore hands back once AWS's own retries are spent (moto cannot throttle)."""
    parsed = {"Error": {"Code": code, "Message": f"{operation} refused by the test"}, "ResponseMetadata": {}}
    return AWSResponse("http://test", 400, {}, None), parsed


@dataclass
class Deployed:
    """The refresher Lambda as deployed (module-scope clients and all), on the test's clock."""

    handler: Any
    world: World
    clock: FakeClock
    emulator: ServiceNowEmulator
    outcomes: list[Any]

    @property
    def client(self) -> Any:
        return self.handler.refresher.store.client

    def sweep(self) -> dict[str, int]:
        return dict(self.handler.lambda_handler(json.loads((EVENTS / "schedule.json").read_text()), FakeContext()))

    def sweep_every(self, minutes: int, hours: float) -> list[dict[str, int]]:
        results = []
        for _ in range(int(hours * 60 / minutes)):
            self.clock.advance(minutes * 60)
            results.append(self.sweep())
        return results

    def document(self) -> dict[str, Any]:
        return self.world.value()[1]

    def health(self) -> Health:
        return Health.from_tags(self.client.describe_secret(SecretId=SECRET).get("Tags", []))

    def refuse(self, operations: set[str], code: str = "ThrottlingException") -> Callable[[], None]:
        """Make the Lambda's own Secrets Manager client fail these operations until the returned undo is called."""

        def hook(model: Any, **_: Any) -> tuple[AWSResponse, dict[str, Any]] | None:
            return refused(code, model.name) if model.name in operations else None

        self.client.meta.events.register("before-call.secrets-manager.*", hook)
        return lambda: self.client.meta.events.unregister("before-call.secrets-manager.*", hook)

    def appflow_refuses(self) -> list[str]:
        """AppFlow (which moto lacks) refusing UpdateConnectorProfile with AccessDenied; returns the calls made."""
        calls: list[str] = []

        def hook(model: Any, **_: Any) -> tuple[AWSResponse, dict[str, Any]]:
            calls.append(model.name)
            return refused("AccessDeniedException", model.name)

        appflow = self.handler.refresher.appflow.appflow
        appflow.meta.events.register("before-call.appflow.UpdateConnectorProfile", hook)
        return calls

    def live(self, token: str) -> bool:
        info = self.emulator.token_info(token)
        return bool(info and info["active"])

    def token_is_live(self) -> bool:
        return self.live(self.document()["refreshToken"])


@pytest.fixture
def deployed(
    aws: str,
    secretsmanager: Any,
    emulator: ServiceNowEmulator,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Deployed]:
    monkeypatch.setenv("SERVICENOW_ALLOWED_HOSTS", "127.0.0.1")
    monkeypatch.setenv("POWERTOOLS_SERVICE_NAME", "servicenow-oauth")
    monkeypatch.setenv("POWERTOOLS_METRICS_NAMESPACE", "ServiceNowOAuth")
    import handlers.refresh

    handler = importlib.reload(handlers.refresh)
    refresher = handler.refresher
    # The test's clock everywhere, and no real sleeping in backoffs (their lengths are not what is tested).
    refresher.clock = refresher.monitor.clock = refresher.client._clock = clock.now
    refresher.store._sleep = lambda _: None
    refresher.client._session = build_session(backoff_factor=0.001, backoff_max=0.01)
    refresher.client._single_shot = build_session(replay=False, backoff_factor=0.001, backoff_max=0.01)
    refresher.appflow.appflow._client = None  # a fresh AppFlow client per test, for the test's hooks
    outcomes: list[Any] = []  # everything the handler reported (its return value is only counts)
    report = handler.report_outcomes

    def recorded(found: Any, *args: Any, **kwargs: Any) -> Any:
        found = list(found)
        outcomes.extend(found)
        return report(found, *args, **kwargs)

    monkeypatch.setattr(handler, "report_outcomes", recorded)
    yield Deployed(handler, World(secretsmanager, emulator, clock), clock, emulator, outcomes)


def test_1_a_fixed_credential_whose_retry_meets_a_blip_is_retried_not_parked(
    deployed: Deployed, leak_check: list
) -> None:
    """reauthorization_required; the operator fixes the client secret; the one retry meets a hibernating
    instance. Once it wakes, the fixed credential is tried again (and works), with no FORCE."""
    deployed.world.add()
    deployed.sweep()
    deployed.emulator.set_client_secret(CLIENT_ID, "rotated-in-servicenow-Q7")  # an admin changes it
    deployed.clock.advance(1500)
    assert deployed.sweep() == {"reauthorization_required": 1}
    assert deployed.document()["status"] == "reauthorization_required"

    # The operator's fix, written as the CLI writes (moto's PutSecretValue mislabels versions after a stage move).
    deployed.world.store.update("prod", lambda c: replace(c, client_secret="rotated-in-servicenow-Q7"))
    deployed.emulator.inject("hibernate", path="*", count=10**6)
    deployed.clock.advance(300)
    assert deployed.sweep() == {"failed": 1}  # the one retry met the hibernation page
    assert deployed.health().needs_person is False

    deployed.emulator.clear_faults()
    before = deployed.emulator.token_requests()
    results = deployed.sweep_every(5, 2)
    assert deployed.emulator.token_requests() > before, "the fixed credential was never tried again"
    assert {"refreshed": 1} in results
    document = deployed.document()
    assert document["status"] == "active" and deployed.token_is_live()
    assert deployed.health().consecutive_failures == 0


def test_2_an_owed_appflow_push_does_not_bypass_backoff_during_an_outage(deployed: Deployed, leak_check: list) -> None:
    """A push failed (pending), then the instance goes down for a day: still a bounded number of attempts."""
    deployed.world.add(appflowConnectorProfiles=[PROFILE])
    pushes = deployed.appflow_refuses()
    deployed.clock.advance(1500)
    assert deployed.sweep() == {"refreshed": 1}
    assert pushes == ["UpdateConnectorProfile"] and deployed.health().appflow_pending
    deployed.emulator.inject("hibernate", path="*", count=10**6)
    before = deployed.emulator.token_requests()
    deployed.sweep_every(5, 24)
    spent = deployed.emulator.token_requests() - before
    assert spent <= 40, f"{spent} token requests in 24 hours of hibernation with an AppFlow push owed"
    assert deployed.health().appflow_pending  # still owed: pushed once the instance is back


@pytest.mark.parametrize("refused_operation", ["UpdateSecretVersionStage", "DescribeSecret+stage"])
def test_3_a_rotated_refresh_token_survives_a_failed_write(
    deployed: Deployed, leak_check: list, refused_operation: str
) -> None:
    """ServiceNow rotates the refresh token; every stage move of that invocation fails (throttled beyond
    botocore's retries), and in the second case the re-checks fail too. The next run still has the live token."""
    deployed.emulator.rotate_refresh_tokens = True
    deployed.world.add()
    spent = deployed.document()["refreshToken"]
    deployed.clock.advance(1500)
    operations = {"UpdateSecretVersionStage"} | ({"DescribeSecret"} if "DescribeSecret" in refused_operation else set())
    undo = deployed.refuse(operations)
    assert deployed.sweep() == {"write_failed": 1}
    undo()
    assert not deployed.live(spent)  # ServiceNow really rotated it
    deployed.clock.advance(300)
    assert deployed.sweep() in ({"refreshed": 1}, {"not_due": 1})
    document = deployed.document()
    assert document["status"] == "active" and document["refreshToken"] != spent and deployed.token_is_live()
    deployed.clock.advance(1500)
    assert deployed.sweep() == {"refreshed": 1}  # and it refreshes with it: no 401, no reauthorization
    assert deployed.document()["status"] == "active"


def test_3_a_rotated_refresh_token_is_written_onto_a_concurrent_change(deployed: Deployed, leak_check: list) -> None:
    """Someone else writes between the refresh's read and its write (a lost race): the rotated refresh token
    lands on top of their change, which is kept."""
    deployed.emulator.rotate_refresh_tokens = True
    deployed.world.add()
    deployed.clock.advance(1500)
    client = deployed.client
    raced: list[str] = []

    def operator_writes_first(model: Any, **_: Any) -> None:
        if model.name == "PutSecretValue" and not raced:
            raced.append("yes")
            deployed.world.store.update("prod", lambda c: replace(c, extra={**c.extra, "owner": "team-b"}))

    client.meta.events.register("before-call.secrets-manager.PutSecretValue", operator_writes_first)
    assert deployed.sweep() == {"refreshed": 1}
    document = deployed.document()
    assert raced and document["owner"] == "team-b"
    assert deployed.token_is_live()


def test_3_when_every_write_is_refused_the_loss_is_reported_and_alarmed(deployed: Deployed, leak_check: list) -> None:
    """The documented limit: Secrets Manager refuses every PutSecretValue of the invocation, so the rotated
    token can be stored nowhere. The outcome says so (SecretWriteFailed, the alarm's metric); the next refusal
    names the cause."""
    deployed.emulator.rotate_refresh_tokens = True
    deployed.world.add()
    deployed.clock.advance(1500)
    undo = deployed.refuse({"PutSecretValue"})
    assert deployed.sweep() == {"write_failed": 1}
    undo()
    assert deployed.health().rotation_unseen
    deployed.clock.advance(600)
    assert deployed.sweep() == {"reauthorization_required": 1}
    document = deployed.document()
    assert document["status"] == "reauthorization_required" and document["refreshToken"]  # old tokens kept
    [write_failed] = [o for o in deployed.outcomes if o.result == "write_failed"]
    assert "could not be stored anywhere" in (write_failed.detail or "")
    [refusal] = [o for o in deployed.outcomes if o.result == "reauthorization_required"]
    assert "write failed" in (refusal.detail or "") or "lost" in (refusal.detail or "")


@pytest.fixture
def rotation(aws: str, deployed: Deployed, rotation_lambda: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    import handlers.rotation

    handler = importlib.reload(handlers.rotation)
    refresher = handler.rotation.refresher
    refresher.clock = refresher.monitor.clock = refresher.client._clock = deployed.clock.now
    refresher.store._sleep = lambda _: None
    return handler


def rotation_step(rotation: Any, step: str, token: str) -> None:
    event = json.loads((EVENTS / f"rotation-{step}.json").read_text())
    event.update(SecretId=SECRET, ClientRequestToken=token)
    rotation.lambda_handler(event, FakeContext())


@pytest.mark.parametrize("between", ["sweep", "failed test"])
def test_4_rotation_never_strands_a_rotated_refresh_token(
    deployed: Deployed, rotation: Any, rotation_lambda: str, leak_check: list, between: str
) -> None:
    """createSecret spends RT0; a sweep runs before finishSecret, or testSecret fails and the rotation
    stops there. Either way the refresh token ServiceNow now honours is in AWSCURRENT."""
    deployed.emulator.rotate_refresh_tokens = True
    deployed.world.add()
    spent = deployed.document()["refreshToken"]
    token = str(uuid.uuid4())
    start_rotation(deployed.world.sm, rotation_lambda, token)
    rotation_step(rotation, "createSecret", token)
    rotation_step(rotation, "setSecret", token)
    assert not deployed.live(spent)
    if between == "sweep":
        deployed.clock.advance(1500)
        assert deployed.sweep() == {"refreshed": 1}
        with pytest.raises(Exception, match="changed after createSecret"):
            rotation_step(rotation, "finishSecret", token)  # never promotes the stale copy over the sweep's write
    else:
        deployed.emulator.inject("server_error", path="*", count=10)
        with pytest.raises(Exception):
            rotation_step(rotation, "testSecret", token)
        deployed.emulator.clear_faults()
        deployed.clock.advance(1500)
        assert deployed.sweep() == {"refreshed": 1}
    document = deployed.document()
    assert document["status"] == "active" and deployed.token_is_live()


def test_5_a_rotating_refresh_token_is_never_re_sent_after_a_lost_answer(deployed: Deployed, leak_check: list) -> None:
    """ServiceNow processed the refresh, then the answer was lost. For a connection whose refresh token rotates,
    the request is not re-sent (it would spend a dead token); the later refusal says why it happened."""
    deployed.emulator.rotate_refresh_tokens = True
    deployed.world.add(refreshTokenRotates=True)
    deployed.clock.advance(1500)
    deployed.emulator.inject("lost")
    before = deployed.emulator.token_requests("refresh_token")
    assert deployed.sweep() == {"failed": 1}
    assert deployed.emulator.token_requests("refresh_token") - before == 1, (
        "a refresh that may have been processed was re-sent"
    )
    assert deployed.health().rotation_unseen
    deployed.clock.advance(300)
    assert deployed.sweep() == {"reauthorization_required": 1}
    assert deployed.document()["status"] == "reauthorization_required"


def test_5_in_the_default_mode_one_server_error_is_retried_within_the_sweep(
    deployed: Deployed, leak_check: list
) -> None:
    """ServiceNow's default (the same refresh token back): a retry is safe, and one 500 must not cost a sweep."""
    deployed.world.add()
    deployed.clock.advance(1500)
    deployed.emulator.inject("server_error")
    before = deployed.emulator.token_requests("refresh_token")
    assert deployed.sweep() == {"refreshed": 1}
    assert deployed.emulator.token_requests("refresh_token") - before == 2
    deployed.emulator.inject("lost")
    deployed.clock.advance(1500)
    assert deployed.sweep() == {"refreshed": 1}  # a lost answer too: re-sent, same refresh token back
    assert deployed.document()["refreshToken"] and deployed.token_is_live()


@settings(max_examples=200, deadline=None, derandomize=True)
@given(interval=st.integers(min_value=5, max_value=20), leeway=st.integers(min_value=60, max_value=1700))
def test_no_access_token_lapses_between_sweeps_at_any_interval_and_leeway(interval: int, leeway: int) -> None:
    """Found while closing #26: a token with more than the leeway left is not due, so with RefreshIntervalMinutes
    above the leeway (20 min against 600 s) it died before the next sweep, and every sweep-time reading of
    AccessTokenExpiring stayed above its threshold. Any pair the template allows keeps a live token."""
    from core.config import Settings
    from core.lifecycle import RefreshPolicy

    policy = RefreshPolicy.from_settings(Settings(refresh_leeway_seconds=leeway, refresh_interval_minutes=interval))
    start = datetime(2026, 11, 22, tzinfo=UTC)
    late, long = timedelta(seconds=60), timedelta(seconds=240)  # a sweep starting late, and running its 240 s
    expires, moment = start + timedelta(seconds=1799), start
    for _ in range(12):  # two hours of sweeps, each deciding at its start and refreshing as late as its end
        moment += policy.interval + late
        assert expires > moment + long, f"a token lapsed between sweeps ({interval} min, leeway {leeway} s)"
        if expires - moment <= policy.leeway:
            expires = moment + long + timedelta(seconds=1799)
