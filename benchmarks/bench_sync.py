"""``ckptkit sync`` of a ~1 GB checkpoint from local disk to S3 vs ``aws s3 sync``, same run, same server.

The checkpoint is written once with ``ckptkit.save`` (10 tensors of ~100 MB, one safetensors
shard each, plus the manifest and tree). The S3 server is moto over HTTP on 127.0.0.1, started
in this process; a WSGI middleware counts requests and request body bytes, so "an unchanged
re-sync sends nothing" is measured at the server, not trusted from the client.

Each round runs both tools as subprocesses (the way a user runs them), alternating which goes
first, each into a fresh prefix: first the full upload, then the same command again with
nothing changed. Peak RSS is the sum over the subprocess and its children, sampled every 20 ms
with psutil. After each round the uploaded objects are deleted (untimed). awscli 1.x lives in
its own virtualenv (benchmarks/.aws-venv, made on first use): its botocore pin differs from the
one aiobotocore needs in .venv.

    .venv/bin/python benchmarks/bench_sync.py [--gb 1.0] [--files 10] [--rounds 3] [--jobs N]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from _common import BENCH_DIR, GB, REPO, Result, Row, dir_size, fresh_dir, loadavg, main_for, table

import ckptkit
from ckptkit.commit import step_dir_name
from ckptkit.manifest import MANIFEST_NAME

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
AWS_VENV = BENCH_DIR / ".aws-venv"
AWSCLI = "awscli==1.46.2"
BUCKET = "bench-sync"
MB = 1 << 20


# --- the S3 server, with a traffic meter --------------------------------------------------------


class TrafficMeter:
    """WSGI middleware: requests by method and request body bytes (PUT/POST payloads).

    Both clients send Content-Length (botocore over plain HTTP does not use chunked uploads),
    so the header is the byte count.
    """

    def __init__(self, app: Callable[..., Iterable[bytes]]) -> None:
        self.app = app
        self._lock = threading.Lock()
        self.requests: Counter[str] = Counter()
        self.body_bytes = 0

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        with self._lock:
            self.requests[environ["REQUEST_METHOD"]] += 1
            self.body_bytes += int(environ.get("CONTENT_LENGTH") or 0)
        return self.app(environ, start_response)

    def take(self) -> tuple[dict[str, int], int]:
        with self._lock:
            taken = dict(self.requests), self.body_bytes
            self.requests, self.body_bytes = Counter(), 0
        return taken


def start_server() -> tuple[Any, str, TrafficMeter]:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    meter = TrafficMeter(server._server.app)  # werkzeug's handler calls server.app
    server._server.app = meter
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}", meter


# --- contenders ----------------------------------------------------------------------------------


def aws_cli() -> Path:
    """The ``aws`` executable of benchmarks/.aws-venv, installing awscli there on first use."""
    aws = AWS_VENV / "bin" / "aws"
    if aws.exists():
        return aws
    print(f"installing {AWSCLI} into {AWS_VENV} (first run only)", file=sys.stderr, flush=True)
    subprocess.run(["python3", "-m", "venv", str(AWS_VENV)], check=True)
    # .venv's constraints pin botocore for aiobotocore; awscli brings its own pin.
    env = {k: v for k, v in os.environ.items() if k != "PIP_CONSTRAINT"}
    subprocess.run([str(AWS_VENV / "bin" / "pip"), "install", "-q", AWSCLI], check=True, env=env)
    return aws


@dataclass
class Run:
    """One subprocess run: wall time, peak RSS of its process tree, what it printed."""

    seconds: float
    peak_rss: int
    stdout: str


@dataclass
class Contender:
    name: str
    command: Callable[[str], list[str]]  # destination URL -> argv
    check: Callable[[str], None] = lambda stdout: None  # raises if the output reports a failure
    first: Row = field(init=False)
    again: Row = field(init=False)

    def __post_init__(self) -> None:
        self.first, self.again = Row(self.name), Row(self.name + " (unchanged re-sync)")


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):  # exited between listing and reading
            total += p.memory_info().rss
    return total


def run_sampled(argv: list[str], env: dict[str, str]) -> Run:
    """Run ``argv`` to completion, sampling the RSS of its process tree every 20 ms."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    watched, peak = psutil.Process(proc.pid), 0
    output: dict[str, str] = {}
    # communicate() in a thread drains both pipes while this one samples.
    reader = threading.Thread(
        target=lambda: output.update(zip(("out", "err"), proc.communicate(), strict=True)))
    reader.start()
    while proc.poll() is None:
        try:
            peak = max(peak, tree_rss(watched))
        except psutil.Error:
            break
        time.sleep(0.02)
    reader.join()
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[:4]} failed ({proc.returncode}): {output.get('err', '')[-2000:]}")
    return Run(seconds, peak, output.get("out", ""))


def measure(contender: Contender, dst: str, env: dict[str, str], meter: TrafficMeter) -> None:
    meter.take()
    for row in (contender.first, contender.again):
        run = run_sampled(contender.command(dst), env)
        contender.check(run.stdout)
        requests, sent = meter.take()
        row.times.append(run.seconds)
        row.extra.setdefault("peak_rss_mb", []).append(run.peak_rss / MB)
        row.extra.setdefault("bytes_sent", []).append(sent)
        row.extra["requests"] = requests


def check_ckptkit_report(stdout: str) -> None:
    report = json.loads(stdout)
    states = {c["status"] for c in report["checkpoints"]}
    if not report["ok"] or not states <= {"committed", "up-to-date"}:
        raise RuntimeError(f"ckptkit sync did not commit: {stdout[-2000:]}")


def empty_prefix(client: Any, prefix: str) -> None:
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=BUCKET, Delete={"Objects": keys})


# --- data ------------------------------------------------------------------------------------------


def make_checkpoint(root: Path, total_bytes: float, files: int) -> Path:
    """``root/step-00000001``: ``files`` float32 tensors, one safetensors shard each."""
    import torch

    per_tensor = int(total_bytes / files) // 4
    state = {f"layer{i:02d}.weight": torch.rand(per_tensor, generator=torch.Generator().manual_seed(i))
             for i in range(files)}
    # A shard limit just above one tensor: each tensor gets a shard of its own.
    ckptkit.save(state, root / step_dir_name(1), step=1, max_shard_size=per_tensor * 4 + MB)
    return root / step_dir_name(1)


# --- the benchmark ---------------------------------------------------------------------------------


def run(gb: float = 1.0, files: int = 10, rounds: int = 3, jobs: int | None = None) -> Result:
    result = Result("sync to S3")
    result.data["loadavg_start"] = loadavg()
    aws = aws_cli()
    root = fresh_dir("sync")
    checkpoint = make_checkpoint(root, gb * GB, files)
    nbytes, nfiles = dir_size(checkpoint), sum(1 for p in checkpoint.rglob("*") if p.is_file())
    server, endpoint, meter = start_server()
    try:
        import boto3

        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                              aws_access_key_id="testing", aws_secret_access_key="testing")
        client.create_bucket(Bucket=BUCKET)
        env = {**os.environ, **CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}
        job_args = ["--jobs", str(jobs)] if jobs else []
        contenders = [
            Contender("ckptkit sync",
                      lambda dst: [sys.executable, "-m", "ckptkit", "sync", str(root), dst, "--json",
                                   *job_args],
                      check_ckptkit_report),
            Contender("aws s3 sync",
                      lambda dst: [str(aws), "s3", "sync", str(root), dst, "--endpoint-url", endpoint,
                                   "--only-show-errors"]),
        ]
        for round_ in range(rounds):
            order = contenders if round_ % 2 == 0 else contenders[::-1]
            for contender in order:
                prefix = f"{contender.name.split()[0]}-{round_}"
                measure(contender, f"s3://{BUCKET}/{prefix}", env, meter)
                check_uploaded(client, f"{prefix}/{step_dir_name(1)}/", checkpoint)
                empty_prefix(client, prefix + "/")
    finally:
        server.stop()
    report(result, contenders, nbytes, nfiles, rounds)
    result.data["loadavg_end"] = loadavg()
    return result


def check_uploaded(client: Any, prefix: str, checkpoint: Path) -> None:
    """The destination holds as many data bytes in as many objects as the checkpoint.

    Compared without the manifest, whose bytes differ by design: on an object store ckptkit
    keeps the data under an attempt prefix (``<name>/ckptkit-<id>/``) that its manifest names.
    """
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    listed = [o["Size"] for page in pages for o in page.get("Contents", [])
              if not o["Key"].endswith(MANIFEST_NAME)]
    local = [p.stat().st_size for p in checkpoint.rglob("*") if p.is_file() and p.name != MANIFEST_NAME]
    if sorted(listed) != sorted(local):
        raise RuntimeError(f"{prefix}: {len(listed)} objects, {sum(listed)} bytes; expected {len(local)}, "
                           f"{sum(local)}")


def report(result: Result, contenders: list[Contender], nbytes: int, nfiles: int, rounds: int) -> None:
    ours, aws = contenders
    rows = [c.first for c in contenders] + [c.again for c in contenders]
    result.tables.append(
        f"Local → S3 (moto, 127.0.0.1) of one checkpoint, {nbytes / GB:.2f} GB in {nfiles} files, "
        f"CLI subprocesses, median of {rounds} interleaved rounds:\n\n"
        + table(["command", "median s", "MB/s", "× aws s3 sync", "peak RSS MB", "bytes sent (median)",
                 "requests (last run)", "all runs s"],
                [[r.name, r.median, nbytes / MB / r.median, r.median / aws.first.median,
                  max(r.extra["peak_rss_mb"]), int(sorted(r.extra["bytes_sent"])[len(r.times) // 2]),
                  ", ".join(f"{k} {v}" for k, v in sorted(r.extra["requests"].items())),
                  " ".join(f"{t:.2f}" for t in r.times)] for r in rows])
    )
    throughput_ratio = aws.first.median / ours.first.median  # ours MB/s ÷ aws MB/s
    resync_ratio = ours.again.median / ours.first.median
    result.target("ckptkit sync throughput ÷ aws s3 sync throughput", throughput_ratio, 1.0, at_most=False)
    result.target("unchanged re-sync time ÷ first sync time", resync_ratio, 0.10)
    result.target("unchanged re-sync request body bytes", float(max(ours.again.extra["bytes_sent"])), 0.0)
    result.data.update(bytes=nbytes, files=nfiles, rounds=rounds, throughput_ratio=throughput_ratio,
                       resync_ratio=resync_ratio, rows=[r.__dict__ for r in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gb", type=float, default=1.0)
    parser.add_argument("--files", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=None, help="ckptkit sync --jobs (default: its own)")
    args = parser.parse_args()
    main_for(run, gb=args.gb, files=args.files, rounds=args.rounds, jobs=args.jobs)


if __name__ == "__main__":
    main()
