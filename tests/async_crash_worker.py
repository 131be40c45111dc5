"""Child-process body for the SIGKILL test of non-blocking saves (imported by the forkserver)."""

from __future__ import annotations

import torch

from ckptkit import CheckpointManager


def state_for_step(step: int) -> dict[str, object]:
    """A deterministic multi-shard state whose every value encodes ``step``; ``tied`` is
    ``model.layer0.weight`` itself, as tied embeddings are."""
    generator = torch.Generator().manual_seed(step)
    model = {f"layer{i}.weight": torch.randn(64, 64, generator=generator) for i in range(6)}
    return {
        "step": step,
        "model": model,
        "tied": model["layer0.weight"],
        "optimizer": {"state": {0: {"exp_avg": torch.full((32, 32), float(step))}}, "lr": 1e-3 * step},
    }


def save_forever(root: str, first_step: int, ready) -> None:
    """Save step after step without blocking until killed, training-loop style: one set of
    tensors, set to step N's values, saved, then scribbled over at once (as an optimizer
    would) while the save of step N is still being written."""
    manager = CheckpointManager(root, keep_last=3, max_shard_size=20_000)
    state = state_for_step(first_step)
    ready.set()
    step = first_step
    while True:
        values = state_for_step(step)
        for name, tensor in state["model"].items():  # type: ignore[union-attr]
            tensor.copy_(values["model"][name])  # type: ignore[index]
        exp_avg = state["optimizer"]["state"][0]["exp_avg"]  # type: ignore[index]
        exp_avg.copy_(values["optimizer"]["state"][0]["exp_avg"])  # type: ignore[index]
        state["step"], state["optimizer"]["lr"] = step, values["optimizer"]["lr"]  # type: ignore[index]
        manager.save(step, state, blocking=False)
        for tensor in state["model"].values():  # type: ignore[union-attr]
            tensor.add_(1000.0)
        exp_avg.add_(1000.0)
        step += 1
