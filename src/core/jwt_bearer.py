"""The JWT bearer grant's assertion, signed by an AWS KMS key: the private key never leaves KMS.

ServiceNow's "OAuth JWT API endpoint for external clients" verifies an RS256 JWT against a certificate in
its JWT Verifier Map (chosen by the header's `kid`), matches `sub` to a user, and refuses a reused `jti`.
The JWT is built with the standard library; KMS signs its signing input (`RSASSA_PKCS1_V1_5_SHA_256` over
the raw message, which KMS hashes itself). No new runtime dependency, nothing but the assertion leaves here.
"""

from __future__ import annotations

import base64
import json
import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from core.errors import KeyUnusable, ProviderError, RateLimited, TransientProviderError

GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
SIGNING_ALGORITHM = "RSASSA_PKCS1_V1_5_SHA_256"  # JWS RS256
LIFETIME = timedelta(minutes=5)  # short: an assertion is used once, at once
# A key id, key ARN, alias name or alias ARN, as KMS's KeyId parameter takes them.
KMS_KEY_ID = re.compile(
    r"^(?:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|mrk-[0-9a-f]{32}|alias/[A-Za-z0-9/_-]{1,250}"
    r"|arn:aws[a-z-]*:kms:[a-z0-9-]+:\d{12}:(?:key/(?:[0-9a-f-]{36}|mrk-[0-9a-f]{32})|alias/[A-Za-z0-9/_-]{1,250}))$"
)
# KMS errors a later attempt may not see (the others need a person: a disabled key, a missing grant).
KMS_TRANSIENT = frozenset({"ThrottlingException", "KMSInternalException", "DependencyTimeoutException"})


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _segment(value: dict[str, Any]) -> str:
    return b64url(json.dumps(value, separators=(",", ":"), sort_keys=True).encode("utf-8"))


@dataclass(frozen=True)
class JwtKey:
    """Which KMS key signs, and the key id ServiceNow's verifier map knows its certificate by."""

    key_id: str  # the JWT header's `kid`
    kms_key_id: str


def signing_input(client_id: str, subject: str, key_id: str, now: datetime, jti: str | None = None) -> str:
    """`base64url(header).base64url(claims)`: `iss` and `aud` are the client id (ServiceNow's documented
    match), `sub` the user, a fresh `jti` each time (ServiceNow refuses a reused one by default)."""
    header = {"alg": "RS256", "typ": "JWT", "kid": key_id}
    issued = int(now.timestamp())
    claims = {
        "iss": client_id,
        "aud": client_id,
        "sub": subject,
        "iat": issued,
        "nbf": issued,
        "exp": issued + int(LIFETIME.total_seconds()),
        "jti": jti or str(uuid.uuid4()),
    }
    return f"{_segment(header)}.{_segment(claims)}"


class KmsSigner:
    """Signs assertions with `kms:Sign`; the KMS client is injected (moto in tests, built lazily in Lambda)."""

    def __init__(self, kms: Any) -> None:
        self.kms = kms

    def assertion(self, client_id: str, subject: str, key: JwtKey, now: datetime, *, host: str) -> str:
        """A signed JWT for one token request. KMS failures are raised as the provider error they amount to:
        throttling is retried on a later run; a disabled, deleted or unauthorised key needs a person."""
        unsigned = signing_input(client_id, subject, key.key_id, now)
        try:
            answer = self.kms.sign(
                KeyId=key.kms_key_id,
                Message=unsigned.encode("ascii"),
                MessageType="RAW",
                SigningAlgorithm=SIGNING_ALGORITHM,
            )
        except ClientError as error:
            raise _kms_failure(error, key, host) from None
        except BotoCoreError as error:
            raise TransientProviderError(
                host, "jwt_bearer", f"KMS could not be reached to sign ({type(error).__name__}); retry later"
            ) from None
        return f"{unsigned}.{b64url(answer['Signature'])}"


def _kms_failure(error: ClientError, key: JwtKey, host: str) -> ProviderError:
    code = str(error.response.get("Error", {}).get("Code", "ClientError"))
    if code in KMS_TRANSIENT:
        return RateLimited(host, "jwt_bearer", f"KMS refused to sign now ({code}); retry later")
    # Not ServiceNow's refusal: the connection backs off and alarms as failing, it is not marked for re-consent
    # (unless ServiceNow refused the current key and this is the staged one: refresh.py).
    return KeyUnusable(
        host,
        "jwt_bearer",
        f"KMS key {key.kms_key_id!r} cannot sign ({code}): check that it exists, is enabled, is an RSA SIGN_VERIFY "
        "key and that this function's role may use kms:Sign on it (see README, JWT bearer)",
    )
