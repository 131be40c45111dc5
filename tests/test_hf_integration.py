"""The HF Trainer callback, on real ``transformers.Trainer`` runs of a tiny config-built GPT-2.

Each run saves every step; the kill test runs the Trainer in a subprocess (``python -m
tests.test_hf_integration CHILD_ARGS``) and SIGKILLs it inside a save.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ckptkit.catalog import list_checkpoints, read_manifest
from ckptkit.errors import NotCommittedError, VerificationError
from ckptkit.manifest import MANIFEST_NAME
from ckptkit.ops.verify import verify_checkpoint, verify_tree
from ckptkit.retention import RetentionPolicy
from ckptkit.storage import open_store
from tests.fixtures._common import REPO_ROOT
from tests.fixtures.gen_hf import OFFLINE_ENV, SEQ, VOCAB, _dataset

os.environ.update(OFFLINE_ENV)

# transformers reads OFFLINE_ENV when it is imported
from ckptkit.integrations.hf import (
    CkptkitCallback,
    apply_retention,
    latest_committed_checkpoint,
    metrics_at_step,
    verify_or_uncommit,
)

STEPS = 11  # saves checkpoint-9, -10 and -11: string order would put 9 last
BEST_STEP = 4
KILL_MAX_STEPS = 6
KILL_SAVE_STEPS = 2
KILL_AT = 4  # the save of checkpoint-4 is killed; checkpoint-2 is the last committed one
MARKER = "in-save.marker"


def tiny_gpt2() -> Any:
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    transformers.set_seed(0)
    config = GPT2Config(
        n_layer=1, n_head=2, n_embd=16, vocab_size=VOCAB, n_positions=SEQ,
        bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1,
    )
    return GPT2LMHeadModel(config)


def training_args(output_dir: Path, *, max_steps: int, save_steps: int, **overrides: Any) -> Any:
    from transformers import TrainingArguments

    options: dict[str, Any] = {
        "output_dir": str(output_dir), "max_steps": max_steps, "save_steps": save_steps,
        "save_total_limit": None, "logging_steps": 1, "report_to": [], "use_cpu": True, "seed": 0,
        "per_device_train_batch_size": 4, "learning_rate": 1e-3, "dataloader_num_workers": 0,
        "disable_tqdm": True,
    }
    return TrainingArguments(**{**options, **overrides})


def _eval_dataset() -> Any:
    from torch.utils.data import Subset

    return Subset(_dataset(), range(8))


def make_trainer(args: Any, callbacks: list[Any], **kwargs: Any) -> Any:
    import torch
    from transformers import Trainer

    torch.set_num_threads(1)  # a tiny model: thread start-up costs more than it saves
    return Trainer(model=tiny_gpt2(), args=args, train_dataset=_dataset(), callbacks=callbacks, **kwargs)


class VerifyEachSave:
    """Added after CkptkitCallback: sees every checkpoint right after it was committed."""

    def __init__(self) -> None:
        from transformers import TrainerCallback

        outer = self
        self.reports: dict[int, Any] = {}
        self.present: dict[int, list[str]] = {}

        class _Callback(TrainerCallback):
            def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                root = open_store(args.output_dir)
                name = f"checkpoint-{state.global_step}"
                outer.reports[state.global_step] = verify_checkpoint(root.child(name))
                outer.present[state.global_step] = sorted(root.list_dirs(""))

        self.callback = _Callback()


@dataclass
class Run:
    output_dir: Path
    trainer: Any
    seen: VerifyEachSave


@pytest.fixture(scope="module")
def all_kept(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """11 steps, a checkpoint and an evaluation at each, no retention."""
    out = tmp_path_factory.mktemp("hf-all") / "run"
    seen = VerifyEachSave()
    args = training_args(out, max_steps=STEPS, save_steps=1, eval_strategy="steps", eval_steps=1)
    trainer = make_trainer(args, [CkptkitCallback(), seen.callback], eval_dataset=_eval_dataset())
    trainer.train()
    return Run(out, trainer, seen)


@pytest.fixture(scope="module")
def retained(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """Like ``all_kept`` with keep_last=1 + keep_best on a metric whose best is at step 4, and
    ``load_best_model_at_end`` on the same metric (HF's save_total_limit=1 deletes all but one)."""
    out = tmp_path_factory.mktemp("hf-retained") / "run"
    seen = VerifyEachSave()
    holder: dict[str, Any] = {}

    def score(_prediction: Any) -> dict[str, float]:
        # Deterministic and peaked at BEST_STEP: neither the oldest nor the newest is best.
        return {"score": -float(abs(holder["trainer"].state.global_step - BEST_STEP))}

    args = training_args(
        out, max_steps=STEPS, save_steps=1, eval_strategy="steps", eval_steps=1,
        load_best_model_at_end=True, metric_for_best_model="score", greater_is_better=True,
    )
    policy = RetentionPolicy(keep_last=1, keep_best="eval_score", best_mode="max")
    callback = CkptkitCallback(retention=policy, verify="quick")
    trainer = make_trainer(
        args, [callback, seen.callback], eval_dataset=_eval_dataset(), compute_metrics=score
    )
    holder["trainer"] = trainer
    trainer.train()
    return Run(out, trainer, seen)


def _dirs(path: Path) -> set[str]:
    return {p.name for p in path.iterdir() if p.is_dir()}


def test_every_checkpoint_is_committed_and_verifies(all_kept: Run) -> None:
    assert _dirs(all_kept.output_dir) == {f"checkpoint-{n}" for n in range(1, STEPS + 1)}
    assert sorted(all_kept.seen.reports) == list(range(1, STEPS + 1))
    for step, report in all_kept.seen.reports.items():
        assert report.ok and report.status == "ok" and not report.quick, (step, report.findings)
        assert report.step == step and report.layout == "hf-trainer"
    reports = verify_tree(open_store(all_kept.output_dir))  # and still intact after training
    assert [r.status for r in reports] == ["ok"] * STEPS


def test_manifest_records_trainer_files_and_metrics(all_kept: Run) -> None:
    manifest = read_manifest(open_store(all_kept.output_dir / "checkpoint-7"))
    paths = {f.path for f in manifest.files}
    written = {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"}
    assert written <= paths
    assert manifest.step == 7 and manifest.metadata["producer"] == "ckptkit.integrations.hf"
    logged = [h for h in all_kept.trainer.state.log_history if h.get("step") == 7]
    eval_loss = next(h["eval_loss"] for h in logged if "eval_loss" in h)
    train_loss = next(h["loss"] for h in logged if "loss" in h)
    assert manifest.metrics["eval_loss"] == pytest.approx(eval_loss)
    assert manifest.metrics["loss"] == pytest.approx(train_loss)
    assert "step" not in manifest.metrics


def test_metrics_at_step_takes_only_that_steps_finite_numbers() -> None:
    history = [
        {"loss": 2.0, "step": 3},
        {"loss": 1.5, "learning_rate": 1e-3, "step": 4, "note": "text", "flag": True},
        {"eval_loss": 1.4, "eval_nan": float("nan"), "step": 4},
    ]
    assert metrics_at_step(history, 4) == {"loss": 1.5, "learning_rate": 1e-3, "eval_loss": 1.4}
    assert metrics_at_step(history, 5) == {}


def test_latest_committed_orders_steps_numerically(all_kept: Run) -> None:
    assert latest_committed_checkpoint(all_kept.output_dir) == str(all_kept.output_dir / "checkpoint-11")


def test_retention_orders_checkpoint_10_after_9(all_kept: Run, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(all_kept.output_dir, run)
    deleted = apply_retention(open_store(run), RetentionPolicy(keep_last=2))
    assert deleted == [f"checkpoint-{n}" for n in range(1, 10)]
    assert _dirs(run) == {"checkpoint-10", "checkpoint-11"}


def test_retention_keeps_exactly_the_newest_and_the_best(retained: Run) -> None:
    best = retained.output_dir / f"checkpoint-{BEST_STEP}"
    assert retained.trainer.state.best_model_checkpoint == str(best)
    assert _dirs(retained.output_dir) == {f"checkpoint-{BEST_STEP}", f"checkpoint-{STEPS}"}
    # After each save: the new checkpoint committed and verified, and retention already ran.
    for step, present in retained.seen.present.items():
        assert retained.seen.reports[step].ok
        # Up to BEST_STEP the best so far is the newest, so exactly one is left.
        assert set(present) == {f"checkpoint-{step}", f"checkpoint-{min(step, BEST_STEP)}"}, step
    infos = list_checkpoints(open_store(retained.output_dir))
    assert [(c.name, c.status) for c in infos] == [
        (f"checkpoint-{BEST_STEP}", "committed"), (f"checkpoint-{STEPS}", "committed")
    ]
    assert infos[0].manifest is not None and infos[0].manifest.metrics["eval_score"] == 0.0


def test_retention_keeps_what_it_is_told_to_keep(all_kept: Run, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(all_kept.output_dir, run)
    deleted = apply_retention(open_store(run), RetentionPolicy(keep_last=1), keep={"checkpoint-3"})
    assert "checkpoint-3" not in deleted and len(deleted) == STEPS - 2
    assert _dirs(run) == {"checkpoint-3", "checkpoint-11"}


def test_retention_spares_the_best_and_the_one_just_saved(all_kept: Run, tmp_path: Path) -> None:
    """The Trainer's best_model_checkpoint survives a policy that knows no metric, and after a
    resume from checkpoint-5 the new checkpoint-6 survives the abandoned run's later ones."""
    from transformers import TrainerControl, TrainerState

    run = tmp_path / "run"
    shutil.copytree(all_kept.output_dir, run)
    seen: list[str] = []

    class Recording(CkptkitCallback):
        def _on_deleted(self, name: str) -> None:
            seen.append(name)

    callback = Recording(retention=RetentionPolicy(keep_last=1))
    args = training_args(run, max_steps=STEPS, save_steps=1)
    control = TrainerControl(should_save=True)
    callback.on_step_end(args, TrainerState(global_step=6), control)  # clears the abandoned checkpoint-6
    shutil.copytree(all_kept.output_dir / "checkpoint-6", run / "checkpoint-6", ignore=_no_manifest)
    state = TrainerState(global_step=6, best_model_checkpoint=str(run / "checkpoint-2"))
    callback.on_save(args, state, control)
    assert _dirs(run) == {"checkpoint-2", "checkpoint-6", "checkpoint-11"}
    # The abandoned run's committed checkpoint-6 first (so a mirror drops its copy too), then retention.
    assert seen == [f"checkpoint-{n}" for n in (6, 1, 3, 4, 5, 7, 8, 9, 10)]


def _no_manifest(_directory: str, names: list[str]) -> list[str]:
    return [n for n in names if n == MANIFEST_NAME]


def test_latest_committed_skips_one_that_fails_verification(all_kept: Run, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(all_kept.output_dir, run)
    with open(run / "checkpoint-11" / "optimizer.pt", "r+b") as f:
        f.truncate(100)
    (run / "checkpoint-10" / MANIFEST_NAME).unlink()  # a save killed before its commit
    assert latest_committed_checkpoint(run) == str(run / "checkpoint-9")
    assert latest_committed_checkpoint(tmp_path / "missing") is None


def test_a_checkpoint_that_changed_while_committed_is_uncommitted(all_kept: Run, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(all_kept.output_dir, run)
    checkpoint = open_store(run / "checkpoint-5")
    assert verify_or_uncommit(checkpoint).ok
    with open(run / "checkpoint-5" / "scheduler.pt", "r+b") as f:
        f.write(b"\0")  # same size: only a full verify sees it
    assert verify_or_uncommit(checkpoint, quick=True).ok
    with pytest.raises(VerificationError, match=r"scheduler\.pt") as caught:
        verify_or_uncommit(checkpoint)
    assert "uncommitted" in str(caught.value) and caught.value.findings
    with pytest.raises(NotCommittedError):
        read_manifest(checkpoint)
    assert latest_committed_checkpoint(run) == str(run / "checkpoint-11")  # the others are untouched


def test_save_target_is_cleared_before_the_trainer_writes(
    all_kept: Run, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """After a resume from checkpoint-3, the next save goes to checkpoint-4, which the abandoned
    run committed: it is removed (uncommitted first) so that old and new files never mix."""
    from transformers import TrainerControl, TrainerState

    run = tmp_path / "run"
    shutil.copytree(all_kept.output_dir, run)
    args = training_args(run, max_steps=STEPS, save_steps=1)
    callback = CkptkitCallback()
    callback.on_step_end(args, TrainerState(global_step=4), TrainerControl(should_save=False))
    assert (run / "checkpoint-4").is_dir()
    with caplog.at_level(logging.WARNING, logger="ckptkit.integrations.hf"):
        callback.on_step_end(args, TrainerState(global_step=4), TrainerControl(should_save=True))
    assert not (run / "checkpoint-4").exists()
    assert any("replacing committed" in r.getMessage() for r in caplog.records)
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # no trash left behind


def test_only_world_process_zero_commits(tmp_path: Path) -> None:
    from transformers import TrainerControl, TrainerState

    checkpoint = tmp_path / "checkpoint-5"
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 5}))
    args = training_args(tmp_path, max_steps=5, save_steps=5)
    callback = CkptkitCallback()
    callback.on_save(args, TrainerState(global_step=5, is_world_process_zero=False), TrainerControl())
    assert not (checkpoint / MANIFEST_NAME).exists()
    callback.on_save(args, TrainerState(global_step=5, is_world_process_zero=True), TrainerControl())
    assert read_manifest(open_store(checkpoint)).step == 5


def test_warns_once_when_save_total_limit_is_set(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from transformers import TrainerControl, TrainerState

    callback = CkptkitCallback(retention=RetentionPolicy(keep_last=2))
    with caplog.at_level(logging.WARNING, logger="ckptkit.integrations.hf"):
        for _ in range(2):
            callback.on_train_begin(
                training_args(tmp_path, max_steps=1, save_steps=1, save_total_limit=2),
                TrainerState(), TrainerControl(),
            )
    warnings = [r for r in caplog.records if "save_total_limit" in r.getMessage()]
    assert len(warnings) == 1 and "save_total_limit=None" in warnings[0].getMessage()


def test_rejects_an_unknown_verify_mode() -> None:
    with pytest.raises(ValueError, match="verify must be"):
        CkptkitCallback(verify="sometimes")  # type: ignore[arg-type]


# --- a save killed midway, then resumed ------------------------------------------------------


@pytest.mark.slow  # a Trainer in a child process, SIGKILLed, then resumed
def test_kill_during_save_then_resume_from_last_committed(tmp_path: Path) -> None:
    from transformers.trainer_utils import get_last_checkpoint

    out = tmp_path / "run"
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.test_hf_integration", str(out)],
        cwd=REPO_ROOT, env={**os.environ, **OFFLINE_ENV},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        marker = out / MARKER
        deadline = time.monotonic() + 120
        while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marker.exists(), child.communicate(timeout=5)[0].decode() if child.poll() is not None else ""
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    marker.unlink()

    broken = out / f"checkpoint-{KILL_AT}"
    assert (broken / "model.safetensors").exists() and not (broken / "trainer_state.json").exists()
    assert not (broken / MANIFEST_NAME).exists()
    (broken / "stray-from-the-killed-save.bin").write_bytes(b"x" * 100)
    # The bug fixed: HF picks the newest directory by name, half-written or not.
    assert get_last_checkpoint(str(out)) == str(broken)
    resume_from = latest_committed_checkpoint(out)
    assert resume_from == str(out / f"checkpoint-{KILL_AT - KILL_SAVE_STEPS}")

    args = training_args(out, max_steps=KILL_MAX_STEPS, save_steps=KILL_SAVE_STEPS)
    trainer = make_trainer(args, [CkptkitCallback(attest=True)])  # AttestationError unless all restored
    trainer.train(resume_from_checkpoint=resume_from)
    lineage = read_manifest(open_store(out / f"checkpoint-{KILL_AT}")).metadata["lineage"]
    assert lineage["parent"]["checkpoint_id"] == read_manifest(open_store(resume_from)).checkpoint_id
    assert lineage["data"]["global_step"] == KILL_AT and lineage["config_digest"].startswith("blake3:")

    assert trainer.state.global_step == KILL_MAX_STEPS
    # Steps 1-2 come from the resumed state, 3-6 were trained after the resume: none twice.
    assert [h["step"] for h in trainer.state.log_history if "loss" in h] == list(range(1, KILL_MAX_STEPS + 1))
    reports = verify_tree(open_store(out))
    assert [(Path(r.url).name, r.status) for r in reports] == [
        (f"checkpoint-{s}", "ok") for s in range(KILL_SAVE_STEPS, KILL_MAX_STEPS + 1, KILL_SAVE_STEPS)
    ]
    # The killed save's directory was cleared and written afresh by the resumed run.
    state = json.loads((broken / "trainer_state.json").read_text())
    assert state["global_step"] == KILL_AT
    assert not (broken / "stray-from-the-killed-save.bin").exists()
    assert not any(f.findings for f in reports)


def _child_main(out: Path) -> None:
    """Train with the callback and hang inside the save of checkpoint-KILL_AT, after the model,
    optimizer and scheduler were written and before the RNG and trainer state."""
    from transformers import Trainer

    class HangInSave(Trainer):
        def _save_rng_state(self, output_dir: str) -> None:
            if self.state.global_step == KILL_AT:
                (out / MARKER).write_text(output_dir)
                time.sleep(600)
            super()._save_rng_state(output_dir)

    import torch

    torch.set_num_threads(1)
    args = training_args(out, max_steps=KILL_MAX_STEPS, save_steps=KILL_SAVE_STEPS)
    HangInSave(model=tiny_gpt2(), args=args, train_dataset=_dataset(), callbacks=[CkptkitCallback()]).train()


if __name__ == "__main__":
    _child_main(Path(sys.argv[1]))


@pytest.mark.slow  # a Trainer run mirrored to moto S3
def test_mirror_to_s3_ends_with_the_retained_checkpoints(tmp_path: Path, s3_bucket: str) -> None:
    from ckptkit.catalog import list_checkpoints

    remote = f"{s3_bucket}/hf-run"
    callback = CkptkitCallback(retention=RetentionPolicy(keep_last=2), verify="quick", mirror=remote)
    args = training_args(tmp_path / "run", max_steps=6, save_steps=2)
    make_trainer(args, [callback]).train()

    local = {c.name: c.manifest for c in list_checkpoints(open_store(tmp_path / "run")) if c.committed}
    mirrored = {c.name: c.manifest for c in list_checkpoints(open_store(remote)) if c.committed}
    assert set(local) == set(mirrored) == {"checkpoint-4", "checkpoint-6"}
    for name, manifest in mirrored.items():
        assert manifest.checkpoint_id == local[name].checkpoint_id
        assert verify_checkpoint(open_store(remote).child(name)).ok
    assert callback.mirror is None  # closed at the end of training, with nothing failed


# --- non-blocking commits ---------------------------------------------------------------------


@pytest.mark.slow  # a Trainer run whose commits each take 0.2 s more in the background
def test_non_blocking_commits_run_behind_training_and_end_committed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each commit sleeps 0.2 s in the background first, so it is still in flight when the next
    callback looks; train() returns with every checkpoint committed and retention applied."""
    from ckptkit.integrations import hf

    commit = hf.commit_hf_checkpoint

    def slow_commit(*args: Any, **kwargs: Any) -> Any:
        time.sleep(0.2)
        return commit(*args, **kwargs)

    monkeypatch.setattr(hf, "commit_hf_checkpoint", slow_commit)
    out = tmp_path / "run"
    seen = VerifyEachSave()
    callback = CkptkitCallback(retention=RetentionPolicy(keep_last=2), blocking=False)
    make_trainer(training_args(out, max_steps=4, save_steps=1), [callback, seen.callback]).train()

    # Training went on before each commit: the callback after ours saw no manifest yet.
    assert [seen.reports[step].status for step in (1, 2, 3, 4)] == ["not-committed"] * 4
    # on_train_end waited for the last commit, and retention ran behind each one.
    assert callback.last_handle is not None and callback.last_handle.done()
    assert _dirs(out) == {"checkpoint-3", "checkpoint-4"}
    for name in ("checkpoint-3", "checkpoint-4"):
        manifest = read_manifest(open_store(out / name))
        assert manifest.step == int(name.split("-")[1]) and manifest.metadata["producer"] == hf.PRODUCER
        assert verify_checkpoint(open_store(out / name)).status == "ok"
    assert latest_committed_checkpoint(out) == str(out / "checkpoint-4")


def test_non_blocking_commit_failure_is_raised_at_the_next_save_and_at_train_end(tmp_path: Path) -> None:
    from transformers import TrainerControl, TrainerState

    from ckptkit.errors import NotFoundError

    (tmp_path / "checkpoint-5").mkdir()  # the Trainer wrote nothing: the commit fails
    args = training_args(tmp_path, max_steps=6, save_steps=1)
    callback = CkptkitCallback(blocking=False)
    callback.on_save(args, TrainerState(global_step=5, is_world_process_zero=True), TrainerControl())
    with pytest.raises(NotFoundError, match="checkpoint-5: the Trainer wrote no files"):
        callback.on_step_end(args, TrainerState(global_step=6), TrainerControl(should_save=True))

    (tmp_path / "checkpoint-7").mkdir()
    callback.on_save(args, TrainerState(global_step=7, is_world_process_zero=True), TrainerControl())
    with pytest.raises(NotFoundError, match="checkpoint-7"):
        callback.on_train_end(args, TrainerState(global_step=7), TrainerControl())
    assert not [c for c in list_checkpoints(open_store(tmp_path)) if c.committed]
