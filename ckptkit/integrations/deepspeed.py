"""DeepSpeed checkpoints written and read through a ckptkit store, committed once for all ranks.

``engine.save_checkpoint`` hands every file it writes to its *checkpoint engine*
(``create`` → ``save``\\* → ``commit``). :class:`CkptkitCheckpointEngine` replaces DeepSpeed's
``torch.save``-to-a-path engine:

* ``create`` (all ranks): rank 0 opens a :class:`~ckptkit.commit.CheckpointTransaction` for
  ``<root>/<tag>`` and tells the other ranks where its files go (the local staging directory or
  the object-store attempt prefix ``ckptkit-<id>/``), so all ranks write into one attempt.
* ``save`` (each rank): the state dict is serialised and streamed into the store, hashed on the
  way; the rank keeps the :class:`~ckptkit.manifest.FileEntry` of each file.
* ``commit`` (all ranks): the entries are gathered on a dedicated gloo group that has its own
  timeout (this is the barrier); rank 0 commits ONE manifest listing every rank's files (layout
  ``deepspeed``, topology: dp/mp world sizes and ZeRO stage), then writes ``latest`` through the
  store. A rank that raised or died never reaches the gather, so the survivors get
  :class:`DistributedCommitError` (at the latest after ``timeout_s``) and nothing is committed.

The protocol itself (shared attempt, gather, commit on rank 0) is :mod:`ckptkit.distributed`,
which ckptkit's native multi-rank saves use too.

Non-blocking saves (``save_checkpoint(..., blocking=False)``): ``save`` only serialises each file
into memory, which is the staging (a snapshot the training loop may mutate past); ``commit``
hands the writes, the hashing and the commit gather to the rank's
:class:`~ckptkit.async_save.BackgroundSaver` thread and returns. Its collectives run on the
commit group alone, never the training group, and ``create`` (the next save) or a load first
waits for the save in flight, so at most one collective on that group runs at a time and the
next save raises a background failure. Between those calls the commit group's collectives run
while training goes on; a rank killed then leaves no commit, as above.

DeepSpeed also writes some files itself with plain file I/O, outside the checkpoint engine: the
``latest`` file (``save_checkpoint(save_latest=True)``) and the ``zero_to_fp32.py`` /
``zero_to_torch.py`` recovery scripts. :func:`save_checkpoint` therefore gives DeepSpeed a
throw-away local scratch directory as its ``save_dir``: those plain writes land there and are
discarded, while the checkpoint files (which all go through the engine) land in the store. The
store's ``latest`` is written by :meth:`CkptkitCheckpointEngine.commit`, after the manifest is
committed, and is never trusted when read (:func:`resolve_tag` checks its target is committed).
The recovery scripts are not stored: ``ckptkit`` consolidates ZeRO checkpoints itself.

Loading: DeepSpeed finds files with ``glob``/``os.path.exists`` on local paths, so
:func:`load_checkpoint` builds a local *shadow* directory of empty placeholders named after the
manifest's files; the engine's ``load`` maps each placeholder back to its store object, reads it,
checks it against the manifest's digest and hands it to ``torch.load(weights_only=True)`` inside
:func:`ckptkit.safe.safe_globals`, which admits DeepSpeed's vetted classes (``LossScaler``,
``DynamicLossScaler``, ``ZeroStageEnum``, ``fragment_address``) instead of turning safety off.
Each rank reads only the files DeepSpeed asks it for.

Limits: each file is serialised in memory before it is streamed (memory bounded by the largest
file a rank writes, as with ``torch.save``; non-blocking, by all the files a rank writes in one
save); ``load_checkpoint(load_module_only=True)`` at ZeRO-3
and NVMe offload read files by path outside the engine and are not supported.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import io
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointCommitInfo, CheckpointEngine

from ckptkit import lineage
from ckptkit.async_save import BackgroundSaver, SaveHandle
from ckptkit.catalog import list_checkpoints, read_manifest, step_from_name
from ckptkit.commit import CheckpointTransaction, files_of, logical_path
from ckptkit.distributed import (
    DEFAULT_TIMEOUT_S,
    AttemptSink,
    CommitGroup,
    DistributedCommitError,
    SharedAttempt,
    commit_shared_attempt,
    open_shared_attempt,
)
from ckptkit.errors import ChecksumMismatchError, ManifestError, NotCommittedError, NotFoundError
from ckptkit.formats.deepspeed import LATEST, resolve_latest
from ckptkit.hashing import choose_algorithm, digest_bytes
from ckptkit.integrations.zero_reshard import ReshardedRankFiles, saved_dp_world_size, tag_entries
from ckptkit.manifest import MANIFEST_NAME, FileEntry, Manifest, validate_path
from ckptkit.safe import safe_globals
from ckptkit.storage import Store, open_store

__all__ = [
    "LATEST_NAME",
    "LAYOUT",
    "CkptkitCheckpointEngine",
    "DistributedCommitError",
    "load_checkpoint",
    "resolve_tag",
    "save_checkpoint",
    "use_ckptkit",
]

LAYOUT = "deepspeed"
LATEST_NAME = LATEST  # DeepSpeed's own name, so tools that read it keep working

log = logging.getLogger(__name__)


@dataclass
class _SaveAttempt:
    """What one rank knows about the save in progress between ``create`` and ``commit``."""

    tag: str
    save_dir: str  # DeepSpeed's save_dir as an absolute path: only used to name files
    step: int | None  # taken at create: by the background commit, training has moved on
    topology: dict[str, Any]
    config: dict[str, Any] | None  # ds_config and data position, for the lineage record
    data: dict[str, Any]
    shared: SharedAttempt  # the attempt all ranks write into
    sink: AttemptSink  # this rank's files in it
    blocking: bool  # write each file as it comes, or stage them for the background
    # Non-blocking only: each file serialised in memory (the snapshot the training loop may
    # mutate past), written to the store by the background job.
    staged: list[tuple[str, io.BytesIO]] = field(default_factory=list)


class CkptkitCheckpointEngine(CheckpointEngine):
    """A DeepSpeed checkpoint engine that writes into, and reads from, a ckptkit store.

    Construct it on every rank at the same point (it creates a process group): use
    :func:`use_ckptkit`. ``timeout_s`` bounds how long a rank waits for the others at the commit.
    ``digest`` is how files are hashed into the manifest, as for ``ckptkit.save`` (rank 0's
    choice holds for all ranks).

    ``blocking=False`` makes each save return once every file is serialised in memory (a
    snapshot the training loop may mutate past); writing, hashing and the commit collective run
    in a background thread. At most one save is in flight: the next one (and any load) waits for
    it first, and raises its failure. Call :meth:`wait` (or :meth:`close`) before
    ``destroy_process_group``: the commit needs the other ranks.
    """

    def __init__(
        self,
        root_url: str | os.PathLike[str] | Store,
        *,
        engine: Any = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        digest: str | None = None,
        blocking: bool = True,
        attest: bool = False,
        dedup: bool = False,
        **storage_options: Any,
    ) -> None:
        super().__init__(None)
        self.dedup = dedup  # each file's bytes once in the root's blob store (ckptkit.save)
        self.attest = attest  # load_checkpoint attests the loaded state (ckptkit.attest)
        self.name = "CkptkitCheckpointEngine"
        self.digest = None if digest is None else choose_algorithm(digest)
        self.root: Store = open_store(root_url, **storage_options)
        self._engine = engine  # the DeepSpeed engine, for the manifest's step and topology
        # Created once, here: a group per save would cost a rendezvous on every save.
        self._group = CommitGroup(timeout_s)
        self._save: _SaveAttempt | None = None
        self.blocking = blocking  # how the next save runs; save_checkpoint(blocking=) sets it per call
        self._background = BackgroundSaver(f"ckptkit-deepspeed-rank{self._group.rank}")
        self.last_handle: SaveHandle | None = None  # of the last non-blocking save
        self._load_map: dict[str, Callable[[Any], Any]] = {}  # placeholder path -> its loader
        self.last_committed: str | None = None

    # --- collectives -------------------------------------------------------------------------

    @property
    def rank(self) -> int:
        return self._group.rank

    @property
    def timeout(self) -> dt.timedelta:
        return self._group.timeout

    def _broadcast_from_0(self, value: Any) -> Any:
        return self._group.broadcast_from_0(value)

    # --- save --------------------------------------------------------------------------------

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        # Store keys need no directories. Creating DeepSpeed's <save_dir>/<tag> would even put an
        # empty directory where a local commit renames its staging directory. Only save_dir itself
        # (asked for before ``create``) is made, as DeepSpeed copies its recovery scripts into it.
        if self._save is None and "://" not in str(path):
            os.makedirs(path, exist_ok=True)

    def create(self, info: CheckpointCommitInfo) -> None:
        # Back-pressure, and the commit group is free again: one collective on it at a time.
        self.wait()
        shared = open_shared_attempt(
            self._group, self.root, str(info.tag), digest=self.digest, dedup=self.dedup
        )
        self._save = _SaveAttempt(
            tag=shared.name, save_dir=os.path.abspath(str(info.save_dir)),
            step=self._step(shared.name), topology=self._topology(),
            config=_ds_config(self._engine), data=_data_position(self._engine),
            shared=shared, sink=shared.sink(), blocking=self.blocking,
        )

    def _key_for(self, attempt: _SaveAttempt, path: str) -> str:
        relative = os.path.relpath(os.path.abspath(path), attempt.save_dir).replace(os.sep, "/")
        prefix = attempt.tag + "/"
        if not relative.startswith(prefix):
            raise ValueError(f"{path}: DeepSpeed saved a file outside {attempt.save_dir}/{attempt.tag}")
        return validate_path(relative[len(prefix) :])

    def save(self, state_dict: Any, path: str) -> None:
        attempt = self._save
        if attempt is None:
            raise RuntimeError("CkptkitCheckpointEngine.save called outside save_checkpoint (no create)")
        key = self._key_for(attempt, path)
        buffer = io.BytesIO()
        torch.save(state_dict, buffer)
        if attempt.blocking:
            attempt.sink.write(key, [buffer.getbuffer()])
        else:
            attempt.staged.append((key, buffer))

    def commit(self, info: CheckpointCommitInfo) -> bool:
        attempt, self._save = self._save, None
        if attempt is None:
            raise RuntimeError("CkptkitCheckpointEngine.commit called without create")
        finish = functools.partial(self._finish, attempt, info.save_latest)
        if attempt.blocking:
            finish()
        else:
            self.last_handle = self._background.submit(self.root.child(attempt.tag).url, attempt.step, finish)
        return True

    def _finish(self, attempt: _SaveAttempt, save_latest: bool) -> Manifest:
        """Write what was staged, then commit with the other ranks (in the background when
        non-blocking). A failed write still joins the gather, so the other ranks learn of it at
        once instead of after ``timeout_s``."""

        def commit_on_rank_0(transaction: CheckpointTransaction, _by_rank: Any) -> Manifest:
            manifest = transaction.commit(
                step=attempt.step,
                layout=LAYOUT,
                topology=attempt.topology,
                metadata=lineage.stamp(
                    {"tag": attempt.tag, "deepspeed_version": _deepspeed_version()},
                    config=attempt.config, data=attempt.data,
                ),
            )
            if save_latest:
                # After the commit: a crash before this line leaves `latest` at the previous tag.
                self.root.put(LATEST_NAME, attempt.tag.encode())
            return manifest

        failure: Exception | None = None
        outcome: list[FileEntry] | str
        try:
            self._write_staged(attempt)
            outcome = attempt.sink.entries
        except Exception as exc:
            failure, outcome = exc, f"{type(exc).__name__}: {exc}"
        try:
            manifest = commit_shared_attempt(self._group, attempt.shared, outcome, commit_on_rank_0)
        except DistributedCommitError:  # pins stay until stale: rank 0 may be committing still
            if failure is not None:
                raise failure from None  # on the rank that failed, its own error says more
            raise
        attempt.shared.unpin()  # committed: the manifest protects every rank's blobs now
        self.last_committed = attempt.tag
        return manifest

    def _write_staged(self, attempt: _SaveAttempt) -> None:
        while attempt.staged:
            key, buffer = attempt.staged.pop(0)  # each snapshot is freed once it is in the store
            attempt.sink.write(key, [buffer.getbuffer()])

    def wait(self) -> None:
        """Wait for the save in flight, if any, and raise its failure unless ``handle.wait()``
        already did (:class:`DistributedCommitError` when any rank failed). Every rank calls it."""
        self._background.wait()

    def close(self) -> None:
        """:meth:`wait`, then stop the background thread and release the commit group."""
        try:
            self._background.close()
        finally:
            self._group.close()

    def _step(self, tag: str) -> int | None:
        if self._engine is not None:
            return int(self._engine.global_steps)
        return step_from_name(tag)

    def _topology(self) -> dict[str, Any] | None:
        engine = self._engine
        if engine is None:
            return {"world_size": self._group.world_size}
        return {
            "world_size": int(engine.world_size),
            "dp_world_size": int(engine.dp_world_size),
            "mp_world_size": int(engine.mp_world_size),
            "zero_stage": int(engine.zero_optimization_stage()),
        }

    # --- load --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def shadow(self, tag: str) -> Iterator[str]:
        """A local directory DeepSpeed can ``glob``: ``<dir>/<tag>/<file>`` placeholders for the
        files of committed checkpoint ``tag``; :meth:`load` reads the real bytes from the store.

        A ZeRO checkpoint saved at another data-parallel world size than the engine's is shown
        as the rank files of the engine's size, made on demand (:mod:`.zero_reshard`)."""
        checkpoint, manifest, inner = locate_tag(self.root, tag)
        local = tempfile.mkdtemp(prefix="ckptkit-ds-load-")
        try:
            resharded = self._reshard_if_needed(checkpoint, manifest, inner)
            if resharded is not None:
                for name in resharded.names:
                    self._placeholder(local, tag, [name], functools.partial(resharded.load, name))
            else:
                files = files_of(checkpoint, manifest)  # a deduplicated file lies in the blob store
                for path, entry in tag_entries(manifest, inner).items():
                    load = functools.partial(_load_entry, files, entry)
                    self._placeholder(local, tag, path.split("/"), load)
            yield local
        finally:
            self._load_map.clear()
            shutil.rmtree(local, ignore_errors=True)

    def _placeholder(self, local: str, tag: str, parts: list[str], load: Callable[[Any], Any]) -> None:
        placeholder = os.path.join(local, tag, *parts)
        os.makedirs(os.path.dirname(placeholder), exist_ok=True)
        open(placeholder, "wb").close()
        self._load_map[os.path.abspath(placeholder)] = load

    def _reshard_if_needed(
        self, checkpoint: Store, manifest: Manifest, inner: str
    ) -> ReshardedRankFiles | None:
        engine = self._engine
        saved = saved_dp_world_size(tag_entries(manifest, inner))
        if engine is None or saved is None or saved == int(engine.dp_world_size):
            return None
        world = int(engine.dp_world_size)
        stage = int(engine.zero_optimization_stage())
        resharded = ReshardedRankFiles(checkpoint, manifest, world, stage, inner)
        if self.rank == 0:
            log.warning(
                "ckptkit: %s was saved by %d data-parallel ranks; resharding its ZeRO-%d state on load "
                "for %d ranks (each rank reads only its own partitions)",
                checkpoint.url, saved, resharded.source.stage, world,
            )
        return resharded

    def load(self, path: str, map_location: Any = None) -> Any:
        load = self._load_map.get(os.path.abspath(path))
        if load is None:
            raise NotFoundError(f"{path}: not a file of a committed checkpoint opened by ckptkit")
        return load(map_location)


def _load_entry(files: Store, entry: FileEntry, map_location: Any = None) -> Any:
    """One committed file (``files``: the checkpoint's files by logical path), checked against its
    manifest digest, loaded with vetted classes only."""
    data = files.get(logical_path(entry.path))
    actual = digest_bytes(data, algorithm=entry.algorithm)
    if actual.size != entry.size or actual.digest != entry.digest:
        url = f"{files.url}/{logical_path(entry.path)}"
        raise ChecksumMismatchError(url, entry.digest, actual.digest, (0, len(data)))
    with safe_globals():
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)


def _ds_config(engine: Any) -> dict[str, Any] | None:
    config = getattr(getattr(engine, "_config", None), "_param_dict", None)
    return config if isinstance(config, dict) else None


def _data_position(engine: Any) -> dict[str, Any]:
    if engine is None:
        return {}
    return lineage.data_position(
        global_step=getattr(engine, "global_steps", None),
        samples_consumed=getattr(engine, "global_samples", None),
    )


def _deepspeed_version() -> str:
    import deepspeed

    return str(deepspeed.__version__)


# --- helpers ---------------------------------------------------------------------------------------


def use_ckptkit(
    engine: Any,
    root_url: str | os.PathLike[str] | Store,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    digest: str | None = None,
    blocking: bool = True,
    attest: bool = False,
    dedup: bool = False,
    **storage_options: Any,
) -> CkptkitCheckpointEngine:
    """Install a :class:`CkptkitCheckpointEngine` on DeepSpeed ``engine``. Call it on every rank.
    ``blocking=False`` makes its saves non-blocking by default. ``attest=True`` makes
    :func:`load_checkpoint` compare the loaded state with the checkpoint's
    (:func:`ckptkit.attest`) and raise :class:`~ckptkit.errors.AttestationError` naming what differs."""
    if isinstance(engine.checkpoint_engine, CkptkitCheckpointEngine):
        engine.checkpoint_engine.wait()  # a save still in flight must not be dropped with it
    checkpoint_engine = CkptkitCheckpointEngine(
        root_url, engine=engine, timeout_s=timeout_s, digest=digest, blocking=blocking, attest=attest,
        dedup=dedup, **storage_options,
    )
    engine.checkpoint_engine = checkpoint_engine
    return checkpoint_engine


def _installed(engine: Any, root_url: str | os.PathLike[str] | Store | None) -> CkptkitCheckpointEngine:
    current = engine.checkpoint_engine
    if isinstance(current, CkptkitCheckpointEngine) and (
        root_url is None or open_store(root_url).url == current.root.url
    ):
        return current
    if root_url is None:
        raise ValueError("no ckptkit checkpoint engine installed: pass root_url or call use_ckptkit first")
    return use_ckptkit(engine, root_url)


def save_checkpoint(
    engine: Any,
    root_url: str | os.PathLike[str] | Store | None = None,
    tag: str | None = None,
    client_state: dict[str, Any] | None = None,
    *,
    save_latest: bool = True,
    exclude_frozen_parameters: bool = False,
    blocking: bool | None = None,
) -> str | SaveHandle:
    """``engine.save_checkpoint`` into the ckptkit store; returns the committed tag. Every rank calls it.

    DeepSpeed gets a scratch directory as ``save_dir``: its plain-file writes (its own ``latest``,
    the recovery scripts) go there and are discarded; ``latest`` in the store is written by the
    checkpoint engine after the commit. Raises :class:`DistributedCommitError` on every surviving
    rank if any rank fails.

    ``blocking=False`` returns a :class:`~ckptkit.SaveHandle` as soon as every file is serialised
    in memory; the rest runs in the background (see :class:`CkptkitCheckpointEngine`) and a
    failure is raised by ``handle.wait()`` or the engine's next save, load, ``wait`` or ``close``.
    None takes the engine's own setting (``use_ckptkit(..., blocking=)``, blocking by default).
    """
    checkpoint_engine = _installed(engine, root_url)
    default = checkpoint_engine.blocking
    if blocking is not None:
        checkpoint_engine.blocking = blocking
    try:
        with tempfile.TemporaryDirectory(prefix="ckptkit-ds-save-") as scratch:
            engine.save_checkpoint(
                scratch,
                tag=tag,
                client_state=client_state or {},
                save_latest=save_latest,
                exclude_frozen_parameters=exclude_frozen_parameters,
            )
    finally:
        checkpoint_engine.blocking = default
    if blocking is False or (blocking is None and not default):
        assert checkpoint_engine.last_handle is not None
        return checkpoint_engine.last_handle
    assert checkpoint_engine.last_committed is not None
    return checkpoint_engine.last_committed


def locate_tag(root: Store, tag: str) -> tuple[Store, Manifest, str]:
    """Where committed tag ``tag`` of save dir ``root`` is: the checkpoint, its manifest, and the
    prefix of the tag's files in it. ckptkit's own saves and ``index`` commit each tag directory
    (``root/<tag>``, prefix ""); ``ckptkit reshard`` (and ``index`` of an HF ``checkpoint-N``)
    commits the save dir whole, ``latest`` included (``root``, prefix ``"<tag>/"``)."""
    validate_path(tag)
    if root.exists(MANIFEST_NAME):
        manifest = read_manifest(root)
        if not tag_entries(manifest, f"{tag}/"):
            raise NotCommittedError(f"{root.url}: the committed save dir holds no tag {tag!r}")
        return root, manifest, f"{tag}/"
    checkpoint = root.child(tag)
    return checkpoint, read_manifest(checkpoint), ""


def resolve_tag(root: Store, tag: str | None = None) -> str | None:
    """The committed DeepSpeed checkpoint to load: ``tag`` (which must be committed), else the one
    ``latest`` names if it is committed, else the newest committed one; None if there is none.
    A save dir committed whole (:func:`locate_tag`) has one answer: the tag its ``latest`` names.

    ``latest`` is read by :func:`ckptkit.formats.deepspeed.resolve_latest`, as everywhere else: one
    that is oversized, not a directory name, or names a tag with no files is a FormatError."""
    if root.exists(MANIFEST_NAME):
        if tag is None:
            tag = resolve_latest(files_of(root, read_manifest(root)))
            if tag is None:
                raise NotCommittedError(f"{root.url}: a committed save dir without a 'latest' file")
        locate_tag(root, tag)  # NotCommittedError unless the tag is in it
        return tag
    if tag is not None:
        read_manifest(root.child(validate_path(tag)))  # NotCommittedError if it is not committed
        return tag
    pointed = resolve_latest(root)  # FormatError when `latest` is malformed or names no tag here
    if pointed is not None:
        try:
            if read_manifest(root.child(pointed)).layout == LAYOUT:
                return pointed
        except (NotCommittedError, ManifestError, NotFoundError) as exc:
            log.warning(
                "%s/%s names %r, which is not committed (%s); using the newest committed checkpoint",
                root.url,
                LATEST_NAME,
                pointed,
                exc,
            )
    committed = [
        c
        for c in list_checkpoints(root)
        if c.committed and isinstance(c.manifest, Manifest) and c.manifest.layout == LAYOUT
    ]
    return committed[-1].name if committed else None


def load_checkpoint(
    engine: Any,
    root_url: str | os.PathLike[str] | Store | None = None,
    tag: str | None = None,
    **load_options: Any,
) -> tuple[str | None, dict[str, Any] | None]:
    """``engine.load_checkpoint`` from the latest committed checkpoint (or ``tag``) in the store.

    Every rank calls it. Returns ``(checkpoint_url, client_state)``, or ``(None, None)`` when the
    root holds no committed DeepSpeed checkpoint (as DeepSpeed does when there is no ``latest``).
    ``load_options`` go to ``engine.load_checkpoint`` (``load_optimizer_states`` ...).
    """
    checkpoint_engine = _installed(engine, root_url)
    checkpoint_engine.wait()  # the save in flight first: its commit uses the group broadcast below
    resolved: str | tuple[str] | None
    if checkpoint_engine.rank == 0:  # one rank decides, so all load the same checkpoint
        try:
            resolved = resolve_tag(checkpoint_engine.root, tag)
        except Exception as exc:
            resolved = (f"{type(exc).__name__}: {exc}",)
    else:
        resolved = None
    resolved = checkpoint_engine._broadcast_from_0(resolved)
    if isinstance(resolved, tuple):
        raise NotCommittedError(f"{checkpoint_engine.root.url}: cannot load {tag or 'latest'}: {resolved[0]}")
    if resolved is None:
        return None, None
    with checkpoint_engine.shadow(resolved) as local:
        load_path, client_state = engine.load_checkpoint(local, tag=resolved, **load_options)
    if load_path is None:
        return None, None
    checkpoint, manifest, inner = locate_tag(checkpoint_engine.root, resolved)
    lineage.resumed_from(checkpoint.url, manifest)
    if checkpoint_engine.attest:
        from ckptkit.integrations.deepspeed_attest import attest_engine

        attest_engine(engine, checkpoint, manifest, tag=inner.rstrip("/") or None).raise_for_differences()
    return checkpoint_engine.root.child(resolved).url, client_state
