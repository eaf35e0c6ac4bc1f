"""A local stand-in for the stack's API Gateway HTTP API: real HTTP in, payload 2.0 events to the Lambda handler.

Why: `make local`, the browser tests and demos need the consent flow on a real URL a browser can follow
redirects to, calling the same `lambda_handler` as Lambda does, with no AWS account and no SAM/Docker.
Only the API's routes exist; anything else gets API Gateway's own 404, not the function's.

Nothing is printed per request: the callback's query string carries the OAuth authorization code.
"""

from __future__ import annotations

import base64
import json
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from local.serving import BackgroundServer, TrackedHandler

Handler = Callable[[dict[str, Any], Any], Any]

# The routes template.yaml declares, as (route key, path pattern with named path parameters).
ROUTES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("GET /connections/{name}/authorize", re.compile(r"^/connections/(?P<name>[^/]+)/authorize$")),
    ("GET /callback", re.compile(r"^/callback$")),
    ("GET /connections/{name}/jwks.json", re.compile(r"^/connections/(?P<name>[^/]+)/jwks\.json$")),
)
NOT_FOUND = {"message": "Not Found"}
INTERNAL_ERROR = {"message": "Internal Server Error"}
ACCOUNT_ID = "000000000000"
API_ID = "local"
MAX_BODY = 10 * 1024 * 1024  # API Gateway's payload limit


@dataclass
class LocalLambdaContext:
    """The attributes Powertools' `inject_lambda_context` and the handler read from a real LambdaContext."""

    aws_request_id: str
    function_name: str = "callback"
    function_version: str = "$LATEST"
    invoked_function_arn: str = f"arn:aws:lambda:us-east-1:{ACCOUNT_ID}:function:callback"
    memory_limit_in_mb: int = 256
    log_group_name: str = "/aws/lambda/callback"
    log_stream_name: str = "local"
    timeout_seconds: int = 30

    def __post_init__(self) -> None:
        self._deadline = time.monotonic() + self.timeout_seconds

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))


def match_route(method: str, path: str) -> tuple[str, dict[str, str]] | None:
    """The route key and decoded path parameters for a request, or None when API Gateway would answer 404."""
    for route_key, pattern in ROUTES:
        route_method = route_key.split(" ", 1)[0]
        found = pattern.match(path)
        if found and method == route_method:
            return route_key, {name: unquote(value) for name, value in found.groupdict().items()}
    return None


def query_parameters(raw_query: str) -> dict[str, str] | None:
    """Decoded query parameters; API Gateway joins a repeated key's values with commas (payload 2.0)."""
    joined: dict[str, str] = {}
    for key, value in parse_qsl(raw_query, keep_blank_values=True):
        joined[key] = f"{joined[key]},{value}" if key in joined else value
    return joined or None


def build_event(
    *,
    method: str,
    raw_path: str,
    raw_query: str,
    headers: list[tuple[str, str]],
    body: bytes,
    route_key: str,
    path_parameters: dict[str, str],
    domain_name: str,
    source_ip: str,
    now: datetime,
) -> dict[str, Any]:
    """An API Gateway HTTP API payload format 2.0 event, in the shape of events/callback.json."""
    joined: dict[str, str] = {}
    cookies: list[str] = []
    for name, value in headers:
        key = name.lower()
        if key == "cookie":  # 2.0 moves cookies out of the headers into their own list
            cookies.extend(part.strip() for part in value.split(";") if part.strip())
            continue
        joined[key] = f"{joined[key]},{value}" if key in joined else value
    request_id = base64.b64encode(uuid.uuid4().bytes[:12]).decode()
    event: dict[str, Any] = {
        "version": "2.0",
        "routeKey": route_key,
        "rawPath": raw_path,
        "rawQueryString": raw_query,
        "headers": joined,
        "requestContext": {
            "accountId": ACCOUNT_ID,
            "apiId": API_ID,
            "domainName": domain_name,
            "domainPrefix": domain_name.split(".", 1)[0].split(":", 1)[0],
            "http": {
                "method": method,
                "path": raw_path,
                "protocol": "HTTP/1.1",
                "sourceIp": source_ip,
                "userAgent": joined.get("user-agent", ""),
            },
            "requestId": request_id,
            "routeKey": route_key,
            "stage": "$default",
            "time": now.strftime("%d/%b/%Y:%H:%M:%S +0000"),
            "timeEpoch": int(now.timestamp() * 1000),
        },
        "isBase64Encoded": False,
    }
    if cookies:
        event["cookies"] = cookies
    query = query_parameters(raw_query)
    if query is not None:
        event["queryStringParameters"] = query
    if path_parameters:
        event["pathParameters"] = path_parameters
    if body:
        try:
            event["body"] = body.decode("utf-8")
        except UnicodeDecodeError:
            event["body"], event["isBase64Encoded"] = base64.b64encode(body).decode(), True
    return event


@dataclass(frozen=True)
class HttpAnswer:
    """What goes back on the wire for one Lambda result."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes


def _json_answer(status: int, payload: Any) -> HttpAnswer:
    body = json.dumps(payload, separators=(",", ":")).encode()  # byte-for-byte API Gateway's {"message":"..."}
    return HttpAnswer(status, [("Content-Type", "application/json")], body)


def to_http(result: Any) -> HttpAnswer:
    """Map a Lambda result to HTTP the way API Gateway does for payload 2.0 (including its format inference)."""
    if not isinstance(result, dict) or "statusCode" not in result:
        # Payload 2.0 infers a 200 JSON answer from anything without a statusCode.
        return _json_answer(200, result)
    try:
        status = int(result["statusCode"])
        raw_body = result.get("body") or ""
        if result.get("isBase64Encoded"):
            body = base64.b64decode(raw_body)
        else:
            body = raw_body.encode("utf-8") if isinstance(raw_body, str) else json.dumps(raw_body).encode()
        headers = [(str(name), str(value)) for name, value in (result.get("headers") or {}).items()]
        for name, values in (result.get("multiValueHeaders") or {}).items():
            headers += [(str(name), str(value)) for value in values]
        headers += [("Set-Cookie", str(cookie)) for cookie in result.get("cookies") or []]
    except (TypeError, ValueError, AttributeError):
        # A malformed integration response is API Gateway's 500, not a crash of the adapter.
        return _json_answer(500, INTERNAL_ERROR)
    return HttpAnswer(status, headers, body)


class _RequestHandler(TrackedHandler):
    """Turns one HTTP request into one handler invocation (no access log: the callback's query holds the code)."""

    server_version = "LocalApiGateway"
    timeout = 30

    def version_string(self) -> str:
        return self.server_version

    def _dispatch(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            self._send(_json_answer(413, {"message": "Request Entity Too Large"}))
            self.close_connection = True
            return
        body = self.rfile.read(length) if length > 0 else b""
        peer = str(self.client_address[0])
        self._send(self.server.owner.answer(self.command, self.path, list(self.headers.items()), body, peer))

    def _send(self, answer: HttpAnswer) -> None:
        try:
            self.send_response(answer.status)
            for name, value in answer.headers:
                if name.lower() not in ("content-length", "connection", "transfer-encoding"):
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(answer.body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(answer.body)
        except OSError:
            self.close_connection = True

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _dispatch


class LocalApi(BackgroundServer):
    """The HTTP API on 127.0.0.1, invoking `handler(event, context)` in-process for each routed request."""

    handler_class = _RequestHandler
    thread_name = "local-api"

    def __init__(
        self,
        handler: Handler,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        local_pages: dict[str, Callable[[], HttpAnswer]] | None = None,
    ) -> None:
        super().__init__(host, port)
        self.handler = handler
        # Pages only the local stack serves (GET, exact path): never routes of the deployed API.
        self.local_pages = dict(local_pages or {})

    def answer(
        self, method: str, target: str, headers: list[tuple[str, str]], body: bytes, source_ip: str
    ) -> HttpAnswer:
        """Route, build the event, invoke the handler, and map its result (one request, no I/O of its own)."""
        parts = urlsplit(target)
        raw_path = parts.path or "/"
        if method in ("GET", "HEAD") and raw_path in self.local_pages:
            return self.local_pages[raw_path]()
        route = match_route(method, raw_path)
        if route is None:
            return _json_answer(404, NOT_FOUND)
        route_key, path_parameters = route
        event = build_event(
            method=method,
            raw_path=raw_path,
            raw_query=parts.query,
            headers=headers,
            body=body,
            route_key=route_key,
            path_parameters=path_parameters,
            domain_name=f"{self.host}:{self.port}",
            source_ip=source_ip,
            now=datetime.now(UTC),
        )
        context = LocalLambdaContext(aws_request_id=str(uuid.uuid4()))
        try:
            result = self.handler(event, context)
        except Exception:  # an unhandled function error is API Gateway's bare 500; the message may hold a URL
            return _json_answer(500, INTERNAL_ERROR)
        return to_http(result)
