"""``save`` and ``load``: the native pickle-free format, committed through a manifest.

Under ``torch.distributed`` with more than one rank, a save is collective: each rank writes its
own state into ``rank-NNNNN/`` (``tree.json`` plus shards) of one shared attempt, and rank 0
commits one manifest listing every rank's files (see :mod:`ckptkit.distributed`); with
``replicated=True`` only rank 0's state is written, once, and any number of ranks may load it.
The manifest's ``topology`` records ``world_size``, ``replicated`` and, per rank, its files. A
per-rank checkpoint whose ranks differ only in :class:`~ckptkit.FlatShard` values (a partitioned
optimizer state) loads at any world size, resharded on load.

torch is imported inside these functions, never at module level, so ``import ckptkit`` stays
torch-free for the commands that produce no tensors.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

from ckptkit import lineage
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
from ckptkit.errors import FormatError, NotCommittedError
from ckptkit.manifest import MANIFEST_NAME, FileEntry, Manifest
from ckptkit.native.files import native_files, rank_files
from ckptkit.storage import Store, open_store, split_parent

if TYPE_CHECKING:
    from ckptkit.async_save import BackgroundSaver, SaveHandle
    from ckptkit.native.writer import FileSink

DEFAULT_MAX_SHARD_SIZE = 1 << 30

_log = logging.getLogger(__name__)


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
    dedup: bool = False,
) -> Manifest:
    """Write ``state`` as checkpoint ``name`` under ``root`` and commit it.

    Under ``torch.distributed`` with more than one rank every rank must call it (see
    :func:`save`); ``replicated``, ``timeout_s`` and ``collective`` matter only then.
    """
    from ckptkit.native import write_native

    write = partial(write_native, state, max_shard_size=max_shard_size, jobs=jobs)
    metadata = lineage.stamp(metadata, data=lineage.data_position(global_step=step))
    return _commit_native(
        root, name, write, replicated=replicated, digest=digest, dedup=dedup,
        group=_commit_group(root, name, timeout_s) if collective and world()[1] > 1 else None,
        manifest_options={"step": step, "metadata": metadata, "metrics": metrics},
    )


def start_save_to(
    saver: BackgroundSaver,
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
    dedup: bool = False,
    then: Callable[[Manifest], None] | None = None,
) -> SaveHandle:
    """:func:`save_to` without blocking: wait for ``saver``'s save in flight, stage ``state``
    into host memory, and write and commit it in ``saver``'s thread (:mod:`ckptkit.async_save`).
    ``then`` runs there after the commit (a manager's mirror and retention)."""
    from ckptkit.native.writer import check_write_options, plan_native, write_planned

    saver.wait()  # back-pressure: one save in flight; and a failure of the last is raised here
    check_write_options(max_shard_size, jobs)
    # The commit group is made here, in the caller's thread, where every rank makes its calls
    # in the same order; the background thread then talks only on it, never on the training
    # group, so its collectives cannot interleave with the training loop's.
    group = _commit_group(root, name, timeout_s) if collective and world()[1] > 1 else None
    write: Callable[[FileSink], object]
    try:
        if group is not None and replicated and group.rank != 0:
            write = _write_nothing  # rank 0 alone writes a replicated state
        else:
            staged = saver.stager.stage(plan_native(state))
            write = partial(write_planned, staged, max_shard_size=max_shard_size, jobs=jobs)
    except Exception as exc:
        if group is None:
            raise
        # The other ranks are committing in the background: they learn of it at the gather.
        write = partial(_raise, exc)
    metadata = lineage.stamp(metadata, data=lineage.data_position(global_step=step))  # now, not in the thread

    def job() -> Manifest:
        manifest = _commit_native(
            root, name, write, replicated=replicated, digest=digest, dedup=dedup,
            group=group, manifest_options={"step": step, "metadata": metadata, "metrics": metrics},
        )
        if then is not None:
            then(manifest)
        return manifest

    return saver.submit(f"{root.url}/{name}", step, job)


def _write_nothing(sink: FileSink) -> None:
    return None


def _raise(exc: Exception, sink: FileSink) -> None:
    raise exc


def _commit_group(root: Store, name: str, timeout_s: float) -> CommitGroup:
    try:
        return CommitGroup(timeout_s)
    except DistributedCommitError as exc:
        raise DistributedCommitError(
            f"{root.url}/{name}: {exc}; to save from this rank alone, pass collective=False"
        ) from exc


def _commit_native(
    root: Store,
    name: str,
    write: Callable[[FileSink], object],
    *,
    replicated: bool,
    digest: str | None,
    dedup: bool,
    group: CommitGroup | None,
    manifest_options: dict[str, Any],
) -> Manifest:
    """Run ``write`` into a new checkpoint and commit it: alone, or with every rank of ``group``."""
    if group is not None:
        return _save_ranks(
            group, root, name, write, replicated=replicated, digest=digest, dedup=dedup,
            manifest_options=manifest_options,
        )
    with CheckpointTransaction(root, name, digest=digest, dedup=dedup) as txn:
        write(txn)
        return txn.commit(layout="native", **manifest_options)


def _save_ranks(
    group: CommitGroup,
    root: Store,
    name: str,
    write: Callable[[FileSink], object],
    *,
    replicated: bool,
    digest: str | None,
    dedup: bool,
    manifest_options: dict[str, Any],
) -> Manifest:
    """The collective save: each rank writes its part, rank 0 commits all (see :func:`save`).
    Closes ``group``: in the background thread of a non-blocking save, where destroying it
    touches only that group, which no other thread uses."""
    try:
        attempt = open_shared_attempt(group, root, name, digest=digest, dedup=dedup)
        sink = attempt.sink("" if replicated else rank_dir(group.rank))
        failure: Exception | None = None
        outcome: list[FileEntry] | str
        try:
            if group.rank == 0 or not replicated:
                write(sink)
            outcome = sink.entries
        except Exception as exc:  # reported to every rank at the gather instead of a timeout
            failure, outcome = exc, f"{type(exc).__name__}: {exc}"

        def commit(transaction: CheckpointTransaction, by_rank: Sequence[list[FileEntry]]) -> Manifest:
            topology = _topology(by_rank, replicated)
            return transaction.commit(layout="native", topology=topology, **manifest_options)

        try:
            manifest = commit_shared_attempt(group, attempt, outcome, commit)
        except DistributedCommitError:
            # This rank's pins stay: rank 0 may be committing still (a broadcast that failed
            # after the gather). Unused, they go stale and stop protecting anything.
            if failure is not None:
                raise failure from None  # on the rank that failed, its own error says more
            raise
        attempt.unpin()  # committed: the manifest protects every rank's blobs now
        return manifest
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
    dedup: bool = False,
    blocking: bool = True,
    **storage_options: Any,
) -> Manifest | SaveHandle:
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

    ``dedup=True`` stores each file's bytes once in the blob store of ``url``'s parent (its
    root), shared by every deduplicated checkpoint there: a tensor of 1 MiB or more that a
    checkpoint of the root already holds (a frozen base model, embeddings) is neither written
    nor uploaded again. The manifest still lists every file with its size and digest, and every
    command reads the checkpoint as any other (docs/manifest.md, "Deduplicated files").

    ``blocking=False`` returns a :class:`~ckptkit.SaveHandle` as soon as the state's tensors are
    copied into a host buffer (an unstorable value is still raised here); from then on they may
    change. Hashing, writing and the commit run in a background thread at lower CPU priority;
    ``handle.wait()`` returns the manifest or raises the failure. The process keeps one such
    save in flight: the next non-blocking call waits for it first, and raises its failure if
    nobody has waited for it (:mod:`ckptkit.async_save`). Memory: one extra copy of the state's
    tensor bytes, kept and reused by the next save. Under ``torch.distributed`` it is collective
    as above: each rank stages its state, and its background thread commits on ckptkit's own
    gloo group, never the training group.
    """
    parent, name = split_parent(url)
    store = open_store(parent, **storage_options)
    options: dict[str, Any] = {
        "step": step, "metadata": metadata, "max_shard_size": max_shard_size, "jobs": jobs,
        "replicated": replicated, "timeout_s": timeout_s, "collective": collective, "digest": digest,
        "dedup": dedup,
    }
    if blocking:
        return save_to(store, name, state, **options)
    from ckptkit.async_save import process_saver

    return start_save_to(process_saver(), store, name, state, **options)


def load_from(
    checkpoint: Store,
    *,
    keys: Sequence[str] | None = None,
    map_location: Any = None,
    mmap: bool = True,
    rank: int | None = None,
    world_size: int | None = None,
) -> Any:
    """Load the committed native checkpoint rooted at ``checkpoint`` (see :func:`load`)."""
    from ckptkit.native import read_native

    manifest = read_manifest(checkpoint)
    lineage.resumed_from(checkpoint.url, manifest)
    per_rank = rank_files(checkpoint, manifest)
    options: dict[str, Any] = {"keys": keys, "map_location": map_location, "mmap": mmap}
    if per_rank is None:
        return read_native(native_files(checkpoint, manifest), **options)
    if rank is None:
        if world_size is not None:
            raise ValueError("load: world_size= needs rank=, the rank of that world size to load as")
        rank, world_size = world()
        who = f"this job has {world_size} rank(s)"
    else:
        who = f"world_size={world_size} was asked for"
    if world_size is None or world_size == len(per_rank):
        return read_native(native_files(checkpoint, manifest, rank), **options)
    if not 0 <= rank < world_size:
        raise ValueError(f"load: there is no rank {rank} of world size {world_size}")
    return _load_resharded(checkpoint, manifest, len(per_rank), (rank, world_size), who, options)


def _load_resharded(
    checkpoint: Store,
    manifest: Manifest,
    saved: int,
    target: tuple[int, int],
    who: str,
    options: dict[str, Any],
) -> Any:
    """Rank ``target[0]`` of ``target[1]``'s part of a checkpoint saved per rank by ``saved``
    ranks: possible where what differs per rank is FlatShards (``native/repartition.py``)."""
    from ckptkit.native.repartition import plan_repartition
    from ckptkit.native.repartition_reader import read_repartitioned

    rank, world_size = target
    stores = [native_files(checkpoint, manifest, r) for r in range(saved)]
    try:
        plan = plan_repartition(stores, rank, world_size)
    except FormatError as exc:
        exc.args = (f"{checkpoint.url}: cannot reshard on load: {exc}", *exc.args[1:])
        raise
    if plan is None:
        raise TopologyMismatchError(
            f"{checkpoint.url}: saved by {saved} ranks, each with its own state; {who}. Load it at "
            f"world size {saved}, or read one rank's state with rank=N. To load at any world size, "
            "save what is partitioned across ranks as ckptkit.FlatShard (it is resharded on load) "
            "and state that every rank shares with replicated=True"
        )
    if rank == 0:
        _log.warning(
            "%s: saved by %d ranks, loaded by %d: resharding on load (each rank reads its slice of "
            "every FlatShard, and rank 0's copy of the rest)",
            checkpoint.url, saved, world_size,
        )
    return read_repartitioned(plan, **options)


def load(
    url: str | os.PathLike[str],
    *,
    keys: Sequence[str] | None = None,
    map_location: Any = None,
    mmap: bool = True,
    rank: int | None = None,
    world_size: int | None = None,
    **storage_options: Any,
) -> Any:
    """Load a checkpoint saved by :func:`save`.

    ``url`` is a checkpoint, or a root, in which case its latest committed checkpoint is loaded.
    ``keys`` selects top-level entries and reads only their tensors; ``map_location`` works as
    in ``torch.load``; on local disk tensors are memory-mapped unless ``mmap=False``.

    A checkpoint saved per rank is loaded by each rank of a job with the same world size, each
    reading its own state. At another world size it is resharded on load where the ranks' states
    are one replica apart from :class:`~ckptkit.FlatShard` values (a partitioned optimizer
    state): each rank gets rank 0's replica and its own slice of every FlatShard, by
    :meth:`FlatShard.span <ckptkit.FlatShard.span>`, reading only the byte ranges it needs; rank
    0 logs one warning saying so. A structure that differs between ranks, or FlatShards that do
    not tile their tensor, raise :class:`~ckptkit.errors.FormatError`; per-rank state without
    FlatShards raises :class:`~ckptkit.distributed.TopologyMismatchError`.

    ``rank=N`` reads saved rank N's state whatever the job's world size (offline tools,
    debugging); with ``world_size=M`` too, it reads what rank N of a job of M ranks would.
    Not a collective: no rank waits.
    """
    store = open_store(url, **storage_options)
    if not store.exists(MANIFEST_NAME):
        latest = latest_checkpoint(store)
        if latest is None:
            raise NotCommittedError(f"{store.url}: no committed checkpoint here or below")
        store = store.child(latest.name)
    return load_from(
        store, keys=keys, map_location=map_location, mmap=mmap, rank=rank, world_size=world_size
    )

