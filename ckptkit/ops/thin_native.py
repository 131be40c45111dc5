"""What thinning a native checkpoint writes and drops: a ``tree.json`` holding only the kept
top-level keys, and, for a shard that mixed kept and dropped entries, a new shard of the kept
ones. A shard holding only kept entries stays as it is: in a deduplicated checkpoint, where each
large tensor is a shard (a blob) of its own, only ``tree.json`` and the small-tensor shard are
new. Torch-free: the bytes of kept entries are copied, never decoded.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from ckptkit.commit import logical_path
from ckptkit.errors import FormatError, NotThinnableError
from ckptkit.formats.safetensors import SafetensorsEntry, read_safetensors_header
from ckptkit.formats.safetensors_writer import TORCH_DTYPE, OutTensor, encode_header
from ckptkit.manifest import FileEntry, Manifest
from ckptkit.native import jsonfmt
from ckptkit.native.document import load_document
from ckptkit.native.files import TREE_FILE, native_files, rank_files
from ckptkit.native.subtree import cut_document, top_level_keys
from ckptkit.storage.base import Store

_COPY_CHUNK = 64 << 20  # bytes per ranged read while copying a kept entry
_SHARD_METADATA = {"format": "ckptkit"}  # what the native writer puts in every shard's header


@dataclass(frozen=True)
class NewFile:
    """A file thinning writes: its logical path in the checkpoint and a source of its bytes."""

    path: str
    chunks: Any  # () -> Iterable[bytes | memoryview]


@dataclass(frozen=True)
class ThinPlan:
    """What thinning one checkpoint does: the state it keeps (top-level keys, or a layout's
    states), the manifest entries that go, and the files it writes."""

    kept: list[str]
    dropped: list[FileEntry]
    new_files: list[NewFile] = field(default_factory=list)


def plan_native(checkpoint: Store, manifest: Manifest, keep: Sequence[str], attempt: str) -> ThinPlan:
    """Plan thinning a single-state native checkpoint down to the top-level ``keys`` in ``keep``;
    ``attempt`` (12 hex digits) makes the names of rewritten shards its own."""
    if rank_files(checkpoint, manifest) is not None:
        raise NotThinnableError(
            f"{checkpoint.url}: saved by several ranks, one state each; thinning takes a "
            "single-state checkpoint (consolidate or load and save it first)"
        )
    files = native_files(checkpoint, manifest)
    document = load_document(files)
    try:
        available = top_level_keys(document)
    except TypeError:
        raise NotThinnableError(
            f"{checkpoint.url}: its state is not a dict, so it has no keys to keep"
        ) from None
    missing = [key for key in keep if key not in available]
    if missing:
        raise NotThinnableError(
            f"{checkpoint.url}: no top-level key {missing[0]!r} to keep; it has {available!r}"
        )
    kept = [key for key in available if key in keep]
    if len(kept) == len(available):
        return ThinPlan([str(k) for k in kept], [])
    cut = cut_document(document, kept)
    by_path = {logical_path(e.path): e for e in manifest.files}
    tree_entry = next(e for e in manifest.files if posixpath.basename(e.path) == TREE_FILE)
    prefix = logical_path(tree_entry.path).rpartition("/")[0]
    new_files: list[NewFile] = []
    new_shards: list[str] = []
    for position, index in enumerate(cut.shards):
        shard = document["shards"][index]
        if cut.entries[index] == _entries_of(document, index):
            new_shards.append(shard)  # every entry kept: the file stays as it is
            continue
        name = f"tensors-thin-{attempt}-{position:05d}.safetensors"
        new_shards.append(name)
        source = partial(_shard_of, files, shard, cut.entries[index])
        new_files.append(NewFile(posixpath.join(prefix, name), source))
    cut.document["shards"] = new_shards
    tree = jsonfmt.dumps(cut.document).encode("utf-8")
    new_files.append(NewFile(posixpath.join(prefix, TREE_FILE), lambda: [tree]))
    kept_paths = {posixpath.join(prefix, s) for s in new_shards}
    old_paths = {posixpath.join(prefix, s) for s in document["shards"]} | {logical_path(tree_entry.path)}
    dropped = [by_path[p] for p in sorted(old_paths - kept_paths) if p in by_path]
    return ThinPlan([str(k) for k in kept], dropped, new_files)


def _entries_of(document: dict[str, Any], index: int) -> set[str]:
    entries = document["entries"].items()
    return {name for name, spec in entries if isinstance(spec, dict) and spec.get("shard") == index}


def _shard_of(files: Store, shard: str, names: set[str]) -> Iterator[bytes | memoryview]:
    """A safetensors file of the entries ``names`` of ``shard``, in the order they lie there, so
    that each stays aligned as the writer aligned it."""
    header = read_safetensors_header(files, shard, strict=True)
    kept = sorted((e for n, e in header.entries.items() if n in names), key=lambda e: e.begin)
    if len(kept) != len(names):
        lacking = sorted(names - set(header.entries))
        raise FormatError(f"{shard}: lacks entries {lacking!r} that tree.json names")
    tensors = [_out_tensor(files, shard, entry) for entry in kept]
    yield encode_header(tensors, _SHARD_METADATA)
    for tensor in tensors:
        yield from tensor.chunks()


def _out_tensor(files: Store, shard: str, entry: SafetensorsEntry) -> OutTensor:
    dtype = TORCH_DTYPE.get(entry.dtype)
    if dtype is None:
        raise NotThinnableError(
            f"{shard}: entry {entry.name!r} has dtype {entry.dtype}, which thinning cannot copy"
        )
    return OutTensor(entry.name, dtype, entry.shape, partial(_ranges, files, shard, *entry.byte_range))


def _ranges(files: Store, shard: str, start: int, end: int) -> Iterator[bytes]:
    for offset in range(start, end, _COPY_CHUNK):
        yield files.get(shard, offset, min(end, offset + _COPY_CHUNK))
