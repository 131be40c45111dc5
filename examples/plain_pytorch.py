"""A plain PyTorch loop with ``CheckpointManager``: retention, a background S3 mirror, and a resume
on a fresh machine from the mirror alone.

1. train:   a small model trains for ``STEPS`` steps; every ``SAVE_EVERY`` steps the manager commits
            a checkpoint locally (the step waits for that only) and uploads it to the mirror in a
            background thread. Retention keeps the last two and the best by loss, here and there.
2. lose:    the local disk is gone (the directory is deleted).
3. resume:  a new process restores the newest checkpoint from the mirror, trains to the end, and
            its final weights equal an uninterrupted run's bit for bit.

``--mirror`` is any store URL: ``s3://bucket/prefix`` (credentials and endpoint the AWS way, e.g.
``AWS_ENDPOINT_URL`` for MinIO or moto) or a local directory. Run it with
``python examples/plain_pytorch.py --root runs/plain --mirror s3://my-bucket/plain``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from ckptkit import CheckpointManager
from ckptkit.catalog import list_checkpoints
from ckptkit.storage import open_store

STEPS, SAVE_EVERY, STOP_AT = 60, 10, 35
FEATURES, HIDDEN, BATCH = 16, 128, 32


def make_training() -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=STEPS)
    return model, optimizer, scheduler


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)  # the data of step N, in any process
    x = torch.randn(BATCH, FEATURES, generator=generator)
    return x, x.sum(dim=1, keepdim=True).sin()


def train(root: str, mirror: str | None, first: int, last: int, resume_from: str | None) -> dict:
    model, optimizer, scheduler = make_training()
    if resume_from is not None:
        state = CheckpointManager(resume_from).restore()
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        first = state["step"] + 1
        print(f"  resumed from {resume_from}: step {state['step']}, lr {scheduler.get_last_lr()[0]:.6f}")
    manager = CheckpointManager(root, keep_last=2, keep_best="loss", mirror=mirror)
    for step in range(first, last + 1):
        x, y = batch(step)
        loss = F.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % SAVE_EVERY == 0:
            state = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "step": step,
            }
            manager.save(step, state, metrics={"loss": loss.item()})
            print(
                f"  step {step:3d}  loss {loss.item():.5f}  committed locally, mirror pending: "
                f"{sorted(manager.mirror_status().pending) if mirror else '-'}"
            )
    manager.close()  # waits for the uploads; raises MirrorError if one failed
    if mirror:
        status = manager.mirror_status()
        print(
            f"  mirror: {len(status.uploaded)} uploaded, {len(status.deleted)} deleted by retention, "
            f"{len(status.failed)} failed, {status.bytes_sent / 1e6:.1f} MB sent"
        )
    return model.state_dict()


def committed(url: str) -> list[str]:
    return [c.name for c in list_checkpoints(open_store(url)) if c.committed]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", required=True, help="local checkpoint directory (must not exist)")
    parser.add_argument("--mirror", help="mirror URL (default: <root>-mirror, a local directory)")
    args = parser.parse_args()
    root = Path(args.root)
    mirror = args.mirror or f"{root}-mirror"
    if root.exists() and any(root.iterdir()):
        print(f"{root} is not empty; give a fresh --root", file=sys.stderr)
        return 2
    torch.set_num_threads(1)

    print(f"1. reference: {STEPS} steps without interruption")
    reference = train(str(root / "reference"), None, 1, STEPS, None)

    print(
        f"2. train with CheckpointManager(keep_last=2, keep_best='loss', mirror={mirror!r}); "
        f"the machine dies after step {STOP_AT}"
    )
    train(str(root / "run"), mirror, 1, STOP_AT, None)
    print(f"  local:  {committed(str(root / 'run'))}")
    print(f"  mirror: {committed(mirror)}")
    shutil.rmtree(root / "run")
    print("  local checkpoints lost")

    print("3. a fresh machine resumes from the mirror")
    final = train(str(root / "run"), mirror, 1, STEPS, resume_from=mirror)
    same = all(torch.equal(final[k], reference[k]) for k in reference)
    print(f"  final weights equal the uninterrupted run's, bit for bit: {same}")
    print(f"  mirror now: {committed(mirror)}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
