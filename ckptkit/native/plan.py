"""Which bytes go into the shards, under which entry names, and how tensors refer to them.

Tensors are grouped by the storage they view. A storage viewed by one contiguous tensor becomes
an ordinary safetensors entry with the tensor's dtype and shape, so other tools can read it.
Otherwise (tied views, slices, transposes, dtype views of one buffer) the covering byte span
of the storage is stored once and each tensor is recorded as (entry, byte offset, dtype, shape,
stride), which the reader restores as views of one storage. Nothing is made contiguous: the
bytes are written as they lie in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from ckptkit.native.buffers import storage_bytes
from ckptkit.native.dtypes import safetensors_name, torch_name
from ckptkit.native.tree import TreeEncoder, TreePath

# safetensors reserves this name for its metadata map.
_RESERVED_NAMES = frozenset({"__metadata__"})


@dataclass(frozen=True)
class Entry:
    """One safetensors entry to write; ``read`` gives its bytes, in the writing thread.

    ``source`` is where those bytes lie when they are a tensor storage's (the storage and the
    byte offset of ``nbytes`` bytes in it), so that a non-blocking save can copy them to a host
    buffer of its own before the caller's tensors change (:mod:`ckptkit.async_save`).
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    alignment: int
    read: Callable[[], memoryview]
    source: tuple[torch.UntypedStorage, int] | None = None


@dataclass(frozen=True)
class Plan:
    entries: list[Entry]
    records: list[dict[str, Any]]  # tree.json's tensor table, one per encoded tensor


class _Names:
    """Entry names: the tree path dotted like a state_dict key, made unique."""

    def __init__(self) -> None:
        self._taken: set[str] = set(_RESERVED_NAMES)

    def claim(self, path: TreePath, suffix: str = "") -> str:
        base = ".".join(key if isinstance(key, str) else repr(key) for key in path) or "state"
        name, n = base + suffix, 1
        while name in self._taken:
            name, n = f"{base}{suffix}#{n}", n + 1
        self._taken.add(name)
        return name


def plan_entries(encoder: TreeEncoder) -> Plan:
    names = _Names()
    entries: list[Entry] = []
    # conj/neg are lazy flags over unmodified bytes; materialize them so the bytes are the values.
    tensors = [t.resolve_conj().resolve_neg() for t in encoder.tensors]
    records = [_record(t, original) for t, original in zip(tensors, encoder.tensors, strict=True)]
    groups: dict[tuple[str, int], list[int]] = {}
    for index, tensor in enumerate(tensors):
        if tensor.numel() == 0:
            continue  # no bytes: its record (entry None) restores it from dtype, shape, stride
        key = (str(tensor.device), tensor.untyped_storage().data_ptr())
        groups.setdefault(key, []).append(index)
    for members in groups.values():
        first = members[0]
        views = [tensors[i] for i in members]
        if len(views) == 1 and views[0].is_contiguous():
            name = names.claim(encoder.tensor_paths[first])
            entries.append(_whole_tensor_entry(name, views[0]))
            records[first]["entry"] = name
        else:
            name = names.claim(encoder.tensor_paths[first], "@storage")
            entry, offsets = _span_entry(name, views)
            entries.append(entry)
            for index, offset in zip(members, offsets, strict=True):
                records[index].update(entry=name, offset=offset)
    if encoder.blobs:  # only a tree with numpy arrays imports numpy
        from ckptkit.native.numpy_values import array_bytes
    for array, path, node in encoder.blobs:
        node["entry"] = names.claim(path)
        read = partial(array_bytes, array, node)
        entries.append(Entry(node["entry"], "U8", (array.nbytes,), array.nbytes, 1, read))
    return Plan(entries, records)


def _record(tensor: torch.Tensor, original: torch.Tensor) -> dict[str, Any]:
    record: dict[str, Any] = {
        "entry": None,
        "offset": 0,
        "dtype": torch_name(tensor.dtype),
        "shape": list(tensor.shape),
        "stride": list(tensor.stride()),
        "device": str(tensor.device),
    }
    if original.requires_grad:
        record["requires_grad"] = True
    if type(original) is torch.nn.Parameter:
        record["parameter"] = True
    return record


def _whole_tensor_entry(name: str, tensor: torch.Tensor) -> Entry:
    itemsize = tensor.element_size()
    start = tensor.storage_offset() * itemsize
    nbytes = tensor.numel() * itemsize
    storage = tensor.untyped_storage()
    read = partial(storage_bytes, storage, start, start + nbytes)
    st_dtype = safetensors_name(tensor.dtype)
    if st_dtype is None:  # raw bytes; tree.json keeps the real dtype
        return Entry(name, "U8", (nbytes,), nbytes, itemsize, read, (storage, start))
    return Entry(name, st_dtype, tuple(tensor.shape), nbytes, itemsize, read, (storage, start))


def _span_entry(name: str, views: list[torch.Tensor]) -> tuple[Entry, list[int]]:
    """One entry covering every view's bytes, and each view's byte offset into it."""
    starts = [t.storage_offset() * t.element_size() for t in views]
    ends = [(t.storage_offset() + element_extent(t.shape, t.stride())) * t.element_size() for t in views]
    itemsizes = {t.element_size() for t in views}
    # Every view's offset must stay a multiple of its itemsize; itemsizes are powers of two.
    alignment = max(itemsizes)
    low = min(starts) // alignment * alignment
    high = max(ends)
    storage = views[0].untyped_storage()
    read = partial(storage_bytes, storage, low, high)
    dtypes = {t.dtype for t in views}
    st_dtype = safetensors_name(next(iter(dtypes))) if len(dtypes) == 1 else None
    if st_dtype is None:
        entry = Entry(name, "U8", (high - low,), high - low, alignment, read, (storage, low))
    else:
        shape = ((high - low) // alignment,)
        entry = Entry(name, st_dtype, shape, high - low, alignment, read, (storage, low))
    return entry, [start - low for start in starts]


def element_extent(shape: Sequence[int], stride: Sequence[int]) -> int:
    """How many elements of its storage a non-empty strided tensor spans."""
    return sum((n - 1) * s for n, s in zip(shape, stride, strict=True)) + 1


def assign_shards(entries: list[Entry], max_shard_size: int) -> list[list[Entry]]:
    """Greedy, in order: a shard closes when the next entry would pass the bound.

    An entry larger than the bound gets a shard of its own. Within a shard entries are sorted by
    falling alignment, as safetensors' writer does, so memory-mapped tensors stay aligned.
    """
    shards: list[list[Entry]] = []
    current: list[Entry] = []
    size = 0
    for entry in entries:
        if current and size + entry.nbytes > max_shard_size:
            shards.append(current)
            current, size = [], 0
        current.append(entry)
        size += entry.nbytes
    if current:
        shards.append(current)
    return [sorted(shard, key=lambda e: -e.alignment) for shard in shards]


# In a deduplicated save, an entry at least this large is a shard of its own: the unit of
# sharing between checkpoints. Smaller ones (biases, norms, step counters) share shards, which
# costs little to rewrite and saves a file (an object store request) each.
DEDUP_OWN_SHARD = 1 << 20


def assign_dedup_shards(entries: list[Entry], max_shard_size: int) -> list[list[Entry]]:
    """Each entry of :data:`DEDUP_OWN_SHARD` bytes or more alone, so its shard's bytes depend on
    that tensor only; the smaller ones packed as :func:`assign_shards` packs them, after."""
    large = [[entry] for entry in entries if entry.nbytes >= DEDUP_OWN_SHARD]
    return large + assign_shards([e for e in entries if e.nbytes < DEDUP_OWN_SHARD], max_shard_size)


def shard_name(index: int, count: int) -> str:
    return f"tensors-{index:05d}-of-{count:05d}.safetensors"
