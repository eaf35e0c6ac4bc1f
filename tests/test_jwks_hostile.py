"""GET /connections/{name}/jwks.json against hostile names, secrets and keys (found by review, each failed before its
fix): a deeply nested secret and names outside the router's characters get the one 404; impossible keys are refused."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from core.jwks import UnsupportedPublicKey, read_rsa_public_key
from tests.test_callback import Stack
from tests.test_callback import stack as stack
from tests.test_jwks import fetch


def test_a_deeply_nested_json_secret_gets_the_same_404_as_an_unknown_name(stack: Stack) -> None:
    """(b) A broken secret (valid JSON, well under Secrets Manager's 64 KiB, but nested past Python's recursion
    limit) makes json.loads raise RecursionError, which parse_connection does not turn into SecretFormatError:
    the endpoint answers a 500 HTML page instead of the JSON 404, telling this name exists."""
    stack.secretsmanager.create_secret(Name="servicenow-oauth/deep", SecretString="[" * 5000 + "]" * 5000)
    unknown, deep = fetch(stack, "nosuch"), fetch(stack, "deep")
    assert unknown["statusCode"] == 404
    assert deep == unknown, (deep["statusCode"], deep["headers"], deep["body"][:200])


@pytest.mark.parametrize("name", ['a"b', "a`b", "a\\b"])
def test_an_invalid_name_outside_the_route_segment_gets_the_same_404(stack: Stack, name: str) -> None:
    """(b) An invalid name with a character the route's segment pattern leaves out (sent unencoded, as curl or any
    HTTP client can; API Gateway's {name} takes any segment) never reaches `jwks`: the router's HTML 404 page
    answers, not the endpoint's JSON 404 that ".." or "a%3Cb%3E" get."""
    invalid_in_route, odd = fetch(stack, ".."), fetch(stack, name)
    assert invalid_in_route["statusCode"] == 404
    assert odd == invalid_in_route, (odd["statusCode"], odd["headers"], odd["body"][:120])


def _spki(n: int, e: int) -> bytes:
    # Built by hand: cryptography may refuse such numbers.
    def integer(value: int) -> bytes:
        raw = value.to_bytes(value.bit_length() // 8 + 1, "big")
        return b"\x02" + length(len(raw)) + raw

    def length(size: int) -> bytes:
        if size < 0x80:
            return bytes([size])
        body = size.to_bytes((size.bit_length() + 7) // 8, "big")
        return bytes([0x80 | len(body)]) + body

    def seq(content: bytes) -> bytes:
        return b"\x30" + length(len(content)) + content

    rsa_key = seq(integer(n) + integer(e))
    bits = b"\x03" + length(len(rsa_key) + 1) + b"\x00" + rsa_key
    return seq(seq(bytes.fromhex("06092a864886f70d0101010500")) + bits)


def test_the_der_reader_accepts_our_encoder_for_a_real_key() -> None:
    """Control: the hand encoder gives exactly what cryptography does, and the reader reads it."""
    numbers = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key().public_numbers()
    real = rsa.RSAPublicNumbers(numbers.e, numbers.n).public_key()
    der = real.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert _spki(numbers.n, numbers.e) == der
    assert read_rsa_public_key(der) == (numbers.n, numbers.e)


@pytest.mark.parametrize(
    ("n", "e"),
    [(1 << 2047, 65537), ((1 << 2048) - 2, 65537), ((1 << 2048) - 1, (1 << 2048) + 1)],
    ids=["even modulus 2^2047", "even modulus 2^2048-2", "exponent larger than modulus"],
)
def test_the_der_reader_refuses_a_key_that_is_not_rsa(n: int, e: int) -> None:
    """(e) Not a well-formed RSA key (an even modulus has the factor 2; e must be below n), yet published."""
    with pytest.raises(UnsupportedPublicKey):
        read_rsa_public_key(_spki(n, e))
