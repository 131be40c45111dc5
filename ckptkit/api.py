"""``save`` and ``load``: the native pickle-free format, committed through a manifest.

Under ``torch.distributed`` with more than one rank, a save is collective: each rank writes its
own state into ``rank-NNNNN/`` (``tree.json`` plus shards) of one shared attempt, and rank 0
commits one manifest listing every rank's files (see :mod:`ckptkit.distributed`); with
``replicated=True`` only rank 0's state is written, once, and any number of ranks may load it.
The manifest's ``topology`` records ``world_size``, ``replicated`` and, per rank, its files.

torch is imported inside these functions, never at module level, so ``import ckptkit`` stays
torch-free for the commands that produce no tensors.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from ckptkit.catalog import latest_checkpoint, read_manifest
from ckptkit.commit import CheckpointTransaction, logical_path
from ckptkit.distributed import (
    DEFAULT_TIMEOUT_S,
    CommitGroup,
    DistributedCommitError,
    TopologyMismatchError,
    commit_shared_attempt,
    open_shared_attempt,
    world,
)
from ckptkit.errors import NotCommittedError
from ckptkit.manifest import MANIFEST_NAME, FileEntry, Manifest
from ckptkit.native.files import native_files, rank_files
from ckptkit.storage import Store, open_store, split_parent

DEFAULT_MAX_SHARD_SIZE = 1 << 30


def rank_dir(rank: int) -> str:
    """``rank-00001``: where one rank's tree and shards go in a per-rank native checkpoint."""
    return f"rank-{rank:05d}"


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
    replicated: bool = False,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    collective: bool = True,
    digest: str | None = None,
) -> Manifest:
    """Write ``state`` as checkpoint ``name`` under ``root`` and commit it.

    Under ``torch.distributed`` with more than one rank every rank must call it (see
    :func:`save`); ``replicated``, ``timeout_s`` and ``collective`` matter only then.
    """
    from ckptkit.native import write_native

    if collective and world()[1] > 1:
        return _save_ranks(
            root, name, state, replicated=replicated, timeout_s=timeout_s, digest=digest,
            write_options={"max_shard_size": max_shard_size, "jobs": jobs},
            manifest_options={"step": step, "metadata": metadata, "metrics": metrics},
        )
    with CheckpointTransaction(root, name, digest=digest) as txn:
        write_native(state, txn, max_shard_size=max_shard_size, jobs=jobs)
        return txn.commit(step=step, layout="native", metadata=metadata, metrics=metrics)


def _save_ranks(
    root: Store,
    name: str,
    state: Any,
    *,
    replicated: bool,
    timeout_s: float,
    digest: str | None,
    write_options: dict[str, Any],
    manifest_options: dict[str, Any],
) -> Manifest:
    """The collective save: each rank writes its part, rank 0 commits all (see :func:`save`)."""
    from ckptkit.native import write_native

    try:
        group = CommitGroup(timeout_s)
    except DistributedCommitError as exc:
        raise DistributedCommitError(
            f"{root.url}/{name}: {exc}; to save from this rank alone, pass collective=False"
        ) from exc
    try:
        attempt = open_shared_attempt(group, root, name, digest=digest)
        sink = attempt.sink("" if replicated else rank_dir(group.rank))
        failure: Exception | None = None
        outcome: list[FileEntry] | str
        try:
            if group.rank == 0 or not replicated:
                write_native(state, sink, **write_options)
            outcome = sink.entries
        except Exception as exc:  # reported to every rank at the gather instead of a timeout
            failure, outcome = exc, f"{type(exc).__name__}: {exc}"

        def commit(transaction: CheckpointTransaction, by_rank: Sequence[list[FileEntry]]) -> Manifest:
            topology = _topology(by_rank, replicated)
            return transaction.commit(layout="native", topology=topology, **manifest_options)

        try:
            return commit_shared_attempt(group, attempt, outcome, commit)
        except DistributedCommitError:
            if failure is not None:
                raise failure from None  # on the rank that failed, its own error says more
            raise
    finally:
        group.close()


def _topology(by_rank: Sequence[list[FileEntry]], replicated: bool) -> dict[str, Any]:
    if replicated:
        return {"world_size": len(by_rank), "replicated": True}
    return {
        "world_size": len(by_rank),
        "replicated": False,
        # Paths as laid out in the checkpoint, without the attempt prefix: they stay true
        # wherever ``sync`` or a mirror commits the checkpoint.
        "ranks": [
            {"rank": r, "files": sorted(logical_path(e.path) for e in entries)}
            for r, entries in enumerate(by_rank)
        ],
    }


def save(
    state: Any,
    url: str | os.PathLike[str],
    *,
    step: int | None = None,
    metadata: dict[str, Any] | None = None,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    jobs: int = 4,
    replicated: bool = False,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    collective: bool = True,
    digest: str | None = None,
    **storage_options: Any,
) -> Manifest:
    """Save ``state`` (a nested tree of tensors, containers and scalars) as a checkpoint at ``url``.

    The checkpoint is visible only once complete: a crash at any moment leaves either nothing or
    debris that ``ckptkit gc`` removes, never a checkpoint that looks whole but is not.

    Under ``torch.distributed`` with more than one rank, every rank calls it with the same
    ``url`` and passes its own ``state``; each rank's state is written, and rank 0's ``step``
    and ``metadata`` go into the one manifest. With ``replicated=True`` only rank 0's state is
    written (the others' is ignored) and any number of ranks may load it. If any rank fails or
    dies, nothing is committed: that rank raises its own error, the others
    :class:`~ckptkit.distributed.DistributedCommitError`, at the latest after ``timeout_s``.
    Every rank returns the committed manifest. ``collective=False`` saves this rank's state
    alone, as a single process would (the ``if rank == 0: save(...)`` pattern).

    ``digest`` is how file contents are hashed into the manifest: ``"blake3"`` (the default) or
    ``"sha256"`` where a policy requires it; None takes the ``CKPTKIT_DIGEST`` environment
    variable, then BLAKE3. Either verifies the same way; an unknown name is a ValueError.
    """
    parent, name = split_parent(url)
    return save_to(
        open_store(parent, **storage_options), name, state,
        step=step, metadata=metadata, max_shard_size=max_shard_size, jobs=jobs,
        replicated=replicated, timeout_s=timeout_s, collective=collective, digest=digest,
    )


def load_from(
    checkpoint: Store,
    *,
    keys: Sequence[str] | None = None,
    map_location: Any = None,
    mmap: bool = True,
    rank: int | None = None,
) -> Any:
    """Load the committed native checkpoint rooted at ``checkpoint`` (see :func:`load`)."""
    from ckptkit.native import read_native

    manifest = read_manifest(checkpoint)
    per_rank = rank_files(checkpoint, manifest)
    if per_rank is not None and rank is None:
        rank, world_size = world()
        if world_size != len(per_rank):
            raise TopologyMismatchError(
                f"{checkpoint.url}: saved by {len(per_rank)} ranks, each with its own state; this job "
                f"has {world_size} rank(s). Load it at world size {len(per_rank)}, or read one rank's "
                "state with rank=N (state that every rank shares: save it with replicated=True)"
            )
    files = native_files(checkpoint, manifest, rank)
    return read_native(files, keys=keys, map_location=map_location, mmap=mmap)


def load(
    url: str | os.PathLike[str],
    *,
    keys: Sequence[str] | None = None,
    map_location: Any = None,
    mmap: bool = True,
    rank: int | None = None,
    **storage_options: Any,
) -> Any:
    """Load a checkpoint saved by :func:`save`.

    ``url`` is a checkpoint, or a root, in which case its latest committed checkpoint is loaded.
    ``keys`` selects top-level entries and reads only their tensors; ``map_location`` works as
    in ``torch.load``; on local disk tensors are memory-mapped unless ``mmap=False``.

    A checkpoint saved per rank is loaded by each rank of a job with the same world size, each
    reading its own state; another world size raises
    :class:`~ckptkit.distributed.TopologyMismatchError`. ``rank=N`` reads rank N's state
    whatever the world size (offline tools, debugging). Not a collective: no rank waits.
    """
    store = open_store(url, **storage_options)
    if not store.exists(MANIFEST_NAME):
        latest = latest_checkpoint(store)
        if latest is None:
            raise NotCommittedError(f"{store.url}: no committed checkpoint here or below")
        store = store.child(latest.name)
    return load_from(store, keys=keys, map_location=map_location, mmap=mmap, rank=rank)

