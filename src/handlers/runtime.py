"""Clients built once per Lambda container and shared by the handlers (not an entry point)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import botocore.session
from aws_lambda_powertools import Logger
from botocore.config import Config

from core.clock import utc_now
from core.redaction import RedactingFormatter, quiet_libraries
from core.store import ConnectionStore

if TYPE_CHECKING:
    from core.config import Settings
    from core.monitor import Monitor
    from core.refresh import Refresher

# botocore directly, not boto3: boto3's import drags in s3transfer (~200 ms of cold start here) for nothing.
_SESSION = botocore.session.get_session()
# The standard retry mode backs off on throttling (PutSecretValue shares 50 writes/s per region).
# botocore's "max_attempts" counts retries: 5 is 6 attempts in all ("total_max_attempts" counts them all).
AWS_CONFIG = Config(retries={"mode": "standard", "max_attempts": 5}, connect_timeout=3, read_timeout=10)
KMS_CONFIG = Config(retries={"mode": "standard", "total_max_attempts": 2}, connect_timeout=1, read_timeout=3)


def build_logger() -> Logger:
    """Every handler logs through Powertools with the redacting formatter, and the libraries' loggers stay at
    WARNING at any root level: no secret value reaches a log."""
    quiet_libraries()
    return Logger(logger_formatter=RedactingFormatter())


def build_store(settings: Settings) -> ConnectionStore:
    # One pooled connection per refresh thread (botocore's default pool holds 10), plus the sweep's own reads.
    client = aws_client("secretsmanager", max_pool_connections=max(10, settings.refresh_concurrency + 2))
    return ConnectionStore(client, prefix=settings.secret_prefix, allowed_hosts=settings.allowed_hosts)


def aws_client(service: str, *, max_pool_connections: int | None = None, config: Config = AWS_CONFIG) -> Any:
    """A client from the container's one botocore session (region and endpoint from the environment)."""
    if max_pool_connections is not None:
        config = config.merge(Config(max_pool_connections=max_pool_connections))
    return _SESSION.create_client(service, config=config)


class LazyClient:
    """A client created on first use: AppFlow's model costs cold-start time most sweeps never need."""

    def __init__(self, service: str, *, config: Config = AWS_CONFIG) -> None:
        self._service = service
        self._config = config
        self._client: Any = None

    def __getattr__(self, name: str) -> Any:
        if self._client is None:
            self._client = aws_client(self._service, config=self._config)
        return getattr(self._client, name)


def build_monitor(settings: Settings, secretsmanager: Any, logger: Any = None) -> Monitor:
    from core.lifecycle import RefreshPolicy
    from core.monitor import Monitor

    return Monitor(
        secretsmanager,
        LazyClient("events"),
        clock=utc_now,
        policy=RefreshPolicy.from_settings(settings),
        bus=settings.event_bus_name,
        source=settings.event_source,
        logger=logger,
    )


def build_refresher(settings: Settings, logger: Any = None) -> Refresher:
    # Imported here: only the refreshing handlers pay for them (the dashboard never imports requests).
    from core.appflow import AppFlowSync
    from core.jwt_bearer import KmsSigner
    from core.lifecycle import RefreshPolicy
    from core.refresh import Refresher
    from core.servicenow import ServiceNowClient, build_session

    store = build_store(settings)
    return Refresher(
        store,
        ServiceNowClient(build_session(pool_maxsize=settings.refresh_concurrency)),
        clock=utc_now,
        policy=RefreshPolicy.from_settings(settings),
        appflow=AppFlowSync(LazyClient("appflow"), store.client),
        monitor=build_monitor(settings, store.client, logger),
        # Created on the first JWT connection's refresh; short timeouts and 2 attempts, so the up to 3 signatures of
        # one refresh (a retry, a staged key) stay within its 75 s budget (template.yaml).
        signer=KmsSigner(LazyClient("kms", config=KMS_CONFIG)),
    )


class CachedSecret:
    """A secret value cached for `max_age` seconds (Powertools' parameters would import boto3 at cold start)."""

    def __init__(self, client: Any, secret_id: str, *, max_age: float) -> None:
        self._client = client
        self._secret_id = secret_id
        self._max_age = max_age
        self._value: bytes | None = None
        self._fetched = 0.0

    def get(self) -> bytes:
        if self._value is None or time.monotonic() - self._fetched > self._max_age:
            answer = self._client.get_secret_value(SecretId=self._secret_id, VersionStage="AWSCURRENT")
            self._value, self._fetched = answer["SecretString"].encode(), time.monotonic()
        return self._value
