"""examples/hf_trainer.py runs end to end: killed mid-save, resumed from the last committed checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ckptkit.catalog import list_checkpoints
from ckptkit.manifest import MANIFEST_NAME
from ckptkit.storage import open_store
from tests.fixtures._common import REPO_ROOT
from tests.fixtures.gen_hf import OFFLINE_ENV

# Each test runs the example in a fresh interpreter (transformers import, a Trainer run, a kill).
pytestmark = pytest.mark.slow


def test_hf_trainer_example(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "examples/hf_trainer.py", "--root", str(tmp_path)],
        cwd=REPO_ROOT, env={**os.environ, **OFFLINE_ENV}, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line.split() for line in result.stdout.splitlines()]
    assert ["checkpoint-8", "incomplete"] in lines  # after the kill
    assert "HF get_last_checkpoint -> checkpoint-8" in result.stdout
    assert "latest_committed_checkpoint -> checkpoint-6" in result.stdout
    assert "3. resume: from checkpoint-6, finished at step 10" in result.stdout
    assert result.stdout.rstrip().endswith("ok")

    output = tmp_path / "output"
    infos = list_checkpoints(open_store(output))
    # Retention (2 newest + best eval_loss) ran after each commit of the resumed run.
    assert [(c.name, c.status) for c in infos] == [
        ("checkpoint-8", "committed"), ("checkpoint-10", "committed")
    ]
    for info in infos:
        assert info.manifest is not None and "eval_loss" in info.manifest.metrics
    state = json.loads((output / "checkpoint-8" / "trainer_state.json").read_text())
    assert state["global_step"] == 8  # rewritten whole by the resumed run
    assert (output / "checkpoint-10" / MANIFEST_NAME).is_file()


def test_hf_trainer_example_refuses_a_used_root(tmp_path: Path) -> None:
    (tmp_path / "output").mkdir()
    (tmp_path / "output" / "checkpoint-2").mkdir()
    result = subprocess.run(
        [sys.executable, "examples/hf_trainer.py", "--root", str(tmp_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2 and "is not empty" in result.stderr
    assert "Traceback" not in result.stderr
