import pytest

from core.allowlist import DEFAULT_ALLOWED_HOSTS, normalize_instance_url, parse_allowed_hosts
from core.errors import InstanceNotAllowed

LOCAL = ("*.service-now.com", "127.0.0.1")


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://acme.service-now.com", "https://acme.service-now.com"),
        ("https://ACME.service-now.com/", "https://acme.service-now.com"),
        ("https://acme.service-now.com:443", "https://acme.service-now.com"),
        ("https://dev-1.eu.service-now.com", "https://dev-1.eu.service-now.com"),
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
    ],
)
def test_allowed_urls_are_normalised(url: str, expected: str) -> None:
    assert normalize_instance_url(url, LOCAL) == expected


@pytest.mark.parametrize(
    "url",
    [
        "http://acme.service-now.com",  # plain http to a real instance
        "https://service-now.com",  # the bare suffix is no instance
        "https://acme.service-now.com.evil.example",
        "https://evilservice-now.com",
        "https://acme.service-now.com@evil.example",
        "https://user:pw@acme.service-now.com",
        "https://acme.service-now.com/oauth_token.do",
        "https://acme.service-now.com?x=1",
        "https://acme.service-now.com:8443",
        "http://127.0.0.2:8080",  # loopback, but not named by the allowlist
        "http://localhost:8080",
        "https://169.254.169.254",
        "file:///etc/passwd",
        "javascript:alert(1)",
        "",
        "https://[::1",
    ],
)
def test_everything_else_is_refused_with_a_clear_message(url: str) -> None:
    with pytest.raises(InstanceNotAllowed) as raised:
        normalize_instance_url(url, LOCAL)
    assert "instance" in str(raised.value)
    assert "pw" not in str(raised.value)


def test_default_allowlist_is_servicenow_only() -> None:
    assert parse_allowed_hosts("") == DEFAULT_ALLOWED_HOSTS
    assert parse_allowed_hosts(" a.example , *.b.example ") == ("a.example", "*.b.example")
    assert normalize_instance_url("https://x.servicenowservices.com", DEFAULT_ALLOWED_HOSTS)
    with pytest.raises(InstanceNotAllowed):
        normalize_instance_url("http://127.0.0.1:8080", DEFAULT_ALLOWED_HOSTS)
