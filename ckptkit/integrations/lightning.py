"""Lightning checkpoints written as committed ckptkit checkpoints, on local disk or an object store.

:class:`CkptkitCheckpointIO` is a Lightning ``CheckpointIO`` plugin::

    trainer = Trainer(plugins=[CkptkitCheckpointIO()], callbacks=[ModelCheckpoint(dirpath=...)])

Every checkpoint "file" Lightning asks for (``<dirpath>/epoch=0-step=10.ckpt``) becomes a ckptkit
checkpoint *directory* of that name, written through a :class:`~ckptkit.commit.CheckpointTransaction`
and committed by its manifest (layout ``native``, step = ``global_step``). Nothing half-written
is ever visible under that name: on local disk the directory appears by one rename; on S3 the
manifest is the last object written. What ``ModelCheckpoint`` does with paths keeps working:
``exists`` sees the directory, ``save_top_k`` retention goes through :meth:`remove_checkpoint`,
which uncommits first (:func:`ckptkit.commit.delete_checkpoint`), and a name saved again
(``last.ckpt``) replaces the old checkpoint — removed first, so a crash in between leaves no
``last.ckpt`` rather than a torn one.

``CkptkitCheckpointIO(blocking=False)`` saves without stalling the Trainer: the checkpoint is
planned and its tensors copied into the :class:`~ckptkit.async_save.BackgroundSaver`'s reusable
host buffer, then written and committed in that thread. Lightning's own ``AsyncCheckpointIO``
clones every tensor into fresh memory at each save and queues saves without bound; here one save
is in flight, the next waits for it, and the buffer is reused.

Format: the checkpoint dict is stored in ckptkit's pickle-free native format (tensors in
safetensors shards, everything else in typed JSON). Lightning's ``AttributeDict`` is stored as a
plain dict and restored as an ``AttributeDict``. A value the native format cannot hold (a sparse
or quantized tensor, a class the user allowlisted with ``torch.serialization.add_safe_globals``)
goes into one small ``torch.save`` blob, ``lightning-extra.pt``, and is loaded back with
``torch.load(weights_only=True)`` inside :func:`ckptkit.safe_globals`; the save refuses a value
that such a load would reject, naming its path, so that no checkpoint is written that cannot be
read back without running code. Nothing is ever loaded with ``weights_only=False``.

Resume with :func:`latest_committed_checkpoint`: the newest *committed* checkpoint (highest
``global_step``) that verifies; half-written ones are never returned.
:meth:`CkptkitCheckpointIO.load_checkpoint` refuses an uncommitted checkpoint with
:class:`~ckptkit.errors.NotCommittedError`.

Limits: rank 0 writes the whole checkpoint (as with Lightning's own ``TorchCheckpointIO``), so
strategies that shard the checkpoint across ranks (FSDP sharded, DeepSpeed) are not covered;
``LightningModule.load_from_checkpoint`` reads files with ``torch.load`` itself, outside the
plugin: use :func:`load_lightning_checkpoint` and ``load_state_dict`` instead.
"""

from __future__ import annotations

import io
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

try:
    import pytorch_lightning
    from lightning_fabric.plugins.io.checkpoint_io import CheckpointIO
    from lightning_fabric.utilities.data import AttributeDict
except ImportError as exc:  # pragma: no cover - the message is the point
    raise ImportError(
        "ckptkit.integrations.lightning needs pytorch-lightning: pip install 'ckptkit[lightning]'"
    ) from exc

from ckptkit import lineage
from ckptkit.async_save import BackgroundSaver, SaveHandle
from ckptkit.blobs import sweep
from ckptkit.catalog import list_checkpoints, read_manifest
from ckptkit.commit import CheckpointTransaction, delete_checkpoint
from ckptkit.errors import ChecksumMismatchError, FormatError, NotCommittedError, UnstorableValueError
from ckptkit.hashing import choose_algorithm, digest_bytes
from ckptkit.manifest import MANIFEST_NAME, Manifest
from ckptkit.native import read_native
from ckptkit.native.files import native_files
from ckptkit.native.tree import TreeEncoder, TreePath, describe_type, format_path
from ckptkit.native.writer import NativePlan, check_write_options, plan_native, write_planned
from ckptkit.ops.verify import verify_checkpoint
from ckptkit.safe import safe_globals
from ckptkit.storage import Store, open_store, split_parent
from ckptkit.storage.base import join_key

logger = logging.getLogger(__name__)

__all__ = [
    "EXTRA_FILE",
    "PRODUCER",
    "CkptkitCheckpointIO",
    "latest_committed_checkpoint",
    "load_lightning_checkpoint",
    "save_lightning_checkpoint",
]

PRODUCER = "ckptkit.integrations.lightning"
EXTRA_FILE = "lightning-extra.pt"
_EXTRA_VERSION = 1
_DEFAULT_SHARD_SIZE = 1 << 30


class CkptkitCheckpointIO(CheckpointIO):
    """Lightning ``CheckpointIO`` that saves each checkpoint as a committed ckptkit checkpoint.

    Paths are local paths or URLs (``s3://bucket/run/epoch=0-step=10.ckpt``); ``storage_options``
    go to :func:`ckptkit.open_store` for every path (for S3: ``endpoint_url``, ``key``, ...).
    ``digest`` is how files are hashed into each manifest, as for ``ckptkit.save``; ``dedup=True``
    stores each file's bytes once in the blob store of the checkpoint's directory, as there.

    ``blocking=False``: ``save_checkpoint`` returns once the checkpoint's tensors are copied into
    a reusable host buffer (values that go to the extra blob are serialised then too); writing,
    hashing and the commit run in a background thread. One save is in flight at a time: the
    next save, a load, and the removal of the checkpoint being written wait for it first, and a
    background failure is raised by the next call (save, load, remove or ``teardown``).
    ``teardown``, which the Trainer calls at the end of ``fit``, waits for the last save.
    """

    def __init__(
        self,
        storage_options: dict[str, Any] | None = None,
        *,
        max_shard_size: int = _DEFAULT_SHARD_SIZE,
        jobs: int = 4,
        digest: str | None = None,
        blocking: bool = True,
        dedup: bool = False,
    ) -> None:
        self.storage_options = dict(storage_options or {})
        self.dedup = dedup
        self.max_shard_size = max_shard_size
        self.jobs = jobs
        self.digest = None if digest is None else choose_algorithm(digest)
        self.blocking = blocking
        # One store per parent directory: on S3 each store holds a connection pool.
        self._stores: dict[str, Store] = {}
        self._saver: BackgroundSaver | None = None  # made at the first non-blocking save
        self.last_handle: SaveHandle | None = None  # of the last non-blocking save

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike[str], storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(
                "CkptkitCheckpointIO takes storage options once, as "
                "CkptkitCheckpointIO(storage_options=...), not per save"
            )
        root, name = self._locate(path)
        if self.blocking:
            self._wait()
            save_lightning_checkpoint(
                root, name, checkpoint, max_shard_size=self.max_shard_size, jobs=self.jobs, replace=True,
                digest=self.digest, dedup=self.dedup,
            )
            return
        if self._saver is None:
            self._saver = BackgroundSaver("ckptkit-lightning")
        saver = self._saver
        saver.wait()  # back-pressure, and the staging buffer is free again
        job = prepare_lightning_save(
            root, name, checkpoint, max_shard_size=self.max_shard_size, jobs=self.jobs, replace=True,
            digest=self.digest, stage=saver.stager.stage, dedup=self.dedup,
        )
        self.last_handle = saver.submit(f"{root.url}/{name}", _step_of(checkpoint), job)

    def load_checkpoint(
        self, path: str | os.PathLike[str], map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Load a committed checkpoint. ``weights_only`` is accepted for Lightning's sake and
        ignored: ckptkit never runs code from a checkpoint, whatever it is set to."""
        self._wait()  # it may be the checkpoint still being written
        root, name = self._locate(path)
        return load_lightning_checkpoint(root.child(name), map_location=map_location)

    def remove_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Uncommit, then delete; a checkpoint that is not there is not an error (as in Lightning)."""
        root, name = self._locate(path)
        handle = self._saver.in_flight if self._saver is not None else None
        if handle is not None and handle.url == f"{root.url}/{name}":
            self._wait()
        elif self._saver is not None:
            self._saver.raise_failure()  # older checkpoints go while the new one is written
        if any(True for _ in root.list(name)):
            delete_checkpoint(root, name)
            if self.dedup:
                sweep(root)  # the blobs only it named; never one another checkpoint needs

    def wait(self) -> None:
        """Wait for the save in flight, if any, and raise its failure unless ``handle.wait()``
        already did."""
        self._wait()

    def teardown(self) -> None:
        """Wait for the last save (raising its failure), then release the thread and the stores."""
        saver, self._saver = self._saver, None
        try:
            if saver is not None:
                saver.close()
        finally:
            for store in self._stores.values():
                store.close()
            self._stores.clear()

    def _wait(self) -> None:
        if self._saver is not None:
            self._saver.wait()

    def _locate(self, path: str | os.PathLike[str]) -> tuple[Store, str]:
        parent, name = split_parent(path)
        if parent not in self._stores:
            self._stores[parent] = open_store(parent, **self.storage_options)
        return self._stores[parent], name


# --- saving --------------------------------------------------------------------------------------


@dataclass
class _Split:
    """A checkpoint taken apart: what the native format holds, and the values it cannot."""

    tree: Any = None
    holes: list[tuple[TreePath, Any]] = field(default_factory=list)
    attribute_dicts: list[TreePath] = field(default_factory=list)


def save_lightning_checkpoint(
    root: Store,
    name: str,
    checkpoint: dict[str, Any],
    *,
    max_shard_size: int = _DEFAULT_SHARD_SIZE,
    jobs: int = 4,
    replace: bool = False,
    digest: str | None = None,
    dedup: bool = False,
) -> Manifest:
    """Write a Lightning checkpoint dict as checkpoint ``name`` under ``root`` and commit it.

    With ``replace``, a committed checkpoint of that name is deleted first; without it, saving
    over one raises :class:`~ckptkit.errors.CommitConflictError`. ``digest`` is as for
    ``ckptkit.save``, and so is ``dedup``.
    """
    return prepare_lightning_save(
        root, name, checkpoint, max_shard_size=max_shard_size, jobs=jobs, replace=replace, digest=digest,
        dedup=dedup,
    )()


def prepare_lightning_save(
    root: Store,
    name: str,
    checkpoint: dict[str, Any],
    *,
    max_shard_size: int = _DEFAULT_SHARD_SIZE,
    jobs: int = 4,
    replace: bool = False,
    digest: str | None = None,
    stage: Callable[[NativePlan], NativePlan] | None = None,
    dedup: bool = False,
) -> Callable[[], Manifest]:
    """Everything of :func:`save_lightning_checkpoint` that reads ``checkpoint`` (split, extra
    blob, plan, and ``stage`` to copy its tensors, e.g. a :class:`~ckptkit.native.staging.HostStager`'s),
    done now; returns the rest (delete a replaced checkpoint, write, commit) to run now or in the
    background. Without ``stage`` the job reads the tensors when it runs."""
    algorithm = choose_algorithm(digest)  # a bad name fails before the old checkpoint is deleted
    check_write_options(max_shard_size, jobs)
    split = _split_checkpoint(checkpoint)
    extra = _extra_blob(split)  # before anything is written: a refused value leaves no debris
    planned = plan_native(split.tree)
    if stage is not None:
        planned = stage(planned)
    metadata = {
        "producer": PRODUCER,
        "pytorch_lightning": pytorch_lightning.__version__,
        "epoch": checkpoint.get("epoch") if type(checkpoint.get("epoch")) is int else None,
        "extra": EXTRA_FILE if extra is not None else None,
    }
    step = _step_of(checkpoint)
    hparams = checkpoint.get("hyper_parameters")
    metadata = lineage.stamp(
        metadata, config=dict(hparams) if isinstance(hparams, Mapping) else None,
        data=lineage.data_position(epoch=metadata["epoch"], global_step=step),
    )

    def write_and_commit() -> Manifest:
        if replace and root.exists(join_key(name, MANIFEST_NAME)):
            delete_checkpoint(root, name)
        with CheckpointTransaction(root, name, digest=algorithm, dedup=dedup) as txn:
            write_planned(planned, txn, max_shard_size=max_shard_size, jobs=jobs)
            if extra is not None:
                txn.write(EXTRA_FILE, extra)
            return txn.commit(step=step, layout="native", metadata=metadata)

    return write_and_commit


def _step_of(checkpoint: dict[str, Any]) -> int | None:
    step = checkpoint.get("global_step")
    return step if type(step) is int and step >= 0 else None


def _split_checkpoint(checkpoint: dict[str, Any]) -> _Split:
    split = _Split()
    split.tree = _split_value(checkpoint, (), split)
    return split


def _split_value(value: Any, path: TreePath, split: _Split) -> Any:
    """``value`` with every part the native format cannot store replaced by None (a hole).

    Dicts and lists are descended into, so one odd value does not push its whole subtree out
    of the native format; anything else is judged whole by the native encoder itself.
    """
    if isinstance(value, AttributeDict):
        split.attribute_dicts.append(path)
        value = dict(value)
    kind = type(value)
    if kind in (dict, OrderedDict) and _native_storable(dict.fromkeys(value)):
        return kind((key, _split_value(item, (*path, key), split)) for key, item in value.items())
    if kind is list:
        return [_split_value(item, (*path, index), split) for index, item in enumerate(value)]
    if _native_storable(value):
        return value
    split.holes.append((path, value))
    return None


def _native_storable(value: Any) -> bool:
    try:
        TreeEncoder().encode(value)
    except UnstorableValueError:
        return False
    return True


def _extra_blob(split: _Split) -> bytes | None:
    """The ``torch.save`` blob of the holes and AttributeDict paths, or None if there are none.

    Each hole is first proven to load with ``weights_only=True``: a value that would not is
    refused now, by its path, rather than found unreadable at resume time.
    """
    if not split.holes and not split.attribute_dicts:
        return None
    for path, value in split.holes:
        try:
            _torch_load(_torch_save(value))
        except Exception as exc:  # torch raises UnpicklingError, RuntimeError or others here
            raise UnstorableValueError(
                format_path(path),
                f"{describe_type(type(value))} fits neither ckptkit's native format nor a torch.load"
                "(weights_only=True); convert it to plain types (dict, list, str, numbers, tensors) or "
                "allowlist its class with torch.serialization.add_safe_globals",
            ) from exc
    return _torch_save(
        {
            "version": _EXTRA_VERSION,
            "holes": [(list(path), value) for path, value in split.holes],
            "attribute_dicts": [list(path) for path in split.attribute_dicts],
        }
    )


def _torch_save(value: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _torch_load(data: bytes, map_location: Any = None) -> Any:
    with safe_globals():
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)


# --- loading -------------------------------------------------------------------------------------


def load_lightning_checkpoint(
    checkpoint: Store | str | os.PathLike[str], *, map_location: Any = None, **storage_options: Any
) -> dict[str, Any]:
    """The checkpoint dict of a committed Lightning checkpoint, as Lightning saved it.

    ``map_location`` works as in :func:`ckptkit.load`. Raises
    :class:`~ckptkit.errors.NotCommittedError` for a checkpoint without a committed manifest.
    """
    store = open_store(checkpoint, **storage_options)
    try:
        manifest = read_manifest(store)
    except NotCommittedError as exc:
        raise NotCommittedError(
            f"{store.url} is not a committed checkpoint (half-written, deleted, or not saved by "
            "ckptkit); resume from latest_committed_checkpoint(<dirpath>) instead"
        ) from exc
    lineage.resumed_from(store.url, manifest)
    files = native_files(store, manifest)
    # mmap=False: the optimizer updates loaded state in place, and it must own that memory.
    state = read_native(files, map_location=map_location, mmap=False)
    extra_name = manifest.metadata.get("extra")
    if extra_name:
        extra = _read_extra(files, manifest, extra_name, map_location)
        state = _fill(state, extra)
    return state


def _read_extra(files: Store, manifest: Manifest, name: str, map_location: Any) -> dict[str, Any]:
    data = files.get(name)
    listed = {entry.path.rsplit("/", 1)[-1]: entry for entry in manifest.files}
    entry = listed.get(name)
    if entry is None:
        raise FormatError(f"{files.url}/{name}: named by the manifest's metadata but not listed in it")
    actual = digest_bytes(data, algorithm=entry.algorithm).digest
    if actual != entry.digest:
        raise ChecksumMismatchError(entry.path, entry.digest, actual, (0, len(data)))
    # torch.load's callable map_location has another signature than ckptkit's; such values
    # are rare enough here (tensors that are not native) to keep their saved device.
    extra = _torch_load(data, None if callable(map_location) else map_location)
    if not isinstance(extra, dict) or extra.get("version") != _EXTRA_VERSION:
        raise FormatError(f"{files.url}/{name}: not a version-{_EXTRA_VERSION} Lightning extra blob")
    return extra


def _fill(state: Any, extra: dict[str, Any]) -> Any:
    """Put the holes' values back, then turn the recorded dicts back into AttributeDicts."""
    for path, value in extra["holes"]:
        state = _set_at(state, tuple(path), value)
    # Deepest first, so a parent wrapped later still holds its already-wrapped children.
    for path in sorted(extra["attribute_dicts"], key=len, reverse=True):
        state = _set_at(state, tuple(path), AttributeDict(_get_at(state, tuple(path))))
    return state


def _get_at(state: Any, path: TreePath) -> Any:
    for key in path:
        state = state[key]
    return state


def _set_at(state: Any, path: TreePath, value: Any) -> Any:
    if not path:
        return value
    _get_at(state, path[:-1])[path[-1]] = value
    return state


# --- resuming ------------------------------------------------------------------------------------


def latest_committed_checkpoint(
    dirpath: str | os.PathLike[str], *, quick: bool = True, **storage_options: Any
) -> str | None:
    """The newest committed Lightning checkpoint under ``dirpath`` that verifies, or None.

    Pass it as ``trainer.fit(ckpt_path=...)``. Newest means the highest ``global_step`` (ties:
    the most recently committed). Half-written checkpoints are never returned; a committed one
    that fails verification is skipped, with a warning, in favour of the next older one.
    ``quick`` checks presence and sizes only; ``quick=False`` re-hashes every file first.
    """
    root = open_store(dirpath, **storage_options)
    committed = [
        info
        for info in list_checkpoints(root)
        if info.committed and info.manifest is not None and info.manifest.metadata.get("producer") == PRODUCER
    ]
    for info in reversed(committed):  # oldest first by step, so newest first here
        report = verify_checkpoint(root.child(info.name), quick=quick)
        if report.ok:
            return info.url
        logger.warning("skipping %s: it fails verification: %s", info.url, report.findings[0].message)
    return None
