"""inspect on plain torch.save files: every value equals what the live objects had."""

from __future__ import annotations

import pytest

from ckptkit.ops.inspect import inspect_path

ONECYCLE_FILES = ["adamw_onecycle.pt", "legacy.pt", "protocol4.pt"]


def _groups_match(groups, expected_groups) -> None:
    assert len(groups) == len(expected_groups)
    for got, want in zip(groups, expected_groups, strict=True):
        assert got.lr == want["lr"]
        assert got.betas == want["betas"]
        assert got.eps == want["eps"]
        assert got.weight_decay == want["weight_decay"]
        assert got.momentum == want["momentum"]
        assert got.num_params == want["num_params"]
        assert got.options.get("initial_lr") == want["initial_lr"]
        if want["nesterov"] is not None:
            assert got.options["nesterov"] == want["nesterov"]


@pytest.mark.parametrize("name", ONECYCLE_FILES)
def test_adamw_onecycle_values(torch_checkpoints, name: str) -> None:
    expected = torch_checkpoints.expected[name]
    report = inspect_path(torch_checkpoints.path(name))
    assert report.ok and report.layout == "file"

    [opt] = report.optimizers
    assert opt.kind == "AdamW" == expected["optimizer"]["class"]
    _groups_match(opt.groups, expected["optimizer"]["param_groups"])
    assert opt.num_params == expected["optimizer"]["num_params"]
    assert opt.num_state_entries == expected["optimizer"]["num_state_entries"]
    assert sorted(s.name for s in opt.slots) == expected["optimizer"]["state_keys"]
    assert set(opt.steps) == set(expected["optimizer"]["state_step"].values())

    [sched] = report.schedulers
    want = expected["scheduler"]
    assert sched.cls == want["class"] == "OneCycleLR"
    assert (sched.last_epoch, sched.step_count) == (want["last_epoch"], want["_step_count"])
    assert sched.base_lrs == want["base_lrs"] and sched.last_lr == want["_last_lr"]
    assert sched.fields["total_steps"] == want["total_steps"]

    [scaler] = report.scalers
    want = expected["scaler"]
    assert scaler.kind == "torch GradScaler" and scaler.scale == want["scale"]
    for key in ("growth_factor", "backoff_factor", "growth_interval", "_growth_tracker"):
        assert scaler.fields[key] == want[key]

    [rng] = report.rng
    assert set(rng.present) == {"python", "numpy", "torch cpu"}
    assert rng.details["numpy"]["pos"] == expected["rng"]["numpy_pos"]
    assert rng.details["numpy"]["key_len"] == expected["rng"]["numpy_key_len"]
    assert rng.details["python"]["state_len"] == expected["rng"]["python_state_len"]
    assert rng.details["torch cpu"]["shape"] == [expected["rng"]["torch_state_numel"]]

    [model] = report.models
    assert model.num_parameters == expected["model"]["num_parameters"]
    assert {t.name: {"dtype": f"torch.{t.dtype}", "shape": t.shape} for t in model.tensors} == expected[
        "model"
    ]["state_dict"]

    step, *lrs = report.resume.checks
    assert step.status == "ok" and step.reference == 5
    assert all(c.status == "ok" for c in lrs)


def test_sgd_sequential_values(torch_checkpoints) -> None:
    expected = torch_checkpoints.expected["sequential.pt"]
    report = inspect_path(torch_checkpoints.path("sequential.pt"))
    [opt] = report.optimizers
    assert opt.kind == "SGD" == expected["optimizer"]["class"]
    _groups_match(opt.groups, expected["optimizer"]["param_groups"])

    [sched] = report.schedulers
    want = expected["scheduler"]
    assert sched.cls == "SequentialLR" and sched.fields["_milestones"] == want["milestones"]
    assert sched.last_epoch == want["last_epoch"] and sched.last_lr == want["_last_lr"]
    assert [c.cls for c in sched.children] == [s["class"] for s in want["schedulers"]]
    for child, child_want in zip(sched.children, want["schedulers"], strict=True):
        assert (child.last_epoch, child.step_count) == (child_want["last_epoch"], child_want["_step_count"])
        assert child.base_lrs == child_want["base_lrs"] and child.last_lr == child_want["_last_lr"]
    assert sched.children[1].fields == {"T_max": 10, "eta_min": 1e-4}

    step = report.resume.checks[0]
    assert step.reference == expected["step"] and step.status == "ok"
    assert report.scalers == [] and report.rng == []


def test_single_views_read_only_what_they_need(torch_checkpoints) -> None:
    report = inspect_path(torch_checkpoints.path("adamw_onecycle.pt"), ["scheduler"])
    assert report.views == ("scheduler",) and report.resume is None
    assert report.optimizers == [] and len(report.schedulers) == 1
    assert set(report.to_json()) >= {"schedulers", "url", "layout", "ok", "notes", "problems"}
    assert "optimizers" not in report.to_json()
