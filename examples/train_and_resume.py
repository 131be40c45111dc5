"""Kill a training run in the middle of a checkpoint save, resume it, and continue bit for bit.

The story, in five phases:

1. reference: train a small model for all steps without interruption, logging loss and LR.
2. crash:     train again, checkpointing every few steps with ``CheckpointManager``, and SIGKILL
              the process while it is writing one checkpoint. The half-written checkpoint is
              left as a hidden staging directory; ``latest()`` still returns the previous one.
3. resume:    restart the training; it restores model, optimizer, LR scheduler, grad scaler, every
              RNG and the data sampler from the latest committed checkpoint and runs to the end.
4. compare:   every step after the resume point has exactly the reference's loss, LR and loss
              scale, compared as floats, bit for bit.
5. inspect:   ``ckptkit gc`` removes the debris of the killed save; ``ckptkit ls`` and
              ``ckptkit verify`` show the remaining checkpoints intact.

Run it with ``python examples/train_and_resume.py --root runs/demo``. The same file is also the
training process (``--worker``) that the demo starts, kills and restarts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tabulate import tabulate
from torch import nn
from torch.nn import functional as F
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

from ckptkit import CheckpointManager
from ckptkit.commit import STAGING_MARKER, is_ckptkit_debris_dir, step_dir_name

SEED = 0  # seeds the global torch and Python RNGs (weight init, dropout, augmentation)
DATA_SEED = 1  # the synthetic dataset: identical in every process, so it is not checkpointed
SAMPLER_SEED = 2  # the torch.Generator that draws batches: its state is checkpointed
FEATURES, HIDDEN, DATASET_SIZE, BATCH = 32, 384, 4096, 64
PEAK_LR = 3e-3
KEEP_LAST = 3
# A small shard size makes each save several fsynced files rather than one, which keeps it in
# progress for tens of milliseconds: a wide window for the demo to kill it in the middle.
MAX_SHARD_SIZE = 128 << 10
KILL_ATTEMPTS = 3


# --- the training process --------------------------------------------------------------------


@dataclass
class Training:
    """Everything a training step reads or changes; all of it (but the data) goes in a checkpoint."""

    model: nn.Module
    optimizer: torch.optim.AdamW
    scheduler: SequentialLR
    scaler: torch.amp.GradScaler
    sampler: torch.Generator
    inputs: torch.Tensor
    targets: torch.Tensor


def build_training(total_steps: int) -> Training:
    data = torch.Generator().manual_seed(DATA_SEED)
    inputs = torch.randn(DATASET_SIZE, FEATURES, generator=data)
    targets = torch.sin(inputs @ torch.randn(FEATURES, 1, generator=data))
    # Dropout draws from the global torch RNG on every step, so a resume that did not restore
    # that RNG would train on different masks and drift from the reference immediately.
    model = nn.Sequential(
        nn.Linear(FEATURES, HIDDEN), nn.GELU(), nn.Dropout(0.1),
        nn.Linear(HIDDEN, HIDDEN), nn.GELU(), nn.Dropout(0.1),
        nn.Linear(HIDDEN, 1),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=PEAK_LR, weight_decay=0.01)
    warmup = max(1, total_steps // 10)
    scheduler = SequentialLR(
        optimizer,
        [
            LinearLR(optimizer, start_factor=0.01, total_iters=warmup),
            CosineAnnealingLR(optimizer, T_max=total_steps - warmup, eta_min=PEAK_LR / 20),
        ],
        milestones=[warmup],
    )
    # On a GPU the forward pass would run under torch.autocast in float16 and the scaler would
    # keep small gradients from underflowing. This CPU demo trains in float32, where scaling by a
    # power of two is exact; the scaler is here because its state (the scale, which grows every
    # `growth_interval` steps, and its growth tracker) belongs in a checkpoint all the same, and
    # the demo checks that the scale after resuming matches the reference.
    scaler = torch.amp.GradScaler("cpu", growth_interval=25)
    sampler = torch.Generator().manual_seed(SAMPLER_SEED)
    return Training(model, optimizer, scheduler, scaler, sampler, inputs, targets)


def train_step(t: Training) -> float:
    batch = torch.randint(DATASET_SIZE, (BATCH,), generator=t.sampler)
    # A random input scaling as "augmentation", drawn from Python's RNG so that its state
    # matters too.
    inputs = t.inputs[batch] * random.uniform(0.9, 1.1)
    loss = F.mse_loss(t.model(inputs), t.targets[batch])
    t.optimizer.zero_grad(set_to_none=True)
    t.scaler.scale(loss).backward()
    t.scaler.step(t.optimizer)
    t.scaler.update()
    t.scheduler.step()
    return loss.item()


def training_state(step: int, t: Training) -> dict[str, Any]:
    """The checkpoint: a plain tree of tensors, numbers and containers, no pickled objects."""
    return {
        "step": step,
        "model": t.model.state_dict(),
        "optimizer": t.optimizer.state_dict(),
        "scheduler": t.scheduler.state_dict(),
        "scaler": t.scaler.state_dict(),
        "rng": {
            "python": random.getstate(),
            "torch": torch.get_rng_state(),
            "sampler": t.sampler.get_state(),
        },
    }


def load_training_state(t: Training, state: dict[str, Any]) -> int:
    """Put a checkpoint back into ``t`` and the global RNGs; returns the step it was saved at."""
    t.model.load_state_dict(state["model"])
    t.optimizer.load_state_dict(state["optimizer"])
    t.scheduler.load_state_dict(state["scheduler"])
    t.scaler.load_state_dict(state["scaler"])
    # Last, because building the model above consumed the global torch RNG.
    random.setstate(state["rng"]["python"])
    torch.set_rng_state(state["rng"]["torch"])
    t.sampler.set_state(state["rng"]["sampler"])
    return state["step"]


def run_worker(args: argparse.Namespace) -> None:
    """Train to ``--steps``, resuming from the latest checkpoint under ``--root`` if there is one.

    Writes the loss, LR and loss scale of every step it trained to ``--log`` as JSON.
    """
    # One thread: the same arithmetic in the same order in every process (results are then
    # bit-reproducible), and the demo's watching parent keeps a core of a small machine.
    torch.set_num_threads(1)
    random.seed(SEED)
    torch.manual_seed(SEED)
    t = build_training(args.steps)
    manager = None
    start = 0
    if args.root is not None:
        manager = CheckpointManager(args.root, keep_last=KEEP_LAST, max_shard_size=MAX_SHARD_SIZE)
        latest = manager.latest()
        if latest is not None:
            start = load_training_state(t, manager.restore(latest.step))

    log = []
    for step in range(start + 1, args.steps + 1):
        lr, scale = t.scheduler.get_last_lr()[0], t.scaler.get_scale()
        loss = train_step(t)
        log.append({"step": step, "loss": loss, "lr": lr, "scale": scale})
        if manager is not None and step % args.save_every == 0:
            manager.save(step, training_state(step, t), metrics={"loss": loss})
    Path(args.log).write_text(json.dumps({"resumed_from": start, "steps": log}))


# --- the demo ------------------------------------------------------------------------------


def worker_command(args: argparse.Namespace, log: Path, root: Path | None) -> list[str]:
    command = [
        sys.executable, __file__, "--worker", "--log", str(log),
        "--steps", str(args.steps), "--save-every", str(args.save_every),
    ]
    return [*command, "--root", str(root)] if root is not None else command


def run_to_end(command: list[str], log: Path) -> dict[str, Any]:
    subprocess.run(command, check=True)
    return json.loads(log.read_text())


def made_by_demo(name: str) -> bool:
    return name.startswith("step-") or is_ckptkit_debris_dir(name)


def wipe(root: Path) -> None:
    """Empty ``root`` for a repeatable run, refusing to delete anything the demo did not make."""
    if root.exists():
        foreign = sorted(p.name for p in root.iterdir() if not made_by_demo(p.name))
        if foreign:
            sys.exit(f"refusing to wipe {root}: it holds {', '.join(foreign[:3])}, not only demo checkpoints")
        shutil.rmtree(root)
    root.mkdir(parents=True)


def staging_dirs(root: Path, step: int) -> list[Path]:
    prefix = f".{step_dir_name(step)}{STAGING_MARKER}"
    return [p for p in root.iterdir() if p.name.startswith(prefix)]


def writing(root: Path, step: int) -> bool:
    """True once the save of ``step`` has begun writing files into its staging directory.

    Waiting for a file, not just the directory, leaves debris that holds some of the save's data.
    (It also keeps clear of an empty staging directory, which ``ckptkit gc`` does not remove yet:
    it lists files, and an empty directory has none.)
    """
    for staging in staging_dirs(root, step):
        with contextlib.suppress(FileNotFoundError):  # committed (renamed away) meanwhile
            if any(staging.iterdir()):
                return True
    return False


def kill_mid_save(command: list[str], root: Path, step: int) -> Path | None:
    """Start training and SIGKILL it the moment the save of ``step`` is writing its files.

    Returns the staging directory the killed save left behind, or None if the save got past its
    commit before the kill landed (or went by between two looks), so that the caller can retry.
    """
    worker = subprocess.Popen(command)
    while not writing(root, step):
        if worker.poll() is not None:
            if worker.returncode != 0:
                sys.exit(f"FAILED: the training process exited with {worker.returncode} before step {step}")
            return None
        time.sleep(0.0005)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    left = staging_dirs(root, step)
    return left[0] if left else None


def crash(args: argparse.Namespace, root: Path, log: Path, step: int) -> None:
    for attempt in range(1, KILL_ATTEMPTS + 1):
        staging = kill_mid_save(worker_command(args, log, root), root, step)
        if staging is not None:
            break
        print(f"      attempt {attempt}: the save of step {step} was not caught in progress; starting over")
        wipe(root)
    else:
        sys.exit(f"FAILED: could not kill the training in the middle of a save in {KILL_ATTEMPTS} tries")

    files = [p for p in staging.rglob("*") if p.is_file()]
    written = sum(p.stat().st_size for p in files)
    print(f"      killed mid-save: {staging.name} left behind ({len(files)} file(s), {written:,} bytes)")
    latest = CheckpointManager(root).latest()
    previous = step - args.save_every
    if latest is None or latest.step != previous:
        sys.exit(f"FAILED: after the kill latest() is {latest and latest.name}, expected step {previous}")
    print(f"      CheckpointManager(root).latest() -> {latest.name}: step {step} was never committed")


def compare(reference: dict[str, Any], resumed: dict[str, Any], total: int) -> bool:
    """Print a few steps side by side; True if every step after the resume point is identical."""
    expected = {r["step"]: r for r in reference["steps"]}
    got = {r["step"]: r for r in resumed["steps"]}
    start = resumed["resumed_from"]
    steps = range(start + 1, total + 1)
    # Whole records: loss, lr and loss scale, as floats, with ==: bit for bit.
    mismatched = [s for s in steps if got.get(s) != expected[s]]
    shown = sorted({start + 1, start + 2, (start + 1 + total) // 2, total})
    rows = [
        [s, repr(expected[s]["loss"]), repr(got[s]["loss"]) if s in got else "-", f"{expected[s]['lr']:.3e}",
         "NO" if s in mismatched else "yes"]
        for s in shown
    ]
    print(tabulate(rows, ["step", "reference loss", "resumed loss", "lr", "match"], disable_numparse=True))
    if mismatched:
        print(f"FAILED: {len(mismatched)} of {len(steps)} steps differ from the reference, "
              f"the first is step {mismatched[0]}")
        return False
    print(f"      steps {start + 1}-{total}: loss, lr and loss scale equal the reference bit for bit "
          f"({len(steps)} of {len(steps)} steps)")
    return True


def ckptkit_cli(*args: str) -> None:
    """Run a ckptkit command as a user would, and show its output."""
    print(f"$ ckptkit {' '.join(args)}")
    result = subprocess.run(
        [sys.executable, "-c", "from ckptkit.cli.main import main; main()", *args],
        capture_output=True, text=True,
    )
    print((result.stdout + result.stderr).rstrip())
    if result.returncode != 0:
        sys.exit(f"FAILED: ckptkit {args[0]} exited with {result.returncode}")


def run_demo(args: argparse.Namespace) -> None:
    root = Path(args.root).absolute()
    saves = args.steps // args.save_every
    crash_step = args.save_every * (saves // 2 + 1)  # a save in the middle of the run
    wipe(root)
    print(f"ckptkit demo: {args.steps} steps, a checkpoint every {args.save_every} under {root} "
          f"(keep_last={KEEP_LAST})")
    with tempfile.TemporaryDirectory() as logs:
        # Per-step logs of the three training runs; the killed one never gets to write its own.
        reference_log, killed_log, resumed_log = (
            Path(logs, f"{run}.json") for run in ("reference", "killed", "resumed")
        )

        print(f"[1/5] reference: {args.steps} steps without interruption, no checkpoints")
        reference = run_to_end(worker_command(args, reference_log, None), reference_log)
        print(f"      final loss {reference['steps'][-1]['loss']:.6f}")

        print(f"[2/5] crash: train with checkpoints; SIGKILL it while it writes step {crash_step}")
        crash(args, root, killed_log, crash_step)

        print("[3/5] resume: restart the training from the latest committed checkpoint")
        resumed = run_to_end(worker_command(args, resumed_log, root), resumed_log)
        print(f"      restored step {resumed['resumed_from']} (model, optimizer, scheduler, scaler, RNGs, "
              f"sampler) and trained to step {args.steps}")

        print("[4/5] compare with the reference")
        if not compare(reference, resumed, args.steps):
            sys.exit(1)

    print("[5/5] clean up and inspect")
    for command in (["gc", str(root), "--grace", "0"], ["ls", str(root)], ["verify", str(root)]):
        ckptkit_cli(*command)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n", 1)[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--root", help="checkpoint directory (wiped first)")
    parser.add_argument("--steps", type=int, default=120, help="training steps")
    parser.add_argument("--save-every", type=int, default=20, help="steps between checkpoints")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--log", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_worker(args)
        return
    if args.root is None:
        parser.error("--root is required")
    if args.save_every < 1 or args.steps < 2 * args.save_every:
        parser.error("--steps must allow at least two checkpoints (steps >= 2 * save-every)")
    run_demo(args)


if __name__ == "__main__":
    main()
