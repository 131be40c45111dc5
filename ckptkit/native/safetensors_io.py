"""safetensors shards: a streaming writer, and a reader that validates before it trusts.

The writer emits the header and then each entry's bytes as memoryviews of tensor memory, so a
shard is never assembled in memory. The reader parses the header through the Store (two small
ranged reads), checks it the way the reference implementation does, and then reads entries
memory-mapped (local files, via ``safetensors.safe_open``), straight into tensor memory (local
files without mmap), or by one ranged ``get`` each (every other store).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import torch

from ckptkit.errors import FormatError, TruncatedError
from ckptkit.formats.safetensors import (
    SafetensorsEntry,
    SafetensorsHeader,
    read_safetensors_header,
)
from ckptkit.native.buffers import host_memoryview
from ckptkit.native.dtypes import safetensors_itemsize
from ckptkit.native.plan import Entry
from ckptkit.storage.base import Store

CHUNK_SIZE = 64 << 20  # chunks handed to the sink, so hashing and I/O interleave on big tensors
METADATA = {"format": "ckptkit"}


# --- writing --------------------------------------------------------------------------------


def encode_header(entries: list[Entry]) -> bytes:
    """The 8-byte length and the JSON header, padded with spaces so the data is 8-aligned."""
    header: dict[str, Any] = {"__metadata__": METADATA}
    offset = 0
    for entry in entries:
        header[entry.name] = {
            "dtype": entry.dtype,
            "shape": list(entry.shape),
            "data_offsets": [offset, offset + entry.nbytes],
        }
        offset += entry.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def shard_chunks(entries: list[Entry]) -> Iterator[memoryview]:
    """A whole shard as a stream of buffers; each entry's bytes are fetched only when reached."""
    yield memoryview(encode_header(entries))
    for entry in entries:
        data = entry.read()
        for start in range(0, len(data), CHUNK_SIZE):
            yield data[start : start + CHUNK_SIZE]


# --- reading --------------------------------------------------------------------------------


# Header parsing and validation live in ckptkit.formats.safetensors, shared with the reader of
# foreign safetensors files; ckptkit's own shards must pass it strictly (no problems at all).
HeaderEntry = SafetensorsEntry
ShardHeader = SafetensorsHeader


def read_header(store: Store, path: str) -> ShardHeader:
    header = read_safetensors_header(store, path, strict=True)
    _check_readable_dtypes(header)
    return header


def _check_readable_dtypes(header: ShardHeader) -> None:
    # The shared parser knows every safetensors dtype; this reader makes torch tensors, so it
    # takes only those torch's safetensors binding maps.
    for name, entry in header.entries.items():
        if safetensors_itemsize(entry.dtype) is None:
            raise FormatError(f"{header.key}: tensor {name!r}: unsupported dtype {entry.dtype!r}")


class ShardReader:
    """Reads entries of the shards below ``store``, opening each shard's header once."""

    def __init__(self, store: Store, *, mmap: bool, stack: ExitStack) -> None:
        self._store = store
        self._mmap = mmap
        self._stack = stack
        self._headers: dict[str, ShardHeader] = {}
        self._mapped: dict[str, Any] = {}
        self._files: dict[str, Any] = {}

    def header(self, path: str) -> ShardHeader:
        if path not in self._headers:
            self._headers[path] = read_header(self._store, path)
        return self._headers[path]

    def entry(self, path: str, name: str) -> tuple[HeaderEntry, torch.Tensor]:
        """The header record of entry ``name`` and its bytes as a CPU tensor of its own storage."""
        header = self.header(path)
        info = header.entries.get(name)
        if info is None:
            raise FormatError(f"{path}: has no tensor {name!r}, which tree.json refers to")
        local = self._store.local_path(path)
        if local is not None and self._mmap:
            return info, self._mapped_tensor(path, str(local), name)
        start, nbytes = header.data_start + info.begin, info.end - info.begin
        if local is not None:
            tensor = self._read_local(path, str(local), start, nbytes)
        else:
            data = self._store.get(path, start, start + nbytes)
            # A bytearray copy, since a tensor over an immutable bytes object could be written.
            tensor = (
                torch.frombuffer(bytearray(data), dtype=torch.uint8)
                if data
                else torch.empty(0, dtype=torch.uint8)
            )
        got = tensor.numel() * tensor.element_size()
        if got != nbytes:
            raise TruncatedError(
                f"{path}: tensor {name!r} is truncated",
                path=path,
                offset=start + got,
                expected=start + nbytes,
                actual=start + got,
            )
        return info, tensor

    def _read_local(self, path: str, local: str, start: int, nbytes: int) -> torch.Tensor:
        """Read straight into a fresh tensor: one copy, where get() and a bytearray make two."""
        if path not in self._files:
            file = open(local, "rb", buffering=0)  # noqa: SIM115 - the ExitStack closes it
            self._files[path] = self._stack.enter_context(file)
        file = self._files[path]
        tensor = torch.empty(nbytes, dtype=torch.uint8)
        view = host_memoryview(tensor)
        file.seek(start)
        done = 0
        while done < nbytes:
            count = file.readinto(view[done:])
            if not count:
                return tensor[:done]
            done += count
        return tensor

    def _mapped_tensor(self, path: str, local: str, name: str) -> torch.Tensor:
        from safetensors import SafetensorError, safe_open

        try:
            if path not in self._mapped:
                self._mapped[path] = self._stack.enter_context(safe_open(local, framework="pt"))
            return self._mapped[path].get_tensor(name)
        except SafetensorError as exc:
            raise FormatError(f"{path}: tensor {name!r}: {exc}") from exc
