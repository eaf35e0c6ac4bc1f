"""Answers from an instance, bounded in time and in size: one hostile or broken instance cannot hold a thread past
its deadline or fill a function's memory (a drip-fed answer, a gzip bomb), whatever it sends.

urllib3's timeouts bound each socket operation, not a request: an instance sending one byte every few seconds keeps
a request alive for ever. A `Deadline` shuts the sockets of its requests down when it ends, from a timer thread
(the way urllib3's own `HTTPResponse.shutdown` interrupts a blocked read), so a read blocked in the kernel returns
and the request fails as timed out. Each socket is handed to the deadline of the thread that uses it by the pool's
connection class. Not covered: a TLS handshake drip-fed by the server itself (the socket is not ours until it
ends); ServiceNow's TLS front ends are not the instance's to program, and the sweep stops waiting at its own end.

Size: a token answer holds a few hundred bytes, and a secret holds at most 64 KiB, so an answer larger than that
cannot be stored and is refused; urllib3 (2.6 or later) decodes gzip and deflate within the amount read.
"""

from __future__ import annotations

import socket
import threading
import time
from contextlib import suppress
from types import TracebackType

from urllib3 import BaseHTTPResponse, HTTPConnectionPool, HTTPSConnectionPool, PoolManager
from urllib3.connection import HTTPConnection, HTTPSConnection

# Secrets Manager's limit for a whole secret value: a larger answer could never be stored.
MAX_ANSWER_BYTES = 64 * 1024

_current = threading.local()


class AnswerTooLarge(Exception):
    """The answer (declared or decoded) is larger than `MAX_ANSWER_BYTES`."""


class Deadline:
    """A hard end for everything a thread sends within it: connects, retries, waits and whole answers."""

    def __init__(self, seconds: float) -> None:
        self.seconds = max(0.0, seconds)
        self.ends = time.monotonic() + self.seconds
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._over = False
        self._timer = threading.Timer(self.seconds, self._expire)
        self._timer.daemon = True
        self._outer: Deadline | None = None

    def __enter__(self) -> Deadline:
        self._outer = getattr(_current, "deadline", None)
        _current.deadline = self
        self._timer.start()
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self._timer.cancel()
        with self._lock:
            self._over = True  # a timer firing now shuts nothing: the sockets may serve the next request
            self._sockets.clear()
        _current.deadline = self._outer

    def watch(self, sock: socket.socket | None) -> None:
        if sock is None:
            return
        with self._lock:
            if self._over:
                return
            if self.expired:
                _shut(sock)  # a retry after the end: it fails at once
            elif all(sock is not known for known in self._sockets):
                self._sockets.append(sock)

    def _expire(self) -> None:
        with self._lock:
            if self._over:
                return
            self.expired = True
            for sock in self._sockets:
                _shut(sock)


def _shut(sock: socket.socket) -> None:
    with suppress(OSError):  # already closed
        sock.shutdown(socket.SHUT_RDWR)


def remaining() -> float | None:
    """Seconds left before the current thread's deadline (0 once it has passed), or None outside one."""
    deadline: Deadline | None = getattr(_current, "deadline", None)
    if deadline is None:
        return None
    return 0.0 if deadline.expired else max(0.0, deadline.ends - time.monotonic())


def _watch(sock: socket.socket | None) -> None:
    deadline: Deadline | None = getattr(_current, "deadline", None)
    if deadline is not None:
        deadline.watch(sock)


class _Watched:
    """Hands the connection's socket to the current thread's deadline, on connect and on each reuse."""

    sock: socket.socket | None

    def connect(self) -> None:
        super().connect()  # type: ignore[misc]
        _watch(self.sock)

    def request(self, *args: object, **kwargs: object) -> None:
        _watch(self.sock)  # a kept-alive connection (None before its first connect, which watches it)
        super().request(*args, **kwargs)  # type: ignore[misc]


class _WatchedHTTPConnection(_Watched, HTTPConnection):
    pass


class _WatchedHTTPSConnection(_Watched, HTTPSConnection):
    pass


class _WatchedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _WatchedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


def watched(manager: PoolManager) -> PoolManager:
    """`manager`, whose connections obey the deadline of the thread that uses them."""
    manager.pool_classes_by_scheme = {"http": _WatchedHTTPPool, "https": _WatchedHTTPSPool}
    return manager


def read_bounded(response: BaseHTTPResponse, limit: int = MAX_ANSWER_BYTES) -> bytes:
    """The whole decoded body, or `AnswerTooLarge` once more than `limit` bytes are declared or decoded.

    The connection goes back to the pool only after a whole answer; a refused one is closed unread."""
    declared = response.headers.get("Content-Length", "")
    try:
        if declared.strip().isdigit() and int(declared) > limit:
            raise AnswerTooLarge
        body = response.read(amt=limit + 1, decode_content=True)
        if len(body) > limit:
            raise AnswerTooLarge
    except BaseException:
        response.close()  # closed unread: the pool opens a new connection in its place
        response.release_conn()
        raise
    response.release_conn()
    return body
