"""A small HTTP reverse proxy in front of an S3 endpoint that answers some requests with 503 and delays others.

S3 signatures cover the Host header; the proxy passes it through unchanged, so requests signed
for the proxy's address verify at the real endpoint. Failures come from a seeded random
generator: the same seed gives the same sequence of faults.

    with FlakyProxy(seaweedfs.endpoint, error_rate=0.2, delay_rate=0.1) as proxy:
        ... use proxy.endpoint ...
    proxy.counts  # {"forwarded": n, "503 before": n, "503 after": n, "delayed": n}
"""

from __future__ import annotations

import http.client
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}
SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>ServiceUnavailable</Code>'
    b"<Message>injected by the test proxy</Message></Error>"
)


class FlakyProxy:
    def __init__(
        self,
        upstream: str,
        *,
        error_rate: float = 0.0,
        error_after_rate: float = 0.0,
        delay_rate: float = 0.0,
        delay: float = 0.3,
        seed: int = 1,
        hold_after_puts: int | None = None,
    ) -> None:
        target = urlsplit(upstream)
        self.upstream_host = target.hostname or "127.0.0.1"
        self.upstream_port = target.port or 80
        self.error_rate = error_rate  # 503 without forwarding
        self.error_after_rate = error_after_rate  # forward, then answer 503 anyway (the work was done)
        self.delay_rate = delay_rate
        self.delay = delay
        self._random = random.Random(seed)
        # hold_after_puts=N: the PUT of a chunk after the N-th waits until release() (a backup
        # caught mid-way, deterministically); `holding` is set once one waits.
        self.hold_after_puts = hold_after_puts
        self.holding = threading.Event()
        self._gate = threading.Event()
        self._chunk_puts = 0
        self._lock = threading.Lock()
        self.counts = {"forwarded": 0, "503 before": 0, "503 after": 0, "delayed": 0}
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def release(self) -> None:
        self._gate.set()

    def _maybe_hold(self, method: str, path: str) -> None:
        if self.hold_after_puts is None or method != "PUT" or "/chunks/" not in path:
            return
        with self._lock:
            self._chunk_puts += 1
            hold = self._chunk_puts > self.hold_after_puts
        if hold:
            self.holding.set()
            self._gate.wait()

    def _decide(self) -> tuple[str, bool]:
        with self._lock:
            roll, slow = self._random.random(), self._random.random() < self.delay_rate
            if roll < self.error_rate:
                fate = "503 before"
            elif roll < self.error_rate + self.error_after_rate:
                fate = "503 after"
            else:
                fate = "forwarded"
            self.counts[fate] += 1
            if slow:
                self.counts["delayed"] += 1
        return fate, slow

    def _handler_class(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_args) -> None:
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    parts = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return b"".join(parts)
                        parts.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _reply(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
                self.send_response(status)
                for name, value in headers:
                    if name.lower() not in HOP_BY_HOP and name.lower() != "content-length":
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)) if self.command != "HEAD" else self._head_length)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _unavailable(self) -> None:
                self._head_length = "0"
                self._reply(503, [("Content-Type", "application/xml")], b"" if self.command == "HEAD" else SLOW_DOWN)

            def _handle(self) -> None:
                body = self._body()
                proxy._maybe_hold(self.command, self.path)
                fate, slow = proxy._decide()
                if slow:
                    time.sleep(proxy.delay)
                if fate == "503 before":
                    self._unavailable()
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    response = conn.getresponse()
                    data = response.read()
                    self._head_length = response.getheader("Content-Length", "0")
                    status, answer = response.status, response.getheaders()
                except OSError:
                    self.close_connection = True  # the endpoint is gone: so is this connection
                    return
                finally:
                    conn.close()
                if fate == "503 after":
                    self._unavailable()
                    return
                self._reply(status, answer, data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        return Handler

    def start(self) -> FlakyProxy:
        self._thread = threading.Thread(target=self._server.serve_forever, name="flaky-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> FlakyProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
