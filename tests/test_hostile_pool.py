"""Found by an adversarial review of the deadline fix ("a connection belongs to the request it serves"): ownership
passed only when a request called `request()`, not when it took the connection from the pool. A request that had
just taken an idle kept-alive connection (checked alive by the pool) but not yet called `request()` still had the
previous owner's deadline on it; when that deadline ended in between, it shut the socket the new request was about
to use. Failed within ~2.5 s before the fix."""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter

from core.servicenow import OAuthApp, ServiceNowClient, build_session
from tests.test_hostile_deadlines import TOKEN, Server, answer

A_BUDGET = 0.3
PAIRS = 24  # pairs of requests at once, each pair in its own pool
WALL = 6.0  # stop trying after this long (it failed within the first batch, ~2.5 s, before the fix)


def test_a_deadline_ending_while_another_request_takes_its_idle_connection_shuts_that_request() -> None:
    """A gets a 503 with Retry-After: 1 and waits to its deadline (0.3 s) with its connection idle in the pool.
    B, in the same pool, starts at about that moment and takes the idle connection. The instance answers B
    503, 503, then 200, at once: B (3 tries) must succeed, with its 3 requests seen by the instance. When A's
    deadline ends between B's taking the connection and B's `request()`, B's first request is never sent (its
    socket was shut by A's deadline), a retry is spent on it, and B ends on the second 503."""
    seen: Counter[bytes] = Counter()
    lock = threading.Lock()

    def decide(body: bytes):  # type: ignore[no-untyped-def]
        if b"refresh_token=a" in body:
            return 0.0, answer("503 Service Unavailable", b"{}", "Retry-After: 1\r\n")
        with lock:
            seen[body] += 1
            n = seen[body]
        if n < 3:
            return 0.0, answer("503 Service Unavailable", b"{}", "Retry-After: 0\r\n")
        return 0.0, answer("200 OK", TOKEN)

    server = Server(decide)
    failures: list[str] = []
    started = time.monotonic()
    trial = 0
    try:
        while not failures and time.monotonic() - started < WALL:
            threads = []
            for _ in range(PAIRS):
                trial += 1
                client = ServiceNowClient(build_session(), request_seconds=10)
                app = OAuthApp(server.url, "cid", "secret")
                box: dict[str, float] = {}
                ready = threading.Event()

                def run_a(
                    i: int = trial,
                    client: ServiceNowClient = client,
                    app: OAuthApp = app,
                    box: dict[str, float] = box,
                    ready: threading.Event = ready,
                ) -> None:
                    with client.budget(A_BUDGET):
                        box["end"] = time.monotonic() + A_BUDGET
                        ready.set()
                        with contextlib.suppress(Exception):  # A's own deadline: expected
                            client.refresh(app, f"a{i}")

                def run_b(
                    i: int = trial,
                    client: ServiceNowClient = client,
                    app: OAuthApp = app,
                    box: dict[str, float] = box,
                    ready: threading.Event = ready,
                ) -> None:
                    ready.wait(5)
                    target = box["end"] - 0.0003 + (i % 7) * 0.0001  # around the end of A's deadline
                    time.sleep(max(0.0, target - time.monotonic()))
                    try:
                        client.refresh(app, f"b{i}")
                    except Exception as exc:
                        with lock:
                            b_sent = sum(
                                n
                                for body, n in seen.items()
                                if f"refresh_token=b{i}&".encode() in body
                                or body.endswith(f"refresh_token=b{i}".encode())
                            )
                        failures.append(f"B{i}: {exc} (instance saw {b_sent} of its 3 requests)")

                threads += [threading.Thread(target=run_a), threading.Thread(target=run_b)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(20)
        assert not failures, f"after {trial} pairs in {time.monotonic() - started:.1f} s: {failures[:3]}"
    finally:
        server.close()
