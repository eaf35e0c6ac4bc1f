"""Redaction by construction: every handler's logger serialises through this, so a secret cannot reach a log.

The code already logs selected fields only; this is the second wall. It drops the values of known
secret keys wherever they appear (structures, JSON text, `key=value` text, form bodies) and masks
anything token-shaped (long, mixed-case, alphanumeric runs), keeping UUIDs, ARNs and timestamps.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from aws_lambda_powertools.logging.formatter import LambdaPowertoolsFormatter

REDACTED = "[REDACTED]"
SECRET_KEYS = frozenset(
    key.lower()
    for key in (
        "clientSecret", "client_secret", "clientSecretNext", "accessToken", "access_token", "refreshToken",
        "refresh_token", "password", "code", "code_verifier", "codeVerifier", "assertion", "token", "id_token",
        "authorization", "state", "signature", "SecretString", "SecretBinary", "key",
    )
)  # fmt: skip
# Libraries whose DEBUG lines carry secret values past any formatter of ours: botocore writes every request and
# answer body (SecretString, GetSecretValue's answer), urllib3 and requests every URL (a callback's code and state).
LIBRARY_LOGGERS = ("botocore", "boto3", "s3transfer", "urllib3", "requests", "aws_lambda_powertools")
_KEY_NAMES = "|".join(sorted((re.escape(k) for k in SECRET_KEYS), key=len, reverse=True))
# "clientSecret": "…"  /  clientSecret=…  /  Authorization: Bearer …
_KEY_VALUE = re.compile(
    rf"""(?ix)
    (?P<key>(?<![\w-])["']?(?:{_KEY_NAMES})["']?\s*[:=]\s*)
    (?P<value>"(?:[^"\\]|\\.)*"|'[^']*'|(?:bearer\s+)?[^\s&,;"'}}\]]+)
    """
)
_TOKEN = re.compile(r"(?<![\w\-~+/])[A-Za-z0-9_\-~+][A-Za-z0-9_\-~+/]{39,}={0,2}")


def _token_shaped(text: str) -> bool:
    return any(c.isupper() for c in text) and any(c.islower() for c in text) and any(c.isdigit() for c in text)


def redact_text(text: str) -> str:
    """Mask secret values inside free text (messages, exception text, JSON written as a string)."""
    stripped = text.strip()
    if stripped[:1] in "{[":
        try:
            return json.dumps(redact(json.loads(stripped)))
        except ValueError:
            pass
    text = _KEY_VALUE.sub(lambda m: m.group("key") + REDACTED, text)
    return _TOKEN.sub(lambda m: REDACTED if _token_shaped(m.group(0)) else m.group(0), text)


def redact(value: Any) -> Any:
    """A copy of `value` with secret keys' values and token-shaped strings replaced."""
    if isinstance(value, dict):
        return {k: REDACTED if str(k).lower() in SECRET_KEYS else redact(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [redact(item) for item in value]
    if isinstance(value, str):
        return redact_text(value)
    if value is None or isinstance(value, bool | int | float):
        return value
    # Anything else (an exception object in Powertools' stack_trace, a datetime) is written as str().
    return redact_text(str(value))


def quiet_libraries() -> None:
    """Keep the libraries' loggers at WARNING whatever the root logger's level. Lambda's `ApplicationLogLevel:
    DEBUG` (the first thing an operator tries) sets the root logger to DEBUG, and their records reach the runtime's
    own handler, never our redacting formatter. Every handler and the CLI call this before any AWS call."""
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


class RedactingFormatter(LambdaPowertoolsFormatter):
    """Powertools' JSON formatter with `redact` applied to the whole record before it is written."""

    def serialize(self, log: Any) -> str:
        return self.json_serializer(redact(log))
