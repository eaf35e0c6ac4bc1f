"""Hostile input at the public HTTP API, property by property.

Payload-2.0 events built from events/*.json go through the real `handlers.callback.lambda_handler`
in-process, against the moto server and the ServiceNow emulator (tests/conftest.py). For every example:

1. no 5xx at all (healthy emulator, valid connection secret);
2. nothing reflected as markup: an HTML body holds only the page template's own tags and attributes,
   never a raw `<script`, `<img` or `<svg`, and `onerror=` / `javascript:` only ever as escaped text;
3. the connection secret's AWSCURRENT (VersionId, SecretString) is byte-identical before and after;
4. no code exchange (the emulator's token endpoint is never hit) and no outbound connection, DNS lookup or
   HTTP request to anything but 127.0.0.1 at the emulator's or moto's port (anything else is blocked);
5. a 302 goes to the connection's own `<instanceUrl>/oauth_auth.do?` with the configured redirect_uri.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import html
import importlib
import json
import re
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from html.parser import HTMLParser
from typing import Any
from unittest import mock
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

import pytest
import requests
import urllib3.connectionpool
from aws_lambda_powertools.utilities import parameters
from hypothesis import HealthCheck, given, settings
from hypothesis import event as observe
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from core.signing import issue_state, sign_authorize_link
from tests.conftest import CLIENT_ID, REDIRECT_URI
from tests.test_callback import API, EVENTS, STATE_KEY, FakeContext, Stack, stack  # noqa: F401 (fixture)

pytestmark = pytest.mark.filterwarnings("ignore:No application metrics to publish")

FUZZ = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
KEY = STATE_KEY.encode()
TEMPLATES = {kind: json.loads((EVENTS / f"{kind}.json").read_text()) for kind in ("authorize", "callback")}
TOKEN_PATH = "/oauth_token.do"

# ---------------------------------------------------------------------------------------------- payloads

# Markup that survives the route's `{name}` pattern unencoded, so it reaches the handler as a connection name.
ROUTE_MARKUP = [
    "<img src=x onerror=alert(1)>",
    "<svg onload=alert(1)>",
    "<body onload=alert(1)>",
    "'><img src=x onerror=alert(1)>",
    "<iframe src=javascript:alert(1)>",
    "<script>alert(1)<%2Fscript>",
    "javascript:alert(1)",
]
MARKUP = [
    *ROUTE_MARKUP,
    "<script>alert(1)</script>",
    "<ScRiPt>alert(document.domain)</sCrIpT>",
    "<img src=x onerror=alert(1)>",
    '"><img src=x onerror=alert(1)>',
    "'><script>alert(1)</script>",
    "</title><script>alert(1)</script>",
    '</code><img src=x onerror="alert(1)">',
    "<svg/onload=alert(1)>",
    "javascript:alert(1)",
    "JaVaScRiPt:alert(1)",
    '" onerror="alert(1)',
    "' onerror='alert(1)' x='",
    "<a href=javascript:alert(1)>x</a>",
    "<!--<script>-->",
    "<style>*{}</style><script>x</script>",
    "%3Cscript%3Ealert(1)%3C%2Fscript%3E",
    "&lt;script&gt;",
    "\uff1cscript\uff1e",  # fullwidth < >
]
ODD = [
    "",
    " ",
    "../",
    "..%2F",
    "%2F",
    "%2e%2e%2f",
    "%00",
    "\x00",
    "\r\n",
    "\r\nSet-Cookie: pwned=1",
    "\r\nLocation: https://evil.example",
    "\t\x0b\x0c\x1b[31m",
    "\u202eevil",
    "\ufeff",
    "é",
    "日本語",
    "🙂",
    "9" * 12,
    "1" * 13,
    "-1",
    "0",
    "1e10",
    "\uff11\uff12\uff13",  # fullwidth digits: str.isdigit() says yes
    "\u0661\u0662\u0663",  # Arabic-Indic digits
    "\u00b2",  # superscript two: isdigit() but not int()
    "null",
    "[]",
    "{}",
    "%",
    "%%",
    "+",
    "=",
    "&",
    ",",
    ";",
    "https://evil.example/cb",
    "http://169.254.169.254/latest/meta-data/",
    "//evil.example",
    "\\\\evil.example",
    "A" * 600,
]
HUGE = ["A" * 100_000, "<script>" * 5_000, "é" * 20_000, "%2F" * 3_000, "\x00" * 10_000]
RAW_MARKERS = ("<script", "<img", "<svg")
ATTRIBUTE_MARKERS = ("onerror=", "javascript:")

hostile = st.one_of(
    st.sampled_from(MARKUP + ODD),
    st.text(max_size=40),
    st.builds(lambda a, p, b: a + p + b, st.text(max_size=8), st.sampled_from(MARKUP), st.text(max_size=8)),
)
hostile_or_huge = st.one_of(hostile, st.sampled_from(HUGE))
QUERY_KEYS = [
    "expires",
    "signature",
    "state",
    "code",
    "error",
    "error_description",
    "redirect_uri",
    "client_id",
    "response_type",
    "scope",
    "code_challenge",
    "code_challenge_method",
    "name",
    "__proto__",
    "Expires",
    "signature[]",
    "",
]
EXTRA_KEYS = [k for k in QUERY_KEYS if k not in ("expires", "signature")]
HEADER_NAMES = [
    "host",
    "x-forwarded-host",
    "x-forwarded-for",
    "x-forwarded-proto",
    "forwarded",
    "origin",
    "referer",
    "cookie",
    "authorization",
    "accept-encoding",
    "content-type",
    "user-agent",
    "accept-language",
]
NAMES = [
    "prod",
    "nope",
    "../prod",
    "..",
    ".",
    "prod/../prod",
    "..%2Fprod",
    "prod%2F..",
    "%2e%2e",
    "pr%6Fd",
    "prod%00",
    "prod\x00",
    "prod\r\nX-Injected: 1",
    "servicenow-oauth-state-key",
    "../servicenow-oauth-state-key",
    "prod.",
    "-prod",
    "PROD",
    "prod\u202e",
    "pröd",
    "\U0001d4c5\U0001d4c7\U0001d45c\U0001d4b9",
    "",
    "a" * 65,
    "a" * 5_000,
    *MARKUP,
]

query_pairs = st.lists(
    st.tuples(st.one_of(st.sampled_from(QUERY_KEYS), st.text(max_size=12)), hostile_or_huge), max_size=6
)
extra_pairs = st.lists(st.tuples(st.sampled_from(EXTRA_KEYS), hostile_or_huge), max_size=6)
header_maps = st.dictionaries(
    st.one_of(st.sampled_from(HEADER_NAMES), st.text(min_size=1, max_size=12).map(str.lower)),
    hostile_or_huge,
    max_size=5,
)
cookie_lists = st.one_of(st.none(), st.lists(hostile, max_size=3))
names = st.one_of(
    st.sampled_from(NAMES),
    st.sampled_from(NAMES),
    st.sampled_from(ROUTE_MARKUP),
    st.text(max_size=30),
    st.builds(lambda a, p: a + p, st.text(max_size=6), st.sampled_from(MARKUP)),
)
query_styles = st.sampled_from(["encoded", "encoded", "raw", "garbage"])
methods = st.sampled_from(["GET"] * 12 + ["HEAD", "POST", "OPTIONS"])


# --------------------------------------------------------------------------------------------- events


def build_event(
    kind: str,
    raw_path: str,
    pairs: list[tuple[str, str]],
    *,
    headers: dict[str, str] | None = None,
    query_style: str = "encoded",
    garbage: str = "",
    method: str = "GET",
    cookies: list[str] | None = None,
    path_name: str | None = None,
) -> dict[str, Any]:
    """A payload-2.0 event as API Gateway would send it: repeated query keys comma-joined, no key when empty."""
    event = copy.deepcopy(TEMPLATES[kind])
    event["rawPath"] = event["requestContext"]["http"]["path"] = raw_path
    event["requestContext"]["http"]["method"] = method
    event["routeKey"] = event["requestContext"]["routeKey"] = "$default" if method != "GET" else event["routeKey"]
    if query_style == "encoded":
        event["rawQueryString"] = urlencode(pairs)
    elif query_style == "raw":
        event["rawQueryString"] = "&".join(f"{key}={value}" for key, value in pairs)
    else:
        event["rawQueryString"] = garbage
    params: dict[str, str] = {}
    for key, value in pairs:
        params[key] = f"{params[key]},{value}" if key in params else value
    if params:
        event["queryStringParameters"] = params
    else:
        event.pop("queryStringParameters", None)
    if headers:
        event["headers"] = {**event["headers"], **headers}
    if cookies is not None:
        event["cookies"] = cookies
    if kind == "authorize":
        event["pathParameters"] = {"name": path_name if path_name is not None else raw_path.split("/")[2]}
    return event


def link_pairs(name: str) -> list[tuple[str, str]]:
    """The (expires, signature) pairs of a genuine operator link for `name`, signed with the stack's key."""
    url = sign_authorize_link(KEY, API, name, datetime.now(UTC))
    return parse_qsl(url.rsplit("?", 1)[1])


# ------------------------------------------------------------------------------------- egress control


@dataclass
class Egress:
    """Every outbound attempt the handler makes while installed; anything not to an allowed port is blocked."""

    ports: frozenset[int]
    seen: list[tuple[str, str, int | None]] = field(default_factory=list)
    sent: list[str] = field(default_factory=list)

    def allow(self, via: str, host: Any, port: Any) -> bool:
        host = host.decode() if isinstance(host, bytes) else str(host)
        try:
            number = int(port) if port is not None else None
        except (TypeError, ValueError):
            number = None
        self.seen.append((via, host, number))
        return host == "127.0.0.1" and number in self.ports

    @property
    def forbidden(self) -> list[tuple[str, str, int | None]]:
        return [(via, host, port) for via, host, port in self.seen if host != "127.0.0.1" or port not in self.ports]


@contextmanager
def watch_egress(ports: frozenset[int]) -> Iterator[Egress]:
    """Record (and refuse, if not allowed) requests' sends, urllib3 requests (boto3's too), DNS and TCP connects."""
    egress = Egress(ports)
    real_send = requests.Session.send
    real_pool_manager = urllib3.PoolManager.urlopen
    real_urlopen = urllib3.connectionpool.HTTPConnectionPool.urlopen
    real_connect = socket.socket.connect
    real_getaddrinfo = socket.getaddrinfo

    def send(session: requests.Session, request: requests.PreparedRequest, **kwargs: Any) -> Any:
        parts = urlsplit(request.url or "")
        egress.sent.append(f"{parts.scheme}://{parts.netloc}{parts.path}")
        if not egress.allow("requests", parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)):
            raise requests.ConnectionError(f"blocked by test_fuzz: {parts.hostname}")
        return real_send(session, request, **kwargs)

    def pool_manager(manager: Any, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        """The ServiceNow client's own requests (botocore and requests go to the pools underneath directly)."""
        parts = urlsplit(url)
        egress.sent.append(f"{parts.scheme}://{parts.netloc}{parts.path}")
        return real_pool_manager(manager, method, url, *args, **kwargs)

    def urlopen(pool: Any, *args: Any, **kwargs: Any) -> Any:
        if not egress.allow("urllib3", pool.host, pool.port):
            raise urllib3.exceptions.NewConnectionError(pool, f"blocked by test_fuzz: {pool.host}")
        return real_urlopen(pool, *args, **kwargs)

    def connect(sock: socket.socket, address: Any) -> Any:
        host, port = (address[0], address[1]) if isinstance(address, tuple) else (address, None)
        if not egress.allow("connect", host, port):
            raise ConnectionRefusedError(f"blocked by test_fuzz: {host}")
        return real_connect(sock, address)

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if not egress.allow("getaddrinfo", host, port):
            raise socket.gaierror(f"blocked by test_fuzz: {host}")
        return real_getaddrinfo(host, port, *args, **kwargs)

    with (
        mock.patch.object(requests.Session, "send", send),
        mock.patch.object(urllib3.PoolManager, "urlopen", pool_manager),
        mock.patch.object(urllib3.connectionpool.HTTPConnectionPool, "urlopen", urlopen),
        mock.patch.object(socket.socket, "connect", connect),
        mock.patch.object(socket, "getaddrinfo", getaddrinfo),
    ):
        yield egress


# ------------------------------------------------------------------------------------------ properties


ALLOWED_MARKUP = {
    "html": {"lang"},
    "head": set(),
    "meta": {"charset", "name", "content"},
    "title": set(),
    "style": set(),
    "body": set(),
    "h1": {"class"},
    "p": {"id"},
    "code": {"id"},
    "dl": set(),
    "dt": set(),
    "dd": {"id"},
}


class Markup(HTMLParser):
    """Every tag, attribute, comment and declaration in a page that is not the template's own."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.problems: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in ALLOWED_MARKUP:
            self.problems.append(f"tag <{tag}>")
            return
        for name, value in attrs:
            text = re.sub(r"[\x00-\x20]", "", value or "").lower()
            if name not in ALLOWED_MARKUP[tag] or name.startswith("on") or "javascript:" in text:
                self.problems.append(f"attribute {name}={value!r} on <{tag}>")

    handle_startendtag = handle_starttag

    def handle_comment(self, data: str) -> None:
        self.problems.append(f"comment <!--{data[:40]}-->")

    def handle_decl(self, decl: str) -> None:
        if decl.lower() != "doctype html":
            self.problems.append(f"declaration <!{decl[:40]}>")

    def handle_pi(self, data: str) -> None:
        self.problems.append(f"processing instruction <?{data[:40]}>")

    def unknown_decl(self, data: str) -> None:
        self.problems.append(f"declaration <![{data[:40]}]>")


def tag_contents(body: str) -> list[str]:
    """The raw text inside every `<...>` of a body (where an attribute could hide)."""
    return re.findall(r"<[^>]*>", body)


def assert_no_markup_reflected(answer: dict[str, Any]) -> None:
    body = answer.get("body") or ""
    headers = answer.get("headers") or {}
    lowered = body.lower()
    for marker in RAW_MARKERS:
        assert marker not in lowered, f"raw {marker!r} reflected into the body"
    if not headers.get("Content-Type", "").startswith("text/html"):
        assert answer["statusCode"] == 302 and body == "", f"non-HTML answer: {answer['statusCode']} {body[:200]!r}"
        return
    for tag in tag_contents(body):
        for marker in ATTRIBUTE_MARKERS:
            assert marker not in tag.lower(), f"{marker!r} inside a tag: {tag[:200]!r}"
    parser = Markup()
    parser.feed(body)
    parser.close()
    assert not parser.problems, f"markup that is not the template's: {parser.problems[:5]}"


def assert_headers_safe(answer: dict[str, Any]) -> None:
    headers = answer.get("headers") or {}
    for name, value in headers.items():
        assert "\r" not in str(value) and "\n" not in str(value), f"CR/LF in response header {name}"
    assert headers.get("Content-Security-Policy", "").startswith("default-src 'none'"), headers
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"], headers  # no page may be framed
    assert headers.get("X-Content-Type-Options") == "nosniff", headers
    assert headers.get("Cache-Control") == "no-store", headers


# Everything `oauth_auth.do` may be given; the attacker's extra query parameters must never be passed along.
LOCATION_PARAMETERS = frozenset(
    ("response_type", "client_id", "redirect_uri", "state", "code_challenge", "code_challenge_method", "scope")
)


def assert_redirect_is_to_the_instance(answer: dict[str, Any], instance_url: str) -> None:
    if answer["statusCode"] != 302:
        return
    location = answer["headers"]["Location"]
    assert location.startswith(f"{instance_url}/oauth_auth.do?"), f"open redirect: {location[:200]!r}"
    query = parse_qsl(urlsplit(location).query, keep_blank_values=True)
    counts: dict[str, int] = {}
    for key, _ in query:
        counts[key] = counts.get(key, 0) + 1
    assert all(count == 1 for count in counts.values()), f"repeated parameters in Location: {counts}"
    values = dict(query)
    assert values["redirect_uri"] == REDIRECT_URI, f"redirect_uri was steered: {values['redirect_uri']!r}"
    assert values["client_id"] == CLIENT_ID
    assert values["response_type"] == "code" and values["code_challenge_method"] == "S256"
    assert set(values) <= LOCATION_PARAMETERS, f"extra parameters in Location: {sorted(values)}"


@dataclass
class World:
    """A stack with one healthy authorization_code connection `prod`, and the ports outbound traffic may use."""

    stack: Stack
    ports: frozenset[int]

    @property
    def token_requests(self) -> int:
        return sum(1 for entry in self.stack.emulator.requests_log if entry["path"] == TOKEN_PATH)

    def call(self, event: dict[str, Any]) -> tuple[dict[str, Any], Egress]:
        """Invoke the handler and check properties 1-5 (a 5xx is reported with the event that caused it)."""
        before = self.stack.snapshot()
        tokens = self.token_requests
        with watch_egress(self.ports) as egress:
            answer = self.stack.handler.lambda_handler(event, FakeContext())
        if currently_in_test_context():
            title = re.search(r"<title>(.*?)</title>", answer.get("body") or "")
            observe(f"HTTP {answer['statusCode']} {title.group(1) if title else ''}")  # --hypothesis-show-statistics
        assert answer["statusCode"] < 500, f"{answer['statusCode']} for {summarize(event)}: {answer['body'][:300]}"
        assert_no_markup_reflected(answer)
        assert_headers_safe(answer)
        assert self.stack.snapshot() == before, "the connection secret changed"
        assert self.token_requests == tokens, "random input reached a code exchange"
        assert not egress.forbidden, f"outbound outside the emulator/moto: {egress.forbidden}"
        assert_redirect_is_to_the_instance(answer, self.stack.emulator.url)
        return answer, egress


def clip(value: Any) -> str:
    return repr(value if len(str(value)) < 120 else f"{str(value)[:120]}…")


def summarize(event: dict[str, Any]) -> str:
    return (
        f"rawPath={clip(event['rawPath'])} method={event['requestContext']['http']['method']} "
        f"query={clip(event.get('queryStringParameters'))}"
    )


@pytest.fixture
def world(stack: Stack, aws: str) -> World:  # noqa: F811 (the imported fixture)
    stack.create_connection(scope="useraccount")
    return World(stack, frozenset({stack.emulator.port, urlsplit(aws).port or 80}))


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forged_state(name: str, key: bytes) -> str:
    """A well-formed state for `name` MAC'd with some other key (or structure-correct garbage)."""
    raw = json.dumps({"c": name, "i": int(datetime.now(UTC).timestamp()), "n": "AAAA"}, separators=(",", ":")).encode()
    return b64(raw + hmac.new(key, b"state\x00" + raw, hashlib.sha256).digest())


# -------------------------------------------------------------------------------------- the fuzz tests


@FUZZ
@given(
    name=names,
    encode=st.sampled_from(["raw", "raw", "quoted", "quoted-keep-slash"]),
    signed_for=st.sampled_from(["nobody", "segment", "segment", "prod"]),
    link_first=st.booleans(),
    pairs=query_pairs,
    headers=header_maps,
    cookies=cookie_lists,
    style=query_styles,
    garbage=hostile,
    method=methods,
)
def test_authorize_with_hostile_names_queries_and_headers(
    world: World,
    name: str,
    encode: str,
    signed_for: str,
    link_first: bool,
    pairs: list[tuple[str, str]],
    headers: dict[str, str],
    cookies: list[str] | None,
    style: str,
    garbage: str,
    method: str,
) -> None:
    segment = {"raw": name, "quoted": quote(name, safe=""), "quoted-keep-slash": quote(name)}[encode]
    link = [] if signed_for == "nobody" else link_pairs(segment if signed_for == "segment" else "prod")
    query = link + pairs if link_first else pairs + link
    event = build_event(
        "authorize",
        f"/connections/{segment}/authorize",
        query,
        headers=headers,
        query_style=style,
        garbage=garbage,
        method=method,
        cookies=cookies,
        path_name=name,
    )
    world.call(event)


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("name", ROUTE_MARKUP)
def test_a_markup_connection_name_is_shown_escaped(world: World, name: str, signed: bool) -> None:
    """The refusal page names the connection from the path: as escaped text, never as markup."""
    link = link_pairs(name) if signed else []
    answer, _ = world.call(build_event("authorize", f"/connections/{name}/authorize", link))
    assert answer["statusCode"] == (400 if signed else 403), answer["body"][:300]
    if not signed:  # an unsigned link's page says which connection the link was for
        assert f'<code id="connection">{html.escape(name)}</code>' in answer["body"]


@FUZZ
@given(extras=extra_pairs, headers=header_maps, style=query_styles, garbage=hostile, before=st.booleans())
def test_a_valid_link_with_hostile_extras_still_redirects_only_to_the_instance(
    world: World, extras: list[tuple[str, str]], headers: dict[str, str], style: str, garbage: str, before: bool
) -> None:
    link = link_pairs("prod")
    event = build_event(
        "authorize",
        "/connections/prod/authorize",
        extras + link if before else link + extras,
        headers=headers,
        query_style=style,
        garbage=garbage,
    )
    answer, egress = world.call(event)
    assert answer["statusCode"] == 302, answer["body"][:300]  # extra parameters are ignored, never obeyed
    assert egress.sent == [], "authorize must not call ServiceNow at all"


@FUZZ
@given(
    extra=st.sampled_from(["expires", "signature"]),
    value=hostile_or_huge,
    before=st.booleans(),
    headers=header_maps,
)
def test_a_valid_link_with_a_repeated_expires_or_signature_is_refused(
    world: World, extra: str, value: str, before: bool, headers: dict[str, str]
) -> None:
    link = link_pairs("prod")
    pairs = [(extra, value), *link] if before else [*link, (extra, value)]
    event = build_event("authorize", "/connections/prod/authorize", pairs, headers=headers)
    answer, _ = world.call(event)
    # API Gateway joins repeats with a comma, so the link no longer verifies.
    assert answer["statusCode"] == 403, answer["body"][:300]


@FUZZ
@given(
    state=st.one_of(
        st.none(),
        hostile_or_huge,
        st.sampled_from(["prod", "nope", "<script>"]).map(lambda n: forged_state(n, b"not-the-key")),
        st.sampled_from(["A" * 43, "A" * 512, "A" * 513, "=" * 8, "-_" * 40, b64(b"x" * 40)]),
    ),
    code=st.one_of(st.none(), hostile_or_huge),
    pairs=query_pairs,
    path=st.sampled_from(["/callback"] * 8 + ["/callback/", "/CALLBACK", "/callback%00", "/callback/../callback"]),
    headers=header_maps,
    cookies=cookie_lists,
    style=query_styles,
    garbage=hostile,
    method=methods,
)
def test_callback_with_hostile_states_codes_and_headers(
    world: World,
    state: str | None,
    code: str | None,
    pairs: list[tuple[str, str]],
    path: str,
    headers: dict[str, str],
    cookies: list[str] | None,
    style: str,
    garbage: str,
    method: str,
) -> None:
    query = [*([("state", state)] if state is not None else []), *([("code", code)] if code is not None else [])]
    event = build_event(
        "callback",
        path,
        query + pairs,
        headers=headers,
        query_style=style,
        garbage=garbage,
        method=method,
        cookies=cookies,
    )
    world.call(event)


@FUZZ
@given(
    error=hostile_or_huge.filter(bool),
    description=st.one_of(st.none(), hostile_or_huge),
    state_kind=st.sampled_from(["valid", "valid", "none", "hostile", "forged"]),
    hostile_state=hostile,
    code=st.one_of(st.none(), hostile),
    headers=header_maps,
)
def test_callback_error_payloads_are_a_refusal_page_that_shows_no_input(
    world: World,
    error: str,
    description: str | None,
    state_kind: str,
    hostile_state: str,
    code: str | None,
    headers: dict[str, str],
) -> None:
    state = {
        "valid": issue_state(KEY, "prod", datetime.now(UTC))[0],
        "none": None,
        "hostile": hostile_state,
        "forged": forged_state("prod", b"not-the-key"),
    }[state_kind]
    pairs = [("error", error)]
    pairs += [("error_description", description)] if description is not None else []
    pairs += [("state", state)] if state is not None else []
    pairs += [("code", code)] if code is not None else []
    answer, egress = world.call(build_event("callback", "/callback", pairs, headers=headers))
    assert answer["statusCode"] == 400 and "did not authorize" in answer["body"], answer["body"][:300]
    assert egress.sent == [], "a refusal must not call ServiceNow"
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", error):
        assert "(error)" in answer["body"]  # ServiceNow's error code is shown only if it is a plain identifier
    if state_kind == "valid":
        assert '<code id="connection">prod</code>' in answer["body"]
    else:
        assert 'id="connection"' not in answer["body"]  # a connection is named only for a genuine state


# ---------------------------------------------------------------------------------- dedicated checks


HOSTILE_INSTANCE_URLS: list[Any] = [
    "http://169.254.169.254",
    "http://169.254.169.254/latest/meta-data/",
    "https://169.254.169.254",
    "https://evil.example",
    "HTTPS://EVIL.EXAMPLE",
    "https://acme.service-now.com.evil.example",
    "https://acme.service-now.com@evil.example",
    "https://user:pw@acme.service-now.com",
    "https://evil.example#.service-now.com",
    "https://evil.example?.service-now.com",
    "https://evil.example/.service-now.com",
    "https://evil.example\\.service-now.com",
    "https://evil.example%2f.service-now.com",
    "https://evil.example\x00.service-now.com",
    "https://a.service-now.com\r\nHost: evil.example",
    "https://acme.service-now.com.",
    "https://acme.service-now.com:8443",
    "http://acme.service-now.com",
    "https://.service-now.com",
    "https://<script>alert(1)</script>.service-now.com",
    "http://127.0.0.1.evil.example",
    "http://localhost:1",
    "http://[::1]:80",
    "http://0x7f000001",
    "file:///etc/passwd",
    "javascript:alert(1)",
    "javascript://acme.service-now.com/%0aalert(1)",
    "//evil.example",
    "evil.example",
    "https://" + "a" * 400 + ".service-now.com",
    "https://" + "a." * 200 + "service-now.com",
    5,
    ["https://evil.example"],
    {"url": "https://evil.example"},
    True,
]


def test_a_hostile_instance_url_is_a_misconfigured_page_and_no_request(world: World) -> None:
    """Both routes refuse a connection whose instanceUrl is not allowlisted, before any request to it."""
    sut = world.stack
    failures: list[str] = []
    for index, url in enumerate(HOSTILE_INSTANCE_URLS):
        name = f"bad{index}"
        document = {"instanceUrl": url, "clientId": CLIENT_ID, "clientSecret": "x" * 12}
        sut.secretsmanager.create_secret(Name=f"servicenow-oauth/{name}", SecretString=json.dumps(document))
        before = sut.snapshot(name)
        log = len(sut.emulator.requests_log)
        state = issue_state(KEY, name, datetime.now(UTC))[0]
        for event in (
            build_event("authorize", f"/connections/{name}/authorize", link_pairs(name)),
            build_event("callback", "/callback", [("state", state), ("code", "a-code-that-never-leaves")]),
        ):
            with watch_egress(world.ports) as egress:
                answer = sut.handler.lambda_handler(event, FakeContext())
            body = answer["body"]
            problems = []
            if answer["statusCode"] != 500 or "Connection is misconfigured" not in body:
                problems.append(f"answered {answer['statusCode']}: {body[:200]!r}")
            if "instanceUrl" not in body or name not in body:
                problems.append("page does not name the connection and the key instanceUrl")
            if egress.sent or egress.forbidden:
                problems.append(f"outbound request: {egress.sent} {egress.forbidden}")
            if len(sut.emulator.requests_log) != log or sut.snapshot(name) != before:
                problems.append("the emulator was called or the secret changed")
            try:
                assert_no_markup_reflected(answer)
                assert_headers_safe(answer)
            except AssertionError as exc:
                problems.append(str(exc))
            if problems:
                failures.append(f"{url!r} via {event['rawPath']}: {'; '.join(problems)}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize(
    "extra",
    [
        "redirect_uri=https%3A%2F%2Fevil.example%2Fcb",
        "redirect_uri=https://evil.example/cb&redirect_uri=https://evil2.example/cb",
        "REDIRECT_URI=https%3A%2F%2Fevil.example",
        "redirect%5Furi=https%3A%2F%2Fevil.example",
        "redirect_uri=http%3A%2F%2F127.0.0.1%3A9%2Fcallback%3Fx%3Dhttps%3A%2F%2Fevil.example",
        "redirect_uri=%0d%0aLocation%3A%20https%3A%2F%2Fevil.example",
        "client_id=attacker&state=attacker&response_type=token&scope=admin&code_challenge_method=plain",
    ],
)
def test_redirect_uri_cannot_be_injected_through_the_authorize_link(world: World, extra: str) -> None:
    query = [*link_pairs("prod"), *parse_qsl(extra, keep_blank_values=True)]
    event = build_event("authorize", "/connections/prod/authorize", query)
    event["rawQueryString"] = f"{urlencode(link_pairs('prod'))}&{extra}"
    answer, _ = world.call(event)
    assert answer["statusCode"] == 302
    location = dict(parse_qsl(urlsplit(answer["headers"]["Location"]).query))
    assert location["redirect_uri"] == REDIRECT_URI and location["client_id"] == CLIENT_ID
    assert location["scope"] == "useraccount" and location["code_challenge_method"] == "S256"


def test_without_callback_url_the_host_header_cannot_steer_redirect_uri(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With CALLBACK_URL unset the callback URL comes from API Gateway's requestContext, never a request header."""
    handler = world.stack.handler
    with monkeypatch.context() as patch:
        patch.delenv("CALLBACK_URL")
        parameters.clear_caches()
        handler = importlib.reload(handler)
        try:
            headers = {
                "host": "evil.example",
                "x-forwarded-host": "evil.example",
                "forwarded": "host=evil.example;proto=https",
                "x-forwarded-proto": "http",
            }
            event = build_event("authorize", "/connections/prod/authorize", link_pairs("prod"), headers=headers)
            answer = handler.lambda_handler(event, FakeContext())
            assert answer["statusCode"] == 302, answer["body"]
            redirect_uri = dict(parse_qsl(urlsplit(answer["headers"]["Location"]).query))["redirect_uri"]
            assert redirect_uri == f"https://{event['requestContext']['domainName']}/callback"
        finally:
            patch.undo()
            importlib.reload(handler)  # leave the module as the stack fixture built it


@FUZZ
@given(
    code=hostile_or_huge.filter(bool),
    extras=st.lists(st.tuples(st.sampled_from(["redirect_uri", "client_id", "scope", "error_description"]), hostile)),
)
def test_a_genuine_state_with_a_hostile_code_goes_only_to_the_instance_and_changes_nothing(
    world: World, leak_check: list, code: str, extras: list[tuple[str, str]]
) -> None:
    """The one path random input cannot reach: a real state. The code goes to the emulator and nowhere else."""
    sut = world.stack
    state = issue_state(KEY, "prod", datetime.now(UTC))[0]
    before, tokens = sut.snapshot(), world.token_requests
    with watch_egress(world.ports) as egress:
        answer = sut.handler.lambda_handler(
            build_event("callback", "/callback", [("state", state), ("code", code), *extras]), FakeContext()
        )
    leak_check.append(answer["body"])
    # ServiceNow (and the emulator) answer a bad code with 401 access_denied, which the documented mapping
    # turns into 502 "ServiceNow refused the request": the one allowed 5xx here.
    assert answer["statusCode"] < 500 or (
        answer["statusCode"] == 502 and "ServiceNow refused the request" in answer["body"]
    ), answer["body"][:300]
    assert_no_markup_reflected(answer)
    assert_headers_safe(answer)
    assert sut.snapshot() == before, "a rejected code changed the secret"
    assert world.token_requests == tokens + 1, "exactly one code exchange, never retried"
    assert egress.sent == [f"{sut.emulator.url}{TOKEN_PATH}"] and not egress.forbidden, egress.seen


@pytest.mark.parametrize("signature", ["\u00e9", "\x80", "GyfoDvaWuecm96Kcn6y7jf4Z5goJYmjYKZKJlqYbxFE,\u00e9"])
def test_a_non_ascii_signature_is_refused_not_a_500(world: World, signature: str) -> None:
    """Found by this file's fuzzing: hmac.compare_digest raised TypeError on a non-ASCII str (a 500)."""
    event = build_event("authorize", "/connections/prod/authorize", [("expires", "1"), ("signature", signature)])
    answer = world.stack.handler.lambda_handler(event, FakeContext())
    assert answer["statusCode"] == 403, f"{answer['statusCode']}: {answer['body'][-300:]}"
