"""Found by an adversarial review of the request deadline (d2b2cdd, 21c4b16): a stale deadline shut a kept-alive
connection another request was using, and a connect that hangs outlasted the deadline. Both failed on d2b2cdd."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from core.errors import TransientProviderError
from core.servicenow import OAuthApp, ServiceNowClient, build_session


class Server:
    """A tiny keep-alive HTTP/1.1 server; `decide(body)` returns (delay, raw answer bytes or None to hang). With
    `close_after`, it hangs up after each answer (an answer without Content-Length ends there, a cut one is cut)."""

    def __init__(self, decide, *, close_after: bool = False) -> None:  # type: ignore[no-untyped-def]
        self.decide = decide
        self.close_after = close_after
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.seen: list[bytes] = []
        self.stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                head, buf = buf.split(b"\r\n\r\n", 1)
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value.strip())
                while len(buf) < length:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                body, buf = buf[:length], buf[length:]
                self.seen.append(body)
                delay, answer = self.decide(body)
                time.sleep(delay)
                if answer is None:
                    self.stop.wait(60)
                    return
                conn.sendall(answer)
                if self.close_after:
                    return
        except OSError:
            return
        finally:
            conn.close()

    def close(self) -> None:
        self.stop.set()
        self.listener.close()


def answer(status: str, body: bytes = b"", extra: str = "") -> bytes:
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode()
        + body
    )


TOKEN = b'{"access_token":"AT-review","refresh_token":"RT-review","token_type":"Bearer","expires_in":1800}'


def test_a_stale_deadline_never_shuts_a_connection_another_request_is_using() -> None:
    """Request A (budget 1.5 s) gets a 503 with Retry-After: 1; urllib3 puts A's connection back in the shared pool
    while A's Deadline still lists its socket. Request B (another connection to the same instance, as in the sweep's
    shared session) takes that idle connection; the instance answers B well within B's own 3.5 s. When A's deadline
    ends, its timer shuts B's socket: B's answer is cut, B is re-sent (a refresh sent twice) and B fails as late."""
    a_tries = 0

    def decide(body: bytes):  # type: ignore[no-untyped-def]
        nonlocal a_tries
        if b"refresh_token=aaa" in body:
            a_tries += 1
            if a_tries == 1:
                return 0.0, answer("503 Service Unavailable", b"{}", "Retry-After: 1\r\n")
            return 0.0, None  # A's retry: never answered (A's own deadline cuts it)
        return 2.5, answer("200 OK", TOKEN)  # B: a good answer after 2.5 s, every time

    server = Server(decide)
    try:
        client = ServiceNowClient(build_session(), request_seconds=10)
        app = OAuthApp(server.url, "cid", "secret")
        results: dict[str, object] = {}

        def run_a() -> None:
            with client.budget(1.5):
                try:
                    client.refresh(app, "aaa")
                    results["a"] = "ok"
                except Exception as exc:
                    results["a"] = type(exc).__name__

        def run_b() -> None:
            time.sleep(0.3)  # A's 503 is back and A is waiting out its Retry-After: its connection is idle
            started = time.monotonic()
            with client.budget(3.5):
                try:
                    client.refresh(app, "bbb")
                    results["b"] = "ok"
                except TransientProviderError as exc:
                    results["b"] = f"TransientProviderError: {exc}"
            results["b_seconds"] = round(time.monotonic() - started, 2)

        threads = [threading.Thread(target=run_a), threading.Thread(target=run_b)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(20)
        b_sent = sum(b"refresh_token=bbb" in body for body in server.seen)
        # The instance answered B's first request 2.5 s after it was sent, within B's 3.5 s: B must succeed, once.
        assert (results["b"], b_sent) == ("ok", 1), results | {"b_requests_sent": b_sent}
    finally:
        server.close()


@pytest.fixture
def syn_blackhole() -> Iterator[str]:
    """An instance whose accept queue is full: SYNs are dropped, so a connect hangs (a blackholed or overloaded
    instance). Linux drops them on loopback once the queue holds backlog + 1 connections."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(("127.0.0.1", port))
        fillers.append(filler)
    time.sleep(0.2)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


def test_a_connect_that_hangs_ends_at_the_request_deadline(syn_blackhole: str) -> None:
    """The deadline is documented to cover connects; the socket is watched only after connect returns, and the
    connect timeout (3.05 s) is not shortened to the time left: a 0.5 s request runs 3 s."""
    client = ServiceNowClient(build_session(), request_seconds=0.5)
    started = time.monotonic()
    with pytest.raises(TransientProviderError):
        client.refresh(OAuthApp(syn_blackhole, "cid", "secret"), "rt")
    took = time.monotonic() - started
    assert took <= 0.5 + 2, f"took {took:.2f} s for a 0.5 s request deadline"


def test_a_connect_that_hangs_ends_within_the_refresh_budget(syn_blackhole: str) -> None:
    """Within a refresh's budget, the last request gets what is left (here 0.3 s) but its connect still waits 3.05 s."""
    client = ServiceNowClient(build_session(), request_seconds=30)
    started = time.monotonic()
    with client.budget(0.3), pytest.raises(TransientProviderError):
        client.refresh(OAuthApp(syn_blackhole, "cid", "secret"), "rt")
    took = time.monotonic() - started
    assert took <= 0.3 + 2, f"took {took:.2f} s for a 0.3 s budget"
