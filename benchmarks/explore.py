"""`make explore`: every writer pair, both ServiceNow modes, every schedule within the bound (tests/explorer.py).

Runs the scenarios on every core (one moto and one emulator per process), prints one line per scenario and mode,
appends new findings to tests/explorer_findings.txt (which `make test` replays) and, with --results, writes the
figures into benchmarks/RESULTS.md. Exits 1 when any schedule broke a guarantee.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from tests.explorer import Explorer, Scenario, scenarios

FINDINGS = Path(__file__).resolve().parent.parent / "tests" / "explorer_findings.txt"
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
_explorer: Explorer | None = None


def _explore(job: tuple[str, str, int]) -> tuple[str, str, int, list[str], float]:
    global _explorer
    if _explorer is None:
        _explorer = Explorer().__enter__()  # one per worker process, for all its scenarios
    name, mode, bound = job
    started = time.perf_counter()
    runs, findings = _explorer.explore(Scenario.parse(name), mode, bound=bound)
    return name, mode, runs, findings, time.perf_counter() - started


def explore(bound: int, only: str | None, jobs: int) -> tuple[list[tuple[str, str, int, list[str], float]], float]:
    work = [(s.name, mode, bound) for s in scenarios() if not only or only in s.name for mode in s.modes]
    started = time.perf_counter()
    rows = []
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        for name, mode, runs, findings, seconds in pool.map(_explore, work):
            rows.append((name, mode, runs, findings, seconds))
            print(f"{name:28} {mode:8} {runs:6} schedules {len(findings):4} violations {seconds:7.1f} s", flush=True)
            for finding in findings:
                print(f"    {finding}", flush=True)
    return rows, time.perf_counter() - started


def record(findings: list[str]) -> None:
    known = FINDINGS.read_text().splitlines() if FINDINGS.exists() else []
    keys = {line.split("#")[0].strip() for line in known}
    new = [finding for finding in findings if finding.split("#")[0].strip() not in keys]
    if new:
        with FINDINGS.open("a") as out:
            out.writelines(f"{finding}\n" for finding in new)


def measure_moto(cycles: int = 100) -> tuple[float, float]:
    """Milliseconds per Secrets Manager call (a compare-and-swap cycle: put, describe, stage move, read) on moto in
    this process, as the explorer uses it, and on a moto server over HTTP, as the rest of the suite does."""
    import json
    import socket
    import subprocess

    import boto3
    import requests
    from moto import mock_aws

    def per_call(client: object) -> float:
        client.create_secret(Name="bench", SecretString="{}")  # type: ignore[attr-defined]
        started = time.perf_counter()
        for n in range(cycles):
            version = client.put_secret_value(  # type: ignore[attr-defined]
                SecretId="bench", SecretString=json.dumps({"n": n}), VersionStages=["SNOWCANDIDATE"]
            )["VersionId"]
            stages = client.describe_secret(SecretId="bench")["VersionIdsToStages"]  # type: ignore[attr-defined]
            current = next(v for v, labels in stages.items() if "AWSCURRENT" in labels)
            client.update_secret_version_stage(  # type: ignore[attr-defined]
                SecretId="bench", VersionStage="AWSCURRENT", MoveToVersionId=version, RemoveFromVersionId=current
            )
            client.get_secret_value(SecretId="bench", VersionStage="AWSCURRENT")  # type: ignore[attr-defined]
        return (time.perf_counter() - started) / (4 * cycles) * 1000

    endpoint = os.environ.pop("AWS_ENDPOINT_URL", None)
    try:
        with mock_aws():
            in_process = per_call(boto3.client("secretsmanager", region_name="us-east-1"))
    finally:
        if endpoint is not None:
            os.environ["AWS_ENDPOINT_URL"] = endpoint
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                requests.get(f"{url}/moto-api/", timeout=1)
                break
            except requests.RequestException:
                time.sleep(0.1)
        over_http = per_call(boto3.client("secretsmanager", region_name="us-east-1", endpoint_url=url))
    finally:
        server.terminate()
        server.wait(timeout=10)
    return in_process, over_http


def write_results(bound: int, rows: list[tuple[str, str, int, list[str], float]], seconds: float, jobs: int) -> None:
    in_process, over_http = measure_moto()
    head = "## Interleavings explored"
    lines = [
        head,
        "",
        f"`make explore` (tests/explorer.py, bound {bound}: every schedule of the writers of one connection with at "
        f"most {bound} deviations, a preemption or a fault each), {jobs} processes, {seconds / 60:.1f} minutes, "
        f"{sum(r[2] for r in rows):,} schedules, {sum(len(r[3]) for r in rows)} violations.",
        "",
        "The explorer runs moto in process (`mock_aws`: the same backend, so the same version-stage rules, and the "
        "session's moto server is never touched); in the same run a compare-and-swap cycle cost "
        f"{in_process:.2f} ms a call in process against {over_http:.2f} ms a call on a moto server over HTTP "
        f"({over_http / in_process:.1f}x).",
        "",
        "| writers | default: schedules | violations | rotating: schedules | violations |",
        "|---|---|---|---|---|",
    ]
    by_name: dict[str, dict[str, tuple[int, int]]] = {}
    for name, mode, runs, findings, _ in rows:
        by_name.setdefault(name, {})[mode] = (runs, len(findings))
    for name, modes in by_name.items():
        default, rotating = modes.get("default", (0, 0)), modes.get("rotating", (0, 0))
        lines.append(f"| {name} | {default[0]:,} | {default[1]} | {rotating[0]:,} | {rotating[1]} |")
    section = "\n".join(lines) + "\n"
    text = RESULTS.read_text() if RESULTS.exists() else ""
    if head in text:
        before, _, after = text.partition(head)
        rest = after.split("\n## ", 1)
        text = before + section + ("\n## " + rest[1] if len(rest) > 1 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    RESULTS.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bound", type=int, default=2)
    parser.add_argument("--only", help="scenarios whose name contains this")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--results", action="store_true", help="write the figures into benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    rows, seconds = explore(args.bound, args.only, args.jobs)
    findings = [finding for row in rows for finding in row[3]]
    record(findings)
    if args.results:
        write_results(args.bound, rows, seconds, args.jobs)
    print(f"{sum(r[2] for r in rows):,} schedules, {len(findings)} violations, {seconds:.0f} s")
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
