"""``ckptkit plan``: each finding kind from a crafted checkpoint, the version table, the CLI.

The checkpoints here are small ``torch.save`` files named as DeepSpeed and the HF Trainer name
theirs; tests/test_plan_matrix.py checks the predictions against real resumes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from ckptkit.cli.main import cli
from ckptkit.ops.resume_plan import plan_resume
from ckptkit.ops.resume_plan_loads import ckptkit_registered_names, transformers_rng_globals
from ckptkit.ops.resume_plan_versions import RENAMES, missing_in, parse_version
from ckptkit.storage import open_store
from tests.helpers import commit_files

# A pickle that would call os.system if unpickled (never is: ckptkit reads it symbolically).
HOSTILE = b"cos\nsystem\n(S'echo owned'\ntR."
# What DeepSpeed >= 0.7 pickles for the ZeRO stage, as bytes: the global and its argument.
ZERO_STAGE_PICKLE = b"\x80\x02cdeepspeed.runtime.zero.config\nZeroStageEnum\nK\x02\x85R."


def _save(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)


def _ds_tag(tag_dir: Path, dp: int = 2, stage: int = 2) -> None:
    """A ZeRO-``stage`` tag directory at ``dp`` ranks: plain dicts, so weights_only loads them."""
    for rank in range(dp):
        if stage == 3 or rank == 0:
            name = "mp_rank_00_model_states.pt"
            if stage == 3:
                name = f"zero_pp_rank_{rank}_{name}"
            _save(tag_dir / name, {"module": {"w": torch.ones(8)}, "dp_world_size": dp})
        _save(tag_dir / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt",
              {"optimizer_state_dict": {"fp32": torch.zeros(4)}})


def _ds_root(root: Path, tags: dict[str, bool], latest: str | None) -> None:
    """DeepSpeed save dir: each tag written, committed by ckptkit when its flag says so."""
    for tag, committed in tags.items():
        staging = root.parent / f"{root.name}-src" / tag
        _ds_tag(staging)
        if committed:
            step = int(tag.removeprefix("global_step"))
            commit_files(open_store(str(root)), tag, _contents(staging), step=step)
        else:
            _ds_tag(root / tag)
    if latest is not None:
        (root / "latest").write_text(latest)


def _contents(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir()}


def _kinds(plan: Any, severity: str | None = None) -> list[str]:
    return [f.kind for f in plan.findings if severity is None or f.severity == severity]


# --- which checkpoint --------------------------------------------------------------------------


def test_latest_naming_an_uncommitted_tag_fails_and_names_ckptkits_choice(tmp_path: Path) -> None:
    root = tmp_path / "run"
    _ds_root(root, {"global_step2": True, "global_step4": False}, latest="global_step4")
    plan = plan_resume(str(root))
    assert (plan.checkpoint, plan.ckptkit_choice) == ("global_step4", "global_step2")
    assert not plan.ok and plan.exit_code == 1
    incomplete = next(f for f in plan.findings if f.kind == "incomplete")
    assert incomplete.severity == "error" and "global_step2" in incomplete.fix
    assert "choice" in _kinds(plan, "warning")


def test_latest_naming_the_newest_committed_tag_is_ok(tmp_path: Path) -> None:
    root = tmp_path / "run"
    _ds_root(root, {"global_step2": True, "global_step4": True}, latest="global_step4")
    plan = plan_resume(str(root))
    assert plan.ok and plan.committed and plan.findings == []
    assert (plan.checkpoint, plan.ckptkit_choice, plan.saved_world_size, plan.zero_stage) == (
        "global_step4", "global_step4", 2, 2
    )


@pytest.mark.parametrize(
    ("latest", "says"),
    [("global_step9", "has no files"), ("../elsewhere", "not a tag directory"), (None, "no 'latest' file")],
)
def test_a_broken_or_missing_latest_fails(tmp_path: Path, latest: str | None, says: str) -> None:
    root = tmp_path / "run"
    _ds_root(root, {"global_step2": False}, latest=latest)
    plan = plan_resume(str(root))
    finding = next(f for f in plan.findings if f.kind == "latest")
    assert finding.severity == "error" and says in finding.message and finding.fix
    assert plan.exit_code == 1


def test_hf_resumes_the_highest_checkpoint_even_when_incomplete(tmp_path: Path) -> None:
    run = tmp_path / "out"
    nine = _hf_checkpoint(tmp_path / "src" / "checkpoint-9", rng_files=["rng_state.pth"])
    commit_files(open_store(str(run)), "checkpoint-9", _contents(nine), step=9)
    _hf_checkpoint(run / "checkpoint-10", rng_files=["rng_state.pth"])  # interrupted: no manifest
    plan = plan_resume(str(run))
    assert (plan.checkpoint, plan.ckptkit_choice) == ("checkpoint-10", "checkpoint-9")
    assert "incomplete" in _kinds(plan, "error")


# --- topology ----------------------------------------------------------------------------------


def test_another_world_size_fails_with_reshard_as_the_fix(tmp_path: Path) -> None:
    _ds_tag(tmp_path / "global_step4", dp=2, stage=3)
    same = plan_resume(str(tmp_path / "global_step4"), world_size=2)
    assert same.ok and same.zero_stage == 3
    other = plan_resume(str(tmp_path / "global_step4"), world_size=4)
    finding = next(f for f in other.findings if f.kind == "world-size")
    assert finding.severity == "error"
    assert "ckptkit reshard" in finding.fix and "--world-size 4" in finding.fix
    sizes = {p.name: p.stat().st_size for p in (tmp_path / "global_step4").iterdir()}
    assert same.rank_bytes[1] == sizes["zero_pp_rank_1_mp_rank_00_model_states.pt"] + sizes[
        "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    ]
    assert len(other.rank_bytes) == 4 and other.rank_bytes[0] == -(-sum(sizes.values()) // 4)


def test_a_zero_stage_change_is_not_fixable_by_reshard(tmp_path: Path) -> None:
    _ds_tag(tmp_path / "tag", stage=2)
    plan = plan_resume(str(tmp_path / "tag"), zero_stage=3)
    assert "zero-stage" in _kinds(plan, "error")
    assert plan_resume(str(tmp_path / "tag"), zero_stage=1).ok  # ZeRO-1 and 2 share the layout


def test_a_missing_rank_file_fails(tmp_path: Path) -> None:
    tag = tmp_path / "global_step4"
    _ds_tag(tag, dp=3, stage=3)
    (tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    plan = plan_resume(str(tag))
    missing = [f for f in plan.findings if f.kind == "missing-rank-file"]
    assert [f.file for f in missing] == ["zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert missing[0].severity == "error" and plan.exit_code == 1


# --- HF RNG states -----------------------------------------------------------------------------


def _hf_checkpoint(path: Path, rng_files: list[str]) -> Path:
    import numpy as np
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file({"w": torch.ones(4)}, str(path / "model.safetensors"))
    _save(path / "optimizer.pt", {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]})
    _save(path / "scheduler.pt", {"last_epoch": 3})
    for name in rng_files:
        state = {"python": (3, (1, 2), None), "numpy": np.random.get_state(), "cpu": torch.get_rng_state()}
        _save(path / name, state)
    (path / "trainer_state.json").write_text(json.dumps({"global_step": 3}))
    (path / "training_args.bin").write_bytes(HOSTILE)  # never read on resume: never reported
    return path


def test_missing_rng_states_at_another_world_size_are_warnings(tmp_path: Path) -> None:
    checkpoint = _hf_checkpoint(tmp_path / "checkpoint-3", rng_files=["rng_state_0.pth", "rng_state_1.pth"])
    same = plan_resume(str(checkpoint))
    assert same.ok and same.saved_world_size == 2 and same.world_size == 2
    assert "rng_state_1.pth" in same.files and "training_args.bin" not in same.files
    bigger = plan_resume(str(checkpoint), world_size=3)
    warnings = [f for f in bigger.findings if f.kind == "missing-rng"]
    assert [f.file for f in warnings] == ["rng_state_2.pth"] and warnings[0].severity == "warning"
    assert bigger.ok and bigger.exit_code == 0  # transformers logs a missing RNG file and goes on


def test_the_trainers_own_numpy_allowlist_covers_rng_state_but_a_plain_weights_only_load_does_not(
    tmp_path: Path,
) -> None:
    checkpoint = _hf_checkpoint(tmp_path / "checkpoint-3", rng_files=["rng_state.pth"])
    assert plan_resume(str(checkpoint)).ok  # the Trainer loads it inside its own safe_globals
    plain = plan_resume(str(checkpoint), weights_only=True)
    refused = next(f for f in plain.findings if f.kind == "weights-only")
    assert refused.file == "rng_state.pth" and "numpy.ndarray" in refused.message
    assert "ckptkit.safe_globals()" in refused.fix
    assert plan_resume(str(checkpoint), weights_only=True, safe_globals=True).ok


@pytest.mark.parametrize("file", ["optimizer.pt", "scheduler.pt", "trainer_state.json"])
def test_state_the_trainer_would_silently_start_afresh_fails(tmp_path: Path, file: str) -> None:
    checkpoint = _hf_checkpoint(tmp_path / "checkpoint-3", rng_files=["rng_state.pth"])
    (checkpoint / file).unlink()
    plan = plan_resume(str(tmp_path))  # the output dir: its checkpoint-N dirs mark the layout
    assert [(f.kind, f.file) for f in plan.findings if f.severity == "error"] == [("missing-state", file)]


def test_an_hf_checkpoint_without_weights_fails(tmp_path: Path) -> None:
    checkpoint = _hf_checkpoint(tmp_path / "checkpoint-3", rng_files=["rng_state.pth"])
    (checkpoint / "model.safetensors").unlink()
    assert "missing-weights" in _kinds(plan_resume(str(checkpoint)), "error")


# --- what torch.load meets ---------------------------------------------------------------------


def test_a_hostile_global_is_refused_under_weights_only_and_flagged_without(tmp_path: Path) -> None:
    (tmp_path / "evil.pt").write_bytes(HOSTILE)
    strict = plan_resume(str(tmp_path / "evil.pt"), weights_only=True, safe_globals=True)
    refused = next(f for f in strict.findings if f.kind == "weights-only")
    assert "posix.system" in refused.message or "os.system" in refused.message
    assert refused.fix.startswith("never allow") and "add_safe_globals" not in refused.fix
    assert "ckptkit.safe_load" in refused.fix and not strict.ok
    loose = plan_resume(str(tmp_path / "evil.pt"), weights_only=False)
    runs = next(f for f in loose.findings if f.kind == "runs-code")
    assert runs.severity == "warning" and "system" in runs.message


def test_weights_only_defaults_follow_torch_and_deepspeed_versions(tmp_path: Path) -> None:
    (tmp_path / "stage.pt").write_bytes(ZERO_STAGE_PICKLE)
    assert plan_resume(str(tmp_path / "stage.pt"), torch_version="2.6.0").weights_only is True
    assert plan_resume(str(tmp_path / "stage.pt"), torch_version="2.5.1").weights_only is False
    _ds_tag(tmp_path / "tag")
    assert plan_resume(str(tmp_path / "tag"), deepspeed_version="0.16.4").weights_only is False
    assert plan_resume(str(tmp_path / "tag"), deepspeed_version="0.16.3", torch_version="2.6").weights_only


def test_a_class_the_resuming_deepspeed_lacks_is_a_version_skew(tmp_path: Path) -> None:
    (tmp_path / "stage.pt").write_bytes(ZERO_STAGE_PICKLE)
    old = plan_resume(str(tmp_path / "stage.pt"), weights_only=False, deepspeed_version="0.6.5")
    skew = next(f for f in old.findings if f.kind == "version-skew")
    assert "ZeroStageEnum" in skew.message and "deepspeed 0.6.5" in skew.message and not old.ok
    assert plan_resume(str(tmp_path / "stage.pt"), weights_only=False, deepspeed_version="0.19.8").ok


def test_new_dtypes_are_a_version_skew_for_an_older_torch(tmp_path: Path) -> None:
    _save(tmp_path / "x.pt", {"a": torch.zeros(3, dtype=torch.uint16)})
    plan = plan_resume(str(tmp_path / "x.pt"), torch_version="2.0.1")
    skewed = {f.message.split()[1].rstrip(",") for f in plan.findings if f.kind == "version-skew"}
    assert skewed == {"torch._utils._rebuild_tensor_v3", "torch.uint16"}
    assert plan_resume(str(tmp_path / "x.pt"), torch_version="2.3.0", weights_only=False).ok


def test_version_table() -> None:
    assert parse_version("2.6.0+cpu") == (2, 6, 0) and parse_version("0.16") == (0, 16, 0)
    assert parse_version("2.7.0rc1") == (2, 7, 0)
    moved = "deepspeed.pt.loss_scaler.DynamicLossScaler"
    assert missing_in(moved, {"deepspeed": "0.3.0"}) is not None
    assert missing_in(moved, {"deepspeed": "0.2.9"}) is None
    assert missing_in("torch.uint16", {"torch": None}) is None  # unknown version: no guess
    assert all(row.source and (row.since or row.until) for row in RENAMES)


def test_registered_names_are_what_safe_globals_registers() -> None:
    """The names plan assumes ckptkit.safe_globals() allows are the ones it does register."""
    from ckptkit.safe import vetted_globals

    registered = set()
    for entry in vetted_globals():
        if isinstance(entry, tuple):
            registered.add(entry[1])
        else:
            registered.add(f"{entry.__module__}.{entry.__qualname__}")
    assert ckptkit_registered_names() == registered


def test_transformers_rng_allowlist_matches_the_installed_trainer() -> None:
    import numpy as np
    from transformers.trainer_pt_utils import safe_globals

    with safe_globals():
        allowed = set(torch.serialization.get_safe_globals())
    names = {f"{g.__module__}.{g.__qualname__}" for g in allowed}
    assert transformers_rng_globals(np.__version__) <= names


# --- committed checkpoints ---------------------------------------------------------------------


def test_a_committed_file_that_changed_fails_verification(tmp_path: Path) -> None:
    root = tmp_path / "run"
    _ds_root(root, {"global_step2": True}, latest="global_step2")
    target = root / "global_step2" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    data = bytearray(target.read_bytes())
    data[-30] ^= 0xFF  # same size: only the digest tells
    target.write_bytes(bytes(data))
    assert "unverified" not in _kinds(plan_resume(str(root)))
    assert "unverified" in _kinds(plan_resume(str(root), verify=True), "error")
    target.write_bytes(bytes(data[:-10]))
    assert "unverified" in _kinds(plan_resume(str(root)), "error")


def test_a_remote_checkpoint_is_planned_through_the_store(tmp_path: Path) -> None:
    _ds_tag(tmp_path / "src")
    store = open_store("memory://plan-remote")
    commit_files(store, "global_step4", _contents(tmp_path / "src"), step=4)
    store.put("latest", b"global_step4")
    plan = plan_resume("memory://plan-remote", world_size=2, weights_only=True)
    assert plan.ok and plan.committed and plan.checkpoint == "global_step4"
    assert sorted(plan.files) == [
        "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]


# --- CLI ---------------------------------------------------------------------------------------


def test_cli_text_json_and_exit_codes(tmp_path: Path) -> None:
    _ds_tag(tmp_path / "tag")
    runner = CliRunner()
    ok = runner.invoke(cli, ["plan", str(tmp_path / "tag"), "--world-size", "2"])
    assert ok.exit_code == 0, ok.output
    assert ok.output.startswith("RESUME OK: deepspeed")
    bad = runner.invoke(cli, ["plan", str(tmp_path / "tag"), "--world-size", "3"])
    assert bad.exit_code == 1 and bad.output.startswith("RESUME WILL FAIL")
    assert "world-size" in bad.output and "ckptkit reshard" in bad.output
    as_json = runner.invoke(cli, ["plan", str(tmp_path / "tag"), "--world-size", "3", "--json"])
    data = json.loads(as_json.output)
    assert as_json.exit_code == 1 and data["ok"] is False and data["saved_world_size"] == 2
    assert {f["kind"] for f in data["findings"]} >= {"world-size"}
    assert set(data["rank_bytes"]) == {"0", "1", "2"}
    usage = runner.invoke(cli, ["plan", str(tmp_path / "tag"), "--world-size", "0"])
    assert usage.exit_code == 2
    bad_version = runner.invoke(cli, ["plan", str(tmp_path / "tag"), "--torch-version", "latest"])
    assert bad_version.exit_code == 2 and "not a version" in bad_version.output
    missing = runner.invoke(cli, ["plan", str(tmp_path / "nothing-here")])
    assert missing.exit_code == 4 and "Traceback" not in missing.output
