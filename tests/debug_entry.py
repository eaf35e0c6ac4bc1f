"""Runs one entry point in a fresh interpreter with the root logger at DEBUG, as Lambda's `ApplicationLogLevel:
DEBUG` sets it, printing every log record to stdout (tests/test_debug_logs.py scans it for secret values).

    python -m tests.debug_entry '{"module": "handlers.refresh", "events": [{}]}'
    python -m tests.debug_entry '{"cli": ["refresh", "prod"]}'
    python -m tests.debug_entry '{"module": "handlers.callback", "consent": {...signed link query...}}'

`"unpin": true` plants the regression (the libraries' loggers back at NOTSET after the entry point is loaded), to
show that the scan would see what they print.
"""

from __future__ import annotations

import copy
import importlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from local.api import LocalLambdaContext

EVENTS = Path(__file__).resolve().parent.parent / "events"


def context() -> LocalLambdaContext:
    """A fresh invocation's context, with the sweep's 240 s."""
    return LocalLambdaContext(aws_request_id="debug-entry", function_name="debug", timeout_seconds=240)


def unpin() -> None:
    from core.redaction import LIBRARY_LOGGERS

    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET)


def http_event(template: str, path: str, query: dict[str, str], name: str | None = None) -> dict[str, Any]:
    event: dict[str, Any] = copy.deepcopy(json.loads((EVENTS / template).read_text()))
    event["rawPath"] = event["requestContext"]["http"]["path"] = path
    event["rawQueryString"] = urlencode(query)
    event["queryStringParameters"] = query
    if name is not None:
        event["pathParameters"] = {"name": name}
    return event


def consent(module: Any, name: str, link: dict[str, str]) -> None:
    """The whole consent: the signed link, the person's Allow on the emulator, ServiceNow's redirect."""
    from local.servicenow_emulator import press_consent

    started = module.lambda_handler(
        http_event("authorize.json", f"/connections/{name}/authorize", link, name), context()
    )
    redirect = press_consent(started["headers"]["Location"])
    answer = module.lambda_handler(http_event("callback.json", "/callback", redirect), context())
    print(json.dumps({"status": answer["statusCode"]}))


def main() -> int:
    spec = json.loads(sys.argv[1])
    os.environ["AWS_LAMBDA_LOG_LEVEL"] = "DEBUG"  # what Powertools reads under ApplicationLogLevel
    logging.basicConfig(level=logging.DEBUG, stream=sys.stdout, format="%(levelname)s %(name)s %(message)s")
    if "cli" in spec:
        from admin.cli import main as cli

        if spec.get("unpin"):
            import botocore.session

            botocore.session.Session.create_client = _unpinning(botocore.session.Session.create_client)
        code = cli(spec["cli"])
        print(f"ROOT-LEVEL {logging.getLogger().getEffectiveLevel()}")
        return code
    module = importlib.import_module(spec["module"])
    if spec.get("unpin"):
        unpin()
    if "consent" in spec:
        consent(module, spec["name"], spec["consent"])
    for event in spec.get("events", []):
        print(json.dumps(module.lambda_handler(event, context()), default=str)[:200])
    print(f"ROOT-LEVEL {logging.getLogger().getEffectiveLevel()}")  # the entry point did not raise it
    return 0


def _unpinning(create_client: Any) -> Any:
    """The CLI pins in `main`, then makes its clients: undo the pin at the first client, after it."""

    def create(*args: Any, **kwargs: Any) -> Any:
        unpin()
        return create_client(*args, **kwargs)

    return create


if __name__ == "__main__":
    sys.exit(main())
