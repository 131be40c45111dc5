"""torch.distributed.checkpoint (DCP) directories, listed from ``.metadata`` read symbolically.

PyTorch's own reader unpickles ``.metadata`` (older versions with plain ``pickle.load``), so
merely listing a DCP checkpoint could run code. Here the pickle goes through the symbolic
interpreter: the ``Metadata`` dataclass and its parts come back as Opaque nodes naming their
classes, and we read the fields we know (formats.md §8.2) out of their state, checking types
as we go. Nothing about the data files is trusted: the ``.distcp`` files named must exist and
hold the byte ranges the metadata gives them.
"""

from __future__ import annotations

import math
import posixpath
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from ckptkit.errors import FormatError
from ckptkit.formats.torchfile import read_bare_pickle
from ckptkit.pickle import Limits, Opaque, VettedObject, dtype_name
from ckptkit.pickle.values import GlobalUse, NodeKey
from ckptkit.storage.base import Store, join_key

METADATA = ".metadata"
_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")


@dataclass(frozen=True)
class DcpChunk:
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]


@dataclass(frozen=True)
class DcpItem:
    """Where one stored item (a tensor chunk or a bytes object) lives: a slice of a data file."""

    fqn: str
    index: int | None  # chunk index for tensors, None for bytes items
    chunk_offset: tuple[int, ...] | None
    relative_path: str
    offset: int
    length: int


@dataclass
class DcpEntry:
    fqn: str
    kind: Literal["tensor", "bytes", "unknown"]
    dtype: str | None = None
    size: tuple[int, ...] | None = None
    chunks: list[DcpChunk] = field(default_factory=list)
    items: list[DcpItem] = field(default_factory=list)


@dataclass
class DcpCheckpoint:
    prefix: str
    version: str | None
    entries: dict[str, DcpEntry]
    planner_data: dict[str, Any]
    files: list[str]  # .distcp files present
    missing_files: list[str]  # named by the metadata, absent
    unreferenced_files: list[str]  # present, named by nothing (left by an earlier save?)
    globals: list[GlobalUse]
    problems: list[str] = field(default_factory=list)


def is_dcp(names: Iterable[str]) -> bool:
    """Whether a listing holds a DCP ``.metadata``: DCP writes it last, so it marks the layout;
    the data files it names are checked by :func:`read_dcp`, not guessed from their names."""
    return any(posixpath.basename(n) == METADATA for n in names)


def read_dcp(store: Store, prefix: str = "", *, limits: Limits | None = None) -> DcpCheckpoint:
    """List the DCP checkpoint below ``prefix`` from its ``.metadata``, and check its data files."""
    key = join_key(prefix, METADATA)
    if not store.exists(key):
        raise FormatError(
            f"{key} is missing: the DCP checkpoint is not committed (DCP writes .metadata last)"
        )
    pickle_file = read_bare_pickle(store, key, limits or Limits())
    problems = list(pickle_file.problems)
    state = _state(pickle_file.value, "Metadata")
    if not isinstance(state, dict):
        raise FormatError(f"{key}: not a torch.distributed.checkpoint Metadata object")
    entries = _entries(key, state.get("state_dict_metadata"), problems)
    _attach_items(key, state.get("storage_data"), entries, problems)
    planner_data = state.get("planner_data")
    present = sorted(
        posixpath.relpath(info.key, prefix) if prefix else info.key
        for info in store.list(prefix)
        if info.key.endswith(".distcp")
    )
    referenced = sorted({item.relative_path for entry in entries.values() for item in entry.items})
    missing = [path for path in referenced if path not in present]
    problems.extend(f"data file {path!r} is missing" for path in missing)
    _check_ranges(store, prefix, entries, set(present), problems)
    version = state.get("version")
    return DcpCheckpoint(
        prefix=prefix,
        version=version if isinstance(version, str) else None,
        entries=entries,
        planner_data=planner_data if isinstance(planner_data, dict) else {},
        files=present,
        missing_files=missing,
        unreferenced_files=[path for path in present if path not in referenced],
        globals=pickle_file.globals,
        problems=problems,
    )


def _state(node: Any, name: str) -> Any:
    """The BUILD state of a DCP dataclass instance called ``name``; None for anything else."""
    if type(node) is NodeKey:  # MetadataIndex objects are dict keys in storage_data
        node = node.node
    if type(node) in (Opaque, VettedObject) and node.cls.module in _MODULES and node.cls.name == name:
        return node.state
    return None


def _is(node: Any, name: str) -> bool:
    return type(node) in (Opaque, VettedObject) and node.cls.module in _MODULES and node.cls.name == name


def _ints(value: Any) -> tuple[int, ...] | None:
    if isinstance(value, tuple | list) and all(type(n) is int and n >= 0 for n in value):
        return tuple(value)
    return None


def _entries(key: str, metadata: Any, problems: list[str]) -> dict[str, DcpEntry]:
    if not isinstance(metadata, dict):
        raise FormatError(f"{key}: Metadata has no state_dict_metadata mapping")
    entries: dict[str, DcpEntry] = {}
    for fqn, node in metadata.items():
        if type(fqn) is not str:
            problems.append(f"state_dict_metadata key {fqn!r} is not a string")
            continue
        if _is(node, "BytesStorageMetadata"):
            entries[fqn] = DcpEntry(fqn, "bytes")
        elif isinstance(_state(node, "TensorStorageMetadata"), dict):
            entries[fqn] = _tensor_entry(fqn, node.state, problems)
        else:
            name = node.cls.qualname if type(node) in (Opaque, VettedObject) else type(node).__name__
            problems.append(f"{fqn}: unrecognised storage metadata {name}")
            entries[fqn] = DcpEntry(fqn, "unknown")
    return entries


def _tensor_entry(fqn: str, state: dict[str, Any], problems: list[str]) -> DcpEntry:
    entry = DcpEntry(fqn, "tensor", dtype=_dtype(state.get("properties")), size=_ints(state.get("size")))
    if entry.dtype is None:
        problems.append(f"{fqn}: tensor properties name no known dtype")
    if entry.size is None:
        problems.append(f"{fqn}: tensor size {state.get('size')!r} is not a tuple of sizes")
    chunks = state.get("chunks")
    for chunk in chunks if isinstance(chunks, list) else []:
        chunk_state = _state(chunk, "ChunkStorageMetadata")
        offsets = _ints(chunk_state.get("offsets")) if isinstance(chunk_state, dict) else None
        sizes = _ints(chunk_state.get("sizes")) if isinstance(chunk_state, dict) else None
        if offsets is None or sizes is None or len(offsets) != len(sizes):
            problems.append(f"{fqn}: malformed chunk metadata")
            continue
        entry.chunks.append(DcpChunk(offsets, sizes))
    if not isinstance(chunks, list):
        problems.append(f"{fqn}: tensor has no chunk list")
    if entry.size is not None:
        _check_chunks(entry, entry.size, problems)
    return entry


def _dtype(properties: Any) -> str | None:
    # TensorProperties pickles its state as a tuple (dtype, layout, requires_grad, memory_format,
    # pin_memory) through __getstate__; older versions pickled the dataclass __dict__.
    state = _state(properties, "TensorProperties")
    if isinstance(state, tuple) and state:
        return dtype_name(state[0])
    if isinstance(state, dict):
        return dtype_name(state.get("dtype"))
    return None


def _check_chunks(entry: DcpEntry, size: tuple[int, ...], problems: list[str]) -> None:
    covered = 0
    for chunk in entry.chunks:
        if len(chunk.offsets) != len(size) or any(
            o + s > n for o, s, n in zip(chunk.offsets, chunk.sizes, size, strict=True)
        ):
            problems.append(
                f"{entry.fqn}: chunk at {list(chunk.offsets)} of size {list(chunk.sizes)} lies outside "
                f"the tensor's size {list(size)}"
            )
        covered += math.prod(chunk.sizes)
    if covered != math.prod(size):
        problems.append(f"{entry.fqn}: chunks cover {covered} elements of the tensor's {math.prod(size)}")


def _pairs(storage_data: Any) -> list[tuple[Any, Any]] | None:
    if isinstance(storage_data, dict):
        return list(storage_data.items())
    if isinstance(storage_data, list) and all(isinstance(p, tuple) and len(p) == 2 for p in storage_data):
        return storage_data
    return None


def _attach_items(key: str, storage_data: Any, entries: dict[str, DcpEntry], problems: list[str]) -> None:
    pairs = _pairs(storage_data)
    if pairs is None:
        problems.append("Metadata has no storage_data mapping: the data files cannot be located")
        return
    for index_node, info_node in pairs:
        index, info = _state(index_node, "MetadataIndex"), _state(info_node, "_StorageInfo")
        if not (isinstance(index, dict) and isinstance(info, dict)):
            problems.append("storage_data holds an entry that is not MetadataIndex -> _StorageInfo")
            continue
        fqn, path = index.get("fqn"), info.get("relative_path")
        offset, length = info.get("offset"), info.get("length")
        if not (type(fqn) is str and type(path) is str and type(offset) is int and type(length) is int):
            problems.append(f"storage_data entry for {fqn!r} has fields of the wrong types")
            continue
        if offset < 0 or length < 0:
            problems.append(f"{fqn}: negative offset or length in storage_data")
            continue
        reason = _unsafe_path(path)
        if reason:
            problems.append(f"{fqn}: data file {path!r} {reason}")
            continue
        chunk_index = index.get("index")
        item = DcpItem(
            fqn,
            chunk_index if type(chunk_index) is int else None,
            _ints(index.get("offset")),
            path,
            offset,
            length,
        )
        entry = entries.get(fqn)
        if entry is None:
            problems.append(f"storage_data names {fqn!r}, which state_dict_metadata lacks")
            continue
        entry.items.append(item)
    for entry in entries.values():
        _check_items(entry, problems)


def _check_items(entry: DcpEntry, problems: list[str]) -> None:
    if entry.kind == "bytes" and not entry.items:
        problems.append(f"{entry.fqn}: no stored item")
    if entry.kind == "tensor":
        stored = {item.chunk_offset for item in entry.items}
        for chunk in entry.chunks:
            if chunk.offsets not in stored:
                problems.append(f"{entry.fqn}: chunk at {list(chunk.offsets)} has no stored item")


def _unsafe_path(path: str) -> str | None:
    if not path or path.startswith(("/", "\\")) or "\\" in path or "\x00" in path:
        return "is not a plain relative path"
    if any(part in ("", ".", "..") for part in path.split("/")):
        return "escapes the checkpoint directory"
    return None


def _check_ranges(
    store: Store, prefix: str, entries: dict[str, DcpEntry], present: set[str], problems: list[str]
) -> None:
    sizes = {path: store.head(join_key(prefix, path)).size for path in present}
    for entry in entries.values():
        for item in entry.items:
            size = sizes.get(item.relative_path)
            if size is not None and item.offset + item.length > size:
                problems.append(
                    f"{entry.fqn}: bytes [{item.offset}, {item.offset + item.length}) lie past the end of "
                    f"{item.relative_path} ({size} bytes)"
                )
