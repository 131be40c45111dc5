"""``CheckpointManager``: periodic saves under one root, latest/restore, and retention."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from ckptkit.api import DEFAULT_MAX_SHARD_SIZE, load_from, save_to
from ckptkit.catalog import CheckpointInfo, latest_checkpoint, list_checkpoints
from ckptkit.commit import delete_checkpoint, step_dir_name
from ckptkit.errors import NotCommittedError
from ckptkit.storage import Store, open_store


def select_expired(committed: list[CheckpointInfo], keep_last: int | None) -> list[CheckpointInfo]:
    """Committed checkpoints that retention removes; the newest is never among them."""
    if keep_last is None or len(committed) <= keep_last:
        return []
    return committed[: len(committed) - keep_last]


class CheckpointManager:
    """Save, find and restore checkpoints ``step-<N>`` under ``root_url`` (a path or a URL).

    ``save`` commits atomically and only then applies retention (``keep_last``), so a crash can
    cost at most the checkpoint being written, never one already committed.
    """

    def __init__(
        self,
        root_url: str | os.PathLike[str] | Store,
        *,
        keep_last: int | None = None,
        max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
        jobs: int = 4,
        **storage_options: Any,
    ) -> None:
        if keep_last is not None and keep_last < 1:
            raise ValueError("keep_last must be at least 1 (the newest checkpoint is always kept)")
        self.root = open_store(root_url, **storage_options)
        self.keep_last = keep_last
        self.max_shard_size = max_shard_size
        self.jobs = jobs

    def save(
        self,
        step: int,
        state: Any,
        *,
        metrics: dict[str, float] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> CheckpointInfo:
        """Commit ``state`` as checkpoint ``step``, then apply retention."""
        name = step_dir_name(step)
        manifest = save_to(
            self.root, name, state, step=step, metadata=metadata, metrics=metrics,
            max_shard_size=self.max_shard_size, jobs=self.jobs,
        )
        self._apply_retention()
        return CheckpointInfo(
            self.root.url, name, "committed", step, len(manifest.files), manifest.total_size,
            manifest.created, manifest,
        )

    def _apply_retention(self) -> None:
        for info in select_expired(self.list(), self.keep_last):
            delete_checkpoint(self.root, info.name)

    def list(self) -> list[CheckpointInfo]:
        """Committed checkpoints, oldest first."""
        return [c for c in list_checkpoints(self.root) if c.committed]

    def latest(self) -> CheckpointInfo | None:
        """The newest committed checkpoint, or None."""
        return latest_checkpoint(self.root)

    def restore(
        self,
        step: int | None = None,
        *,
        keys: Sequence[str] | None = None,
        map_location: Any = None,
        mmap: bool = True,
    ) -> Any:
        """Load checkpoint ``step`` (the latest committed one by default)."""
        if step is None:
            info = self.latest()
            if info is None:
                raise NotCommittedError(f"{self.root.url}: no committed checkpoint to restore")
            name = info.name
        else:
            name = step_dir_name(step)
        return load_from(self.root.child(name), keys=keys, map_location=map_location, mmap=mmap)

    def close(self) -> None:
        self.root.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
