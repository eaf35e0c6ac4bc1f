"""The life cycle under generated histories: faults, concurrency and operator actions combined, with the
README's guarantees checked after every step (see tests/lifecycle_model.py). Derandomized with a fixed
budget in `make test`; `make soak` runs the same machine for 100,000+ steps."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis.stateful import run_state_machine_as_test

from tests.lifecycle_model import LifecycleModel, Stats, replay_history

EXAMPLES = int(os.environ.get("LIFECYCLE_EXAMPLES", "60"))
STEPS = int(os.environ.get("LIFECYCLE_STEPS", "50"))


def test_life_cycle_keeps_every_guarantee_under_generated_histories(moto_server: str) -> None:
    LifecycleModel.moto_url = moto_server
    run_state_machine_as_test(
        LifecycleModel,
        settings=settings(
            max_examples=EXAMPLES,
            stateful_step_count=STEPS,
            derandomize=True,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
            phases=[Phase.explicit, Phase.generate] + ([] if os.environ.get("LIFECYCLE_NO_SHRINK") else [Phase.shrink]),
        ),
    )
    print(f"life cycle: {Stats.steps} steps, {Stats.checks} invariant checks, 0 violations")
    if EXAMPLES >= 60:
        assert Stats.steps >= 2000, f"only {Stats.steps} steps ran: raise LIFECYCLE_EXAMPLES"


FINDINGS = [line for line in (Path(__file__).parent / "soak_findings.txt").read_text().splitlines() if "→" in line]


@pytest.mark.parametrize("history", FINDINGS, ids=[f"finding-{n}" for n in range(len(FINDINGS))])
def test_each_soak_finding_replays_without_a_violation(moto_server: str, history: str) -> None:
    LifecycleModel.moto_url = moto_server
    assert replay_history(history) is None
