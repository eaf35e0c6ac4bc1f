"""The emulator's admin Table API honours what is written as a real instance does (each test failed before its
fix, found by review): a deleted, deactivated or replaced certificate, a refused PATCH, an ORDERBY query."""

from __future__ import annotations

import base64
import json
import secrets
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from local.servicenow_emulator import ServiceNowEmulator

JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
USER = "svc.jwt"


@pytest.fixture
def server() -> Iterator[ServiceNowEmulator]:
    with ServiceNowEmulator() as instance:
        instance.add_user(USER, "Pa55w0rd-review")
        yield instance


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def certificate(key: rsa.RSAPrivateKey) -> str:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "review")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def assertion(key: rsa.RSAPrivateKey, kid: str, client_id: str) -> str:
    now = int(time.time())
    header = b64url(json.dumps({"alg": "RS256", "kid": kid, "typ": "JWT"}).encode())
    claims = b64url(
        json.dumps(
            {
                "iss": client_id,
                "aud": client_id,
                "sub": USER,
                "iat": now,
                "nbf": now,
                "exp": now + 300,
                "jti": secrets.token_hex(8),
            }
        ).encode()
    )
    signature = key.sign(f"{header}.{claims}".encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{header}.{claims}.{b64url(signature)}"


def api(server: ServiceNowEmulator, method: str, path: str, body: Any = None, **kw: Any) -> requests.Response:
    return requests.request(
        method,
        f"{server.url}/api/now/table/{path}",
        auth=kw.pop("auth", ("admin", server.admin_password)),
        json=body,
        timeout=10,
        **kw,
    )


def jwt_grant(server: ServiceNowEmulator, client_id: str, secret: str, key: rsa.RSAPrivateKey, kid: str) -> int:
    return requests.post(
        f"{server.url}/oauth_token.do",
        data={
            "grant_type": JWT_BEARER,
            "client_id": client_id,
            "client_secret": secret,
            "assertion": assertion(key, kid, client_id),
        },
        timeout=10,
    ).status_code


def password_grant(server: ServiceNowEmulator, client_id: str, secret: str) -> int:
    return requests.post(
        f"{server.url}/oauth_token.do",
        data={
            "grant_type": "password",
            "client_id": client_id,
            "client_secret": secret,
            "username": USER,
            "password": "Pa55w0rd-review",
        },
        timeout=10,
    ).status_code


def jwt_setup(server: ServiceNowEmulator) -> tuple[str, str, str, str, rsa.RSAPrivateKey]:
    """An active JWT entry, a certificate and a verifier map for kid "key-1"; the grant works."""
    secret = "review-secret-" + secrets.token_hex(8)
    entry = api(server, "POST", "oauth_jwt", {"name": "review", "client_secret": secret}).json()["result"]
    key = new_key()
    cert = api(server, "POST", "sys_certificate", {"name": "review", "pem_certificate": certificate(key)})
    assert cert.status_code == 201, cert.text
    cert_id = cert.json()["result"]["sys_id"]
    mapping = api(
        server,
        "POST",
        "jwt_verifier_map",
        {"name": "review", "kid": "key-1", "sys_certificate": cert_id, "oauth_jwt": entry["sys_id"]},
    )
    assert mapping.status_code == 201, mapping.text
    assert jwt_grant(server, entry["client_id"], secret, key, "key-1") == 200
    return entry["client_id"], secret, cert_id, mapping.json()["result"]["sys_id"], key


def test_a_deleted_certificate_is_no_longer_trusted(server: ServiceNowEmulator) -> None:
    client_id, secret, cert_id, _, key = jwt_setup(server)
    assert api(server, "DELETE", f"sys_certificate/{cert_id}").status_code == 204
    assert jwt_grant(server, client_id, secret, key, "key-1") == 401


def test_a_deactivated_certificate_is_no_longer_trusted(server: ServiceNowEmulator) -> None:
    client_id, secret, cert_id, _, key = jwt_setup(server)
    assert api(server, "PATCH", f"sys_certificate/{cert_id}", {"active": "false"}).status_code == 200
    assert jwt_grant(server, client_id, secret, key, "key-1") == 401


def test_a_certificate_replaced_in_place_stops_trusting_the_old_key(server: ServiceNowEmulator) -> None:
    client_id, secret, cert_id, _, old = jwt_setup(server)
    new = new_key()
    patched = api(server, "PATCH", f"sys_certificate/{cert_id}", {"pem_certificate": certificate(new)})
    assert patched.status_code == 200, patched.text
    assert jwt_grant(server, client_id, secret, old, "key-1") == 401
    assert jwt_grant(server, client_id, secret, new, "key-1") == 200


def test_a_refused_patch_changes_nothing_not_even_the_secret(server: ServiceNowEmulator) -> None:
    secret = "review-secret-" + secrets.token_hex(8)
    entry = api(server, "POST", "oauth_entity", {"name": "review", "client_secret": secret}).json()["result"]
    refused = api(
        server, "PATCH", f"oauth_entity/{entry['sys_id']}", {"client_id": "another-id", "client_secret": "x" * 20}
    )
    assert refused.status_code == 400
    assert password_grant(server, entry["client_id"], secret) == 200
    # A later, unrelated update must not bring the refused secret to life.
    assert api(server, "PATCH", f"oauth_entity/{entry['sys_id']}", {"name": "renamed"}).status_code == 200
    assert password_grant(server, entry["client_id"], secret) == 200
    assert password_grant(server, entry["client_id"], "x" * 20) == 401


def test_a_malformed_dictionary_query_gets_servicenows_error_shape_not_a_500(server: ServiceNowEmulator) -> None:
    answer = api(server, "GET", "sys_dictionary", params={"sysparm_query": "name=oauth_entity^ORDERBYelement"})
    assert answer.status_code < 500, answer.text
    assert "error" in answer.json() or "result" in answer.json()
