"""Run every benchmark, print a Markdown table per benchmark and a summary of every target (met or
not, with the numbers), write ``benchmarks/out/results.json`` (with the machine facts).

    .venv/bin/python benchmarks/run_all.py [--only startup,ls,save,verify,inspect,consolidate,convert,
                                                   sync,remote,mirror,reshard,stall,dcp,dedup] [--quick]
    (or: make bench)

The full run keeps every benchmark's full size but fewer rounds where a benchmark is long
(``FULL`` below), to stay within ~25 minutes on the 2-core machine of docs/performance.md.
Estimated time of each, from earlier runs and the quick runs scaled to full size (the
printed ``benchmark_seconds`` of each replaces these):

- sync (~5 min): 1 GB up and down, both tools, at 0 and 20 ms, 3 rounds, plus re-syncs;
- remote (~3 min; ~15 min while a structural verify still takes ~100 s): a 1 GB
  checkpoint and a 0.3 GB .pt, 5 contenders at 0 and 20 ms, 3 rounds, plus ~1 min of setup;
- save (~3.5 min): 1.27 GB, 5 contenders on disk and in tmpfs, 3 + 1 warm-up rounds, 5 RSS
  children, 3 load rounds;
- consolidate (~3 min, most of it making the DeepSpeed checkpoints on first use);
- reshard (~2 min, 3 rounds; it reuses consolidate's DeepSpeed checkpoints, made on first use);
- stall (~15 min): a 1.27 GB training loop of 12 steps (~2.7 s each) per contender (9, each in its own
  process), 2 rounds (~7.5 min a round; its own default of 3 rounds takes ~23 min);
- dcp (~40 s): dcp.save of 419 MB, CkptkitWriter and FileSystemWriter, 3 rounds;
- dedup (~6 min): a LoRA-like run over a frozen 100M-parameter base, 10 checkpoints, with and without
  dedup, 3 rounds (torch.save in 1), their S3 mirror once (~1.7 min), and a 34M-parameter full
  fine-tune;
- verify (~2 min), ls (~1.5 min), inspect (~1.5 min), mirror (~1 min), convert (~1 min),
  startup (~10 s).

``--quick`` runs each benchmark in its smoke-test size (seconds to a minute each): the tables
then show that everything runs, and the targets, which are for the full sizes, mean nothing.
A benchmark that fails is reported as such and the others still run.
"""

from __future__ import annotations

import argparse
import time
import traceback
from collections.abc import Callable
from typing import Any

import bench_consolidate
import bench_convert
import bench_dcp
import bench_dedup
import bench_inspect
import bench_ls_s3
import bench_mirror
import bench_remote
import bench_reshard
import bench_save_load
import bench_stall
import bench_startup
import bench_sync
import bench_verify
from _common import OUT, Result, loadavg, machine, table, write_json

BENCHMARKS: dict[str, Callable[..., Result]] = {
    "startup": bench_startup.run,
    "ls": bench_ls_s3.run,
    "save": bench_save_load.run,
    "verify": bench_verify.run,
    "inspect": bench_inspect.run,
    "consolidate": bench_consolidate.run,
    "convert": bench_convert.run,
    "sync": bench_sync.run,
    "remote": bench_remote.run,
    "mirror": bench_mirror.run,
    "reshard": bench_reshard.run,
    "stall": bench_stall.run,
    "dcp": bench_dcp.run,
    "dedup": bench_dedup.run,
}
# Settings of the full run where they differ from a benchmark's own defaults: fewer rounds, same sizes.
FULL: dict[str, dict[str, Any]] = {
    "save": {"rounds": 3, "load_rounds": 3},
    "stall": {"rounds": 2},
}
QUICK: dict[str, dict[str, Any]] = {
    "startup": {"rounds": 2},
    "ls": {"checkpoints": 50, "rounds": 1},
    "save": {"rounds": 1, "load_rounds": 1, "rss": False, "quick": True},
    "verify": {"rounds": 1, "quick": True},
    "inspect": {"rounds": 1},
    "consolidate": {"rounds": 1},
    "convert": {"rounds": 1},
    "sync": {"gb": 0.1, "files": 4, "rounds": 1},
    "remote": {"gb": 0.1, "rounds": 1, "quick": True},
    "mirror": {"rounds": 1, "steps": 20},
    "reshard": {"rounds": 1},
    "stall": {"rounds": 1, "quick": True},
    "dcp": {"rounds": 1, "quick": True},
    "dedup": {"quick": True},
}


def summary(results: dict[str, dict[str, Any]]) -> str:
    rows = [[name, t["what"], f"{t['value']:.3g}", ("≤ " if t["at_most"] else "≥ ") + f"{t['limit']:g}",
             "met" if t["met"] else "**NOT met**"]
            for name, r in results.items() for t in r.get("targets", [])]
    failed = [f"- {name}: **failed**: {r['error']}" for name, r in results.items() if "error" in r]
    timing = ", ".join(f"{name} {r['data']['benchmark_seconds']:.0f} s" for name, r in results.items()
                       if "data" in r)
    return "\n".join(["## targets", "", table(["benchmark", "target", "measured", "limit", "verdict"], rows),
                      "", *failed, f"time per benchmark: {timing}"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(BENCHMARKS),
                        help=f"comma-separated subset of {', '.join(BENCHMARKS)}")
    parser.add_argument("--quick", action="store_true", help="each benchmark in its smoke-test size")
    args = parser.parse_args()
    wanted = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(wanted) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}")

    facts = machine()
    print("# ckptkit benchmarks" + (" (quick: smoke-test sizes)" if args.quick else "") + "\n")
    print(table(["machine", ""], [[k, v] for k, v in facts.items()]) + "\n", flush=True)
    results: dict[str, dict[str, Any]] = {}
    started = time.perf_counter()
    for name in wanted:
        start = time.perf_counter()
        try:
            result = BENCHMARKS[name](**(QUICK if args.quick else FULL).get(name, {}))
        except Exception as exc:  # one broken benchmark must not cost the others' numbers
            traceback.print_exc()
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"## {name}\n\n**failed** after {time.perf_counter() - start:.0f} s: {exc}\n", flush=True)
            continue
        result.data["benchmark_seconds"] = round(time.perf_counter() - start, 1)
        print(result.render(), flush=True)
        results[name] = result.to_json()
    print(summary(results))
    print(f"\ntotal {time.perf_counter() - started:.0f} s; load average at the end: {loadavg()}")
    write_json(OUT / "results.json", {"machine": facts, "quick": args.quick, "results": results})
    print(f"wrote {OUT / 'results.json'}")


if __name__ == "__main__":
    main()
