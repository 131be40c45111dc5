"""examples/lora_dedup.py runs end to end on a tiny base: dedup stores the frozen base once,
retention thins all but the two newest checkpoints, and the resume is bit for bit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ckptkit
from ckptkit import CheckpointManager
from tests.fixtures._common import REPO_ROOT

# The example trains twice (reference and checkpointed run) and resumes, in a fresh interpreter.
pytestmark = pytest.mark.slow

LAYERS, WIDTH = 3, 512  # each base weight 1 MiB: the smallest tensor that gets a blob of its own
BASE_BYTES = LAYERS * (WIDTH * WIDTH + WIDTH) * 4


def unique_bytes(root: Path) -> int:
    sizes = {}
    for path in root.rglob("*"):
        if path.is_file():
            info = path.lstat()
            sizes[(info.st_dev, info.st_ino)] = info.st_size
    return sum(sizes.values())


def test_lora_dedup_example_stores_the_base_once_thins_and_resumes(tmp_path: Path) -> None:
    root = tmp_path / "lora"
    result = subprocess.run(
        [sys.executable, "examples/lora_dedup.py", "--root", str(root), "--layers", str(LAYERS),
         "--width", str(WIDTH)],
        cwd=REPO_ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    # Stopped at step 37 with step-35 resumable (the two newest are): restore() starts there.
    assert "restore() picked step-00000035 (step 35), the newest resumable one" in out
    assert "every checkpoint verifies: True" in out
    assert "final weights equal the uninterrupted run's, bit for bit: True" in out
    # After the first save, a save writes the adapters and AdamW's state, never the base again.
    later_saves = [line for line in out.splitlines() if "MB written" in line][1:]
    assert len(later_saves) == 9
    assert all(float(line.split("saved: ")[1].split(" MB")[0]) * 1e6 < BASE_BYTES / 4 for line in later_saves)

    checkpoints = CheckpointManager(root).list()
    assert [c.name for c in checkpoints] == [f"step-{s:08d}" for s in (30, 35, 40, 45, 50)]
    assert [c.resumable for c in checkpoints] == [False, False, False, True, True]
    # Five checkpoints each hold the whole base, the disk holds it once.
    assert sum(c.size for c in checkpoints) > 5 * BASE_BYTES
    assert unique_bytes(root) < 1.5 * BASE_BYTES

    oldest = ckptkit.load(root / "step-00000030")
    newest = ckptkit.load(root / "step-00000050")
    assert set(oldest) == {"model"}  # thinned: weights only
    assert set(newest) == {"model", "optimizer", "step"} and newest["step"] == 50
    for key, value in newest["model"].items():
        if ".base." in key:  # frozen: the same bytes, in one blob on disk
            assert torch.equal(oldest["model"][key], value), key
        else:  # the adapters trained on
            assert not torch.equal(oldest["model"][key], value), key
