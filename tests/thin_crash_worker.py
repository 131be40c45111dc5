"""Child-process body for the thinning crash tests (started from the crash tests' forkserver)."""

from __future__ import annotations

from ckptkit.ops.thin import thin_checkpoint
from ckptkit.storage import open_store


def thin(root: str, name: str, ready) -> None:
    """Thin ``root/name`` to its weights; the parent kills this process at a random moment."""
    store = open_store(root)
    ready.set()
    thin_checkpoint(store, name, keep=("model",))
