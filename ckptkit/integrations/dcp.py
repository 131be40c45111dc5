"""ckptkit as ``torch.distributed.checkpoint``'s storage layer: a DCP StorageWriter and StorageReader.

``dcp.save(state, storage_writer=CkptkitWriter("s3://b/run/step-100"))`` writes a DCP checkpoint
that is committed the ckptkit way, and ``dcp.load(state, storage_reader=CkptkitReader(...))``
reads it back with every byte checked. DCP keeps what it is good at (planning, deduplication,
resharding on load: FSDP2 state saved on N ranks loads on M); ckptkit adds what DCP lacks
(torchtitan RFC 4011): a manifest with every file's content digest, a commit that happens only
after every rank's data is written, and a reader that trusts nothing it has not checked.

The save, as DCP drives it (resharding.md §2.1):

1. ``prepare_global_plan`` (the coordinator) opens the :class:`~ckptkit.commit.CheckpointTransaction`
   and puts where its files go (the local staging directory, or the object-store attempt prefix)
   into every rank's plan, so that all ranks write into one attempt.
2. ``write_data`` (every rank) streams the rank's items into ``__<rank>_<n>.distcp`` through the
   store, hashing them on the way; each :class:`WriteResult` carries the item's place in its file
   and the file's manifest entry.
3. ``finish`` (the coordinator, only once every rank succeeded) writes ``.metadata`` (a pickle,
   as DCP writes it, so that DCP's own ``FileSystemReader`` still reads a local checkpoint) and
   commits ONE manifest of layout ``dcp`` listing every rank's files. A rank that failed means
   no ``finish``, hence no commit.

The data files hold what ``FileSystemWriter`` writes: bytes items as they are, each tensor as a
``torch.save`` zip (written as a stream by :mod:`ckptkit.formats.torch_writer`, no copy of the
tensor). The reader loads ``.metadata`` without running arbitrary pickle code: its globals are
checked against the DCP metadata classes first (symbolically, nothing imported), then unpickled
with an unpickler that can resolve those classes and nothing else. Torch 2.13's own reader still
runs ``pickle.load`` on it.

torch is imported at module level: this is an integration, loaded only by those who use it.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import re
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed._state_dict_utils import _copy_state_dict, _create_cpu_state_dict
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    ReadItem,
    SavePlan,
    SavePlanner,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.staging import AsyncStager
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.futures import Future

from ckptkit import lineage
from ckptkit.catalog import read_manifest
from ckptkit.commit import CheckpointTransaction, files_of, logical_path
from ckptkit.distributed import AttemptSink
from ckptkit.errors import FormatError, UnsafeContentError
from ckptkit.formats.dcp import METADATA
from ckptkit.formats.pickle_writer import STORAGE_CLASS, StoredTensor
from ckptkit.formats.torch_writer import torch_tree_chunks
from ckptkit.hashing import choose_algorithm
from ckptkit.manifest import FileEntry, Manifest
from ckptkit.pickle import GlobalRef, Limits, PickleFormatError, load_symbolic
from ckptkit.pickle.vetted import DCP_METADATA_CLASSES
from ckptkit.safe import safe_globals
from ckptkit.storage import Store, open_store, split_parent
from ckptkit.verified_reads import VerifiedFiles

LAYOUT = "dcp"
DCP_VERSION = "1.0.0"  # what FileSystemWriter of torch 2.13 records
SUFFIX = ".distcp"

# The globals a DCP ``.metadata`` may name (resharding.md §2.2): the metadata classes the vetted
# table lists, and torch.Size, dtypes and layouts. Each is a plain value type: building one
# runs no code chosen by the file.
_TORCH_VALUES = frozenset(
    {
        GlobalRef("torch", "Size"),
        GlobalRef("torch.serialization", "_get_layout"),
        GlobalRef("collections", "OrderedDict"),
    }
)


def metadata_global_allowed(module: str, name: str) -> bool:
    """Whether a DCP ``.metadata`` may name ``module.name``: a vetted class, or a torch dtype."""
    found = GlobalRef(module, name)
    if found in DCP_METADATA_CLASSES or found in _TORCH_VALUES:
        return True
    return module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)


# --- the save ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Attempt:
    """What the coordinator tells each rank in its plan: where the shared attempt's files go."""

    files_key: str  # relative to the checkpoint's parent (the root)
    data_prefix: str  # the attempt prefix inside the checkpoint ("" for local staging)
    digest: str  # the algorithm every rank hashes with (the coordinator's choice)
    prefix: str  # this rank's file names: "__<rank>_"


@dataclass(frozen=True)
class _Written:
    """A WriteResult's storage_data on its way to ``finish``: the item's place in its file (what
    goes into ``.metadata``) and the file's manifest entry (what goes into the manifest)."""

    info: _StorageInfo
    entry: FileEntry


class _Target:
    """A checkpoint's place: its parent store (the root) and its name there; reopened lazily,
    so that the writer and reader pickle as a URL and options (DCP's process-mode async_save
    sends them to another process)."""

    def __init__(self, checkpoint: str | os.PathLike[str] | Store, options: dict[str, Any]) -> None:
        self.options = options
        self._root: Store | None = None
        if isinstance(checkpoint, Store):
            self._store: Store | None = checkpoint
            self.url = checkpoint.url
        else:
            self._store = None
            self.url = os.fspath(checkpoint)
        self.parent, self.name = split_parent(self.url)

    @classmethod
    def under(cls, root: Store, name: str) -> _Target:
        target = cls(f"{root.url.rstrip('/')}/{name}", {})
        target._root = root
        return target

    def root(self) -> Store:
        if self._root is None:
            self._root = open_store(self.parent, **self.options)
        return self._root

    def checkpoint(self) -> Store:
        if self._store is None:
            self._store = self.root().child(self.name)
        return self._store

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_root": None, "_store": None}


class CkptkitWriter(StorageWriter, AsyncStager):
    """A DCP ``StorageWriter`` that commits the checkpoint at ``checkpoint_url`` through ckptkit.

    ``checkpoint_url`` is the checkpoint itself (``s3://bucket/run/step-100``, a path, or a
    :class:`~ckptkit.storage.Store` rooted there; a Store is reopened from its URL where the
    writer is pickled). ``digest`` is as for :func:`ckptkit.save`; ``storage_options`` go to
    :func:`ckptkit.open_store`. ``step``, ``metadata`` and ``metrics`` go into the manifest.
    ``thread_count`` files per rank are written side by side, as ``FileSystemWriter``'s (1).

    It is its own ``AsyncStager`` for ``dcp.async_save``: a synchronous copy of the state to
    host memory (pinned only when a tensor is on an accelerator), so staging works on CPU-only
    machines too; with ``cache_staged_state_dict=True`` the host buffers are kept and reused,
    and the caller must wait for the previous save before the next (as for DCP's own stagers).

    Picklable (DCP's process-mode async_save pickles it): stores are reopened where it lands.
    If ``dcp.save`` raises, call :meth:`abort` on the coordinator to remove what was staged
    (otherwise ``ckptkit gc`` does); nothing is committed either way.
    """

    _synchronize_after_execute = False

    def __init__(
        self,
        checkpoint_url: str | os.PathLike[str] | Store,
        *,
        digest: str | None = None,
        step: int | None = None,
        metadata: dict[str, Any] | None = None,
        metrics: dict[str, float] | None = None,
        thread_count: int = 1,
        cache_staged_state_dict: bool = False,
        **storage_options: Any,
    ) -> None:
        if thread_count < 1:
            raise ValueError(f"thread_count must be at least 1, got {thread_count}")
        choose_algorithm(digest)  # an unknown name fails here, before any collective
        self.digest = digest
        self.step = step
        self.metadata = metadata
        self.metrics = metrics
        self.thread_count = thread_count
        self.cache_staged_state_dict = cache_staged_state_dict
        self._target = _Target(checkpoint_url, storage_options)
        self._save_id = uuid.uuid4().hex
        self._transaction: CheckpointTransaction | None = None
        self._staged: dict[str, Any] | None = None
        self.manifest: Manifest | None = None  # the committed manifest, on the coordinator

    @classmethod
    def under(cls, root: Store, name: str, **options: Any) -> CkptkitWriter:
        """A writer of checkpoint ``name`` under the open store ``root`` (CheckpointManager's)."""
        writer = cls(f"{root.url.rstrip('/')}/{name}", **options)
        writer._target = _Target.under(root, name)
        return writer

    @property
    def checkpoint_id(self) -> str:
        return self._target.url

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return isinstance(checkpoint_id, (str, os.PathLike))

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        self.abort()  # a save of this writer that DCP gave up on: its attempt goes now
        if checkpoint_id:
            self._target = _Target(checkpoint_id, self._target.options)
        self._save_id = uuid.uuid4().hex
        self.manifest = None

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=self._target.url, save_id=self._save_id)

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        if not kwargs.get("use_collectives", True):
            raise ValueError(
                "CkptkitWriter commits one manifest after every rank has written, which needs "
                "DCP's collectives: use_collectives=False is not supported"
            )

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        self.abort()
        self._transaction = CheckpointTransaction(self._target.root(), self._target.name, digest=self.digest)
        txn = self._transaction
        return [
            dataclasses.replace(
                plan, storage_data=_Attempt(txn.attempt_key, txn.data_prefix, txn.digest, f"__{rank}_")
            )
            for rank, plan in enumerate(plans)
        ]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        attempt: _Attempt = plan.storage_data
        sink = AttemptSink(
            self._target.root().child(attempt.files_key), attempt.data_prefix, digest=attempt.digest
        )
        buckets = [b for b in _buckets(plan.items, self.thread_count) if b]
        names = [f"{attempt.prefix}{n}{SUFFIX}" for n in range(len(buckets))]
        try:
            if len(buckets) <= 1:
                written = [
                    _write_file(sink, name, items, planner)
                    for name, items in zip(names, buckets, strict=True)
                ]
            else:
                with ThreadPoolExecutor(len(buckets), thread_name_prefix="ckptkit-dcp") as pool:
                    written = list(
                        pool.map(
                            lambda job: _write_file(sink, *job, planner), zip(names, buckets, strict=True)
                        )
                    )
        except BaseException:
            self.abort()  # on the coordinator: this save cannot commit; other ranks' debris is gc's
            raise
        future: Future[list[WriteResult]] = Future()
        future.set_result([result for results in written for result in results])
        return future

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        txn = self._transaction
        if txn is None:
            raise RuntimeError("CkptkitWriter.finish without prepare_global_plan on this writer")
        try:
            storage_data = {}
            by_rank: list[set[str]] = []
            for rank_results in results:
                files = set()
                for result in rank_results:
                    written: _Written = result.storage_data
                    storage_data[result.index] = written.info
                    txn.add_entries([written.entry])
                    files.add(logical_path(written.entry.path))
                by_rank.append(files)
            metadata.version = DCP_VERSION
            metadata.storage_data = storage_data
            metadata.storage_meta = self.storage_meta()
            txn.write(METADATA, pickle.dumps(metadata, protocol=pickle.DEFAULT_PROTOCOL))
            topology = {
                "world_size": len(results),
                "ranks": [{"rank": r, "files": sorted(files)} for r, files in enumerate(by_rank)],
            }
            self.manifest = txn.commit(
                step=self.step, layout=LAYOUT, metrics=self.metrics, topology=topology,
                metadata=lineage.stamp(self.metadata, data=lineage.data_position(global_step=self.step)),
            )
        except BaseException:
            txn.abort()
            raise
        finally:
            self._transaction = None

    def abort(self) -> None:
        """Remove what an unfinished save of this writer staged (the coordinator's attempt); a
        no-op once committed, or where nothing is open."""
        txn, self._transaction = self._transaction, None
        if txn is not None:
            txn.abort()

    def stage(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """A copy of ``state_dict`` in host memory that training may not change (AsyncStager)."""
        staged = self._staged if self.cache_staged_state_dict else None
        if staged is None:
            staged = _create_cpu_state_dict(state_dict, pin_memory=_on_accelerator(state_dict))
            if self.cache_staged_state_dict:
                self._staged = staged
        return _copy_state_dict(state_dict, staged, type_check=False)

    def synchronize_staging(self) -> None:
        """Staging is synchronous: nothing to wait for."""

    def close(self) -> None:
        self._staged = None

    def __getstate__(self) -> dict[str, Any]:
        # No open transaction or staged buffers travel: the receiving process opens its own.
        return {**self.__dict__, "_transaction": None, "_staged": None}


def _buckets(items: list[WriteItem], count: int) -> list[list[WriteItem]]:
    """Items spread over ``count`` files: bytes items round-robin, tensors greedily by size
    (largest first), as FileSystemWriter does."""
    buckets: list[list[WriteItem]] = [[] for _ in range(count)]
    sizes = [0] * count
    tensors = [i for i in items if i.type != WriteItemType.BYTE_IO]
    for n, item in enumerate(i for i in items if i.type == WriteItemType.BYTE_IO):
        buckets[n % count].append(item)
    for item in sorted(tensors, key=_item_nbytes, reverse=True):
        smallest = sizes.index(min(sizes))
        buckets[smallest].append(item)
        sizes[smallest] += _item_nbytes(item)
    return buckets


def _item_nbytes(item: WriteItem) -> int:
    data = item.tensor_data
    if data is None:
        return 0
    numel = 1
    for n in data.size:
        numel *= n
    return numel * torch._utils._element_size(data.properties.dtype)


def _write_file(
    sink: AttemptSink, name: str, items: list[WriteItem], planner: SavePlanner
) -> list[WriteResult]:
    """Stream ``items`` into one data file (bytes items first, as FileSystemWriter orders them),
    hashed on the way; the results name each item's byte range and the file's entry."""
    placed: list[tuple[WriteItem, int, int]] = []

    def chunks() -> Iterator[bytes | memoryview]:
        offset = 0
        ordered = sorted(items, key=lambda i: i.type != WriteItemType.BYTE_IO)
        for item in ordered:
            length = 0
            for piece in _item_chunks(item, planner.resolve_data(item)):
                length += len(piece)
                yield piece
            placed.append((item, offset, length))
            offset += length

    entry = sink.write(name, chunks())
    return [
        WriteResult(
            index=item.index,
            size_in_bytes=length,
            storage_data=_Written(_StorageInfo(name, offset, length), entry),
        )
        for item, offset, length in placed
    ]


def _item_chunks(item: WriteItem, data: Any) -> Iterator[bytes | memoryview]:
    if item.type == WriteItemType.BYTE_IO:
        yield data.getbuffer()
        return
    tensor = data.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    tensor = tensor.resolve_conj().resolve_neg().contiguous()
    dtype = str(tensor.dtype).removeprefix("torch.")
    if dtype not in STORAGE_CLASS:  # a dtype ckptkit's zip writer does not name: torch's own
        buffer = io.BytesIO()
        torch.save(tensor, buffer)
        yield buffer.getbuffer()
        return
    raw = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
    yield from torch_tree_chunks(StoredTensor(dtype, tuple(tensor.shape), lambda: [raw]))


def _on_accelerator(state: Any) -> bool:
    if isinstance(state, torch.Tensor):
        return state.device.type not in ("cpu", "meta")
    if isinstance(state, dict):
        return any(_on_accelerator(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return any(_on_accelerator(v) for v in state)
    return False


# --- the load ------------------------------------------------------------------------------------


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves the vetted DCP metadata globals and nothing else: whatever the pickle asks to
    construct or call must be one of them."""

    def find_class(self, module: str, name: str) -> Any:
        if not metadata_global_allowed(module, name):
            raise UnsafeContentError(
                f"{METADATA}: refused: it names {module}.{name}", globals=[f"{module}.{name}"]
            )
        return super().find_class(module, name)


def load_metadata(data: bytes, where: str) -> Metadata:
    """A DCP ``Metadata`` from the bytes of ``.metadata``, building only vetted classes.

    First the symbolic interpreter lists every global the pickle names, without importing any:
    one outside the DCP metadata classes refuses the file, naming them all. Then an unpickler
    that can resolve those classes alone builds the object.
    """
    try:
        symbolic = load_symbolic(data, limits=Limits(), pickle_name=METADATA)
    except PickleFormatError as exc:
        raise FormatError(f"{where}: not a DCP metadata pickle: {exc}", path=where) from exc
    refused = sorted(
        {
            use.ref.qualname
            for use in symbolic.globals
            if not metadata_global_allowed(use.ref.module, use.ref.name)
        }
    )
    if refused:
        raise UnsafeContentError(
            f"{where}: refused: loading it the usual way would import and call {', '.join(refused)}, "
            "which is not DCP metadata; nothing was run",
            globals=refused,
        )
    try:
        metadata = _MetadataUnpickler(io.BytesIO(data)).load()
    except UnsafeContentError:
        raise
    except Exception as exc:  # a malformed value for a vetted class
        raise FormatError(
            f"{where}: DCP metadata does not load: {type(exc).__name__}: {exc}", path=where
        ) from exc
    if not isinstance(metadata, Metadata):
        raise FormatError(f"{where}: holds a {type(metadata).__name__}, not DCP Metadata", path=where)
    return metadata


class CkptkitReader(StorageReader):
    """A DCP ``StorageReader`` of a DCP checkpoint committed by :class:`CkptkitWriter`.

    Only a committed checkpoint loads (:class:`~ckptkit.errors.NotCommittedError` otherwise).
    Every byte read is checked against the manifest's chunk digests first (a flipped bit is a
    :class:`~ckptkit.errors.ChecksumMismatchError` naming the file); ``.metadata`` loads without
    running arbitrary pickle code, and a bytes item (``torch.save`` of a non-tensor value, which
    DCP's planner loads with ``weights_only=False``) is handed on only if it loads under
    ``weights_only=True`` with ckptkit's vetted classes: else :class:`UnsafeContentError`.
    """

    def __init__(self, checkpoint_url: str | os.PathLike[str] | Store, **storage_options: Any) -> None:
        self._target = _Target(checkpoint_url, storage_options)
        self._files: VerifiedFiles | None = None
        self._metadata: Metadata | None = None
        self.manifest: Manifest | None = None
        self.storage_data: dict[Any, Any] = {}
        self._load_id = uuid.uuid4().hex

    @property
    def checkpoint_id(self) -> str:
        return self._target.url

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return isinstance(checkpoint_id, (str, os.PathLike))

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id:
            self._target = _Target(checkpoint_id, self._target.options)
        self._files, self._metadata, self.manifest, self.storage_data = None, None, None, {}
        self._load_id = uuid.uuid4().hex

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """The checkpoint's DCP ``Metadata``, read once per load (``reset`` forgets it). DCP
        reports a failure here as an AssertionError quoting it; called directly, it raises
        ckptkit's own error (NotCommittedError, UnsafeContentError, ChecksumMismatchError)."""
        if self._metadata is not None:
            return self._metadata
        files = self._open()
        entry = files.entry(METADATA)
        metadata = load_metadata(bytes(files.read(METADATA, 0, entry.size)), f"{files.files.url}/{METADATA}")
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self._load_id
        self._metadata = metadata
        return metadata

    def set_up_storage_reader(
        self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        if metadata.storage_data is None:
            raise FormatError(f"{self._target.url}: DCP metadata has no storage_data")
        self.storage_data = metadata.storage_data

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        files = self._open()
        placed = sorted(
            ((self._place(req), req) for req in plan.items), key=lambda p: (p[0].relative_path, p[0].offset)
        )
        try:
            for info, req in placed:
                data = files.read(info.relative_path, info.offset, info.offset + info.length)
                where = f"{files.files.url}/{info.relative_path}"
                if req.type == LoadItemType.BYTE_IO:
                    _vet_bytes(data, where, req)
                    planner.load_bytes(req, io.BytesIO(bytes(data)))
                else:
                    _load_tensor(data, where, req, planner)
        finally:
            files.forget()
        future: Future[None] = Future()
        future.set_result(None)
        return future

    def _place(self, req: ReadItem) -> _StorageInfo:
        info = self.storage_data.get(req.storage_index)
        if not isinstance(info, _StorageInfo):
            raise FormatError(f"{self._target.url}: DCP metadata does not place {req.storage_index.fqn}")
        if info.transform_descriptors:
            raise FormatError(
                f"{self._target.url}: {req.storage_index.fqn} was written with stream transforms "
                f"{list(info.transform_descriptors)}, which CkptkitReader does not apply"
            )
        return info

    def _open(self) -> VerifiedFiles:
        if self._files is None:
            checkpoint = self._target.checkpoint()
            manifest = read_manifest(checkpoint)  # NotCommittedError where there is none
            if manifest.layout != LAYOUT:
                raise FormatError(f"{checkpoint.url}: a {manifest.layout} checkpoint, not a DCP one")
            entries = {logical_path(e.path): e for e in manifest.files}
            self._files = VerifiedFiles(files_of(checkpoint, manifest), entries, manifest.chunk_size)
            self.manifest = manifest
            lineage.resumed_from(checkpoint.url, manifest)
        return self._files

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_files": None, "_metadata": None}


class _View(io.RawIOBase):
    """A seekable reader over a buffer, so that torch.load reads an item without copying it."""

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        super().__init__()
        self._data = memoryview(data).cast("B")
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = max(0, min(len(buffer), len(self._data) - self._pos))
        memoryview(buffer).cast("B")[:n] = self._data[self._pos : self._pos + n]
        self._pos += n
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._data)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos


def _load_tensor(
    data: bytes | bytearray | memoryview, where: str, req: ReadItem, planner: LoadPlanner
) -> None:
    from torch.distributed._shard._utils import narrow_tensor_by_index

    try:
        tensor = torch.load(_View(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise _refused(where, req, exc) from None
    if not isinstance(tensor, torch.Tensor):
        raise FormatError(f"{where}: item {req.storage_index.fqn} is not a tensor", path=where)
    tensor = narrow_tensor_by_index(tensor, req.storage_offsets, req.lengths)
    target = planner.resolve_tensor(req).detach()
    if target.size() != tensor.size():
        raise FormatError(
            f"{where}: item {req.storage_index.fqn}: stored slice {list(tensor.size())} does not fit "
            f"the destination {list(target.size())}",
            path=where,
        )
    target.copy_(tensor)
    planner.commit_tensor(req, target)


def _vet_bytes(data: bytes | bytearray | memoryview, where: str, req: ReadItem) -> None:
    """Refuse a bytes item that would run unvetted code under DCP's ``weights_only=False`` load."""
    try:
        with safe_globals():
            torch.load(_View(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise _refused(where, req, exc) from None
    except Exception as exc:
        raise FormatError(f"{where}: item {req.storage_index.fqn} does not load: {exc}", path=where) from exc


def _refused(where: str, req: ReadItem, exc: Exception) -> UnsafeContentError:
    names = sorted(set(re.findall(r"GLOBAL ([\w.]+)", str(exc))))
    return UnsafeContentError(
        f"{where}: item {req.storage_index.fqn} refused: it does not load with weights_only=True "
        f"and ckptkit's vetted classes, so loading it the usual way could run code; nothing was run "
        f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})",
        globals=names,
    )


__all__ = ["CkptkitReader", "CkptkitWriter", "load_metadata", "metadata_global_allowed"]
