"""A read-only view of a store that remembers small reads and the sizes a listing gave.

Checking one file means several readers in turn: sniffing reads its first and last 4 KiB, the
zip reader its end records and central directory, the torch reader both again. On an object
store each of those is a round trip, and each ``head`` another. Through this view each small
range is fetched once (later reads inside it are cut from memory) and a size the caller already
has (from the listing) answers ``head`` without a request. A small remote read fetches at least
:data:`WIDEN` bytes: the round trip costs the same (on moto a GET of a large object costs
~0.2 s whatever its range), and the zip directory behind sniffing's last 4 KiB, or the pickle
behind its first, then come from memory. A small read of an object's start fetches its end in
the same call, concurrently: sniffing asks for the tail next.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

from ckptkit.storage.base import ObjectInfo, ReadOnlyStore, Store, normalize_key

SMALL_READ = 1 << 20  # reads up to this size are kept ...
CACHE_BYTES = 16 << 20  # ... up to this much in all, the oldest dropped first
WIDEN = 64 << 10  # what a small remote read of an object of known size fetches at least


class ReadCache(ReadOnlyStore):
    """``store`` seen read-only, its small ranged reads kept; ``sizes`` answer ``head``."""

    def __init__(self, store: Store, sizes: Mapping[str, int] | None = None) -> None:
        self._store = store
        self._sizes = dict(sizes or {})
        self._kept: dict[str, list[tuple[int, bytes]]] = {}
        self._order: deque[tuple[str, int, bytes]] = deque()
        self._held = 0

    @property
    def url(self) -> str:
        return self._store.url

    def child(self, prefix: str) -> Store:
        below = f"{normalize_key(prefix)}/"
        sizes = {k[len(below) :]: v for k, v in self._sizes.items() if k.startswith(below)}
        return ReadCache(self._store.child(prefix), sizes)

    def local_path(self, key: str) -> Path | None:
        return self._store.local_path(key)

    # --- reads ---------------------------------------------------------------------------

    def get(self, key: str, start: int | None = None, end: int | None = None) -> bytes:
        if start is None or end is None:
            return self._store.get(key, start, end)
        kept = self._lookup(key, start, end)
        if kept is not None:
            return kept
        lo, hi = self._widened(key, start, end)
        if (lo, hi) == (start, end):
            data = self._store.get(key, start, end)
            self._keep(key, start, data)
            return data
        ranges = [(lo, hi)]
        size = self._sizes[normalize_key(key)]
        if lo == 0 and self._lookup(key, size - 1, size) is None and max(hi, size - WIDEN) < size:
            ranges.append((max(hi, size - WIDEN), size))
        fetched = self._store.read_ranges(key, ranges)
        for (at, _), piece in zip(ranges, fetched, strict=True):
            self._keep(key, at, piece)
        return fetched[0][start - lo : end - lo]

    def _widened(self, key: str, start: int, end: int) -> tuple[int, int]:
        """``[start, end)`` grown to WIDEN bytes inside the object, where it is small, remote and
        of a known size; towards the end, the window is the object's last WIDEN bytes."""
        size = self._sizes.get(normalize_key(key))
        if size is None or not 0 <= start < end <= size or end - start >= WIDEN:
            return start, end
        if self._store.local_path(key) is not None:
            return start, end  # a local read costs what it reads
        hi = min(size, start + WIDEN)
        return max(0, hi - WIDEN), hi

    def read_ranges(self, key: str, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        found = [self._lookup(key, start, end) for start, end in ranges]
        missing = [i for i, data in enumerate(found) if data is None]
        if missing or not ranges:
            fetched = self._store.read_ranges(key, [ranges[i] for i in missing])
            for i, data in zip(missing, fetched, strict=True):
                found[i] = data
                self._keep(key, ranges[i][0], data)
        return [data if data is not None else b"" for data in found]

    def open_read(self, key: str, *, size: int | None = None) -> BinaryIO:
        return self._store.open_read(key, size=size if size is not None else self._sizes.get(key))

    def head(self, key: str) -> ObjectInfo:
        size = self._sizes.get(normalize_key(key))
        if size is not None:
            return ObjectInfo(key, size)
        info = self._store.head(key)
        self._sizes[key] = info.size
        return info

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        return self._store.list(prefix)

    def list_dirs(self, prefix: str = "") -> list[str]:
        return self._store.list_dirs(prefix)

    def _lookup(self, key: str, start: int, end: int) -> bytes | None:
        if end <= start:
            return None  # the store says whether the key exists
        for at, data in self._kept.get(key, ()):
            if at <= start and end <= at + len(data):
                return data[start - at : end - at]
        return None

    def _keep(self, key: str, start: int, data: bytes) -> None:
        if not 0 < len(data) <= SMALL_READ:
            return
        self._kept.setdefault(key, []).append((start, data))
        self._order.append((key, start, data))
        self._held += len(data)
        while self._held > CACHE_BYTES:
            old_key, old_start, old = self._order.popleft()
            self._kept[old_key].remove((old_start, old))
            self._held -= len(old)

