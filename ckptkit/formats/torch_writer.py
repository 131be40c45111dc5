"""A ``torch.save``-compatible zip file written as a stream, one tensor record at a time.

``torch.save`` needs every tensor in memory and a seekable file. The archive it writes is simple
(formats.md §2): ``archive/data.pkl`` (the object, tensors as ``_rebuild_tensor_v2`` calls whose
storages are persistent ids), a few small records (``.format_version``, ``.storage_alignment``,
``byteorder``, ``version``, ``.data/serialization_id``) and one stored record per storage,
``archive/data/<key>``, its bytes starting on a 64-byte boundary so ``torch.load(mmap=True)`` can
map them. Every record is ZIP_STORED with a data descriptor (flag bit 3), as torch's own writer
does, so each record's CRC-32 follows its bytes and nothing needs seeking back. The pickle is
made from dtypes, shapes and storage keys alone (``formats.pickle_writer``), before any tensor
byte is read, so writing imports no torch.

:func:`torch_tree_chunks` writes any tree the pickle writer takes (a rank file ``reshard``
rewrites); :func:`torch_zip_chunks` is the flat state dict ``convert`` and ``consolidate`` write.
"""

from __future__ import annotations

import struct
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from ckptkit.errors import FormatError
from ckptkit.formats.pickle_writer import STORAGE_CLASS, StoredTensor, dumps
from ckptkit.formats.safetensors_writer import OnWritten, OutTensor, tensor_hasher

ARCHIVE = "archive"
ALIGNMENT = 64  # torch's default storage alignment (torch.serialization.config.save.storage_alignment)
ZIP64_LIMIT = 0xFFFFFFFF  # sizes and offsets at or above this need ZIP64 fields
_MARKER = 0xFFFFFFFF  # the value a classic field holds when the real one is in the ZIP64 extra
_LOCAL = struct.Struct("<IHHHHHIIIHH")
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")
_FLAGS = 0x0808  # bit 3: data descriptor; bit 11: UTF-8 names (torch's writer sets both)
_PAD_ID = 0x4246  # "FB": the extra field torch pads with


@dataclass
class _Record:
    name: bytes
    offset: int
    size: int
    crc: int

    @property
    def zip64(self) -> bool:
        return self.size >= ZIP64_LIMIT or self.offset >= ZIP64_LIMIT


# tensor, bytes written, tensor_hasher's hex digest of them
OnStored = Callable[[StoredTensor, int, str], None]


def torch_tree_chunks(value: Any, on_written: OnStored | None = None) -> Iterator[bytes | memoryview]:
    """The whole file for ``value`` (a tree ``pickle_writer.dumps`` takes) as a stream of buffers.

    Each StoredTensor gets one storage record, keyed "0", "1", ... in the order the pickle first
    names it; the same object met again shares that storage, as torch's tied tensors do. Its
    bytes are read only when the stream reaches its record.
    """
    tensors: list[StoredTensor] = []
    keys: dict[int, str] = {}

    def storage_key(tensor: StoredTensor) -> str:
        key = keys.get(id(tensor))
        if key is None:
            key = keys[id(tensor)] = str(len(tensors))
            tensors.append(tensor)
        return key

    writer = _ZipStream()
    yield from writer.record("data.pkl", [dumps(value, storage_key)])
    yield from writer.record(".format_version", [b"1"])
    yield from writer.record(".storage_alignment", [str(ALIGNMENT).encode()])
    yield from writer.record("byteorder", [b"little"])
    for key, tensor in enumerate(tensors):
        # Hashed only for a caller that hears of it: a DCP item's bytes are digested by the
        # manifest anyway, and a second pass of BLAKE3 would cost a save 10-20 %.
        hasher = tensor_hasher() if on_written is not None else None
        chunks = tensor.chunks() if hasher is None else _hashed(tensor.chunks(), hasher)
        yield from writer.record(f"data/{key}", chunks)
        if writer.last.size != tensor.nbytes:
            raise FormatError(
                f"storage data/{key} ({tensor.dtype} {list(tensor.shape)}): source gave "
                f"{writer.last.size} bytes, expected {tensor.nbytes}"
            )
        if on_written is not None and hasher is not None:
            on_written(tensor, writer.last.size, hasher.hexdigest())
    yield from writer.record("version", [b"3\n"])
    yield from writer.record(".data/serialization_id", [f"{uuid.uuid4().int:040d}"[:40].encode()])
    yield writer.central_directory()


def torch_zip_chunks(tensors: list[OutTensor], on_written: OnWritten) -> Iterator[bytes | memoryview]:
    """The flat state dict ``{name: tensor}`` as a file; a tied alias shares its source's storage."""
    stored: dict[str, StoredTensor] = {}
    owner: dict[int, OutTensor] = {}  # id of each storage's StoredTensor -> the tensor it came from
    for t in tensors:
        if t.source is not None and t.source in stored:
            stored[t.name] = stored[t.source]
            continue
        if t.dtype not in STORAGE_CLASS:
            raise FormatError(f"{t.name}: torch.save files cannot hold dtype {t.dtype}")
        stored[t.name] = StoredTensor(t.dtype, t.shape, t.chunks)
        owner[id(stored[t.name])] = t
    yield from torch_tree_chunks(stored, lambda st, size, digest: on_written(owner[id(st)], size, digest))


def _hashed(chunks: Iterable[bytes | memoryview], hasher: Any) -> Iterator[bytes | memoryview]:
    for chunk in chunks:
        hasher.update(chunk)
        yield chunk


class _ZipStream:
    """Writes stored zip records in sequence and the central directory at the end."""

    def __init__(self) -> None:
        self.position = 0
        self.records: list[_Record] = []

    @property
    def last(self) -> _Record:
        return self.records[-1]

    def record(self, name: str, chunks: Any) -> Iterator[bytes | memoryview]:
        encoded = f"{ARCHIVE}/{name}".encode()
        rec = _Record(encoded, self.position, 0, 0)
        self.records.append(rec)
        header = self._local_header(encoded)
        self.position += len(header)
        yield header
        for chunk in chunks:
            rec.crc = zlib.crc32(chunk, rec.crc)
            rec.size += len(chunk)
            yield chunk
        self.position += rec.size
        # ZIP64 descriptors carry 8-byte sizes; a reader knows which from the central directory.
        fmt = "<IIQQ" if rec.size >= ZIP64_LIMIT else "<IIII"
        descriptor = struct.pack(fmt, 0x08074B50, rec.crc, rec.size, rec.size)
        self.position += len(descriptor)
        yield descriptor

    def _local_header(self, name: bytes) -> bytes:
        # Sizes and CRC are zero here (flag bit 3): they follow the data and sit in the directory.
        fixed = 30 + len(name) + 4
        pad = -(self.position + fixed) % ALIGNMENT
        extra = struct.pack("<HH", _PAD_ID, pad) + b"Z" * pad
        return _LOCAL.pack(0x04034B50, 0, _FLAGS, 0, 0, 0, 0, 0, 0, len(name), len(extra)) + name + extra

    def central_directory(self) -> bytes:
        start = self.position
        parts = [self._central_entry(r) for r in self.records]
        size = sum(len(p) for p in parts)
        count = len(self.records)
        # torch always ends with the ZIP64 end record and locator; the classic record follows.
        eocd64 = struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, count, count, size, start)
        locator = struct.pack("<IIQI", 0x07064B50, 0, start + size, 1)
        eocd = struct.pack(
            "<IHHHHIIH", 0x06054B50, 0, 0, min(count, 0xFFFF), min(count, 0xFFFF),
            size if size < ZIP64_LIMIT else _MARKER, start if start < ZIP64_LIMIT else _MARKER, 0,
        )
        return b"".join([*parts, eocd64, locator, eocd])

    @staticmethod
    def _central_entry(r: _Record) -> bytes:
        extra = b""
        size, offset = r.size, r.offset
        if r.zip64:
            values = []
            if r.size >= ZIP64_LIMIT:
                values += [r.size, r.size]
                size = _MARKER
            if r.offset >= ZIP64_LIMIT:
                values.append(r.offset)
                offset = _MARKER
            extra = struct.pack(f"<HH{len(values)}Q", 0x0001, 8 * len(values), *values)
        version = 45 if r.zip64 else 0
        return (
            _CENTRAL.pack(
                0x02014B50, version, version, _FLAGS, 0, 0, 0, r.crc, size, size,
                len(r.name), len(extra), 0, 0, 0, 0, offset,
            )
            + r.name
            + extra
        )
