"""A fault-injecting HTTP proxy in front of an S3 stand-in (moto), on 127.0.0.1.

Every request the clients send to the proxy is forwarded to the store unless the proxy's `FaultPlan` draws a fault
for it (one seeded draw per request):

    slowdown        503 SlowDown, without forwarding (S3's throttling answer)
    error           500 InternalError, without forwarding
    reset_before    the connection reset (TCP RST) before the request reaches the store
    reset_after     the request forwarded and done by the store, then the connection reset instead of the answer
    stall           nothing for `stall_s` seconds (longer than the clients' timeouts), then the connection reset

While `down` is set (`outage()`), every request is answered 503 SlowDown. `counts` says what was done how often,
`log` to which request: (seconds since start, method, path, fault or "forwarded").

    with FaultyS3Proxy(moto_endpoint, FaultPlan(slowdown=0.1, reset_after=0.05, seed=1)) as proxy:
        ...  # point the clients at proxy.endpoint
"""

from __future__ import annotations

import collections
import contextlib
import http.client
import random
import socket
import struct
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator
from urllib.parse import urlparse

FAULTS = ("slowdown", "error", "reset_before", "reset_after", "stall")
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "trailer", "upgrade"}
ERROR_BODIES = {
    503: b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>",
    500: b"<Error><Code>InternalError</Code><Message>We encountered an internal error.</Message></Error>",
}


@dataclass(frozen=True)
class FaultPlan:
    """The share of requests that meets each fault (the shares add up to at most 1)."""

    slowdown: float = 0.0
    error: float = 0.0
    reset_before: float = 0.0
    reset_after: float = 0.0
    stall: float = 0.0
    stall_s: float = 75.0
    seed: int = 0

    def __post_init__(self):
        if sum(self.shares()) > 1 or min(self.shares()) < 0:
            raise ValueError(f"fault shares must be >= 0 and add up to at most 1: {self}")

    def shares(self) -> list[float]:
        return [getattr(self, name) for name in FAULTS]


class FaultyS3Proxy:
    """The proxy's server, started on a free port of 127.0.0.1 by `start()` (or `with`), stopped by `stop()`."""

    def __init__(self, upstream: str, plan: FaultPlan = FaultPlan()):
        parsed = urlparse(upstream)
        self.upstream_host, self.upstream_port = parsed.hostname, parsed.port or 80
        self.plan = plan
        self.down = threading.Event()
        self.counts: collections.Counter[str] = collections.Counter()
        self.log: list[tuple[float, str, str, str]] = []
        self._started = time.monotonic()
        self._random = random.Random(plan.seed)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FaultyS3Proxy:
        self._thread = threading.Thread(target=self._server.serve_forever, name="faulty-s3", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # ends the stalls in progress
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> FaultyS3Proxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @contextlib.contextmanager
    def outage(self) -> Iterator[None]:
        """Every request answered 503 SlowDown inside the block."""
        self.down.set()
        try:
            yield
        finally:
            self.down.clear()

    def draw(self, method: str, path: str) -> str | None:
        """The fault of the request (None: forward it), counted and logged."""
        with self._lock:
            if self.down.is_set():
                fault = "outage"
            else:
                point, fault = self._random.random(), None
                for name, share in zip(FAULTS, self.plan.shares()):
                    if point < share:
                        fault = name
                        break
                    point -= share
            self.counts[fault or "forwarded"] += 1
            self.log.append((time.monotonic() - self._started, method, path, fault or "forwarded"))
            return fault


def _handler_for(proxy: FaultyS3Proxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect

        def log_message(self, *args) -> None:
            pass

        def handle_one_request(self) -> None:
            try:
                super().handle_one_request()
            except (ConnectionError, socket.timeout, ValueError, OSError):
                self.close_connection = True

        def do_request(self) -> None:
            body = self._read_body()
            fault = proxy.draw(self.command, self.path)
            if fault in ("slowdown", "outage"):
                return self._answer_error(503)
            if fault == "error":
                return self._answer_error(500)
            if fault == "reset_before":
                return self._reset()
            if fault == "stall":
                proxy._stopping.wait(proxy.plan.stall_s)
                return self._reset()
            status, headers, answer = self._forward(body)
            if fault == "reset_after":
                return self._reset()
            self.send_response(status)
            for name, value in headers:
                if name.lower() not in HOP_BY_HOP and (name.lower() != "content-length" or self.command == "HEAD"):
                    self.send_header(name, value)
            if self.command != "HEAD":
                self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(answer)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_request

        def _read_body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass  # trailers
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
            upstream = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=120)
            try:
                headers = {name: value for name, value in self.headers.items() if name.lower() not in HOP_BY_HOP}
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                upstream.request(self.command, self.path, body=body, headers=headers)
                response = upstream.getresponse()
                return response.status, response.getheaders(), response.read()
            finally:
                upstream.close()

        def _answer_error(self, status: int) -> None:
            body = ERROR_BODIES[status] if self.command != "HEAD" else b""
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(ERROR_BODIES[status])))
            self.end_headers()
            self.wfile.write(body)

        def _reset(self) -> None:
            """Close with a TCP RST (SO_LINGER 0): the client sees 'connection reset by peer'."""
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()

    return Handler
