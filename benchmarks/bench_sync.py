"""``ckptkit sync`` of a ~1 GB checkpoint to and from S3 vs ``aws s3 sync``: same run, same server,
same endpoint, at 0 ms and at 20 ms of injected latency per request.

The checkpoint is written once with ``ckptkit.save`` (``--files`` tensors of ~100 MB, one
safetensors shard each, plus the manifest and tree). S3 is moto in a child process behind the
tests' fault proxy (faults off, ``set_latency``), see ``_s3.py``; the moto child counts requests
and body bytes in both directions, so "an unchanged re-sync sends nothing" is measured at the
server, not trusted from the client.

Each round, for each latency, runs both tools as CLI subprocesses, alternating which goes first:

* up: local disk → a fresh prefix, then the same command again with nothing changed;
* down: one prefix (uploaded once by ckptkit, untimed) → a fresh local directory, then again.

Downloads go to tmpfs (``--down-dir``, default /dev/shm) so that the disk's write speed and
ckptkit's fsyncs (its commit protocol; aws does not fsync) do not hide the transfer itself.
CPU seconds are each subprocess's own (``RUSAGE_CHILDREN``), peak RSS its process tree's. After
each run the uploaded objects or downloaded files are deleted (untimed).

    .venv/bin/python benchmarks/bench_sync.py [--gb 1.0] [--files 10] [--rounds 3] [--jobs N]
                                              [--latency-ms 0,20] [--down-dir /dev/shm] [--quick]

``--quick`` (0.1 GB in 4 files, one round) is the smoke test: under a minute once awscli is
installed. A full run (1 GB, 3 rounds, 2 latencies: 24 transfers of 1 GB, 24 re-syncs) takes
about 6-8 minutes here.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import GB, WORK, Result, Row, dir_size, fresh_dir, loadavg, main_for, table
from _procs import ToolRun, run_tool
from _s3 import (
    Meter,
    MotoChild,
    aws_cli,
    client_env,
    empty_prefix,
    object_sizes,
    probe_line,
    request_ms,
    s3_client,
    set_latency,
    start_proxy,
)

import ckptkit
from ckptkit.commit import step_dir_name
from ckptkit.manifest import MANIFEST_NAME

BUCKET = "bench-sync"
SOURCE = "down-src"  # the prefix every download reads
MB = 1 << 20
PHASES = ("up", "up, unchanged re-sync", "down", "down, unchanged re-sync")


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


def data_sizes(sizes: dict[str, int]) -> list[int]:
    """Sizes without the manifest, whose bytes differ by design between stores (on an object store
    ckptkit keeps the data under an attempt prefix that its manifest names)."""
    return sorted(size for key, size in sizes.items() if not key.endswith(MANIFEST_NAME))


def local_sizes(path: Path) -> dict[str, int]:
    return {str(p): p.stat().st_size for p in path.rglob("*") if p.is_file()}


# --- contenders ------------------------------------------------------------------------------------


@dataclass
class Contender:
    name: str
    up: Callable[[str, str], list[str]]  # (local root, s3 URL) -> argv
    down: Callable[[str, str], list[str]]  # (s3 URL, local dir) -> argv
    check: Callable[[str], None] = lambda stdout: None  # raises if the output reports a failure
    rows: dict[tuple[float, str], Row] = field(default_factory=dict)

    def row(self, latency: float, phase: str) -> Row:
        key = (latency, phase)
        if key not in self.rows:
            self.rows[key] = Row(f"{self.name}, {phase}")
        return self.rows[key]


def check_ckptkit_report(stdout: str) -> None:
    report = json.loads(stdout)
    states = {c["status"] for c in report["checkpoints"]}
    if not report["ok"] or not states <= {"committed", "up-to-date"}:
        raise RuntimeError(f"ckptkit sync did not commit: {stdout[-2000:]}")


def contenders(aws: Path, endpoint: str, jobs: int | None) -> list[Contender]:
    job_args = ["--jobs", str(jobs)] if jobs else []
    ckptkit_cmd = [sys.executable, "-m", "ckptkit", "sync", "--json", *job_args]
    aws_cmd = [str(aws), "s3", "sync", "--endpoint-url", endpoint, "--only-show-errors"]
    # The same command line both ways: sync SRC DST.
    return [
        Contender("ckptkit sync", lambda src, dst: [*ckptkit_cmd, src, dst],
                  lambda src, dst: [*ckptkit_cmd, src, dst], check_ckptkit_report),
        Contender("aws s3 sync", lambda src, dst: [*aws_cmd, src, dst],
                  lambda src, dst: [*aws_cmd, src, dst]),
    ]


def record(row: Row, run: ToolRun, meter: Meter) -> None:
    traffic = meter.take()
    row.times.append(run.seconds)
    for key, value in (("cpu_s", run.cpu_seconds), ("peak_rss_mb", run.peak_rss / MB),
                       ("bytes_up", traffic.bytes_in), ("bytes_down", traffic.bytes_out)):
        row.extra.setdefault(key, []).append(value)
    row.extra["requests"] = traffic.requests


# --- the benchmark ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    gb: float = 1.0
    files: int = 10
    rounds: int = 3
    jobs: int | None = None
    latencies_ms: tuple[float, ...] = (0.0, 20.0)
    down_dir: Path = Path("/dev/shm") if Path("/dev/shm").is_dir() else WORK


def run(**kwargs: Any) -> Result:
    s = Settings(**kwargs)
    result = Result("sync to and from S3")
    result.data["loadavg_start"] = loadavg()
    aws = aws_cli()
    root = fresh_dir("sync")
    checkpoint = make_checkpoint(root, s.gb * GB, s.files)
    local = data_sizes(local_sizes(checkpoint))
    nbytes, nfiles = dir_size(checkpoint), sum(1 for p in checkpoint.rglob("*") if p.is_file())
    down_root = s.down_dir / "ckptkit-bench-sync"
    moto = MotoChild()
    proxy = start_proxy(moto.url)
    skipped: list[float] = []
    try:
        client = s3_client(moto.url)
        client.create_bucket(Bucket=BUCKET)
        # The download source, uploaded once, straight to moto: the same objects for both tools.
        run_tool([sys.executable, "-m", "ckptkit", "sync", "--json", str(root), f"s3://{BUCKET}/{SOURCE}"],
                 client_env(moto.url))
        source = data_sizes(object_sizes(client, BUCKET, SOURCE + "/"))
        env, meter = client_env(proxy.url), Meter(moto, proxy)
        tools = contenders(aws, proxy.url, s.jobs)
        probe = {"direct to moto": request_ms(moto.url, BUCKET)}
        for latency_ms in s.latencies_ms:
            if not set_latency(proxy, latency_ms / 1000):
                skipped.append(latency_ms)
                continue
            probe[f"through the proxy at {latency_ms:g} ms"] = request_ms(proxy.url, BUCKET)
            for round_ in range(s.rounds):
                order = tools if round_ % 2 == 0 else tools[::-1]
                for tool in order:
                    prefix = f"{tool.name.split()[0]}-{latency_ms:g}ms-{round_}"
                    for phase in PHASES[:2]:
                        meter.start()
                        run = run_tool(tool.up(str(root), f"s3://{BUCKET}/{prefix}"), env)
                        tool.check(run.stdout)
                        record(tool.row(latency_ms, phase), run, meter)
                    got = data_sizes(object_sizes(client, BUCKET, f"{prefix}/{step_dir_name(1)}/"))
                    if got != local:
                        raise RuntimeError(f"{tool.name} up: {got} at {prefix}, expected {local}")
                    empty_prefix(client, BUCKET, prefix + "/")
                for tool in order:
                    dst = fresh_dir(tool.name.split()[0], down_root)
                    for phase in PHASES[2:]:
                        meter.start()
                        run = run_tool(tool.down(f"s3://{BUCKET}/{SOURCE}", str(dst)), env)
                        tool.check(run.stdout)
                        record(tool.row(latency_ms, phase), run, meter)
                    got = data_sizes(local_sizes(dst))
                    if got != source:
                        raise RuntimeError(f"{tool.name} down: {got} in {dst}, expected {source}")
                    shutil.rmtree(dst)
    finally:
        proxy.stop()
        moto.stop()
        shutil.rmtree(down_root, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
    report(result, tools, nbytes, nfiles, s, skipped)
    result.tables.append(probe_line(probe))
    result.data.update(small_get_ms=probe, loadavg_end=loadavg())
    return result


def report(result: Result, tools: list[Contender], nbytes: int, nfiles: int, s: Settings,
           skipped: list[float]) -> None:
    ours, aws = tools
    for latency_ms in s.latencies_ms:
        if latency_ms in skipped:
            result.tables.append(f"{latency_ms:g} ms injected latency: skipped, the proxy "
                                 "(tests/faulty_proxy.py) has no set_latency()")
            continue
        rows = []
        for phase in PHASES:
            reference = aws.row(latency_ms, phase.split(",")[0]).median  # × aws's first sync
            for tool in tools:
                r = tool.row(latency_ms, phase)
                rows.append([r.name, r.median, nbytes / MB / r.median if "re-sync" not in phase else "",
                             reference / r.median if "re-sync" not in phase else "",
                             _median(r.extra["cpu_s"]), max(r.extra["peak_rss_mb"]),
                             int(_median(r.extra["bytes_up"])), int(_median(r.extra["bytes_down"])),
                             ", ".join(f"{k} {v}" for k, v in sorted(r.extra["requests"].items())),
                             " ".join(f"{t:.2f}" for t in r.times)])
        result.tables.append(
            f"{nbytes / GB:.2f} GB in {nfiles} files, local disk ↔ S3 (moto in a child process behind "
            f"the proxy, **{latency_ms:g} ms** injected per request; downloads into {s.down_dir}), CLI "
            f"subprocesses, median of {s.rounds} interleaved rounds; bytes counted at the server:\n\n"
            + table(["command", "median s", "MB/s", "× aws throughput", "CPU s", "peak RSS MB",
                     "bytes up", "bytes down", "requests (last run)", "all runs s"], rows))
        at = f" at {latency_ms:g} ms"
        for direction in ("up", "down"):
            ratio = aws.row(latency_ms, direction).median / ours.row(latency_ms, direction).median
            result.target(f"ckptkit sync {direction} throughput ÷ aws s3 sync's{at}", ratio, 1.2,
                          at_most=False)
        again = ours.row(latency_ms, "up, unchanged re-sync")
        result.target(f"unchanged re-sync up: request body bytes{at}", float(max(again.extra["bytes_up"])),
                      0.0)
        result.target(f"unchanged re-sync up: time ÷ first sync's{at}",
                      again.median / ours.row(latency_ms, "up").median, 0.10)
    result.data.update(bytes=nbytes, files=nfiles, settings={**s.__dict__, "down_dir": str(s.down_dir)},
                       skipped_latencies_ms=skipped,
                       rows=[{"latency_ms": lat, **r.__dict__}
                             for t in tools for (lat, _), r in t.rows.items()])


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gb", type=float, default=1.0)
    parser.add_argument("--files", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=None, help="ckptkit sync --jobs (default: its own)")
    parser.add_argument("--latency-ms", default="0,20", help="comma-separated injected latencies")
    parser.add_argument("--down-dir", type=Path, default=Settings.down_dir)
    parser.add_argument("--quick", action="store_true", help="smoke test: 0.1 GB, 4 files, 1 round")
    args = parser.parse_args()
    latencies = tuple(float(x) for x in args.latency_ms.split(","))
    if args.quick:
        args.gb, args.files, args.rounds = 0.1, 4, 1
    main_for(run, gb=args.gb, files=args.files, rounds=args.rounds, jobs=args.jobs,
             latencies_ms=latencies, down_dir=args.down_dir)


if __name__ == "__main__":
    main()
