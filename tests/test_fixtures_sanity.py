"""The real-checkpoint fixtures hold what their expected.json says, in the layouts formats.md §9/§10 name.

These tests pin the facts ckptkit's readers are later tested against: file names, `latest`,
recorded live values against what the files really contain (read with torch in a subprocess when
that means executing the pickle), and the torch ≥ 2.6 `weights_only=True` failures ckptkit exists
to remove.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch
from safetensors import safe_open

from tests.fixtures._common import GENERATOR_ENV, REPO_ROOT

if TYPE_CHECKING:  # importing the plugin module here would keep pytest from assert-rewriting it
    from tests.fixtures.real_checkpoints import (
        DeepSpeedCase,
        DeepSpeedCheckpoints,
        HFTrainerCheckpoint,
        TorchCheckpoints,
    )


pytestmark = pytest.mark.slow

# numpy ≥ 2 moved it to numpy._core; the 1.x name is numpy.core.
NUMPY_RECONSTRUCT = "numpy._core.multiarray._reconstruct"


def load_unsafe(paths: list[Path], values: bool = False) -> dict[str, Any]:
    """``torch.load(weights_only=False)`` in a child process; returns its structural summary per path."""
    env = {**os.environ, **GENERATOR_ENV, "PYTHONPATH": str(REPO_ROOT)}
    args = [sys.executable, "-m", "tests.fixtures._load_summary", *map(str, paths)]
    if values:
        args.append("--values")
    proc = subprocess.run(
        args, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    # deepspeed may log to stdout before the JSON; the summary is the last line.
    return json.loads(proc.stdout.strip().splitlines()[-1])


def weights_only_error(path: Path) -> str:
    """The message of torch.load's default (``weights_only=True``) refusing ``path``."""
    with pytest.raises(pickle.UnpicklingError) as info:
        torch.load(path, weights_only=True)
    message = str(info.value)
    assert "Weights only load failed" in message
    return message


def assert_refused_for_global(path: Path, allowed_culprits: list[str]) -> None:
    message = weights_only_error(path)
    assert any(f"Unsupported global: GLOBAL {name} " in message for name in allowed_culprits), message[-900:]


# --------------------------------------------------------------------------- plain torch


def test_torch_files_have_the_recorded_format_and_bytes(torch_checkpoints: TorchCheckpoints) -> None:
    assert torch_checkpoints.names == ["adamw_onecycle.pt", "legacy.pt", "protocol4.pt", "sequential.pt"]
    for name in torch_checkpoints.names:
        exp = torch_checkpoints.expected[name]
        data = torch_checkpoints.path(name).read_bytes()
        assert len(data) == exp["size"]
        assert hashlib.sha256(data).hexdigest() == exp["sha256"]
        if exp["format"] == "zip":
            with zipfile.ZipFile(torch_checkpoints.path(name)) as zf:
                pkl = next(n for n in zf.namelist() if n.endswith("/data.pkl"))
                head = zf.read(pkl)[:2]
        else:
            assert not zipfile.is_zipfile(torch_checkpoints.path(name))
            head = data[:2]  # legacy: the magic number is itself pickled first
        assert head == bytes([0x80, exp["pickle_protocol"]]), (name, head)
    assert torch_checkpoints.expected["protocol4.pt"]["pickle_protocol"] == 4
    assert torch_checkpoints.expected["adamw_onecycle.pt"]["pickle_protocol"] == 2  # torch's DEFAULT_PROTOCOL


def test_torch_expected_values_are_consistent(torch_checkpoints: TorchCheckpoints) -> None:
    exp = torch_checkpoints.expected["adamw_onecycle.pt"]
    opt, sched, scaler = exp["optimizer"], exp["scheduler"], exp["scaler"]
    assert opt["class"] == "AdamW" and opt["num_params"] == 6
    assert [g["weight_decay"] for g in opt["param_groups"]] == [0.05, 0.0]
    assert set(opt["state_step"].values()) == {5.0}  # 5 clean steps, none skipped by the scaler
    assert sched["class"] == "OneCycleLR" and sched["total_steps"] == 20
    assert sched["last_epoch"] == 5 and sched["_step_count"] == 6
    assert sched["_last_lr"] == [g["lr"] for g in opt["param_groups"]]
    # OneCycle starts at max_lr / div_factor (25).
    assert sched["base_lrs"] == pytest.approx([3e-3 / 25, 2e-3 / 25])
    # init 1024, growth x3 after 3 clean steps: one growth in 5 steps, tracker at 2.
    assert scaler == {
        "scale": 3072.0,
        "growth_factor": 3.0,
        "backoff_factor": 0.25,
        "growth_interval": 3,
        "_growth_tracker": 2,
        "state_dict_keys": sorted(scaler["state_dict_keys"]),
    }
    assert exp["rng"]["numpy_kind"] == "MT19937" and exp["rng"]["python_version"] == 3
    assert exp["model"]["num_parameters"] == 8 * 16 + 16 + 16 * 2 + 16 * 4 + 4
    assert exp["model"]["state_dict"]["1.num_batches_tracked"] == {"dtype": "torch.int64", "shape": []}
    for variant in ("legacy.pt", "protocol4.pt"):
        other = torch_checkpoints.expected[variant]
        assert {k: other[k] for k in ("optimizer", "scheduler", "scaler", "tensors")} == {
            k: exp[k] for k in ("optimizer", "scheduler", "scaler", "tensors")
        }

    seq = torch_checkpoints.expected["sequential.pt"]
    assert seq["optimizer"]["class"] == "SGD"
    assert seq["optimizer"]["param_groups"][0]["momentum"] == 0.9
    assert seq["optimizer"]["param_groups"][0]["nesterov"] is True
    assert seq["scheduler"]["class"] == "SequentialLR" and seq["scheduler"]["milestones"] == [3]
    assert [s["class"] for s in seq["scheduler"]["schedulers"]] == ["LinearLR", "CosineAnnealingLR"]
    # 5 steps: 3 of linear warmup, then 2 of cosine (T_max 10) from 0.1.
    cosine_lr = 1e-4 + (0.1 - 1e-4) * (1 + math.cos(math.pi * 2 / 10)) / 2
    assert seq["scheduler"]["_last_lr"] == pytest.approx([cosine_lr])


def test_torch_weights_only_loads_sequential_only(torch_checkpoints: TorchCheckpoints) -> None:
    seq_exp = torch_checkpoints.expected["sequential.pt"]
    seq = torch.load(torch_checkpoints.path("sequential.pt"), weights_only=True)
    assert seq["scheduler"]["_milestones"] == seq_exp["scheduler"]["milestones"]
    assert seq["scheduler"]["last_epoch"] == seq_exp["scheduler"]["last_epoch"]
    assert seq["optimizer"]["param_groups"][0]["lr"] == seq_exp["optimizer"]["param_groups"][0]["lr"]
    assert {k: list(v.shape) for k, v in seq["model"].items()} == {
        k: v["shape"] for k, v in seq_exp["model"]["state_dict"].items()
    }

    # The numpy RNG state is what torch's allowlist refuses ...
    for name in ("adamw_onecycle.pt", "legacy.pt"):
        assert_refused_for_global(torch_checkpoints.path(name), [NUMPY_RECONSTRUCT])
    # ... but a protocol-4 pickle is refused before any global: torch 2.13's weights-only
    # unpickler does not implement FRAME (opcode 0x95 = 149), which protocols 4 and 5 start with.
    assert "Unsupported operand 149" in weights_only_error(torch_checkpoints.path("protocol4.pt"))

    names = ("adamw_onecycle.pt", "legacy.pt", "protocol4.pt")
    loaded = load_unsafe([torch_checkpoints.path(n) for n in names])
    exp = torch_checkpoints.expected["adamw_onecycle.pt"]
    for summary in loaded.values():
        assert summary["epoch"] == 3
        assert summary["scaler"]["scale"] == exp["scaler"]["scale"]
        assert summary["scaler"]["_growth_tracker"] == exp["scaler"]["_growth_tracker"]
        assert summary["scheduler"]["total_steps"] == exp["scheduler"]["total_steps"]
        assert summary["scheduler"]["last_epoch"] == exp["scheduler"]["last_epoch"]
        assert [g["lr"] for g in summary["optimizer"]["param_groups"]] == exp["scheduler"]["_last_lr"]
        assert summary["rng"]["python"][1][:4] == exp["rng"]["python_state_head"]
        assert summary["rng"]["numpy"][0] == "MT19937"
        assert summary["rng"]["numpy"][1] == {"__ndarray__": "uint32", "shape": [624]}
        assert summary["rng"]["torch"] == {
            "__tensor__": "torch.uint8",
            "shape": [exp["rng"]["torch_state_numel"]],
        }


# --------------------------------------------------------------------------- HF Trainer

HF_FILES = {
    "model.safetensors",
    "optimizer.pt",
    "scheduler.pt",
    "rng_state.pth",
    "trainer_state.json",
    "training_args.bin",
    "config.json",
}


def test_hf_trainer_layout_and_state(hf_trainer_checkpoint: HFTrainerCheckpoint) -> None:
    hf = hf_trainer_checkpoint
    exp = hf.expected
    assert list(hf.checkpoints) == [6, 12]
    assert sorted(p.name for p in hf.output_dir.iterdir()) == ["checkpoint-12", "checkpoint-6"]
    assert exp["global_step"] == exp["max_steps"] == 12
    assert exp["epoch"] == pytest.approx(12 / 16)  # 64 samples / batch 4 = 16 steps per epoch
    for step, ckpt in hf.checkpoints.items():
        rec = exp["checkpoints"][ckpt.name]
        assert {p.name for p in ckpt.iterdir()} >= HF_FILES
        state = json.loads((ckpt / "trainer_state.json").read_text())
        assert state["global_step"] == rec["global_step"] == step
        assert state["max_steps"] == 12
        assert state["epoch"] == pytest.approx(rec["epoch"])
        logged = [h["learning_rate"] for h in state["log_history"] if "learning_rate" in h]
        assert logged[-1] == pytest.approx(rec["last_logged_learning_rate"])

        # Cosine with 3 warmup steps over 12: after `step` scheduler steps lr = base * cos-factor.
        progress = (step - 3) / (12 - 3)
        lr = 5e-4 * 0.5 * (1 + math.cos(math.pi * progress))
        assert [g["lr"] for g in rec["param_groups"]] == pytest.approx([lr, lr], abs=1e-12)
        assert rec["scheduler"]["last_epoch"] == step
        assert rec["scheduler"]["_last_lr"] == pytest.approx([lr, lr])
        assert rec["optimizer_state_steps"] == [float(step)]

        # optimizer.pt and scheduler.pt load under torch's default and match the live values.
        sched = torch.load(ckpt / "scheduler.pt", weights_only=True)
        assert sched["last_epoch"] == rec["scheduler"]["last_epoch"]
        assert sched["_last_lr"] == rec["scheduler"]["_last_lr"]
        opt = torch.load(ckpt / "optimizer.pt", weights_only=True)
        assert [g["lr"] for g in opt["param_groups"]] == [g["lr"] for g in rec["param_groups"]]
        assert [len(g["params"]) for g in opt["param_groups"]] == [
            g["num_params"] for g in rec["param_groups"]
        ]
        assert {float(s["step"]) for s in opt["state"].values()} == {float(step)}
    # Logging happens before the scheduler steps: the last logged lr is one step behind.
    assert exp["checkpoints"]["checkpoint-12"]["param_groups"][0]["lr"] == 0.0
    assert exp["last_logged_learning_rate"] > 0.0


def test_hf_safetensors_match_the_live_model(hf_trainer_checkpoint: HFTrainerCheckpoint) -> None:
    exp = hf_trainer_checkpoint.expected
    with safe_open(str(hf_trainer_checkpoint.checkpoints[12] / "model.safetensors"), "pt") as f:
        stored = {k: (str(f.get_slice(k).get_dtype()), f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    # The tied lm_head.weight is written once (as transformer.wte.weight).
    assert set(stored) == set(exp["state_dict"]) - {"lm_head.weight"}
    for name, (dtype, shape) in stored.items():
        assert dtype == "F32" and list(shape) == exp["state_dict"][name]["shape"]
    assert sum(math.prod(shape) for _, shape in stored.values()) == exp["num_parameters"] == 31616


def test_hf_rng_state_and_training_args_need_code_to_load(hf_trainer_checkpoint: HFTrainerCheckpoint) -> None:
    ckpts = hf_trainer_checkpoint.checkpoints
    for ckpt in ckpts.values():
        assert_refused_for_global(ckpt / "rng_state.pth", [NUMPY_RECONSTRUCT])
        training_args = "transformers.training_args.TrainingArguments"
        assert_refused_for_global(ckpt / "training_args.bin", [training_args])

    paths = [ckpt / "rng_state.pth" for ckpt in ckpts.values()]
    loaded = load_unsafe(paths)
    # The CPU generator state is too long to summarise; compare its hash in a second child.
    for ckpt, path in zip(ckpts.values(), paths, strict=True):
        rec = hf_trainer_checkpoint.expected["checkpoints"][ckpt.name]["rng"]
        summary = loaded[str(path)]
        assert set(summary) == {"python", "numpy", "cpu"}  # no accelerator on this machine
        assert summary["cpu"] == {"__tensor__": "torch.uint8", "shape": [rec["cpu_numel"]]}
        assert summary["python"][1][:4] == rec["python_state_head"]
        assert summary["numpy"][2] == rec["numpy_pos"]
    code = (
        "import hashlib,sys,torch;"
        "print(*[hashlib.sha256(torch.load(p, weights_only=False)['cpu'].numpy().tobytes()).hexdigest()"
        " for p in sys.argv[1:]])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, *map(str, paths)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout.split()
    assert out == [
        hf_trainer_checkpoint.expected["checkpoints"][c.name]["rng"]["cpu_sha256"] for c in ckpts.values()
    ]


# --------------------------------------------------------------------------- DeepSpeed

LOSS_SCALER = "deepspeed.runtime.fp16.loss_scaler.LossScaler"
DYNAMIC_LOSS_SCALER = "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"
ZERO_STAGE_ENUM = "deepspeed.runtime.zero.config.ZeroStageEnum"
FRAGMENT_ADDRESS = "deepspeed.utils.tensor_fragment.fragment_address"
MODULE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def expected_tag_files(case: DeepSpeedCase) -> list[str]:
    """File names formats.md §10.1 prescribes for a stage, dtype and world size."""
    prefix = "bf16_" if case.dtype == "bf16" else ""
    ranks = range(case.world_size)
    optim = [f"{prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in ranks]
    if case.stage == 3:
        model = [f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in ranks]
    else:
        model = ["mp_rank_00_model_states.pt"]
    return sorted(optim + model)


def test_deepspeed_case_matrix(deepspeed_checkpoints: DeepSpeedCheckpoints) -> None:
    cases = deepspeed_checkpoints.cases.values()
    combos = {(c.stage, c.dtype) for c in cases if c.world_size == 2}
    assert combos == {(s, d) for s in (1, 2, 3) for d in ("fp32", "bf16", "fp16")}
    assert [(c.stage, c.dtype) for c in deepspeed_checkpoints.select(world_size=4)] == [(3, "bf16")]
    schedulers = {c.expected["case"]["scheduler"] for c in cases}
    assert {"WarmupLR", "WarmupCosineLR", "StepLR", "none"} <= schedulers
    assert any(c.expected["skipped_steps"] > 0 for c in cases)  # at least one fp16 overflow was recorded


@pytest.mark.parametrize(
    "name",
    [
        "z1_fp32_warmuplr",
        "z1_bf16_none",
        "z1_fp16_steplr",
        "z1_fp16_static",
        "z2_fp32_steplr",
        "z2_bf16_warmupcosine",
        "z2_fp16_overflow",
        "z3_fp32_warmupcosine",
        "z3_bf16_warmuplr",
        "z3_fp16_overflow",
        "z3_bf16_warmuplr_4rank",
    ],
)
def test_deepspeed_layout_and_expected(deepspeed_checkpoints: DeepSpeedCheckpoints, name: str) -> None:
    case = deepspeed_checkpoints[name]
    exp = case.expected
    spec = exp["case"]

    # Layout: `latest` without newline, tag from the step count, recovery scripts, per-rank files.
    assert (case.save_dir / "latest").read_bytes() == case.tag.encode() == exp["latest"].encode()
    assert case.tag == f"global_step{exp['global_steps']}" and exp["global_steps"] == spec["steps"]
    assert {p.name for p in case.save_dir.iterdir()} == {
        "latest",
        "zero_to_fp32.py",
        "zero_to_torch.py",
        case.tag,
    }
    assert sorted(p.name for p in case.tag_dir.iterdir()) == expected_tag_files(case)

    # Topology.
    world = spec["world"]
    assert exp["stage"] == spec["stage"] and exp["dp_world_size"] == world and exp["mp_world_size"] == 1
    assert exp["partition_count"] == ([world] if spec["stage"] < 3 else world)
    assert exp["global_samples"] == spec["steps"] * spec["grad_accum"] * 4 * world
    assert exp["skipped_steps"] == len(spec["overflow_micro_steps"])

    # Loss scaling: only dynamic fp16 gets a DynamicLossScaler.
    scaler = exp["loss_scaler"]
    if spec["dtype"] == "fp16" and spec["fp16_loss_scale"] == 0:
        assert scaler["class"] == DYNAMIC_LOSS_SCALER and exp["dynamic_loss_scale"] is True
        state = scaler["state"]
        assert state["dtype"] == "torch.float16" and state["cur_scale"] == exp["cur_scale"] >= 1.0
        assert state["cur_iter"] == spec["steps"] * spec["grad_accum"]
        expected_overflow = max(spec["overflow_micro_steps"], default=-1)
        assert state["last_overflow_iter"] == expected_overflow
        assert state["scale_window"] == (spec["loss_scale_window"] or 1000)
    elif spec["dtype"] == "fp16":
        assert scaler == {
            "class": LOSS_SCALER,
            "state": {"cur_scale": spec["fp16_loss_scale"], "dynamic": False},
        }
    else:
        assert scaler == {"class": LOSS_SCALER, "state": {"cur_scale": 1.0, "dynamic": False}}

    # Schedulers step once per non-skipped optimizer step.
    taken = exp["global_steps"] - exp["skipped_steps"]
    sched = exp["lr_scheduler"]
    if spec["scheduler"] == "none":
        assert sched is None and exp["lr"] == [1e-3]
    elif spec["scheduler"] == "StepLR":
        assert sched["class"] == "torch.optim.lr_scheduler.StepLR"
        assert sched["state_dict"]["last_epoch"] == taken
        assert exp["lr"] == pytest.approx([1e-3 * 0.5 ** (taken // 2)])
    else:
        assert sched["class"] == f"deepspeed.runtime.lr_schedules.{spec['scheduler']}"
        assert sched["state_dict"] == {"last_batch_iteration": taken - 1}
    assert exp["lr"] == [g["lr"] for g in exp["param_groups"]]

    # Model structure: the frozen param, the buffer and the tie were all seen by DeepSpeed.
    assert exp["frozen_param_names"] == ["frozen_scale"] and exp["buffer_names"] == ["offset"]
    assert exp["shared_params"] == {"head.weight": "embed.weight"}
    assert exp["num_trainable_elements"] == 16 * 8 + 30 * 8 + 30 + 8 * 30 + 8 == 646

    # zero_to_fp32 reproduced the live fp32 master weights bit for bit.
    assert set(exp["fp32_max_abs_diff_vs_live_masters"]) == set(exp["param_shapes"])
    assert set(exp["fp32_max_abs_diff_vs_live_masters"].values()) == {0.0}
    fp32 = case.expected_fp32()
    keys = {"embed.weight", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "head.weight", "offset"}
    if spec["stage"] > 1:  # stage 1 files do not record frozen params, so zero_to_fp32 drops them
        keys.add("frozen_scale")
    assert set(fp32) == keys == set(exp["consolidated_keys"])
    assert torch.equal(fp32["head.weight"], fp32["embed.weight"])
    for key in exp["param_shapes"]:
        assert fp32[key].dtype == torch.float32 and list(fp32[key].shape) == exp["param_shapes"][key]


def test_deepspeed_model_states_load_under_weights_only(deepspeed_checkpoints: DeepSpeedCheckpoints) -> None:
    for case in deepspeed_checkpoints.cases.values():
        exp = case.expected
        for path in sorted(case.tag_dir.glob("*model_states.pt")):
            assert exp["unsafe_globals"][f"{case.tag}/{path.name}"] == []
            states = torch.load(path, weights_only=True)
            assert states["global_steps"] == exp["global_steps"]
            assert states["skipped_steps"] == exp["skipped_steps"]
            assert states["dp_world_size"] == exp["dp_world_size"]
            assert states["buffer_names"] == exp["buffer_names"]
            # engine._get_shared_params() only fills the dict in on global rank 0, so stage 3's other
            # per-rank model-states files record no tie at all.
            rank0 = path.name.startswith(("mp_rank_00", "zero_pp_rank_0_"))
            assert states["shared_params"] == (exp["shared_params"] if rank0 else {})
            assert states["my_step"] == exp["client_state"]["my_step"]  # client_state merged at top level
            assert states["optimizer"] is None
            expected_sched = exp["lr_scheduler"]["state_dict"] if exp["lr_scheduler"] else None
            if expected_sched is not None:
                assert {k: states["lr_scheduler"][k] for k in expected_sched} == expected_sched
            else:
                assert states["lr_scheduler"] is None
            if case.stage == 1:  # formats.md §10.2 says fragments are {} at stage 1; 0.19.8 writes None
                assert states["frozen_param_shapes"] is None and states["frozen_param_fragments"] is None
            else:
                assert list(states["frozen_param_shapes"]) == ["frozen_scale"]
            if case.stage == 3:  # params are empty placeholders; buffers are real
                assert states["module"]["fc1.weight"].numel() == 0
                assert states["module"]["offset"].shape == (8,)
            else:
                assert states["module"]["fc1.weight"].dtype == MODULE_DTYPES[case.dtype]
                assert str(states["module"]["fc1.weight"].dtype) == exp["module_dtypes"]["fc1.weight"]


def test_deepspeed_optimizer_files_refuse_weights_only_and_load_with_code(
    deepspeed_checkpoints: DeepSpeedCheckpoints,
) -> None:
    paths: list[Path] = []
    for case in deepspeed_checkpoints.cases.values():
        for path in sorted(case.tag_dir.glob("*optim_states.pt")):
            recorded = case.expected["unsafe_globals"][f"{case.tag}/{path.name}"]
            scaler_class = case.expected["loss_scaler"]["class"]
            wanted = {scaler_class, ZERO_STAGE_ENUM} | ({FRAGMENT_ADDRESS} if case.stage < 3 else set())
            assert set(recorded) == wanted
            assert_refused_for_global(path, recorded)
            paths.append(path)

    loaded = load_unsafe(paths)
    for case in deepspeed_checkpoints.cases.values():
        exp = case.expected
        world = exp["dp_world_size"]
        saved_numels: list[int] = []
        moment_numels: set[int] = set()
        paddings: list[int] = []
        fragment_numels: dict[str, int] = {}
        for path in sorted(case.tag_dir.glob("*optim_states.pt")):
            top = loaded[str(path)]
            assert set(top) == {"optimizer_state_dict", "ds_config", "ds_version"}
            osd = top["optimizer_state_dict"]
            assert osd["zero_stage"]["__enum__"] == ZERO_STAGE_ENUM
            assert osd["zero_stage"]["value"] == case.stage
            assert osd["partition_count"] == exp["partition_count"]
            # The pickled loss scaler is the live object's whole __dict__ (a torch dtype included).
            assert osd["loss_scaler"] == {
                "__class__": exp["loss_scaler"]["class"],
                "state": exp["loss_scaler"]["state"],
            }
            assert osd["dynamic_loss_scale"] == exp["dynamic_loss_scale"]
            if case.stage < 3:
                base = osd["base_optimizer_state"]
                flat = osd["single_partition_of_fp32_groups"]
                paddings.append(osd["group_paddings"][0])
                assert osd["param_alignment_paddings"] == [[0] * len(exp["param_shapes"])]
                for name, frag in osd["param_slice_mappings"][0].items():
                    assert frag["__class__"] == FRAGMENT_ADDRESS
                    fragment_numels[name] = fragment_numels.get(name, 0) + frag["state"]["numel"]
            else:
                base = osd["optimizer_state_dict"]
                flat = osd["fp32_flat_groups"]
            assert [g["lr"] for g in base["param_groups"]] == exp["lr"]
            assert [t["__tensor__"] for t in flat] == ["torch.float32"]
            saved_numels.append(flat[0]["shape"][0])
            moment_numels |= {
                m[k]["shape"][0] for m in base["state"].values() for k in ("exp_avg", "exp_avg_sq")
            }
        assert len(saved_numels) == world
        numels = {name: math.prod(shape) for name, shape in exp["param_shapes"].items()}
        if case.stage < 3:
            # One flat buffer of all trainable params padded to a multiple of 2 x world, cut into equal
            # partitions. The saved fp32 partitions are "lean" (the tail rank's padding is stripped and
            # counted in group_paddings) while the Adam moments keep the padded size.
            padded = -(-exp["num_trainable_elements"] // (2 * world)) * (2 * world)
            assert moment_numels == {padded // world}
            assert sum(saved_numels) == exp["num_trainable_elements"]
            assert [n + p for n, p in zip(saved_numels, paddings, strict=True)] == [padded // world] * world
            # A param's fragments over all ranks cover it exactly once (ranks it misses omit it).
            assert fragment_numels == numels
        else:
            # Each param padded on its own to a multiple of world; every rank holds one slice of each.
            per_rank = sum(-(-n // world) for n in numels.values())
            assert saved_numels == [per_rank] * world and moment_numels == {per_rank}
