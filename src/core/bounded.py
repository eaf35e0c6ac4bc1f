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

import http.client
import socket
import threading
import time
from contextlib import suppress
from types import TracebackType
from typing import Any

from urllib3 import BaseHTTPResponse, HTTPConnectionPool, HTTPSConnectionPool, PoolManager
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.exceptions import ConnectTimeoutError

# Secrets Manager's limit for a whole secret value: a larger answer could never be stored.
MAX_ANSWER_BYTES = 64 * 1024
MAX_HEADER_BYTES = 64 * 1024  # status line and headers together

_current = threading.local()
_OWNERS = threading.Lock()  # which deadline a connection serves: taken by a request, checked by a timer


class AnswerTooLarge(Exception):
    """The answer (declared or decoded) is larger than `MAX_ANSWER_BYTES`."""


class Deadline:
    """A hard end for everything a thread sends within it: connects, retries, waits and whole answers."""

    def __init__(self, seconds: float) -> None:
        self.seconds = max(0.0, seconds)
        self.ends = time.monotonic() + self.seconds
        self.expired = False
        self._connections: list[_Watched] = []
        self._over = False
        self._timer = threading.Timer(self.seconds, self._expire)
        self._timer.daemon = True
        self._outer: Deadline | None = None

    def __enter__(self) -> Deadline:
        self._outer = _deadline()
        _current.deadline = self
        self._timer.start()
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self._timer.cancel()
        with _OWNERS:
            self._over = True  # a timer firing now shuts nothing: the connections may serve the next request
            self._connections.clear()
        _current.deadline = self._outer

    def watch(self, connection: _Watched) -> None:
        """`connection` now serves this deadline's request (until another request takes it from the pool)."""
        with _OWNERS:
            connection.owner = self
            if self._over:
                return
            if self.expired:
                _shut(connection.sock)  # a retry after the end: it fails at once
            elif all(connection is not known for known in self._connections):
                self._connections.append(connection)

    def _expire(self) -> None:
        with _OWNERS:
            if self._over:
                return
            self.expired = True
            for connection in self._connections:
                if connection.owner is self:  # back in the pool, it may serve another request now: not ours
                    _shut(connection.sock)


def _shut(sock: socket.socket | None) -> None:
    if sock is not None:
        with suppress(OSError):  # already closed
            sock.shutdown(socket.SHUT_RDWR)


def _deadline() -> Deadline | None:
    """The deadline of the request this thread is sending, if any."""
    deadline: Deadline | None = getattr(_current, "deadline", None)
    return deadline


def remaining() -> float | None:
    """Seconds left before the current thread's deadline (0 once it has passed), or None outside one."""
    deadline = _deadline()
    if deadline is None:
        return None
    return 0.0 if deadline.expired else max(0.0, deadline.ends - time.monotonic())


class _Watched:
    """Hands the connection to the current thread's deadline on each use (a kept-alive connection serves many
    requests, one at a time: only the deadline of the request it serves may shut it), and connects within the
    time that deadline leaves."""

    sock: socket.socket | None
    timeout: float | None
    owner: Deadline | None = None

    def _claim(self) -> None:
        deadline = _deadline()
        if deadline is not None:
            deadline.watch(self)  # owner, under the lock
            return
        with _OWNERS:
            self.owner = None

    def connect(self) -> None:
        self._claim()
        left = remaining()
        if left is not None:
            if left <= 0:
                raise ConnectTimeoutError(self, "the request's deadline passed before it could connect")
            self.timeout = left if self.timeout is None else min(self.timeout, left)
        super().connect()  # type: ignore[misc]
        self._claim()  # now with its socket

    def request(self, *args: object, **kwargs: object) -> None:
        self._claim()
        super().request(*args, **kwargs)  # type: ignore[misc]


class _BoundedHeaders(http.client.HTTPResponse):
    """http.client reads up to 100 header lines of 64 KiB each (6.5 MB, ~50 MiB of Python objects); a token
    answer's header section is well under 1 KiB, so it is refused beyond MAX_HEADER_BYTES."""

    def begin(self) -> None:
        raw = self.fp
        self.fp = _Limited(raw, MAX_HEADER_BYTES)  # type: ignore[assignment]
        try:
            super().begin()
        finally:
            if self.fp is not None:
                self.fp = raw


class _Limited:
    """The status line and headers of an answer, read through a byte budget, to their blank line."""

    def __init__(self, raw: Any, limit: int) -> None:
        self._raw, self._left = raw, limit

    def readline(self, size: int = -1) -> bytes:
        line: bytes = self._raw.readline(size)
        if not line:
            # http.client would end the header section at end of file and read the rest as a whole answer (a 200
            # with no body looks like a page that is not the token API): a cut answer is a lost one.
            raise http.client.RemoteDisconnected("the answer ended before its header section did")
        self._left -= len(line)
        if self._left < 0:
            raise http.client.LineTooLong(f"header section over {MAX_HEADER_BYTES} bytes")
        return line

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)


class _WatchedHTTPConnection(_Watched, HTTPConnection):
    response_class = _BoundedHeaders


class _WatchedHTTPSConnection(_Watched, HTTPSConnection):
    response_class = _BoundedHeaders


class _Handing:
    """A connection belongs to a request from the moment the pool hands it out until it is put back: a deadline
    that ends while another thread holds it, or while it waits idle in the pool, never shuts it."""

    def _get_conn(self, timeout: float | None = None) -> Any:
        connection = super()._get_conn(timeout)  # type: ignore[misc]
        if isinstance(connection, _Watched):
            connection._claim()
        return connection

    def _put_conn(self, conn: Any) -> None:
        if isinstance(conn, _Watched):
            with _OWNERS:
                conn.owner = None
        super()._put_conn(conn)  # type: ignore[misc]


class _WatchedHTTPPool(_Handing, HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _WatchedHTTPSPool(_Handing, HTTPSConnectionPool):
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
