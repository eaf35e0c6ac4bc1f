"""Where the life cycle's states meet at their edges: the defects an adversarial review found after the model
landed, each as it was reproduced (through the deployed handlers, on moto and the emulator), now fixed."""

from __future__ import annotations

import copy
import functools
import importlib
import itertools
import json
import uuid
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
from botocore.exceptions import ClientError, ReadTimeoutError

from core.errors import RotationError
from core.health import CANDIDATE, Health
from core.lifecycle import Outcome, RefreshPolicy, State, advance, state_of
from core.revoke import revoke_connection
from core.servicenow import OAuthApp, ServiceNowClient, build_session
from core.store import adoptable_token
from core.sweep import Sweep
from local.servicenow_emulator import press_consent
from tests.conftest import CLIENT_ID, CLIENT_SECRET
from tests.test_callback import FakeContext, Stack
from tests.test_callback import stack as callback_stack  # noqa: F401 (the fixture)
from tests.test_lifecycle import SECRET, Deployed, rotation_step
from tests.test_lifecycle import deployed as deployed
from tests.test_lifecycle import rotation as rotation
from tests.test_refresh import PASSWORD, USER
from tests.test_rotation import start_rotation

EVENTS = Path(__file__).resolve().parent.parent / "events"


def leave_candidate(deployed: Deployed) -> str:
    """Rotating mode; one sweep's stage move is refused, so the rotated token waits in a candidate version."""
    deployed.emulator.rotate_refresh_tokens = True
    deployed.world.add()
    spent = deployed.document()["refreshToken"]
    deployed.clock.advance(1500)
    undo = deployed.refuse({"UpdateSecretVersionStage"})
    assert deployed.sweep() == {"write_failed": 1}
    undo()
    assert not deployed.live(spent)
    return spent


def test_an_operator_change_before_the_next_sweep_keeps_the_candidates_token(
    deployed: Deployed, leak_check: list
) -> None:
    """`make stage-secret` (ConnectionStore.update) within the minutes before the next sweep adopts first."""
    leave_candidate(deployed)
    deployed.world.store.update("prod", lambda c: replace(c, extra={**c.extra, "clientSecretNext": "next-secret-X1"}))
    deployed.clock.advance(300)
    deployed.sweep()
    assert deployed.document()["status"] == "active" and deployed.token_is_live()
    assert deployed.document()["clientSecretNext"] == "next-secret-X1"


def test_a_change_written_without_adopting_gets_the_candidates_tokens(deployed: Deployed, leak_check: list) -> None:
    """A writer that does not adopt (the console): the candidate's refresh spent the token the new value still
    holds, so its tokens are written onto it rather than cleared."""
    leave_candidate(deployed)
    version, document = deployed.world.value()
    # What the console does: a new version made AWSCURRENT, other labels untouched (in two calls: moto's
    # PutSecretValue mislabels versions after a stage move).
    sm, secret = deployed.world.sm, "servicenow-oauth/prod"
    written = sm.put_secret_value(
        SecretId=secret, SecretString=json.dumps({**document, "owner": "team-b"}), VersionStages=["CONSOLE"]
    )
    sm.update_secret_version_stage(
        SecretId=secret, VersionStage="AWSCURRENT", MoveToVersionId=written["VersionId"], RemoveFromVersionId=version
    )
    deployed.clock.advance(300)
    deployed.sweep()
    assert deployed.token_is_live() and deployed.document()["owner"] == "team-b"
    assert deployed.document()["status"] == "active"


def test_revoke_also_revokes_the_candidates_refresh_token(deployed: Deployed, leak_check: list) -> None:
    leave_candidate(deployed)
    revoke_connection(deployed.world.store, ServiceNowClient(build_session()), "prod", deployed.clock.now())
    assert deployed.emulator.live_refresh_tokens() == set()


def test_finish_secret_refuses_to_promote_over_a_candidate(
    deployed: Deployed, rotation: Any, rotation_lambda: str, leak_check: list
) -> None:
    """createSecret rotated RT0 -> RT1; before finishSecret a forced refresh rotated RT1 -> RT2 but its stage
    move failed. finishSecret must not put the pending copy (dead RT1) over the candidate (RT2)."""
    deployed.emulator.rotate_refresh_tokens = True
    deployed.world.add()
    token = str(uuid.uuid4())
    start_rotation(deployed.world.sm, rotation_lambda, token)
    rotation_step(rotation, "createSecret", token)
    rotation_step(rotation, "setSecret", token)
    refresher = deployed.handler.refresher
    undo = deployed.refuse({"UpdateSecretVersionStage"})
    assert refresher.refresh(refresher.store.get("prod"), force=True).result == "write_failed"
    undo()
    rotation_step(rotation, "testSecret", token)
    with pytest.raises(RotationError, match="candidate"):
        rotation_step(rotation, "finishSecret", token)
    deployed.clock.advance(1500)
    deployed.sweep()
    assert deployed.document()["status"] == "active" and deployed.token_is_live()


def test_a_lost_race_whose_re_check_fails_keeps_the_rotated_token(deployed: Deployed, leak_check: list) -> None:
    deployed.emulator.rotate_refresh_tokens = True
    deployed.world.add()
    deployed.clock.advance(1500)
    raced: list[str] = []

    def operator_writes_first(model: Any, **_: Any) -> None:
        if model.name == "PutSecretValue" and not raced:
            raced.append("yes")
            deployed.world.store.update("prod", lambda c: replace(c, extra={**c.extra, "owner": "team-b"}))

    deployed.client.meta.events.register("before-call.secrets-manager.PutSecretValue", operator_writes_first)
    undo = deployed.refuse({"DescribeSecret"})
    deployed.sweep()
    undo()
    deployed.clock.advance(300)
    deployed.sweep()
    assert deployed.token_is_live() and deployed.document()["status"] == "active"


def test_a_candidate_that_cannot_be_adopted_does_not_bypass_backoff(deployed: Deployed, leak_check: list) -> None:
    """UpdateSecretVersionStage refused for a day (throttled, or a missing permission)."""
    deployed.world.add()
    deployed.clock.advance(1500)
    undo = deployed.refuse({"UpdateSecretVersionStage"})
    before = deployed.emulator.token_requests()
    deployed.sweep()
    deployed.sweep_every(5, 24)
    undo()
    spent = deployed.emulator.token_requests() - before
    assert deployed.health().consecutive_failures > 0
    assert spent <= 40, f"{spent} token requests in 24 h for one failing connection"


def deployed_worker(deployed: Deployed, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The SQS worker module as deployed, sharing the refresher Lambda's clients and clock."""
    import handlers.worker

    worker = importlib.reload(handlers.worker)
    monkeypatch.setattr(worker, "refresher", deployed.handler.refresher)
    return worker


def queued_record(name: str) -> dict[str, Any]:
    """An SQS record as the sweep's fan-out queues it for one connection."""
    record = copy.deepcopy(json.loads((EVENTS / "sqs-refresh.json").read_text())["Records"][0])
    record["body"] = json.dumps({"connection": name})
    return record


def test_a_fanned_out_failing_connection_keeps_its_backoff(
    deployed: Deployed, leak_check: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More due than FAN_OUT_ABOVE (here 0): the worker refreshes them, and must read their health too."""
    worker = deployed_worker(deployed, monkeypatch)

    def queue(names: list[str]) -> list[str]:
        for name in names:
            worker.refresh_record(SQSRecord(queued_record(name)), FakeContext(remaining_ms=300_000))  # fresh
        return []

    monkeypatch.setattr(deployed.handler, "fan_out", queue)
    monkeypatch.setattr(deployed.handler, "settings", replace(deployed.handler.settings, fan_out_above=0))
    deployed.world.add()
    deployed.emulator.inject("server_error", path="*", count=10**6)
    before = deployed.emulator.token_requests()
    deployed.sweep_every(5, 24)
    spent = deployed.emulator.token_requests() - before
    assert deployed.health().consecutive_failures > 0
    assert spent <= 40, f"{spent} token requests in 24 h of 5xx for one fanned-out connection"


def test_a_consent_whose_write_landed_unseen_is_kept_not_revoked(callback_stack: Stack, leak_check: list) -> None:  # noqa: F811
    """Re-consent: the stage move happens in Secrets Manager but its answer is lost, and the store's re-check
    (DescribeSecret) is throttled, so the write looks failed. The tokens are in AWSCURRENT: keep them."""
    stack = callback_stack
    stack.create_connection()
    assert stack.get("/callback", press_consent(stack.start()))["statusCode"] == 200
    redirect = press_consent(stack.start())
    client = stack.handler.store.client
    stack.handler.store._sleep = lambda _: None
    landed: list[bool] = []
    captured: list[dict[str, Any]] = []

    def capture(params: dict[str, Any], **_: Any) -> None:
        captured.append(dict(params))

    def stage_move_lands_answer_lost(**_: Any) -> None:
        if not landed:
            landed.append(True)
            stack.secretsmanager.update_secret_version_stage(**captured[-1])
            raise ClientError({"Error": {"Code": "ThrottlingException", "Message": "x"}}, "UpdateSecretVersionStage")

    def describe_throttled_after(**_: Any) -> None:
        if landed:
            raise ClientError({"Error": {"Code": "ThrottlingException", "Message": "x"}}, "DescribeSecret")

    client.meta.events.register("before-parameter-build.secretsmanager.UpdateSecretVersionStage", capture)
    client.meta.events.register("before-call.secretsmanager.UpdateSecretVersionStage", stage_move_lands_answer_lost)
    client.meta.events.register("before-call.secretsmanager.DescribeSecret", describe_throttled_after)
    try:
        page = stack.get("/callback", redirect)
    finally:
        client.meta.events.unregister(
            "before-call.secretsmanager.UpdateSecretVersionStage", stage_move_lands_answer_lost
        )
        client.meta.events.unregister("before-call.secretsmanager.DescribeSecret", describe_throttled_after)
    leak_check.append(page["body"])
    document = stack.document()
    assert landed and stack.emulator.token_info(document["refreshToken"])["active"], page["statusCode"]
    assert page["statusCode"] == 200, page["body"]


def record_events(deployed: Deployed) -> list[str]:
    changes: list[str] = []

    def hook(params: dict[str, Any], **_: Any) -> None:
        changes.extend(json.loads(e["Detail"])["change"] for e in params.get("Entries", []))

    deployed.handler.refresher.monitor.events.meta.events.register("before-parameter-build.eventbridge.PutEvents", hook)
    return changes


def test_a_promoted_client_secret_is_announced_even_if_its_tag_write_fails(
    deployed: Deployed, leak_check: list
) -> None:
    changes = record_events(deployed)
    deployed.world.add()
    deployed.world.store.update("prod", lambda c: replace(c, extra={**c.extra, "clientSecretNext": "next-secret-Q9"}))
    deployed.emulator.set_client_secret(CLIENT_ID, "next-secret-Q9")
    deployed.clock.advance(1500)
    undo = deployed.refuse({"TagResource", "UntagResource"})
    assert deployed.sweep() == {"refreshed": 1}
    undo()
    deployed.sweep_every(5, 1)
    assert deployed.document()["clientSecret"] == "next-secret-Q9"
    assert changes.count("client_secret_promoted") == 1, changes


def test_a_consent_is_announced_even_if_its_tag_write_fails(deployed: Deployed, leak_check: list) -> None:
    changes = record_events(deployed)
    deployed.world.add(consented=False)
    deployed.sweep()
    world = deployed.world
    token = world.client.password_grant(
        OAuthApp(deployed.emulator.url, CLIENT_ID, CLIENT_SECRET), username=USER, password=PASSWORD
    )  # a stand-in for the code exchange
    stored = world.store.update(
        "prod", lambda c: c.with_token(token, grant="authorization_code", now=deployed.clock.now())
    )
    undo = deployed.refuse({"TagResource", "UntagResource"})
    deployed.handler.refresher.monitor.after_consent(stored)  # what handlers/callback.py does after the write
    undo()
    deployed.sweep_every(5, 1)
    assert changes.count("authorized") == 1, changes


def test_a_refused_secret_changed_while_it_was_read_stays_refused_until_tried() -> None:
    """'credential changed while refreshing' on a document still marked refused: nothing was tried."""
    old = Health(status="reauthorization_required", version="v2", needs_person=True, rejected_version="v2")
    outcome = Outcome(
        "prod",
        "not_due",
        arn="arn",
        version_id="v3",
        status="reauthorization_required",
        grant="authorization_code",
        needs_person=True,
        detail="credential changed while refreshing",
    )
    new, kinds = advance(old, outcome, FakeNow.now, RefreshPolicy())
    assert state_of(new) is State.REJECTED and kinds == ()


class FakeNow:
    from datetime import UTC, datetime

    now = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


def test_a_change_event_eventbridge_refuses_is_counted_for_its_alarm(
    deployed: Deployed, leak_check: list, capfd: pytest.CaptureFixture[str]
) -> None:
    """Events go out at most once: one EventBridge refused is counted (ChangeEventsNotPublished alarms)."""
    from tests.test_lifecycle import refused

    def refuse(model: Any, **_: Any) -> Any:
        return refused("InternalException", model.name)

    deployed.handler.refresher.monitor.events.meta.events.register("before-call.eventbridge.PutEvents", refuse)
    deployed.world.add()
    deployed.emulator.set_client_secret(CLIENT_ID, "changed-in-servicenow-Z1")
    deployed.clock.advance(1500)
    assert deployed.sweep() == {"reauthorization_required": 1}
    deployed.clock.advance(300)  # announced by the next sweep that finds the refusal standing (lifecycle.advance)
    assert deployed.sweep() == {"needs_person": 1}
    outcome = deployed.outcomes[-1]
    assert outcome.events == ("reauthorization_required",) and outcome.events_failed == 1
    out = capfd.readouterr().out
    leak_check.append(out)  # the leak check reads the capture at the end: hand it what was taken here
    metrics = [json.loads(line) for line in out.splitlines() if line.startswith('{"_aws"')]
    assert any(m.get("ChangeEventsNotPublished") == [1.0] for m in metrics), metrics


def test_failing_is_announced_once_even_when_a_tag_write_fails(deployed: Deployed, leak_check: list) -> None:
    """Found by the life-cycle model: the event went out while the tags recording it did not, so the next
    sweep announced it again."""
    changes = record_events(deployed)
    deployed.world.add()
    deployed.sweep()
    deployed.emulator.inject("hibernate", path="*", count=10**6)
    deployed.sweep_every(5, 1.25)  # failing since about 20 minutes in: the alert is due at about 80
    undo = deployed.refuse({"TagResource", "UntagResource"})
    deployed.sweep_every(5, 0.5)  # the alert comes due while no tag can be written
    undo()
    deployed.sweep_every(5, 1)
    assert changes.count("failing") == 1, changes


def test_an_outage_while_tag_writes_are_refused_still_backs_off(
    deployed: Deployed, leak_check: list, capfd: pytest.CaptureFixture[str]
) -> None:
    """Found by the soak: the backoff lives in the tags, so while TagResource was refused every sweep tried
    again (up to 288 token requests a day). The container now keeps the health it could not write, counts it
    (HealthTagsNotWritten, alarmed) and writes it once the tags can be written."""
    deployed.world.add()
    deployed.sweep()
    deployed.emulator.inject("hibernate", path="*", count=10**6)
    undo = deployed.refuse({"TagResource", "UntagResource"})
    before = deployed.emulator.token_requests()
    deployed.sweep_every(5, 24)
    spent = deployed.emulator.token_requests() - before
    assert spent <= 40, f"{spent} token requests in 24 hours of hibernation while no tag could be written"
    assert deployed.health().consecutive_failures == 0  # the tags really were never written
    out = capfd.readouterr().out
    leak_check.append(out)
    metrics = [json.loads(line) for line in out.splitlines() if line.startswith('{"_aws"')]
    assert all(m.get("HealthTagsNotWritten") == [1.0] for m in metrics[-12:]), metrics[-12:]
    undo()
    deployed.emulator.clear_faults()
    deployed.sweep_every(5, 1.5)
    assert deployed.health().consecutive_failures == 0 and deployed.health().last_success is not None
    assert deployed.document()["status"] == "active"


def test_health_kept_in_memory_yields_to_tags_written_by_another_container(deployed: Deployed) -> None:
    """The memory only stands in for the tags it failed to replace: once someone else writes them (another
    container, a consent), theirs win."""
    deployed.world.add()
    deployed.sweep()
    deployed.emulator.inject("hibernate", path="*", count=10**6)
    undo = deployed.refuse({"TagResource", "UntagResource"})
    deployed.clock.advance(1500)
    deployed.sweep()
    monitor = deployed.handler.refresher.monitor
    arn = deployed.client.describe_secret(SecretId=SECRET)["ARN"]
    assert monitor.unsaved(arn)
    undo()
    deployed.world.sm.tag_resource(SecretId=SECRET, Tags=[{"Key": "servicenow-oauth:failure-class", "Value": "x"}])
    tags = deployed.client.describe_secret(SecretId=SECRET)["Tags"]
    assert Health.from_tags(monitor.recall(arn, tags)).consecutive_failures == 0
    assert not monitor.unsaved(arn)


def test_recovered_is_announced_once_when_only_untag_fails(deployed: Deployed) -> None:
    """Found by the review: TagResource landed, UntagResource was refused; the mixed tags were neither the old
    nor the new health, the memory was dropped and "recovered" announced again. Now the health is one
    TagResource (absent fields as empty values): no UntagResource, nothing left mixed."""
    changes = record_events(deployed)
    deployed.world.add()
    deployed.sweep()
    deployed.emulator.inject("hibernate", path="*", count=10**6)
    deployed.sweep_every(5, 2)  # failing long enough for the "failing" alert
    assert changes.count("failing") == 1, changes
    deployed.emulator.clear_faults()
    undo = deployed.refuse({"UntagResource"})  # one sweep's untag throttled
    for _ in range(12):  # until the recovery sweep (bounded)
        deployed.clock.advance(300)
        deployed.sweep()
        if "recovered" in changes:
            break
    undo()
    deployed.sweep_every(5, 2)
    assert changes.count("recovered") == 1, changes


def failing_then_tags_denied(deployed: Deployed) -> None:
    """Two hours failing (alerted), then the instance is back while tag writes are denied (a role without the
    right, or TagResource throttled for a while)."""
    deployed.world.add()
    deployed.sweep()
    deployed.emulator.inject("hibernate", path="*", count=10**6)
    deployed.sweep_every(5, 2)
    deployed.emulator.clear_faults()
    deployed.refuse({"TagResource", "UntagResource"}, code="AccessDeniedException")


def test_recovered_once_while_tag_writes_are_denied(deployed: Deployed) -> None:
    changes = record_events(deployed)
    failing_then_tags_denied(deployed)
    deployed.sweep_every(5, 3)
    assert changes.count("recovered") == 1, changes


def test_tags_denied_is_counted_every_sweep_for_its_alarm(deployed: Deployed) -> None:
    """HealthTagsNotWritten alarms on 2 consecutive 5-minute periods: while tag writes are denied every sweep
    counts the connection (it was counted only on refresh sweeps, and the alarm never fired)."""
    failing_then_tags_denied(deployed)
    flags: list[bool] = []
    for _ in range(36):
        deployed.clock.advance(300)
        n = len(deployed.outcomes)
        deployed.sweep()
        flags.append(any(o.health_unsaved for o in deployed.outcomes[n:]))
    assert any(a and b for a, b in itertools.pairwise(flags)), "alarm (2 consecutive periods) never fires"


def test_health_kept_in_memory_keeps_the_stacks_other_tags(deployed: Deployed) -> None:
    """The memory stands in for the health tags only: AppFlow's synced version (and rotation's base) are read
    as they are, or an AppFlow push already made would look owed again."""
    from core.appflow import SYNCED_TAG

    deployed.world.add()
    deployed.sweep()
    arn = deployed.client.describe_secret(SecretId=SECRET)["ARN"]
    deployed.world.sm.tag_resource(SecretId=SECRET, Tags=[{"Key": SYNCED_TAG, "Value": "v1"}])
    deployed.emulator.inject("hibernate", path="*", count=10**6)
    undo = deployed.refuse({"TagResource", "UntagResource"})
    deployed.clock.advance(1500)
    deployed.sweep()
    undo()
    monitor = deployed.handler.refresher.monitor
    assert monitor.unsaved(arn)
    recalled = monitor.recall(arn, deployed.client.describe_secret(SecretId=SECRET)["Tags"])
    assert recalled.get(SYNCED_TAG) == "v1" and Health.from_tags(recalled).consecutive_failures == 1


def test_an_operator_change_during_an_outage_does_not_bypass_the_backoff(deployed: Deployed) -> None:
    """Found by the soak (42 token requests in a day): each credential change while the instance was down
    bought an immediate attempt. A new secret does not bring an instance back; only a refused credential that
    changed is tried at once."""
    deployed.world.add()
    deployed.sweep()
    deployed.emulator.inject("server_error", path="*", count=10**6)
    deployed.sweep_every(5, 3)  # failing, backing off by the cap
    waited = 0
    for n in range(5):
        before = deployed.emulator.token_requests()
        deployed.world.store.update("prod", lambda c, n=n: replace(c, extra={**c.extra, "note": f"rotated {n}"}))
        deployed.clock.advance(300)
        due = deployed.health().next_attempt
        deployed.sweep()
        if due and due - timedelta(seconds=150) > deployed.clock.now():  # still backing off when it ran
            waited += 1
            assert deployed.emulator.token_requests() == before, "a changed secret skipped the backoff"
    assert waited >= 3, "the test never met the backoff"


def test_a_rotation_that_never_created_its_version_does_not_stop_the_sweep(
    deployed: Deployed, rotation_lambda: str, leak_check: list
) -> None:
    """Found by the soak (an access token expired after one blip): a rotation whose createSecret never ran left
    moto's default version on a version that does not exist, so BatchGetSecretValue failed as a whole on every
    sweep. A batch that fails on a missing version is now read one by one at AWSCURRENT."""
    deployed.world.add()
    deployed.sweep()
    start_rotation(deployed.world.sm, rotation_lambda, str(uuid.uuid4()))  # the steps never run (the stand-in)
    arn = deployed.world.sm.describe_secret(SecretId=SECRET)["ARN"]
    with pytest.raises(ClientError, match="ResourceNotFoundException"):
        deployed.world.sm.batch_get_secret_value(SecretIdList=[arn])  # the condition this test is about
    before = deployed.document()["accessTokenExpiresAt"]
    deployed.sweep_every(5, 0.5)
    assert deployed.document()["accessTokenExpiresAt"] > before, "the connection was never refreshed"
    assert deployed.document()["status"] == "active"


def test_health_held_in_memory_is_written_by_the_next_sweep_even_when_not_due(deployed: Deployed) -> None:
    """Found by the soak (recovered announced twice): the health a refused tag write left in memory was written
    only at the connection's next refresh, 20 minutes on; an overlapping or later container read the stale tags
    meanwhile. The next sweep now writes it, even for a connection that is not due."""
    deployed.world.add()
    deployed.sweep()
    deployed.clock.advance(1500)
    undo = deployed.refuse({"TagResource", "UntagResource"})
    deployed.sweep()  # refreshed; its health tags refused
    version = deployed.world.value()[0]
    assert deployed.health().version != version
    undo()
    deployed.clock.advance(300)
    deployed.sweep()  # not due: only the tag write is owed
    assert deployed.health().version == version


def refused_fix(deployed: Deployed) -> None:
    """A connection ServiceNow refused (its client secret changed there), then an operator's fix that is wrong too:
    a new secret version, still `reauthorization_required`, that the next sweep tries once."""
    deployed.world.add()
    deployed.sweep()
    deployed.emulator.set_client_secret(CLIENT_ID, "changed-in-servicenow")
    deployed.clock.advance(1500)
    deployed.sweep()
    assert deployed.document()["status"] == "reauthorization_required"
    deployed.clock.advance(300)
    deployed.sweep()  # the refusal stands: announced, the operator is paged
    deployed.world.store.update("prod", lambda c: replace(c, client_secret="a-wrong-fix"))


def test_a_refusal_whose_tag_write_failed_stays_refused_after_a_cold_start(deployed: Deployed) -> None:
    """Found by the soak (a refused credential retried before its secret changed): the version the stack wrote
    to mark a refusal differed from the one the tags named, so when the tag write failed and the container was
    recycled, the next sweep took the stack's own mark for an operator's change and asked ServiceNow again.
    The mark now names itself in the document (`markedVersion`), whatever the tags say."""
    refused_fix(deployed)
    undo = deployed.refuse({"TagResource", "UntagResource"})
    deployed.clock.advance(300)
    before = deployed.emulator.token_requests()
    deployed.sweep()  # tries the fix once: refused, marked; its health tags refused
    assert deployed.emulator.token_requests() == before + 1
    undo()
    deployed.handler.refresher.monitor._unsaved.clear()  # a new container: the memory of that health is gone
    version = deployed.world.value()[0]
    assert deployed.health().version != version  # the tags name an older version
    deployed.sweep_every(5, 2)
    assert deployed.emulator.token_requests() == before + 1, "the refused fix was tried again without a change"
    assert deployed.health().rejected_version == version and deployed.document()["markedVersion"] == version


def test_a_refused_fix_whose_mark_cannot_be_written_is_not_retried(deployed: Deployed) -> None:
    """Found by the soak: when ServiceNow refused an operator's fix and Secrets Manager refused the write that
    marks it, the refusal counted as a blip and was retried with backoff. The document already says
    `reauthorization_required`, so the health tags alone now record that this version was refused."""
    refused_fix(deployed)
    undo = deployed.refuse({"PutSecretValue"})
    deployed.clock.advance(300)
    before = deployed.emulator.token_requests()
    fix = deployed.world.value()[0]
    deployed.sweep()
    undo()
    assert deployed.world.value()[0] == fix  # nothing was written
    deployed.sweep_every(5, 2)
    assert deployed.emulator.token_requests() == before + 1, "the refused fix was retried as if it were a blip"
    assert deployed.health().rejected_version == fix and deployed.health().needs_person


def time_out_once(client: Any, event: str) -> list[str]:
    """Make the first Secrets Manager call matching `event` time out (before-call: it never landed; after-call:
    it landed and its answer was lost); returns the calls that did."""
    timed_out: list[str] = []

    def once(model: Any, **_: Any) -> None:
        if not timed_out:
            timed_out.append(model.name)
            raise ReadTimeoutError(endpoint_url="https://secretsmanager.us-east-1.amazonaws.com/")

    client.meta.events.register(event, once)
    return timed_out


@pytest.mark.parametrize("landed", [False, True])
def test_a_write_that_times_out_is_reported_and_a_landed_one_adopted(deployed: Deployed, landed: bool) -> None:
    """Found by review: a timeout (botocore's ReadTimeoutError is not a ClientError) escaped the compare-and-swap,
    so a rotated refresh token whose write timed out was dropped as a plain failure, with no write_failed and no
    alarm. botocore has already retried it (6 attempts), so it is now a failed write at once, saying the rotated
    token may be lost; if the put landed unseen, the next sweep adopts its candidate and nothing is lost."""
    deployed.emulator.rotate_refresh_tokens = True
    deployed.world.add()
    deployed.sweep()  # learns that this instance rotates refresh tokens
    when = "after-call" if landed else "before-call"
    timed_out = time_out_once(deployed.client, f"{when}.secrets-manager.PutSecretValue")
    deployed.clock.advance(1500)
    assert deployed.sweep() == {"write_failed": 1} and timed_out
    outcome = deployed.outcomes[-1]
    assert "ReadTimeoutError" in (outcome.detail or "") and outcome.rotation_unseen
    deployed.clock.advance(300)
    deployed.sweep()
    assert deployed.token_is_live() == landed
    assert deployed.document()["status"] == ("active" if landed else "reauthorization_required")


def test_a_batch_read_that_times_out_costs_only_its_connections_a_sweep(deployed: Deployed) -> None:
    """Found by review: a timed-out BatchGetSecretValue raised out of the whole sweep (a throttled one only cost
    its connections this sweep). It is now a transient failure of the connections in that batch."""
    for name in ("a", "b"):
        deployed.world.add(name)
    time_out_once(deployed.client, "before-call.secrets-manager.BatchGetSecretValue")
    deployed.clock.advance(1500)
    assert deployed.sweep() == {"failed": 2}
    assert all("ReadTimeoutError" in (outcome.detail or "") for outcome in deployed.outcomes[-2:])
    deployed.clock.advance(300)
    assert deployed.sweep() == {"refreshed": 2}


def test_a_consent_whose_stage_move_answer_times_out_is_kept_not_revoked(callback_stack: Stack) -> None:  # noqa: F811
    """Found by review: the stage move of a consent landed but its answer timed out (a BotoCoreError); the callback
    took that for a write that never happened and revoked the tokens AWSCURRENT now held. It now asks
    Secrets Manager what landed, as for any AWS-side failure."""
    callback_stack.create_connection()
    redirect = press_consent(callback_stack.start())
    client = callback_stack.handler.store.client
    lost = time_out_once(client, "after-call.secrets-manager.UpdateSecretVersionStage")
    callback_stack.get("/callback", redirect)
    stored = callback_stack.document().get("refreshToken")
    info = callback_stack.emulator.token_info(stored) if stored else None
    assert lost and info and info["active"], "the stored consent was revoked"


def test_a_forced_retry_of_a_marked_credential_writes_no_new_version(deployed: Deployed) -> None:
    """The mark names itself, so a run refused again on a version already marked (FORCE=1, or a second container
    retrying the same fix) has nothing to write: no new version, no second announcement."""
    deployed.world.add()
    deployed.sweep()
    deployed.emulator.set_client_secret(CLIENT_ID, "changed-in-servicenow")
    deployed.clock.advance(1500)
    deployed.sweep()
    marked = deployed.world.value()[0]
    before = deployed.emulator.token_requests()
    refresher = deployed.handler.refresher
    outcome = refresher.refresh(deployed.world.store.get_latest("prod"), force=True)
    assert outcome.result == "reauthorization_required" and not outcome.events
    assert deployed.emulator.token_requests() == before + 1
    assert deployed.world.value()[0] == marked


def test_health_held_in_memory_survives_an_outcome_between_listing_and_refresh(deployed: Deployed) -> None:
    """Found by the soak (recovered announced twice): the sweep handed its batch the tags as memory remembered
    them, not as read. When another outcome in this container changed that memory between the listing and the
    refresh (a forced refresh that recovered the connection), the remembered tags no longer matched it, looked
    as if the tags had moved on and dropped the memory; the stale tags said `reauthorization_required`, so the
    recovery was announced a second time."""
    changes = record_events(deployed)
    refused_fix(deployed)
    undo = deployed.refuse({"TagResource", "UntagResource"})
    deployed.clock.advance(300)
    deployed.sweep()  # tries the wrong fix once: refused, marked; its health tags refused (kept in memory)
    refresher = deployed.handler.refresher
    assert refresher.monitor.unsaved(deployed.client.describe_secret(SecretId=SECRET)["ARN"])
    deployed.world.store.update("prod", lambda c: replace(c, client_secret="changed-in-servicenow"))  # the right fix
    read_batch = Sweep.read_batch

    def forced_refresh_meanwhile(sweep: Sweep, entries: list[dict[str, Any]]) -> Any:
        refresher.refresh(refresher.store.get_latest("prod"), force=True)  # an operator's forced refresh, recovered
        return read_batch(sweep, entries)

    Sweep.read_batch = forced_refresh_meanwhile  # on the class: the handler builds a Sweep per invocation
    try:
        deployed.clock.advance(300)
        deployed.sweep()
    finally:
        Sweep.read_batch = read_batch
    undo()
    deployed.sweep_every(5, 1)
    assert deployed.document()["status"] == "active"
    assert changes.count("recovered") == 1, changes


def test_a_consent_whose_health_read_times_out_does_not_leave_the_connection_parked(
    deployed: Deployed,
    callback_stack: Stack,  # noqa: F811
) -> None:
    """Found by the review: after a consent the callback reads the health tags to update them; when that read timed
    out the tags counted as empty, so only the new health's keys were written and the stale `needs-person` and
    `rejected-version` stayed beside `status=active`: every sweep answered needs_person from the listing and the
    fresh tokens were never refreshed. With the tags unknown, every health tag is now written or removed."""
    deployed.world.add()
    deployed.sweep()
    deployed.emulator.set_client_secret(CLIENT_ID, "changed-in-servicenow")
    deployed.clock.advance(1500)
    deployed.sweep()
    assert deployed.health().needs_person
    deployed.emulator.set_client_secret(CLIENT_ID, CLIENT_SECRET)  # fixed in ServiceNow; the person consents again
    redirect = press_consent(callback_stack.start())
    client = callback_stack.handler.store.client
    describes: list[str] = []

    def the_monitors_read_times_out(model: Any, **_: Any) -> None:
        describes.append(model.name)
        if len(describes) == 2:  # the first is the consent's own read; the second the monitor's
            raise ReadTimeoutError(endpoint_url="https://secretsmanager.us-east-1.amazonaws.com/")

    client.meta.events.register("before-call.secrets-manager.DescribeSecret", the_monitors_read_times_out)
    try:
        assert callback_stack.get("/callback", redirect)["statusCode"] == 200
    finally:
        client.meta.events.unregister("before-call.secrets-manager.DescribeSecret", the_monitors_read_times_out)
    assert len(describes) >= 2
    assert not deployed.health().needs_person and deployed.health().rejected_version is None
    before = deployed.emulator.token_requests()
    expires = datetime.fromisoformat(deployed.document()["accessTokenExpiresAt"].replace("Z", "+00:00"))
    deployed.clock.advance((expires - deployed.clock.now()).total_seconds() - 1200)  # the callback's clock is real
    assert deployed.sweep() == {"not_due": 1}
    deployed.sweep_every(5, 1)
    assert deployed.emulator.token_requests() > before, "the fresh consent was never refreshed"


def sqs_fan_out(deployed: Deployed, monkeypatch: pytest.MonkeyPatch, **settings: Any) -> Any:
    """The sweep's fan-out to a real (moto) queue whose first SendMessageBatch times out."""
    import boto3

    from core.fanout import send_connections

    sqs = boto3.client("sqs", region_name="us-east-1")
    url = sqs.create_queue(QueueName="refresh")["QueueUrl"]
    time_out_once(sqs, "before-call.sqs.SendMessageBatch")
    monkeypatch.setattr(deployed.handler, "fan_out", functools.partial(send_connections, sqs, url))
    monkeypatch.setattr(deployed.handler, "settings", replace(deployed.handler.settings, **settings))
    return sqs, url


def test_an_sqs_timeout_while_fanning_out_still_refreshes_the_kept_connections(
    deployed: Deployed, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by the review: the fan-out ran before the sweep's own refreshes, and one timed-out SendMessageBatch
    raised out of the sweep: none of the connections it kept was refreshed and nothing was reported."""
    sqs_fan_out(deployed, monkeypatch, fan_out_above=1)
    for name in ("a", "b", "c"):
        deployed.world.add(name)
    deployed.clock.advance(1500)
    before = deployed.emulator.token_requests()
    assert deployed.sweep() == {"refreshed": 1, "failed": 2}
    assert deployed.emulator.token_requests() - before == 1
    unqueued = [o for o in deployed.outcomes if o.result == "failed"]
    assert all("could not be queued" in (o.detail or "") for o in unqueued)
    deployed.clock.advance(300)
    assert deployed.sweep() == {"refreshed": 1, "queued": 1, "not_due": 1}  # the next sweep queues again


def test_an_sqs_timeout_for_deferred_connections_keeps_the_sweeps_report(
    deployed: Deployed, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by the review: the deferred connections' fan-out raised at the end of the sweep, so no outcome
    was reported: a write_failed (a rotated token at risk) in that sweep never reached its alarm."""
    sqs_fan_out(deployed, monkeypatch, refresh_concurrency=1)
    deployed.emulator.rotate_refresh_tokens = True
    for name in ("a", "b"):
        deployed.world.add(name)
    deployed.clock.advance(1500)
    undo = deployed.refuse({"PutSecretValue"})

    class RunningOut(FakeContext):
        """Time for the first refresh only."""

        asked = 0

        def get_remaining_time_in_millis(self) -> int:
            RunningOut.asked += 1
            return 240_000 if RunningOut.asked == 1 else 10_000

    counts = deployed.handler.lambda_handler(json.loads((EVENTS / "schedule.json").read_text()), RunningOut())
    undo()
    assert counts == {"write_failed": 1, "deferred": 1}


def test_a_listing_page_that_times_out_costs_only_the_connections_not_listed(
    deployed: Deployed, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by the review: a ListSecrets page that timed out (or was throttled past botocore's retries) raised
    out of the sweep, so the due connections of the pages already listed were not refreshed either. They are now
    refreshed and reported; then the invocation fails, so a listing that keeps failing still alarms."""
    import core.sweep

    monkeypatch.setattr(core.sweep, "LIST_PAGE_SIZE", 1)  # one connection per page
    for name in ("a", "b"):
        deployed.world.add(name)
    deployed.clock.advance(1500)
    pages: list[str] = []

    def second_page_times_out(model: Any, **_: Any) -> None:
        pages.append(model.name)
        if len(pages) == 2:
            raise ReadTimeoutError(endpoint_url="https://secretsmanager.us-east-1.amazonaws.com/")

    deployed.client.meta.events.register("before-call.secrets-manager.ListSecrets", second_page_times_out)
    with pytest.raises(deployed.handler.ListingIncomplete):  # reported, then failed: RefreshErrorsAlarm sees it
        deployed.sweep()
    assert sorted(o.result for o in deployed.outcomes) == ["failed", "refreshed"]
    [listing] = [o for o in deployed.outcomes if o.result == "failed"]
    assert listing.connection == "(listing)" and "could not list" in (listing.detail or "")
    deployed.client.meta.events.unregister("before-call.secrets-manager.ListSecrets", second_page_times_out)
    deployed.clock.advance(300)
    assert deployed.sweep() == {"refreshed": 1, "not_due": 1}


def test_a_read_at_awscurrent_that_times_out_costs_only_its_connection_a_sweep(deployed: Deployed) -> None:
    """Found by the review: when a batch read answers with a version that is not AWSCURRENT (moto does after a
    stage move) the sweep reads AWSCURRENT itself, and a timeout there raised out of the whole sweep."""
    for name in ("a", "b"):
        deployed.world.add(name)
    deployed.clock.advance(1500)
    assert deployed.sweep() == {"refreshed": 2}
    deployed.clock.advance(1500)
    timed_out = time_out_once(deployed.client, "before-call.secrets-manager.GetSecretValue")
    counts = deployed.sweep()
    assert timed_out == ["GetSecretValue"], "the batch read answered AWSCURRENT: the fallback was not taken"
    assert counts == {"refreshed": 1, "failed": 1}


def consent_meanwhile(deployed: Deployed) -> Any:
    """A consent (a password grant stands in for the code exchange) stored between a refresh's read and write."""
    token = deployed.world.client.password_grant(
        OAuthApp(deployed.emulator.url, CLIENT_ID, CLIENT_SECRET), username=USER, password=PASSWORD
    )
    now = deployed.clock.now()
    return deployed.world.store.update(
        "prod", lambda c: replace(c.with_token(token, grant="authorization_code", now=now), status="active")
    )


@pytest.mark.parametrize("lost", ["re-read times out", "stage move answer lost"])
def test_a_rotated_token_that_lost_a_race_to_a_consent_is_revoked_even_after_a_timeout(
    deployed: Deployed, lost: str
) -> None:
    """Found by the review: a refresh (rotating mode) lost its race to a consent. Its rotated token waits in a
    candidate; only the path that re-read the winner at once revoked it. When that re-read timed out, or the
    refused stage move's answer was lost (reported as a write the next run adopts), the next run cleared the
    candidate it could not adopt and left its refresh token live and stored nowhere. Clearing it revokes it."""
    deployed.emulator.rotate_refresh_tokens = True
    deployed.world.add()
    deployed.clock.advance(1500)
    raced: list[str] = []

    def consent_writes_first(model: Any, **_: Any) -> None:
        if not raced:
            raced.append(consent_meanwhile(deployed).connection.refresh_token or "")
            if lost == "re-read times out":
                time_out_once(deployed.client, "before-call.secrets-manager.GetSecretValue")
            else:
                time_out_once(deployed.client, "after-call.secrets-manager.UpdateSecretVersionStage")

    deployed.client.meta.events.register("before-call.secrets-manager.PutSecretValue", consent_writes_first)
    deployed.sweep()
    deployed.client.meta.events.unregister("before-call.secrets-manager.PutSecretValue", consent_writes_first)
    deployed.clock.advance(300)
    deployed.sweep()
    assert deployed.document()["refreshToken"] == raced[0]  # the consent's tokens stand
    assert deployed.emulator.live_refresh_tokens() == {raced[0]}, "a live refresh token is stored nowhere"


def test_a_worker_refresh_that_fails_unexpectedly_is_recorded_and_backs_off(
    deployed: Deployed, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by the review: the SQS worker called `refresh` without the sweep's guard, so an AWS call that timed
    out mid-refresh (here the re-read before marking a refusal) raised: no health, no backoff, and SQS delivered
    the record again up to five times. It is now a transient failure in the health tags, as in the sweep."""
    worker = deployed_worker(deployed, monkeypatch)
    deployed.world.add()
    deployed.emulator.set_client_secret(CLIENT_ID, "changed-in-servicenow")
    deployed.clock.advance(1500)
    reads: list[str] = []

    def the_second_read_times_out(model: Any, **_: Any) -> None:
        reads.append(model.name)
        if len(reads) == 2:  # the first is the worker's own read; the second the re-check before the mark
            raise ReadTimeoutError(endpoint_url="https://secretsmanager.us-east-1.amazonaws.com/")

    deployed.client.meta.events.register("before-call.secrets-manager.GetSecretValue", the_second_read_times_out)
    try:
        answer = worker.lambda_handler({"Records": [queued_record("prod")]}, FakeContext(remaining_ms=300_000))
    finally:
        deployed.client.meta.events.unregister("before-call.secrets-manager.GetSecretValue", the_second_read_times_out)
    assert len(reads) >= 2
    assert answer == {"batchItemFailures": []}
    assert deployed.health().consecutive_failures == 1 and deployed.health().next_attempt is not None


@pytest.mark.parametrize("rotating", [False, True])
def test_a_consent_written_between_a_read_and_its_describe_is_never_revoked(
    deployed: Deployed, monkeypatch: pytest.MonkeyPatch, rotating: bool
) -> None:
    """Found by the second review: `get_latest` reads the value, then DescribeSecret; a consent landing between
    the two showed up as a candidate that was not the version read, and clearing it revoked the refresh token
    the consent had just stored. Only a refresh's candidate (marked) is revoked, never a token AWSCURRENT holds."""
    deployed.emulator.rotate_refresh_tokens = rotating
    deployed.world.add()
    worker = deployed_worker(deployed, monkeypatch)
    consented: list[str] = []

    def consent_between_get_and_describe(model: Any, **_: Any) -> None:
        if not consented:
            consented.append(consent_meanwhile(deployed).connection.refresh_token or "")

    deployed.client.meta.events.register("before-call.secrets-manager.DescribeSecret", consent_between_get_and_describe)
    deployed.clock.advance(1500)
    try:
        worker.refresh_record(SQSRecord(queued_record("prod")), FakeContext(remaining_ms=300_000))
    finally:
        deployed.client.meta.events.unregister(
            "before-call.secrets-manager.DescribeSecret", consent_between_get_and_describe
        )
    assert deployed.live(deployed.document()["refreshToken"]), "AWSCURRENT's refresh token was revoked"
    deployed.clock.advance(3000)
    assert deployed.sweep() == {"refreshed": 1}


@pytest.mark.parametrize("rotating", [False, True])
def test_a_sweep_between_a_consents_write_and_its_stage_move_never_revokes_it(
    deployed: Deployed, rotating: bool
) -> None:
    """Found by the second review: a consent's new version waits under the candidate label until its stage move
    lands; a sweep reading the connection in between cleared it and revoked its refresh token, which the consent
    then made AWSCURRENT."""
    deployed.emulator.rotate_refresh_tokens = rotating
    deployed.world.add()
    deployed.clock.advance(1500)
    consent_client = deployed.world.store.client
    swept: list[Any] = []

    def sweep_now(params: dict[str, Any], **_: Any) -> None:
        if not swept and params.get("VersionStage") == "AWSCURRENT":
            swept.append(deployed.sweep())

    event = "before-parameter-build.secrets-manager.UpdateSecretVersionStage"
    consent_client.meta.events.register(event, sweep_now)
    try:
        consent_meanwhile(deployed)
    finally:
        consent_client.meta.events.unregister(event, sweep_now)
    assert swept
    assert deployed.live(deployed.document()["refreshToken"]), "AWSCURRENT's refresh token was revoked"
    deployed.clock.advance(3000)
    assert deployed.sweep() == {"refreshed": 1} and deployed.document()["status"] == "active"


@pytest.mark.parametrize("rotating", [True, False])
def test_a_refreshs_candidate_under_way_is_never_revoked_from_a_stale_read(deployed: Deployed, rotating: bool) -> None:
    """Found by the third review: a `get_latest` whose value read predates a write (a consent, then another
    container's refresh staging its candidate on it) took that candidate for a superseded one and revoked its
    refresh token, which the other container then promoted to AWSCURRENT. When the value read and the stages
    disagree, nothing is cleared or revoked: the next run decides."""
    deployed.emulator.rotate_refresh_tokens = rotating
    deployed.world.add()
    deployed.clock.advance(1500)
    a_store = deployed.world.store  # container A (another client)
    pending: dict[str, Any] = {}

    def meanwhile(model: Any, **_: Any) -> None:
        if pending:
            return
        # 1. a consent (or any write) lands after B's GetSecretValue
        consent_meanwhile(deployed)
        # 2. container A reads it, refreshes, and stages its candidate (compare_and_swap's put) ...
        read = a_store.get("prod")
        app = OAuthApp(deployed.emulator.url, CLIENT_ID, CLIENT_SECRET)
        token = deployed.world.client.refresh(app, read.connection.refresh_token, replay=False)
        new = read.connection.with_token(token, grant="refresh_token", now=deployed.clock.now())
        version = adoptable_token(read.version_id, read.connection.refresh_token)
        a_store.client.put_secret_value(
            SecretId=read.arn, ClientRequestToken=version, SecretString=new.to_json(), VersionStages=[CANDIDATE]
        )
        pending.update(read=read, new=new, version=version)

    b = deployed.handler.refresher.store  # container B: the worker's get_latest
    b.client.meta.events.register("before-call.secrets-manager.DescribeSecret", meanwhile)
    try:
        b_read = b.get_latest("prod")
    finally:
        b.client.meta.events.unregister("before-call.secrets-manager.DescribeSecret", meanwhile)
    assert b_read.version_id != pending["version"]
    # 3. ... and A's stage move (compare_and_swap's _promote) lands: AWSCURRENT is still A's base.
    written = a_store._promote(pending["read"], pending["new"], pending["version"])
    assert written.version_id == pending["version"]
    stored = deployed.document()["refreshToken"]
    assert deployed.live(stored), "AWSCURRENT's refresh token was revoked by B's _drop"
