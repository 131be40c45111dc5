"""Small helpers shared by tests."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from ckptkit.commit import CheckpointTransaction
from ckptkit.manifest import Manifest
from ckptkit.storage import Store, open_store


def commit_files(root: Store, name: str, files: dict[str, bytes], step: int | None = None) -> Manifest:
    """Commit a checkpoint of raw files through the real commit protocol."""
    with CheckpointTransaction(root, name) as txn:
        for path, data in files.items():
            txn.write(path, data)
        return txn.commit(step=step, layout="files")


def sample_files(seed: int = 0) -> dict[str, bytes]:
    return {
        "model.bin": bytes((i * 7 + seed) % 251 for i in range(300_000)),
        "optim/state.bin": bytes((i * 13 + seed) % 241 for i in range(120_000)),
        "meta.json": b'{"step": %d}' % seed,
    }


def start_trainer_mid_upload(script: str, root: Path, remote: str, step_dir: str) -> subprocess.Popen[str]:
    """Run ``script`` (it saves under ``root`` with a mirror at ``remote``, prints "committed"
    and sleeps) until the mirror's upload of ``step_dir`` is under way; the caller kills it."""
    command = [sys.executable, "-c", script, str(root), remote]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=dict(os.environ))
    assert child.stdout is not None and child.stdout.readline().strip() == "committed"
    store = open_store(remote)
    deadline = time.monotonic() + 60
    while not any(True for _ in store.list(step_dir)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return child
