"""``--stats GLOB``: values of the matching tensors, reading only their bytes.

This is the one view that reads tensor data, so it is the one that imports torch: each
matching tensor's byte range comes from its storage record (ranged reads through the store),
one tensor at a time, so memory stays bounded by the largest match's stored bytes: declared
sizes are checked against the record before anything is allocated (docs/safety.md).
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Any

from ckptkit.errors import FormatError
from ckptkit.formats.dtypes import torch_itemsize
from ckptkit.formats.tree import check_storage, check_tensor
from ckptkit.ops.inspect.context import Context
from ckptkit.ops.inspect.model import model_tensors
from ckptkit.ops.inspect.source import NamedTensor
from ckptkit.ops.inspect.values import walk_named_tensors

_READ_CHUNK = 64 << 20
_STATS_CHUNK = 4 << 20  # elements per reduction step: working memory of a few tens of MB


@dataclass
class TensorStats:
    file: str
    name: str
    dtype: str
    shape: list[int]
    numel: int
    min: float | None
    max: float | None
    mean: float | None
    norm: float | None  # L2 norm of the finite values
    nan: int
    inf: int


def all_tensors(ctx: Context) -> list[NamedTensor]:
    named = model_tensors(ctx)
    for doc in [*ctx.documents, *ctx.model_states, *ctx.zero_files]:
        for name, tensor in walk_named_tensors(doc.value):
            file = doc.bytes_file or tensor.storage.record
            if file is not None:
                named.append(NamedTensor(file, name, tensor))
    return named


def tensor_stats(ctx: Context, pattern: str) -> list[TensorStats]:
    """Statistics of every tensor whose name (or ``file:name``) matches the glob ``pattern``."""
    matches = [
        t
        for t in all_tensors(ctx)
        if fnmatch.fnmatchcase(t.name, pattern) or fnmatch.fnmatchcase(t.label, pattern)
    ]
    return [_stats(ctx, t) for t in matches]


def _stats(ctx: Context, named: NamedTensor) -> TensorStats:
    import torch

    tensor = named.tensor
    values, repeats = _values(ctx, named, torch)
    acc = _Accumulator()
    for chunk in values.split(_STATS_CHUNK):
        acc.add(chunk, torch)
    has = acc.count > 0
    # Each stored element stands for ``repeats`` elements of the view: min, max and mean are
    # those of the stored ones, counts scale by it, the L2 norm by its square root.
    return TensorStats(
        file=named.file,
        name=named.name,
        dtype=tensor.dtype,
        shape=list(tensor.shape),
        numel=tensor.numel,
        min=acc.min if has else None,
        max=acc.max if has else None,
        mean=acc.total / acc.count if has else None,
        norm=acc.norm * math.sqrt(repeats) if has else None,
        nan=acc.nan * repeats,
        inf=acc.inf * repeats,
    )


@dataclass
class _Accumulator:
    """Running statistics over chunks, so working memory is a chunk, not the tensor."""

    count: int = 0
    min: float = math.inf
    max: float = -math.inf
    total: float = 0.0
    norm: float = 0.0
    nan: int = 0
    inf: int = 0

    def add(self, chunk: Any, torch: Any) -> None:
        if chunk.is_floating_point():
            self.nan += int(torch.isnan(chunk).sum())
            self.inf += int(torch.isinf(chunk).sum())
            chunk = chunk[torch.isfinite(chunk)]
        elif chunk.dtype == torch.bool:
            chunk = chunk.int()  # min/max/sum of bools need numbers
        if not chunk.numel():
            return
        as_float = chunk.double()
        self.count += chunk.numel()
        self.min = min(self.min, float(as_float.min()))
        self.max = max(self.max, float(as_float.max()))
        self.total += float(as_float.sum())
        self.norm = math.hypot(self.norm, float(as_float.norm()))


def _values(ctx: Context, named: NamedTensor, torch: Any) -> tuple[Any, int]:
    """The stored elements the view covers, flat, and how often the view repeats each.

    Only what the file really holds is read: the storage must hold the bytes it declares and
    the view must lie inside it (the checks every reader applies), so a 650-byte file declaring
    10**12 elements is refused before anything is allocated.
    """
    tensor = named.tensor
    problems = [f"{named.label}: {p}" for p in [check_storage(tensor.storage)] if p]
    problems += check_tensor(named.label, tensor)
    itemsize = torch_itemsize(tensor.dtype)
    dtype = getattr(torch, tensor.dtype, None)
    if problems or itemsize is None or not isinstance(dtype, torch.dtype):
        raise FormatError("; ".join(problems) or f"{named.label}: its bytes cannot be decoded")
    if tensor.numel == 0:
        return torch.empty(0, dtype=dtype), 1
    shape, stride, span, repeats = _stored_view(named)
    data = _read(ctx, named, tensor.storage.byte_offset + tensor.storage_offset * itemsize, span * itemsize)
    return torch.frombuffer(data, dtype=dtype).as_strided(shape, stride, 0).reshape(-1), repeats


def _stored_view(named: NamedTensor) -> tuple[list[int], list[int], int, int]:
    """The view without its zero-stride dimensions (shape, stride), the elements it spans, and
    how often those dimensions repeat each element.

    An ``expand`` repeats every element equally often, so it need not be materialised. Other
    overlapping strides are refused: their values could outnumber the stored bytes many times.
    """
    tensor = named.tensor
    pairs = list(zip(tensor.shape, tensor.stride, strict=True))
    kept = [(n, s) for n, s in pairs if s != 0 and n != 1]
    repeats = math.prod(n for n, s in pairs if s == 0)
    span = 1 + sum((n - 1) * s for n, s in kept)  # elements from the first to the last touched
    distinct = math.prod(n for n, _ in kept)
    if distinct > span:
        raise FormatError(
            f"{named.label}: view of shape {list(tensor.shape)} and stride {list(tensor.stride)} has "
            f"overlapping strides ({distinct} elements over {span} stored ones); --stats reads each "
            "stored element once and does not expand such views"
        )
    return [n for n, _ in kept], [s for _, s in kept], span, repeats


def _read(ctx: Context, named: NamedTensor, start: int, size: int) -> bytearray:
    # The span the view covers inside its storage, read in chunked ranged requests.
    data = bytearray(size)
    view = memoryview(data)
    for offset in range(0, size, _READ_CHUNK):
        chunk = ctx.source.store.get(named.file, start + offset, start + min(size, offset + _READ_CHUNK))
        if len(chunk) != min(_READ_CHUNK, size - offset):
            raise FormatError(f"{named.label}: the file ends inside the tensor's bytes")
        view[offset : offset + len(chunk)] = chunk
    return data
