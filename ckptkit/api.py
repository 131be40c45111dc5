"""``save`` and ``load``: the native pickle-free format, committed through a manifest.

torch is imported inside these functions, never at module level, so ``import ckptkit`` stays
torch-free for the commands that produce no tensors.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from ckptkit.catalog import latest_checkpoint, read_manifest
from ckptkit.commit import CheckpointTransaction
from ckptkit.errors import FormatError, InvalidURLError, NotCommittedError
from ckptkit.manifest import MANIFEST_NAME, Manifest
from ckptkit.storage import Store, open_store

DEFAULT_MAX_SHARD_SIZE = 1 << 30
NATIVE_TREE = "tree.json"


def split_parent(url: str | os.PathLike[str]) -> tuple[str, str]:
    """``("s3://b/run", "step-1")`` for ``s3://b/run/step-1``; the same for local paths."""
    text = os.fspath(url).rstrip("/")
    scheme, sep, rest = text.partition("://")
    body = rest if sep else text
    if "/" not in body.strip("/"):
        if sep:
            raise InvalidURLError(f"{text!r}: a checkpoint needs a parent (s3://bucket/name at least)")
        return ".", body
    parent, name = body.rsplit("/", 1)
    return (f"{scheme}://{parent}" if sep else parent or "/"), name


def save_to(
    root: Store,
    name: str,
    state: Any,
    *,
    step: int | None = None,
    metadata: dict[str, Any] | None = None,
    metrics: dict[str, float] | None = None,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    jobs: int = 4,
) -> Manifest:
    """Write ``state`` as checkpoint ``name`` under ``root`` and commit it."""
    from ckptkit.native import write_native

    with CheckpointTransaction(root, name) as txn:
        write_native(state, txn, max_shard_size=max_shard_size, jobs=jobs)
        return txn.commit(step=step, layout="native", metadata=metadata, metrics=metrics)


def save(
    state: Any,
    url: str | os.PathLike[str],
    *,
    step: int | None = None,
    metadata: dict[str, Any] | None = None,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    jobs: int = 4,
    **storage_options: Any,
) -> Manifest:
    """Save ``state`` (a nested tree of tensors, containers and scalars) as a checkpoint at ``url``.

    The checkpoint is visible only once complete: a crash at any moment leaves either nothing or
    debris that ``ckptkit gc`` removes, never a checkpoint that looks whole but is not.
    """
    parent, name = split_parent(url)
    return save_to(
        open_store(parent, **storage_options), name, state,
        step=step, metadata=metadata, max_shard_size=max_shard_size, jobs=jobs,
    )


def native_files(checkpoint: Store, manifest: Manifest) -> Store:
    """The store holding a native checkpoint's ``tree.json`` and shards."""
    trees = [f.path for f in manifest.files if f.path.rsplit("/", 1)[-1] == NATIVE_TREE]
    if manifest.layout != "native" or len(trees) != 1:
        raise FormatError(
            f"{checkpoint.url}: layout '{manifest.layout}' is not a ckptkit native checkpoint; "
            "use the format's own loader (or 'ckptkit convert')"
        )
    prefix = trees[0].rpartition("/")[0]
    return checkpoint.child(prefix) if prefix else checkpoint


def load_from(
    checkpoint: Store,
    *,
    keys: Sequence[str] | None = None,
    map_location: Any = None,
    mmap: bool = True,
) -> Any:
    """Load the committed native checkpoint rooted at ``checkpoint``."""
    from ckptkit.native import read_native

    manifest = read_manifest(checkpoint)
    return read_native(native_files(checkpoint, manifest), keys=keys, map_location=map_location, mmap=mmap)


def load(
    url: str | os.PathLike[str],
    *,
    keys: Sequence[str] | None = None,
    map_location: Any = None,
    mmap: bool = True,
    **storage_options: Any,
) -> Any:
    """Load a checkpoint saved by :func:`save`.

    ``url`` is a checkpoint, or a root, in which case its latest committed checkpoint is loaded.
    ``keys`` selects top-level entries and reads only their tensors; ``map_location`` works as
    in ``torch.load``; on local disk tensors are memory-mapped unless ``mmap=False``.
    """
    store = open_store(url, **storage_options)
    if not store.exists(MANIFEST_NAME):
        latest = latest_checkpoint(store)
        if latest is None:
            raise NotCommittedError(f"{store.url}: no committed checkpoint here or below")
        store = store.child(latest.name)
    return load_from(store, keys=keys, map_location=map_location, mmap=mmap)

