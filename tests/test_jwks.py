"""GET /connections/{name}/jwks.json through the real callback handler, on KMS keys and secrets of the moto server:
the JWKs are the KMS keys' public halves (checked with `cryptography`, which the Lambda package does not have),
a kms:Sign signature verifies with them, and nothing of the secret but the key ids ever leaves."""

from __future__ import annotations

import base64
import copy
import json
from typing import Any

import boto3
import permissions
import pytest
from botocore.config import Config
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from core.errors import NoPublicKeys, PublicKeyUnavailable
from core.jwks import KeyPublisher, UnsupportedPublicKey, load_jwks, read_rsa_public_key, rsa_jwk
from core.store import ConnectionStore
from tests.conftest import new_key
from tests.test_callback import EVENTS, FakeContext, Stack
from tests.test_callback import stack as stack

SUBJECT = "svc.jwks-subject"
ACCESS_TOKEN = "jwks-test-access-token-Qm93LZ1"
JWK_FIELDS = {"kty", "kid", "alg", "use", "n", "e"}


def add_jwt(stack: Stack, key_arn: str, name: str = "prod", **fields: Any) -> None:
    stack.create_connection(
        name,
        grantType="jwt_bearer",
        jwtSubject=SUBJECT,
        jwtKeyId="aws-kms-1",
        kmsKeyId=key_arn,
        accessToken=ACCESS_TOKEN,
        accessTokenExpiresAt="2026-11-22T12:30:00Z",
        status="active",
        **fields,
    )


def fetch(stack: Stack, name: str = "prod") -> dict[str, Any]:
    event = copy.deepcopy(json.loads((EVENTS / "jwks.json").read_text()))
    event["rawPath"] = event["requestContext"]["http"]["path"] = f"/connections/{name}/jwks.json"
    event["pathParameters"] = {"name": name}
    return stack.handler.lambda_handler(event, FakeContext())


def b64url_int(text: str) -> int:
    return int.from_bytes(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)), "big")


def kms_public(kms: Any, key_arn: str) -> rsa.RSAPublicKey:
    key = serialization.load_der_public_key(kms.get_public_key(KeyId=key_arn)["PublicKey"])
    assert isinstance(key, rsa.RSAPublicKey)
    return key


def jwk_public(jwk: dict[str, str]) -> rsa.RSAPublicKey:
    return rsa.RSAPublicNumbers(b64url_int(jwk["e"]), b64url_int(jwk["n"])).public_key()


def assert_no_secret_values(text: str) -> None:
    for value in ("emulator-client-secret", ACCESS_TOKEN, SUBJECT, "staged-client-secret"):
        assert value not in text, value


def test_the_current_key_is_the_kms_keys_public_half_and_verifies_kms_signatures(
    stack: Stack, kms: Any, capfd: pytest.CaptureFixture[str], leak_check: list
) -> None:
    key = new_key(kms)
    add_jwt(stack, key)
    answer = fetch(stack)
    out, err = capfd.readouterr()
    leak_check.extend([answer["body"], out, err])
    assert answer["statusCode"] == 200, answer["body"]
    assert answer["headers"]["Content-Type"] == "application/jwk-set+json"
    assert answer["headers"]["Cache-Control"] == "public, max-age=300"
    [jwk] = json.loads(answer["body"])["keys"]
    assert set(jwk) == JWK_FIELDS
    assert (jwk["kty"], jwk["kid"], jwk["alg"], jwk["use"]) == ("RSA", "aws-kms-1", "RS256", "sig")
    numbers = kms_public(kms, key).public_numbers()
    assert (b64url_int(jwk["n"]), b64url_int(jwk["e"])) == (numbers.n, numbers.e)
    assert jwk["e"] == "AQAB" and not base64.urlsafe_b64decode(jwk["n"] + "==").startswith(b"\0")
    # What ServiceNow does with it: verify an RS256 signature KMS made.
    message = b"header.claims"
    signature = kms.sign(KeyId=key, Message=message, MessageType="RAW", SigningAlgorithm="RSASSA_PKCS1_V1_5_SHA_256")
    jwk_public(jwk).verify(signature["Signature"], message, padding.PKCS1v15(), hashes.SHA256())
    for text in (answer["body"], json.dumps(answer["headers"]), out, err):
        assert_no_secret_values(text)
        assert key not in text  # not even the KMS key's ARN


def test_a_staged_key_is_published_after_the_current_one(stack: Stack, kms: Any) -> None:
    current, staged = new_key(kms), new_key(kms)
    add_jwt(stack, current, jwtKeyIdNext="aws-kms-2", kmsKeyIdNext=staged, clientSecretNext="staged-client-secret")
    answer = fetch(stack)
    assert answer["statusCode"] == 200, answer["body"]
    keys = json.loads(answer["body"])["keys"]
    assert [jwk["kid"] for jwk in keys] == ["aws-kms-1", "aws-kms-2"]
    assert b64url_int(keys[1]["n"]) == kms_public(kms, staged).public_numbers().n
    signature = kms.sign(KeyId=staged, Message=b"m", MessageType="RAW", SigningAlgorithm="RSASSA_PKCS1_V1_5_SHA_256")
    jwk_public(keys[1]).verify(signature["Signature"], b"m", padding.PKCS1v15(), hashes.SHA256())
    assert_no_secret_values(answer["body"])


def test_unknown_non_jwt_invalid_and_broken_connections_answer_the_same_404(stack: Stack, kms: Any) -> None:
    stack.create_connection("consent", accessToken=ACCESS_TOKEN, refreshToken="jwks-test-refresh-token-9")
    stack.create_connection("machine", grantType="client_credentials")
    stack.secretsmanager.create_secret(Name="servicenow-oauth/broken", SecretString="{not json")
    answers = {name: fetch(stack, name) for name in ("nosuch", "consent", "machine", "broken", "..", "a%3Cb%3E")}
    first = answers["nosuch"]
    assert first["statusCode"] == 404
    assert json.loads(first["body"]) == {"message": "Not Found"}  # API Gateway's own body for a missing route
    assert first["headers"]["Content-Type"] == "application/json"
    assert all(answer == first for answer in answers.values()), answers


def test_a_staged_key_kms_refuses_is_left_out_with_one_warning_and_the_current_one_published(
    stack: Stack, kms: Any, capfd: pytest.CaptureFixture[str], leak_check: list
) -> None:
    current = new_key(kms)
    deleted = current.rsplit("/", 1)[0] + "/0b5e1c1a-1111-4222-8333-944455556666"  # no such key: NotFoundException
    add_jwt(stack, current, jwtKeyIdNext="aws-kms-2", kmsKeyIdNext=deleted)
    capfd.readouterr()
    answer = fetch(stack)
    out, err = capfd.readouterr()
    leak_check.extend([answer["body"], out, err])
    # ServiceNow refetching a failed set would drop the current key too, which the connection still signs with.
    assert answer["statusCode"] == 200
    assert [key["kid"] for key in json.loads(answer["body"])["keys"]] == ["aws-kms-1"]
    warnings = [json.loads(line) for line in out.splitlines() if '"level":"WARNING"' in line]
    assert [(w["message"], w["connection"], w["signing_key"], w["reason"]) for w in warnings] == [
        ("jwks: public key unavailable", "prod", "staged", "NotFoundException")
    ]
    for text in (answer["body"], out, err):
        assert_no_secret_values(text)


def test_a_current_key_kms_refuses_is_a_502_naming_the_connection(stack: Stack, kms: Any) -> None:
    deleted = new_key(kms).rsplit("/", 1)[0] + "/0b5e1c1a-1111-4222-8333-944455556666"  # NotFoundException
    add_jwt(stack, deleted)
    answer = fetch(stack)
    assert answer["statusCode"] == 502
    assert answer["headers"]["Content-Type"] == "application/json"
    assert answer["headers"]["Cache-Control"] == "no-store"
    body = json.loads(answer["body"])
    assert body["connection"] == "prod"
    assert "current JWT key 'aws-kms-1'" in body["message"] and "NotFoundException" in body["message"]
    assert "kms:GetPublicKey" in body["message"]  # what to do
    assert "keys" not in body


def test_a_key_that_cannot_sign_rs256_is_refused(stack: Stack, kms: Any) -> None:
    add_jwt(stack, new_key(kms, usage="ENCRYPT_DECRYPT"))
    answer = fetch(stack)
    assert answer["statusCode"] == 502 and "NotAnRs256SigningKey" in json.loads(answer["body"])["message"]


def test_kms_unreachable_is_a_503_to_retry(stack: Stack, kms: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    add_jwt(stack, new_key(kms))
    unreachable = boto3.client(
        "kms", endpoint_url="http://127.0.0.1:9", config=Config(retries={"total_max_attempts": 1}, connect_timeout=1)
    )
    monkeypatch.setattr(stack.handler.publisher, "kms", unreachable)
    answer = fetch(stack)
    assert answer["statusCode"] == 503 and answer["headers"]["Retry-After"] == "60"
    assert "retry later" in json.loads(answer["body"])["message"]


def test_a_burst_reads_secrets_manager_and_kms_once(stack: Stack, kms: Any) -> None:
    add_jwt(stack, new_key(kms))
    fetch(stack)  # the container's first request reads both
    before = permissions.RECORDER.take()
    permissions.RECORDER.give_back(before)
    answers = [fetch(stack) for _ in range(5)]
    calls = permissions.RECORDER.take()
    permissions.RECORDER.give_back(calls)
    assert len(calls) == len(before)
    assert len({answer["body"] for answer in answers}) == 1


def test_the_cache_keeps_an_answer_300_seconds(aws: str, secretsmanager: Any, kms: Any) -> None:
    """Core alone, on an injected clock: a staged key shows once the cached set is 300 s old; failures are
    never cached."""
    now = [1000.0]
    store = ConnectionStore(secretsmanager, prefix="servicenow-oauth/", allowed_hosts=["*.service-now.com"])
    publisher = KeyPublisher(store, kms, clock=lambda: now[0])
    with pytest.raises(NoPublicKeys):
        publisher.jwks("prod")
    document = {
        "instanceUrl": "https://acme.service-now.com",
        "clientId": "id",
        "clientSecret": "secret-value-1",
        "grantType": "jwt_bearer",
        "jwtSubject": SUBJECT,
        "jwtKeyId": "aws-kms-1",
        "kmsKeyId": new_key(kms),
    }
    secretsmanager.create_secret(Name="servicenow-oauth/prod", SecretString=json.dumps(document))
    with pytest.raises(NoPublicKeys):  # the unknown name is remembered for 300 s too
        publisher.jwks("prod")
    now[0] += 300
    assert [k["kid"] for k in publisher.jwks("prod")["keys"]] == ["aws-kms-1"]
    staged = {**document, "jwtKeyIdNext": "aws-kms-2", "kmsKeyIdNext": "alias/not-there"}
    secretsmanager.put_secret_value(SecretId="servicenow-oauth/prod", SecretString=json.dumps(staged))
    now[0] += 299
    assert [k["kid"] for k in publisher.jwks("prod")["keys"]] == ["aws-kms-1"]
    now[0] += 1
    for _ in range(2):  # read again each time (a set missing its staged key is not kept): a fixed key shows at once
        problems: list[PublicKeyUnavailable] = []
        assert [k["kid"] for k in publisher.jwks("prod", problems)["keys"]] == ["aws-kms-1"]
        assert [(p.which, p.retryable) for p in problems] == [("staged", False)]
    with pytest.raises(PublicKeyUnavailable):  # without a list to take the problem, it is raised
        load_jwks(store, kms, "prod")


def test_the_cache_is_bounded(aws: str, secretsmanager: Any, kms: Any) -> None:
    store = ConnectionStore(secretsmanager, prefix="servicenow-oauth/", allowed_hosts=["*.service-now.com"])
    publisher = KeyPublisher(store, kms, max_entries=3)
    for index in range(10):
        with pytest.raises(NoPublicKeys):
            publisher.jwks(f"nosuch-{index}")
    assert list(publisher._cache) == ["nosuch-7", "nosuch-8", "nosuch-9"]


# ------------------------------------------------------------------------------------------ the DER reader
def _spki(key: Any) -> bytes:
    return bytes(key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))


def test_the_der_reader_reads_rsa_keys_as_cryptography_does() -> None:
    for bits in (2048, 3072, 4096):
        public = rsa.generate_private_key(public_exponent=65537, key_size=bits).public_key()
        assert read_rsa_public_key(_spki(public)) == (public.public_numbers().n, public.public_numbers().e)
    jwk = rsa_jwk(_spki(public), "k")
    assert jwk_public(dict(jwk)).public_numbers() == public.public_numbers()


@pytest.mark.parametrize(
    ("der", "problem"),
    [
        (_spki(ec.generate_private_key(ec.SECP256R1()).public_key()), "not an RSA public key"),
        (_spki(rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()), "too small"),
        (_spki(rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key())[:-1], "truncated"),
        (_spki(rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key())[:40], "truncated"),
        (_spki(rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()) + b"\0", "trailing"),
        (b"", "expected DER tag"),
        (b"\x30\x81\x05" + bytes(5), "non-minimal"),
        (b"\x30\x80\x00\x00", "malformed DER length"),  # BER's indefinite length: not DER
    ],
    ids=["ec key", "1024 bits", "one byte short", "cut short", "trailing byte", "empty", "long form", "indefinite"],
)
def test_the_der_reader_refuses_what_is_not_exactly_an_rsa_key(der: bytes, problem: str) -> None:
    with pytest.raises(UnsupportedPublicKey, match=problem):
        read_rsa_public_key(der)
