"""A fault-injecting HTTP reverse proxy for S3 tests: real sockets, real failures.

``FaultyProxy(upstream)`` listens on 127.0.0.1 (a free port) and forwards every request to
``upstream`` (the moto server). On a configurable share of requests it injects one fault:

- ``slowdown``: answers 503 with S3's ``<Error><Code>SlowDown</Code>`` body without forwarding,
  which botocore classifies as throttling and retries;
- ``reset_before``: resets the client connection (SO_LINGER 0 → RST) before forwarding;
- ``reset_after``: forwards, lets the upstream finish the work, then resets instead of answering,
  so the object exists although the client saw an error;
- ``truncate``: forwards, sends the upstream's status and headers (its full Content-Length) but
  only ``truncate_fraction`` of the body, then closes. Only responses with a body count.

Which requests may be hit is narrowed by ``predicate(method, path)``; ``limit`` caps the number
of faults (``limit=1``: exactly the first matching request fails). The draws come from a seeded
RNG, so a single-threaded client sees the same faults on every run.

``latency`` (seconds, ``FaultyProxy(upstream, latency=0.02)`` or ``set_latency(0.02)``) delays
every request, faulted or not, once before the proxy acts on it: a network round trip, not a
queue, so concurrent requests wait concurrently and a client's own concurrency still pays off.

Counters: ``requests`` (by method), ``faults`` (by kind), ``bytes_to_upstream`` (request body
bytes forwarded: PUT/POST payloads, after removing HTTP chunked framing), ``bytes_from_upstream``
(response body bytes the upstream sent, whether or not a fault then kept them from the client)
and ``log`` (one ``(method, path, fault or None)`` per request, in arrival order). Benchmarks
read them with ``stats(reset=True)``: one consistent snapshot per phase, zeroed for the next.

Request bodies may come with Content-Length or ``Transfer-Encoding: chunked`` (streamed through
as chunked); ``Expect: 100-continue`` is answered by the proxy. Client connections are kept
alive; each forwarded request uses a fresh upstream connection, so a stale upstream keep-alive
never turns into a fault nobody asked for.
"""

from __future__ import annotations

import contextlib
import http.client
import random
import socket
import struct
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

FAULT_KINDS = ("slowdown", "reset_before", "reset_after", "truncate")
Predicate = Callable[[str, str], bool]

_BLOCK = 1 << 20
# Hop-by-hop headers (RFC 9110 §7.6.1) are the proxy's own business on each side. Expect is
# answered here; the upstream gets the whole body at once.
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
               "upgrade", "expect"}
_SLOWDOWN_BODY = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    "<Message>Please reduce your request rate.</Message><RequestId>{rid}</RequestId>"
    "<HostId>faulty-proxy</HostId></Error>"
)


@dataclass
class FaultPlan:
    """What to inject: a probability per kind (summing to at most 1), a filter and a cap."""

    rates: dict[str, float] = field(default_factory=dict)
    predicate: Predicate | None = None
    limit: int | None = None
    truncate_fraction: float = 0.5

    def __post_init__(self) -> None:
        unknown = set(self.rates) - set(FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kind(s) {sorted(unknown)}; known: {FAULT_KINDS}")
        if any(not 0 <= r <= 1 for r in self.rates.values()) or sum(self.rates.values()) > 1 + 1e-9:
            raise ValueError(f"fault rates must be in [0, 1] and sum to at most 1: {self.rates}")
        if not 0 <= self.truncate_fraction < 1:
            raise ValueError("truncate_fraction must be in [0, 1)")


class FaultyProxy:
    """A threaded reverse proxy in front of ``upstream`` that injects faults; see the module doc."""

    def __init__(self, upstream: str, *, seed: int = 0, latency: float = 0.0) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname or not parts.port:
            raise ValueError(f"upstream must be http://host:port, got {upstream!r}")
        self.upstream = (parts.hostname, parts.port)
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self._plan = FaultPlan()
        self._faults_left: int | None = None
        self.requests: Counter[str] = Counter()
        self.faults: Counter[str] = Counter()
        self.bytes_to_upstream = 0
        self.bytes_from_upstream = 0
        self.log: list[_Logged] = []
        self._latency = 0.0
        self.set_latency(latency)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> FaultyProxy:
        self._server = _Server(("127.0.0.1", 0), _Handler, self)
        self._thread = threading.Thread(target=self._server.serve_forever, name="faulty-proxy",
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.close_all()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join()
        self._server = self._thread = None

    def __enter__(self) -> FaultyProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("proxy not started")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # --- configuration and counters -------------------------------------------------------

    def set_faults(self, *, predicate: Predicate | None = None, limit: int | None = None,
                   truncate_fraction: float = 0.5, seed: int | None = None, **rates: float) -> None:
        """Replace the fault plan, e.g. ``set_faults(slowdown=0.2, reset_after=0.1, limit=5)``.

        ``seed`` restarts the RNG, so a plan can be replayed exactly.
        """
        plan = FaultPlan(rates, predicate, limit, truncate_fraction)
        with self._lock:
            self._plan, self._faults_left = plan, limit
            if seed is not None:
                self._rng.seed(seed)

    def clear_faults(self) -> None:
        self.set_faults()

    @property
    def latency(self) -> float:
        return self._latency

    def set_latency(self, seconds: float) -> None:
        """Delay every request from now on by ``seconds`` (0: none), e.g. 0.02 for real S3."""
        if not 0 <= seconds < 60:
            raise ValueError(f"latency must be in [0, 60) seconds, got {seconds!r}")
        self._latency = float(seconds)

    def reset_counters(self) -> None:
        with self._lock:
            self._zero_counters()

    def _zero_counters(self) -> None:
        self.requests.clear()
        self.faults.clear()
        self.bytes_to_upstream = self.bytes_from_upstream = 0
        self.log.clear()

    def stats(self, *, reset: bool = False) -> ProxyStats:
        """The counters as one consistent snapshot; ``reset`` zeroes them in the same step, so
        a benchmark's phases each count only their own traffic."""
        with self._lock:
            snapshot = ProxyStats(dict(self.requests), dict(self.faults), self.bytes_to_upstream,
                                  self.bytes_from_upstream)
            if reset:
                self._zero_counters()
        return snapshot

    def _choose(self, method: str, path: str) -> tuple[_Logged, float]:
        """Count the request and draw its fault (``fault`` None: forward untouched)."""
        with self._lock:
            plan = self._plan
            self.requests[method] += 1
            fault = None
            applies = plan.rates and (plan.predicate is None or plan.predicate(method, path))
            if applies and self._faults_left != 0:
                draw, edge = self._rng.random(), 0.0
                for kind in FAULT_KINDS:
                    edge += plan.rates.get(kind, 0.0)
                    if draw < edge:
                        fault = kind
                        break
            entry = _Logged(method, path, fault)
            if fault is not None and fault != "truncate":  # truncate counts once it really cuts
                self._record_fault(fault)
            self.log.append(entry)
            return entry, plan.truncate_fraction

    def _record_fault(self, kind: str) -> None:
        self.faults[kind] += 1
        if self._faults_left is not None:
            self._faults_left -= 1

    def _settle_truncate(self, entry: _Logged, cut: bool) -> None:
        """A truncate drawn for a response without a body did nothing: it is not a fault."""
        with self._lock:
            if cut:
                self._record_fault("truncate")
            else:
                entry.fault = None

    def _add_upstream_bytes(self, n: int) -> None:
        with self._lock:
            self.bytes_to_upstream += n

    def _add_downstream_bytes(self, n: int) -> None:
        with self._lock:
            self.bytes_from_upstream += n


@dataclass(frozen=True)
class ProxyStats:
    """What went through the proxy: requests by method, faults by kind, body bytes each way."""

    requests: dict[str, int]
    faults: dict[str, int]
    bytes_to_upstream: int
    bytes_from_upstream: int

    @property
    def total_requests(self) -> int:
        return sum(self.requests.values())


@dataclass
class _Logged:
    """One request as the proxy saw it; unpacks as ``method, path, fault``. ``headers``: the
    request headers as received, names lower-cased (what a client really sent, e.g. whether it
    signed the payload: ``x-amz-content-sha256``)."""

    method: str
    path: str
    fault: str | None
    headers: dict[str, str] = field(default_factory=dict)

    def __iter__(self) -> Iterator[str | None]:
        return iter((self.method, self.path, self.fault))


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[_Handler], proxy: FaultyProxy) -> None:
        self.proxy = proxy
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, handler)

    def handle_error(self, request: object, client_address: object) -> None:
        if not isinstance(sys.exc_info()[1], OSError):  # resets and hang-ups are routine here
            super().handle_error(request, client_address)

    def close_all(self) -> None:
        """Wake handler threads blocked on idle keep-alive connections so they exit."""
        with self.connections_lock:
            for conn in list(self.connections):
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive with the client
    timeout = 120
    server: _Server

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in separate writes; with Nagle's algorithm the body waits for
        # the client's delayed ACK (~40 ms on Linux), which would add latency nobody asked for.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.server.connections_lock:
            self.server.connections.add(self.connection)

    def finish(self) -> None:
        with self.server.connections_lock:
            self.server.connections.discard(self.connection)
        with contextlib.suppress(OSError):  # the connection was reset on purpose, or by the client
            super().finish()

    def log_message(self, format: str, *args: object) -> None:
        pass  # one line per request would drown the test output

    def _any_method(self) -> None:
        proxy = self.server.proxy
        entry, fraction = proxy._choose(self.command, self.path)
        entry.headers = {name.lower(): value for name, value in self.headers.items()}
        if proxy.latency:
            time.sleep(proxy.latency)  # this handler's own thread: requests wait side by side
        fault = entry.fault
        if fault == "reset_before":
            self._reset()
            return
        if fault == "slowdown":
            for _ in self._body_blocks():  # the client is sending it; keep the connection usable
                pass
            self._send_slowdown()
            return
        upstream = http.client.HTTPConnection(*proxy.upstream, timeout=self.timeout)
        try:
            response = self._forward(upstream)
            if fault == "reset_after":
                # Let the upstream finish before the client hears.
                while block := response.read(_BLOCK):
                    proxy._add_downstream_bytes(len(block))
                self._reset()
                return
            self._relay(response, fraction if fault == "truncate" else None, entry)
        finally:
            upstream.close()

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = do_PATCH = do_OPTIONS = _any_method

    # --- request side ---------------------------------------------------------------------

    def _body_blocks(self) -> Iterator[bytes]:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            yield from self._chunked_blocks()
            return
        remaining = int(self.headers.get("Content-Length") or 0)
        while remaining:
            block = self.rfile.read(min(remaining, _BLOCK))
            if not block:
                raise ConnectionError("client closed the connection mid-body")
            remaining -= len(block)
            yield block

    def _chunked_blocks(self) -> Iterator[bytes]:
        while True:
            size_line = self.rfile.readline(1024)
            if not size_line:
                raise ConnectionError("client closed the connection mid-chunk")
            size = int(size_line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):  # trailers: dropped
                    pass
                return
            remaining = size
            while remaining:
                block = self.rfile.read(min(remaining, _BLOCK))
                if not block:
                    raise ConnectionError("client closed the connection mid-chunk")
                remaining -= len(block)
                yield block
            self.rfile.readline(16)  # CRLF after the chunk data

    def _forward(self, upstream: http.client.HTTPConnection) -> http.client.HTTPResponse:
        chunked = self.headers.get("Transfer-Encoding", "").lower() == "chunked"
        # Host stays as the client sent it: it is signed, and URLs in answers then name the proxy.
        upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
        for name, value in self.headers.items():
            if name.lower() not in _HOP_BY_HOP:
                upstream.putheader(name, value)
        if chunked:
            upstream.putheader("Transfer-Encoding", "chunked")
        upstream.endheaders()
        for block in self._body_blocks():
            upstream.send(b"%x\r\n%s\r\n" % (len(block), block) if chunked else block)
            self.server.proxy._add_upstream_bytes(len(block))
        if chunked:
            upstream.send(b"0\r\n\r\n")
        return upstream.getresponse()

    # --- response side --------------------------------------------------------------------

    def _relay(self, response: http.client.HTTPResponse, truncate: float | None, entry: _Logged) -> None:
        """Send the upstream's answer; with ``truncate``, only that share of the body."""
        headers = [(k, v) for k, v in response.getheaders() if k.lower() not in _HOP_BY_HOP]
        length = response.getheader("Content-Length")
        # http.client already removed any chunked framing; without a length, buffer to get one.
        body = None if length is not None else response.read()
        if body is not None:
            headers.append(("Content-Length", str(len(body))))
        total = len(body) if body is not None else int(length or 0)
        if self.command == "HEAD" or response.status in (204, 304):
            total = 0
        cut = int(total * truncate) if truncate is not None and total else None
        if truncate is not None:
            self.server.proxy._settle_truncate(entry, cut is not None)
        self.send_response_only(response.status, response.reason)
        for name, value in headers:
            self.send_header(name, value)
        if cut is not None:
            self.close_connection = True
        self.end_headers()
        sent = 0
        for block in [body] if body is not None else iter(lambda: response.read(_BLOCK), b""):
            self.server.proxy._add_downstream_bytes(len(block))
            if cut is not None:
                block = block[: max(cut - sent, 0)]
            if block:
                self.wfile.write(block)
                sent += len(block)
        self.wfile.flush()

    def _send_slowdown(self) -> None:
        body = _SLOWDOWN_BODY.format(rid=uuid.uuid4().hex[:16].upper()).encode()
        self.send_response_only(503, "Slow Down")
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.wfile.flush()

    def _reset(self) -> None:
        """Abort the connection with a TCP RST: SO_LINGER 0, then close the descriptor now
        (a plain close would wait for rfile/wfile and send a FIN first)."""
        self.close_connection = True
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with self.server.connections_lock:
            self.server.connections.discard(self.connection)
        socket.close(self.connection.detach())
