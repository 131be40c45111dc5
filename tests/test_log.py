"""``ckptkit log ROOT``: the history as a tree from manifests alone; a resume from an older
checkpoint is a branch; --json carries nodes and edges."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import ckptkit
from ckptkit import lineage
from ckptkit.cli.main import cli
from ckptkit.ops.log import checkpoint_log


@pytest.fixture(autouse=True)
def _fresh_parent() -> None:
    lineage.forget_parent()


def _run(root: Path, run_id: str, steps: list[int], monkeypatch: pytest.MonkeyPatch, *,
         resume: int | None = None, metadata: dict | None = None) -> None:
    """One training run: a new process in effect (its own run id, no parent until it restores)."""
    lineage.forget_parent()
    monkeypatch.setenv(lineage.RUN_ID_ENV, run_id)
    with ckptkit.CheckpointManager(root) as manager:
        if resume is not None:
            manager.restore(step=resume)
        for step in steps:
            manager.save(step, {"w": torch.full((2,), float(step))}, metrics={"loss": 1.0 / step},
                         metadata=metadata)


@pytest.fixture
def branched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run A saves 1-3; run B resumes from 1 (older than A's last) and saves 4-5; run C resumes
    from B's last, 5, and saves 6."""
    root = tmp_path / "run"
    _run(root, "run-a", [1, 2, 3], monkeypatch)
    _run(root, "run-b", [4, 5], monkeypatch, resume=1)
    _run(root, "run-c", [6], monkeypatch, resume=5)
    return root


def test_a_resume_from_an_older_checkpoint_is_a_branch(branched: Path) -> None:
    report = checkpoint_log(ckptkit.open_store(branched))
    edges = {(e.parent[-1], e.child[-1], e.kind) for e in report.edges}
    assert edges == {
        ("1", "2", "run"), ("2", "3", "run"),  # run A
        ("1", "4", "resume"), ("4", "5", "run"),  # run B, from step 1: a branch beside A
        ("5", "6", "resume"),  # run C continues B
    }
    assert report.roots() == ["step-00000001"]
    assert report.children()["step-00000001"] == ["step-00000002", "step-00000004"]
    assert all(n.resumable for n in report.nodes)


def test_log_renders_the_tree_with_box_characters(branched: Path) -> None:
    result = CliRunner().invoke(cli, ["log", str(branched)])
    assert result.exit_code == 0, result.output
    shape = [
        "".join(re.match(r"^(.*?)step-0*(\d+)", line).groups())  # type: ignore[union-attr]
        for line in result.output.splitlines()
    ]
    assert shape == ["1", "├─ 2", "│  3", "└─ 4", "   5", "   6"]
    lines = result.output.splitlines()
    assert "step 1" in lines[0] and "loss=1" in lines[0] and "run run-a" in lines[0]
    assert lines[0].endswith("  resumable")
    assert lines[3].endswith("run run-b  resumable  (resumed from step-00000001)")
    assert lines[5].endswith("run run-c  resumable  (resumed from step-00000005)")


def test_log_json_carries_nodes_and_edges(branched: Path) -> None:
    result = CliRunner().invoke(cli, ["log", "--json", str(branched)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert [n["name"] for n in data["nodes"]] == [f"step-0000000{s}" for s in range(1, 7)]
    four = data["nodes"][3]
    assert four["run_id"] == "run-b" and four["step"] == 4 and four["metrics"] == {"loss": 0.25}
    assert four["parent"]["checkpoint_id"] == data["nodes"][0]["checkpoint_id"]
    assert {"parent": "step-00000001", "child": "step-00000004", "kind": "resume"} in data["edges"]
    assert data["roots"] == ["step-00000001"]


def test_a_parent_that_is_gone_makes_a_root_with_a_note(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = tmp_path / "pretrain"
    _run(other, "run-p", [10], monkeypatch)
    root = tmp_path / "finetune"
    lineage.forget_parent()
    monkeypatch.setenv(lineage.RUN_ID_ENV, "run-f")
    ckptkit.load(other / "step-00000010")
    with ckptkit.CheckpointManager(root) as manager:
        manager.save(11, {"w": torch.zeros(1)})
        manager.save(12, {"w": torch.zeros(1)})
    report = checkpoint_log(ckptkit.open_store(root))
    assert report.roots() == ["step-00000011"]
    assert [(e.parent, e.child, e.kind) for e in report.edges] == [("step-00000011", "step-00000012", "run")]
    note = report.nodes[0].note
    assert note is not None and "step-00000010 (step 10), not under this root" in note


def test_thinned_and_incomplete_checkpoints_are_not_resumable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "run"
    _run(root, "run-a", [1], monkeypatch)
    _run(root, "run-a", [2], monkeypatch, metadata={"thinned": True})
    (root / "step-00000003").mkdir()
    (root / "step-00000003" / "tree.json").write_text("{}")  # a save killed before its commit
    report = checkpoint_log(ckptkit.open_store(root))
    assert [(n.name, n.resumable) for n in report.nodes] == [
        ("step-00000001", True), ("step-00000002", False), ("step-00000003", False),
    ]
    assert report.nodes[1].note == "thinned (weights only): not resumable"
    assert report.nodes[2].note == "incomplete: not resumable"
    lines = CliRunner().invoke(cli, ["log", str(root)]).output.splitlines()
    assert lines[1].endswith("NOT resumable  (thinned (weights only): not resumable)")


def test_a_thinned_parent_keeps_its_children(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ckptkit.ops.thin import thin_checkpoint

    root = tmp_path / "run"
    lineage.forget_parent()
    monkeypatch.setenv(lineage.RUN_ID_ENV, "run-a")
    with ckptkit.CheckpointManager(root) as manager:
        manager.save(1, {"model": {"w": torch.ones(2)}, "optimizer": {"m": torch.zeros(2)}})
        manager.restore(step=1)
        manager.save(2, {"model": {"w": torch.ones(2)}, "optimizer": {"m": torch.zeros(2)}})
    thin_checkpoint(ckptkit.open_store(root), "step-00000001")  # a new manifest, a new id
    report = checkpoint_log(ckptkit.open_store(root))
    edges = [(e.parent, e.child, e.kind) for e in report.edges]
    assert edges == [("step-00000001", "step-00000002", "resume")]
    assert [n.resumable for n in report.nodes] == [False, True]


def test_log_reads_manifests_only_and_never_imports_torch(branched: Path) -> None:
    probe = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from ckptkit.cli.main import cli\n"
        f"for args in (['log', {str(branched)!r}], ['log', '--json', {str(branched)!r}]):\n"
        "    assert CliRunner().invoke(cli, args).exit_code == 0\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_log_of_an_empty_root_says_so_as_ls_does(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["log", str(tmp_path / "nope")])
    assert result.exit_code == 0 and result.output.endswith("nope: no checkpoints\n")
