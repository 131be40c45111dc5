"""examples/lightning_train.py end to end: killed mid-save, resumed from the newest committed checkpoint."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from ckptkit.catalog import list_checkpoints
from ckptkit.commit import STAGING_MARKER
from ckptkit.storage import open_store

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "lightning_train.py"


@pytest.mark.slow
def test_lightning_example_crashes_resumes_and_matches(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--root", str(tmp_path / "demo")],
        capture_output=True, text=True, timeout=300,
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr

    # The child was killed during a save of epoch 2, whose staging directory was left uncommitted.
    killed = re.search(r"crash: killed while writing (\S+)", out)
    assert killed and STAGING_MARKER in killed.group(1), out
    assert re.search(r"\.\S+ckptkit-staging-\S+\s+NOT committed \(debris\)", out), out

    # The resume started from a committed checkpoint saved before the crash, never from the debris.
    resumed_from = Path(re.search(r"resume from: (\S+)", out).group(1)).name
    after_crash = out.split("after the crash:")[1].split("resume from:")[0]
    assert re.search(rf"^  {re.escape(resumed_from)}\s+committed$", after_crash, re.M), out
    assert "identical to the uninterrupted run: yes" in out
    fingerprints = re.findall(r"steps, fingerprint ([0-9a-f]{16})", out)
    assert len(fingerprints) == 2 and fingerprints[0] == fingerprints[1]

    # gc removed the debris; what is left is every epoch, committed and verified.
    run = tmp_path / "demo" / "run"
    assert not any(STAGING_MARKER in p.name for p in run.iterdir())
    checkpoints = list_checkpoints(open_store(run))
    assert all(c.committed for c in checkpoints)
    assert {c.name for c in checkpoints} == {
        "epoch=0-step=8.ckpt", "epoch=1-step=16.ckpt", "epoch=2-step=24.ckpt", "epoch=3-step=32.ckpt",
        "last.ckpt",
    }
    assert re.search(r"verify: (\d+)/\1 checkpoints ok", out), out
