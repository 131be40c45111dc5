"""Multi-rank saves: every rank writes its own files into one attempt, one rank commits them all.

The protocol shared by ckptkit's native multi-rank saves (:func:`ckptkit.api.save_to`) and its
DeepSpeed checkpoint engine:

1. :func:`open_shared_attempt` (all ranks): rank 0 opens the
   :class:`~ckptkit.commit.CheckpointTransaction` and broadcasts where its files go (the local
   staging directory, or the object-store attempt prefix ``ckptkit-<id>/``) and its digest
   algorithm, so that every rank writes into the same attempt and hashes as rank 0 chose. A
   failure to open reaches every rank.
2. Each rank writes its files through an :class:`AttemptSink`, which hashes them on the way and
   keeps their :class:`~ckptkit.manifest.FileEntry`.
3. :func:`commit_shared_attempt` (all ranks): the entries, or a rank's failure, are gathered on
   the :class:`CommitGroup`: this is the barrier. Rank 0 commits ONE manifest that lists every
   rank's files and broadcasts the outcome. A rank that failed, died or did not arrive within the
   group's timeout means no commit, and every surviving rank raises :class:`DistributedCommitError`.

The collectives run on a gloo group of their own, with its own timeout: whatever the training
backend (NCCL's default timeout is 30 minutes), a dead rank costs the survivors at most
``timeout_s``, and object collectives on gloo need no GPU. torch is imported inside functions:
``import ckptkit`` stays torch-free.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ckptkit.blobs import DedupFiles
from ckptkit.commit import CheckpointTransaction, FileRecorder, attempt_id
from ckptkit.errors import CkptkitError
from ckptkit.errors import TopologyMismatchError as TopologyMismatchError  # its documented home
from ckptkit.hashing import choose_algorithm
from ckptkit.manifest import FileEntry, Manifest, parse_manifest, validate_path
from ckptkit.storage.base import Store

DEFAULT_TIMEOUT_S = 300.0
logger = logging.getLogger("ckptkit.distributed")

# What a rank contributes to the gather: its files' entries, or why it failed.
RankOutcome = list[FileEntry] | str


class DistributedCommitError(CkptkitError, RuntimeError):
    """A multi-rank save was not committed: a rank failed, died or timed out, or the commit failed."""


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group; ``(0, 1)`` when there is none."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


class CommitGroup:
    """A gloo process group for the commit collectives, with its own timeout.

    Creating it is a collective over the default group: every rank constructs it at the same
    point. Without an initialised default group it is a group of one, whose collectives are local.
    """

    def __init__(self, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        import torch.distributed as dist

        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self.timeout = dt.timedelta(seconds=timeout_s)
        self.rank, self.world_size = world()
        self._group = None
        if dist.is_initialized():
            try:
                self._group = dist.new_group(backend="gloo", timeout=self.timeout)
            except Exception as exc:  # a rank that never makes the call (or died) must not hang us
                raise DistributedCommitError(
                    f"not all {self.world_size} ranks joined ckptkit's commit group within {timeout_s:g} s: "
                    f"every rank must make the same call ({_describe(exc)})"
                ) from exc

    @property
    def timeout_s(self) -> float:
        return self.timeout.total_seconds()

    def broadcast_from_0(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank."""
        if self._group is None:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0, group=self._group)
        return box[0]

    def all_gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, indexed by rank, on every rank."""
        if self._group is None:
            return [value]
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value, group=self._group)
        return gathered

    def close(self) -> None:
        """Release the group (after a peer died too: it only frees this process's side)."""
        if self._group is None:
            return
        import torch.distributed as dist

        group, self._group = self._group, None
        if dist.is_initialized():
            dist.destroy_process_group(group)


class AttemptSink(FileRecorder):
    """Writes one rank's files into a shared attempt, hashing them; a ``FileSink`` for
    :func:`ckptkit.native.write_native`. ``prefix`` places the files (``rank-00001``)."""


@dataclass
class SharedAttempt:
    """One multi-rank save in progress, as each rank knows it."""

    root: Store
    name: str
    files: Store  # where every rank's files go (one attempt for all)
    data_prefix: str  # the attempt prefix inside the checkpoint ("" for local staging)
    transaction: CheckpointTransaction | None  # rank 0 only
    digest: str  # the algorithm every rank hashes its files with (rank 0's choice)
    dedup: DedupFiles | None = None  # this rank's blob side, when the save deduplicates

    @property
    def where(self) -> str:
        return f"{self.root.url}/{self.name}"

    def sink(self, prefix: str = "") -> AttemptSink:
        return AttemptSink(self.files, self.data_prefix, prefix, digest=self.digest, dedup=self.dedup)

    def unpin(self) -> None:
        """Drop this rank's pins: once the commit is decided, either way (``ckptkit.blobs``)."""
        if self.dedup is not None:
            self.dedup.writer.close()


def open_shared_attempt(
    group: CommitGroup, root: Store, name: str, *, digest: str | None = None, dedup: bool = False
) -> SharedAttempt:
    """Start a save of checkpoint ``name`` that every rank writes into (collective).

    ``digest`` is as for :class:`CheckpointTransaction`; rank 0's choice (its ``CKPTKIT_DIGEST``
    where None) holds for every rank, so that one manifest has one algorithm. If rank 0 cannot
    start it (already committed, storage error), rank 0 raises that error and the other ranks
    raise :class:`DistributedCommitError` quoting it.
    """
    name = validate_path(name)
    choose_algorithm(digest)  # a bad name fails on every rank alike, before any collective
    opened: tuple[str, str, str] | str = ""
    transaction = None
    failure: Exception | None = None
    if group.rank == 0:
        try:
            transaction = CheckpointTransaction(root, name, digest=digest, dedup=dedup)
            opened = (transaction.attempt_key, transaction.data_prefix, transaction.digest)
        except Exception as exc:  # every rank must learn of it, or the others would wait
            failure = exc
            opened = _describe(exc)
    opened = group.broadcast_from_0(opened)
    if failure is not None:
        raise failure
    if isinstance(opened, str):
        raise DistributedCommitError(f"{root.url}/{name}: cannot start the save on rank 0: {opened}")
    files_key, data_prefix, algorithm = opened
    if transaction is not None:
        blobs = transaction.dedup
    else:  # each rank pins what it writes; the attempt id names the pins
        blobs = DedupFiles(root, files_key, attempt_id(files_key)) if dedup else None
    return SharedAttempt(root, name, root.child(files_key), data_prefix, transaction, algorithm, blobs)


# Rank 0's commit step: given the transaction (all ranks' entries added) and every rank's
# entries (by rank), commit the manifest and return it.
CommitFn = Callable[[CheckpointTransaction, Sequence[list[FileEntry]]], Manifest]


def commit_shared_attempt(
    group: CommitGroup, attempt: SharedAttempt, outcome: RankOutcome, commit: CommitFn
) -> Manifest:
    """Gather every rank's ``outcome`` and, if all succeeded, commit on rank 0 (collective).

    Returns the committed manifest on every rank. Raises :class:`DistributedCommitError` on every
    rank when any rank failed (its ``outcome`` was an error text), died, or did not arrive within
    the group's timeout, or when the commit failed; nothing is committed then.
    """
    try:
        gathered = group.all_gather(outcome)
    except Exception as exc:  # a dead peer (connection reset) or a timeout
        _abort(attempt)
        raise DistributedCommitError(
            f"{attempt.where}: not committed: a rank failed, died or did not reach the commit within "
            f"{group.timeout_s:g} s ({_describe(exc)})"
        ) from exc
    failed = [(rank, text) for rank, text in enumerate(gathered) if isinstance(text, str)]
    if failed:
        _abort(attempt)
        reasons = "; ".join(f"rank {rank}: {text}" for rank, text in failed)
        raise DistributedCommitError(f"{attempt.where}: not committed: {reasons}")

    status: tuple[str, bytes | None] = ("ok", None)
    if attempt.transaction is not None:
        try:
            attempt.transaction.add_entries(e for entries in gathered for e in entries)
            status = ("ok", commit(attempt.transaction, gathered).to_bytes())
        except Exception as exc:
            attempt.transaction.abort()  # a no-op once committed
            status = (_describe(exc), None)
    try:
        message, manifest_bytes = group.broadcast_from_0(status)
    except Exception as exc:  # a peer died after the gather
        if status[1] is not None:  # rank 0 committed: the checkpoint exists, say so and go on
            logger.warning("%s: committed, but telling the other ranks failed: %s", attempt.where, exc)
            return parse_manifest(status[1])
        raise DistributedCommitError(
            f"{attempt.where}: the outcome of the commit did not reach this rank ({_describe(exc)})"
        ) from exc
    if manifest_bytes is None:
        raise DistributedCommitError(f"{attempt.where}: commit failed on rank 0: {message}")
    return parse_manifest(manifest_bytes)


def _abort(attempt: SharedAttempt) -> None:
    if attempt.transaction is not None:
        attempt.transaction.abort()


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
