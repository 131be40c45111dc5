"""The README's demo, end to end: crash mid-save, resume, bit-identical training, clean root."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import ckptkit

DEMO = Path(__file__).resolve().parents[1] / "examples" / "train_and_resume.py"


@pytest.mark.slow
def test_demo_kills_mid_save_and_resumes_bit_for_bit(tmp_path: Path) -> None:
    root = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, str(DEMO), "--root", str(root)], capture_output=True, text=True, timeout=300
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "killed mid-save: .step-00000080.ckptkit-staging-" in output
    assert "latest() -> step-00000060" in output
    assert "steps 61-120: loss, lr and loss scale equal the reference bit for bit" in output
    assert "OK: 3 checkpoint(s) checked" in output

    latest = ckptkit.CheckpointManager(root).latest()
    assert latest is not None and latest.committed and latest.step == 120
    reports = ckptkit.verify_tree(ckptkit.open_store(root))
    assert [r.step for r in reports] == [80, 100, 120]
    assert all(r.ok and r.status == "ok" for r in reports)
    # gc removed the killed save's staging directory: nothing is left but the checkpoints.
    assert sorted(p.name for p in root.iterdir()) == ["step-00000080", "step-00000100", "step-00000120"]
