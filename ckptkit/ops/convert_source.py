"""Tensors of a checkpoint as byte ranges, for the write pipeline: read metadata, stream bytes on demand.

Each source format is read the way ckptkit's inspectors read it (headers and symbolic pickles
only), and each tensor becomes a :class:`SourceTensor` whose ``chunks()`` streams its bytes with
bounded ranged reads. Supported: a ``torch.save`` state dict (zip or legacy), a safetensors
file, a Hugging Face sharded checkpoint (``*.index.json``), a DCP directory (``.metadata``, each
item an embedded ``torch.save`` zip) and a committed ckptkit native checkpoint. The same readers
re-open what :mod:`ckptkit.ops.pipeline` wrote (for ``convert`` and ``consolidate``), for the
reload-and-compare.

Tied tensors: in torch files, two names viewing the same storage bytes with the same geometry;
in safetensors files, names listed in ``__metadata__["ckptkit.shared_params"]`` (alias ->
source) but absent from the header; in native checkpoints, two names of one tensor record.
"""

from __future__ import annotations

import io
import json
import math
import posixpath
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from ckptkit.errors import (
    FormatError,
    NotCommittedError,
    NotFoundError,
)
from ckptkit.formats.dcp import DcpEntry, read_dcp
from ckptkit.formats.hf_index import read_hf_index
from ckptkit.formats.layout import detect_layout
from ckptkit.formats.safetensors import read_safetensors_header
from ckptkit.formats.safetensors_writer import SHARED_PARAMS_KEY, TORCH_DTYPE
from ckptkit.formats.sniff import detect
from ckptkit.formats.torchfile import read_torch_file
from ckptkit.formats.tree import is_row_major
from ckptkit.manifest import MANIFEST_NAME
from ckptkit.native.files import TREE_FILE, native_files
from ckptkit.ops.inspect.values import as_tensor
from ckptkit.ops.tensor_io import Piece, itemsize_of, read_pieces
from ckptkit.pickle import PickleFormatError, TensorRef
from ckptkit.pickle.policy import refuse_unsafe, unsafe_names, unvetted_globals
from ckptkit.storage import Store
from ckptkit.storage.base import ObjectInfo, ReadOnlyStore, normalize_key

_TORCH_KINDS = ("torch-zip", "torch-legacy", "pickle")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@dataclass(frozen=True)
class SourceTensor:
    name: str
    dtype: str  # torch dtype name
    shape: tuple[int, ...]
    file: str
    chunks: Callable[[], Iterable[bytes | memoryview]]  # raw little-endian bytes, bounded chunks
    kind: str = "tensor"  # what the source knows it as: consolidate's trainable, frozen, buffer

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize_of(self.dtype)


@dataclass
class Source:
    url: str
    kind: str  # torch | safetensors | hf-index | dcp | native
    tensors: dict[str, SourceTensor]  # stored tensors, in file order
    aliases: dict[str, str] = field(default_factory=dict)  # tied alias -> the stored name it shares
    notes: list[str] = field(default_factory=list)
    order: list[str] = field(default_factory=list)  # every name in the file's own order, where it has one

    @property
    def names(self) -> list[str]:
        """Every name, stored and alias: in file order, else each alias right after its source."""
        if self.order:
            return list(self.order)
        after: dict[str, list[str]] = {}
        for alias, source in self.aliases.items():
            after.setdefault(source, []).append(alias)
        return [n for name in self.tensors for n in (name, *after.get(name, []))]


def read_file(store: Store, key: str) -> Source:
    found = detect(store, key)
    if found.kind == "safetensors":
        return _safetensors(store, [key], "safetensors", {})
    if found.kind in _TORCH_KINDS:
        return _torch_files(store, [key], "torch")
    if found.kind == "json" and key.endswith(".index.json"):
        return _hf_index(store, key)
    if found.kind == "dcp-metadata":
        parent = posixpath.dirname(key)
        return _dcp(store.child(parent) if parent else store)
    raise FormatError(found.detail if found.bad else f"{found.detail}: not a checkpoint convert reads")


def read_directory(store: Store) -> Source:
    """A checkpoint directory: committed by ckptkit (any layout) or written by another tool."""
    files = store
    if store.exists(MANIFEST_NAME):
        from ckptkit.catalog import read_manifest
        from ckptkit.commit import files_of

        manifest = read_manifest(store)
        if manifest.layout == "native":
            return _native(store, manifest)
        prefixes = {posixpath.dirname(f.path) for f in manifest.files}
        if manifest.blob_store is not None:  # deduplicated: files lie in the root's blob store
            files = files_of(store, manifest)
        elif len(prefixes) == 1 and "" not in prefixes:  # object stores keep data below ckptkit-<id>/
            files = store.child(prefixes.pop())
    keys = [info.key for info in files.list("")]
    if not keys:  # an object store cannot tell a missing prefix from an empty one
        raise NotFoundError(f"{store.url}: no such file or checkpoint directory, or it is empty")
    names = [key for key in keys if "/" not in key]
    layout = detect_layout(names).kind
    if layout == "dcp":
        return _dcp(files)
    if layout == "native":
        raise NotCommittedError(f"{store.url}: a native checkpoint without a committed manifest")
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if index in names:
            return _hf_index(files, index)
    weights = sorted(n for n in names if n.endswith(_WEIGHT_SUFFIXES))
    if len(weights) == 1:
        return read_file(files, weights[0])
    what = ", ".join(weights[:6]) if weights else "no weight files (.safetensors, .bin, .pt)"
    raise FormatError(f"{store.url}: cannot tell which tensors to convert: {what}; name one file")


# --- safetensors ----------------------------------------------------------------------------------


def _safetensors(store: Store, keys: list[str], kind: str, aliases: dict[str, str]) -> Source:
    source = Source(store.url, kind, {}, dict(aliases))
    for key in keys:
        header = read_safetensors_header(store, key, strict=True)
        for e in header.entries.values():
            dtype = TORCH_DTYPE.get(e.dtype)
            if dtype is None:
                raise FormatError(f"{key}: tensor {e.name!r}: dtype {e.dtype} has no torch equivalent")
            piece = Piece(key, e.offset, math.prod(e.shape))
            _add(source, SourceTensor(e.name, dtype, e.shape, key, _reader(store, [piece], dtype)))
        source.aliases.update(_shared_params(key, (header.metadata or {}).get(SHARED_PARAMS_KEY)))
    _check_aliases(source)
    return source


def _shared_params(where: str, value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            value = None
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise FormatError(f"{where}: {SHARED_PARAMS_KEY} is not a JSON object of alias -> source names")
    return value


def _check_aliases(source: Source) -> None:
    """Keep aliases whose source is stored; a stored alias (consolidate writes copies) stays a tensor."""
    for alias, target in list(source.aliases.items()):
        if alias in source.tensors or alias == target:
            del source.aliases[alias]
        elif target not in source.tensors:
            raise FormatError(f"{source.url}: tied name {alias!r} refers to {target!r}, which is not stored")


def _add(source: Source, tensor: SourceTensor) -> None:
    if tensor.name in source.tensors:
        raise FormatError(f"{source.url}: tensor {tensor.name!r} is stored twice ({tensor.file})")
    source.tensors[tensor.name] = tensor


def _reader(store: Store, pieces: list[Piece], dtype: str) -> Callable[[], Iterator[bytes]]:
    itemsize = itemsize_of(dtype)
    return lambda: read_pieces(store, pieces, itemsize)


# --- Hugging Face index -----------------------------------------------------------------------------


def _hf_index(store: Store, key: str) -> Source:
    index = read_hf_index(store, key)
    if index.problems:
        raise FormatError(f"{key}: " + "; ".join(index.problems[:5]))
    aliases = _shared_params(key, index.metadata.get(SHARED_PARAMS_KEY))
    shard_keys = list(index.shards.values())
    if all(detect(store, k).kind == "safetensors" for k in shard_keys):
        return _safetensors(store, shard_keys, "hf-index", aliases)
    source = _torch_files(store, shard_keys, "hf-index")
    source.aliases.update({a: s for a, s in aliases.items() if a not in source.tensors})
    _check_aliases(source)
    return source


# --- torch.save files ---------------------------------------------------------------------------------


def _torch_files(store: Store, keys: list[str], kind: str) -> Source:
    source = Source(store.url, kind, {})
    for key in keys:
        _torch_state(source, store, key, _torch_value(store, key))
    return source


def _torch_value(store: Store, key: str) -> Any:
    """The symbolic value of a torch.save file, refused if it names anything not vetted (as safe_load)."""
    try:
        torch_file = read_torch_file(store, key)
    except PickleFormatError as exc:
        # A payload before the break, or behind one of the interpreter's limits, is still a
        # payload: torch.load would run it. Refused as unsafe, not merely as broken.
        _refuse(key, unsafe_names(exc.globals))
        raise FormatError(f"{key}: the pickle is broken: {exc}") from None
    _refuse(key, unvetted_globals(torch_file.globals, torch_file.value))
    if torch_file.problems:
        raise FormatError(f"{key}: the file is inconsistent: " + "; ".join(torch_file.problems[:5]))
    return torch_file.value


def _refuse(key: str, unsafe: set[str]) -> None:
    refuse_unsafe(key, unsafe, "nothing was run or written")


def _torch_state(source: Source, store: Store, key: str, value: Any) -> None:
    if not isinstance(value, dict):
        raise FormatError(f"{key}: holds a {type(value).__name__}, not a state dict {{name: tensor}}")
    seen: dict[tuple[Any, ...], str] = {}
    for name, item in value.items():
        ref = as_tensor(item)
        if not isinstance(name, str) or ref is None:
            raise FormatError(
                f"{key}: not a flat state dict: entry {name!r} is a {type(item).__name__}, not a tensor"
            )
        # Same storage bytes, same geometry: a tied weight, stored once by torch.save too.
        source.order.append(name)
        identity = (ref.storage.key, ref.storage_offset, ref.shape, ref.stride, ref.dtype)
        if identity in seen and ref.numel:
            source.aliases[name] = seen[identity]
            continue
        seen[identity] = name
        read = _reader(store, [_piece(key, ref)], ref.dtype)
        _add(source, SourceTensor(name, ref.dtype, ref.shape, key, read))


def _piece(key: str, ref: TensorRef) -> Piece:
    """The one byte range of a contiguous tensor."""
    storage = ref.storage
    itemsize = itemsize_of(ref.dtype)
    if ref.numel == 0:
        return Piece(key, 0, 0)
    if storage.byte_offset is None or storage.nbytes is None:
        raise FormatError(f"{key}: a tensor's storage record is missing or compressed")
    if not is_row_major(ref.shape, ref.stride):
        raise FormatError(f"{key}: a tensor is not contiguous (stride {ref.stride}); not supported")
    start = ref.storage_offset * itemsize
    if start + ref.numel * itemsize > storage.nbytes:
        raise FormatError(f"{key}: a tensor runs past the end of its storage")
    return Piece(key, storage.byte_offset + start, ref.numel)


# --- DCP ----------------------------------------------------------------------------------------------


class _RangeStore(ReadOnlyStore):
    """Bytes ``[offset, offset + length)`` of one object, seen as a read-only store that holds that
    one key (keys as in the underlying store): DCP embeds a torch.save file per item."""

    def __init__(self, store: Store, key: str | None, offset: int, length: int) -> None:
        # key None: a child view that the object does not lie below, holding nothing.
        self._store, self._key, self._offset, self._length = store, key, offset, length

    @property
    def url(self) -> str:
        return self._store.url  # the view's keys are the underlying store's

    def child(self, prefix: str) -> Store:
        below = self._below(normalize_key(prefix))
        return _RangeStore(self._store.child(prefix), below, self._offset, self._length)

    def _below(self, prefix: str) -> str | None:
        """What of the key lies below ``prefix`` (all of it for ""); None if it lies elsewhere."""
        if self._key is None or not prefix:
            return self._key
        return self._key[len(prefix) + 1 :] if self._key.startswith(prefix + "/") else None

    def _check(self, key: str) -> None:
        if normalize_key(key) != self._key:
            holds = repr(self._key) if self._key else "nothing"
            raise NotFoundError(f"{self.url}/{key}: not found (this byte-range view holds {holds})")

    def get(self, key: str, start: int | None = None, end: int | None = None) -> bytes:
        self._check(key)
        lo = 0 if start is None else min(start, self._length)
        hi = self._length if end is None else min(end, self._length)
        return self._store.get(self._key, self._offset + lo, self._offset + hi) if hi > lo else b""

    def read_ranges(self, key: str, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        self._check(key)
        inside = [(min(s, self._length), min(max(s, e), self._length)) for s, e in ranges]
        return self._store.read_ranges(self._key, [(self._offset + s, self._offset + e) for s, e in inside])

    def head(self, key: str) -> ObjectInfo:
        self._check(key)
        return ObjectInfo(key, self._length)

    def open_read(self, key: str, *, size: int | None = None) -> BinaryIO:
        # An item is one tensor's chunk, which convert holds whole anyway.
        return io.BytesIO(self.get(key))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        if self._key is not None and self._below(prefix) is not None:
            yield ObjectInfo(self._key, self._length)

    def list_dirs(self, prefix: str = "") -> list[str]:
        below = self._below(prefix)
        return [below.split("/", 1)[0]] if below and "/" in below else []


def _dcp(store: Store) -> Source:
    checkpoint = read_dcp(store)
    if checkpoint.problems:
        raise FormatError(f"{store.url}: " + "; ".join(checkpoint.problems[:5]))
    source = Source(store.url, "dcp", {})
    skipped = [e.fqn for e in checkpoint.entries.values() if e.kind != "tensor"]
    if skipped:
        source.notes.append(f"{len(skipped)} non-tensor DCP entries not converted: {', '.join(skipped[:5])}")
    for entry in checkpoint.entries.values():
        if entry.kind == "tensor":
            _add(source, _dcp_tensor(store, entry))
    return source


def _dcp_tensor(store: Store, entry: DcpEntry) -> SourceTensor:
    if entry.dtype is None or entry.size is None:
        raise FormatError(f"{entry.fqn}: DCP metadata gives no dtype or size")
    chunks = []
    for item in sorted(entry.items, key=lambda i: i.chunk_offset or ()):
        key = item.relative_path
        view = _RangeStore(store, key, item.offset, item.length)
        ref = as_tensor(_torch_value(view, key))
        if ref is None or ref.dtype != entry.dtype:
            raise FormatError(f"{entry.fqn}: DCP item in {key} is not one {entry.dtype} tensor")
        read = _reader(view, [_piece(key, ref)], ref.dtype)
        inner = SourceTensor(entry.fqn, ref.dtype, ref.shape, key, read)
        chunks.append((item.chunk_offset or (0,) * len(entry.size), inner))
    size = entry.size
    # Chunks cut along dim 0 only (or a single chunk) are back to back in row-major order: stream them.
    if all(c.shape[1:] == size[1:] for _, c in chunks):
        pieces = [c for _, c in chunks]
        return SourceTensor(entry.fqn, entry.dtype, size, chunks[0][1].file, _concat(pieces))
    return SourceTensor(entry.fqn, entry.dtype, size, chunks[0][1].file, _assemble(entry.dtype, size, chunks))


def _concat(parts: list[SourceTensor]) -> Callable[[], Iterator[bytes | memoryview]]:
    def chunks() -> Iterator[bytes | memoryview]:
        for part in parts:
            yield from part.chunks()

    return chunks


def _assemble(
    dtype: str, size: tuple[int, ...], parts: list[tuple[tuple[int, ...], SourceTensor]]
) -> Callable[[], Iterator[bytes | memoryview]]:
    """Chunks cut along several dims: placed into one buffer (memory: this one tensor)."""

    def chunks() -> Iterator[bytes | memoryview]:
        import numpy as np

        itemsize = itemsize_of(dtype)
        whole = np.zeros((*size, itemsize), dtype=np.uint8)
        for offsets, part in parts:
            raw = np.frombuffer(b"".join(part.chunks()), dtype=np.uint8).reshape((*part.shape, itemsize))
            where = tuple(slice(o, o + n) for o, n in zip(offsets, part.shape, strict=True))
            whole[where] = raw
        yield memoryview(whole.reshape(-1))

    return chunks


# --- ckptkit native ---------------------------------------------------------------------------------------


def _native(store: Store, manifest: Any) -> Source:
    return native_source(native_files(store, manifest))


def native_source(files: Store) -> Source:
    """The tensors of the native checkpoint whose ``tree.json`` and shards lie at the root of ``files``."""
    from ckptkit.native.reader import load_document

    document = load_document(files)
    source = Source(files.url, "native", {})
    headers: dict[str, Any] = {}
    by_record: dict[tuple[Any, ...], str] = {}
    for name, node in _flat_tree(document["tree"]):
        index = node.get("i") if isinstance(node, dict) and node.get("t") == "tensor" else None
        if type(index) is not int or not 0 <= index < len(document["tensors"]):
            raise FormatError(f"{files.url}: entry {name!r} is not a tensor; convert takes a flat state dict")
        record = document["tensors"][index]
        source.order.append(name)
        identity = (record.get("entry"), record.get("offset"), record.get("dtype"),
                    tuple(record.get("shape") or ()), tuple(record.get("stride") or ()))
        if identity in by_record and record.get("entry") is not None:
            source.aliases[name] = by_record[identity]
            continue
        by_record[identity] = name
        _add(source, _native_tensor(files, document, headers, name, record))
    return source


def _flat_tree(tree: Any) -> list[tuple[str, Any]]:
    if isinstance(tree, dict) and "t" not in tree:
        pairs = list(tree.items())
    elif isinstance(tree, dict) and tree.get("t") in ("dict", "odict") and isinstance(tree.get("v"), list):
        pairs = [tuple(p) for p in tree["v"] if isinstance(p, list) and len(p) == 2]
    else:
        raise FormatError("the native checkpoint's state is not a dict; convert takes a flat state dict")
    for key, _ in pairs:
        if not isinstance(key, str):
            raise FormatError(f"the native state has a non-string key {key!r}")
    return pairs


def _native_tensor(
    files: Store, document: dict[str, Any], headers: dict[str, Any], name: str, record: dict[str, Any]
) -> SourceTensor:
    dtype, shape = record.get("dtype"), tuple(record.get("shape") or ())
    if not isinstance(dtype, str):
        raise FormatError(f"tree.json: tensor {name!r} has no dtype")
    numel = math.prod(shape)
    entry = record.get("entry")
    if entry is None or numel == 0:
        return SourceTensor(name, dtype, shape, TREE_FILE, lambda: iter(()))
    spec = document["entries"].get(entry)
    shard = spec.get("shard") if isinstance(spec, dict) else None
    if type(shard) is not int or not 0 <= shard < len(document["shards"]):
        raise FormatError(f"tree.json: tensor {name!r} names a missing entry or shard")
    path = document["shards"][shard]
    if path not in headers:
        headers[path] = read_safetensors_header(files, path, strict=True)
    info = headers[path].entries.get(entry)
    offset = record.get("offset", 0)
    itemsize = itemsize_of(dtype)
    if info is None or type(offset) is not int or offset + numel * itemsize > info.nbytes:
        raise FormatError(f"{path}: tensor {name!r} lies outside its entry {entry!r}")
    if not is_row_major(shape, tuple(record.get("stride") or ())):
        raise FormatError(f"tree.json: tensor {name!r} is a non-contiguous view; not supported")
    piece = Piece(path, info.offset + offset, numel)
    return SourceTensor(name, dtype, shape, path, _reader(files, [piece], dtype))
