"""The connection document: the JSON in each connection's secret, the public contract (docs/secret-format.md).

Keys are camelCase like AWS AppFlow's ServiceNow `OAuth2Credentials`. Unknown keys are kept on every
write, so consumers and later versions may add their own.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, Literal, cast, get_args

from core.allowlist import normalize_instance_url
from core.clock import from_iso, to_iso
from core.errors import InstanceNotAllowed, SecretFormatError
from core.jwt_bearer import KMS_KEY_ID, JwtKey
from core.tokens import OAuthApp, Token

ConnectionGrant = Literal["authorization_code", "password", "client_credentials", "jwt_bearer"]
Status = Literal["pending_authorization", "active", "reauthorization_required"]

DEFAULT_REFRESH_TOKEN_LIFESPAN = 8_640_000  # ServiceNow's default: 100 days
MAX_SECRET_BYTES = 65_536  # Secrets Manager's limit for a secret value

# Document key -> dataclass attribute, in the order they are written.
_KEYS = {
    "instanceUrl": "instance_url",
    "clientId": "client_id",
    "clientSecret": "client_secret",
    "redirectUri": "redirect_uri",
    "grantType": "grant_type",
    "username": "username",
    "password": "password",
    "scope": "scope",
    "accessToken": "access_token",
    "refreshToken": "refresh_token",
    "tokenType": "token_type",
    "accessTokenExpiresAt": "access_token_expires_at",
    "refreshTokenExpiresAt": "refresh_token_expires_at",
    "refreshTokenLifespanSeconds": "refresh_token_lifespan_seconds",
    "refreshTokenRotates": "rotates_refresh_token",
    "jwtSubject": "jwt_subject",
    "jwtKeyId": "jwt_key_id",
    "kmsKeyId": "kms_key_id",
    "jwtKeyIdNext": "jwt_key_id_next",
    "kmsKeyIdNext": "kms_key_id_next",
    "status": "status",
    "markedVersion": "marked_version",
    "updatedAt": "updated_at",
}
_TIMESTAMPS = {"accessTokenExpiresAt", "refreshTokenExpiresAt", "updatedAt"}
_OPTIONAL_STRINGS = {
    "redirectUri",
    "username",
    "password",
    "scope",
    "accessToken",
    "refreshToken",
    "tokenType",
    "markedVersion",
}
_JWT_STRINGS = ("jwtSubject", "jwtKeyId", "kmsKeyId", "jwtKeyIdNext", "kmsKeyIdNext")


@dataclass(frozen=True)
class Connection:
    """One ServiceNow OAuth connection as stored; secrets are kept out of `repr`."""

    name: str
    instance_url: str
    client_id: str
    client_secret: str = field(repr=False)
    grant_type: ConnectionGrant = "authorization_code"
    redirect_uri: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    scope: str | None = None
    access_token: str | None = field(default=None, repr=False)
    refresh_token: str | None = field(default=None, repr=False)
    token_type: str | None = None
    access_token_expires_at: datetime | None = None
    refresh_token_expires_at: datetime | None = None
    refresh_token_lifespan_seconds: int = DEFAULT_REFRESH_TOKEN_LIFESPAN
    # True once ServiceNow answered a refresh with a new refresh token (or set by the operator): such a
    # refresh is never re-sent after a lost answer, since the token it spends is dead once processed.
    rotates_refresh_token: bool | None = None
    # jwt_bearer: the user the assertion names, and the key that signs it (a staged next key for rollover).
    jwt_subject: str | None = None
    jwt_key_id: str | None = None
    kms_key_id: str | None = None
    jwt_key_id_next: str | None = None
    kms_key_id_next: str | None = None
    status: Status = "pending_authorization"
    # Set when the stack marks the connection reauthorization_required: the VersionId it gives that very
    # write. Equal to the version's own id, it says "ServiceNow refused this credential" even when the health
    # tags could not be written; any later version (an operator's fix) has another id and is tried once.
    marked_version: str | None = None
    updated_at: datetime | None = None
    extra: Mapping[str, Any] = field(default_factory=dict, repr=False)

    @property
    def jwt_key(self) -> JwtKey | None:
        if self.jwt_key_id and self.kms_key_id:
            return JwtKey(self.jwt_key_id, self.kms_key_id)
        return None

    @property
    def jwt_key_next(self) -> JwtKey | None:
        if self.jwt_key_id_next and self.kms_key_id_next:
            return JwtKey(self.jwt_key_id_next, self.kms_key_id_next)
        return None

    @property
    def app(self) -> OAuthApp:
        return OAuthApp(self.instance_url, self.client_id, self.client_secret)

    @property
    def host(self) -> str:
        return self.app.host

    def with_token(self, token: Token, *, grant: str, now: datetime) -> Connection:
        """The connection after a successful grant.

        A code exchange or password grant starts a new refresh-token life; a refresh grant does not
        extend it (ServiceNow's rule), and an answer without a refresh token keeps the stored one.
        """
        refresh_token = token.refresh_token or self.refresh_token
        refresh_expires = self.refresh_token_expires_at
        rotates = self.rotates_refresh_token
        if grant == "refresh_token" and token.refresh_token and token.refresh_token != self.refresh_token:
            rotates = True
        if grant in ("authorization_code", "password") and token.refresh_token:
            refresh_expires = now + timedelta(seconds=self.refresh_token_lifespan_seconds)
        elif grant in ("client_credentials", "jwt_bearer"):
            refresh_token, refresh_expires = None, None
        return replace(
            self,
            access_token=token.access_token,
            token_type=token.token_type,
            access_token_expires_at=token.access_token_expires_at,
            scope=token.scope or self.scope,
            refresh_token=refresh_token,
            refresh_token_expires_at=refresh_expires,
            rotates_refresh_token=rotates,
            status="active",
            marked_version=None,
            updated_at=now,
        )

    def to_document(self) -> dict[str, Any]:
        """The JSON object written to the secret: unknown keys first kept, then ours on top."""
        document: dict[str, Any] = dict(self.extra)
        for key, attribute in _KEYS.items():
            value = getattr(self, attribute)
            if value is None:
                document.pop(key, None)
                continue
            document[key] = to_iso(value) if key in _TIMESTAMPS else value
        return document

    def to_json(self) -> str:
        return json.dumps(self.to_document(), separators=(",", ":"), sort_keys=False)


def _require_string(name: str, document: Mapping[str, Any], key: str, *, required: bool) -> str | None:
    value = document.get(key)
    if value is None or value == "":
        if required:
            raise SecretFormatError(name, key, "is required and missing")
        return None
    if not isinstance(value, str):
        raise SecretFormatError(name, key, "must be a string")
    return value


def _choice(name: str, document: Mapping[str, Any], key: str, allowed: Iterable[str], default: str) -> str:
    value = document.get(key, default)
    if value not in tuple(allowed):
        raise SecretFormatError(name, key, f"must be one of {', '.join(allowed)}")
    return cast(str, value)


def parse_connection(name: str, secret_string: str, allowed_hosts: Iterable[str]) -> Connection:
    """Validate a secret value into a `Connection`.

    Raises:
        SecretFormatError: naming the connection and the bad key, never the value.
    """
    if len(secret_string.encode("utf-8", "surrogatepass")) > MAX_SECRET_BYTES:
        raise SecretFormatError(name, "(document)", "is larger than a secret can hold")
    try:
        document = json.loads(secret_string)
    except (ValueError, RecursionError):  # nesting deeper than the parser's recursion is no document of ours
        raise SecretFormatError(name, "(document)", "is not valid JSON") from None
    if not isinstance(document, dict):
        raise SecretFormatError(name, "(document)", "must be a JSON object")
    values: dict[str, Any] = {}
    instance = _require_string(name, document, "instanceUrl", required=True)
    try:
        values["instance_url"] = normalize_instance_url(cast(str, instance), allowed_hosts)
    except InstanceNotAllowed as exc:
        raise SecretFormatError(name, "instanceUrl", f"is not allowed: {exc}") from None
    values["client_id"] = _require_string(name, document, "clientId", required=True)
    values["client_secret"] = _require_string(name, document, "clientSecret", required=True)
    values["grant_type"] = _choice(name, document, "grantType", get_args(ConnectionGrant), "authorization_code")
    values["status"] = _choice(name, document, "status", get_args(Status), "pending_authorization")
    for key in _OPTIONAL_STRINGS:
        values[_KEYS[key]] = _require_string(name, document, key, required=False)
    for key in _TIMESTAMPS:
        raw = document.get(key)
        if raw is None:
            continue
        try:
            values[_KEYS[key]] = from_iso(raw) if isinstance(raw, str) else None
        except ValueError:
            values[_KEYS[key]] = None
        if values[_KEYS[key]] is None:
            raise SecretFormatError(name, key, "must be an ISO-8601 UTC timestamp like 2026-11-22T18:30:00Z")
    lifespan = document.get("refreshTokenLifespanSeconds", DEFAULT_REFRESH_TOKEN_LIFESPAN)
    if not isinstance(lifespan, int) or isinstance(lifespan, bool) or lifespan <= 0:
        raise SecretFormatError(name, "refreshTokenLifespanSeconds", "must be a positive whole number of seconds")
    values["refresh_token_lifespan_seconds"] = lifespan
    rotates = document.get("refreshTokenRotates")
    if rotates is not None and not isinstance(rotates, bool):
        raise SecretFormatError(name, "refreshTokenRotates", "must be true or false")
    values["rotates_refresh_token"] = rotates
    if values["grant_type"] == "password" and not (values["username"] and values["password"]):
        raise SecretFormatError(name, "username/password", "are required when grantType is password")
    for key in _JWT_STRINGS:
        values[_KEYS[key]] = _require_string(name, document, key, required=False)
        if key.startswith("kms") and values[_KEYS[key]] and not KMS_KEY_ID.match(values[_KEYS[key]]):
            raise SecretFormatError(name, key, "must be a KMS key id, key ARN, alias/name or alias ARN")
    if values["grant_type"] == "jwt_bearer" and not (
        values["jwt_subject"] and values["jwt_key_id"] and values["kms_key_id"]
    ):
        raise SecretFormatError(name, "jwtSubject/jwtKeyId/kmsKeyId", "are required when grantType is jwt_bearer")
    if bool(values["jwt_key_id_next"]) != bool(values["kms_key_id_next"]):
        raise SecretFormatError(name, "jwtKeyIdNext/kmsKeyIdNext", "must be staged together (or both left out)")
    extra = {key: value for key, value in document.items() if key not in _KEYS}
    return Connection(name=name, extra=extra, **values)
