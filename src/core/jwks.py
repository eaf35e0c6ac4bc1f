"""A jwt_bearer connection's signing keys as an RFC 7517 JWK Set, for ServiceNow to trust from a URL.

ServiceNow (Zurich and later) can fetch a JWT verifier's keys from a JWKS URL instead of an uploaded certificate:
publishing the staged next key beside the current one lets it be trusted before the stack first signs with it.
Each key comes from `kms:GetPublicKey` (DER SubjectPublicKeyInfo), read here by a small strict DER reader: the
Lambda runtime has no `cryptography`. Only public material leaves: `kid`, `n`, `e` and constants, never another
field of the secret.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, TypedDict

from botocore.exceptions import BotoCoreError, ClientError

from core.errors import (
    ConnectionNotFound,
    InstanceNotAllowed,
    InvalidName,
    NoPublicKeys,
    PublicKeyUnavailable,
    SecretFormatError,
    ServiceNowOAuthError,
)
from core.jwt_bearer import KMS_TRANSIENT, SIGNING_ALGORITHM, JwtKey, b64url
from core.store import NAME_PATTERN, ConnectionStore

CACHE_SECONDS = 300  # the container's cache and the answer's Cache-Control max-age
CACHE_ENTRIES = 256  # names remembered per container (unknown ones too: a burst of them reads each once)
MIN_MODULUS_BITS = 2048  # KMS's smallest RSA key
_SEQUENCE, _INTEGER, _BIT_STRING = 0x30, 0x02, 0x03
# AlgorithmIdentifier's content for rsaEncryption (OID 1.2.840.113549.1.1.1) with its NULL parameters (RFC 3279).
_RSA_ENCRYPTION = bytes.fromhex("06092a864886f70d0101010500")


class Jwk(TypedDict):
    kty: str
    kid: str
    alg: str
    use: str
    n: str
    e: str


class JwkSet(TypedDict):
    keys: list[Jwk]


class UnsupportedPublicKey(ServiceNowOAuthError):
    """DER that is not exactly an RSA SubjectPublicKeyInfo this endpoint will publish."""


# ------------------------------------------------------------------------------------------ the DER reader
def _element(der: bytes, offset: int, tag: int) -> tuple[bytes, int]:
    """The content of the DER element of `tag` at `offset`, and the offset after it (definite, minimal lengths)."""
    if offset + 2 > len(der) or der[offset] != tag:
        raise UnsupportedPublicKey(f"expected DER tag 0x{tag:02x} at byte {offset}")
    length, offset = der[offset + 1], offset + 2
    if length & 0x80:
        count = length & 0x7F
        if not 1 <= count <= 4 or offset + count > len(der) or der[offset] == 0:
            raise UnsupportedPublicKey("malformed DER length")
        length, offset = int.from_bytes(der[offset : offset + count], "big"), offset + count
        if length < 0x80:
            raise UnsupportedPublicKey("non-minimal DER length")
    if offset + length > len(der):
        raise UnsupportedPublicKey("truncated DER")
    return der[offset : offset + length], offset + length


def _only(der: bytes, tag: int) -> bytes:
    content, end = _element(der, 0, tag)
    if end != len(der):
        raise UnsupportedPublicKey("trailing bytes after DER element")
    return content


def _positive(content: bytes) -> int:
    if not content or content[0] & 0x80 or (len(content) > 1 and content[0] == 0 and not content[1] & 0x80):
        raise UnsupportedPublicKey("DER INTEGER is not a minimal positive integer")
    return int.from_bytes(content, "big")


def read_rsa_public_key(der: bytes) -> tuple[int, int]:
    """The RSA modulus and exponent of a DER SubjectPublicKeyInfo (what `kms:GetPublicKey` returns).

    Raises:
        UnsupportedPublicKey: anything but exactly one RSA key of at least 2048 bits (an EC key, truncated DER).
    """
    info = _only(der, _SEQUENCE)
    algorithm, offset = _element(info, 0, _SEQUENCE)
    if algorithm != _RSA_ENCRYPTION:
        raise UnsupportedPublicKey("not an RSA public key")
    bits, end = _element(info, offset, _BIT_STRING)
    if end != len(info) or not bits or bits[0] != 0:
        raise UnsupportedPublicKey("malformed subjectPublicKey")
    rsa = _only(bits[1:], _SEQUENCE)
    modulus, offset = _element(rsa, 0, _INTEGER)
    exponent, end = _element(rsa, offset, _INTEGER)
    if end != len(rsa):
        raise UnsupportedPublicKey("trailing bytes in RSAPublicKey")
    n, e = _positive(modulus), _positive(exponent)
    if n.bit_length() < MIN_MODULUS_BITS or n % 2 == 0 or e < 3 or e % 2 == 0 or e >= n:
        raise UnsupportedPublicKey("RSA key too small or with an invalid exponent")
    return n, e


def _base64url_uint(value: int) -> str:
    """RFC 7518 section 6.3.1: big-endian, as few octets as the value needs."""
    return b64url(value.to_bytes((value.bit_length() + 7) // 8, "big"))


def rsa_jwk(der: bytes, kid: str) -> Jwk:
    """An RS256 signature-verification JWK for a DER SubjectPublicKeyInfo."""
    n, e = read_rsa_public_key(der)
    return {"kty": "RSA", "kid": kid, "alg": "RS256", "use": "sig", "n": _base64url_uint(n), "e": _base64url_uint(e)}


# ------------------------------------------------------------------------------------------------- KMS
def public_jwk(kms: Any, key: JwtKey, connection: str, which: str) -> Jwk:
    """The JWK of one signing key, from `kms:GetPublicKey`, refused unless KMS says it signs RS256.

    Raises:
        PublicKeyUnavailable: KMS refused or failed (retryable when throttled or unreachable), or the key is not
            an RSA SIGN_VERIFY key that allows RSASSA_PKCS1_V1_5_SHA_256.
    """
    try:
        answer = kms.get_public_key(KeyId=key.kms_key_id)
    except ClientError as error:
        code = str(error.response.get("Error", {}).get("Code", "ClientError"))
        raise PublicKeyUnavailable(connection, key.key_id, which, code, retryable=code in KMS_TRANSIENT) from None
    except BotoCoreError as error:
        raise PublicKeyUnavailable(connection, key.key_id, which, type(error).__name__, retryable=True) from None
    # A key the stack could not sign with must not be trusted either: publishing it would hide the problem.
    if answer.get("KeyUsage") != "SIGN_VERIFY" or SIGNING_ALGORITHM not in (answer.get("SigningAlgorithms") or []):
        raise PublicKeyUnavailable(connection, key.key_id, which, "NotAnRs256SigningKey", retryable=False)
    try:
        return rsa_jwk(answer["PublicKey"], key.key_id)
    except UnsupportedPublicKey:
        raise PublicKeyUnavailable(connection, key.key_id, which, "UnsupportedPublicKey", retryable=False) from None


def load_jwks(
    store: ConnectionStore, kms: Any, name: str, problems: list[PublicKeyUnavailable] | None = None
) -> JwkSet:
    """The current signing key, then the staged next key if any, of one jwt_bearer connection.

    A staged key the stack cannot read is left out and appended to `problems`, never failing the set: ServiceNow
    refetching a failed set would stop trusting the current key too, which the connection still signs with.

    Raises:
        NoPublicKeys: no such connection, an invalid name or secret, or not a jwt_bearer connection (alike).
        PublicKeyUnavailable: the current key's public half is unavailable (see `public_jwk`).
    """
    try:
        connection = store.get(name).connection
    except (InvalidName, ConnectionNotFound, SecretFormatError, InstanceNotAllowed) as error:
        raise NoPublicKeys(name if NAME_PATTERN.match(name) else None, type(error).__name__) from None
    current, staged = connection.jwt_key, connection.jwt_key_next
    if connection.grant_type != "jwt_bearer" or current is None:
        raise NoPublicKeys(name, "not_jwt_bearer")
    keys = [public_jwk(kms, current, name, "current")]
    if staged is not None:
        try:
            keys.append(public_jwk(kms, staged, name, "staged"))
        except PublicKeyUnavailable as problem:
            if problems is None:
                raise
            problems.append(problem)
    return {"keys": keys}


class KeyPublisher:
    """`load_jwks` with a per-container cache: a burst of fetches reads Secrets Manager and KMS once per name every
    `max_age` seconds. Unknown names are remembered too (bounded), failures are not (a fix shows at once)."""

    def __init__(
        self,
        store: ConnectionStore,
        kms: Any,
        *,
        max_age: float = CACHE_SECONDS,
        max_entries: int = CACHE_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.kms = kms
        self.max_age = max_age
        self.max_entries = max_entries
        self._clock = clock
        # name -> (read at, the set or the NoPublicKeys's (connection, reason): a fresh exception each time, since
        # re-raising one instance would grow its traceback request after request)
        self._cache: OrderedDict[str, tuple[float, JwkSet | tuple[str | None, str]]] = OrderedDict()

    def jwks(self, name: str, problems: list[PublicKeyUnavailable] | None = None) -> JwkSet:
        """The connection's JWK Set, at most `max_age` seconds old (a set missing its staged key is not kept).

        Raises:
            NoPublicKeys, PublicKeyUnavailable: as `load_jwks`.
        """
        now = self._clock()
        cached = self._cache.get(name)
        if cached is None or now - cached[0] >= self.max_age:
            found: list[PublicKeyUnavailable] = []
            try:
                result: JwkSet | tuple[str | None, str] = load_jwks(self.store, self.kms, name, found)
            except NoPublicKeys as error:
                result = (error.connection, error.reason)
            if problems is not None:
                problems.extend(found)
            if found:
                return result  # type: ignore[return-value]  # a set: only NoPublicKeys gives a tuple
            self._cache[name] = cached = (now, result)
            self._cache.move_to_end(name)
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
        if isinstance(cached[1], tuple):
            raise NoPublicKeys(*cached[1])
        return cached[1]
