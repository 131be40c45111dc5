"""Reading checkpoints where they lie on S3: ``ckptkit verify`` and ``inspect`` of remote objects
against downloading the same bytes, at 0 ms and at 20 ms of injected latency per request.

S3 is moto in a child process behind the tests' fault proxy (faults off, ``set_latency``), see
``_s3.py``; the moto child counts requests and response bytes, so "bytes read" is what left the
server. Every contender is a CLI subprocess talking to the proxy; rounds are interleaved.

(a) A committed checkpoint of ``--gb`` (random fp32 tensors saved with ``ckptkit.save``'s
    defaults): ``ckptkit verify s3://…`` (every digest) against ``aws s3 cp --recursive`` of
    the same objects into tmpfs. Target: ≥ 0.8× aws's throughput.
(b) A ~300 MB ``torch.save`` file (a 27M-parameter transformer + AdamW state, ~250 tensors), no
    manifest: structural ``ckptkit verify s3://…/model.pt`` (zip directory, records, CRC-32s,
    pickle) against downloading it once, by ``aws s3 cp`` and by a single boto3 ``get_object``.
    Target: ≤ 1.5× the faster download's time.
(c) ``ckptkit inspect --json`` of that file: bytes read ÷ file size. Target: < 1 %.

    .venv/bin/python benchmarks/bench_remote.py [--gb 1.0] [--rounds 3] [--latency-ms 0,20]
                                                [--quick]

``--quick`` (0.1 GB checkpoint, an 8 MB .pt, one round) is the smoke test, under a minute. A
full run takes about 4-5 minutes here once reads are fast (setup ~1 min: building the states,
uploading 1.3 GB to moto); with one ~0.5 MB GET at a time for the structural verify, as before
issue 13, each structural verify of the 300 MB file took 80-120 s and the run ~15 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import GB, WORK, Result, Row, fresh_dir, loadavg, main_for, table
from _model import Config, training_state
from _procs import run_tool
from _s3 import (
    CREDENTIALS,
    Meter,
    MotoChild,
    aws_cli,
    client_env,
    object_sizes,
    probe_line,
    request_ms,
    s3_client,
    set_latency,
    start_proxy,
)

import ckptkit
from ckptkit.commit import step_dir_name

BUCKET = "bench-remote"
CHECKPOINT = f"ckpt/{step_dir_name(1)}"
PT_KEY = "pt/model.pt"
MB = 1 << 20
# ~27M parameters + AdamW: 0.32 GB, ~250 tensors; the quick one ~0.7M parameters, 8 MB.
PT_FULL = Config(vocab=8000, width=512, layers=6, heads=8, ffn=2048)
PT_QUICK = Config(vocab=1000, width=128, layers=2, heads=4, ffn=512)
SCRATCH = (Path("/dev/shm") if Path("/dev/shm").is_dir() else WORK) / "ckptkit-bench-remote"
# One GET of the whole object, read in 8 MiB blocks and dropped: the least a download can cost.
GET_ONCE = (
    "import sys, boto3; b = boto3.client('s3', endpoint_url=sys.argv[1]).get_object("
    "Bucket=sys.argv[2], Key=sys.argv[3])['Body']\n"
    "while b.read(8 << 20): pass"
)


# --- data ------------------------------------------------------------------------------------------


@contextmanager
def s3_env(endpoint: str) -> Iterator[None]:
    saved = dict(os.environ)
    os.environ.update(CREDENTIALS, AWS_ENDPOINT_URL=endpoint)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def save_checkpoint(endpoint: str, total_bytes: float, tensors: int = 10) -> None:
    """A committed checkpoint of ``total_bytes`` at s3://BUCKET/CHECKPOINT, ckptkit's defaults."""
    import torch

    per_tensor = int(total_bytes / tensors) // 4
    state = {f"layer{i:02d}.weight": torch.rand(per_tensor, generator=torch.Generator().manual_seed(i))
             for i in range(tensors)}
    with s3_env(endpoint):
        ckptkit.save(state, f"s3://{BUCKET}/{CHECKPOINT}", step=1)


def upload_torch_file(client: Any, cfg: Config) -> None:
    import torch

    path = fresh_dir("remote") / "model.pt"
    torch.save(training_state(cfg), path)
    client.upload_file(str(path), BUCKET, PT_KEY)
    shutil.rmtree(path.parent)


# --- contenders ------------------------------------------------------------------------------------


@dataclass
class Contender:
    name: str
    group: str  # "checkpoint" (a) or "pt" (b, c)
    argv: Callable[[str], list[str]]  # scratch directory -> argv
    ok_codes: tuple[int, ...] = (0,)
    rows: dict[float, Row] = field(default_factory=dict)

    def row(self, latency_ms: float) -> Row:
        return self.rows.setdefault(latency_ms, Row(self.name))


def contenders(aws: Path, endpoint: str) -> list[Contender]:
    ckptkit_cli = [sys.executable, "-m", "ckptkit"]
    aws_cp = [str(aws), "s3", "cp", "--endpoint-url", endpoint, "--only-show-errors"]
    checkpoint, pt = f"s3://{BUCKET}/{CHECKPOINT}", f"s3://{BUCKET}/{PT_KEY}"
    return [
        Contender("ckptkit verify (digests)", "checkpoint", lambda _: [*ckptkit_cli, "verify", checkpoint,
                                                                       "--json"]),
        Contender("aws s3 cp --recursive", "checkpoint",
                  lambda scratch: [*aws_cp, "--recursive", checkpoint, f"{scratch}/aws-checkpoint"]),
        Contender("ckptkit verify (structural)", "pt", lambda _: [*ckptkit_cli, "verify", pt, "--json"]),
        Contender("aws s3 cp", "pt", lambda scratch: [*aws_cp, pt, f"{scratch}/model.pt"]),
        Contender("boto3 get_object (one GET)", "pt",
                  lambda _: [sys.executable, "-c", GET_ONCE, endpoint, BUCKET, PT_KEY]),
        # 1: the resume check may find a disagreement it cannot explain; the reads are the same.
        Contender("ckptkit inspect --json", "pt", lambda _: [*ckptkit_cli, "inspect", pt, "--json"],
                  ok_codes=(0, 1)),
    ]


def measure(tools: list[Contender], latency_ms: float, rounds: int, meter: Meter,
            env: dict[str, str]) -> None:
    for round_ in range(rounds):
        for tool in tools if round_ % 2 == 0 else tools[::-1]:
            scratch = fresh_dir("scratch", SCRATCH)
            meter.start()
            run = run_tool(tool.argv(str(scratch)), env, ok_codes=tool.ok_codes)
            traffic = meter.take()
            if tool.name.startswith("ckptkit verify") and not json.loads(run.stdout).get("ok", False):
                raise RuntimeError(f"{tool.name} found problems: {run.stdout[-2000:]}")
            row = tool.row(latency_ms)
            row.times.append(run.seconds)
            for key, value in (("cpu_s", run.cpu_seconds), ("peak_rss_mb", run.peak_rss / MB),
                               ("bytes_read", traffic.bytes_out)):
                row.extra.setdefault(key, []).append(value)
            row.extra["requests"] = traffic.requests
            shutil.rmtree(scratch)


# --- the benchmark ---------------------------------------------------------------------------------


def run(gb: float = 1.0, rounds: int = 3, latencies_ms: tuple[float, ...] = (0.0, 20.0),
        quick: bool = False) -> Result:
    result = Result("reading from S3")
    result.data["loadavg_start"] = loadavg()
    aws = aws_cli()
    moto = MotoChild()
    proxy = start_proxy(moto.url)
    skipped: list[float] = []
    try:
        client = s3_client(moto.url)
        client.create_bucket(Bucket=BUCKET)
        save_checkpoint(moto.url, gb * GB)  # setup goes straight to moto, untimed
        upload_torch_file(client, PT_QUICK if quick else PT_FULL)
        sizes = {"checkpoint": sum(object_sizes(client, BUCKET, CHECKPOINT + "/").values()),
                 "pt": sum(object_sizes(client, BUCKET, PT_KEY).values())}
        tools = contenders(aws, proxy.url)
        env, meter = client_env(proxy.url), Meter(moto, proxy)
        probe = {"direct to moto": request_ms(moto.url, BUCKET)}
        for latency_ms in latencies_ms:
            if set_latency(proxy, latency_ms / 1000):
                probe[f"through the proxy at {latency_ms:g} ms"] = request_ms(proxy.url, BUCKET)
                measure(tools, latency_ms, rounds, meter, env)
            else:
                skipped.append(latency_ms)
    finally:
        proxy.stop()
        moto.stop()
        shutil.rmtree(SCRATCH, ignore_errors=True)
    report(result, tools, sizes, rounds, latencies_ms, skipped)
    result.tables.append(probe_line(probe))
    result.data.update(small_get_ms=probe, loadavg_end=loadavg())
    return result


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def report(result: Result, tools: list[Contender], sizes: dict[str, int], rounds: int,
           latencies_ms: tuple[float, ...], skipped: list[float]) -> None:
    by_name = {t.name: t for t in tools}
    for latency_ms in latencies_ms:
        if latency_ms in skipped:
            result.tables.append(f"{latency_ms:g} ms injected latency: skipped, the proxy "
                                 "(tests/faulty_proxy.py) has no set_latency()")
            continue
        at = f"**{latency_ms:g} ms** injected per request"
        aws_ck = by_name["aws s3 cp --recursive"].row(latency_ms).median
        download = min(by_name[n].row(latency_ms).median for n in ("aws s3 cp", "boto3 get_object (one GET)"))
        for group, title, reference, unit in (
            ("checkpoint", f"(a) A committed checkpoint of {sizes['checkpoint'] / GB:.2f} GB on S3, {at}",
             aws_ck, "× aws throughput"),
            ("pt", f"(b, c) A {sizes['pt'] / 1e6:.0f} MB torch.save file on S3, no manifest, {at}",
             download, "× fastest download's time"),
        ):
            size = sizes[group]
            rows = []
            for tool in (t for t in tools if t.group == group):
                r = tool.row(latency_ms)
                ratio = reference / r.median if group == "checkpoint" else r.median / reference
                rows.append([r.name, r.median, size / MB / r.median, ratio, _median(r.extra["cpu_s"]),
                             max(r.extra["peak_rss_mb"]), int(_median(r.extra["bytes_read"])),
                             _median(r.extra["bytes_read"]) / size,
                             ", ".join(f"{k} {v}" for k, v in sorted(r.extra["requests"].items())),
                             " ".join(f"{t:.2f}" for t in r.times)])
            result.tables.append(
                f"{title}; CLI subprocesses, median of {rounds} interleaved rounds; bytes read and "
                "requests counted at the server:\n\n"
                + table(["contender", "median s", "MB/s", unit, "CPU s", "peak RSS MB", "bytes read",
                         "bytes read ÷ size", "requests (last run)", "all runs s"], rows))
        ms = f" at {latency_ms:g} ms"
        result.target(f"(a) ckptkit verify s3:// throughput ÷ aws s3 cp --recursive's{ms}",
                      aws_ck / by_name["ckptkit verify (digests)"].row(latency_ms).median, 0.8, at_most=False)
        result.target(f"(b) structural verify of the remote .pt ÷ one download's time{ms}",
                      by_name["ckptkit verify (structural)"].row(latency_ms).median / download, 1.5)
        inspect_bytes = _median(by_name["ckptkit inspect --json"].row(latency_ms).extra["bytes_read"])
        result.target(f"(c) inspect of the remote .pt: bytes read ÷ file size{ms}",
                      inspect_bytes / sizes["pt"], 0.01)
    result.data.update(sizes=sizes, rounds=rounds, latencies_ms=list(latencies_ms),
                       skipped_latencies_ms=skipped, rows=[{"latency_ms": lat, "group": t.group, **r.__dict__}
                             for t in tools for lat, r in t.rows.items()])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gb", type=float, default=1.0, help="size of the committed checkpoint")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--latency-ms", default="0,20", help="comma-separated injected latencies")
    parser.add_argument("--quick", action="store_true", help="smoke test: 0.1 GB, an 8 MB .pt, 1 round")
    args = parser.parse_args()
    latencies = tuple(float(x) for x in args.latency_ms.split(","))
    if args.quick:
        args.gb, args.rounds = 0.1, 1
    main_for(run, gb=args.gb, rounds=args.rounds, latencies_ms=latencies, quick=args.quick)


if __name__ == "__main__":
    main()
