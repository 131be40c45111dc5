"""LoRA-style fine-tuning with a deduplicating ``CheckpointManager``: the frozen base is stored
once however often it is saved, and older checkpoints are thinned to weights only.

1. train:   a frozen base (a stack of ``Linear`` layers, built from a seed: a stand-in for a
            pretrained model) carries rank-``--rank`` LoRA adapters that AdamW trains. Every
            ``SAVE_EVERY`` steps the manager saves the whole ``model.state_dict()`` (base
            included, as a user who saves ``state_dict()`` does) with the optimizer.
            ``dedup=True``: each tensor's bytes are stored once in the root's blob store, so
            after the first checkpoint a save writes the adapters and AdamW's state only.
            ``keep_last=5, keep_optimizer_last=2``: five checkpoints are kept, the two newest
            resumable, the older ones thinned to ``model`` (weights only).
2. look:    per checkpoint, resumable or weights-only and its size; the root's bytes on disk
            against what its checkpoints hold (hard links and shared blobs counted once).
3. resume:  the run stopped at step ``STOP_AT``; a fresh model and optimizer ``restore()`` the
            newest resumable checkpoint and train to the end, and the final weights equal an
            uninterrupted run's bit for bit.

Run it with ``python examples/lora_dedup.py --root runs/lora`` (``--layers``/``--width`` size
the base: the default 8 × 1024² is 8.4M parameters, 34 MB).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ckptkit import CheckpointManager
from ckptkit.ops.verify import verify_checkpoint
from ckptkit.storage import open_store

STEPS, SAVE_EVERY, STOP_AT = 50, 5, 37
BATCH, MB = 16, 1e6


class LoRALinear(nn.Module):
    """A frozen ``Linear`` plus ``x Aᵀ Bᵀ``; B starts at zero, so training starts from the base."""

    def __init__(self, width: int, rank: int) -> None:
        super().__init__()
        self.base = nn.Linear(width, width)
        self.base.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.randn(rank, width) / width**0.5)
        self.lora_b = nn.Parameter(torch.zeros(width, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.T) @ self.lora_b.T


def make_training(layers: int, width: int, rank: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)  # the same "pretrained" base and initial adapters in every process
    model = nn.Sequential(*(nn.Sequential(LoRALinear(width, rank), nn.Tanh()) for _ in range(layers)))
    adapters = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(adapters, lr=1e-3)


def batch(step: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)  # the data of step N, in any process
    x = torch.randn(BATCH, width, generator=generator)
    return x, torch.roll(x, 1, dims=1).tanh()


def inodes(root: Path) -> dict[tuple[int, int], int]:
    """Every file under ``root`` once, by inode, with its size: a deduplicated file is hard-linked
    into each checkpoint that holds it and into the blob store, one inode on disk."""
    found = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            info = os.lstat(os.path.join(dirpath, name))
            found[(info.st_dev, info.st_ino)] = info.st_size
    return found


def train(args: argparse.Namespace, root: Path | None, last: int, *, resume: bool) -> dict[str, torch.Tensor]:
    model, optimizer = make_training(args.layers, args.width, args.rank)
    first = 1
    manager = None
    if root is not None:
        manager = CheckpointManager(root, dedup=True, keep_last=5, keep_optimizer_last=2)
    if resume:
        assert manager is not None
        state: dict[str, Any] = manager.restore()  # the newest checkpoint that can resume
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        first = state["step"] + 1
        print(f"  restore() picked {manager.last_restored} (step {state['step']}), the newest resumable one")
    for step in range(first, last + 1):
        x, y = batch(step, args.width)
        loss = F.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if manager is not None and step % SAVE_EVERY == 0:
            before = inodes(root)
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step}
            manager.save(step, state)  # then retention: deletes, thins, releases unused blobs
            after = inodes(root)
            written = sum(size for inode, size in after.items() if inode not in before)
            freed = sum(size for inode, size in before.items() if inode not in after)
            print(f"  step {step:3d}  loss {loss.item():.5f}  saved: {written / MB:.2f} MB written, "
                  f"{freed / MB:.2f} MB freed by retention")
    if manager is not None:
        manager.close()
    return {k: v.clone() for k, v in model.state_dict().items()}


def look(root: Path) -> bool:
    """Print each checkpoint and the root's disk use; whether every checkpoint verifies."""
    manager = CheckpointManager(root)
    checkpoints = manager.list()
    for info in checkpoints:
        kind = "resumable" if info.resumable else "weights only"
        print(f"  {info.name}  {kind:12s}  {info.size / MB:6.2f} MB")
    held, used = sum(info.size for info in checkpoints), sum(inodes(root).values())
    print(f"  {len(checkpoints)} checkpoints hold {held / MB:.2f} MB; on disk: {used / MB:.2f} MB")
    store = open_store(str(root))
    return all(verify_checkpoint(store.child(info.name)).ok for info in checkpoints)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", required=True, help="checkpoint directory (must not exist or be empty)")
    parser.add_argument("--layers", type=int, default=8, help="Linear layers of the frozen base")
    parser.add_argument("--width", type=int, default=1024, help="each layer is width × width")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    args = parser.parse_args()
    root = Path(args.root)
    if root.exists() and any(root.iterdir()):
        print(f"{root} is not empty; give a fresh --root", file=sys.stderr)
        return 2
    torch.set_num_threads(1)

    print(f"1. reference: {STEPS} steps without interruption")
    reference = train(args, None, STEPS, resume=False)

    print(f"2. train with CheckpointManager(dedup=True, keep_last=5, keep_optimizer_last=2); stop after step "
          f"{STOP_AT}")
    train(args, root, STOP_AT, resume=False)
    verified = look(root)

    print("3. a fresh model resumes")
    final = train(args, root, STEPS, resume=True)
    verified = look(root) and verified
    same = all(torch.equal(final[k], reference[k]) for k in reference)
    print(f"  every checkpoint verifies: {verified}")
    print(f"  final weights equal the uninterrupted run's, bit for bit: {same}")
    return 0 if same and verified else 1


if __name__ == "__main__":
    sys.exit(main())
