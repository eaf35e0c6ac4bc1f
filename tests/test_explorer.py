"""Every writer pair explored at bound 1 (one preemption or one fault in each schedule), and every finding
`make explore` ever reported replayed: the README's guarantees hold in each (tests/explorer.py).

`make explore` runs bound 2 for every pair (benchmarks/RESULTS.md has its figures)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import pytest

import tests.explorer
from core.servicenow import ServiceNowClient
from core.store import ConnectionStore, StoredConnection
from tests.explorer import Explorer, Scenario, describe, scenarios

FINDINGS = Path(__file__).with_name("explorer_findings.txt")
PAIRS = [(scenario, mode) for scenario in scenarios() for mode in scenario.modes]


@pytest.fixture(scope="module")
def explorer() -> Iterator[Explorer]:
    with Explorer() as running:
        yield running


@pytest.mark.parametrize(("scenario", "mode"), PAIRS, ids=[f"{s.name}-{m}" for s, m in PAIRS])
def test_every_schedule_within_one_deviation_keeps_the_guarantees(
    explorer: Explorer, scenario: Scenario, mode: str
) -> None:
    runs, findings = explorer.explore(scenario, mode, bound=1)
    assert runs > 1, "nothing was explored"
    assert not findings, "\n".join(findings)


def _findings() -> list[str]:
    lines = FINDINGS.read_text().splitlines() if FINDINGS.exists() else []
    return [line for line in lines if line.strip() and not line.startswith("#")]


@pytest.mark.parametrize("finding", _findings())
def test_every_reported_schedule_now_keeps_the_guarantees(explorer: Explorer, finding: str) -> None:
    run = explorer.replay(finding)
    assert run.problem is None, f"{run.problem}\n{describe(run)}"


def test_the_explorer_finds_a_race_the_model_never_sampled(explorer: Explorer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The revoke as it was before issue #30: revoke at ServiceNow, then clear whatever the secret holds by then.
    One preemption (a rotating refresh landing between the two) is enough for the explorer to show a live refresh
    token stored nowhere; the 100,000-step soak never produced it."""

    def old_revoke(store: ConnectionStore, client: ServiceNowClient, name: str, now: datetime) -> StoredConnection:
        read = store.get_latest(name)
        for token in (read.connection.refresh_token, read.connection.access_token):
            if token:
                client.revoke(read.connection.app, token)
        return store.update(
            name, lambda c: replace(c, access_token=None, refresh_token=None, status="reauthorization_required")
        )

    monkeypatch.setattr(tests.explorer, "revoke_connection", old_revoke)
    _, findings = explorer.explore(Scenario("code", ("sweep", "revoke")), "rotating", bound=1)
    assert any("live refresh token(s) stored nowhere" in finding for finding in findings), findings
