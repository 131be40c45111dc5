"""Lineage in the manifest: run id, resume parent, config digest and data position, recorded by
every save path (native, DCP here; DeepSpeed and HF in tests/test_attest.py, Lightning in
tests/test_lightning_integration.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ckptkit
from ckptkit import lineage
from ckptkit.manifest import Manifest


@pytest.fixture(autouse=True)
def _fresh_parent() -> None:
    lineage.forget_parent()


def _lineage(root: Path, name: str) -> dict:
    return ckptkit.read_manifest(ckptkit.open_store(root / name)).metadata["lineage"]


def test_run_id_is_one_per_process_unless_the_environment_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(lineage.RUN_ID_ENV, raising=False)
    assert lineage.run_id() == lineage.run_id() and len(lineage.run_id()) == 16
    code = "from ckptkit import lineage; print(lineage.run_id())"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert other.stdout.strip() != lineage.run_id()  # another process run, another id
    monkeypatch.setenv(lineage.RUN_ID_ENV, "job-42")
    assert lineage.run_id() == "job-42"


def test_a_manager_run_then_a_resume_from_an_older_step_records_the_branch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "run"
    monkeypatch.setenv(lineage.RUN_ID_ENV, "run-a")
    with ckptkit.CheckpointManager(root) as manager:
        for step in (1, 2, 3):
            manager.save(step, {"w": torch.full((2,), float(step))})
    assert _lineage(root, "step-00000002") == {
        "run_id": "run-a", "parent": None, "config_digest": None, "data": {"global_step": 2},
    }

    lineage.forget_parent()  # a new process, in effect
    monkeypatch.setenv(lineage.RUN_ID_ENV, "run-b")
    with ckptkit.CheckpointManager(root) as manager:
        manager.restore(step=1)
        manager.save(4, {"w": torch.zeros(2)}, blocking=False).wait()  # recorded when it was called
    parent = ckptkit.open_store(root / "step-00000001")
    parent_id = ckptkit.read_manifest(parent).checkpoint_id
    assert _lineage(root, "step-00000004") == {
        "run_id": "run-b",
        "parent": {"url": parent.url, "checkpoint_id": parent_id, "step": 1},
        "config_digest": None,
        "data": {"global_step": 4},
    }


def test_save_and_load_record_the_parent_and_user_lineage_fields_win(tmp_path: Path) -> None:
    ckptkit.save({"w": torch.ones(1)}, tmp_path / "a", step=5)
    ckptkit.load(tmp_path / "a")
    ckptkit.save(
        {"w": torch.ones(1)}, tmp_path / "b", step=6,
        metadata={"lineage": {"data": {"epoch": 1, "sampler_seed": 3}}, "note": "kept"},
    )
    metadata = ckptkit.read_manifest(ckptkit.open_store(tmp_path / "b")).metadata
    assert metadata["note"] == "kept"
    assert metadata["lineage"]["parent"]["step"] == 5
    assert metadata["lineage"]["data"] == {"epoch": 1, "sampler_seed": 3}


def test_config_digest_is_canonical_and_ignores_volatile_training_arguments() -> None:
    a = {"lr": 0.1, "optim": {"betas": [0.9, 0.99], "eps": 1e-8}}
    b = {"optim": {"eps": 1e-8, "betas": [0.9, 0.99]}, "lr": 0.1}
    assert lineage.config_digest(a) == lineage.config_digest(b)
    assert lineage.config_digest(a) != lineage.config_digest({**a, "lr": 0.2})
    assert lineage.config_digest(None) is None
    args = {"learning_rate": 1e-3, "seed": 0, "output_dir": "/x", "logging_dir": "/x/logs"}
    moved = {**args, "output_dir": "/y", "logging_dir": "/y/logs", "resume_from_checkpoint": "/x/c-2"}
    assert lineage.training_args_config(args) == lineage.training_args_config(moved) == {
        "learning_rate": 1e-3, "seed": 0,
    }


def test_data_position_keeps_what_is_known_and_refuses_unknown_fields() -> None:
    assert lineage.data_position(epoch=1.5, global_step=7, samples_consumed=None) == {
        "epoch": 1.5, "global_step": 7,
    }
    with pytest.raises(ValueError, match="unknown data position fields"):
        lineage.data_position(shard=3)


def test_a_manifest_without_lineage_reads_as_none() -> None:
    manifest = Manifest.create(step=1, layout="files", files=[], metadata={"lineage": "garbage"})
    assert lineage.Lineage.of(manifest) is None
    assert lineage.Lineage.of(Manifest.create(step=1, layout="files", files=[])) is None


def test_dcp_save_after_restore_dcp_records_the_parent(tmp_path: Path) -> None:
    state = {"w": torch.arange(4.0)}
    with ckptkit.CheckpointManager(tmp_path / "dcp") as manager:
        manager.save_dcp(1, state)
        assert _lineage(tmp_path / "dcp", "step-00000001")["parent"] is None
        # Attestation reads the checkpoint through the same reader: that is not a resume.
        assert ckptkit.attest(str(tmp_path / "dcp" / "step-00000001"), model=state).ok
        assert lineage.current_parent() is None
        manager.restore_dcp({"w": torch.zeros(4)}, step=1)
        manager.save_dcp(2, state)
    first = ckptkit.read_manifest(ckptkit.open_store(tmp_path / "dcp" / "step-00000001"))
    second = _lineage(tmp_path / "dcp", "step-00000002")
    assert second["parent"]["checkpoint_id"] == first.checkpoint_id
    assert second["data"] == {"global_step": 2}
