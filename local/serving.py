"""The one background HTTP server both local stand-ins use (the ServiceNow emulator and the API adapter).

Quiet by construction (request lines carry OAuth codes), HTTP/1.1 keep-alive, and a `stop()` that also
cuts kept-alive connections, so a stopped server really looks down to a browser or a pooled client.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self


class QuietServer(ThreadingHTTPServer):
    """Threaded server that never prints tracebacks (they could include request data)."""

    daemon_threads = True
    block_on_close = False
    owner: Any

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Swallow errors such as a client hanging up on a slow answer."""


class TrackedHandler(BaseHTTPRequestHandler):
    """Registers its connection with the owning server, and never logs a request line."""

    protocol_version = "HTTP/1.1"
    server: QuietServer

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in two writes: with Nagle's algorithm the body waits for the client's delayed
        # ACK, 40 ms a request on a kept-alive connection (what a real instance never costs).
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.owner._track(self.connection, add=True)

    def finish(self) -> None:
        self.server.owner._track(self.connection, add=False)
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        """Silence: query strings carry authorization codes."""


class BackgroundServer:
    """Serves `handler_class` on host:port (0 = any free port) in a daemon thread."""

    handler_class: type[TrackedHandler]
    thread_name = "local-http"

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self._server: QuietServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError(f"{type(self).__name__} not started")
        return f"http://{self.host}:{self.port}"

    def start(self) -> Self:
        if self._server is not None:
            return self
        server = QuietServer((self.host, self.port), self.handler_class)
        server.owner = self
        self._server = server
        self.port = int(server.server_address[1])
        self._thread = threading.Thread(target=server.serve_forever, args=(0.05,), name=self.thread_name, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and cut kept-alive connections so a stopped server really looks down."""
        server, thread = self._server, self._thread
        if server is None:
            return
        server.shutdown()
        server.server_close()
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        if thread is not None:
            thread.join(timeout=5)
        self._server = None
        self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _track(self, connection: socket.socket, *, add: bool) -> None:
        with self._connections_lock:
            if add:
                self._connections.add(connection)
            else:
                self._connections.discard(connection)
