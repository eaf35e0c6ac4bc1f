"""`make demo` is the README's main-job command: it must run the whole life of a connection and exit 0."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_demo_walks_consent_and_refresh_and_exits_zero() -> None:
    env = {key: value for key, value in os.environ.items() if not key.startswith("AWS_")}
    env["PYTHONPATH"] = f"{ROOT / 'src'}{os.pathsep}{ROOT}"
    result = subprocess.run(
        [sys.executable, "-m", "local.demo"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert any("is authorized" in line for line in lines)
    assert any("sweep 1: {'refreshed': 1}" in line for line in lines)
    assert any("sweep 2: {'not_due': 1}" in line and "(no write)" in line for line in lines)
    assert "Traceback" not in result.stderr
