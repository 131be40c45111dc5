"""Converting a ~500 MB torch ``.bin`` to safetensors: ``ckptkit convert`` against the usual one-liner.

The source is a state dict of 24 fp32 tensors of ~21 MB each (an LM-like mix, 500 MB in all),
written once with ``torch.save``. Each contender runs in its own subprocess, so peak RSS
(``VmHWM``) is its own:

* ckptkit: ``convert(src, out.safetensors, to="safetensors")``: streamed, then re-read and
  compared tensor by tensor; torch is never imported.
* usual: ``safetensors.torch.save_file(torch.load(src, weights_only=True), out)``: the whole
  model in RAM, no verification.

Time is the work inside the subprocess (imports excluded) and the process wall time. Rounds are
interleaved; medians of ``--rounds`` (default 3) are reported.

    .venv/bin/python benchmarks/bench_convert.py [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, WORK, Result, Row, loadavg, main_for, table

TENSORS, NUMEL = 24, 5_242_880  # 24 x 20 MiB fp32 = 503 MB
SRC = WORK / "convert-src" / "pytorch_model.bin"
ENV = {**os.environ, "PYTHONPATH": str(REPO)}

_HWM = "int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])"
CKPTKIT = textwrap.dedent(f"""
    import json, sys, time
    from ckptkit.ops.convert import convert
    t0 = time.perf_counter()
    r = convert(sys.argv[1], sys.argv[2], to="safetensors")
    assert r.ok
    print(json.dumps({{"seconds": time.perf_counter() - t0, "hwm_kb": {_HWM}}}))
""")
USUAL = textwrap.dedent(f"""
    import json, sys, time
    import torch
    from safetensors.torch import save_file
    t0 = time.perf_counter()
    save_file(torch.load(sys.argv[1], weights_only=True), sys.argv[2], metadata={{"format": "pt"}})
    print(json.dumps({{"seconds": time.perf_counter() - t0, "hwm_kb": {_HWM}}}))
""")


def ensure_source() -> Path:
    if not SRC.exists():
        import torch

        SRC.parent.mkdir(parents=True, exist_ok=True)
        gen = torch.Generator().manual_seed(0)
        torch.save({f"layers.{i}.weight": torch.randn(NUMEL, generator=gen) for i in range(TENSORS)}, SRC)
    return SRC


def run_one(script: str, src: Path, out: Path) -> tuple[float, float, int]:
    out.unlink(missing_ok=True)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", script, str(src), str(out)],
        env=ENV, cwd=REPO, capture_output=True, text=True, check=False,
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    out.unlink(missing_ok=True)
    return doc["seconds"], wall, doc["hwm_kb"] * 1024


def run(rounds: int = 3) -> Result:
    result = Result("convert")
    result.data["loadavg_start"] = loadavg()
    src = ensure_source()
    contenders = {"ckptkit convert": CKPTKIT, "save_file(torch.load(...))": USUAL}
    stats = {name: Row(name) for name in contenders}
    for _ in range(rounds):
        for name, script in contenders.items():
            seconds, wall, hwm = run_one(script, src, WORK / "convert-out.safetensors")
            stats[name].times.append(seconds)
            stats[name].extra.setdefault("wall", []).append(wall)
            stats[name].extra.setdefault("hwm", []).append(hwm)
    rows = [
        [row.name, row.median, sorted(row.extra["wall"])[len(row.times) // 2],
         f"{sorted(row.extra['hwm'])[len(row.times) // 2] / 2**20:.0f} MiB"]
        for row in stats.values()
    ]
    ours, theirs = stats["ckptkit convert"], stats["save_file(torch.load(...))"]
    rss_ratio = max(ours.extra["hwm"]) / max(theirs.extra["hwm"])
    time_ratio = ours.median / theirs.median
    result.data.update(rss_ratio=rss_ratio, time_ratio=time_ratio, ours=ours.__dict__, usual=theirs.__dict__)
    result.target("peak RSS ratio (ckptkit / save_file(torch.load))", rss_ratio, 0.5)
    result.tables.append(
        f"{src.stat().st_size / 1e6:.0f} MB torch .bin ({TENSORS} fp32 tensors) -> one .safetensors; "
        f"{rounds} round(s), medians; ckptkit's time includes its reload-and-compare"
    )
    result.tables.append(table(["contender", "work s", "process wall s", "peak RSS (VmHWM)"], rows))
    result.data["loadavg_end"] = loadavg()
    shutil.rmtree(SRC.parent, ignore_errors=True)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    main_for(run, rounds=parser.parse_args().rounds)
