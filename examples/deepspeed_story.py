"""A DeepSpeed run dies in the middle of a save; check the checkpoint, then resume it exactly.

The story of docs/deepspeed.md, run for real: a 2-rank ZeRO-2 fp16 run (dynamic loss scale,
WarmupDecayLR, so the LR and the scale change as it trains) saves every few steps through
ckptkit's DeepSpeed checkpoint engine, on CPU, in well under a minute:

1. reference: the whole run, uninterrupted, logging each step's LR, loss scale and loss (rank 0's).
2. crash:     the same run saving to ``--root``, SIGKILLed (every rank, as a scheduler or the OOM
              killer would) while it saves a checkpoint: the half-written save is never committed.
3. check:     ``ckptkit ls``, ``ckptkit verify`` and ``ckptkit inspect`` (LR scheduler, loss
              scaler, resume check) on the last committed checkpoint, and why plain
              ``torch.load(weights_only=True)`` refuses DeepSpeed's optimizer files.
4. resume:    fresh ranks load the last committed checkpoint through ckptkit (every file checked
              against its digest and read with ``weights_only=True``, which is forced on for the
              whole process) and train to the end.
5. compare:   each step after the resume has the reference's LR, loss scale and loss, bit for bit;
              the script exits 1 if not.

Run it with ``python examples/deepspeed_story.py --root runs/ds-story`` (an empty or new directory).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _ds_launch import join_ranks, prepare, run_ranks, start_ranks

WORLD = 2
TOTAL_STEPS = 12
SAVE_EVERY = 3
KILL_STEP = 9  # the save of global_step9 is the one the kill interrupts
VOCAB, HIDDEN, MICRO_BATCH, SEQ = 16, 24, 4, 6
SEED = 1234
MANIFEST = "ckptkit-manifest.json"


def ds_config() -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "steps_per_print": 10_000,
        "zero_optimization": {"stage": 2},
        # torch_adam: DeepSpeed's own CPU Adam would first be compiled with g++ (about 90 s).
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.01, "torch_adam": True}},
        # Dynamic loss scale with a short window, so the scale doubles every 2 clean steps.
        "fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 8, "loss_scale_window": 2},
        "scheduler": {
            "type": "WarmupDecayLR",
            "params": {
                "warmup_min_lr": 0.0,
                "warmup_max_lr": 1e-2,
                "warmup_num_steps": 4,
                "warmup_type": "linear",
                "total_num_steps": TOTAL_STEPS + 4,
            },
        },
    }


# --- one rank of a training run --------------------------------------------------------------


@dataclass(frozen=True)
class RunPlan:
    """What one training run does; every rank gets the same plan."""

    log: str  # rank 0 appends one JSON line per step here
    root: str | None = None  # ckptkit root to save to (None: no checkpoints)
    resume: bool = False  # load the last committed checkpoint first
    pause_in_save_of: str | None = None  # tag whose save holds rank 1 until the job is killed


def train_rank(rank: int, plan: RunPlan, in_save: Any = None) -> None:
    import deepspeed
    import torch
    from torch import nn

    from ckptkit.integrations.deepspeed import load_checkpoint, save_checkpoint, use_ckptkit

    quiet_known_noise()
    torch.manual_seed(SEED)  # the same initial weights on every rank
    model = nn.Sequential(
        nn.Embedding(VOCAB, HIDDEN), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, VOCAB)
    )
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config())
    if plan.root is not None:
        checkpoint_engine = use_ckptkit(engine, plan.root)
        if plan.pause_in_save_of is not None:
            _pause_inside_save(checkpoint_engine, plan.pause_in_save_of, rank, in_save)
    if plan.resume:
        url, client_state = load_checkpoint(engine)
        if rank == 0:
            print(
                f"      rank 0 loaded {url}: global_steps={engine.global_steps}, "
                f"client_state['step']={client_state['step']}"
            )

    while engine.global_steps < TOTAL_STEPS:
        step = engine.global_steps + 1
        # Read before the step: the LR and loss scale this step uses, restored from the checkpoint
        # for the first step after a resume.
        lr, scale = engine.get_lr()[0], engine.optimizer.loss_scaler.cur_scale
        ids, labels = _batch(rank, step)
        loss = nn.functional.cross_entropy(engine(ids).float().view(-1, VOCAB), labels.view(-1))
        engine.backward(loss)
        engine.step()
        if rank == 0:
            with open(plan.log, "a") as log:
                log.write(json.dumps({"step": step, "lr": lr, "scale": scale, "loss": loss.item()}) + "\n")
        if plan.root is not None and engine.global_steps % SAVE_EVERY == 0:
            save_checkpoint(engine, client_state={"step": engine.global_steps})


def quiet_known_noise() -> None:
    """Keep the demo readable: DeepSpeed's harmless "get learning rate before the scheduler has
    started" warning, and torch's deprecation notice for a collective DeepSpeed calls."""
    import warnings

    from deepspeed.utils import logger

    logger.setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor", category=FutureWarning)


def _batch(rank: int, step: int) -> tuple[Any, Any]:
    """Data depends on (rank, step) only, so a resumed run sees what the uninterrupted one saw."""
    import torch

    generator = torch.Generator().manual_seed(10_000 * rank + step)
    ids = torch.randint(0, VOCAB, (MICRO_BATCH, SEQ), generator=generator)
    return ids, torch.randint(0, VOCAB, (MICRO_BATCH, SEQ), generator=generator)


def _pause_inside_save(checkpoint_engine: Any, tag: str, rank: int, in_save: Any) -> None:
    """Make the kill land inside the save of ``tag``, every time: each rank reports once its optimizer
    file is written; rank 1 then waits for the kill, so rank 0 waits for it at the commit barrier.
    A real kill lands anywhere; what ckptkit leaves behind (nothing committed) is the same."""
    plain_save = checkpoint_engine.save

    def save(state_dict: Any, path: str) -> None:
        plain_save(state_dict, path)
        if os.path.basename(os.path.dirname(path)) == tag and "optim_states" in path:
            in_save.put(rank)
            if rank == 1:
                time.sleep(600)

    checkpoint_engine.save = save


# --- the story, in the parent process --------------------------------------------------------


def read_log(path: Path) -> dict[int, dict[str, float]]:
    return {row["step"]: row for row in map(json.loads, path.read_text().splitlines())}


def run_and_kill_in_save(plan: RunPlan) -> list[int | None]:
    """Start the ranks, wait until both are inside the save of ``plan.pause_in_save_of``, SIGKILL them."""
    import multiprocessing

    in_save = multiprocessing.get_context("fork").Queue()
    ranks = start_ranks(train_rank, (plan, in_save), WORLD)
    inside = 0
    deadline = time.monotonic() + 120
    while inside < WORLD:
        try:
            in_save.get(timeout=0.5)
            inside += 1
        except queue.Empty:
            if time.monotonic() > deadline or any(not r.is_alive() for r in ranks):
                join_ranks(ranks, timeout_s=1)
                sys.exit(f"FAILED: a rank ended before the save of {plan.pause_in_save_of}")
    for process in ranks:
        process.kill()  # SIGKILL: no handler, no cleanup, as when a job is preempted
    return join_ranks(ranks)


def show_root(root: Path) -> None:
    """What is on disk, as `ls -a` would show it (ordered by step)."""

    def by_step(entry: Path) -> tuple[int, str]:
        found = re.search(r"global_step(\d+)", entry.name)
        return (int(found.group(1)) if found else sys.maxsize, entry.name)

    for entry in sorted(root.iterdir(), key=by_step):
        if entry.is_file():
            print(f"      {entry.name:<44} -> {entry.read_text()}")
            continue
        files = sorted(p.name for p in entry.iterdir() if p.is_file() and p.name != MANIFEST)
        state = "committed" if (entry / MANIFEST).is_file() else "NOT committed: no manifest"
        print(f"      {entry.name + '/':<44} {len(files)} rank files, {state}")


def ckptkit_cli(*args: str, expect: int = 0) -> str:
    """Run a ckptkit command the way a user would, show its output and check its exit code."""
    print(f"\n$ ckptkit {' '.join(args)}")
    result = subprocess.run([sys.executable, "-m", "ckptkit", *args], capture_output=True, text=True)
    output = (result.stdout + result.stderr).rstrip()
    print(output)
    if result.returncode != expect:
        sys.exit(f"FAILED: ckptkit {args[0]} exited with {result.returncode}, expected {expect}")
    return output


def check_inspected_values(checkpoint: Path, expected: dict[str, float], step: int) -> None:
    """What ``inspect`` read (symbolically: no tensor loaded, nothing unpickled) is what step ``step``
    of the uninterrupted run used: the LR in the optimizer's param group and each rank's loss scale."""
    from ckptkit import inspect_path

    report = inspect_path(checkpoint).to_json()
    lr = report["zero"]["optimizer"]["groups"][0]["lr"]
    scales = sorted({scaler["scale"] for scaler in report["scalers"]})
    print(
        f"\n      inspect read: LR {lr:.9g}, loss scale {', '.join(f'{s:g}' for s in scales)}, "
        f"resume check {'OK' if report['resume']['ok'] else 'DISAGREEMENT'}; the uninterrupted run "
        f"used LR {expected['lr']:.9g} and loss scale {expected['scale']:g} at step {step}"
    )
    if not (report["resume"]["ok"] and lr == expected["lr"] and scales == [expected["scale"]]):
        sys.exit("FAILED: the checkpoint does not hold what the uninterrupted run used next")


def show_weights_only_refusal(optim_file: Path) -> None:
    """torch's own safe loading on a DeepSpeed optimizer file, without ckptkit."""
    import pickle

    import torch

    try:
        torch.load(optim_file, weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = next((ln for ln in str(exc).splitlines() if "Unsupported global" in ln), str(exc))
        print(f"      refused: {reason.split(' was not an allowed global')[0].strip()}")
    else:
        sys.exit("FAILED: torch.load(weights_only=True) accepted a DeepSpeed optimizer file")


def compare(reference: dict[int, dict[str, float]], resumed: dict[int, dict[str, float]], first: int) -> bool:
    from tabulate import tabulate

    rows, differing = [], []
    for step in range(first, TOTAL_STEPS + 1):
        want, got = reference[step], resumed[step]
        same = all(want[k] == got[k] for k in ("lr", "scale", "loss"))  # exact float equality
        if not same:
            differing.append(step)
        rows.append(
            [step, want["lr"], got["lr"], want["scale"], got["scale"], want["loss"], got["loss"], same]
        )
    headers = [
        "step",
        *(f"{q} ({run})" for q in ("lr", "scale", "loss") for run in ("ref", "resumed")),
        "equal",
    ]
    print(tabulate(rows, headers=headers, floatfmt=".9g"))
    if differing:
        print(f"FAILED: steps {differing} differ from the uninterrupted run")
        return False
    print(f"OK: steps {first}-{TOTAL_STEPS}: LR, loss scale and loss equal the uninterrupted run bit for bit")
    return True


def story(root: Path, logs: Path) -> None:
    from ckptkit.integrations.deepspeed import resolve_tag
    from ckptkit.storage import open_store

    reference_log, crash_log, resumed_log = (logs / f"{name}.jsonl" for name in ("ref", "crash", "resumed"))
    kill_tag = f"global_step{KILL_STEP}"
    print(
        f"DeepSpeed ZeRO-2, fp16 (dynamic loss scale), WarmupDecayLR, {WORLD} ranks on CPU, "
        f"{TOTAL_STEPS} steps, a checkpoint every {SAVE_EVERY}"
    )

    print(f"\n[1/5] reference: {TOTAL_STEPS} steps, uninterrupted, no checkpoints")
    codes = run_ranks(train_rank, (RunPlan(str(reference_log)),), WORLD)
    if codes != [0] * WORLD:
        sys.exit(f"FAILED: the reference run's ranks exited with {codes}")
    reference = read_log(reference_log)
    print(
        f"      loss {reference[1]['loss']:.4f} -> {reference[TOTAL_STEPS]['loss']:.4f}, "
        f"loss scale {reference[1]['scale']:g} -> {reference[TOTAL_STEPS]['scale']:g}"
    )

    print(f"\n[2/5] crash: train, saving to {root}; SIGKILL every rank inside the save of {kill_tag}")
    codes = run_and_kill_in_save(RunPlan(str(crash_log), root=str(root), pause_in_save_of=kill_tag))
    print(
        f"      killed at step {max(read_log(crash_log))} (rank exit codes {codes}): both ranks had written "
        f"their files of {kill_tag},\n      rank 0 was waiting at the commit barrier. On disk:"
    )
    show_root(root)

    print("\n[3/5] check before resuming")
    last = resolve_tag(open_store(root))  # `latest`, trusted only if it names a committed checkpoint
    if last is None:
        sys.exit("FAILED: no committed checkpoint survived the crash")
    resume_step = int(last.removeprefix("global_step")) + 1
    print(f"      last committed checkpoint: {last}")
    ckptkit_cli("ls", str(root))
    ckptkit_cli("verify", str(root / last))
    ckptkit_cli("inspect", "--all", str(root / last))
    check_inspected_values(root / last, reference[resume_step], resume_step)
    ckptkit_cli("doctor", str(root / last))
    optim_file = next((root / last).glob("zero_pp_rank_0_*optim_states.pt"))
    print(f"\n      torch.load('{last}/{optim_file.name}', weights_only=True) without ckptkit:")
    show_weights_only_refusal(optim_file)

    resume_step = int(last.removeprefix("global_step")) + 1
    print(
        f"\n[4/5] resume: fresh ranks load {last} through ckptkit, TORCH_FORCE_WEIGHTS_ONLY_LOAD=1, "
        f"train steps {resume_step}-{TOTAL_STEPS}"
    )
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"  # any torch.load in the ranks is weights-only
    try:
        codes = run_ranks(train_rank, (RunPlan(str(resumed_log), root=str(root), resume=True),), WORLD)
    finally:
        del os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"]
    if codes != [0] * WORLD:
        sys.exit(f"FAILED: the resumed run's ranks exited with {codes}")

    print(f"\n[5/5] compare steps {resume_step}-{TOTAL_STEPS} with the uninterrupted run")
    if not compare(reference, read_log(resumed_log), resume_step):
        sys.exit(1)
    print("\nroot at the end (the killed save's staging directory is left for 'ckptkit gc'):")
    show_root(root)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--root", required=True, help="checkpoint root: a new or empty directory")
    args = parser.parse_args()
    root = Path(args.root).absolute()
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        parser.error(f"--root {root} must be a new or empty directory")
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    prepare()
    with tempfile.TemporaryDirectory(prefix="ds-story-logs-") as logs:
        story(root, Path(logs))
    print(f"\ndone in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
