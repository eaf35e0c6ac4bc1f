"""The certificate ServiceNow's JWT Verifier Map needs, for a KMS key whose private half never leaves KMS.

`cryptography` builds the to-be-signed part (it cannot sign with a key it does not hold, so a throwaway RSA
key of the same algorithm signs a first draft whose TBS bytes we keep); KMS signs those bytes; the final DER is
TBS + algorithm + signature, and is checked against the KMS public key before it is printed. A CLI/dev
dependency only: nothing here is packaged into Lambda.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from core.jwt_bearer import SIGNING_ALGORITHM

# AlgorithmIdentifier { sha256WithRSAEncryption, NULL } (RFC 4055), what the TBS part names too.
SHA256_WITH_RSA = bytes.fromhex("300d06092a864886f70d01010b0500")


def _der_length(length: int) -> bytes:
    if length < 0x80:
        return bytes([length])
    encoded = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(encoded)]) + encoded


def _der(tag: int, content: bytes) -> bytes:
    return bytes([tag]) + _der_length(len(content)) + content


def check_signing_key(kms: Any, kms_key_id: str) -> rsa.RSAPublicKey:
    """The KMS key's public half, if it is an RSA SIGN_VERIFY key that signs RS256 (ValueError otherwise)."""
    answer = kms.get_public_key(KeyId=kms_key_id)
    if answer.get("KeyUsage") != "SIGN_VERIFY" or SIGNING_ALGORITHM not in answer.get("SigningAlgorithms", []):
        raise ValueError(f"KMS key {kms_key_id!r} is not an RSA SIGN_VERIFY key that can sign with {SIGNING_ALGORITHM}")
    public_key = serialization.load_der_public_key(answer["PublicKey"])
    if not isinstance(public_key, rsa.RSAPublicKey):
        raise ValueError(f"KMS key {kms_key_id!r} is not an RSA key (ServiceNow's RS256 needs one)")
    return public_key


def kms_certificate(kms: Any, kms_key_id: str, common_name: str, now: datetime, days: int = 730) -> str:
    """A self-signed X.509 certificate (PEM) for the KMS key, its signature made by `kms:Sign`."""
    public_key = check_signing_key(kms, kms_key_id)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    draft = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
        .sign(rsa.generate_private_key(public_exponent=65537, key_size=2048), hashes.SHA256())
    )
    tbs = draft.tbs_certificate_bytes
    signature = kms.sign(KeyId=kms_key_id, Message=tbs, MessageType="RAW", SigningAlgorithm=SIGNING_ALGORITHM)
    der = _der(0x30, tbs + SHA256_WITH_RSA + _der(0x03, b"\x00" + signature["Signature"]))
    certificate = x509.load_der_x509_certificate(der)
    # The proof that what ServiceNow gets verifies: the certificate's own signature, by its own key.
    public_key.verify(certificate.signature, certificate.tbs_certificate_bytes, padding.PKCS1v15(), hashes.SHA256())
    return certificate.public_bytes(serialization.Encoding.PEM).decode("ascii")
