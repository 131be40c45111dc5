"""``CheckpointManager``: periodic saves under one root, latest/restore, retention, mirroring."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

from ckptkit.api import DEFAULT_MAX_SHARD_SIZE, load_from, save_to, start_save_to
from ckptkit.async_save import BackgroundSaver, SaveHandle
from ckptkit.blobs import sweep
from ckptkit.catalog import CheckpointInfo, latest_checkpoint, list_checkpoints, read_manifest
from ckptkit.commit import delete_checkpoint, step_dir_name
from ckptkit.distributed import DEFAULT_TIMEOUT_S, world
from ckptkit.errors import IncompleteListingError, NotCommittedError, NotThinnableError
from ckptkit.hashing import choose_algorithm
from ckptkit.ops.thin import thin_checkpoint
from ckptkit.retention import RetentionPolicy
from ckptkit.storage import Store, open_store

if TYPE_CHECKING:
    from ckptkit.attest_core import AttestReport
    from ckptkit.mirror import Mirror, MirrorStatus

log = logging.getLogger(__name__)


class CheckpointManager:
    """Save, find and restore checkpoints ``step-<N>`` under ``root_url`` (a path or a URL).

    ``save`` commits atomically and only then applies retention, so a crash can cost at most the
    checkpoint being written, never one already committed. Retention: ``keep_last``,
    ``keep_every``, ``keep_best`` (+ ``best_mode``), or a :class:`RetentionPolicy` as
    ``retention``; a checkpoint is kept if any rule keeps it, and the newest and the best are
    never deleted (metrics come from ``save(..., metrics=...)``). ``keep_optimizer_last=K``
    thins the kept checkpoints older than the K newest to ``thin_keep`` (default ``("model",)``)
    top-level keys in place (:func:`ckptkit.ops.thin.thin_checkpoint`): they stay loadable but
    cannot resume, and ``restore()`` picks the newest resumable one. ``digest`` is how files are
    hashed into each manifest, as for :func:`ckptkit.save`. ``dedup=True`` stores each file's
    bytes once in the root's blob store, as for :func:`ckptkit.save`: an unchanged tensor (a
    frozen base model) is neither written nor mirrored again.

    ``mirror="s3://bucket/run"`` uploads each committed checkpoint there in the background, in
    a niced child process (``save`` waits only for the local commit); retention deletes at the
    mirror too, and a checkpoint still uploading is deleted locally only once it is mirrored.
    ``mirror_status()`` tells what is uploaded, pending and failed; ``close()`` waits for the
    uploads and raises :class:`~ckptkit.mirror.MirrorError` if any failed. Opening a manager on a root whose
    uploads an earlier process left unfinished finishes them in the background, and deletes at
    the mirror what retention deleted here if that process died before it could
    (:func:`~ckptkit.mirror.stale_at_target`).

    ``save(..., blocking=False)`` returns once the state is copied to host memory and commits
    it in a background thread (then mirrors it and applies retention, there). One save is in
    flight at a time: the next ``save`` waits for it. A background failure is raised by
    ``handle.wait()`` and by the next ``save``, ``wait``, ``close``, ``restore``, ``list`` or
    ``latest`` (once). ``close()`` waits for it. Use a manager from one thread.
    """

    def __init__(
        self,
        root_url: str | os.PathLike[str] | Store,
        *,
        keep_last: int | None = None,
        keep_every: int | None = None,
        keep_best: str | None = None,
        best_mode: Literal["min", "max"] = "min",
        retention: RetentionPolicy | None = None,
        mirror: str | Store | None = None,
        mirror_options: dict[str, Any] | None = None,
        max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
        jobs: int = 4,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        digest: str | None = None,
        dedup: bool = False,
        keep_optimizer_last: int | None = None,
        thin_keep: Sequence[str] | None = None,
        **storage_options: Any,
    ) -> None:
        rules = {
            "keep_last": keep_last, "keep_every": keep_every, "keep_best": keep_best,
            "keep_optimizer_last": keep_optimizer_last, "thin_keep": thin_keep,
        }
        if retention is not None and any(v is not None for v in rules.values()):
            raise ValueError(
                "give either retention= or keep_last/keep_every/keep_best/keep_optimizer_last, not both"
            )
        self.retention = retention or RetentionPolicy.from_kwargs(**rules, best_mode=best_mode)
        self.root = open_store(root_url, **storage_options)
        self.max_shard_size = max_shard_size
        self.jobs = jobs
        self.timeout_s = timeout_s
        # As for ckptkit.save: "blake3" or "sha256"; None defers to CKPTKIT_DIGEST at each save.
        self.digest = None if digest is None else choose_algorithm(digest)
        self.dedup = dedup
        self._saver = BackgroundSaver(f"ckptkit-save {self.root.url}")
        self.last_restored: str | None = None  # the checkpoint attest() compares with by default
        self._unthinnable: set[str] = set()  # warned of once, then left as they are
        self.mirror: Mirror | None = None
        # Under torch.distributed every rank saves its shard and gets the same manifest back;
        # rank 0 alone deletes and uploads (see _is_leader).
        if mirror is not None and world()[0] == 0:
            from ckptkit.mirror import Mirror

            # A root given as a Store cannot be reopened by the mirror's child process.
            self.mirror = Mirror(
                self.root, mirror, source_options=storage_options,
                isolated=False if isinstance(root_url, Store) else None, **(mirror_options or {}),
            )
            self.mirror.catch_up(self.retention)

    def save(
        self,
        step: int,
        state: Any,
        *,
        metrics: dict[str, float] | None = None,
        metadata: dict[str, Any] | None = None,
        replicated: bool = False,
        blocking: bool = True,
    ) -> CheckpointInfo | SaveHandle:
        """Commit ``state`` as checkpoint ``step``, then mirror it and apply retention.

        Under ``torch.distributed`` this is collective: every rank passes its own state (or the
        same one with ``replicated=True``, which rank 0 alone writes).

        ``blocking=False`` returns a :class:`~ckptkit.SaveHandle` once ``state``'s tensors are
        copied to a reused host buffer (it may change from then on); the commit, mirror and
        retention follow in a background thread (see the class doc). Either way it first waits
        for a save still in flight and raises its failure if nobody has been told of it.
        """
        self._saver.wait()
        name = step_dir_name(step)
        options: dict[str, Any] = {
            "step": step, "metadata": metadata, "metrics": metrics,
            "max_shard_size": self.max_shard_size, "jobs": self.jobs, "replicated": replicated,
            "timeout_s": self.timeout_s, "digest": self.digest, "dedup": self.dedup,
        }
        if not blocking:
            return start_save_to(
                self._saver, self.root, name, state, then=lambda _: self._after_commit(name), **options
            )
        manifest = save_to(self.root, name, state, **options)
        self._after_commit(name)
        return CheckpointInfo(
            self.root.url, name, "committed", step, len(manifest.files), manifest.total_size,
            manifest.created, manifest,
        )

    def wait(self) -> None:
        """Wait for the save in flight, if any; raise its failure if nobody has been told of it."""
        self._saver.wait()

    def _after_commit(self, name: str) -> None:
        if self._is_leader():
            if self.mirror is not None:
                self.mirror.submit(name)
            self._apply_retention()

    def _is_leader(self) -> bool:
        """Rank 0, asked at each save: a manager made before ``init_process_group`` saw rank 0
        everywhere and may have started a mirror on every rank; the others drop theirs here."""
        if world()[0] == 0:
            return True
        if self.mirror is not None:
            self.mirror.close(raise_on_error=False)
            self.mirror = None
        return False

    def _apply_retention(self) -> None:
        if not self.retention.has_rules and not self.retention.thins:
            return
        uploading = self.mirror.pending() if self.mirror is not None else set()
        try:
            committed = self.list()
        except IncompleteListingError as exc:
            # The new checkpoint is committed; what could not be seen would count as gone, so
            # nothing is deleted until the root lists completely again.
            log.warning("retention skipped: %s", exc)
            return
        deleted = 0
        expired = self.retention.select_expired(committed)
        for info in expired:
            if info.name in uploading:
                continue  # deleted by a later pass, once the mirror has it
            delete_checkpoint(self.root, info.name)
            deleted += 1
            if self.mirror is not None:
                self.mirror.remove(info.name)
        thinned = self._thin(committed, expired, uploading)
        if deleted or thinned:
            self._release_blobs()

    def _thin(
        self, committed: list[CheckpointInfo], expired: list[CheckpointInfo], uploading: set[str]
    ) -> int:
        """Thin what ``keep_optimizer_last`` leaves behind (the blobs they dropped go with the
        caller's sweep); how many were thinned. One that cannot be (a state without the kept
        keys) is warned of once and left whole."""
        count = 0
        for info in self.retention.select_thinned(committed, expired):
            if info.name in uploading or info.name in self._unthinnable:
                continue  # an upload reads the files thinning drops: a later pass thins it
            try:
                report = thin_checkpoint(self.root, info.name, keep=self.retention.thin_keep, sweep=False)
            except NotThinnableError as exc:
                self._unthinnable.add(info.name)
                log.warning("retention: not thinning %s: %s", info.name, exc)
                continue
            if report.changed:
                count += 1
                log.info("retention: thinned %s to %s", info.url, ", ".join(report.kept))
                if self.mirror is not None:
                    self.mirror.thin(info.name, self.retention.thin_keep)  # the bucket's copy too
        return count

    def _release_blobs(self) -> None:
        """Delete the blobs that the checkpoints just deleted (or thinned) alone referenced, by
        the blob protocol: never one that another checkpoint or a save in flight needs."""
        try:
            swept = sweep(self.root)
        except IncompleteListingError as exc:
            log.warning("blob sweep skipped: %s", exc)  # an unseen manifest could need any blob
            return
        if swept.skipped:
            log.info("blob sweep: %s", swept.skipped)

    def mirror_status(self) -> MirrorStatus | None:
        """What the background mirror has uploaded, has pending and failed; None without one."""
        self._saver.raise_failure()
        return self.mirror.status() if self.mirror is not None else None

    def list(self) -> list[CheckpointInfo]:
        """Committed checkpoints, oldest first (a save in flight is not one yet)."""
        self._saver.raise_failure()
        return [c for c in list_checkpoints(self.root) if c.committed]

    def latest(self) -> CheckpointInfo | None:
        """The newest committed checkpoint, or None."""
        self._saver.raise_failure()
        return latest_checkpoint(self.root)

    def restore(
        self,
        step: int | None = None,
        *,
        keys: Sequence[str] | None = None,
        map_location: Any = None,
        mmap: bool = True,
    ) -> Any:
        """Load checkpoint ``step`` (by default the newest resumable one: not thinned to weights
        only; a save in flight is not committed yet: ``wait()`` first to restore it)."""
        name = self._restore_name(step)
        return load_from(self.root.child(name), keys=keys, map_location=map_location, mmap=mmap)

    def _restore_name(self, step: int | None) -> str:
        """The checkpoint a restore reads: ``step``'s, else the newest resumable one (thinned,
        weights-only checkpoints are passed over; which one is logged); a failure of the save
        in flight nobody has been told of is raised first."""
        self._saver.raise_failure()
        if step is not None:
            self.last_restored = step_dir_name(step)
            return self.last_restored
        committed = self.list()
        resumable = [c for c in committed if c.resumable]
        if not resumable:
            why = f" ({len(committed)} thinned to weights only; restore(step=N) loads one)"
            raise NotCommittedError(
                f"{self.root.url}: no resumable checkpoint to restore{why if committed else ''}"
            )
        info = resumable[-1]
        newer = "" if info is committed[-1] else " (newer ones are thinned to weights only)"
        log.info("restore: %s, the newest resumable checkpoint%s", info.url, newer)
        self.last_restored = info.name
        return info.name

    def attest(
        self,
        model: Any = None,
        optimizer: Any = None,
        scheduler: Any = None,
        scaler: Any = None,
        *,
        step: int | None = None,
        strict: bool = True,
    ) -> AttestReport:
        """:func:`ckptkit.attest` against checkpoint ``step``, by default the one last restored:
        call it once the restored state is loaded into the live objects (``restore`` hands back
        the state, so only the caller knows when that is)."""
        from ckptkit.attestation import attest

        name = step_dir_name(step) if step is not None else self.last_restored
        if name is None:
            raise ValueError("attest: nothing restored yet; pass step=")
        return attest(self.root.child(name), model, optimizer, scheduler, scaler, strict=strict)

    # --- DCP checkpoints: torch.distributed.checkpoint, stored and committed by ckptkit -----------

    def save_dcp(
        self,
        step: int,
        state_dict: dict[str, Any],
        *,
        metrics: dict[str, float] | None = None,
        metadata: dict[str, Any] | None = None,
        planner: Any = None,
        process_group: Any = None,
    ) -> CheckpointInfo:
        """Commit ``state_dict`` as DCP checkpoint ``step`` with ``dcp.save`` through
        :class:`~ckptkit.integrations.dcp.CkptkitWriter`, then mirror it and apply retention
        as :meth:`save` does; DCP and native checkpoints share the root, its retention and
        ``latest``. Under ``torch.distributed`` it is collective, as ``dcp.save`` is: every rank
        passes its own (sharded) state dict. Blocking; :meth:`restore_dcp` loads it back.
        """
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp

        from ckptkit.integrations.dcp import CkptkitWriter

        self._saver.wait()
        name = step_dir_name(step)
        writer = CkptkitWriter.under(
            self.root, name, digest=self.digest, step=step, metadata=metadata, metrics=metrics
        )
        try:
            dcp.save(
                state_dict, storage_writer=writer, planner=planner, process_group=process_group,
                no_dist=not (dist.is_available() and dist.is_initialized()),
            )
        except BaseException:
            writer.abort()  # on the coordinator: what this save staged goes now, not at gc
            raise
        info = self._committed(name)
        self._after_commit(name)
        return info

    def restore_dcp(
        self,
        state_dict: dict[str, Any],
        step: int | None = None,
        *,
        planner: Any = None,
        process_group: Any = None,
    ) -> CheckpointInfo:
        """Load DCP checkpoint ``step`` (the newest committed checkpoint by default) into
        ``state_dict`` in place with ``dcp.load`` through
        :class:`~ckptkit.integrations.dcp.CkptkitReader`, every byte checked against the
        manifest; returns which checkpoint it was. Resharding is DCP's: a state saved on N
        ranks loads on M. Collective under ``torch.distributed``, as ``dcp.load`` is.
        """
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp

        from ckptkit.integrations.dcp import CkptkitReader

        name = self._restore_name(step)
        info = self._committed(name)
        reader = CkptkitReader(self.root.child(name))
        # Read here first: dcp.load would turn an unsafe or corrupt .metadata into an
        # AssertionError that only quotes ckptkit's error; the reader keeps what it read.
        reader.read_metadata()
        dcp.load(
            state_dict, storage_reader=reader, planner=planner,
            process_group=process_group, no_dist=not (dist.is_available() and dist.is_initialized()),
        )
        return info

    def _committed(self, name: str) -> CheckpointInfo:
        manifest = read_manifest(self.root.child(name))  # NotCommittedError where there is none
        return CheckpointInfo(
            self.root.url, name, "committed", manifest.step, len(manifest.files), manifest.total_size,
            manifest.created, manifest,
        )

    def close(self) -> None:
        """Wait for a save in flight (raising its failure), finish mirror uploads (raising
        :class:`~ckptkit.mirror.MirrorError` if some failed), apply the retention they
        postponed, and release the stores."""
        try:
            try:
                self._saver.close()
            finally:
                if self.mirror is not None:
                    self.mirror.wait()
                    self._apply_retention()
                    self.mirror.close()
        finally:
            self.root.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
