"""Streaming safetensors shards and HF index files, one tensor's chunks at a time. Torch-free.

A shard is produced as a stream of buffers: the header (computed from dtypes and shapes alone),
then each tensor's chunks as its source yields them, hashed on the way so that the bytes can be
compared with what a reader later finds. Nothing holds more than the chunk in flight. Used by
``consolidate`` and ``convert``, which write the stream through a Store or a transaction.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from ckptkit.errors import FormatError
from ckptkit.formats.dtypes import torch_itemsize

# torch dtype name -> safetensors dtype name
ST_DTYPE = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint64": "U64",
    "uint32": "U32",
    "uint16": "U16",
    "uint8": "U8",
    "bool": "BOOL",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e4m3fnuz": "F8_E4M3FNUZ",
    "float8_e5m2": "F8_E5M2",
    "float8_e5m2fnuz": "F8_E5M2FNUZ",
    "complex64": "C64",
}
TORCH_DTYPE = {v: k for k, v in ST_DTYPE.items()}
SHARED_PARAMS_KEY = "ckptkit.shared_params"  # alias -> source, JSON, in __metadata__ and the index


@dataclass(frozen=True)
class OutTensor:
    """One tensor to write: its final dtype and shape, and a callable giving its bytes in chunks."""

    name: str
    dtype: str  # torch dtype name of the bytes ``chunks`` yields
    shape: tuple[int, ...]
    chunks: Callable[[], Iterable[bytes | memoryview]]
    kind: str = "tensor"
    source: str | None = None  # this name is a tied alias of ``source``

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * (torch_itemsize(self.dtype) or 1)


# name, bytes written, tensor_hasher's hex digest of them
OnWritten = Callable[[OutTensor, int, str], None]


def tensor_hasher() -> Any:
    """A hasher for one tensor's bytes as a writer streams them, to compare with what a reader
    finds later (the convert pipeline's reload check). BLAKE3: it costs a fraction of SHA-256's
    time, and the value is compared in memory, never stored."""
    from blake3 import blake3  # imported on first use; `ckptkit --help` has no need of it

    return blake3()


def split_shards(units: list[list[OutTensor]], limit: int) -> list[list[OutTensor]]:
    """Greedy in order, as HF's splitter; a unit (a tensor and its aliases) stays in one shard.

    A unit larger than ``limit`` gets a shard of its own.
    """
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for unit in units:
        nbytes = sum(t.nbytes for t in unit)
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].extend(unit)
        size += nbytes
    return shards


def shard_names(count: int, fmt: str) -> list[str]:
    """HF's names: ``model.safetensors`` or ``model-00001-of-00003.safetensors`` (``pytorch_model.bin``)."""
    stem, ext = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
    if count == 1:
        return [f"{stem}.{ext}"]
    return [f"{stem}-{i:05d}-of-{count:05d}.{ext}" for i in range(1, count + 1)]


def index_name(fmt: str) -> str:
    return "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"


def index_document(total_size: int, weight_map: dict[str, str], metadata: dict[str, Any]) -> bytes:
    """An HF ``*.index.json``: ``total_size`` is tensor bytes, as ``save_pretrained`` writes it."""
    document = {"metadata": {"total_size": total_size, **metadata}, "weight_map": weight_map}
    return json.dumps(document, indent=2).encode()


def encode_header(tensors: list[OutTensor], metadata: dict[str, str]) -> bytes:
    """The 8-byte length and the JSON header, padded with spaces so the data starts 8-aligned."""
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for t in tensors:
        if t.dtype not in ST_DTYPE:
            raise FormatError(f"{t.name}: dtype {t.dtype} has no safetensors name")
        header[t.name] = {
            "dtype": ST_DTYPE[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def safetensors_chunks(
    tensors: list[OutTensor], metadata: dict[str, str], on_written: OnWritten
) -> Iterator[bytes | memoryview]:
    """One shard as a stream: header, then each tensor's chunks; ``on_written`` gets each digest."""
    yield encode_header(tensors, metadata)
    for t in tensors:
        hasher = tensor_hasher()
        nbytes = 0
        for data in t.chunks():
            hasher.update(data)
            nbytes += len(data)
            yield data
        if nbytes != t.nbytes:  # the header promised t.nbytes: a short source would corrupt the file
            raise FormatError(f"{t.name}: source gave {nbytes} bytes, expected {t.nbytes}")
        on_written(t, nbytes, hasher.hexdigest())
