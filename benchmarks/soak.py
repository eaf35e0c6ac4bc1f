"""`make soak`: the life-cycle model (tests/lifecycle_model.py) for 100,000+ steps with fresh random seeds.

`make test` runs the same machine derandomized on a fixed budget; the soak explores histories that budget
never reaches. Each worker is its own process with its own moto server and emulator; a failing example is
recorded with the steps that led to it (as Hypothesis shrank them) and the soak goes on. The summary
replaces the soak section of benchmarks/RESULTS.md (`make bench` keeps it).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from contextlib import redirect_stdout
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.run import SOAK_END as END  # the markers make bench keeps
from benchmarks.run import SOAK_START as START

ROOT = Path(__file__).resolve().parent.parent


def worker(steps: int, shrink: bool) -> dict[str, Any]:
    """Run batches of generated histories until `steps` steps ran; returns what was covered and found."""
    sys.path[:0] = [str(ROOT / "src"), str(ROOT)]
    from hypothesis import HealthCheck, Phase, settings
    from hypothesis.stateful import run_state_machine_as_test

    from benchmarks.world import MotoProcess
    from tests.lifecycle_model import LifecycleModel, Stats

    moto = MotoProcess()
    LifecycleModel.moto_url = moto.url
    violations: list[dict[str, Any]] = []
    reported = 0
    batches = 0
    try:
        while Stats.steps < steps:
            batches += 1
            # Progress on stderr (the summary comes at the end): a long soak is otherwise silent for half an hour.
            print(f"soak worker {os.getpid()}: {Stats.steps:,} steps, {len(violations)} violations", file=sys.stderr)
            output = io.StringIO()
            try:
                with redirect_stdout(output):
                    run_state_machine_as_test(
                        LifecycleModel,
                        settings=settings(
                            max_examples=20,
                            stateful_step_count=50,
                            deadline=None,
                            database=None,
                            derandomize=False,
                            suppress_health_check=list(HealthCheck),
                            phases=[Phase.generate, Phase.shrink] if shrink else [Phase.generate],
                        ),
                    )
            except AssertionError as violation:
                violations.append({"invariant": str(violation).splitlines()[0], "steps": list(Stats.history)})
            except Exception as error:  # the code under test raised where it must not: a violation too, not a crash
                first = str(error).splitlines()[0] if str(error) else ""
                violations.append({"invariant": f"{type(error).__name__}: {first}", "steps": list(Stats.history)})
            if len(violations) > reported:  # at once, so a long soak's finding can be replayed while it goes on
                found = violations[-1]
                print(f"soak worker {os.getpid()}: violation: {found['invariant']}", file=sys.stderr)
                print(" → ".join(found["steps"]), file=sys.stderr, flush=True)
                reported = len(violations)
    finally:
        moto.stop()
    return {
        "steps": Stats.steps,
        "checks": Stats.checks,
        "batches": batches,
        "rules": dict(Stats.rules),
        "violations": violations,
    }


def replay(history: str) -> int:
    """`--replay FILE`: one recorded history, step by step, printing where it breaks (see lifecycle_model.replay)."""
    sys.path[:0] = [str(ROOT / "src"), str(ROOT)]
    from benchmarks.world import MotoProcess
    from tests.lifecycle_model import LifecycleModel, replay_history

    moto = MotoProcess()
    LifecycleModel.moto_url = moto.url
    try:
        violation = replay_history(history, echo=print)
    finally:
        moto.stop()
    print(f"violated: {violation}" if violation else "no violation")
    return 1 if violation else 0


def render(results: list[dict[str, Any]], seconds: float, command: str) -> str:
    steps = sum(r["steps"] for r in results)
    checks = sum(r["checks"] for r in results)
    rules: Counter[str] = Counter()
    for result in results:
        rules.update(result["rules"])
    violations = [v for r in results for v in r["violations"]]
    lines = [
        START,
        "## Life-cycle soak",
        "",
        f"- date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; command: `{command}`; took {seconds:.0f} s "
        f"in {len(results)} processes (each with its own moto server and emulator)",
        f"- **{steps:,} steps**, {checks:,} invariant checks, **{len(violations)} violations**",
        "- steps by rule: " + ", ".join(f"{name} {count:,}" for name, count in sorted(rules.items())),
    ]
    for violation in violations:
        lines.append(f"- violation: {violation['invariant']} after: {' → '.join(violation['steps'][-12:])}")
    lines.append(END)
    return "\n".join(lines) + "\n"


def write_section(path: Path, section: str) -> None:
    """Replace the soak section of RESULTS.md (or append it), leaving the bench's tables alone."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    if START in text and END in text:
        before, rest = text.split(START, 1)
        text = before + section + rest.split(END, 1)[1].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--no-shrink", action="store_true", help="report violations as found, unshrunk")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    parser.add_argument("--replay", metavar="FILE", help="replay one recorded history (a violation's steps)")
    args = parser.parse_args(argv)
    if args.replay:
        return replay(Path(args.replay).read_text())
    started = time.perf_counter()
    share = -(-args.steps // args.processes)
    with ProcessPoolExecutor(args.processes) as pool:
        results = list(pool.map(worker, [share] * args.processes, [not args.no_shrink] * args.processes))
    command = f"python -m benchmarks.soak --steps {args.steps}" + (" --no-shrink" if args.no_shrink else "")
    section = render(results, time.perf_counter() - started, command)
    write_section(Path(args.output), section)
    print(section)
    print(json.dumps([r["violations"] for r in results], indent=1))
    return 1 if any(r["violations"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
