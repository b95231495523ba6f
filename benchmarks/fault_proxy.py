"""A fault-injecting HTTP proxy on 127.0.0.1 in front of an S3 endpoint (used by ``benchmarks.mirror_check``).

Every request is forwarded to the upstream endpoint with :mod:`http.client`, except a seeded random fraction
``error_rate`` of them, which are answered at once with S3's ``500 InternalError`` (an XML error body, none for
HEAD) without reaching the upstream. The proxy is the endpoint its clients are given (``--endpoint-url``), not
an HTTP proxy in the ``HTTP_PROXY`` sense: the ``Host`` header is passed on unchanged, so SigV4 signatures
stay valid. It counts requests, injected errors and forwarding failures::

    with FaultProxy("http://127.0.0.1:5000", error_rate=0.1, seed=1) as proxy:
        ...  # point clients at proxy.url
        print(proxy.counts())
"""

from __future__ import annotations

import contextlib
import http.client
import random
import socket
import sys
import threading
import uuid
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit
from xml.sax.saxutils import escape

from lustrefs.demo.locals3 import HOST

from .host import is_loopback_url

# Headers of one hop only (RFC 9110 7.6.1), never passed on; Expect is answered by this proxy.
HOP_BY_HOP = frozenset(
    ("connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te", "trailer",
     "transfer-encoding", "upgrade", "expect")
)  # fmt: skip
ERROR_BODY = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
    "<Resource>{resource}</Resource><RequestId>{request_id}</RequestId></Error>"
)
MESSAGES = {
    "InternalError": "We encountered an internal error. Please try again.",
    "BadGateway": "The fault proxy could not reach the upstream endpoint.",
}
UPSTREAM_TIMEOUT = 120.0  # seconds one forwarded request may take (a server-side copy on moto is slow)
IDLE_TIMEOUT = 600.0  # seconds an idle client connection is kept open


class FaultProxy:
    """The proxy: :meth:`start`, point clients at :attr:`url`, read :meth:`counts`, :meth:`stop`."""

    def __init__(self, upstream_url: str, error_rate: float = 0.0, seed: int = 0, port: int = 0) -> None:
        if not is_loopback_url(upstream_url):
            raise ValueError(f"refusing to forward to {upstream_url}: only loopback endpoints are allowed")
        if not 0.0 <= error_rate <= 1.0:
            raise ValueError(f"error rate {error_rate} is not between 0 and 1")
        parts = urlsplit(upstream_url)
        self.upstream_host = parts.hostname or HOST
        self.upstream_port = parts.port or 80
        self.error_rate = error_rate
        self._port = port
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._requests: Counter[str] = Counter()  # by method
        self._injected: Counter[str] = Counter()
        self._upstream_failures = 0
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # --- life cycle -----------------------------------------------------------------------------------------
    def start(self) -> FaultProxy:
        """Listen on 127.0.0.1 (a free port unless one was given) and serve in a background thread."""
        if self._server is not None:
            raise RuntimeError("the proxy is already running")
        server = _Server((HOST, self._port), _Handler)
        server.proxy = self
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="fault-proxy", daemon=True)  # fmt: skip
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, close every client connection and wait (bounded) for the serving thread. Idempotent."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.close_connections()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the proxy is not running")
        return f"http://{HOST}:{self._server.server_address[1]}"

    # --- counting -------------------------------------------------------------------------------------------
    def counts(self) -> dict[str, Any]:
        """A snapshot: requests received, errors injected (also by method), forwarding failures (502)."""
        with self._lock:
            return {
                "requests": sum(self._requests.values()),
                "injected_errors": sum(self._injected.values()),
                "upstream_failures": self._upstream_failures,
                "requests_by_method": dict(self._requests),
                "injected_by_method": dict(self._injected),
            }

    def reset_counts(self) -> None:
        with self._lock:
            self._requests.clear()
            self._injected.clear()
            self._upstream_failures = 0

    def set_error_rate(self, rate: float) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"error rate {rate} is not between 0 and 1")
        with self._lock:
            self.error_rate = rate

    def _decide(self, method: str) -> bool:
        """Count a request; True if it is to be answered with an injected error (one draw per request)."""
        with self._lock:
            self._requests[method] += 1
            inject = self._rng.random() < self.error_rate
            if inject:
                self._injected[method] += 1
            return inject

    def _upstream_failed(self) -> None:
        with self._lock:
            self._upstream_failures += 1


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    proxy: FaultProxy

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._conns_lock:
            self._conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went away (a killed daemon) is expected; anything else is printed as usual."""
        if isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
            return
        super().handle_error(request, client_address)

    def close_connections(self) -> None:
        """Shut down every open client connection (their threads then see EOF and end)."""
        with self._conns_lock:
            conns = list(self._conns)
        for sock in conns:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as botocore expects
    timeout = IDLE_TIMEOUT
    server: _Server

    def setup(self) -> None:
        super().setup()
        self._upstream: http.client.HTTPConnection | None = None

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self._close_upstream()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    # --- one request ----------------------------------------------------------------------------------------
    def _serve(self) -> None:
        proxy = self.server.proxy
        body = self._read_body()
        if proxy._decide(self.command):
            self._answer_error(500, "InternalError")
            return
        try:
            status, reason, headers, data = self._forward(body)
        except (OSError, http.client.HTTPException):
            proxy._upstream_failed()
            self._answer_error(502, "BadGateway")
            return
        self.send_response_only(status, reason)
        for name, value in headers:
            self.send_header(name, value)
        if self.command != "HEAD" and status >= 200 and status not in (204, 304):
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        self.wfile.flush()

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = do_PATCH = do_OPTIONS = _serve

    def _read_body(self) -> bytes | None:
        """The request body (HTTP chunked encoding undone), or None if the request has none."""
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = self.headers.get("Content-Length")
        return self.rfile.read(int(length)) if length is not None else None

    def _forward(self, body: bytes | None) -> tuple[int, str, list[tuple[str, str]], bytes]:
        """Send the request upstream (once more on a fresh connection if a kept-alive one was stale)."""
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        if body is not None:
            headers = {k: v for k, v in headers.items() if k.lower() != "content-length"}
            headers["Content-Length"] = str(len(body))
        for attempt in (1, 2):
            reused = self._upstream is not None
            conn = self._connection()
            try:
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
            except (OSError, http.client.HTTPException):
                self._close_upstream()
                if attempt == 2 or not reused:
                    raise
                continue
            if resp.will_close:
                self._close_upstream()
            keep = [(k, v) for k, v in resp.getheaders() if k.lower() not in HOP_BY_HOP]
            if self.command != "HEAD":  # the proxy sets the length of what it sends
                keep = [(k, v) for k, v in keep if k.lower() != "content-length"]
            return resp.status, resp.reason, keep, data
        raise AssertionError("unreachable")

    def _connection(self) -> http.client.HTTPConnection:
        if self._upstream is None:
            proxy = self.server.proxy
            self._upstream = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port,
                                                        timeout=UPSTREAM_TIMEOUT)  # fmt: skip
        return self._upstream

    def _close_upstream(self) -> None:
        conn, self._upstream = getattr(self, "_upstream", None), None
        if conn is not None:
            conn.close()

    def _answer_error(self, status: int, code: str) -> None:
        request_id = uuid.uuid4().hex[:16].upper()
        resource = escape(self.path.split("?", 1)[0])
        body = ERROR_BODY.format(code=code, message=MESSAGES[code], resource=resource, request_id=request_id).encode()
        self.send_response_only(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("x-amz-request-id", request_id)
        self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.wfile.flush()
