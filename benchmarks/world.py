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
from uuid import uuid4

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

    def inject(self, fault: str, **options: Any) -> None:
        self._admin("faults", {"fault": fault, **options})

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


def emulator(latency: float = 0.0) -> Any:
    server = EmulatorProcess()
    server.latency = latency
    return server


def now() -> datetime:
    return datetime.now(UTC)


class SecretsManagerDouble:
    """Secrets Manager in this process with no cost of its own: the calls the sweep makes, with the version-stage
    semantics its compare-and-swap relies on (idempotent PutSecretValue by ClientRequestToken; a stage move refused
    with InvalidParameterException when RemoveFromVersionId no longer holds the stage). For the figure of our own
    overhead: the moto server's serialised writes would otherwise be what is measured. Not a test double: the tests
    run on moto."""

    def __init__(self) -> None:
        self.secrets: dict[str, dict[str, Any]] = {}  # name -> {"ARN", "versions": {id: value}, "stages", "tags"}
        self.by_arn: dict[str, str] = {}
        self.lock = threading.Lock()
        self.calls: Counter[str] = Counter()

    def _secret(self, secret_id: str) -> dict[str, Any]:
        secret = self.secrets.get(self.by_arn.get(secret_id, secret_id))
        if secret is None:
            raise _client_error("ResourceNotFoundException", "Secrets Manager can't find the specified secret.")
        return secret

    def _version(self, secret: dict[str, Any], stage: str = "AWSCURRENT") -> str:
        return next(version for version, labels in secret["stages"].items() if stage in labels)

    def create_secret(self, Name: str, SecretString: str, **_: Any) -> dict[str, Any]:
        self.calls["CreateSecret"] += 1
        version, arn = str(uuid4()), f"arn:aws:secretsmanager:{REGION}:123456789012:secret:{Name}-{uuid4().hex[:6]}"
        with self.lock:
            self.secrets[Name] = {
                "ARN": arn,
                "Name": Name,
                "versions": {version: SecretString},
                "stages": {version: ["AWSCURRENT"]},
                "tags": {},
            }
            self.by_arn[arn] = Name
        return {"ARN": arn, "Name": Name, "VersionId": version}

    def get_paginator(self, operation: str) -> Any:
        assert operation == "list_secrets", operation
        return self

    def paginate(self, Filters: list[dict[str, Any]], PaginationConfig: dict[str, int]) -> Iterator[dict[str, Any]]:
        prefix, size = Filters[0]["Values"][0], PaginationConfig["PageSize"]
        with self.lock:
            entries = [
                {
                    "ARN": s["ARN"],
                    "Name": s["Name"],
                    "Tags": [{"Key": k, "Value": v} for k, v in s["tags"].items()],
                    "SecretVersionsToStages": {v: list(labels) for v, labels in s["stages"].items()},
                }
                for name, s in sorted(self.secrets.items())
                if name.startswith(prefix)
            ]
        for start in range(0, len(entries), size):
            self.calls["ListSecrets"] += 1
            yield {"SecretList": entries[start : start + size]}

    def batch_get_secret_value(self, SecretIdList: list[str]) -> dict[str, Any]:
        self.calls["BatchGetSecretValue"] += 1
        values = []
        with self.lock:
            for secret_id in SecretIdList:
                secret = self._secret(secret_id)
                version = self._version(secret)
                values.append(
                    {
                        "ARN": secret["ARN"],
                        "Name": secret["Name"],
                        "VersionId": version,
                        "SecretString": secret["versions"][version],
                        "VersionStages": ["AWSCURRENT"],
                    }
                )
        return {"SecretValues": values, "Errors": []}

    def get_secret_value(
        self, SecretId: str, VersionStage: str | None = None, VersionId: str | None = None
    ) -> dict[str, Any]:
        self.calls["GetSecretValue"] += 1
        with self.lock:
            secret = self._secret(SecretId)
            version = VersionId or self._version(secret, VersionStage or "AWSCURRENT")
            return {
                "ARN": secret["ARN"],
                "Name": secret["Name"],
                "VersionId": version,
                "SecretString": secret["versions"][version],
                "VersionStages": secret["stages"][version],
            }

    def describe_secret(self, SecretId: str) -> dict[str, Any]:
        self.calls["DescribeSecret"] += 1
        with self.lock:
            secret = self._secret(SecretId)
            return {
                "ARN": secret["ARN"],
                "Name": secret["Name"],
                "Tags": [{"Key": k, "Value": v} for k, v in secret["tags"].items()],
                "VersionIdsToStages": {v: list(labels) for v, labels in secret["stages"].items()},
            }

    def put_secret_value(
        self, SecretId: str, ClientRequestToken: str, SecretString: str, VersionStages: list[str]
    ) -> dict[str, Any]:
        self.calls["PutSecretValue"] += 1
        with self.lock:
            secret = self._secret(SecretId)
            if ClientRequestToken in secret["versions"]:  # idempotent retry, as AWS does for the same value
                return {"ARN": secret["ARN"], "VersionId": ClientRequestToken}
            for labels in secret["stages"].values():  # a stage names one version at a time
                for stage in VersionStages:
                    if stage in labels:
                        labels.remove(stage)
            secret["versions"][ClientRequestToken] = SecretString
            secret["stages"][ClientRequestToken] = list(VersionStages)
        return {"ARN": secret["ARN"], "VersionId": ClientRequestToken}

    def update_secret_version_stage(
        self,
        SecretId: str,
        VersionStage: str,
        MoveToVersionId: str | None = None,
        RemoveFromVersionId: str | None = None,
    ) -> dict[str, Any]:
        self.calls["UpdateSecretVersionStage"] += 1
        with self.lock:
            secret = self._secret(SecretId)
            holder = next((v for v, labels in secret["stages"].items() if VersionStage in labels), None)
            if holder is not None and holder != RemoveFromVersionId and holder != MoveToVersionId:
                raise _client_error("InvalidParameterException", f"{VersionStage} is attached to another version")
            if holder is not None:
                secret["stages"][holder].remove(VersionStage)
            if MoveToVersionId is not None:
                secret["stages"][MoveToVersionId].append(VersionStage)
        return {"ARN": secret["ARN"], "Name": secret["Name"]}

    def tag_resource(self, SecretId: str, Tags: list[dict[str, str]]) -> None:
        self.calls["TagResource"] += 1
        with self.lock:
            self._secret(SecretId)["tags"].update({tag["Key"]: tag["Value"] for tag in Tags})

    def untag_resource(self, SecretId: str, TagKeys: list[str]) -> None:
        self.calls["UntagResource"] += 1
        with self.lock:
            tags = self._secret(SecretId)["tags"]
            for key in TagKeys:
                tags.pop(key, None)


def _client_error(code: str, message: str) -> Exception:
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": message}}, "SecretsManagerDouble")
