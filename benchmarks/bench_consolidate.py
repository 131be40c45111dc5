"""Consolidating a ZeRO checkpoint: ``ckptkit consolidate`` against DeepSpeed's ``zero_to_fp32``.

Two genuine 2-rank checkpoints (ZeRO-2 and ZeRO-3, bf16, ≈51M parameters: a 50000×512 embedding
tied to the head, six 2048×2048 linears, a frozen param and a buffer) are made once with the
recipe of ``tests/fixtures/gen_deepspeed.py`` (reference/deepspeed-on-cpu.md). Each contender runs
in its own subprocess, so peak RSS (``VmHWM``) is its own:

* ckptkit: ``consolidate_zero(save_dir, out)`` (safetensors, read back and compared, committed).
* DeepSpeed: ``get_fp32_state_dict_from_zero_checkpoint(save_dir)`` then ``safetensors.save_file``
  (tied tensors cloned, as safetensors requires), which is what its own converter does.

Time is the work inside the subprocess, imports excluded (``import deepspeed`` alone costs
seconds); the process wall time is reported too. Rounds are interleaved; medians are reported.

    .venv/bin/python benchmarks/bench_consolidate.py [--rounds N] [--regenerate]
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
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, WORK, Result, Row, loadavg, main_for, table

VOCAB, EMBED, HIDDEN, LAYERS = 50_000, 512, 2048, 6
GEN_DIR = WORK / "consolidate-src"
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONHASHSEED": "0", "PYTHONPATH": str(REPO)}


# --- generation (runs in ranks spawned by a subprocess) --------------------------------------------


def _model() -> Any:
    import torch
    from torch import nn

    class Big(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(VOCAB, EMBED)
            self.proj = nn.Linear(EMBED, HIDDEN)
            self.layers = nn.ModuleList(nn.Linear(HIDDEN, HIDDEN) for _ in range(LAYERS))
            self.out = nn.Linear(HIDDEN, EMBED)
            self.head = nn.Linear(EMBED, VOCAB, bias=False)
            self.head.weight = self.embed.weight
            self.frozen_scale = nn.Parameter(torch.ones(EMBED), requires_grad=False)
            self.register_buffer("offset", torch.zeros(EMBED))

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            h = self.proj(self.embed(ids))
            for layer in self.layers:
                h = torch.relu(layer(h))
            h = self.out(h) * self.frozen_scale + self.offset.to(h.dtype)
            return self.head(h).float().logsumexp(-1).mean()

    return Big()


def _worker(rank: int, world: int, port: int, outdir: str) -> None:
    from tests.fixtures.gen_deepspeed import _patch_deepspeed_for_cpu, rank_environment

    os.environ.update(rank_environment(rank, world, port))
    import torch

    torch.set_num_threads(1)
    _patch_deepspeed_for_cpu()
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend="gloo")
    for stage in (2, 3):
        torch.manual_seed(0)
        model = _model()
        config = {
            "train_micro_batch_size_per_gpu": 2,
            "zero_optimization": {"stage": stage},
            "bf16": {"enabled": True},
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
        }
        engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=config
        )
        ids = torch.randint(0, VOCAB, (2, 4), generator=torch.Generator().manual_seed(rank))
        engine.backward(engine(ids))
        engine.step()
        engine.save_checkpoint(str(Path(outdir) / f"zero{stage}"), tag="global_step1")
        dist.barrier()
        engine.destroy()
    dist.barrier()
    dist.destroy_process_group()


def generate(outdir: Path) -> None:
    import torch.multiprocessing as mp

    from tests.fixtures._common import free_port

    mp.start_processes(_worker, args=(2, free_port(), str(outdir)), nprocs=2, join=True, start_method="spawn")


def ensure_checkpoints(regenerate: bool) -> Path:
    marker = GEN_DIR / ".done"
    if marker.exists() and not regenerate:
        return GEN_DIR
    shutil.rmtree(GEN_DIR, ignore_errors=True)
    GEN_DIR.mkdir(parents=True)
    subprocess.run([sys.executable, __file__, "--generate", str(GEN_DIR)], check=True, env=ENV, cwd=REPO)
    marker.write_text("ok\n")
    return GEN_DIR


# --- contenders, each a subprocess that prints {"seconds", "hwm_kb"} --------------------------------

_HWM = "int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])"
CKPTKIT = textwrap.dedent(f"""
    import json, sys, time
    from ckptkit.ops.consolidate import consolidate_zero
    t0 = time.perf_counter()
    r = consolidate_zero(sys.argv[1], sys.argv[2])
    assert r.ok
    print(json.dumps({{"seconds": time.perf_counter() - t0, "hwm_kb": {_HWM}}}))
""")
DEEPSPEED = textwrap.dedent(f"""
    import json, os, sys, time
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import save_file
    t0 = time.perf_counter()
    sd = get_fp32_state_dict_from_zero_checkpoint(sys.argv[1])
    seen = set()
    out = {{}}
    for k, v in sd.items():  # safetensors refuses shared storage: clone tied tensors
        ptr = v.data_ptr()
        out[k] = v.clone() if ptr in seen else v.contiguous()
        seen.add(ptr)
    os.makedirs(sys.argv[2])
    save_file(out, os.path.join(sys.argv[2], "model.safetensors"), metadata={{"format": "pt"}})
    print(json.dumps({{"seconds": time.perf_counter() - t0, "hwm_kb": {_HWM}}}))
""")


def run_one(script: str, src: Path, out: Path) -> tuple[float, float, int]:
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", script, str(src), str(out)],
        env=ENV,
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    shutil.rmtree(out, ignore_errors=True)
    return doc["seconds"], wall, doc["hwm_kb"] * 1024


def run(rounds: int = 2, regenerate: bool = False) -> Result:
    result = Result("consolidate")
    result.data["loadavg_start"] = loadavg()
    src_root = ensure_checkpoints(regenerate)
    rows = []
    for stage in (2, 3):
        src = src_root / f"zero{stage}"
        contenders = {"ckptkit consolidate": CKPTKIT, "DeepSpeed zero_to_fp32 + save_file": DEEPSPEED}
        stats = {name: Row(name) for name in contenders}
        for _ in range(rounds):
            for name, script in contenders.items():
                seconds, wall, hwm = run_one(script, src, WORK / "consolidate-out")
                stats[name].times.append(seconds)
                stats[name].extra.setdefault("wall", []).append(wall)
                stats[name].extra.setdefault("hwm", []).append(hwm)
        ours, theirs = stats["ckptkit consolidate"], stats["DeepSpeed zero_to_fp32 + save_file"]
        for row in (ours, theirs):
            rows.append(
                [
                    f"ZeRO-{stage}",
                    row.name,
                    row.median,
                    sorted(row.extra["wall"])[len(row.times) // 2],
                    f"{max(row.extra['hwm']) / 2**20:.0f} MiB",
                ]
            )
        rss_ratio = max(ours.extra["hwm"]) / max(theirs.extra["hwm"])
        time_ratio = ours.median / theirs.median
        result.data[f"zero{stage}"] = {
            "rss_ratio": rss_ratio,
            "time_ratio": time_ratio,
            "ours": ours.__dict__,
            "deepspeed": theirs.__dict__,
        }
        result.target(f"ZeRO-{stage} peak RSS ratio (ckptkit / DeepSpeed)", rss_ratio, 0.5)
        result.target(f"ZeRO-{stage} time ratio (ckptkit / DeepSpeed)", time_ratio, 1.0)
    params = _param_count()
    result.tables.append(
        f"{params / 1e6:.1f}M parameters, 2 ranks, bf16 training, fp32 output; {rounds} round(s)"
    )
    result.tables.append(
        table(["stage", "contender", "work s (median)", "process wall s", "peak RSS (VmHWM)"], rows)
    )
    result.data["loadavg_end"] = loadavg()
    return result


def _param_count() -> int:
    tied = VOCAB * EMBED
    return (
        tied + EMBED * HIDDEN + HIDDEN + LAYERS * (HIDDEN * HIDDEN + HIDDEN) + HIDDEN * EMBED + EMBED + EMBED
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--regenerate", action="store_true")
    parser.add_argument("--generate", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generate:
        sys.path.insert(0, str(REPO))
        generate(Path(args.generate))
    else:
        main_for(run, rounds=args.rounds, regenerate=args.regenerate)
