"""Run every benchmark, print a Markdown table per benchmark, write ``benchmarks/out/results.json``.

    .venv/bin/python benchmarks/run_all.py [--only startup,ls,verify,save,consolidate,convert,sync,mirror]
    (or: make bench)

Each benchmark is also runnable alone (``benchmarks/bench_*.py``); see docs/performance.md.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import bench_consolidate
import bench_convert
import bench_ls_s3
import bench_mirror
import bench_save_load
import bench_startup
import bench_sync
import bench_verify
from _common import OUT, Result, machine, table, write_json

BENCHMARKS: dict[str, Callable[[], Result]] = {
    "startup": bench_startup.run,
    "ls": bench_ls_s3.run,
    "save": bench_save_load.run,
    "verify": bench_verify.run,
    "consolidate": bench_consolidate.run,
    "convert": bench_convert.run,
    "sync": bench_sync.run,
    "mirror": bench_mirror.run,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(BENCHMARKS),
                        help=f"comma-separated subset of {', '.join(BENCHMARKS)}")
    wanted = [name.strip() for name in parser.parse_args().only.split(",") if name.strip()]
    unknown = sorted(set(wanted) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}")

    facts = machine()
    print("# ckptkit benchmarks\n")
    print(table(["machine", ""], [[k, v] for k, v in facts.items()]) + "\n", flush=True)
    results = {}
    for name in wanted:
        start = time.perf_counter()
        result = BENCHMARKS[name]()
        result.data["benchmark_seconds"] = round(time.perf_counter() - start, 1)
        print(result.render(), flush=True)
        results[name] = result.to_json()
    targets = [[t["what"], f"{t['value']:.3g}", ("≤ " if t["at_most"] else "≥ ") + f"{t['limit']:g}",
                "met" if t["met"] else "NOT met"]
               for r in results.values() for t in r["targets"]]
    print("## targets\n\n" + table(["target", "measured", "limit", "verdict"], targets))
    write_json(OUT / "results.json", {"machine": facts, "results": results})
    print(f"\nwrote {OUT / 'results.json'}")


if __name__ == "__main__":
    main()
