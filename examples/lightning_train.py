"""Lightning training that is killed in the middle of a checkpoint save, then resumed bit for bit.

The story, in four phases:

1. reference: ``Trainer.fit`` for all epochs without interruption (checkpoints through ckptkit).
2. crash:     the same training in a child process, checkpointing each epoch through
              ``CkptkitCheckpointIO``; a watchdog SIGKILLs the child as soon as a checkpoint of
              epoch ``CRASH_EPOCH`` is being written, so its staging directory is left half-written.
3. resume:    ``latest_committed_checkpoint`` picks the newest *committed* checkpoint (never the
              half-written one) and ``Trainer.fit(ckpt_path=...)`` runs to the end; the final
              weights and optimizer state are compared with the reference, bit for bit.
4. tidy:      ``ckptkit gc`` removes the debris of the killed save; every checkpoint left verifies.

Run it with ``python examples/lightning_train.py --root runs/lightning`` (under a minute on CPU).
``--worker`` is the child process of phase 2.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*LeafSpec.*")
warnings.filterwarnings("ignore", ".*exists and is not empty.*")  # the resume writes where the crash did

import pytorch_lightning as pl  # noqa: E402
from pytorch_lightning.callbacks import Callback, ModelCheckpoint  # noqa: E402

from ckptkit.commit import STAGING_MARKER  # noqa: E402
from ckptkit.integrations.lightning import CkptkitCheckpointIO, latest_committed_checkpoint  # noqa: E402
from ckptkit.ops.gc import collect_garbage  # noqa: E402
from ckptkit.ops.verify import verify_tree  # noqa: E402
from ckptkit.storage import open_store  # noqa: E402

EPOCHS = 4
CRASH_EPOCH = 2  # epochs 0 and 1 are committed when the save of epoch 2 is killed
FEATURES, HIDDEN, SAMPLES, BATCH = 32, 256, 256, 32
# Small shards make each save many fsynced files: a save lasts long enough to be killed midway.
MAX_SHARD_SIZE = 16 << 10
KILL_ATTEMPTS = 3


class Regressor(pl.LightningModule):
    def __init__(self, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(FEATURES, HIDDEN), torch.nn.ReLU(),
            torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.ReLU(),
            torch.nn.Linear(HIDDEN, 1),
        )

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)]


def make_data() -> DataLoader:
    """The same synthetic data in every process; not shuffled, so an epoch is the same batches."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(SAMPLES, FEATURES, generator=gen)
    y = torch.sin(x[:, :1]) + 0.1 * torch.randn(SAMPLES, 1, generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=False)


def fit(
    dirpath: Path, *, ckpt_path: str | None = None, callbacks: list[Callback] | None = None
) -> pl.Trainer:
    torch.manual_seed(0)  # the same initial weights in every run
    trainer = pl.Trainer(
        max_epochs=EPOCHS, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, plugins=[CkptkitCheckpointIO(max_shard_size=MAX_SHARD_SIZE)],
        callbacks=[ModelCheckpoint(dirpath=dirpath, save_top_k=-1, save_last=True), *(callbacks or [])],
    )
    trainer.fit(Regressor(), make_data(), ckpt_path=ckpt_path)
    return trainer


def fingerprint(trainer: pl.Trainer) -> str:
    """sha256 over every weight and optimizer-state tensor's bytes, in order."""
    digest = hashlib.sha256()
    states = [trainer.lightning_module.state_dict(), trainer.optimizers[0].state_dict()["state"]]
    stack: list[Any] = list(reversed(states))
    while stack:
        value = stack.pop()
        if isinstance(value, torch.Tensor):
            digest.update(value.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(value, dict):
            stack.extend(value[k] for k in reversed(list(value)))
    return digest.hexdigest()


# --- phase 2: the child that is killed ---------------------------------------------------------


class KillDuringSave(Callback):
    """From epoch ``CRASH_EPOCH`` on, SIGKILL this process once a checkpoint is half-written."""

    def __init__(self, dirpath: Path) -> None:
        self.dirpath = dirpath

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == CRASH_EPOCH:
            threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        while True:
            for entry in os.scandir(self.dirpath):
                if STAGING_MARKER in entry.name and _has_files(entry.path):
                    print(f"crash: killed while writing {entry.name}", flush=True)
                    os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(0.0005)


def _has_files(path: str) -> bool:
    try:
        return any(os.scandir(path))
    except FileNotFoundError:  # committed (renamed into place) between the listing and now
        return False


def worker(dirpath: Path) -> None:
    fit(dirpath, callbacks=[KillDuringSave(dirpath)])
    print("crash: the save finished before the watchdog fired", flush=True)


# --- the driver --------------------------------------------------------------------------------


def crash(dirpath: Path) -> bool:
    """Run the child until it is killed in the middle of a save; True if it was."""
    for attempt in range(1, KILL_ATTEMPTS + 1):
        shutil.rmtree(dirpath, ignore_errors=True)
        dirpath.mkdir(parents=True)
        child = subprocess.run(
            [sys.executable, __file__, "--worker", "--root", str(dirpath)],
            capture_output=True, text=True, timeout=300,
        )
        print(child.stdout.strip())
        # Killed, and the save it interrupted really left its staging directory behind (the kill
        # can, rarely, land just after the commit's rename).
        if child.returncode == -signal.SIGKILL and any(STAGING_MARKER in p.name for p in dirpath.iterdir()):
            return True
        print(f"crash: attempt {attempt} was not killed mid-save (exit {child.returncode})")
    return False


def show(dirpath: Path, title: str) -> None:
    print(title)
    for entry in sorted(os.listdir(dirpath)):
        committed = (dirpath / entry / "ckptkit-manifest.json").exists()
        print(f"  {entry:<48} {'committed' if committed else 'NOT committed (debris)'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="directory for the runs (replaced)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.root)
        return 0

    root = args.root.resolve()
    shutil.rmtree(root, ignore_errors=True)
    reference = fit(root / "reference")
    expected = fingerprint(reference)
    print(f"reference: {reference.global_step} steps, fingerprint {expected[:16]}")

    run = root / "run"
    if not crash(run):
        print("crash: could not kill a save midway; try again")
        return 1
    show(run, "after the crash:")

    latest = latest_committed_checkpoint(run)
    print(f"resume from: {latest}")
    resumed = fit(run, ckpt_path=latest)
    actual = fingerprint(resumed)
    same = actual == expected
    print(f"resumed: {resumed.global_step} steps, fingerprint {actual[:16]}")
    print(f"identical to the uninterrupted run: {'yes' if same else 'NO'}")

    report = collect_garbage(open_store(run), grace_seconds=0)
    print(f"gc: removed {len(report.removed)} debris item(s): {[d.prefix for d in report.removed]}")
    reports = verify_tree(open_store(run))
    print(f"verify: {sum(r.ok for r in reports)}/{len(reports)} checkpoints ok")
    show(run, "after resume and gc:")
    return 0 if same and all(r.ok for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
