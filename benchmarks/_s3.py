"""The S3 side of the remote benchmarks: moto in a child process with a traffic meter, the
fault-injecting proxy of the tests (with injected latency) in front of it, and awscli.

moto runs in a child process so that its request handling does not take this process's GIL, as
a remote S3 would not. A WSGI middleware in the child counts requests by kind (GET, HEAD, LIST,
PUT, POST, DELETE), request body bytes (what clients upload) and response body bytes (what they
download); ``MotoChild.take()`` fetches and zeroes those counters over the child's stdin/stdout.
Counting at the server, behind the proxy, measures what reached S3 rather than trusting a client.

The proxy is ``tests.faulty_proxy.FaultyProxy`` (faults off), run in this process, which only
waits for the contenders' subprocesses. Its ``set_latency(seconds)`` delays every request, so
runs show behaviour at real-S3 latency (10-50 ms a request). Every contender, ckptkit and aws
alike, talks to the proxy's endpoint, so both pay the same latency and the same relay cost.

Run as a script (``python benchmarks/_s3.py``), this module is the moto child.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
AWS_VENV = BENCH_DIR / ".aws-venv"
AWSCLI = "awscli==1.46.2"


# --- the child: moto plus a meter --------------------------------------------------------------


class TrafficMeter:
    """WSGI middleware: requests by kind, request and response body bytes."""

    def __init__(self, app: Callable[..., Iterable[bytes]]) -> None:
        self.app = app
        self._lock = threading.Lock()
        self._zero()

    def _zero(self) -> None:
        self.requests: Counter[str] = Counter()
        self.bytes_in = 0
        self.bytes_out = 0

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
        method = environ["REQUEST_METHOD"]
        query = environ.get("QUERY_STRING", "")
        kind = "LIST" if method == "GET" and ("list-type" in query or "prefix=" in query) else method
        with self._lock:
            self.requests[kind] += 1
            # Both clients send Content-Length over plain HTTP; a chunked body would count 0 here,
            # which the proxy's own bytes_to_upstream would show.
            self.bytes_in += int(environ.get("CONTENT_LENGTH") or 0)
        body = self.app(environ, start_response)
        try:
            for block in body:
                if method != "HEAD":  # the server sends no body for a HEAD, whatever moto returns
                    with self._lock:
                        self.bytes_out += len(block)
                yield block
        finally:
            close = getattr(body, "close", None)
            if close is not None:
                close()

    def take(self) -> dict[str, Any]:
        with self._lock:
            taken = {"requests": dict(self.requests), "bytes_in": self.bytes_in, "bytes_out": self.bytes_out}
            self._zero()
        return taken


def serve_moto() -> None:
    """The child: print the port, then answer each ``take`` line on stdin with the counters."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    meter = TrafficMeter(server._server.app)  # werkzeug's handler calls server.app
    server._server.app = meter
    print(server.get_host_and_port()[1], flush=True)
    for line in sys.stdin:  # EOF: the parent is gone or done
        if line.strip() == "take":
            print(json.dumps(meter.take()), flush=True)
    server.stop()


# --- the parent's handle on it -----------------------------------------------------------------


@dataclass
class Traffic:
    """What reached the server between two ``take()`` calls."""

    requests: dict[str, int] = field(default_factory=dict)
    bytes_in: int = 0  # request bodies: uploads
    bytes_out: int = 0  # response bodies: downloads

    def describe(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(self.requests.items())) or "none"


class MotoChild:
    """A moto server in a child process; ``url`` is its endpoint, ``take()`` its traffic."""

    def __init__(self) -> None:
        self._proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True, cwd=REPO)
        assert self._proc.stdout is not None
        port = self._proc.stdout.readline().strip()
        if not port.isdigit():
            self._proc.kill()
            raise RuntimeError("the moto server child did not start")
        self.url = f"http://127.0.0.1:{port}"
        self.pid = self._proc.pid

    def take(self) -> Traffic:
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write("take\n")
        self._proc.stdin.flush()
        return Traffic(**json.loads(self._proc.stdout.readline()))

    def stop(self) -> None:
        assert self._proc.stdin is not None
        self._proc.stdin.close()
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()

    def __enter__(self) -> MotoChild:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Meter:
    """The traffic of one measured run, counted at the server; it must all have come through the
    proxy (a contender that ignored the endpoint would not pay the injected latency)."""

    def __init__(self, moto: MotoChild, proxy: Any) -> None:
        self.moto, self.proxy = moto, proxy

    def _proxy_requests(self) -> int:
        """Requests the proxy saw since the last call; its counters (and log) zeroed."""
        if hasattr(self.proxy, "stats"):
            return sum(self.proxy.stats(reset=True).requests.values())
        seen = sum(self.proxy.requests.values())
        self.proxy.reset_counters()
        return seen

    def start(self) -> None:
        self.moto.take()
        self._proxy_requests()

    def take(self) -> Traffic:
        traffic, proxied = self.moto.take(), self._proxy_requests()
        if proxied != sum(traffic.requests.values()):
            raise RuntimeError(f"{sum(traffic.requests.values())} requests reached moto, {proxied} came "
                               "through the proxy: a contender bypassed the endpoint")
        return traffic


def request_ms(endpoint: str, bucket: str, rounds: int = 30) -> float:
    """Median milliseconds of one small GET through ``endpoint`` on a kept-alive connection: the
    per-request cost the proxy and its injected latency add, shown next to the tables."""
    client = s3_client(endpoint)
    client.put_object(Bucket=bucket, Key="probe", Body=b"x" * 1024)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        client.get_object(Bucket=bucket, Key="probe")["Body"].read()
        times.append(time.perf_counter() - start)
    client.delete_object(Bucket=bucket, Key="probe")
    return sorted(times)[rounds // 2] * 1000


def probe_line(probe: dict[str, float]) -> str:
    """``request_ms`` results (``direct to moto`` first), as the line printed under the tables,
    with a warning where the proxy itself adds more than the latency it was asked for."""
    line = "One small GET on a kept-alive connection (boto3, median of 30): " + "; ".join(
        f"{where} {ms:.1f} ms" for where, ms in probe.items())
    direct, at_zero = probe.get("direct to moto"), probe.get("through the proxy at 0 ms")
    if direct is not None and at_zero is not None and at_zero - direct > 10:
        line += (f". **Warning: the proxy adds {at_zero - direct:.0f} ms per request by itself**, so "
                 "the '0 ms' tables are not at zero latency (Nagle's algorithm against delayed ACKs "
                 "on the proxy's client socket gives ~40 ms; TCP_NODELAY there removes it)")
    return line


def s3_client(endpoint: str) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def empty_prefix(client: Any, bucket: str, prefix: str) -> None:
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys})


def object_sizes(client: Any, bucket: str, prefix: str) -> dict[str, int]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"]: o["Size"] for page in pages for o in page.get("Contents", [])}


# --- the proxy ---------------------------------------------------------------------------------


def start_proxy(upstream: str) -> Any:
    """The tests' FaultyProxy in front of ``upstream``, faults off, latency 0."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from tests.faulty_proxy import FaultyProxy

    proxy = FaultyProxy(upstream)
    proxy.start()
    return proxy


def set_latency(proxy: Any, seconds: float) -> bool:
    """Delay each request by ``seconds``; False if this proxy cannot (then nothing changed)."""
    if hasattr(proxy, "set_latency"):
        proxy.set_latency(seconds)
        return True
    return seconds == 0


# --- awscli ------------------------------------------------------------------------------------


def aws_cli() -> Path:
    """The ``aws`` executable of benchmarks/.aws-venv, installing awscli there on first use.

    A venv of its own: awscli 1.x pins a botocore that differs from the one aiobotocore needs
    in .venv.
    """
    aws = AWS_VENV / "bin" / "aws"
    if aws.exists():
        return aws
    print(f"installing {AWSCLI} into {AWS_VENV} (first run only)", file=sys.stderr, flush=True)
    subprocess.run(["python3", "-m", "venv", str(AWS_VENV)], check=True)
    env = {k: v for k, v in os.environ.items() if k != "PIP_CONSTRAINT"}  # .venv's pins
    subprocess.run([str(AWS_VENV / "bin" / "pip"), "install", "-q", AWSCLI], check=True, env=env)
    return aws


def client_env(endpoint: str) -> dict[str, str]:
    """The environment of a contender subprocess: dummy credentials, ``endpoint`` for S3."""
    return {**os.environ, **CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}


if __name__ == "__main__":
    serve_moto()
