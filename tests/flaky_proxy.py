"""A loopback HTTP proxy that fails a seeded fraction of requests, for object-store fault tests.

It stands between an S3 client (s3fs/aiobotocore, in this process or in Dask worker processes) and the moto server:
point ``endpoint_url`` at :attr:`FlakyProxy.url`. Each request is read whole (headers and body, ``Content-Length`` or
chunked), then either forwarded to the upstream server and its response relayed, or failed, with probability
``fail_rate`` (a seeded draw, one per request):

- ``"503"``: an S3 ``SlowDown`` error response (HTTP 503), which the request never got past;
- ``"drop"``: the connection is closed without a response (the client sees it reset or closed mid-exchange).

Both faults happen *before* the upstream server sees the request, so a retry is always safe: the test measures the
client's retries, not what S3 does with a request applied twice. :attr:`FlakyProxy.injected` counts the faults by kind
and :attr:`FlakyProxy.forwarded` the requests that went through. ``fail_rate=1.0`` is a store that is down.
"""

from __future__ import annotations

import collections
import http.client
import http.server
import socketserver
import threading
from collections.abc import Sequence

import numpy as np

#: The body of the 503 the proxy answers: what S3 sends when it throttles (``s3fs`` and botocore match "SlowDown").
SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")
#: Headers not relayed hop by hop: the proxy reads bodies whole and sends them with a Content-Length.
_HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "trailer", "upgrade"}


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    proxy: FlakyProxy


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        proxy: FlakyProxy = self.server.proxy  # type: ignore[attr-defined]
        body = self._read_body()
        fault = proxy._draw()
        if fault == "drop":
            self.close_connection = True
            self.wfile.flush()
            self.connection.close()
            return
        if fault == "503":
            self.send_response(503, "Slow Down")
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(SLOW_DOWN)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(SLOW_DOWN)
            return
        upstream = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=60)
        try:
            upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in _HOP_HEADERS and name.lower() != "content-length":
                    upstream.putheader(name, value)
            if body or self.command in ("PUT", "POST"):
                upstream.putheader("Content-Length", str(len(body)))
            upstream.endheaders(body)
            response = upstream.getresponse()
            data = response.read()
            self.send_response(response.status, response.reason)
            for name, value in response.getheaders():
                if name.lower() not in _HOP_HEADERS and name.lower() != "content-length":
                    self.send_header(name, value)
            # a HEAD response announces the object's length without a body
            length = response.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
            if length is not None:
                self.send_header("Content-Length", length)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        finally:
            upstream.close()
        with proxy._lock:
            proxy.forwarded += 1

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle


class FlakyProxy:
    """A threaded HTTP proxy on 127.0.0.1 (a free port) to ``upstream`` (``"http://host:port"``).

    ``fail_rate`` of the requests (seeded by ``seed``) fail with one of ``faults`` ("503", "drop"), chosen
    uniformly. Change ``fail_rate`` at any time (it is read per request). Use as a context manager."""

    def __init__(self, upstream: str, *, fail_rate: float = 0.2, faults: Sequence[str] = ("503", "drop"),
                 seed: int = 0) -> None:
        host_port = upstream.split("://", 1)[-1].rstrip("/")
        host, _, port = host_port.partition(":")
        self.upstream_host, self.upstream_port = host, int(port or 80)
        unknown = set(faults) - {"503", "drop"}
        if unknown or not faults:
            raise ValueError(f"faults must be a non-empty subset of ('503', 'drop'), got {faults!r}")
        self.fail_rate, self.faults = float(fail_rate), tuple(faults)
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()
        self.injected: collections.Counter[str] = collections.Counter()
        self.forwarded = 0
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.proxy = self
        self._thread = threading.Thread(target=self._server.serve_forever, name="flaky-proxy", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def n_injected(self) -> int:
        return sum(self.injected.values())

    def _draw(self) -> str | None:
        with self._lock:
            u, pick = self._rng.random(), int(self._rng.integers(len(self.faults)))
            if u >= self.fail_rate:
                return None
            fault = self.faults[pick]
            self.injected[fault] += 1
            return fault

    def start(self) -> FlakyProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FlakyProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
