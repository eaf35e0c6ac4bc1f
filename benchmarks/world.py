"""A bench world: a moto server process and the ServiceNow emulator, as in the tests, at scale."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import boto3
import requests
from botocore.config import Config

from core.clock import to_iso
from local.servicenow_emulator import ServiceNowEmulator

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


def populate(
    sm: Any, emulator: ServiceNowEmulator, count: int, *, due: int, now: datetime, name: str = "c"
) -> list[str]:
    """`count` consented connections with live emulator tokens; the first `due` expire within the leeway."""
    from core.servicenow import OAuthApp, ServiceNowClient, build_session

    client = ServiceNowClient(build_session())
    app = OAuthApp(emulator.url, CLIENT_ID, CLIENT_SECRET)
    names = []
    for index in range(count):
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
        names.append(f"{name}{index:05d}")
        sm.create_secret(Name=f"{PREFIX}{names[-1]}", SecretString=json.dumps(document))
    return names


def emulator(latency: float = 0.0) -> ServiceNowEmulator:
    server = ServiceNowEmulator().start()
    server.register_client(CLIENT_ID, CLIENT_SECRET, ["http://127.0.0.1/callback"])
    server.add_user(USER, PASSWORD)
    server.latency = latency
    return server


def now() -> datetime:
    return datetime.now(UTC)
