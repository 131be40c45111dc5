"""Tensors as byte ranges in stored files: bounded ranged reads, dtype casts, and read-ahead.

Shared by ``consolidate`` and ``convert``: both describe every output tensor as pieces of source
files and stream them, so peak memory is a chunk or two, never a tensor file. Torch-free: the
casts are bit shuffles done in numpy.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from ckptkit.errors import FormatError, InvalidURLError
from ckptkit.formats.dtypes import torch_itemsize
from ckptkit.formats.safetensors_writer import tensor_hasher
from ckptkit.storage import Store

READ_CHUNK = 16 << 20  # bytes per ranged read: bounds memory, large enough to stream at disk speed
FLOATS = frozenset({"float32", "bfloat16", "float16", "float64"})
_NUMPY_FLOAT = {"float16": "<f2", "float32": "<f4", "float64": "<f8"}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


@dataclass(frozen=True)
class Piece:
    """``numel`` contiguous elements of ``dtype`` at byte ``offset`` of file ``key``."""

    key: str
    offset: int
    numel: int


def slice_pieces(pieces: Iterable[Piece], start: int, count: int, itemsize: int) -> list[Piece]:
    """Elements ``[start, start + count)`` of the vector the pieces form, back to back, as pieces.
    A piece without a key stands for zeros (padding) and stays one. FormatError when the
    vector is shorter: a layout and the partitions that should hold it disagree."""
    out, base = [], 0
    for p in pieces:
        lo, hi = max(start, base), min(start + count, base + p.numel)
        if lo < hi:
            out.append(Piece(p.key, p.offset + (lo - base) * itemsize if p.key else 0, hi - lo))
        base += p.numel
    if sum(p.numel for p in out) != count:
        raise FormatError(
            f"elements [{start}, {start + count}) are needed from a partition of {base} elements: "
            "the shapes and the partitions disagree"
        )
    return out


def read_pieces(store: Store, pieces: Iterable[Piece], itemsize: int) -> Iterator[bytes]:
    """The pieces' bytes in bounded ranged reads; every chunk holds whole elements.

    Consecutive chunks of one file, up to READ_CHUNK bytes, go to the store in one
    ``read_ranges`` call: a run of small tensors stored side by side costs one request on an
    object store, not one each, and memory stays bounded by READ_CHUNK. A piece without a key
    is that many zero elements (padding), read from nowhere."""
    step = READ_CHUNK - READ_CHUNK % itemsize
    batch: list[tuple[int, int]] = []
    batch_key = ""
    for p in pieces:
        n = p.numel * itemsize
        if not p.key:
            if batch:
                yield from _read_batch(store, batch_key, batch)
                batch = []
            for lo in range(0, n, step):
                yield bytes(min(step, n - lo))
            continue
        for lo in range(0, n, step):
            chunk = (p.offset + lo, p.offset + min(n, lo + step))
            held = sum(e - s for s, e in batch)
            if batch and (p.key != batch_key or held + chunk[1] - chunk[0] > READ_CHUNK):
                yield from _read_batch(store, batch_key, batch)
                batch = []
            batch_key = p.key
            batch.append(chunk)
    if batch:
        yield from _read_batch(store, batch_key, batch)


def _read_batch(store: Store, key: str, ranges: list[tuple[int, int]]) -> Iterator[bytes]:
    for (start, end), data in zip(ranges, store.read_ranges(key, ranges), strict=True):
        if len(data) != end - start:
            raise FormatError(f"{key}: file ends inside a tensor at byte {start}")
        yield data


def itemsize_of(dtype: str) -> int:
    size = torch_itemsize(dtype)
    if size is None:
        raise FormatError(f"unknown dtype {dtype!r}")
    return size


def out_dtype(src_dtype: str, dtype: str | None) -> str:
    """The dtype a tensor is written in: ``dtype`` for floating tensors, else its own."""
    return dtype if dtype is not None and src_dtype in FLOATS else src_dtype


def cast(data: bytes | memoryview, src: str, dst: str) -> bytes | memoryview:
    """Raw little-endian elements of ``src`` as ``dst``, rounding as torch does; numpy only, no torch.

    torch would cost seconds of import and hundreds of MB of RSS for what is a bit shuffle.
    """
    if src == dst:
        return data
    import numpy as np

    if src == "bfloat16":  # bf16 is the top half of an fp32
        wide = (np.frombuffer(data, dtype="<u2").astype("<u4") << 16).view("<f4")
    elif src in _NUMPY_FLOAT:
        wide = np.frombuffer(data, dtype=_NUMPY_FLOAT[src])
    else:
        raise FormatError(f"cannot cast {src} to {dst}")
    if dst == "bfloat16":
        bits = wide.astype("<f4", copy=False).view("<u4")
        # Round to nearest even, NaN to the canonical quiet NaN: c10's round_to_nearest_even.
        rounded = ((bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16).astype("<u2")
        rounded[np.isnan(wide)] = 0x7FC0
        return memoryview(rounded).cast("B")
    if dst not in _NUMPY_FLOAT:
        raise FormatError(f"cannot cast {src} to {dst}")
    return memoryview(wide.astype(_NUMPY_FLOAT[dst])).cast("B")


def cast_chunks(chunks: Iterable[bytes | memoryview], src: str, dst: str) -> Iterator[bytes | memoryview]:
    for data in chunks:
        yield cast(data, src, dst)


def content_digest(chunks: Iterable[bytes | memoryview]) -> str:
    """The writers' digest (:func:`tensor_hasher`) of bytes read back, to compare with theirs."""
    hasher = tensor_hasher()
    for chunk in chunks:
        hasher.update(chunk)
    return hasher.hexdigest()


def parse_size(value: str | int) -> int:
    """``"5GB"`` -> 5e9, ``"500MiB"`` -> 500 * 2**20 (HF's convention: GB is decimal)."""
    if isinstance(value, int):
        return value
    match = _SIZE.match(value)
    if not match:
        raise InvalidURLError(f"not a size: {value!r} (expected e.g. 5GB, 500MB, 2GiB)")
    size = int(float(match.group(1)) * _UNITS[(match.group(2) or "B").upper()])
    if size <= 0:
        raise InvalidURLError(f"max shard size must be positive, got {value!r}")
    return size


def prefetched(chunks: Iterator[bytes | memoryview], depth: int = 2) -> Iterator[bytes | memoryview]:
    """``chunks`` produced by a helper thread, ``depth`` ahead of the consumer.

    Reading, casting and hashing (which release the GIL) then overlap the writer's I/O; memory
    grows by ``depth`` chunks only.
    """
    import queue
    import threading

    done = object()
    box: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for chunk in chunks:
                if stop.is_set():
                    return
                box.put(chunk)
            box.put(done)
        except BaseException as exc:  # handed to the consumer, raised there
            box.put(exc)

    worker = threading.Thread(target=produce, name="ckptkit-read-ahead", daemon=True)
    worker.start()
    try:
        while (item := box.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while worker.is_alive():  # unblock a producer waiting on a full queue
            with contextlib.suppress(queue.Empty):
                box.get_nowait()
            worker.join(0.01)
