"""The real resumes that ``ckptkit plan``'s predictions are checked against (tests/test_plan_matrix.py).

Usage: ``python -m tests.plan_resume_worker TRIALS.json RESULTS.json``

One process runs every trial, so torch, transformers and DeepSpeed are imported once. A trial is
``{"id", "kind", ...}``:

- ``torch-load``: ``files``, ``weights_only``, ``safe_globals``: plain ``torch.load`` of each file
  with that ``weights_only``, inside ``ckptkit.safe_globals()`` when asked; ok when all load;
- ``hf-resume``: ``run_dir``, ``checkpoint``, ``world``: a copy of the HF run resumed for one step
  with ``Trainer.train(resume_from_checkpoint=...)`` at ``world`` ranks (gloo, forked); ok when
  every rank reaches the next step.

RESULTS.json maps each id to ``{"ok": bool, "error": str | None}``. The DeepSpeed engine loads
run in tests/fixtures/gen_reshard.py's ``--load`` harness instead.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from tests.fixtures._common import free_port
from tests.fixtures.gen_deepspeed import rank_environment
from tests.fixtures.gen_hf import OFFLINE_ENV, VOCAB, _dataset

HF_RESUME_TIMEOUT_S = 120


def _torch_load(trial: dict[str, Any]) -> str | None:
    import contextlib

    import torch

    import ckptkit

    for file in trial["files"]:
        scope = ckptkit.safe_globals() if trial["safe_globals"] else contextlib.nullcontext()
        try:
            with scope:
                torch.load(file, map_location="cpu", weights_only=trial["weights_only"])
        except Exception as exc:
            return f"{Path(file).name}: {type(exc).__name__}: {str(exc)[:300]}"
    return None


def _hf_rank(rank: int, world: int, port: int, run_dir: str, checkpoint: str) -> None:
    """One rank of the resumed HF run: the model, data and arguments of tests/fixtures/gen_hf.py."""
    if world > 1:
        os.environ.update(rank_environment(rank, world, port))
    import torch
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    torch.set_num_threads(1)
    step = json.loads((Path(checkpoint) / "trainer_state.json").read_text())["global_step"]
    config = GPT2Config(
        n_layer=2, n_head=2, n_embd=32, vocab_size=VOCAB, n_positions=64,
        bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1,
    )
    transformers.set_seed(0)
    args = TrainingArguments(
        output_dir=run_dir, max_steps=step + 1, save_strategy="no", lr_scheduler_type="cosine",
        warmup_steps=3, logging_steps=1, report_to=[], use_cpu=True, seed=0,
        per_device_train_batch_size=4, learning_rate=5e-4, weight_decay=0.01,
        dataloader_num_workers=0, disable_tqdm=True, ddp_backend="gloo" if world > 1 else None,
    )
    trainer = Trainer(model=GPT2LMHeadModel(config), args=args, train_dataset=_dataset())
    trainer.train(resume_from_checkpoint=checkpoint)
    if trainer.state.global_step != step + 1:
        raise RuntimeError(f"resumed at {trainer.state.global_step - 1}, not {step}")


def _hf_rank_main(rank: int, world: int, port: int, run_dir: str, checkpoint: str, out: str) -> None:
    error = None
    try:
        _hf_rank(rank, world, port, run_dir, checkpoint)
    except Exception as exc:
        error = f"rank {rank}: {type(exc).__name__}: {str(exc)[:300]}"
    Path(f"{out}.rank{rank}").write_text(json.dumps(error))
    sys.stdout.flush()
    os._exit(0)  # leave without the process group's teardown, which a failed peer could hang


def _hf_resume(trial: dict[str, Any]) -> str | None:
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        shutil.copytree(trial["run_dir"], run_dir)  # the session's checkpoints are shared
        checkpoint = str(run_dir / trial["checkpoint"])
        out, world, port = str(Path(tmp) / "result"), trial["world"], free_port()
        ctx = multiprocessing.get_context("fork")
        procs = [
            ctx.Process(target=_hf_rank_main, args=(r, world, port, str(run_dir), checkpoint, out))
            for r in range(world)
        ]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(HF_RESUME_TIMEOUT_S)
            if proc.is_alive():
                proc.kill()
                proc.join()
        errors = []
        for rank in range(world):
            path = Path(f"{out}.rank{rank}")
            errors.append(json.loads(path.read_text()) if path.exists() else f"rank {rank}: died")
        return "; ".join(e for e in errors if e) or None


def main(argv: list[str]) -> int:
    os.environ.update(OFFLINE_ENV)
    trials = json.loads(Path(argv[0]).read_text())
    import transformers  # noqa: F401  (once, before any fork)

    results = {}
    for trial in trials:
        run = _torch_load if trial["kind"] == "torch-load" else _hf_resume
        error = run(trial)
        results[trial["id"]] = {"ok": error is None, "error": error}
    Path(argv[1]).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
