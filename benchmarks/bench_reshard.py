"""Resharding a ZeRO checkpoint 2 → 3 ranks: ``ckptkit reshard`` against DeepSpeed's ``ds_to_universal``.

The input is bench_consolidate's pair of genuine 2-rank checkpoints (ZeRO-2 and ZeRO-3, bf16,
≈51M parameters, tied embedding, a frozen param and a buffer), made once and shared with it.
Each contender is the command a user runs, in its own subprocess (``_procs.run_tool``): time is
the process wall time, imports included; peak RSS is the sum over the process tree, sampled, so
the worker processes ``ds_to_universal`` forks count:

* ckptkit: ``ckptkit reshard SAVE_DIR DST --world-size 3 --json``: DST is a committed DeepSpeed
  save dir for 3 ranks, certified parameter by parameter, that ``engine.load_checkpoint`` loads
  as is. Its own ``seconds`` (the library call, imports excluded) is reported too.
* DeepSpeed: ``python -m deepspeed.checkpoint.ds_to_universal --input_folder SAVE_DIR/TAG
  --output_folder OUT/TAG_universal --inject_missing_state`` with its default worker counts
  (ZeRO-2 saves of a plain engine need ``--inject_missing_state``; reference/resharding.md §1.4).
  Its output is not yet a 3-rank checkpoint: a ``load_universal`` load still has to cut it.

Peak RSS summed over a tree counts pages the forked workers share with their parent once per
process, so the largest single process's peak (GNU time's ``%M``: the process and its reaped
descendants, from ``wait4``) is reported beside it: no tree uses less than that, which makes
ckptkit's tree sum over DeepSpeed's largest process the conservative ratio.

Rounds are interleaved (ckptkit, DeepSpeed, ckptkit, ...); medians of time are reported, and the
largest peak RSS of any round.

    .venv/bin/python benchmarks/bench_reshard.py [--rounds N] [--regenerate]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_consolidate
from _common import WORK, Result, Row, dir_size, loadavg, main_for, table
from _procs import ToolRun, run_tool

TAG = "global_step1"
WORLD = 3
OURS, THEIRS = "ckptkit reshard", "DeepSpeed ds_to_universal"
MiB = 2**20
GNU_TIME = Path("/usr/bin/time")


def _ckptkit_cli() -> list[str]:
    """The ``ckptkit`` console script of this interpreter's environment, as a user runs it."""
    script = Path(sys.executable).parent / "ckptkit"
    return [str(script)] if script.exists() else [sys.executable, "-m", "ckptkit"]


def _ours(src: Path, out: Path) -> list[str]:
    return [*_ckptkit_cli(), "reshard", str(src), str(out / "dst"), "--world-size", str(WORLD), "--json"]


def _theirs(src: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(src / TAG),
            "--output_folder", str(out / f"{TAG}_universal"), "--inject_missing_state"]


def _check_ours(out: Path, stdout: str) -> float:
    """The library's own seconds; asserts DST holds a 3-rank tag (a silent no-op must not win)."""
    doc = json.loads(stdout)
    assert doc["ok"] and doc["world_size"] == WORLD, doc
    assert len(list((out / "dst" / TAG).glob("*optim_states.pt"))) == WORLD, doc
    return float(doc["seconds"])


def _check_theirs(out: Path, stdout: str) -> float | None:
    zero = out / f"{TAG}_universal" / "zero"
    assert (out / "latest_universal").read_text().strip() == f"{TAG}_universal"
    assert len(list(zero.glob("*/fp32.pt"))) >= 17, sorted(zero.iterdir())  # every parameter merged
    return None


def run(rounds: int = 3, regenerate: bool = False) -> Result:
    result = Result("reshard")
    result.data["loadavg_start"] = loadavg()
    src_root = bench_consolidate.ensure_checkpoints(regenerate)
    out = WORK / "reshard-out"
    contenders: dict[str, tuple[Callable[[Path, Path], list[str]], Callable[[Path, str], float | None]]] = {
        OURS: (_ours, _check_ours),
        THEIRS: (_theirs, _check_theirs),
    }
    rows = []
    for stage in (2, 3):
        src = src_root / f"zero{stage}"
        stats = {name: Row(name) for name in contenders}
        for _ in range(rounds):
            for name, (argv, check) in contenders.items():
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir(parents=True)
                tool, largest = _measured(argv(src, out))
                work = check(out, tool.stdout)
                row = stats[name]
                if largest is not None:
                    row.extra.setdefault("largest", []).append(largest)
                row.times.append(tool.seconds)
                row.extra.setdefault("cpu", []).append(tool.cpu_seconds)
                row.extra.setdefault("rss", []).append(tool.peak_rss)
                if work is not None:
                    row.extra.setdefault("work", []).append(work)
                row.extra["output_bytes"] = dir_size(out)
                shutil.rmtree(out, ignore_errors=True)
        ours, theirs = stats[OURS], stats[THEIRS]
        input_bytes = dir_size(src / TAG)
        for row in (ours, theirs):
            work = row.extra.get("work")
            rows.append([
                f"ZeRO-{stage}",
                row.name,
                row.median,
                statistics.median(work) if work else "n/a",
                statistics.median(row.extra["cpu"]),
                f"{max(row.extra['rss']) / MiB:.0f} MiB",
                f"{max(row.extra['largest']) / MiB:.0f} MiB" if "largest" in row.extra else "n/a",
                f"{row.extra['output_bytes'] / MiB:.0f} MiB",
            ])
        rss_ratio = max(ours.extra["rss"]) / max(theirs.extra["rss"])
        time_ratio = ours.median / theirs.median
        if "largest" in theirs.extra:
            result.data[f"zero{stage}_rss_ratio_vs_largest_process"] = (
                max(ours.extra["rss"]) / max(theirs.extra["largest"]))
        result.data[f"zero{stage}"] = {
            "input_bytes": input_bytes,
            "rss_ratio": rss_ratio,
            "time_ratio": time_ratio,
            "ours": ours.__dict__,
            "deepspeed": theirs.__dict__,
        }
        result.target(f"ZeRO-{stage} peak RSS ratio (ckptkit / ds_to_universal)", rss_ratio, 0.5)
        result.target(f"ZeRO-{stage} time ratio (ckptkit / ds_to_universal)", time_ratio, 0.7)
    sizes = ", ".join(f"ZeRO-{s} {result.data[f'zero{s}']['input_bytes'] / MiB:.0f} MiB" for s in (2, 3))
    result.tables.append(
        f"{bench_consolidate._param_count() / 1e6:.1f}M parameters, bf16, 2 → {WORLD} ranks; input tag "
        f"{sizes}; {rounds} round(s). ckptkit's output is a 3-rank DeepSpeed checkpoint the plain "
        "engine loads; ds_to_universal's still needs a `load_universal` load to become one."
    )
    result.tables.append(table(
        ["stage", "contender", "wall s (median)", "library s (median)", "CPU s (median)",
         "peak RSS (tree sum, max)", "largest process", "output"],
        rows,
    ))
    result.data["loadavg_end"] = loadavg()
    return result


def _measured(argv: list[str]) -> tuple[ToolRun, int | None]:
    """``run_tool`` of ``argv``, under GNU time where there is one for the largest process's peak
    (its own ~2 MB count in the tree sum of both contenders alike)."""
    if not GNU_TIME.exists():
        return run_tool(argv, bench_consolidate.ENV), None
    report = WORK / "reshard-time.txt"
    tool = run_tool([str(GNU_TIME), "-f", "%M", "-o", str(report), *argv], bench_consolidate.ENV)
    largest = int(report.read_text().split()[-1]) * 1024
    report.unlink()
    return tool, largest


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--regenerate", action="store_true")
    args = parser.parse_args()
    main_for(run, rounds=args.rounds, regenerate=args.regenerate)
