"""inspect on real multi-rank DeepSpeed ZeRO-1/2/3 checkpoints (fp32, bf16, fp16 dynamic and static)."""

from __future__ import annotations

import shutil

import pytest

from ckptkit.errors import FormatError
from ckptkit.ops.inspect import inspect_path
from tests.fixtures.gen_deepspeed import ALL_CASES
from tests.fixtures.real_checkpoints import DeepSpeedCase

CASES = [case.name for case in ALL_CASES]


@pytest.fixture(params=CASES)
def case(request, deepspeed_checkpoints) -> DeepSpeedCase:
    return deepspeed_checkpoints[request.param]


def test_every_case_reads_as_deepspeed_recorded_it(case: DeepSpeedCase) -> None:
    want = case.expected
    report = inspect_path(case.save_dir)  # the root: resolved through `latest`
    assert report.layout == "deepspeed" and report.ok, report.resume

    zero = report.zero
    assert zero.stage == want["stage"]
    count = want["partition_count"]
    assert zero.partition_count == (max(count) if isinstance(count, list) else count)
    assert zero.dp_world_size == want["dp_world_size"] == zero.rank_files
    assert zero.mp_world_size == want["mp_world_size"]
    assert zero.problems == []
    assert zero.fp32_elements >= want["num_trainable_elements"]  # plus tail padding
    assert zero.loads_at_dp_world_size == want["dp_world_size"] and zero.resharded is None

    opt = zero.optimizer
    assert opt.kind == want["base_optimizer_class"]
    for got, group in zip(opt.groups, want["param_groups"], strict=True):
        assert (got.lr, got.betas, got.eps, got.weight_decay) == (
            group["lr"],
            group["betas"],
            group["eps"],
            group["weight_decay"],
        )
        assert got.options.get("initial_lr") == group.get("initial_lr")
        assert got.step == want["global_steps"] - want["skipped_steps"]
    assert [g.lr for g in opt.groups] == want["lr"]

    scalers = report.scalers
    assert len(scalers) == want["dp_world_size"]
    state = want["loss_scaler"]["state"]
    for scaler in scalers:
        assert want["loss_scaler"]["class"].endswith(scaler.kind.split()[-1])
        assert scaler.scale == want["cur_scale"] == state["cur_scale"]
        assert scaler.dynamic == state["dynamic"] == want["dynamic_loss_scale"]
        for key, value in state.items():
            if key not in ("cur_scale", "dynamic"):
                assert scaler.fields[key] == (value.removeprefix("torch.") if key == "dtype" else value)

    sched_want = want["lr_scheduler"]
    if sched_want is None:
        assert report.schedulers == []
    else:
        [sched] = report.schedulers
        assert sched.qualname == sched_want["class"]
        state = sched_want["state_dict"]
        if "last_batch_iteration" in state:
            assert sched.fields["last_batch_iteration"] == state["last_batch_iteration"]
        else:
            assert (sched.last_epoch, sched.step_count, sched.base_lrs, sched.last_lr) == (
                state["last_epoch"],
                state["_step_count"],
                state["base_lrs"],
                state["_last_lr"],
            )
            assert sched.fields == {"step_size": state["step_size"], "gamma": state["gamma"]}

    [model] = report.models
    assert model.num_trainable == want["num_trainable_elements"]
    roles = {t.name: t.role for t in model.tensors}
    assert [n for n, r in roles.items() if r == "frozen"] == want["frozen_param_names"]
    assert [n for n, r in roles.items() if r == "buffer"] == want["buffer_names"]
    assert {n for n, r in roles.items() if r == "tied"} == set(want["shared_params"])
    shapes = {t.name: t.shape for t in model.tensors if t.role == "parameter"}
    assert shapes == {name: list(shape) for name, shape in want["param_shapes"].items()}


def test_resume_check_explains_skipped_overflow_steps(deepspeed_checkpoints) -> None:
    case = deepspeed_checkpoints["z2_fp16_overflow"]
    report = inspect_path(case.tag_dir)
    step = report.resume.checks[0]
    assert step.reference == case.expected["global_steps"] == 5
    applied = [r for r in step.readings if r.status == "benign"]
    assert [r.value for r in applied] == [4, 4]  # optimizer step, scheduler steps
    assert report.resume.ok and step.status == "benign"


def test_static_fp16_scale(deepspeed_checkpoints) -> None:
    report = inspect_path(deepspeed_checkpoints["z1_fp16_static"].save_dir, ["scaler"])
    assert {(s.kind, s.scale, s.dynamic, s.enabled) for s in report.scalers} == {
        ("DeepSpeed LossScaler", 128.0, False, True)
    }


@pytest.mark.parametrize("latest", ["../../etc", "global_step999", "", "/abs/global_step3", "."])
def test_latest_must_name_a_tag_directory_next_to_it(deepspeed_checkpoints, tmp_path, latest: str) -> None:
    case = deepspeed_checkpoints["z3_bf16_warmuplr"]
    copy = shutil.copytree(case.save_dir, tmp_path / "ckpt")
    (copy / "latest").write_text(latest)
    with pytest.raises(FormatError, match="latest names"):
        inspect_path(copy)


def test_missing_rank_file_fails_the_check(deepspeed_checkpoints, tmp_path) -> None:
    case = deepspeed_checkpoints["z3_bf16_warmuplr_4rank"]
    copy = shutil.copytree(case.save_dir, tmp_path / "ckpt")
    next((copy / case.tag).glob("bf16_zero_pp_rank_3_*optim_states.pt")).unlink()
    report = inspect_path(copy)
    assert not report.ok
    assert any("partition count is 4 but 3" in p for p in report.zero.problems)
    assert report.resume.checks[-1].quantity == "deepspeed ranks"


def test_a_single_rank_file_is_recognised_by_content(deepspeed_checkpoints, tmp_path) -> None:
    case = deepspeed_checkpoints["z2_fp16_overflow"]
    source = next(case.tag_dir.glob("zero_pp_rank_1_*optim_states.pt"))
    renamed = shutil.copy(source, tmp_path / "renamed.bin")
    report = inspect_path(renamed, ["optimizer", "scaler"])
    assert report.zero.stage == 2 and report.zero.rank_files == 1
    assert report.scalers[0].scale == case.expected["cur_scale"]


def test_a_resharded_checkpoint_says_where_it_came_from(deepspeed_checkpoints, tmp_path) -> None:
    """inspect of a ``ckptkit reshard`` output: the world size it now loads at, where it was
    resharded from, and which saved RNG state each new rank got."""
    from click.testing import CliRunner

    from ckptkit.cli.main import cli
    from ckptkit.ops.reshard import reshard_zero

    case = deepspeed_checkpoints["z2_fp16_overflow"]
    save_dir = shutil.copytree(case.save_dir, tmp_path / "ckpt")
    for rank in (0, 1):
        (save_dir / f"rng_state_{rank}.pth").write_bytes(f"rank {rank}".encode())
    reshard_zero(save_dir, tmp_path / "ckpt-3", world_size=3)

    zero = inspect_path(tmp_path / "ckpt-3", ["optimizer"]).zero
    assert zero.loads_at_dp_world_size == 3 and zero.rank_files == 3
    assert zero.resharded == {
        "source": f"{save_dir}/{case.tag}", "from_world_size": 2, "world_size": 3, "zero_stage": 2,
        "rng_states": {"0": 0, "1": 1, "2": 0},
    }
    text = CliRunner().invoke(cli, ["inspect", str(tmp_path / "ckpt-3")]).output
    assert "loads as is at data-parallel world size 3 only; at any other: 'ckptkit reshard" in text
    assert "resharded by ckptkit from 2 to 3 ranks" in text
    assert "0 <- 0, 1 <- 1, 2 <- 0" in text
