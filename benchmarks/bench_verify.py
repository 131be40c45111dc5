"""Verify throughput: ``verify_checkpoint`` against ``cat`` of the same files, cold and warm cache.

The checkpoint is the ≈1.27 GB model + AdamW state saved by ``ckptkit.save`` twice: with the
default digest (BLAKE3 since issue 13; the table names what the manifest says) and with
``digest="sha256"`` (skipped, with a note, where ``save`` has no such option), so that SHA-256
checkpoints are shown to still verify, and at what speed. ``verify_checkpoint`` runs in process
with its default ``jobs`` and with ``jobs=1`` and ``jobs=2``; every run must report the
checkpoint intact. ``cat`` reads exactly the files the default checkpoint's manifest lists.

Cold: the page cache is dropped before every run (``sync; echo 3 > /proc/sys/vm/drop_caches``,
needs root), the realistic case before a resume. Warm: the files are in page cache, so a run is
bound by hashing, not the disk. Targets (issue 13): ≥ 0.9× cat's throughput cold, ≥ 0.4× warm.
``CKPTKIT_DIGEST`` is removed from the environment first, so "default" is the library's default.

    .venv/bin/python benchmarks/bench_verify.py [--rounds N (3)] [--sha256sum] [--quick]

``--sha256sum`` adds coreutils' ``sha256sum`` as a contender (~8 s a run here). ``--quick`` (a
0.32 GB state, one round) is the smoke test, under a minute. The full run (two 1.27 GB saves,
3 cold + 5 warm rounds of 5 contenders) takes about 2-3 minutes here.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from _common import GB, WORK, Result, Row, drop_caches, fresh_dir, loadavg, main_for, table, timed
from _model import Config, training_state

import ckptkit
from ckptkit.storage import open_store

QUICK_MODEL = Config(vocab=8000, width=512, layers=6, heads=8, ffn=2048)  # ~27M parameters, 0.32 GB
CAT = "cat > /dev/null"
DEFAULT = "ckptkit verify_checkpoint (default digest, default jobs)"
HAS_DIGEST_OPTION = "digest" in inspect.signature(ckptkit.save).parameters


def make_checkpoints(model: Config | None) -> dict[str, Path]:
    """``{"default": path, "sha256": path}``, both saves of one state."""
    state = training_state(model)
    digests = {"default": {}, **({"sha256": {"digest": "sha256"}} if HAS_DIGEST_OPTION else {})}
    paths = {}
    for name, options in digests.items():
        paths[name] = fresh_dir(f"verify/{name}") / "step-00000001"
        ckptkit.save(state, paths[name], step=1, **options)
    return paths


def listed_files(checkpoint: Path) -> tuple[list[Path], str]:
    """The files the manifest lists, and the digest algorithm it names for them."""
    manifest = ckptkit.read_manifest(open_store(checkpoint))
    return [checkpoint / entry.path for entry in manifest.files], manifest.files[0].digest.partition(":")[0]


def contenders(checkpoints: dict[str, Path], files: list[Path],
               sha256sum: bool) -> dict[str, Callable[[], object]]:
    names = [str(f) for f in files]

    def verify(checkpoint: Path, jobs: int | None) -> Callable[[], object]:
        def run() -> None:
            report = ckptkit.verify_checkpoint(open_store(checkpoint), jobs=jobs)
            if not report.ok:
                raise RuntimeError(f"verify failed: {report.findings}")
        return run

    runs: dict[str, Callable[[], object]] = {
        CAT: lambda: subprocess.run(["sh", "-c", 'cat "$@" > /dev/null', "sh", *names], check=True),
        DEFAULT: verify(checkpoints["default"], None),
        "ckptkit verify_checkpoint (default digest, jobs=1)": verify(checkpoints["default"], 1),
        "ckptkit verify_checkpoint (default digest, jobs=2)": verify(checkpoints["default"], 2),
    }
    if "sha256" in checkpoints:
        runs["ckptkit verify_checkpoint (digest=sha256, default jobs)"] = verify(checkpoints["sha256"], None)
    if sha256sum:
        runs["sha256sum"] = lambda: subprocess.run(["sha256sum", *names], check=True, capture_output=True)
    return runs


def measure(runs: dict[str, Callable[[], object]], rounds: int, cold: bool) -> list[Row]:
    rows = {name: Row(name) for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            if cold and not drop_caches():
                raise SystemExit("cold-cache runs need root (echo 3 > /proc/sys/vm/drop_caches)")
            rows[name].times.append(timed(fn)[0])
    return list(rows.values())


def hash_speeds(size: int = 256 << 20, rounds: int = 5) -> dict[str, float]:
    """GB/s of hashing bytes already in memory: the CPU ceiling, per algorithm and threads."""
    data = bytes(size)
    hashers: dict[str, Callable[[], object]] = {
        "SHA-256, one thread": lambda: hashlib.sha256(data).digest()}
    try:
        import blake3
    except ImportError:
        pass
    else:
        hashers["BLAKE3, one thread"] = lambda: blake3.blake3(data).digest()
        hashers["BLAKE3, all threads"] = lambda: blake3.blake3(
            data, max_threads=blake3.blake3.AUTO).digest()
    speeds = {}
    for name, fn in hashers.items():
        times = sorted(timed(fn)[0] for _ in range(rounds))
        speeds[name] = size / GB / times[rounds // 2]
    return speeds


def render(rows: list[Row], sizes: dict[str, int], algorithms: dict[str, str], title: str) -> str:
    cat = next(r for r in rows if r.name == CAT)
    cat_rate = sizes["default"] / cat.median

    def checkpoint_of(row: Row) -> str:
        return "sha256" if "digest=sha256" in row.name else "default"

    return f"{title}:\n\n" + table(
        ["contender", "digest", "median s", "GB/s", "× cat throughput", "all runs s"],
        [[r.name, "" if r.name in (CAT, "sha256sum") else algorithms[checkpoint_of(r)], r.median,
          sizes[checkpoint_of(r)] / GB / r.median, sizes[checkpoint_of(r)] / r.median / cat_rate,
          " ".join(f"{t:.2f}" for t in r.times)] for r in rows],
    )


def throughput_ratio(rows: list[Row]) -> float:
    by_name = {r.name: r.median for r in rows}
    return by_name[CAT] / by_name[DEFAULT]  # the same files, so the time ratio is the rate ratio


def run(rounds: int = 3, sha256sum: bool = False, quick: bool = False) -> Result:
    os.environ.pop("CKPTKIT_DIGEST", None)  # a site policy would make "default" something else
    result = Result("verify")
    result.data["loadavg_start"] = loadavg()
    checkpoints = make_checkpoints(QUICK_MODEL if quick else None)
    listed = {name: listed_files(path) for name, path in checkpoints.items()}
    algorithms = {name: algorithm for name, (_, algorithm) in listed.items()}
    sizes = {name: sum(f.stat().st_size for f in files) for name, (files, _) in listed.items()}
    files = listed["default"][0]
    runs = contenders(checkpoints, files, sha256sum)
    result.data.update(files=len(files), bytes=sizes, digests=algorithms, rounds=rounds)

    runs[DEFAULT]()  # untimed: the first call in this process imports and starts thread pools
    cold = measure(runs, rounds, cold=True)
    for _, (paths, _) in listed.items():  # warm the cache once
        for path in paths:
            path.read_bytes()
    warm = measure(runs, rounds + 2, cold=False)
    speeds = hash_speeds()
    what = f"{len(files)} files, {sizes['default'] / GB:.2f} GB"
    if not HAS_DIGEST_OPTION:
        result.tables.append("SHA-256 checkpoint: skipped, ckptkit.save has no digest option")
    result.tables.append(render(cold, sizes, algorithms, f"Cold cache ({what}), median of {rounds}"))
    result.tables.append(render(warm, sizes, algorithms, f"Warm cache, median of {rounds + 2}"))
    result.tables.append("Hashing bytes in memory: "
                         + "; ".join(f"{k} {v:.2f} GB/s" for k, v in speeds.items()))
    result.target("verify throughput ÷ cat's (cold cache)", throughput_ratio(cold), 0.9, at_most=False)
    result.target("verify throughput ÷ cat's (warm cache)", throughput_ratio(warm), 0.4, at_most=False)
    result.data.update(cold=[r.__dict__ for r in cold], warm=[r.__dict__ for r in warm],
                       hash_gbps=speeds, loadavg_end=loadavg())
    shutil.rmtree(WORK / "verify", ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sha256sum", action="store_true", help="also time coreutils sha256sum")
    parser.add_argument("--quick", action="store_true", help="smoke test: a 0.32 GB state, 1 round")
    args = parser.parse_args()
    main_for(run, rounds=1 if args.quick else args.rounds, sha256sum=args.sha256sum, quick=args.quick)


if __name__ == "__main__":
    main()
