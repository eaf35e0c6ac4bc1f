"""Configuration, read once from the environment variables that template.yaml declares."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from core.allowlist import parse_allowed_hosts

DEFAULT_PREFIX = "servicenow-oauth/"
# Outside the connection prefix on purpose: IAM for connections never covers the signing key.
DEFAULT_STATE_KEY = "servicenow-oauth-state-key"


@dataclass(frozen=True)
class Settings:
    """Every knob the functions have; defaults are the documented ones."""

    secret_prefix: str = DEFAULT_PREFIX
    allowed_hosts: tuple[str, ...] = parse_allowed_hosts(None)
    state_key_secret_id: str = DEFAULT_STATE_KEY
    callback_url: str | None = None
    refresh_leeway_seconds: int = 600
    refresh_token_warning_days: int = 14
    refresh_concurrency: int = 8
    refresh_queue_url: str | None = None
    fan_out_above: int = 2000
    refresh_interval_minutes: int = 5
    failure_backoff_max_seconds: int = 3600
    failure_alert_after_seconds: int = 3600
    event_bus_name: str = "default"
    # The stack's own source, so two stacks in one account and region never take each other's events.
    event_source: str = "servicenow-oauth.servicenow-oauth"  # samconfig.toml's stack; template.yaml sets each own
    # The refresh queue's maxReceiveCount (template.yaml states both): the worker's last try at a record.
    max_receive_count: int = 5


def _int(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be a whole number, got {raw!r}") from None
    if value < 0:
        raise ValueError(f"environment variable {name} must not be negative")
    return value


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Build `Settings` from the environment (`os.environ` unless a mapping is given)."""
    env = os.environ if environ is None else environ
    prefix = env.get("CONNECTION_SECRET_PREFIX") or DEFAULT_PREFIX
    return Settings(
        secret_prefix=prefix,
        allowed_hosts=parse_allowed_hosts(env.get("SERVICENOW_ALLOWED_HOSTS")),
        state_key_secret_id=env.get("STATE_KEY_SECRET_ID") or DEFAULT_STATE_KEY,
        callback_url=env.get("CALLBACK_URL") or None,
        refresh_leeway_seconds=_int(env, "REFRESH_LEEWAY_SECONDS", 600),
        refresh_token_warning_days=_int(env, "REFRESH_TOKEN_WARNING_DAYS", 14),
        refresh_concurrency=max(1, _int(env, "REFRESH_CONCURRENCY", 8)),
        refresh_queue_url=env.get("REFRESH_QUEUE_URL") or None,
        fan_out_above=_int(env, "FAN_OUT_ABOVE", 2000),
        refresh_interval_minutes=max(1, _int(env, "REFRESH_INTERVAL_MINUTES", 5)),
        failure_backoff_max_seconds=_int(env, "FAILURE_BACKOFF_MAX_SECONDS", 3600),
        failure_alert_after_seconds=_int(env, "FAILURE_ALERT_AFTER_SECONDS", 3600),
        event_bus_name=env.get("EVENT_BUS_NAME") or "default",
        event_source=env.get("EVENT_SOURCE") or Settings.event_source,
        max_receive_count=max(1, _int(env, "MAX_RECEIVE_COUNT", 5)),
    )
