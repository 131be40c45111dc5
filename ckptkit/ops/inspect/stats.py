"""``--stats GLOB``: values of the matching tensors, reading only their bytes.

This is the one view that reads tensor data, so it is the one that imports torch: each
matching tensor's byte range comes from its storage record (ranged reads through the store),
one tensor at a time, so memory stays bounded by the largest match.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any

from ckptkit.errors import FormatError
from ckptkit.formats.dtypes import torch_itemsize
from ckptkit.ops.inspect.context import Context
from ckptkit.ops.inspect.model import model_tensors
from ckptkit.ops.inspect.source import NamedTensor
from ckptkit.ops.inspect.values import walk_named_tensors

_READ_CHUNK = 64 << 20


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
    values = _values(ctx, named, torch)
    finite = values[torch.isfinite(values)] if values.is_floating_point() else values
    has = finite.numel() > 0
    as_float = finite.double()
    return TensorStats(
        file=named.file,
        name=named.name,
        dtype=tensor.dtype,
        shape=list(tensor.shape),
        numel=tensor.numel,
        min=float(as_float.min()) if has else None,
        max=float(as_float.max()) if has else None,
        mean=float(as_float.mean()) if has else None,
        norm=float(as_float.norm()) if has else None,
        nan=int(torch.isnan(values).sum()) if values.is_floating_point() else 0,
        inf=int(torch.isinf(values).sum()) if values.is_floating_point() else 0,
    )


def _values(ctx: Context, named: NamedTensor, torch: Any) -> Any:
    tensor, storage = named.tensor, named.tensor.storage
    itemsize = torch_itemsize(tensor.dtype)
    dtype = getattr(torch, tensor.dtype, None)
    if storage.byte_offset is None or itemsize is None or not isinstance(dtype, torch.dtype):
        raise FormatError(f"{named.label}: its bytes cannot be located or decoded")
    if tensor.numel == 0:
        return torch.empty(0, dtype=dtype)
    # The span the view covers inside its storage, read in one ranged request.
    last = tensor.storage_offset + sum((n - 1) * s for n, s in zip(tensor.shape, tensor.stride, strict=True))
    start = storage.byte_offset + tensor.storage_offset * itemsize
    end = storage.byte_offset + (last + 1) * itemsize
    data = bytearray(end - start)
    view = memoryview(data)
    for offset in range(0, len(data), _READ_CHUNK):
        chunk = ctx.source.store.get(named.file, start + offset, min(end, start + offset + _READ_CHUNK))
        if len(chunk) != min(_READ_CHUNK, len(data) - offset):
            raise FormatError(f"{named.label}: the file ends inside the tensor's bytes")
        view[offset : offset + len(chunk)] = chunk
    values = torch.frombuffer(data, dtype=dtype).as_strided(tensor.shape, tensor.stride, 0)
    return values.int() if dtype == torch.bool else values
