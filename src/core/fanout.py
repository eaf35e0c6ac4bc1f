"""Hands due connections to the SQS queue that the worker function drains (Lambda scales it, not a loop)."""

from __future__ import annotations

import json
from typing import Any

SQS_BATCH = 10  # SendMessageBatch's maximum


def send_connections(sqs: Any, queue_url: str, names: list[str]) -> None:
    """Queue one message per connection name (no secret material), retrying partial failures once.

    Raises:
        RuntimeError: some names could not be queued even after a retry (the next sweep picks them up).
    """
    for start in range(0, len(names), SQS_BATCH):
        entries = [
            {"Id": str(i), "MessageBody": json.dumps({"connection": name})}
            for i, name in enumerate(names[start : start + SQS_BATCH])
        ]
        for _ in range(2):
            answer = sqs.send_message_batch(QueueUrl=queue_url, Entries=entries)
            failed = {failure["Id"] for failure in answer.get("Failed", [])}
            entries = [entry for entry in entries if entry["Id"] in failed]
            if not entries:
                break
        if entries:
            raise RuntimeError(f"{len(entries)} connections could not be queued for refresh; the next sweep retries")


def connection_from_message(body: str) -> str:
    """The connection name in a queued message; anything else is a malformed message."""
    payload = json.loads(body)
    name = payload.get("connection") if isinstance(payload, dict) else None
    if not isinstance(name, str):
        raise ValueError("queue message has no connection name")
    return name
