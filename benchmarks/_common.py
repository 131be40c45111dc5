"""Helpers shared by the benchmarks: timing, cache control, machine facts, Markdown tables.

The machine these run on is shared and noisy, so every benchmark runs its contenders in
interleaved rounds (A B C, A B C, ...) inside one process and reports medians and ratios.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
OUT = BENCH_DIR / "out"
WORK = OUT / "work"  # scratch space on the same disk as the repo; removed by each benchmark
GB = 1e9


@dataclass
class Row:
    """One contender's measurements: wall times of every round plus any extra columns."""

    name: str
    times: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def median(self) -> float:
        return statistics.median(self.times)


@dataclass
class Result:
    """What one benchmark hands to ``run_all``: tables (already rendered) plus raw data."""

    name: str
    tables: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    targets: list[dict[str, Any]] = field(default_factory=list)

    def target(self, what: str, value: float, limit: float, *, at_most: bool = True) -> None:
        met = value <= limit if at_most else value >= limit
        self.targets.append({"what": what, "value": value, "limit": limit,
                             "at_most": at_most, "met": met})

    def render(self) -> str:
        parts = [f"## {self.name}", "", f"load average at start: {self.data.get('loadavg_start')}, "
                 f"at end: {self.data.get('loadavg_end')}", ""]
        for text in self.tables:
            parts += [text, ""]
        for t in self.targets:
            sign = "≤" if t["at_most"] else "≥"
            verdict = "met" if t["met"] else "NOT met"
            parts.append(f"- target {t['what']} {sign} {t['limit']:g}: {t['value']:.3g} → **{verdict}**")
        return "\n".join(parts).rstrip() + "\n"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def drop_caches() -> bool:
    """Write back dirty pages and drop the page cache (needs root); False if not allowed."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def fresh_dir(name: str, root: Path = WORK) -> Path:
    path = root / name
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table; floats get three significant digits."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    """The facts docs/performance.md quotes about where the numbers came from."""
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kb = next(
        int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal")
    )
    disk = subprocess.run(["df", "-h", "--output=source,fstype,size", str(REPO)],
                          capture_output=True, text=True).stdout.strip().splitlines()[-1]
    versions = subprocess.run(
        [sys.executable, "-c",
         "import torch, safetensors, ckptkit; print(torch.__version__, safetensors.__version__, "
         "ckptkit.__version__)"],
        capture_output=True, text=True, cwd=REPO,
    ).stdout.split()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(mem_kb / 2**20, 1),
        "disk": " ".join(disk.split()),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": versions[0] if versions else None,
        "safetensors": versions[1] if len(versions) > 1 else None,
        "ckptkit": versions[2] if len(versions) > 2 else None,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "loadavg": loadavg(),
    }


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def main_for(run: Callable[..., Result], **kwargs: Any) -> None:
    """Run one benchmark on its own: print its tables and write ``out/<module>.json``."""
    result = run(**kwargs)
    print(result.render())
    write_json(OUT / f"{result.name.replace(' ', '_')}.json", result.to_json())
