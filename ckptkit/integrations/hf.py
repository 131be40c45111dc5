"""Hugging Face Trainer: every ``checkpoint-N/`` committed, verified and retained by ckptkit.

The Trainer writes ``checkpoint-N/`` in place (model, optimizer, scheduler, RNG, trainer state)
and only then calls ``on_save``. :class:`CkptkitCallback` turns that directory into a ckptkit
checkpoint in ``on_save``: every file is fsynced and hashed, and the manifest is written LAST,
create-only. A directory without a manifest (a save killed midway) is therefore never a
checkpoint: :func:`latest_committed_checkpoint` skips it, where HF's ``get_last_checkpoint``
returns it because it looks only at directory names.

Retention is ckptkit's (:class:`ckptkit.retention.RetentionPolicy`), run after the new checkpoint
committed and verified, and replaces ``save_total_limit``, which

* runs inside ``_save_checkpoint``, before ``on_save``: HF deletes old checkpoints before the new
  one is complete, and deletes with ``rmtree``, so a crash midway leaves a half-deleted directory;
* deletes every checkpoint but the best at the end of training when ``save_total_limit=1`` and
  ``load_best_model_at_end`` are combined.

Here checkpoints are ordered by the step in their manifest (``checkpoint-10`` after
``checkpoint-9``), deletion uncommits first (:func:`ckptkit.commit.delete_checkpoint`), and the
newest checkpoint and the Trainer's ``best_model_checkpoint`` are never deleted.

Multi-process training: every process calls ``on_save``; the processes meet at a barrier (with
DeepSpeed or FSDP every rank writes files into the directory) and only the world process zero
commits, verifies and deletes. Hyper-parameter search (``run-<trial>/`` sub-directories) is not
supported.

``CkptkitCallback(blocking=False)`` runs that commit (fsync, hashing, verification, retention) in
a :class:`~ckptkit.async_save.BackgroundSaver` thread on the world process zero; the Trainer's
own writes of ``checkpoint-N`` stay in the training loop (they are the snapshot).
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from transformers import TrainerCallback

from ckptkit import lineage
from ckptkit.async_save import BackgroundSaver, SaveHandle
from ckptkit.catalog import CheckpointInfo, list_checkpoints, read_manifest
from ckptkit.commit import delete_checkpoint, publish_manifest
from ckptkit.errors import (
    AlreadyExistsError,
    CommitConflictError,
    IncompleteListingError,
    NotCommittedError,
    NotFoundError,
    NotThinnableError,
    VerificationError,
)
from ckptkit.formats.hf_trainer import CHECKPOINT_DIR
from ckptkit.formats.layout import detect_layout
from ckptkit.hashing import choose_algorithm, digest_objects
from ckptkit.manifest import MANIFEST_NAME, FileEntry, Manifest, validate_path
from ckptkit.ops.thin import thin_checkpoint
from ckptkit.ops.verify import VerifyReport, default_jobs, verify_checkpoint
from ckptkit.storage import Store, open_store
from ckptkit.storage.local import TEMP_MARKER

if TYPE_CHECKING:
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from ckptkit.mirror import Mirror, MirrorStatus
    from ckptkit.retention import RetentionPolicy

__all__ = [
    "PRODUCER",
    "CkptkitCallback",
    "apply_retention",
    "commit_hf_checkpoint",
    "latest_committed_checkpoint",
    "metrics_at_step",
    "verify_or_uncommit",
]

logger = logging.getLogger(__name__)

PRODUCER = "ckptkit.integrations.hf"
VerifyMode = Literal["full", "quick"]


def hf_checkpoint_name(step: int) -> str:
    return f"checkpoint-{step}"


def _is_hf_checkpoint(info: CheckpointInfo) -> bool:
    return CHECKPOINT_DIR.fullmatch(info.name) is not None


def latest_committed_checkpoint(output_dir: str | os.PathLike[str], *, quick: bool = True) -> str | None:
    """The path of the newest committed ``checkpoint-N`` in ``output_dir`` that verifies, or None.

    Pass it as ``trainer.train(resume_from_checkpoint=...)``. Directories without a manifest
    (a save that was killed) are skipped; so is a committed one that fails verification, with a
    warning, in favour of the next older one. ``quick`` checks presence and sizes only; pass
    ``quick=False`` to re-hash every file before a long resume.
    """
    root = Path(output_dir)
    if not root.is_dir():
        return None  # first run: nothing to resume
    store = open_store(root)
    # A checkpoint thinned to weights only (keep_optimizer_last) cannot resume training.
    committed = [c for c in list_checkpoints(store) if c.committed and _is_hf_checkpoint(c) and c.resumable]
    for info in reversed(committed):  # oldest first by step, so newest first here
        report = verify_checkpoint(store.child(info.name), quick=quick)
        if report.ok:
            return str(root / info.name)
        logger.warning("skipping %s: it fails verification: %s", info.url, _summary(report))
    return None


def _summary(report: VerifyReport) -> str:
    return "; ".join(f.message for f in report.findings if f.severity == "error")


def _fsync_files(directory: Path, keys: list[str]) -> None:
    """Make the Trainer's writes durable before the manifest says they are there: HF does not
    fsync, and a manifest that survives a power loss must not list files that did not."""
    for key in keys:
        fd = os.open(directory / key, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _indexable(key: str) -> bool:
    return key != MANIFEST_NAME and not key.rsplit("/", 1)[-1].startswith(TEMP_MARKER)


def commit_hf_checkpoint(
    root: Store,
    name: str,
    *,
    step: int,
    metrics: dict[str, float] | None = None,
    metadata: dict[str, Any] | None = None,
    jobs: int | None = None,
    digest: str | None = None,
) -> Manifest:
    """Hash every file of the Trainer-written ``root/name`` and commit its manifest, create-only;
    ``digest`` (``blake3``, ``sha256``, None for ``CKPTKIT_DIGEST`` or BLAKE3) is how.

    Unlike :func:`ckptkit.ops.index.index_checkpoint` this indexes the whole directory even when
    it holds a DeepSpeed ``latest`` file (HF + DeepSpeed writes ``checkpoint-N/global_stepN/``
    plus ``latest``: the Trainer's checkpoint is all of it) and records the Trainer's metrics.
    """
    algorithm = choose_algorithm(digest)
    checkpoint = root.child(name)
    objects = [info for info in checkpoint.list("") if _indexable(info.key)]
    if not objects:
        raise NotFoundError(f"{checkpoint.url}: the Trainer wrote no files here")
    for info in objects:
        validate_path(info.key)
    local = checkpoint.local_path("")
    if local is not None and checkpoint.capabilities.durable_writes:
        _fsync_files(local, [o.key for o in objects])
        root.sync_prefix(name)
    layout = detect_layout(o.key for o in objects)
    with ThreadPoolExecutor(max_workers=jobs or default_jobs()) as pool:
        digests = digest_objects(checkpoint, [(o.key, o.size) for o in objects], pool, algorithm=algorithm)
        entries = [FileEntry.from_digest(o.key, d) for o, d in zip(objects, digests, strict=True)]
    manifest = Manifest.create(
        step=step, layout=layout.kind, files=entries, topology=layout.topology,
        metadata=metadata, metrics=metrics,
    )
    try:
        publish_manifest(checkpoint, manifest)
    except AlreadyExistsError as exc:
        raise CommitConflictError(
            f"{checkpoint.url} was already committed before the Trainer wrote into it"
        ) from exc
    return manifest


def verify_or_uncommit(checkpoint: Store, *, quick: bool = False, jobs: int | None = None) -> VerifyReport:
    """Verify a just-committed checkpoint; if it fails, remove its manifest and raise.

    A checkpoint that does not match its manifest (a file changed while it was hashed) must not be
    resumed from, and retention must not delete older, good checkpoints in its favour.
    """
    report = verify_checkpoint(checkpoint, quick=quick, jobs=jobs)
    if report.ok:
        return report
    checkpoint.delete(MANIFEST_NAME)
    findings = [f.message for f in report.findings if f.severity == "error"]
    raise VerificationError(
        f"{checkpoint.url} changed while it was committed, so it was uncommitted: {_summary(report)}",
        findings,
    )


def metrics_at_step(log_history: list[dict[str, Any]], step: int) -> dict[str, float]:
    """The numbers the Trainer logged at ``step`` (training loss, learning rate and, when an
    evaluation ran at this step, the ``eval_*`` metrics). Metrics logged at earlier steps are
    left out on purpose: they describe other weights than the ones in this checkpoint."""
    metrics: dict[str, float] = {}
    for entry in log_history:
        if entry.get("step") != step:
            continue
        for key, value in entry.items():
            if key != "step" and _is_number(value):
                metrics[key] = float(value)
    return metrics


def _is_number(value: object) -> bool:
    # The manifest refuses NaN and infinities (JSON has no spelling for them).
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _data_position(args: TrainingArguments, state: TrainerState) -> dict[str, Any]:
    per_step = args.train_batch_size * args.gradient_accumulation_steps * args.world_size
    return lineage.data_position(
        epoch=state.epoch, global_step=state.global_step, samples_consumed=state.global_step * per_step,
        sampler_seed=args.data_seed if args.data_seed is not None else args.seed,
    )


def _resumed_checkpoint(args: TrainingArguments, state: TrainerState) -> tuple[Store, Manifest] | None:
    """The committed checkpoint a Trainer resumed from, seen from ``on_train_begin``: the
    callback is not told the path, so ``args.resume_from_checkpoint`` when it names a committed
    checkpoint, else ``checkpoint-<global_step>`` of ``output_dir`` (a fresh run is at step 0)."""
    candidates = []
    if isinstance(args.resume_from_checkpoint, str):
        candidates.append(open_store(args.resume_from_checkpoint))
    if state.global_step > 0:
        candidates.append(open_store(args.output_dir).child(hf_checkpoint_name(state.global_step)))
    for checkpoint in candidates:
        try:
            return checkpoint, read_manifest(checkpoint)
        except (NotCommittedError, NotFoundError):
            continue
    return None


def apply_retention(root: Store, policy: RetentionPolicy, *, keep: Iterable[str] = ()) -> list[str]:
    """Delete the committed ``checkpoint-N`` under ``root`` that ``policy`` expires, except the
    names in ``keep``, then thin those its ``keep_optimizer_last`` leaves behind to weights only
    (dropping ``optimizer.pt``, ``scheduler.pt``, ``scaler.pt``, ``rng_state*.pth`` and DeepSpeed's
    optimizer files), ``keep`` again excepted; return the names deleted. Other directories under
    ``root`` are not looked at."""
    try:
        listed = list_checkpoints(root)
    except IncompleteListingError as exc:
        # What could not be seen would count as gone: delete nothing until the root lists whole.
        logger.warning("retention skipped: %s", exc)
        return []
    committed = [c for c in listed if c.committed and _is_hf_checkpoint(c)]
    protected = set(keep)
    deleted = []
    for info in policy.select_expired(committed):
        if info.name not in protected:
            delete_checkpoint(root, info.name)  # uncommits first: a crash midway leaves no "checkpoint"
            deleted.append(info.name)
            logger.info("retention: deleted %s", info.url)
    expired = [c for c in committed if c.name in deleted]
    for info in policy.select_thinned(committed, expired):
        if info.name in protected:
            continue
        try:
            report = thin_checkpoint(root, info.name, keep=policy.thin_keep)
        except NotThinnableError as exc:
            logger.warning("retention: not thinning %s: %s", info.url, exc)
            continue
        if report.changed:
            logger.info("retention: thinned %s to %s", info.url, ", ".join(report.kept))
    return deleted


def _barrier() -> None:
    """All ranks meet here when training is distributed; a no-op in a single process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


class CkptkitCallback(TrainerCallback):
    """Commit, verify and retain every checkpoint the Trainer saves.

    Use with ``TrainingArguments(save_total_limit=None)``: retention is ``retention``'s job, run
    only after the new checkpoint committed. ``RetentionPolicy(keep_optimizer_last=K)`` thins the
    checkpoints older than the K newest to weights only (:func:`apply_retention`), which
    :func:`latest_committed_checkpoint` then passes over. ``verify="full"`` re-hashes the
    checkpoint after the commit (catches a file changed while it was hashed); ``"quick"`` checks
    presence and sizes.

    ``mirror="s3://bucket/run"`` uploads each committed checkpoint there in the background
    (:class:`ckptkit.mirror.Mirror`); retention deletes at the mirror too, leaves a checkpoint
    that is still uploading alone until it is mirrored, and ``on_train_end`` waits for the uploads
    and raises :class:`~ckptkit.mirror.MirrorError` if any failed.

    ``digest`` is how files are hashed into each manifest, as for ``ckptkit.save``.

    ``blocking=False`` moves the commit (fsync, hashing, manifest, verification, retention, the
    hand-over to the mirror) into a background thread: training resumes as soon as the Trainer
    has written ``checkpoint-N``. The Trainer's own writes stay in the training loop, and the
    files are never written again, so the commit hashes exactly what the Trainer saved. One
    commit is in flight at a time: the next save waits for it before the Trainer writes, and
    ``on_train_end`` waits for the last one. A background failure is raised at the next save
    or at ``on_train_end``; until then a checkpoint whose commit failed is simply uncommitted,
    and resuming skips it.
    """

    def __init__(
        self,
        retention: RetentionPolicy | None = None,
        *,
        verify: VerifyMode = "full",
        jobs: int | None = None,
        mirror: str | None = None,
        mirror_options: dict[str, Any] | None = None,
        digest: str | None = None,
        blocking: bool = True,
        attest: bool = False,
    ) -> None:
        if verify not in ("full", "quick"):
            raise ValueError(f"verify must be 'full' or 'quick', got {verify!r}")
        self.retention = retention
        self.verify = verify
        self.jobs = jobs
        self.digest = None if digest is None else choose_algorithm(digest)
        self.mirror_url = mirror
        self.mirror_options = dict(mirror_options or {})
        self.mirror: Mirror | None = None
        self._warned_limit = False
        self.blocking = blocking
        self._saver: BackgroundSaver | None = None  # made at the first non-blocking commit
        self.last_handle: SaveHandle | None = None  # of the last non-blocking commit
        self.attest = attest

    # --- Trainer events ------------------------------------------------------------------

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if args.save_total_limit and not self._warned_limit:
            self._warned_limit = True
            logger.warning(
                "CkptkitCallback: TrainingArguments.save_total_limit=%s is set. The Trainer then deletes "
                "checkpoints itself, before the new one is committed and ordered by mtime; set "
                "save_total_limit=None and pass CkptkitCallback(retention=RetentionPolicy(...)) instead.",
                args.save_total_limit,
            )
        if self.mirror_url is not None and self.mirror is None and state.is_world_process_zero:
            from ckptkit.mirror import Mirror

            self.mirror = Mirror(open_store(args.output_dir), self.mirror_url, **self.mirror_options)
            # What an earlier, killed run left half-uploaded, and the deletions it never made there.
            self.mirror.catch_up(self.retention)
        self._record_resume(args, state, kwargs)

    def _record_resume(self, args: TrainingArguments, state: TrainerState, loaded: dict[str, Any]) -> None:
        """On a resume (the Trainer restored its state before ``on_train_begin``), the committed
        checkpoint it resumed from becomes the lineage parent, and with ``attest`` the model,
        optimizer and scheduler it loaded are compared with that checkpoint's."""
        resumed = _resumed_checkpoint(args, state)
        if resumed is None:
            return
        checkpoint, manifest = resumed
        lineage.resumed_from(checkpoint.url, manifest)
        if self.attest and args.deepspeed:
            # The optimizer lives in the DeepSpeed tag and ZeRO-3 partitions the model: only the
            # engine can be attested, and the Trainer does not hand it to callbacks.
            logger.warning(
                "CkptkitCallback(attest=True): not attesting a Trainer run under DeepSpeed; call "
                "ckptkit.attest(<checkpoint>/<tag>, model=trainer.model_wrapped) yourself"
            )
        elif self.attest:
            from ckptkit.attest_saved import attest_files

            parts = {"model": loaded.get("model"), "optimizer": loaded.get("optimizer"),
                     "scheduler": loaded.get("lr_scheduler")}
            given = {part: live for part, live in parts.items() if live is not None}
            attest_files(checkpoint, manifest, given).raise_for_differences()

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        saver, self._saver = self._saver, None
        try:
            if saver is not None:
                saver.close()  # the last commit, before the mirror finishes; raises its failure
        finally:
            self._finish_mirror(args, state)

    def _finish_mirror(self, args: TrainingArguments, state: TrainerState) -> None:
        if self.mirror is None:
            return
        self.mirror.wait()
        if self.retention is not None:  # deletions postponed while their upload was in flight
            best = state.best_model_checkpoint
            newest = hf_checkpoint_name(state.global_step)
            self._retain(open_store(args.output_dir), self.retention, newest=newest, best=best)
        mirror, self.mirror = self.mirror, None
        mirror.close()

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if control.should_save:
            self._clear_save_target(args, state)

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if control.should_save:
            self._clear_save_target(args, state)

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        _barrier()  # with DeepSpeed or FSDP every rank writes into checkpoint-N
        if not state.is_world_process_zero:
            return
        self._wait()  # normally done at on_step_end already: one commit in flight
        root = open_store(args.output_dir)
        name = hf_checkpoint_name(state.global_step)
        # Everything read from the Trainer's state is read now: it moves on during a background commit.
        commit = functools.partial(
            self._commit, root, name, step=state.global_step,
            metrics=metrics_at_step(state.log_history, state.global_step),
            metadata=lineage.stamp(
                {"producer": PRODUCER, "epoch": state.epoch},
                config=lineage.training_args_config(args.to_dict()), data=_data_position(args, state),
            ),
            best=state.best_model_checkpoint,
        )
        if self.blocking:
            commit()
            return
        if self._saver is None:
            self._saver = BackgroundSaver("ckptkit-hf-commit")
        self.last_handle = self._saver.submit(root.child(name).url, state.global_step, commit)

    def wait(self) -> None:
        """Wait for the commit in flight, if any, and raise its failure unless ``handle.wait()``
        already did."""
        self._wait()

    # --- steps of a save -----------------------------------------------------------------

    def _commit(
        self, root: Store, name: str, *, step: int, metrics: dict[str, float], metadata: dict[str, Any],
        best: str | None,
    ) -> Manifest:
        """Commit, verify and retain the Trainer-written ``root/name`` (in the background when
        non-blocking)."""
        manifest = commit_hf_checkpoint(
            root, name, step=step, metrics=metrics, metadata=metadata, jobs=self.jobs, digest=self.digest
        )
        verify_or_uncommit(root.child(name), quick=self.verify == "quick", jobs=self.jobs)
        self._on_committed(name)
        if self.retention is not None:
            self._retain(root, self.retention, newest=name, best=best)
        return manifest

    def _wait(self) -> None:
        if self._saver is not None:
            self._saver.wait()

    def _clear_save_target(self, args: TrainingArguments, state: TrainerState) -> None:
        """Remove what sits where the Trainer is about to save: the Trainer writes into an existing
        directory without emptying it, so a killed save's leftovers (or, after resuming from an
        older checkpoint, a committed checkpoint of the abandoned run) would mix with the new files.
        The commit in flight is waited for first: the Trainer may rotate or replace what it reads."""
        if state.is_world_process_zero:
            self._wait()
            root = open_store(args.output_dir)
            name = hf_checkpoint_name(state.global_step)
            committed = root.exists(name + "/" + MANIFEST_NAME)
            if committed:
                logger.warning("replacing committed %s/%s: training resumed before it", root.url, name)
                if self.mirror is not None and name in self.mirror.pending():
                    self.mirror.wait()  # its upload reads the directory about to go
            if name in root.list_dirs(""):
                delete_checkpoint(root, name)
                if committed:
                    self._on_deleted(name)  # the mirror's copy goes too, before the new one is sent
        _barrier()  # no rank writes its files before the old directory is gone

    def _retain(self, root: Store, policy: RetentionPolicy, *, newest: str, best: str | None) -> None:
        """Retention after a commit. Never deleted, whatever the policy says: ``newest`` (the
        checkpoint just committed, which a resume needs; after a resume from an older checkpoint
        the abandoned run's later ones are "newer" by step), the Trainer's ``best_model_checkpoint``
        (which ``load_best_model_at_end`` loads) and whatever :meth:`_in_use` names."""
        keep = {newest, *([Path(best).name] if best else []), *self._in_use()}
        for name in apply_retention(root, policy, keep=keep):
            self._on_deleted(name)

    # --- the mirror ---------------------------------------------------------------------------

    def mirror_status(self) -> MirrorStatus | None:
        """What the background mirror has uploaded, has pending and failed; None without one."""
        return self.mirror.status() if self.mirror is not None else None

    def _on_committed(self, name: str) -> None:
        """Called on the main process once ``name`` is committed and verified, before retention."""
        if self.mirror is not None:
            self.mirror.submit(name)

    def _in_use(self) -> set[str]:
        """Checkpoints something still reads (an upload in flight): retention leaves them be."""
        return self.mirror.pending() if self.mirror is not None else set()

    def _on_deleted(self, name: str) -> None:
        """Called on the main process after retention deleted ``name``."""
        if self.mirror is not None:
            self.mirror.remove(name)
