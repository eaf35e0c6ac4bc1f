"""A bench world: a moto server process and the ServiceNow emulator, as in the tests, at scale."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import boto3
import requests
from botocore.config import Config

from core.clock import to_iso

REGION = "us-east-1"
PREFIX = "servicenow-oauth/"
CLIENT_ID, CLIENT_SECRET = "bench-client", "bench-client-secret-1"
USER, PASSWORD = "svc.bench", "bench-password-1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class MotoProcess:
    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                requests.get(f"{self.url}/moto-api/", timeout=1)
                break
            except requests.RequestException:
                if time.monotonic() > deadline:
                    raise RuntimeError("moto did not start") from None
                time.sleep(0.1)
        os.environ.update(
            AWS_ENDPOINT_URL=self.url,
            AWS_DEFAULT_REGION=REGION,
            AWS_ACCESS_KEY_ID="bench",
            AWS_SECRET_ACCESS_KEY="bench",
            SERVICENOW_ALLOWED_HOSTS="127.0.0.1",
            POWERTOOLS_SERVICE_NAME="servicenow-oauth",
            POWERTOOLS_METRICS_NAMESPACE="ServiceNowOAuth",
            POWERTOOLS_METRICS_DISABLED="true",
            POWERTOOLS_LOG_LEVEL="ERROR",
        )

    def reset(self) -> None:
        requests.post(f"{self.url}/moto-api/reset", timeout=30).raise_for_status()

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


class CallCounter:
    """Counts API calls a botocore client makes, by operation name."""

    def __init__(self, client: Any) -> None:
        self.calls: Counter[str] = Counter()
        client.meta.events.register("before-call.*.*", self._count)

    def _count(self, model: Any, **_: Any) -> None:
        self.calls[model.name] += 1


def secretsmanager() -> Any:
    return boto3.client("secretsmanager", region_name=REGION, config=Config(max_pool_connections=64))


def populate(sm: Any, emulator: Any, count: int, *, due: int, now: datetime, name: str = "c") -> list[str]:
    """`count` consented connections with live emulator tokens; the first `due` expire within the leeway.

    Built with 16 threads: setting up 10,000 secrets one by one would dominate the bench's time.
    """
    from concurrent.futures import ThreadPoolExecutor

    from core.servicenow import OAuthApp, ServiceNowClient, build_session

    client = ServiceNowClient(build_session(pool_maxsize=16))
    app = OAuthApp(emulator.url, CLIENT_ID, CLIENT_SECRET)
    writing = threading.Lock()  # moto in-process is not thread-safe; the token grants still overlap

    def create(index: int) -> str:
        token = client.password_grant(app, username=USER, password=PASSWORD)
        expires = now + (timedelta(seconds=120) if index < due else timedelta(seconds=1700))
        document = {
            "instanceUrl": emulator.url,
            "clientId": CLIENT_ID,
            "clientSecret": CLIENT_SECRET,
            "status": "active",
            "accessToken": token.access_token,
            "refreshToken": token.refresh_token,
            "tokenType": "Bearer",
            "accessTokenExpiresAt": to_iso(expires),
            "refreshTokenExpiresAt": to_iso(now + timedelta(days=90)),
        }
        connection = f"{name}{index:05d}"
        with writing:
            sm.create_secret(Name=f"{PREFIX}{connection}", SecretString=json.dumps(document))
        return connection

    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(create, range(count)))


@contextmanager
def in_process_aws() -> Iterator[None]:
    """moto's same backends in this process (no HTTP, no server-wide lock): for figures about our own
    concurrency, where the moto server's serialised request handling would be the thing measured."""
    from moto import mock_aws
    from moto.secretsmanager.models import SecretsStore

    saved = os.environ.pop("AWS_ENDPOINT_URL", None)
    originals = {name: getattr(SecretsStore, name) for name in ("__getitem__", "__contains__", "get")}

    def indexed(name: str) -> Any:
        # moto finds a secret by scanning all of them (O(n) per call: hours at 10,000); AWS does not.
        # Same answers, found by name, or by the name inside a full ARN, before falling back to moto's scan.
        slow = originals[name]

        def lookup(self: Any, key: str) -> Any:
            hit = dict.get(self, key)
            if hit is None and key.startswith("arn:") and ":secret:" in key:
                candidate = dict.get(self, key.split(":secret:", 1)[1][:-7])
                hit = candidate if candidate is not None and candidate.arn == key else None
            if hit is not None:
                return True if name == "__contains__" else hit
            return slow(self, key)

        return lookup

    try:
        for name in originals:
            setattr(SecretsStore, name, indexed(name))
        with mock_aws():
            yield
    finally:
        for name, original in originals.items():
            setattr(SecretsStore, name, original)
        if saved is not None:
            os.environ["AWS_ENDPOINT_URL"] = saved


class EmulatorProcess:
    """The emulator in its own process, as a real instance would be: in-process it would compete with
    the code under test for the GIL, and that contention would be what a throughput figure measured."""

    def __init__(self) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "BENCH_CLIENT_SECRET": CLIENT_SECRET}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "local.servicenow_emulator", "--port", str(port), "--client-id", CLIENT_ID,
             "--client-secret-env", "BENCH_CLIENT_SECRET", "--redirect-uri", "http://127.0.0.1/callback"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while True:
            try:
                requests.get(f"{self.url}/_emulator/stats", timeout=1).raise_for_status()
                break
            except requests.RequestException:
                if time.monotonic() > deadline:
                    raise RuntimeError("emulator did not start") from None
                time.sleep(0.1)
        self._admin("users", {"username": USER, "password": PASSWORD})

    def _admin(self, what: str, body: dict[str, Any]) -> None:
        requests.post(f"{self.url}/_emulator/{what}", json=body, timeout=5).raise_for_status()

    @property
    def latency(self) -> float:
        return 0.0

    @latency.setter
    def latency(self, seconds: float) -> None:
        self._admin("settings", {"latency": seconds})

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


def emulator(latency: float = 0.0) -> Any:
    server = EmulatorProcess()
    server.latency = latency
    return server


def now() -> datetime:
    return datetime.now(UTC)
