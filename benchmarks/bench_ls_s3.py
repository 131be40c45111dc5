"""``ckptkit ls`` of a root holding 1000 committed checkpoints on S3 (moto over HTTP, 127.0.0.1).

The checkpoints are made with ``CheckpointTransaction`` (two tiny files each, committed with a
manifest) in parallel threads. Then the CLI runs as a subprocess, the way a user runs it, with
the endpoint and dummy credentials in its environment. The moto server runs in this process and
counts the HTTP requests each ``ls`` makes. moto is slower per request than S3 on a LAN but has
no network latency, so the request count is the number to carry over to real S3.

    .venv/bin/python benchmarks/bench_ls_s3.py [--checkpoints N] [--rounds N]
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from _common import REPO, Result, Row, loadavg, main_for, table

from ckptkit.commit import CheckpointTransaction, step_dir_name
from ckptkit.storage import Store, open_store

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


class RequestCounter:
    """WSGI middleware: counts requests by kind (LIST, GET, HEAD, PUT, ...)."""

    def __init__(self, app: Callable[..., Iterable[bytes]]) -> None:
        self.app = app
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        method = environ["REQUEST_METHOD"]
        query = environ.get("QUERY_STRING", "")
        kind = "LIST" if method == "GET" and ("list-type" in query or "prefix=" in query) else method
        with self._lock:
            self.counts[kind] += 1
        return self.app(environ, start_response)

    def take(self) -> dict[str, int]:
        with self._lock:
            counts, self.counts = dict(self.counts), Counter()
        return counts


def start_server() -> tuple[Any, str, RequestCounter]:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    counter = RequestCounter(server._server.app)  # werkzeug's handler calls server.app
    server._server.app = counter
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}", counter


def populate(root: Store, count: int, threads: int = 16) -> None:
    def one(step: int) -> None:
        with CheckpointTransaction(root, step_dir_name(step)) as txn:
            txn.write("model.bin", os.urandom(256))
            txn.write("meta.json", b'{"step": %d}' % step)
            txn.commit(step=step, layout="files")

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(count)))


def time_cli(args: list[str], env: dict[str, str], counter: RequestCounter, rounds: int,
             expect_lines: int) -> Row:
    row = Row("ckptkit " + " ".join(a for a in args if not a.startswith("s3://")))
    counter.take()
    for _ in range(rounds):
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "ckptkit", *args], env=env, cwd=REPO,
                              capture_output=True, text=True)
        row.times.append(time.perf_counter() - start)
        if proc.returncode != 0 or proc.stdout.count("\n") < expect_lines:
            raise RuntimeError(f"ckptkit {args} failed ({proc.returncode}): {proc.stderr[-2000:]}")
        row.extra["requests"] = counter.take()
    return row


def run(checkpoints: int = 1000, rounds: int = 5) -> Result:
    result = Result("ls on S3")
    result.data["loadavg_start"] = loadavg()
    server, endpoint, counter = start_server()
    saved_env = dict(os.environ)
    try:
        import boto3

        os.environ.update(CREDENTIALS, AWS_ENDPOINT_URL=endpoint)
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="bench")
        url = "s3://bench/root"
        start = time.perf_counter()
        populate(open_store(url), checkpoints)
        result.data["populate_s"] = time.perf_counter() - start
        counter.take()
        env = {**os.environ, **CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}
        rows = [time_cli(["ls", url], env, counter, rounds, checkpoints),
                # The JSON form skips the debris scan; three runs show the difference well enough.
                time_cli(["ls", "--json", url], env, counter, min(rounds, 3), 1)]
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        server.stop()
    result.tables.append(
        f"`ckptkit ls` of {checkpoints} committed checkpoints (3 objects each), "
        f"CLI subprocess, median of {rounds} (--json: of {min(rounds, 3)}):\n\n"
        + table(["command", "median s", "requests per run", "all runs s"],
                [[r.name, r.median, ", ".join(f"{k} {v}" for k, v in sorted(r.extra["requests"].items())),
                  " ".join(f"{t:.2f}" for t in r.times)] for r in rows])
    )
    result.target(f"ckptkit ls s3:// ({checkpoints} checkpoints) seconds", rows[0].median, 2.0)
    result.data.update(checkpoints=checkpoints, rounds=rounds, rows=[r.__dict__ for r in rows],
                       loadavg_end=loadavg())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoints", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    main_for(run, checkpoints=args.checkpoints, rounds=args.rounds)


if __name__ == "__main__":
    main()
