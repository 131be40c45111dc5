"""inspect on a real transformers.Trainer output directory."""

from __future__ import annotations

import pytest

from ckptkit.ops.inspect import inspect_path


@pytest.mark.parametrize("step", [6, 12])
def test_hf_checkpoint_values(hf_trainer_checkpoint, step: int) -> None:
    expected = hf_trainer_checkpoint.expected["checkpoints"][f"checkpoint-{step}"]
    report = inspect_path(hf_trainer_checkpoint.checkpoints[step])
    assert report.layout == "hf-trainer" and report.ok

    [opt] = report.optimizers
    assert opt.kind == expected["optimizer_class"] == "AdamW"
    assert opt.steps == expected["optimizer_state_steps"]
    for got, want in zip(opt.groups, expected["param_groups"], strict=True):
        assert (got.lr, got.betas, got.eps, got.weight_decay, got.num_params) == (
            want["lr"],
            want["betas"],
            want["eps"],
            want["weight_decay"],
            want["num_params"],
        )
        assert got.options["initial_lr"] == want["initial_lr"] and got.step == step

    [sched] = report.schedulers
    want = expected["scheduler"]
    assert sched.cls == want["class"] == "LambdaLR"
    assert (sched.last_epoch, sched.step_count, sched.base_lrs, sched.last_lr) == (
        want["last_epoch"],
        want["_step_count"],
        want["base_lrs"],
        want["_last_lr"],
    )

    state = report.trainer_state
    assert state.global_step == expected["global_step"] and state.fields["epoch"] == expected["epoch"]
    assert state.fields["max_steps"] == expected["max_steps"]
    assert state.log_entries == expected["num_logged_entries"]
    assert state.last_logged_lr == expected["last_logged_learning_rate"]

    [rng] = report.rng
    assert set(rng.present) == {"python", "numpy", "torch cpu"}
    assert rng.details["numpy"]["pos"] == expected["rng"]["numpy_pos"]
    assert rng.details["torch cpu"]["shape"] == [expected["rng"]["cpu_numel"]]

    [model] = report.models
    assert model.num_parameters == hf_trainer_checkpoint.expected["num_parameters"]
    assert any("training_args.bin" in n for n in report.notes)


def test_hf_resume_check_explains_the_logged_lr(hf_trainer_checkpoint) -> None:
    report = inspect_path(hf_trainer_checkpoint.checkpoints[12])
    step, lr0, lr1 = report.resume.checks
    assert step.status == "ok" and step.reference == 12
    assert {r.value for r in step.readings} == {12}
    assert len(step.readings) == 4  # trainer_state, directory name, optimizer, scheduler
    assert lr0.status == "benign" and lr1.status == "ok"
    logged = lr0.readings[-1]
    assert logged.value == hf_trainer_checkpoint.expected["last_logged_learning_rate"]
    assert logged.status == "benign" and "before the scheduler steps" in logged.note
    assert report.resume.ok


def test_run_directory_resolves_to_newest_checkpoint(hf_trainer_checkpoint) -> None:
    report = inspect_path(hf_trainer_checkpoint.output_dir)
    assert report.name == "checkpoint-12"
    assert "newest checkpoint" in report.notes[0]


def test_disagreement_is_a_finding(hf_trainer_checkpoint, tmp_path) -> None:
    import json
    import shutil

    copy = shutil.copytree(hf_trainer_checkpoint.checkpoints[12], tmp_path / "checkpoint-12")
    state = json.loads((copy / "trainer_state.json").read_text())
    state["global_step"] = 11  # as if the trainer state came from another save
    (copy / "trainer_state.json").write_text(json.dumps(state))
    report = inspect_path(copy)
    assert not report.ok
    step = report.resume.checks[0]
    assert step.status == "mismatch" and step.reference == 11
    assert [r.status for r in step.readings if r.value == 12] == ["mismatch"] * 3


def test_trainer_checkpoint_under_deepspeed(hf_trainer_checkpoint, deepspeed_checkpoints, tmp_path) -> None:
    """LLaMA-Factory's layout: HF files, per-rank RNG files, and DeepSpeed's tag dir plus `latest`."""
    import shutil

    ds = deepspeed_checkpoints["z2_fp16_overflow"]
    copy = shutil.copytree(hf_trainer_checkpoint.checkpoints[12], tmp_path / "checkpoint-12")
    (copy / "optimizer.pt").unlink()  # under DeepSpeed the optimizer lives in the rank files
    (copy / "rng_state.pth").rename(copy / "rng_state_0.pth")
    shutil.copy(copy / "rng_state_0.pth", copy / "rng_state_1.pth")
    shutil.copytree(ds.tag_dir, copy / ds.tag)
    shutil.copy(ds.save_dir / "latest", copy / "latest")

    report = inspect_path(copy)
    assert report.layout == "hf-trainer+deepspeed"
    assert [r.rank for r in report.rng] == [0, 1]
    assert report.zero.stage == 2 and len(report.scalers) == 2
    step = report.resume.checks[0]
    # Two unrelated runs glued together: DeepSpeed's step 5 is not the trainer's 12.
    assert step.status == "mismatch" and not report.ok
    assert {r.source: r.value for r in step.readings}["deepspeed global_steps"] == 5
