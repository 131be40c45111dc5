"""Verify throughput: ``verify_checkpoint`` against ``cat`` and ``sha256sum`` of the same files.

The checkpoint is the ≈1.27 GB model + AdamW state saved by ``ckptkit.save``. Every contender
reads exactly the files the manifest lists. Cold: the page cache is dropped before every run
(``sync; echo 3 > /proc/sys/vm/drop_caches``, needs root), the realistic case before a resume.
Warm: the files are in page cache, so the run is bound by hashing, not the disk.

    .venv/bin/python benchmarks/bench_verify.py [--rounds N]
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from _common import GB, WORK, Result, Row, drop_caches, fresh_dir, loadavg, main_for, table, timed
from _model import training_state

import ckptkit
from ckptkit.storage import open_store


def make_checkpoint() -> Path:
    path = fresh_dir("verify") / "step-00000001"
    ckptkit.save(training_state(), path, step=1)
    return path


def listed_files(checkpoint: Path) -> list[Path]:
    manifest = ckptkit.read_manifest(open_store(checkpoint))
    return [checkpoint / entry.path for entry in manifest.files]


def contenders(checkpoint: Path, files: list[Path]) -> dict[str, Callable[[], object]]:
    names = [str(f) for f in files]

    def verify(jobs: int | None) -> Callable[[], object]:
        def run() -> None:
            report = ckptkit.verify_checkpoint(open_store(checkpoint), jobs=jobs)
            if not report.ok:
                raise RuntimeError(f"verify failed: {report.findings}")
        return run

    return {
        "cat > /dev/null": lambda: subprocess.run(
            ["sh", "-c", 'cat "$@" > /dev/null', "sh", *names], check=True),
        "sha256sum": lambda: subprocess.run(["sha256sum", *names], check=True, capture_output=True),
        "ckptkit verify_checkpoint": verify(None),
        "ckptkit verify_checkpoint (jobs=1)": verify(1),
    }


def measure(runs: dict[str, Callable[[], object]], rounds: int, cold: bool) -> list[Row]:
    rows = {name: Row(name) for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            if cold and not drop_caches():
                raise SystemExit("cold-cache runs need root (echo 3 > /proc/sys/vm/drop_caches)")
            rows[name].times.append(timed(fn)[0])
    return list(rows.values())


def sha256_memory_speed(size: int = 256 << 20, rounds: int = 5) -> float:
    """GB/s of one thread hashing bytes already in memory: the CPU ceiling per core."""
    data = bytes(size)
    times = sorted(timed(lambda: hashlib.sha256(data).digest())[0] for _ in range(rounds))
    return size / GB / times[rounds // 2]


def render(rows: list[Row], nbytes: int, title: str) -> str:
    cat = next(r for r in rows if r.name.startswith("cat")).median
    return f"{title}:\n\n" + table(
        ["contender", "median s", "GB/s", "× cat throughput", "all runs s"],
        [[r.name, r.median, nbytes / GB / r.median, cat / r.median, " ".join(f"{t:.2f}" for t in r.times)]
         for r in rows],
    )


def run(rounds: int = 3) -> Result:
    result = Result("verify")
    result.data["loadavg_start"] = loadavg()
    checkpoint = make_checkpoint()
    files = listed_files(checkpoint)
    nbytes = sum(f.stat().st_size for f in files)
    runs = contenders(checkpoint, files)
    result.data.update(files=len(files), bytes=nbytes, rounds=rounds)

    cold = measure(runs, rounds, cold=True)
    for path in files:  # warm the cache once
        path.read_bytes()
    warm = measure(runs, rounds + 2, cold=False)
    speed = sha256_memory_speed()
    result.tables.append(render(cold, nbytes, f"Cold cache ({len(files)} files, {nbytes / GB:.2f} GB), "
                                              f"median of {rounds}"))
    result.tables.append(render(warm, nbytes, f"Warm cache, median of {rounds + 2}"))
    result.tables.append(f"SHA-256 of bytes in memory, one thread: {speed:.2f} GB/s")
    # The target is for a cold cache, the realistic case (verifying before a resume); warm, cat
    # is a memcpy at several GB/s that no hash keeps up with, so that ratio is reported only.
    ck = next(r for r in cold if r.name == "ckptkit verify_checkpoint").median
    result.target("verify throughput / cat throughput (cold cache)", cold[0].median / ck, 0.8, at_most=False)
    result.data.update(cold=[r.__dict__ for r in cold], warm=[r.__dict__ for r in warm],
                       sha256_gbps_one_thread=speed, loadavg_end=loadavg())
    shutil.rmtree(WORK / "verify", ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    main_for(run, rounds=parser.parse_args().rounds)


if __name__ == "__main__":
    main()
