"""An HF Trainer run is killed in the middle of a save; resume it from the last committed checkpoint.

The story of docs/guides/hf-trainer.md, run for real on CPU with a tiny GPT-2 built from a config
(nothing is downloaded), in well under a minute:

1. crash:  a Trainer with ``CkptkitCallback`` (keep the 2 newest checkpoints and the best by
           ``eval_loss``) saves every 2 steps; the process is SIGKILLed while it writes
           ``checkpoint-8``. (The worker stalls inside that save, after the model and optimizer
           and before the trainer state, so that the kill lands mid-save every time.)
2. look:   HF's ``get_last_checkpoint`` picks the half-written ``checkpoint-8``;
           ``latest_committed_checkpoint`` picks ``checkpoint-6``, the newest with a manifest.
3. resume: a new Trainer resumes from it and trains to step 10. Retention left the two newest
           checkpoints (the best by ``eval_loss`` is among them); each verifies against its manifest,
           which also records the metrics the Trainer logged at that step.

Run it with ``python examples/hf_trainer.py --root runs/hf`` (an empty or new directory). The same
file is also the training process (``--worker``) that the example starts and kills. Exit status:
0 when the resumed run reached the last step and every checkpoint left verifies, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.update(
    TRANSFORMERS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", DS_ACCELERATOR="cpu"
)

MAX_STEPS = 10
SAVE_STEPS = 2
KILL_AT = 8  # the save of checkpoint-8 is the one the kill interrupts
VOCAB, SEQ = 128, 16
STALL_MARKER = "worker-in-save"


def build_trainer(output_dir: Path, *, stall_at: int | None = None) -> Any:
    """The Trainer both processes run: only ``CkptkitCallback`` and ``save_total_limit=None``
    differ from a plain HF setup."""
    import torch
    import transformers
    from torch.utils.data import TensorDataset
    from transformers import GPT2Config, GPT2LMHeadModel, PrinterCallback, Trainer, TrainingArguments

    from ckptkit.integrations.hf import CkptkitCallback
    from ckptkit.retention import RetentionPolicy

    class Tokens(TensorDataset):
        def __getitem__(self, i: int) -> dict[str, Any]:
            (ids,) = super().__getitem__(i)
            return {"input_ids": ids, "labels": ids}

    class StallInSave(Trainer):
        """Stands in for a slow disk: hangs inside one save so the kill lands in the middle."""

        def _save_rng_state(self, output_dir: str) -> None:
            if self.state.global_step == stall_at:
                (Path(self.args.output_dir) / STALL_MARKER).touch()
                time.sleep(600)
            super()._save_rng_state(output_dir)

    torch.set_num_threads(1)  # a tiny model: more threads only add start-up cost
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    transformers.set_seed(0)
    ids = torch.randint(0, VOCAB, (64, SEQ), generator=torch.Generator().manual_seed(0))
    config = GPT2Config(
        n_layer=2,
        n_head=2,
        n_embd=32,
        vocab_size=VOCAB,
        n_positions=SEQ,
        bos_token_id=VOCAB - 1,
        eos_token_id=VOCAB - 1,  # GPT-2's 50256 is outside this vocab
    )
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=MAX_STEPS,
        save_steps=SAVE_STEPS,
        save_total_limit=None,  # retention is ckptkit's, after each commit
        eval_strategy="steps",
        eval_steps=SAVE_STEPS,
        logging_steps=1,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        use_cpu=True,
        seed=0,
        report_to=[],
        disable_tqdm=True,
    )
    callback = CkptkitCallback(retention=RetentionPolicy(keep_last=2, keep_best="eval_loss"))
    trainer = StallInSave(
        model=GPT2LMHeadModel(config),
        args=args,
        train_dataset=Tokens(ids),
        eval_dataset=Tokens(ids[:8]),
        callbacks=[callback],
    )
    trainer.remove_callback(PrinterCallback)  # this script prints its own summary
    return trainer


def crash(output_dir: Path) -> None:
    """Start the worker and SIGKILL it once it is inside the save of checkpoint-KILL_AT."""
    worker = subprocess.Popen(
        [sys.executable, __file__, "--worker", "--root", str(output_dir.parent)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    marker = output_dir / STALL_MARKER
    while not marker.exists():
        if worker.poll() is not None:
            sys.exit(
                f"the worker exited ({worker.returncode}) before the save it should die in:\n"
                + worker.stderr.read().decode()
            )  # type: ignore[union-attr]
        time.sleep(0.05)
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    worker.stderr.close()  # type: ignore[union-attr]
    marker.unlink()
    print(f"1. crash:  worker SIGKILLed while saving checkpoint-{KILL_AT}")


def show(output_dir: Path) -> str | None:
    """What each resume rule would pick; returns ckptkit's pick."""
    from transformers.trainer_utils import get_last_checkpoint

    from ckptkit.catalog import list_checkpoints
    from ckptkit.integrations.hf import latest_committed_checkpoint
    from ckptkit.storage import open_store

    for info in list_checkpoints(open_store(output_dir)):
        print(f"   {info.name:<14} {info.status}")
    hf_pick = get_last_checkpoint(str(output_dir))
    ours = latest_committed_checkpoint(output_dir)
    print(f"2. look:   HF get_last_checkpoint -> {Path(hf_pick).name if hf_pick else None} (has no manifest)")
    print(f"           latest_committed_checkpoint -> {Path(ours).name if ours else None}")
    return ours


def resume(output_dir: Path, checkpoint: str | None) -> bool:
    """Train to the end from ``checkpoint``; True when every checkpoint left verifies."""
    from ckptkit.catalog import list_checkpoints
    from ckptkit.ops.verify import verify_tree
    from ckptkit.storage import open_store

    trainer = build_trainer(output_dir)
    trainer.train(resume_from_checkpoint=checkpoint)
    step = trainer.state.global_step
    print(f"3. resume: from {Path(checkpoint).name if checkpoint else 'scratch'}, finished at step {step}")
    store = open_store(output_dir)
    reports = verify_tree(store)
    eval_losses = {c.name: c.manifest.metrics["eval_loss"] for c in list_checkpoints(store) if c.manifest}
    for report in reports:
        name = Path(report.url).name
        print(f"   {name:<14} verify {report.status:<6} eval_loss {eval_losses.get(name, float('nan')):.4f}")
    return step == MAX_STEPS and all(r.ok and r.status == "ok" for r in reports)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="an empty or new directory")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    output_dir = args.root / "output"
    if args.worker:
        build_trainer(output_dir, stall_at=KILL_AT).train()
        return 0
    if output_dir.exists() and any(output_dir.iterdir()):
        parser.error(f"{output_dir} is not empty; pass a new --root")
    crash(output_dir)
    ok = resume(output_dir, show(output_dir))
    print("ok" if ok else "FAILED: the resumed run did not finish with every checkpoint verified")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
