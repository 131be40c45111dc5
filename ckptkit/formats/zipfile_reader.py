"""A minimal zip reader over a Store: the central directory, local headers, and ranged record reads.

Written for torch.save archives, which miniz writes with stored (uncompressed) records, and read
the way torch reads them: records are found through the central directory, data offsets come
from the local header. Every offset is checked against the file before it is used, and what CPython's
zipfile and miniz would disagree about (local/central name mismatch, encryption flags, duplicate
names, data before the archive) is reported in ``problems`` instead of being silently resolved.
Only the tail of the file, the central directory and the local headers are read.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from ckptkit.errors import BadHeaderError, FormatError, LimitExceededError, OverlapError, TruncatedError
from ckptkit.storage.base import Store

EOCD_SIG = b"PK\x05\x06"
ZIP64_LOCATOR_SIG = b"PK\x06\x07"
ZIP64_EOCD_SIG = b"PK\x06\x06"
CENTRAL_SIG = b"PK\x01\x02"
LOCAL_SIG = b"PK\x03\x04"

EOCD_SIZE = 22
ZIP64_LOCATOR_SIZE = 20
ZIP64_EOCD_SIZE = 56
CENTRAL_SIZE = 46
LOCAL_SIZE = 30
MAX_COMMENT = 0xFFFF
TAIL_GUESS = 4096  # most archives end in an EOCD without a comment; read more only if needed

MAX_CENTRAL_DIRECTORY = 256 << 20  # 10^6 entries of torch-like names fit well below this
MAX_ENTRIES = 1_000_000
LOCAL_WINDOW = 512  # bytes read per local header: 30 + name + torch's <=68-byte padding extra
COALESCE_GAP = 64 << 10  # neighbouring local headers closer than this are fetched in one read
CRC_CHUNK = 8 << 20
# What record_crcs reads at a time: a read this large makes a remote reader stream (streamed GETs
# from the first read), and it is the one piece held beside what the stream receives ahead.
STREAM_READ = 8 << 20
KEEP_RECORD = 1 << 20  # records record_crcs keeps for read_record (data.pkl, byteorder) ...
KEEP_TOTAL = 8 << 20  # ... up to this much in all

FLAG_UTF8 = 0x800
# Flags CPython zipfile refuses or treats differently from miniz (CVE-2025-1945).
FLAGS_DIFFERENTIAL = 0x1 | 0x20 | 0x40


@dataclass(frozen=True)
class ZipEntry:
    """One central-directory record. Offsets are absolute in the file (prepended bytes included)."""

    file: str  # the store key of the archive
    name: str
    index: int
    method: int
    flags: int
    crc32: int
    compressed_size: int
    size: int
    header_offset: int
    data_limit: int  # where the central directory starts: no record's data may reach past it


@dataclass
class ZipArchive:
    key: str
    file_size: int
    prefix_offset: int  # bytes before the archive proper (0 for a normal zip)
    entries: list[ZipEntry]
    central_directory_offset: int  # absolute
    zip64: bool = False
    problems: list[str] = field(default_factory=list)
    _by_name: dict[str, ZipEntry] = field(default_factory=dict, repr=False)
    _data_offsets: dict[int, int] = field(default_factory=dict, repr=False)
    # Raw bytes of small records that :func:`record_crcs` streamed past (data.pkl, byteorder):
    # read_record takes them from here instead of fetching them again.
    _kept: dict[int, bytes] = field(default_factory=dict, repr=False)
    # What record_crcs found wrong with a local header, told when a reader asks for that record's
    # offset (as data_offsets would have found it): checking CRCs adds no findings of its own.
    _deferred: dict[int, list[str]] = field(default_factory=dict, repr=False)

    def get(self, name: str) -> ZipEntry | None:
        """The first entry called ``name`` (duplicates are listed in ``problems``)."""
        return self._by_name.get(name)

    def names(self) -> list[str]:
        return [entry.name for entry in self.entries]


def read_zip(store: Store, key: str, *, max_entries: int = MAX_ENTRIES) -> ZipArchive:
    """Parse the end records and the central directory of ``key``; no record data is read."""
    size = store.head(key).size
    eocd_pos, eocd, problems = _find_eocd(store, key, size)
    disk, cd_disk, n_disk, n_total, cd_size, cd_offset, _ = struct.unpack("<4H2LH", eocd[4:EOCD_SIZE])
    zip64 = False
    cd_end = eocd_pos  # where the central directory ends, absolute
    z64 = _read_zip64_end(store, key, eocd_pos, size)
    if z64 is not None:
        zip64 = True
        classic = (n_total, cd_size, cd_offset)
        cd_end, disk, cd_disk, n_disk, n_total, cd_size, cd_offset = z64
        # miniz writes both records with the same values; fields short of the 0xFFFF.. marker
        # that disagree with ZIP64 are a differential between readers that pick one or the other.
        for label, old, new in zip(
            ("entry count", "directory size", "directory offset"),
            classic,
            (n_total, cd_size, cd_offset),
            strict=True,
        ):
            if old not in (0xFFFF, 0xFFFFFFFF) and old != new:
                problems.append(f"end record says {label} {old}, the ZIP64 end record {new}")
    elif 0xFFFF in (n_disk, n_total) or 0xFFFFFFFF in (cd_size, cd_offset):
        problems.append("end record has ZIP64 markers but no ZIP64 end record: taking the values as given")
    if disk != 0 or cd_disk != 0 or n_disk != n_total:
        raise FormatError(f"{key}: multi-disk zip archives are not supported")
    if n_total > max_entries:
        raise LimitExceededError(
            f"{key}: {n_total} zip entries exceed the cap of {max_entries}",
            path=key,
            offset=eocd_pos,
            limit=max_entries,
            actual=n_total,
        )
    if cd_size > MAX_CENTRAL_DIRECTORY:
        raise LimitExceededError(
            f"{key}: central directory of {cd_size} bytes exceeds the cap",
            path=key,
            offset=eocd_pos,
            limit=MAX_CENTRAL_DIRECTORY,
            actual=cd_size,
        )
    # Data prepended to the archive shifts every stored offset by the same amount; like
    # CPython zipfile we infer it from where the central directory really ends.
    prefix = cd_end - cd_size - cd_offset
    if prefix < 0 or cd_end - cd_size < 0:
        raise BadHeaderError(
            f"{key}: central directory ({cd_size} bytes at offset {cd_offset}) does not fit before "
            f"the end record at {cd_end}",
            path=key,
            offset=cd_end,
        )
    if prefix:
        problems.append(f"{prefix} bytes precede the zip archive (torch.load refuses such a file)")
    cd_start = prefix + cd_offset
    raw = store.get(key, cd_start, cd_start + cd_size) if cd_size else b""
    if len(raw) != cd_size:
        ended = cd_start + len(raw)
        raise TruncatedError(
            f"{key}: central directory runs past the end of the file",
            path=key,
            offset=ended,
            expected=cd_start + cd_size,
            actual=ended,
        )
    entries = _parse_central_directory(key, raw, n_total, prefix, cd_start)
    archive = ZipArchive(key, size, prefix, entries, cd_start, zip64, problems)
    for entry in entries:
        if entry.name in archive._by_name:
            problems.append(f"duplicate zip entry {entry.name!r} (readers disagree on which one counts)")
        else:
            archive._by_name[entry.name] = entry
        if entry.flags & FLAGS_DIFFERENTIAL:
            bits = entry.flags & FLAGS_DIFFERENTIAL
            problems.append(
                f"zip entry {entry.name!r} has flag bits {bits:#x} set (encrypted/patched/strong)"
            )
    return archive


def _find_eocd(store: Store, key: str, size: int) -> tuple[int, bytes, list[str]]:
    """Locate the end-of-central-directory record, searching backwards as zip readers do."""
    if size < EOCD_SIZE:
        raise TruncatedError(
            f"{key}: {size} bytes, too short for a zip archive",
            path=key,
            offset=size,
            expected=EOCD_SIZE,
            actual=size,
        )
    for window in (TAIL_GUESS, EOCD_SIZE + MAX_COMMENT + ZIP64_LOCATOR_SIZE):
        start = max(0, size - window)
        tail = store.get(key, start, size)
        pos = tail.rfind(EOCD_SIG)
        while pos >= 0:
            if pos + EOCD_SIZE <= len(tail):
                comment = struct.unpack_from("<H", tail, pos + 20)[0]
                end = start + pos + EOCD_SIZE + comment
                if end <= size:
                    problems = (
                        [] if end == size else [f"{size - end} bytes follow the end of the zip archive"]
                    )
                    return start + pos, tail[pos : pos + EOCD_SIZE], problems
            pos = tail.rfind(EOCD_SIG, 0, pos)
        if start == 0:
            break
    raise BadHeaderError(
        f"{key}: no zip end-of-central-directory record: the file is truncated or not a zip",
        path=key,
        offset=None,
    )


def _read_zip64_end(
    store: Store, key: str, eocd_pos: int, size: int
) -> tuple[int, int, int, int, int, int, int] | None:
    """The ZIP64 end record's fields, when a ZIP64 locator sits right before the end record."""
    locator_pos = eocd_pos - ZIP64_LOCATOR_SIZE
    if locator_pos < 0:
        return None
    locator = store.get(key, locator_pos, eocd_pos)
    if locator[:4] != ZIP64_LOCATOR_SIG:
        return None
    _, stated_offset, disks = struct.unpack_from("<LQL", locator, 4)
    if disks > 1:
        raise FormatError(f"{key}: multi-disk zip archives are not supported")
    # The record normally sits right before the locator; the stated offset is not corrected for
    # prepended data, so try the adjacent position first (as CPython does).
    for pos in (locator_pos - ZIP64_EOCD_SIZE, stated_offset):
        if pos >= 0 and pos + ZIP64_EOCD_SIZE <= size:
            record = store.get(key, pos, pos + ZIP64_EOCD_SIZE)
            if record[:4] == ZIP64_EOCD_SIG:
                disk, cd_disk, n_disk, n_total, cd_size, cd_offset = struct.unpack_from("<2L4Q", record, 16)
                return pos, disk, cd_disk, n_disk, n_total, cd_size, cd_offset
    raise BadHeaderError(f"{key}: ZIP64 locator points at no ZIP64 end record", path=key, offset=locator_pos)


def _parse_central_directory(key: str, raw: bytes, count: int, prefix: int, cd_start: int) -> list[ZipEntry]:
    entries: list[ZipEntry] = []
    pos = 0
    for index in range(count):
        if pos + CENTRAL_SIZE > len(raw) or raw[pos : pos + 4] != CENTRAL_SIG:
            raise BadHeaderError(
                f"{key}: central directory entry {index} of {count} is missing or corrupt "
                f"(at offset {cd_start + pos})",
                path=key,
                offset=cd_start + pos,
            )
        (flags, method, crc, csize, usize, name_len, extra_len, comment_len, offset) = struct.unpack_from(
            "<4x2H4x3L3H8xL", raw, pos + 4
        )
        after = pos + CENTRAL_SIZE + name_len + extra_len + comment_len
        if after > len(raw):
            raise BadHeaderError(
                f"{key}: central directory entry {index} runs past the directory",
                path=key,
                offset=cd_start + pos,
            )
        name = _decode_name(raw[pos + CENTRAL_SIZE : pos + CENTRAL_SIZE + name_len], flags)
        extra = raw[pos + CENTRAL_SIZE + name_len : pos + CENTRAL_SIZE + name_len + extra_len]
        usize, csize, offset = _apply_zip64_extra(key, name, extra, usize, csize, offset)
        header_offset = prefix + offset
        # A cheap lower bound before any local header is read: header, name and data must
        # all lie before the central directory.
        if header_offset + LOCAL_SIZE + name_len + csize > cd_start:
            raise OverlapError(
                f"{key}: zip entry {name!r} ({csize} bytes at offset {header_offset}) runs past the "
                f"start of the central directory at {cd_start}",
                path=key,
                first=(header_offset, header_offset + LOCAL_SIZE + name_len + csize),
                second=(cd_start, cd_start + len(raw)),
            )
        entries.append(ZipEntry(key, name, index, method, flags, crc, csize, usize, header_offset, cd_start))
        pos = after
    if pos != len(raw):
        raise BadHeaderError(
            f"{key}: central directory holds {len(raw) - pos} bytes after its {count} stated entries",
            path=key,
            offset=cd_start + pos,
        )
    return entries


def _decode_name(raw: bytes, flags: int) -> str:
    # miniz (torch) compares names as raw bytes and torch writes UTF-8 whatever the flag says,
    # so UTF-8 first; cp437 (the zip default) decodes any byte string.
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("utf-8" if flags & FLAG_UTF8 else "cp437", errors="replace")


def _apply_zip64_extra(
    key: str, name: str, extra: bytes, usize: int, csize: int, offset: int
) -> tuple[int, int, int]:
    """Replace 0xFFFFFFFF fields by the values in the ZIP64 extra field (id 0x0001)."""
    pos = 0
    while pos + 4 <= len(extra):
        field_id, length = struct.unpack_from("<2H", extra, pos)
        body = extra[pos + 4 : pos + 4 + length]
        if field_id == 0x0001:
            values = [v for (v,) in struct.iter_unpack("<Q", body[: len(body) // 8 * 8])]
            needed = [usize == 0xFFFFFFFF, csize == 0xFFFFFFFF, offset == 0xFFFFFFFF]
            if len(values) < sum(needed):
                raise BadHeaderError(
                    f"{key}: zip entry {name!r} has a short ZIP64 extra field", path=key, offset=None
                )
            taken = iter(values)
            usize = next(taken) if needed[0] else usize
            csize = next(taken) if needed[1] else csize
            offset = next(taken) if needed[2] else offset
            break
        pos += 4 + length
    return usize, csize, offset


# --- local headers and record data -------------------------------------------------------


def data_offsets(store: Store, archive: ZipArchive, entries: list[ZipEntry]) -> dict[str, int]:
    """Absolute data offsets of ``entries``, read from their local headers.

    Headers that lie close together are fetched in one ranged read, so an archive of many
    small tensors costs a few requests on an object store rather than one per record.
    """
    pending = sorted(
        (e for e in entries if e.index not in archive._data_offsets), key=lambda e: e.header_offset
    )
    groups: list[list[ZipEntry]] = []
    for entry in pending:
        if groups and entry.header_offset - (groups[-1][-1].header_offset + LOCAL_WINDOW) <= COALESCE_GAP:
            groups[-1].append(entry)
        else:
            groups.append([entry])
    for group in groups:
        start = group[0].header_offset
        end = min(group[-1].data_limit, group[-1].header_offset + LOCAL_WINDOW)
        window = store.get(archive.key, start, end)
        for entry in group:
            offset = _local_data_offset(store, entry, window, start, archive.problems)
            archive._data_offsets[entry.index] = offset
    for entry in entries:
        archive.problems.extend(archive._deferred.pop(entry.index, ()))
    return {entry.name: archive._data_offsets[entry.index] for entry in entries}


def data_offset(store: Store, entry: ZipEntry) -> int:
    """Absolute data offset of one record (one small read of its local header)."""
    window = store.get(
        entry.file, entry.header_offset, min(entry.data_limit, entry.header_offset + LOCAL_WINDOW)
    )
    return _local_data_offset(store, entry, window, entry.header_offset, [])


def _local_data_offset(store: Store, entry: ZipEntry, window: bytes, start: int, problems: list[str]) -> int:
    key, rel = entry.file, entry.header_offset - start
    header = window[rel : rel + LOCAL_SIZE]
    name_len = _local_name_length(entry, header)
    raw_name = window[rel + LOCAL_SIZE : rel + LOCAL_SIZE + name_len]
    if len(raw_name) < name_len:  # a name longer than the window: fetch it on its own
        raw_name = store.get(
            key, entry.header_offset + LOCAL_SIZE, entry.header_offset + LOCAL_SIZE + name_len
        )
    return _checked_data_offset(entry, header, raw_name, problems)


def _local_name_length(entry: ZipEntry, header: bytes) -> int:
    """The name length of the local header ``header`` (its first LOCAL_SIZE bytes), once it is one."""
    if len(header) < LOCAL_SIZE or header[:4] != LOCAL_SIG:
        raise BadHeaderError(
            f"{entry.file}: zip entry {entry.name!r} has no local header at offset {entry.header_offset}",
            path=entry.file,
            offset=entry.header_offset,
        )
    return struct.unpack_from("<H", header, 26)[0]


def _checked_data_offset(entry: ZipEntry, header: bytes, raw_name: bytes, problems: list[str]) -> int:
    """Where the record's data starts, its local header checked against the central directory."""
    key = entry.file
    flags, method, name_len, extra_len = struct.unpack_from("<2x2H16x2H", header, 4)
    if _decode_name(raw_name, flags) != entry.name:
        # CPython zipfile refuses this; miniz uses the central name (CVE-2025-1944).
        problems.append(f"zip entry {entry.name!r}: local header names it {_decode_name(raw_name, flags)!r}")
    if method != entry.method:
        problems.append(
            f"zip entry {entry.name!r}: local header says method {method}, central directory {entry.method}"
        )
    offset = entry.header_offset + LOCAL_SIZE + name_len + extra_len
    if offset + entry.compressed_size > entry.data_limit:
        # The directory's end is not at hand here; its start is where the overlap begins.
        raise FormatError(
            f"{key}: zip entry {entry.name!r}: data ({entry.compressed_size} bytes at offset {offset}) "
            f"runs past the start of the central directory at {entry.data_limit}",
            path=key,
            offset=entry.data_limit,
        )
    return offset


def read_record(store: Store, archive: ZipArchive, entry: ZipEntry, *, max_size: int) -> bytes:
    """The uncompressed bytes of a small record (a pickle, ``byteorder``, ``version``).

    Deflate is accepted here because miniz accepts it for any record; the output is capped at
    ``max_size`` so a small deflated record cannot expand into gigabytes.
    """
    if entry.size > max_size:
        raise LimitExceededError(
            f"{entry.file}: zip entry {entry.name!r} is {entry.size} bytes, over the {max_size} cap",
            path=entry.file,
            offset=entry.header_offset,
            limit=max_size,
            actual=entry.size,
        )
    start = data_offsets(store, archive, [entry])[entry.name]
    raw = archive._kept.get(entry.index)
    if raw is None:
        raw = store.get(entry.file, start, start + entry.compressed_size)
    if entry.method == 0 and entry.compressed_size != entry.size:
        raise BadHeaderError(
            f"{entry.file}: stored zip entry {entry.name!r} has compressed size "
            f"{entry.compressed_size} but size {entry.size}",
            path=entry.file,
            offset=entry.header_offset,
        )
    data = b"".join(_decoded(entry, [raw], limit=max_size))
    if len(data) != entry.size:
        raise FormatError(
            f"{entry.file}: zip entry {entry.name!r} inflates to {len(data)} bytes, "
            f"its header says {entry.size}",
            path=entry.file,
            offset=start,
        )
    return data


def record_crcs(store: Store, archive: ZipArchive) -> dict[int, int | None]:
    """The CRC-32 of every record (by entry index; None for a deflated record that does not
    inflate), each local header and record read once, in offset order, through one stream.

    The stream is read in large pieces and ends where the central directory starts (read
    already), so a remote store reads the archive as one streamed GET per 64 MiB, ahead of the
    CRC, and never past the records. Local headers are checked as :func:`data_offsets` checks them and
    their offsets kept (what is wrong with one is told when a reader asks for its offset), so
    the torch reader that follows reads no header again; small records' bytes are kept too.
    """
    crcs: dict[int, int | None] = {}
    kept = 0
    with store.open_read(archive.key, size=archive.central_directory_offset) as stream:
        cursor = _Cursor(stream)
        for entry in sorted(archive.entries, key=lambda e: e.header_offset):
            header = cursor.read(entry.header_offset, LOCAL_SIZE)
            raw_name = cursor.read(entry.header_offset + LOCAL_SIZE, _local_name_length(entry, header))
            found: list[str] = []
            offset = _checked_data_offset(entry, header, raw_name, found)
            archive._data_offsets[entry.index] = offset
            if found:
                archive._deferred[entry.index] = found
            chunks: Iterable[bytes | memoryview] = cursor.chunks(offset, entry.compressed_size)
            if entry.compressed_size <= KEEP_RECORD and kept + entry.compressed_size <= KEEP_TOTAL:
                raw = b"".join(chunks)
                archive._kept[entry.index] = raw
                kept += len(raw)
                chunks = [raw]
            crcs[entry.index] = _crc(entry, chunks)
    return crcs


class _Cursor:
    """A stream read forward in pieces of STREAM_READ bytes, whatever size its readers ask for:
    a remote stream then streams from its first read. Positions are absolute."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._piece = memoryview(b"")
        self._at = 0  # where the piece starts
        self._next = 0  # where the stream is

    def read(self, pos: int, size: int) -> bytes:
        return b"".join(self.chunks(pos, size))

    def chunks(self, pos: int, size: int) -> Iterator[memoryview]:
        """``size`` bytes from ``pos`` (fewer where the stream ends), as views of the pieces."""
        while size > 0:
            lo = pos - self._at
            if not 0 <= lo < len(self._piece):
                if pos != self._next:  # a gap, or an entry overlapping the last (hostile input)
                    self._stream.seek(pos)
                self._piece = memoryview(self._stream.read(STREAM_READ))
                self._at, self._next = pos, pos + len(self._piece)
                if not self._piece:
                    return  # the file ends early: the CRC cannot match, which is the finding
                continue
            piece = self._piece[lo : lo + size]
            pos += len(piece)
            size -= len(piece)
            yield piece


def _crc(entry: ZipEntry, chunks: Iterable[bytes | memoryview]) -> int | None:
    crc = 0
    try:
        for chunk in _decoded(entry, chunks, limit=None):
            crc = zlib.crc32(chunk, crc)
    except FormatError:
        return None
    return crc


def crc_check(store: Store, entry: ZipEntry) -> bool:
    """Whether the record's bytes match its CRC-32, streaming them in chunks.

    torch never checks zip CRCs (it builds miniz without), so a flipped bit in ``data.pkl`` can
    silently rename a tensor. A zero CRC on non-empty data usually means the writer turned CRCs
    off (``torch.serialization.set_crc32_options(False)``); that returns False too, and callers
    that care can tell the cases apart by ``entry.crc32 == 0``.
    """
    return record_crc(store, entry) == entry.crc32


def record_crc(store: Store, entry: ZipEntry) -> int | None:
    """The CRC-32 of the record's uncompressed bytes, streamed in chunks; None when a deflated
    record does not inflate (it cannot match any CRC then)."""
    start = data_offset(store, entry)
    end = start + entry.compressed_size
    chunks = (store.get(entry.file, pos, min(end, pos + CRC_CHUNK)) for pos in range(start, end, CRC_CHUNK))
    return _crc(entry, chunks)


def _decoded(
    entry: ZipEntry, chunks: Iterable[bytes | memoryview], *, limit: int | None
) -> Iterator[bytes | memoryview]:
    """The record's uncompressed bytes, chunk by chunk, inflating in bounded steps."""
    if entry.method == 0:
        yield from chunks
        return
    if entry.method != 8:
        raise FormatError(f"{entry.file}: zip entry {entry.name!r} uses compression method {entry.method}")
    inflater = zlib.decompressobj(-15)
    produced = 0
    try:
        for chunk in chunks:
            data = chunk
            while data:
                out = inflater.decompress(data, CRC_CHUNK)
                produced += len(out)
                if limit is not None and produced > limit:
                    raise _inflates_past(entry, limit, produced)
                yield out
                data = inflater.unconsumed_tail
        while not inflater.eof and (out := inflater.decompress(b"", CRC_CHUNK)):
            produced += len(out)
            if limit is not None and produced > limit:
                raise _inflates_past(entry, limit, produced)
            yield out
    except zlib.error as exc:
        raise FormatError(f"{entry.file}: zip entry {entry.name!r} does not inflate: {exc}") from None


def _inflates_past(entry: ZipEntry, limit: int, produced: int) -> LimitExceededError:
    return LimitExceededError(
        f"{entry.file}: zip entry {entry.name!r} inflates past {limit} bytes",
        path=entry.file,
        offset=entry.header_offset,
        limit=limit,
        actual=produced,
    )
