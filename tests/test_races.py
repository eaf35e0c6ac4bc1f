"""The violations the interleaving explorer found (issue #30), each pinned as one schedule written by hand.

Each test runs the real writers in the explorer's world (moto in process, the emulator on 127.0.0.1) under a
`Script`: a writer runs until a named call, another runs, and so on. Then the explorer's checks: no live refresh
token stored nowhere, a day of sweeps after which the connection is healthy (or parked only where ServiceNow
refuses what is stored) within 40 token requests, and events that tell the truth. Every test fails on the code
before the fixes (c201ef5); `tests/test_explorer.py` explores every schedule around them.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
from botocore.exceptions import ReadTimeoutError

from tests.explorer import SECRET, Container, Explorer, Scenario, Script, Step, Sweep

# The revoke (task 2) runs until it has revoked the refresh and the access token at ServiceNow, and stops before
# its clearing write.
REVOKED_NOT_CLEARED = (
    Step("2.revoke", "ServiceNow POST /oauth_revoke_token.do", nth=2),
    Step("2.revoke", "PutSecretValue sent"),
)


@pytest.fixture(scope="module")
def explorer() -> Iterator[Explorer]:
    with Explorer() as running:
        yield running


def test_two_refreshers_of_a_rotating_token_never_park_a_healthy_connection(explorer: Explorer) -> None:
    """Violation 1: the sweep spends RT1 (ServiceNow rotates it to RT2); before its write lands, the worker's
    request with RT1 is refused, its re-read still shows RT1, and it marks the connection. The sweep's write then
    lands on top. The worker's health tags (needs-person) used to survive beside the sweep's fresh version, so
    every sweep answered needs_person and the access token expired; and the operator was paged for nothing."""
    script = Script(Step("1.sweep", "PutSecretValue sent"), Step("2.worker"), Step("1.sweep"))
    run = explorer.run(Scenario("code", ("sweep", "worker")), "rotating", script=script)
    assert run.problem is None, run.problem
    assert "reauthorization_required" not in explorer.world.events, explorer.world.events


def test_a_revoke_racing_a_rotating_refresh_leaves_no_live_token_behind(explorer: Explorer) -> None:
    """Violation 2: the sweep rotates RT1 -> RT2 between the revoke's calls to ServiceNow (RT1 and its access
    token) and its clearing write, which cleared RT2 without revoking it: live for up to 100 days, stored nowhere."""
    script = Script(Step("1.sweep", "PutSecretValue sent"), *REVOKED_NOT_CLEARED, Step("1.sweep"), Step("2.revoke"))
    run = explorer.run(Scenario("code", ("sweep", "revoke")), "rotating", script=script)
    assert run.problem is None, run.problem


@pytest.mark.parametrize("writer", ["stage_secret", "callback"])
def test_another_writers_put_never_takes_the_label_off_a_waiting_refresh(explorer: Explorer, writer: str) -> None:
    """Violation 3: a CLI write (or a consent) reads the secret; a refresh then puts its candidate (RT2); the
    writer's put took the SNOWCANDIDATE label onto its own version; the refresh's stage move timed out and it
    reported its tokens "wait in a candidate the next run adopts", in a version nothing adopted. CLI: parked for
    a re-consent; consent: RT2 live and stored nowhere."""
    script = Script(
        Step(f"2.{writer}", "PutSecretValue sent"),
        Step("1.sweep", "UpdateSecretVersionStage sent", fault="timeout"),
        Step(f"2.{writer}"),
        Step("1.sweep"),
    )
    run = explorer.run(Scenario("code", ("sweep", writer)), "rotating", script=script)
    assert run.problem is None, run.problem


def test_a_jwt_rollover_whose_staged_key_cannot_sign_is_marked_not_retried(explorer: Explorer) -> None:
    """Violation 4: ServiceNow refuses the current key, the staged client secret is not live yet and KMS refuses
    to sign with the staged key (its key policy not updated). The KMS error was a "failed" outcome that ended the
    rollover loop: the 401 hidden, status active, and every attempt spent 2 token requests (55 in the day)."""
    run = explorer.run(Scenario("jwt_refused", ("sweep",)), "default", script=Script(Step("1.sweep")))
    assert run.problem is None, run.problem
    assert explorer.world.events[-1:] == ["reauthorization_required"], explorer.world.events


def test_two_refreshers_refused_together_page_once(explorer: Explorer) -> None:
    """Found beside them: two sweeps (EventBridge delivers at least once) both refused; each announced the refusal
    it saw. The page now goes out from the first run that finds the mark standing, once."""
    script = Script(Step("1.sweep", "TagResource sent"), Step("2.sweep"), Step("1.sweep"))
    run = explorer.run(Scenario("refused", ("sweep", "sweep")), "default", script=script)
    assert run.problem is None, run.problem
    assert explorer.world.events.count("reauthorization_required") == 1, explorer.world.events


def test_a_revoke_racing_a_consent_revokes_what_it_clears(explorer: Explorer) -> None:
    """Found beside them: a consent stored new tokens between the revoke's calls to ServiceNow and its clearing
    write, which cleared them unrevoked."""
    script = Script(*REVOKED_NOT_CLEARED, Step("1.callback"), Step("2.revoke"))
    run = explorer.run(Scenario("code", ("callback", "revoke")), "default", script=script)
    assert run.problem is None, run.problem


@pytest.mark.parametrize("fault", ["throttle", "timeout"])
def test_a_mark_whose_label_retire_failed_is_never_undone(explorer: Explorer, fault: str) -> None:
    """Found by the review of the fix for violation 3: the mark (a SNOWWRITE write) takes SNOWCANDIDATE off the
    refresh candidate it replaced; when that retire failed, the next run took the spent candidate for one waiting
    (default mode: it holds the same refresh token), rebased it over the mark, and asked ServiceNow again with the
    refused credential. A candidate that was AWSCURRENT once (AWSPREVIOUS) is now cleared, never adopted."""
    script = Script(Step("1.sweep", "UpdateSecretVersionStage sent", nth=2, fault=fault))
    run = explorer.run(Scenario("refused", ("sweep",)), "default", script=script)
    assert run.problem is None, run.problem


def test_a_paged_refusal_fixed_then_a_blip_still_announces_recovered(explorer: Explorer) -> None:
    """Found by the review: paged (one sweep marks, the next pages), the operator fixes the client secret, the
    retry of the fix meets the hibernation page (failing, backing off), the next retry succeeds: "recovered" only
    followed a refusal that was still refused, so the person paged never heard the connection recovered."""
    script = Script(
        Step("1.sweep"),
        Step("2.sweep"),
        Step("3.fix_secret"),
        Step("4.sweep", "ServiceNow POST /oauth_token.do", fault="hibernate"),
        Step("4.sweep"),
    )
    run = explorer.run(Scenario("refused", ("sweep", "sweep", "fix_secret", "sweep")), "default", script=script)
    assert run.problem is None, (run.problem, explorer.world.events)
    assert explorer.world.events[-2:] == ["reauthorization_required", "recovered"], explorer.world.events


def test_a_console_save_of_an_older_value_still_gets_the_rotated_token(explorer: Explorer) -> None:
    """Found by the review of the spent-candidate rule: the operator opens the secret in the console (RT0), a sweep
    refreshes (RT0 -> RT1, its candidate promoted, keeping SNOWCANDIDATE), the operator saves the older value. The
    candidate now carries AWSPREVIOUS, but it holds RT1, the only live refresh token, which the save lacks: it is
    written onto the save, never cleared as spent."""
    with explorer.fresh(Scenario("code", ("sweep",)), "rotating") as setup:
        world, plain = setup.world, setup.world.plain
        opened = plain.get_secret_value(SecretId=SECRET, VersionStage="AWSCURRENT")  # the console's Edit
        assert [outcome.result for outcome in Sweep(Container(world).refresher).run()] == ["refreshed"]
        stages = plain.describe_secret(SecretId=SECRET)["VersionIdsToStages"]
        current = next(version for version, labels in stages.items() if "AWSCURRENT" in labels)
        saved = plain.put_secret_value(SecretId=SECRET, SecretString=opened["SecretString"], VersionStages=["CONSOLE"])
        plain.update_secret_version_stage(
            SecretId=SECRET, VersionStage="AWSCURRENT", MoveToVersionId=saved["VersionId"], RemoveFromVersionId=current
        )
        world.now += timedelta(minutes=5)
        Sweep(Container(world).refresher).run()
        look = explorer.look()
        explorer.no_unknown_live_token(setup, "after the next sweep", look)
        assert look.connection.status == "active"


def test_a_mark_landing_between_a_listing_and_its_read_is_not_undone(explorer: Explorer) -> None:
    """Found by the review of the spent-candidate rule: a sweep lists the connection (the refresh candidate that is
    AWSCURRENT still carries SNOWCANDIDATE) and stops before its batch read; another sweep is refused and marks it;
    the first reads the mark, but decided on its listing's stages: it rebased the spent candidate over the mark and
    asked ServiceNow again with the refused credential. A candidate is never adopted on a view whose stages and
    value disagree."""
    asked: list[int] = []
    script = Script(Step("2.sweep", "BatchGetSecretValue sent"), Step("1.sweep"), Step("2.sweep"))
    finished = script._finished

    def counted(task: str) -> None:
        asked.append(explorer.emulator.token_requests())
        finished(task)

    script._finished = counted  # type: ignore[method-assign]
    run = explorer.run(Scenario("refused", ("sweep", "sweep")), "default", script=script)
    assert run.problem is None, run.problem
    assert asked[1] == asked[0], f"the refused credential was asked {asked[1] - asked[0]} more time(s) after its mark"


def test_a_consent_that_failed_before_writing_revokes_its_tokens(explorer: Explorer) -> None:
    """Found by make explore: the callback's read of the secret timed out (nothing written), and so did its check
    of whether its write had landed (Secrets Manager's reads failing from then on): "cannot tell" kept the new
    tokens alive, stored nowhere. A failure before the write cannot have stored them: revoked without asking."""
    world = explorer.world

    def reads_time_out(**_: object) -> None:
        if world.scheduler is not None and world.scheduler.faults:  # from the injected timeout to the schedule's end
            raise ReadTimeoutError(endpoint_url="https://secretsmanager.us-east-1.amazonaws.com/")

    event = "before-call.secrets-manager.GetSecretValue"
    world.client("secretsmanager").meta.events.register(event, reads_time_out)
    try:
        script = Script(Step("1.callback", "DescribeSecret sent", fault="timeout"), Step("1.callback"))
        run = explorer.run(Scenario("code", ("callback",)), "default", script=script)
    finally:
        world.client("secretsmanager").meta.events.unregister(event, reads_time_out)
    assert run.errors == {"1.callback": "ReadTimeoutError"}, run.errors
    assert run.problem is None, run.problem
