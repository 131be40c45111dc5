"""``ckptkit inspect --optimizer`` against ``torch.load(weights_only=False)`` of a ~2 GB file.

The file is what a training script saves: ``{"model": state_dict, "optimizer": AdamW state}``
of a ~166M-parameter model after one step, written by ``torch.save`` (≈2.0 GB). Each contender
runs in its own subprocess, which reports the time of its imports and of its work apart, and
its peak RSS; rounds interleave the contenders. Warm: the file is in the page cache. Cold (root
only): the cache is dropped before every run.

    .venv/bin/python benchmarks/bench_inspect.py [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from _common import BENCH_DIR, GB, REPO, WORK, Result, Row, drop_caches, fresh_dir, loadavg, main_for, table
from _model import Config

CONFIG = Config(vocab=32_000, width=1024, layers=8, heads=16, ffn=4096)

# Each child times its imports and its work apart, and reads its peak RSS from VmHWM (unlike
# ru_maxrss, which a child inherits from the parent it was forked from, VmHWM starts afresh at exec).
_CHILD = """
import json, sys, time
start = time.perf_counter()
{setup}
ready = time.perf_counter()
{work}
done = time.perf_counter()
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({{"imports": ready - start, "work": done - ready, "maxrss_kb": int(hwm.split()[1]),
                  "torch": "torch" in sys.modules}}))
"""
CONTENDERS = {
    "torch.load(weights_only=False)": (
        "import torch",
        "state = torch.load(sys.argv[1], weights_only=False, map_location='cpu')",
    ),
    "ckptkit inspect --optimizer (CLI)": (
        "import contextlib, io\n"
        "from ckptkit.cli.main import cli\n"
        "from ckptkit.cli.inspect_cmd import inspect_command\n"
        "cli.add_command(inspect_command)",
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out):\n"
        "    try:\n"
        "        cli(['inspect', '--optimizer', sys.argv[1]], standalone_mode=False)\n"
        "    except SystemExit as exc:\n"
        "        assert exc.code == 0, out.getvalue()\n"
        "assert 'AdamW' in out.getvalue(), out.getvalue()",
    ),
}


def make_file() -> Path:
    path = fresh_dir("inspect") / "optimizer.pt"
    # In a subprocess, so that this process stays small while it starts the contenders.
    code = (
        "import sys, torch\nfrom _model import training_state\nfrom bench_inspect import CONFIG\n"
        "torch.save(training_state(CONFIG), sys.argv[1])"
    )
    subprocess.run([sys.executable, "-c", code, str(path)], cwd=BENCH_DIR, check=True)
    return path


def run_child(setup: str, work: str, path: Path) -> dict[str, float]:
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD.format(setup=setup, work=work), str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"contender failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(path: Path, rounds: int, cold: bool) -> list[Row]:
    rows = {name: Row(name) for name in CONTENDERS}
    for _ in range(rounds):
        for name, (setup, work) in CONTENDERS.items():
            if cold and not drop_caches():
                raise RuntimeError("cold runs need root")
            found = run_child(setup, work, path)
            rows[name].times.append(found["work"])
            rows[name].extra.setdefault("imports_s", []).append(found["imports"])
            rows[name].extra.setdefault("maxrss_mb", []).append(found["maxrss_kb"] / 1024)
            rows[name].extra["imports torch"] = found["torch"]
    return list(rows.values())


def render(rows: list[Row], title: str) -> str:
    base = rows[0]
    return f"{title}:\n\n" + table(
        [
            "contender",
            "median work s",
            "× torch.load",
            "median imports s",
            "× torch.load incl. imports",
            "peak RSS MB",
            "imports torch",
            "work runs s",
        ],
        [
            [
                r.name,
                r.median,
                r.median / base.median,
                _median(r.extra["imports_s"]),
                _whole(r) / _whole(base),
                max(r.extra["maxrss_mb"]),
                r.extra["imports torch"],
                " ".join(f"{t:.3f}" for t in r.times),
            ]
            for r in rows
        ],
    )


def _median(values: list[float]) -> float:
    return statistics.median(values)


def _whole(row: Row) -> float:
    """Median of imports + work: what a user waits for, minus the interpreter's own start."""
    return statistics.median(i + w for i, w in zip(row.extra["imports_s"], row.times, strict=True))


def run(rounds: int = 3) -> Result:
    result = Result("inspect")
    result.data["loadavg_start"] = loadavg()
    path = make_file()
    size = path.stat().st_size
    result.data.update(bytes=size, rounds=rounds)
    path.read_bytes()  # warm the page cache once
    warm = measure(path, rounds, cold=False)
    result.tables.append(render(warm, f"Warm cache ({size / GB:.2f} GB file), median of {rounds}"))
    cold = measure(path, 1, cold=True) if drop_caches() else None
    if cold:
        result.tables.append(render(cold, "Cold cache (page cache dropped before each run), one round"))
    load, inspect = warm
    result.target("inspect time / torch.load time (warm, work)", inspect.median / load.median, 0.01)
    result.target("inspect time / torch.load time (warm, with imports)", _whole(inspect) / _whole(load), 0.01)
    result.target("inspect peak RSS, MB", max(inspect.extra["maxrss_mb"]), 200)
    result.data.update(
        warm=[r.__dict__ for r in warm], cold=[r.__dict__ for r in cold or []], loadavg_end=loadavg()
    )
    shutil.rmtree(WORK / "inspect", ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    main_for(run, rounds=parser.parse_args().rounds)


if __name__ == "__main__":
    main()
