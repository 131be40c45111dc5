"""Small helpers shared by tests."""

from __future__ import annotations

from ckptkit.commit import CheckpointTransaction
from ckptkit.manifest import Manifest
from ckptkit.storage import Store


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
