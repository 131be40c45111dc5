"""Child-process bodies for the crash tests (imported by the forkserver, so they start fast)."""

from __future__ import annotations

import sys

import torch

from ckptkit import CheckpointManager
from ckptkit.errors import CommitConflictError


def state_for_step(step: int) -> dict[str, object]:
    """A deterministic multi-shard state whose every value encodes ``step``."""
    generator = torch.Generator().manual_seed(step)
    return {
        "step": step,
        "model": {f"layer{i}.weight": torch.randn(64, 64, generator=generator) for i in range(6)},
        "optimizer": {"state": {0: {"exp_avg": torch.full((32, 32), float(step))}}, "lr": 1e-3 * step},
    }


def save_forever(root: str, first_step: int, ready) -> None:
    """Save step after step until killed; retention keeps the newest three."""
    manager = CheckpointManager(root, keep_last=3, max_shard_size=20_000)
    ready.set()
    step = first_step
    while True:
        manager.save(step, state_for_step(step))
        step += 1


def save_once(root: str, step: int, barrier, results) -> None:
    """Save one step, racing another process for it; report 'won' or the error message."""
    manager = CheckpointManager(root, max_shard_size=20_000)
    state = state_for_step(step)
    barrier.wait()
    try:
        manager.save(step, state)
        results.put("won")
    except CommitConflictError as exc:
        results.put(f"lost: {exc}")
    sys.stdout.flush()
