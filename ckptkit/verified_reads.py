"""Reading parts of a committed checkpoint's files, checked against the manifest's chunk digests.

A reader that needs only some byte ranges of a file (a rank's slice of a ZeRO partition, one
item of a DCP ``.distcp`` file) should not hash the whole file first, nor trust bytes it did
not check. The manifest records a digest per 64 MiB chunk of every file, so each read checks
exactly the chunks it touches: a flipped bit anywhere in them is a
:class:`~ckptkit.errors.ChecksumMismatchError` naming the file and the chunk's byte range.

Two ways in, for two kinds of reader:

* :meth:`VerifiedFiles.check` hashes chunks from the store, each at most once: for readers that
  read the bytes themselves (the symbolic pickle reader through ranged GETs).
* :meth:`VerifiedFiles.read` returns the bytes it hashed: what is checked is what is used. The
  last chunk read of each file is kept, so neighbouring small reads fetch and hash it once.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping

from ckptkit.errors import ChecksumMismatchError, FormatError
from ckptkit.hashing import chunk_ranges, get_algorithm, hash_range
from ckptkit.manifest import FileEntry
from ckptkit.storage.base import Store


class VerifiedFiles:
    """The files of one committed checkpoint, read where they lie (``files``), checked against
    ``entries`` (manifest entries by key relative to ``files``) in chunks of ``chunk_size``."""

    def __init__(self, files: Store, entries: Mapping[str, FileEntry], chunk_size: int) -> None:
        self.files = files
        self.entries = dict(entries)
        self.chunk_size = chunk_size
        self._verified: set[tuple[str, int]] = set()
        self._last: dict[str, tuple[int, bytes]] = {}  # key -> (chunk index, its checked bytes)
        self._lock = threading.Lock()

    def entry(self, key: str) -> FileEntry:
        entry = self.entries.get(key)
        if entry is None:
            raise FormatError(f"{self.files.url}/{key}: not listed in the checkpoint's manifest", path=key)
        return entry

    def check(self, key: str, ranges: Iterable[tuple[int, int]]) -> None:
        """Check the chunk digests of every chunk of ``key`` that ``ranges`` touch, hashing each
        from the store once per :class:`VerifiedFiles`."""
        entry = self.entry(key)
        bounds = chunk_ranges(entry.size, self.chunk_size)
        wanted = sorted({i for start, end in ranges for i in self._indices(start, end) if i < len(bounds)})
        for index in wanted:
            with self._lock:
                if (key, index) in self._verified:
                    continue
            start, end = bounds[index]
            actual = hash_range(self.files, key, start, end, algorithm=entry.algorithm)
            self._compare(key, entry, index, actual)
            with self._lock:
                self._verified.add((key, index))

    def read(self, key: str, start: int, end: int) -> bytes | bytearray | memoryview:
        """Bytes ``[start, end)`` of ``key``, every chunk they lie in fetched whole and checked.

        A range inside one chunk comes back as a view of that chunk (no copy); a longer one is
        assembled chunk by chunk, so memory holds the range plus one chunk.
        """
        entry = self.entry(key)
        if not 0 <= start <= end <= entry.size:
            raise FormatError(
                f"{self.files.url}/{key}: bytes [{start}, {end}) lie outside the file's "
                f"{entry.size} bytes recorded in the manifest",
                path=key,
                offset=start,
            )
        if start == end:
            return b""
        indices = self._indices(start, end)
        if len(indices) == 1:
            base = indices[0] * self.chunk_size
            return memoryview(self._chunk(key, entry, indices[0]))[start - base : end - base]
        out = bytearray(end - start)
        for index in indices:
            base = index * self.chunk_size
            chunk = memoryview(self._chunk(key, entry, index))
            lo, hi = max(start, base), min(end, base + len(chunk))
            out[lo - start : hi - start] = chunk[lo - base : hi - base]
        return out

    def forget(self) -> None:
        """Drop the chunks kept for neighbouring reads (up to one per file)."""
        with self._lock:
            self._last.clear()

    def _indices(self, start: int, end: int) -> list[int]:
        return list(range(start // self.chunk_size, max(start, end - 1) // self.chunk_size + 1))

    def _chunk(self, key: str, entry: FileEntry, index: int) -> bytes:
        with self._lock:
            kept = self._last.get(key)
        if kept is not None and kept[0] == index:
            return kept[1]
        start, end = chunk_ranges(entry.size, self.chunk_size)[index]
        data = self.files.get(key, start, end)
        hasher = get_algorithm(entry.algorithm).new()
        hasher.update(data)
        self._compare(key, entry, index, hasher.hexdigest())
        with self._lock:
            self._last[key] = (index, data)
            self._verified.add((key, index))
        return data

    def _compare(self, key: str, entry: FileEntry, index: int, actual: str) -> None:
        if index >= len(entry.chunks) or actual != entry.chunks[index]:
            start, end = chunk_ranges(entry.size, self.chunk_size)[index]
            expected = entry.chunks[index] if index < len(entry.chunks) else "(no chunk digest)"
            raise ChecksumMismatchError(f"{self.files.url}/{key}", expected, actual, (start, end))
