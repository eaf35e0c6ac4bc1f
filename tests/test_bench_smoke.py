"""`make bench` is not part of the pass/fail of `make test`, but its harness must run: a smoke run at tiny sizes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_harness_runs_at_tiny_sizes(tmp_path: Path) -> None:
    output = tmp_path / "RESULTS.md"
    env = {key: value for key, value in os.environ.items() if not key.startswith("AWS_")}
    env["PYTHONPATH"] = f"{ROOT / 'src'}{os.pathsep}{ROOT}"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--smoke", "--output", str(output)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    table = output.read_text()
    for section in ("Cold start", "Sweep cost", "Throughput", "Fan-out", "Failure cost"):
        assert f"| {section} |" in table
    assert "naive" in table and "floor" in table  # every figure beside its reference
