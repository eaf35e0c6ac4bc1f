"""The JWT bearer grant end to end: a KMS key on the moto server signs the certificate (the CLI's) and every
assertion (the deployed refresher's); the emulator verifies them as ServiceNow does. No private key exists
outside KMS at any point of these tests."""

from __future__ import annotations

import base64
import io
import json
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import boto3
import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

from admin.certificate import kms_certificate
from admin.cli import main as cli
from core.errors import CredentialRejected, InstanceUnavailable, RateLimited
from core.jwt_bearer import GRANT, JwtKey, KmsSigner, b64url, signing_input
from core.secret import parse_connection
from local.servicenow_emulator import ServiceNowEmulator
from tests.conftest import CLIENT_ID, CLIENT_SECRET, new_key
from tests.test_lifecycle import SECRET, Deployed
from tests.test_lifecycle import deployed as deployed
from tests.test_lifecycle_edges import record_events

SUBJECT = "svc.jwt"
NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


def trust(emulator: ServiceNowEmulator, kms: Any, kid: str, key_arn: str) -> None:
    """What the README's click-path does in ServiceNow: upload the certificate, map it to the key id."""
    pem = kms_certificate(kms, key_arn, "servicenow-oauth prod", NOW)
    emulator.add_jwt_verifier(CLIENT_ID, kid, pem)


def add_jwt_connection(deployed: Deployed, key_arn: str, kid: str = "key-1", **fields: Any) -> None:
    document = {
        "instanceUrl": deployed.emulator.url,
        "clientId": CLIENT_ID,
        "clientSecret": CLIENT_SECRET,
        "grantType": "jwt_bearer",
        "jwtSubject": SUBJECT,
        "jwtKeyId": kid,
        "kmsKeyId": key_arn,
        "status": "pending_authorization",
        **fields,
    }
    deployed.world.sm.create_secret(Name=SECRET, SecretString=json.dumps(document))


def test_the_assertion_has_servicenows_claims_and_a_fresh_jti() -> None:
    first, second = (signing_input(CLIENT_ID, SUBJECT, "key-1", NOW) for _ in range(2))
    header, claims = (json.loads(base64.urlsafe_b64decode(part + "==")) for part in first.split("."))
    assert header == {"alg": "RS256", "kid": "key-1", "typ": "JWT"}
    assert claims["iss"] == claims["aud"] == CLIENT_ID and claims["sub"] == SUBJECT
    assert claims["exp"] - claims["iat"] == 300 and claims["nbf"] == claims["iat"] == int(NOW.timestamp())
    assert json.loads(base64.urlsafe_b64decode(second.split(".")[1] + "=="))["jti"] != claims["jti"]


def test_kms_signs_what_the_certificate_verifies(kms: Any) -> None:
    """The certificate is self-signed by the KMS key, and an assertion's signature verifies against it."""
    key = new_key(kms)
    certificate = x509.load_pem_x509_certificate(kms_certificate(kms, key, "servicenow-oauth prod", NOW).encode())
    public = certificate.public_key()
    public.verify(certificate.signature, certificate.tbs_certificate_bytes, padding.PKCS1v15(), hashes.SHA256())
    assertion = KmsSigner(kms).assertion(CLIENT_ID, SUBJECT, JwtKey("key-1", key), NOW, host="x")
    unsigned, _, signature = assertion.rpartition(".")
    public.verify(base64.urlsafe_b64decode(signature + "=="), unsigned.encode(), padding.PKCS1v15(), hashes.SHA256())


def test_a_jwt_connection_is_refreshed_with_no_refresh_token_stored(
    deployed: Deployed, kms: Any, leak_check: list
) -> None:
    deployed.emulator.add_user(SUBJECT, "unused-password-J1")
    key = new_key(kms)
    trust(deployed.emulator, kms, "key-1", key)
    add_jwt_connection(deployed, key)
    assert deployed.sweep() == {"refreshed": 1}
    document = deployed.document()
    assert document["status"] == "active" and "refreshToken" not in document and "refreshTokenExpiresAt" not in document
    assert deployed.emulator.token_info(document["accessToken"])["user"] == SUBJECT
    assert deployed.emulator.token_requests(GRANT) == 1
    deployed.clock.advance(600)
    assert deployed.sweep() == {"not_due": 1}  # the access token is good for 30 minutes
    deployed.clock.advance(1000)
    assert deployed.sweep() == {"refreshed": 1}  # a new assertion (new jti) each time: no replay refusal
    assert deployed.emulator.token_requests(GRANT) == 2


def test_a_server_error_is_retried_with_a_new_assertion_not_re_sent(deployed: Deployed, kms: Any) -> None:
    """ServiceNow refuses a reused jti, so the one retry within a sweep signs again rather than re-POSTing."""
    deployed.emulator.add_user(SUBJECT, "unused-password-J1")
    key = new_key(kms)
    trust(deployed.emulator, kms, "key-1", key)
    add_jwt_connection(deployed, key)
    deployed.emulator.inject("server_error", count=1)
    assert deployed.sweep() == {"refreshed": 1}
    assert deployed.emulator.token_requests(GRANT) == 2


@pytest.mark.parametrize(
    "problem", ["unknown_kid", "foreign_key", "unknown_user", "wrong_client"], ids=lambda p: p.replace("_", " ")
)
def test_what_servicenow_refuses_marks_the_connection_for_a_person(
    deployed: Deployed, kms: Any, leak_check: list, problem: str
) -> None:
    deployed.emulator.add_user(SUBJECT, "unused-password-J1")
    key, other = new_key(kms), new_key(kms)
    trust(deployed.emulator, kms, "key-1", key)
    fields: dict[str, Any] = {
        "unknown_kid": {"jwtKeyId": "key-9"},
        "foreign_key": {"kmsKeyId": other},  # signed by a key whose certificate ServiceNow does not have
        "unknown_user": {"jwtSubject": "nobody"},
        "wrong_client": {"clientId": "another-client-id"},
    }[problem]
    add_jwt_connection(deployed, key, **fields)
    assert deployed.sweep() == {"reauthorization_required": 1}
    assert deployed.document()["status"] == "reauthorization_required"


def test_a_kms_key_that_cannot_sign_backs_off_and_is_not_marked(deployed: Deployed, kms: Any) -> None:
    """A signing key KMS cannot use (here: an alias not yet created) is not ServiceNow's refusal: the connection
    fails (and alarms), a person fixes the key, and the next try after the backoff succeeds with no change to
    the secret."""
    deployed.emulator.add_user(SUBJECT, "unused-password-J1")
    key = new_key(kms)
    trust(deployed.emulator, kms, "key-1", key)
    add_jwt_connection(deployed, "alias/snow-jwt-signing")
    assert deployed.sweep() == {"failed": 1}
    [outcome] = deployed.outcomes[-1:]
    assert outcome.failure == "unavailable" and "cannot sign (NotFoundException)" in (outcome.detail or "")
    assert deployed.document()["status"] == "pending_authorization"
    assert deployed.emulator.token_requests() == 0
    kms.create_alias(AliasName="alias/snow-jwt-signing", TargetKeyId=key)
    results = deployed.sweep_every(5, 0.5)
    assert {"refreshed": 1} in results and deployed.document()["status"] == "active"


def test_a_staged_key_takes_over_when_servicenow_drops_the_old_one(deployed: Deployed, kms: Any) -> None:
    """Key rollover without downtime: stage the next key (CLI), trust it in ServiceNow, drop the old map; the
    refresher's 401 with the current key tries the staged one once and promotes it in the same write."""
    changes: list[str] = []

    def hook(params: dict[str, Any], **_: Any) -> None:
        changes.extend(json.loads(e["Detail"])["change"] for e in params.get("Entries", []))

    deployed.handler.refresher.monitor.events.meta.events.register("before-parameter-build.eventbridge.PutEvents", hook)
    deployed.emulator.add_user(SUBJECT, "unused-password-J1")
    old, new = new_key(kms), new_key(kms)
    trust(deployed.emulator, kms, "key-1", old)
    add_jwt_connection(deployed, old)
    assert deployed.sweep() == {"refreshed": 1}
    out = io.StringIO()
    code = cli(
        ["--allowed-hosts", "127.0.0.1", "connections", "stage-jwt-key", "prod", "--jwt-key-id", "key-2",
         "--jwt-kms-key", new],
        out=out,
    )  # fmt: skip
    assert code == 0, out.getvalue()
    out = io.StringIO()
    assert cli(["--allowed-hosts", "127.0.0.1", "jwt-certificate", "prod", "--next"], out=out) == 0
    deployed.emulator.add_jwt_verifier(CLIENT_ID, "key-2", out.getvalue())  # the PEM the CLI printed
    deployed.emulator.remove_jwt_verifier(CLIENT_ID, "key-1")
    deployed.clock.advance(1500)
    assert deployed.sweep() == {"refreshed": 1}
    document = deployed.document()
    assert (document["jwtKeyId"], document["kmsKeyId"]) == ("key-2", new)
    assert "jwtKeyIdNext" not in document and "kmsKeyIdNext" not in document
    assert "jwt_key_promoted" in changes


def test_bad_jwt_documents_are_refused_naming_the_key() -> None:
    base = {"instanceUrl": "https://x.service-now.com", "clientId": "c", "clientSecret": "s", "grantType": "jwt_bearer"}
    cases = {
        "jwtSubject/jwtKeyId/kmsKeyId": {"jwtKeyId": "k"},
        "kmsKeyId": {"jwtSubject": "u", "jwtKeyId": "k", "kmsKeyId": "not a key"},
        "jwtKeyIdNext/kmsKeyIdNext": {"jwtSubject": "u", "jwtKeyId": "k", "kmsKeyId": "alias/a", "jwtKeyIdNext": "n"},
    }
    for key, fields in cases.items():
        with pytest.raises(Exception) as raised:
            parse_connection("prod", json.dumps({**base, **fields}), ["x.service-now.com"])
        assert f"'{key}'" in str(raised.value) and "'prod'" in str(raised.value)


def test_the_cli_refuses_an_incomplete_jwt_connection(aws: str) -> None:
    err = io.StringIO()
    code = cli(
        ["--allowed-hosts", "127.0.0.1", "connections", "add", "prod", "--instance-url", "http://127.0.0.1:9",
         "--client-id", CLIENT_ID, "--grant-type", "jwt_bearer", "--jwt-subject", SUBJECT],
        out=io.StringIO(), err=err, stdin=io.StringIO("client-secret-J9\n"),
    )  # fmt: skip
    assert code == 2 and "--jwt-key-id" in err.getvalue() and "client-secret-J9" not in err.getvalue()
    assert boto3.client("secretsmanager").list_secrets()["SecretList"] == []


def test_the_emulator_checks_each_claim_as_servicenow_does(kms: Any) -> None:
    """The stand-in must refuse what ServiceNow refuses, or the tests above prove nothing."""
    key = new_key(kms)
    signer = KmsSigner(kms)
    with ServiceNowEmulator(clock=lambda: NOW.timestamp()) as emulator:
        emulator.register_client(CLIENT_ID, CLIENT_SECRET)
        emulator.add_user(SUBJECT, "pw-J2", email="svc@example.com")
        emulator.add_jwt_verifier(CLIENT_ID, "key-1", kms_certificate(kms, key, "t", NOW))

        def grant(assertion: str) -> int:
            form = {"grant_type": GRANT, "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET, "assertion": assertion}
            return requests.post(f"{emulator.url}/oauth_token.do", data=form, timeout=5).status_code

        def signed(claims: dict[str, Any], kid: str = "key-1") -> str:
            header = b64url(json.dumps({"alg": "RS256", "typ": "JWT", "kid": kid}).encode())
            unsigned = f"{header}.{b64url(json.dumps(claims).encode())}"
            answer = kms.sign(
                KeyId=key, Message=unsigned.encode(), MessageType="RAW", SigningAlgorithm="RSASSA_PKCS1_V1_5_SHA_256"
            )
            return f"{unsigned}.{b64url(answer['Signature'])}"

        now = int(NOW.timestamp())
        good = {"iss": CLIENT_ID, "aud": CLIENT_ID, "sub": SUBJECT, "iat": now, "exp": now + 300}
        assert grant(signed({**good, "jti": "a"})) == 200
        assert grant(signed({**good, "jti": "a"})) == 401  # replayed jti
        assert grant(signed({**good, "jti": "b", "aud": "other"})) == 401
        assert grant(signed({**good, "jti": "c", "iss": "other"})) == 401
        assert grant(signed({**good, "jti": "d", "exp": now - 301})) == 401  # expired beyond the 300 s skew
        assert grant(signed({**good, "jti": "e", "exp": now - 100})) == 200  # within the skew
        assert grant(signed({**good, "jti": "f", "nbf": now + 301})) == 401
        assert grant(signed({**good, "jti": "g", "sub": "nobody"})) == 401
        assert grant(signed({**good, "jti": "h"}, kid="key-9")) == 401
        assert grant(signed({**good}, kid="key-1")) == 401  # no jti while JTI verification is on
        tampered = signed({**good, "jti": "i"}).split(".")
        tampered[1] = b64url(json.dumps({**good, "jti": "i", "sub": "admin"}).encode())
        assert grant(".".join(tampered)) == 401
        assert grant(signer.assertion(CLIENT_ID, SUBJECT, JwtKey("key-1", key), NOW, host="x")) == 200
        emulator.add_jwt_verifier(CLIENT_ID, "key-1", kms_certificate(kms, key, "t", NOW), user_field="email")
        assert grant(signer.assertion(CLIENT_ID, SUBJECT, JwtKey("key-1", key), NOW, host="x")) == 401
        assert grant(signer.assertion(CLIENT_ID, "svc@example.com", JwtKey("key-1", key), NOW, host="x")) == 200


def test_kms_errors_become_the_provider_error_they_amount_to() -> None:
    from botocore.exceptions import ClientError

    class Refusing:
        def __init__(self, code: str) -> None:
            self.code = code

        def sign(self, **_: Any) -> Any:
            raise ClientError({"Error": {"Code": self.code, "Message": "m"}}, "Sign")

    key = JwtKey("k", "alias/a")
    with pytest.raises(RateLimited):
        KmsSigner(Refusing("ThrottlingException")).assertion("c", "s", key, NOW, host="h")
    with pytest.raises(InstanceUnavailable) as raised:
        KmsSigner(Refusing("AccessDeniedException")).assertion("c", "s", key, NOW, host="h")
    assert "kms:Sign" in str(raised.value) and not isinstance(raised.value, CredentialRejected)


def _active_jwt(deployed: Deployed, kms: Any) -> str:
    deployed.emulator.add_user(SUBJECT, "unused-password-J1")
    key = new_key(kms)
    trust(deployed.emulator, kms, "key-1", key)
    add_jwt_connection(deployed, key)
    assert deployed.sweep() == {"refreshed": 1}
    return key


@pytest.mark.parametrize(
    "key_id,kms_key", [("key-2", "not a kms key"), ("", "alias/next-key")], ids=["bad-kms-key", "empty-kid"]
)
def test_stage_jwt_key_refuses_bad_input_and_changes_nothing(
    deployed: Deployed, kms: Any, key_id: str, kms_key: str
) -> None:
    _active_jwt(deployed, kms)
    before = deployed.world.value()
    out, err = io.StringIO(), io.StringIO()
    code = cli(
        ["--allowed-hosts", "127.0.0.1", "connections", "stage-jwt-key", "prod", "--jwt-key-id", key_id,
         "--jwt-kms-key", kms_key],
        out=out, err=err,
    )  # fmt: skip
    after = deployed.world.value()
    assert code == 2 and after == before, (code, after[1].get("kmsKeyIdNext"), after[1].get("jwtKeyIdNext"))
    assert "must" in err.getvalue() and "'prod'" in err.getvalue()
    deployed.clock.advance(1500)
    assert deployed.sweep() == {"refreshed": 1}  # the connection goes on working


def test_a_client_secret_and_a_key_rolled_together_are_tried_together(deployed: Deployed, kms: Any) -> None:
    """Found by the review: both rolled at once (stage-secret + stage-jwt-key, then both changed in ServiceNow)
    tried only (new secret, old key) and (old secret, new key); now also both together."""
    _active_jwt(deployed, kms)
    new = new_key(kms)
    deployed.world.store.update(
        "prod",
        lambda c: replace(
            c, extra={**c.extra, "clientSecretNext": "next-secret-Q9"}, jwt_key_id_next="key-2", kms_key_id_next=new
        ),
    )
    trust(deployed.emulator, kms, "key-2", new)
    deployed.emulator.set_client_secret(CLIENT_ID, "next-secret-Q9")
    deployed.emulator.remove_jwt_verifier(CLIENT_ID, "key-1")
    deployed.clock.advance(1500)
    result = deployed.sweep()
    assert result == {"refreshed": 1}


def test_a_jwt_refresh_honours_a_long_retry_after(deployed: Deployed, kms: Any) -> None:
    """Found by the review: a 429 with Retry-After 3600 was retried at once by the JWT retry; now it ends the
    attempt, as for the other grants, and the backoff honours it."""
    _active_jwt(deployed, kms)
    before = deployed.emulator.token_requests()
    deployed.emulator.inject("rate_limit", count=1, retry_after=3600)
    deployed.clock.advance(1500)
    assert deployed.sweep() == {"failed": 1}
    assert deployed.emulator.token_requests() - before == 1  # the 429 is not retried: the backoff honours it


def test_no_promotion_is_announced_when_the_operator_restaged_meanwhile(deployed: Deployed, kms: Any) -> None:
    """Found by the review: the operator re-stages a different key while the sweep tries the first staged one;
    the write leaves the document's key alone, and no "promoted" event may claim otherwise."""
    _active_jwt(deployed, kms)
    changes = record_events(deployed)
    staged, other = new_key(kms), new_key(kms)
    deployed.world.store.update("prod", lambda c: replace(c, jwt_key_id_next="key-2", kms_key_id_next=staged))
    trust(deployed.emulator, kms, "key-2", staged)
    deployed.emulator.remove_jwt_verifier(CLIENT_ID, "key-1")
    refresher = deployed.handler.refresher
    real = refresher._try_promoted

    calls: list[int] = []

    def racing(*args: Any, **kwargs: Any) -> Any:
        # the operator's `make stage-jwt-key ... key-3` lands between the read and the write
        calls.append(1)
        deployed.world.store.update("prod", lambda c: replace(c, jwt_key_id_next="key-3", kms_key_id_next=other))
        return real(*args, **kwargs)

    refresher._try_promoted = racing
    deployed.clock.advance(1500)
    deployed.sweep()
    assert calls, "the staged key was never tried"
    assert deployed.document()["jwtKeyId"] == "key-1" and deployed.document()["jwtKeyIdNext"] == "key-3"
    assert "jwt_key_promoted" not in changes, changes
