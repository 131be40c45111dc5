"""CLI start-up: ``ckptkit --help`` as a subprocess against ``python -c pass``, and proof that
the torch-free commands never import torch (``python -X importtime``).

    .venv/bin/python benchmarks/bench_startup.py [--rounds N]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import REPO, Result, Row, loadavg, main_for, table, timed

CONSOLE_SCRIPT = Path(sys.executable).parent / "ckptkit"


def commands() -> dict[str, list[str]]:
    found = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "python -c 'import click'": [sys.executable, "-c", "import click"],
        "python -m ckptkit --help": [sys.executable, "-m", "ckptkit", "--help"],
    }
    if CONSOLE_SCRIPT.exists():
        found["ckptkit --help (console script)"] = [str(CONSOLE_SCRIPT), "--help"]
    return found


def import_profile(args: list[str]) -> tuple[set[str], list[tuple[int, str]]]:
    """Modules imported by ``python -X importtime -m ckptkit ARGS``, and the largest self times."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "ckptkit", *args],
                          capture_output=True, text=True, cwd=REPO)
    modules: set[str] = set()
    heaviest: list[tuple[int, str]] = []
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, _cumulative, name = line.split(":", 1)[1].split("|")
        modules.add(name.strip())
        heaviest.append((int(self_us), name.strip()))
    return modules, sorted(heaviest, reverse=True)[:6]


def run(rounds: int = 10) -> Result:
    result = Result("startup")
    result.data["loadavg_start"] = loadavg()
    runs = commands()
    rows = {name: Row(name) for name in runs}
    for _ in range(rounds):
        for name, argv in runs.items():
            rows[name].times.append(timed(lambda argv=argv: subprocess.run(
                argv, cwd=REPO, check=True, capture_output=True))[0])
    base = rows["python -c pass"].median
    result.tables.append(f"Start-up, median of {rounds}:\n\n" + table(
        ["command", "median s", "minus python -c pass, s", "min s"],
        [[r.name, r.median, r.median - base, min(r.times)] for r in rows.values()],
    ))

    with tempfile.TemporaryDirectory() as empty:
        checks = {"--help": ["--help"], "ls <local dir>": ["ls", empty],
                  "verify --help": ["verify", "--help"]}
        torch_free = []
        for label, args in checks.items():
            modules, slowest = import_profile(args)
            torch_free.append([f"ckptkit {label}", "torch" not in modules, len(modules),
                               ", ".join(f"{n} {us / 1000:.0f} ms" for us, n in slowest[:4])])
            result.data[f"imports {label}"] = {"count": len(modules), "torch": "torch" in modules,
                                               "largest_self_us": slowest}
    result.tables.append("Imports (`python -X importtime`):\n\n" + table(
        ["command", "torch-free", "modules imported", "largest self import times"],
        torch_free))

    help_row = rows["python -m ckptkit --help"]
    result.target("ckptkit --help seconds (python -m)", help_row.median, 0.3)
    result.data.update(rounds=rounds, rows=[r.__dict__ for r in rows.values()], loadavg_end=loadavg(),
                       torch_free=all(row[1] for row in torch_free))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    main_for(run, rounds=parser.parse_args().rounds)


if __name__ == "__main__":
    main()
