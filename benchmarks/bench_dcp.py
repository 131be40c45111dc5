"""DCP save time: ``dcp.save`` through ckptkit's ``CkptkitWriter`` against DCP's own ``FileSystemWriter``.

The state is 104.9M fp32 parameters (25 tensors of 4.19M, 419 MB), saved on local disk by one
process (``no_dist=True``), each save into a fresh directory. Both writers fsync what they write:
``FileSystemWriter`` with its defaults (``sync_files=True``, one file per rank), ckptkit's with
its commit (files and directory fsynced, manifest with every file's digest, hashed while
written, renamed into place). One untimed warm-up round, then interleaved rounds; medians of
``--rounds`` (default 3).

    .venv/bin/python benchmarks/bench_dcp.py [--rounds N] [--quick]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import WORK, Result, Row, loadavg, main_for, table

TENSORS, NUMEL = 25, 4_194_304  # 25 x 16 MiB fp32 = 104.9M parameters, 419 MB


def make_state(quick: bool) -> dict[str, Any]:
    import torch

    gen = torch.Generator().manual_seed(0)
    count = 3 if quick else TENSORS
    return {f"layers.{i}.weight": torch.randn(NUMEL, generator=gen) for i in range(count)}


def writers() -> dict[str, Callable[[Path], Any]]:
    import torch.distributed.checkpoint as dcp

    from ckptkit.integrations.dcp import CkptkitWriter

    return {
        "CkptkitWriter": lambda path: CkptkitWriter(str(path)),
        "FileSystemWriter": lambda path: dcp.FileSystemWriter(str(path)),
    }


def save_once(state: dict[str, Any], make_writer: Callable[[Path], Any], path: Path) -> float:
    import torch.distributed.checkpoint as dcp

    shutil.rmtree(path, ignore_errors=True)
    start = time.perf_counter()
    dcp.save(state, storage_writer=make_writer(path), no_dist=True)
    seconds = time.perf_counter() - start
    shutil.rmtree(path, ignore_errors=True)
    return seconds


def run(rounds: int = 3, quick: bool = False) -> Result:
    result = Result("dcp")
    result.data["loadavg_start"] = loadavg()
    warnings.filterwarnings("ignore", category=UserWarning)  # DCP's "no process group": on purpose
    state = make_state(quick)
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    contenders = writers()
    stats = {name: Row(name) for name in contenders}
    work = WORK / "dcp"
    work.mkdir(parents=True, exist_ok=True)
    for make_writer in contenders.values():  # warm-up, untimed: imports, thread pools, page cache
        save_once(state, make_writer, work / "step-1")
    for _ in range(rounds):
        for name, make_writer in contenders.items():
            stats[name].times.append(save_once(state, make_writer, work / "step-1"))
    ours, theirs = stats["CkptkitWriter"], stats["FileSystemWriter"]
    ratio = ours.median / theirs.median
    result.data.update(time_ratio=ratio, ours=ours.__dict__, theirs=theirs.__dict__, bytes=nbytes)
    result.target("dcp.save time ratio (CkptkitWriter / FileSystemWriter)", ratio, 1.1)
    result.tables.append(
        f"dcp.save of {nbytes / 1e6:.0f} MB ({len(state)} fp32 tensors, "
        f"{nbytes / 4 / 1e6:.1f}M parameters), one process, local disk; {rounds} round(s), medians"
    )
    rows = [
        [row.name, row.median, f"{nbytes / row.median / 1e6:.0f} MB/s", min(row.times), max(row.times)]
        for row in stats.values()
    ]
    result.tables.append(table(["writer", "median s", "throughput", "min s", "max s"], rows))
    result.data["loadavg_end"] = loadavg()
    shutil.rmtree(work, ignore_errors=True)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    main_for(run, rounds=args.rounds, quick=args.quick)
