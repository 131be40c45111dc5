"""examples/plain_pytorch.py runs end to end with its mirror on the moto S3 server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ckptkit.catalog import list_checkpoints
from ckptkit.ops.verify import verify_checkpoint
from ckptkit.storage import open_store
from tests.fixtures._common import REPO_ROOT

# The example trains, is killed, and resumes from its S3 mirror, in a fresh interpreter.
pytestmark = pytest.mark.slow


def test_plain_pytorch_example_resumes_from_the_s3_mirror(tmp_path: Path, s3_bucket: str) -> None:
    mirror = f"{s3_bucket}/plain"
    result = subprocess.run(
        [sys.executable, "examples/plain_pytorch.py", "--root", str(tmp_path / "run"), "--mirror", mirror],
        cwd=REPO_ROOT,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "resumed from " + mirror + ": step 30" in result.stdout
    assert "final weights equal the uninterrupted run's, bit for bit: True" in result.stdout
    assert "0 failed" in result.stdout

    store = open_store(mirror)
    names = [c.name for c in list_checkpoints(store) if c.committed]
    # The first run's survivors of retention (step 20 is the best loss), then the resumed run's.
    assert names == ["step-00000020", "step-00000030", "step-00000050", "step-00000060"]
    assert all(verify_checkpoint(store.child(name)).ok for name in names)
