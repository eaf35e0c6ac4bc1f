"""One exception hierarchy, so callers decide retry vs. alarm from a class, not by matching strings.

Messages name the connection, instance and grant and say what to do; they never carry a token,
code, client secret or password (callers may log them verbatim).
"""

from __future__ import annotations

from typing import Literal

FailureKind = Literal["rejected", "unavailable", "rate_limited", "transient"]


class ServiceNowOAuthError(Exception):
    """Base of every error this project raises on purpose."""


class ProviderError(ServiceNowOAuthError):
    """ServiceNow did not issue a token; `kind` tells the caller what to do about it."""

    kind: FailureKind = "transient"
    retryable: bool = True

    def __init__(self, instance: str, grant: str, detail: str) -> None:
        self.instance = instance
        self.grant = grant
        self.detail = detail
        super().__init__(f"{grant} request to {instance} failed: {detail}")


class CredentialRejected(ProviderError):
    """ServiceNow refused the credential (its usual 401 `access_denied`): a person must act."""

    kind: FailureKind = "rejected"
    retryable = False


class InstanceUnavailable(ProviderError):
    """The instance answered with something other than the token API (hibernating, maintenance, wrong URL)."""

    kind: FailureKind = "unavailable"


class KeyUnusable(InstanceUnavailable):
    """The KMS key cannot sign at all (missing, disabled, not a signing key, or the role may not use it): a person
    must act on the key, and no token request was made."""


class RateLimited(ProviderError):
    """HTTP 429 even after the session's own retries."""

    kind: FailureKind = "rate_limited"

    def __init__(self, instance: str, grant: str, detail: str, retry_after: float | None = None) -> None:
        super().__init__(instance, grant, detail)
        self.retry_after = retry_after


class TransientProviderError(ProviderError):
    """5xx, timeout or dropped connection even after the session's own retries."""

    kind: FailureKind = "transient"

    def __init__(self, instance: str, grant: str, detail: str, *, maybe_processed: bool = False) -> None:
        super().__init__(instance, grant, detail)
        # The request was sent and its answer lost: ServiceNow may have issued (and rotated) tokens.
        self.maybe_processed = maybe_processed


class InstanceNotAllowed(ServiceNowOAuthError):
    """An instance URL outside SERVICENOW_ALLOWED_HOSTS: refused before any request is made."""


class SecretFormatError(ServiceNowOAuthError):
    """A connection secret that does not hold a valid connection document."""

    def __init__(self, connection: str, key: str, problem: str) -> None:
        self.connection = connection
        self.key = key
        super().__init__(
            f"connection {connection!r}: secret key {key!r} {problem}; "
            "fix the secret value (see docs/secret-format.md) and try again"
        )


class InvalidName(ServiceNowOAuthError):
    """A connection name that cannot be a secret name or a URL path segment."""


class ConnectionNotFound(ServiceNowOAuthError):
    """No secret exists for the connection name."""

    def __init__(self, connection: str, secret_id: str) -> None:
        self.connection = connection
        super().__init__(
            f"connection {connection!r} not found (no secret {secret_id!r}); create it first (see README, Operations)"
        )


class NoPublicKeys(ServiceNowOAuthError):
    """A name with no keys to publish: no such connection, an invalid name or secret, or not a jwt_bearer connection.
    The JWKS endpoint answers all of them alike; `reason` is for the log only."""

    def __init__(self, connection: str | None, reason: str) -> None:
        self.connection = connection
        self.reason = reason
        super().__init__(f"connection {connection!r} publishes no JWT keys ({reason})")


class PublicKeyUnavailable(ServiceNowOAuthError):
    """KMS would not give (or gave an unusable) public key of a jwt_bearer connection's signing key. `retryable`:
    throttled or unreachable now; else a person must fix the key or the role."""

    def __init__(self, connection: str, key_id: str, which: str, reason: str, *, retryable: bool) -> None:
        self.connection = connection
        self.key_id = key_id
        self.which = which  # "current" or "staged"
        self.reason = reason  # a KMS error code or this project's check that failed, never a value
        self.retryable = retryable
        action = (
            "retry later"
            if retryable
            else "check that its KMS key exists, is enabled, is an RSA SIGN_VERIFY key that allows "
            "RSASSA_PKCS1_V1_5_SHA_256, and that the callback function's role may call kms:GetPublicKey on it "
            "(see README, JWT bearer)"
        )
        super().__init__(
            f"connection {connection!r}: the public key of its {which} JWT key {key_id!r} is unavailable ({reason}); "
            f"{action}"
        )


class ConcurrentUpdate(ServiceNowOAuthError):
    """A compare-and-swap write lost: someone else changed the secret after we read it."""

    def __init__(self, connection: str) -> None:
        self.connection = connection
        super().__init__(f"connection {connection!r} changed while it was being updated; re-read it and try again")


class ConsentError(ServiceNowOAuthError):
    """A consent request that must be refused; `status` is the HTTP status the callback answers with."""

    status: int = 400
    reason: str = "bad_request"

    def __init__(self, message: str, *, connection: str | None = None) -> None:
        self.connection = connection
        super().__init__(message)


class InvalidLink(ConsentError):
    """An authorize link that is unsigned, forged, for another connection, or expired."""

    status = 403
    reason = "invalid_link"


class InvalidState(ConsentError):
    """A callback whose `state` is missing, forged, expired, or already used."""

    reason = "invalid_state"


class ConsentDenied(ConsentError):
    """The person pressed Deny in ServiceNow (or ServiceNow refused the request)."""

    reason = "consent_denied"


class IdentityUnverified(ConsentError):
    """`expectedUser` is set but ServiceNow would not say whose token it is; the new tokens were revoked."""

    status = 502
    reason = "identity_unverified"


class WrongUser(ConsentError):
    """The consent was given by someone other than the connection's `expectedUser`."""

    status = 403
    reason = "wrong_user"


class RotationError(ServiceNowOAuthError):
    """A Secrets Manager rotation step that must fail (Secrets Manager then reports the rotation as failed)."""
