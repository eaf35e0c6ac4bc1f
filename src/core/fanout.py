"""Hands due connections to the SQS queue that the worker function drains (Lambda scales it, not a loop)."""

from __future__ import annotations

import json
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

SQS_BATCH = 10  # SendMessageBatch's maximum


def send_connections(sqs: Any, queue_url: str, names: list[str]) -> list[str]:
    """Queue one message per connection name (no secret material), retrying partial failures once; returns the
    names that could not be queued (the sweep reports them, the next sweep tries again). SQS refusing or timing
    out a call (after botocore's retries) stops the queueing: the rest would only spend the sweep's time."""
    for start in range(0, len(names), SQS_BATCH):
        batch = names[start : start + SQS_BATCH]
        entries = [{"Id": str(i), "MessageBody": json.dumps({"connection": name})} for i, name in enumerate(batch)]
        try:
            for _ in range(2):
                answer = sqs.send_message_batch(QueueUrl=queue_url, Entries=entries)
                failed = {failure["Id"] for failure in answer.get("Failed", [])}
                entries = [entry for entry in entries if entry["Id"] in failed]
                if not entries:
                    break
        except (ClientError, BotoCoreError):
            pass  # `entries` still holds the ones this call was sending
        if entries:
            return [batch[int(entry["Id"])] for entry in entries] + names[start + SQS_BATCH :]
    return []


def connection_from_message(body: str) -> str:
    """The connection name in a queued message; anything else is a malformed message."""
    payload = json.loads(body)
    name = payload.get("connection") if isinstance(payload, dict) else None
    if not isinstance(name, str):
        raise ValueError("queue message has no connection name")
    return name
