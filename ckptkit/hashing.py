"""Streaming, chunked content digests.

A file's digest is made of SHA-256 digests of its fixed-size chunks (64 MiB) plus a root digest
over them, written ``sha256-tree:<hex>``. Chunking lets ``verify`` hash one file on every core
and name the byte range that is wrong, and the digest is computed while the bytes stream out
on save, never by reading the file back. SHA-256 rather than CRC-32: it runs at 1.5 GB/s per
core here (0.7-1.5 GB/s under load; hashed on every core it keeps up with the disk, see
docs/performance.md) and also catches deliberate tampering, which a CRC does not.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from ckptkit.storage.base import Store

CHUNK_SIZE = 64 << 20
ALGORITHM = "sha256-tree"
_READ_BLOCK = 8 << 20


@dataclass(frozen=True)
class FileDigest:
    """The digest of one file: its root value and the per-chunk SHA-256 hex digests."""

    size: int
    digest: str
    chunks: tuple[str, ...]
    chunk_size: int = CHUNK_SIZE


def root_digest(chunk_hexes: Iterable[str]) -> str:
    """``sha256-tree:`` + SHA-256 over the concatenated raw chunk digests."""
    root = hashlib.sha256()
    for hex_digest in chunk_hexes:
        root.update(bytes.fromhex(hex_digest))
    return f"{ALGORITHM}:{root.hexdigest()}"


_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def _forget_pool_after_fork() -> None:
    # A forked child inherits the executor object but none of its threads: work submitted to it
    # would wait forever. The child makes its own pool on first use.
    global _pool, _pool_lock
    _pool = None
    _pool_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_pool_after_fork)


def hashing_pool() -> ThreadPoolExecutor:
    """One process-wide pool, a thread per core: hashlib releases the GIL on large buffers."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="ckptkit-hash")
        return _pool


def _sha256_of(pieces: list[memoryview]) -> str:
    hasher = hashlib.sha256()
    for piece in pieces:
        hasher.update(piece)
    return hasher.hexdigest()


class _ChunkedDigest:
    """Cuts a byte stream into ``chunk_size`` chunks; subclasses decide how a chunk is hashed."""

    def __init__(self, chunk_size: int = CHUNK_SIZE) -> None:
        self.chunk_size = chunk_size
        self.size = 0
        self._filled = 0
        self._sealed = 0

    def update(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        while view:
            take = min(len(view), self.chunk_size - self._filled)
            self._add(view[:take])
            self._filled += take
            self.size += take
            view = view[take:]
            if self._filled == self.chunk_size:
                self._seal()

    def tee(self, chunks: Iterable[bytes | bytearray | memoryview]) -> Iterator[memoryview]:
        """Pass ``chunks`` through unchanged while hashing them."""
        for chunk in chunks:
            view = memoryview(chunk)
            self.update(view)
            yield view

    def result(self) -> FileDigest:
        if self._filled or not self._sealed:  # the tail chunk, or the one chunk of an empty file
            self._seal()
        chunks = self._chunk_hexes()
        return FileDigest(self.size, root_digest(chunks), chunks, self.chunk_size)

    def _seal(self) -> None:
        self._seal_chunk()
        self._filled = 0
        self._sealed += 1

    def _add(self, piece: memoryview) -> None:
        raise NotImplementedError

    def _seal_chunk(self) -> None:
        raise NotImplementedError

    def _chunk_hexes(self) -> tuple[str, ...]:
        raise NotImplementedError


class StreamingDigest(_ChunkedDigest):
    """Feed bytes in any pieces; get the chunked digest without a second pass.

    Each completed chunk is hashed on :func:`hashing_pool` while the caller goes on writing, so
    one large file is hashed on every core instead of one. The pieces are referenced, not
    copied: the caller must leave the buffers unchanged until :meth:`result` returns.
    """

    def __init__(self, chunk_size: int = CHUNK_SIZE) -> None:
        super().__init__(chunk_size)
        self._chunks: list[Future[str]] = []
        self._pieces: list[memoryview] = []

    def _add(self, piece: memoryview) -> None:
        self._pieces.append(piece)

    def _seal_chunk(self) -> None:
        self._chunks.append(hashing_pool().submit(_sha256_of, self._pieces))
        self._pieces = []

    def _chunk_hexes(self) -> tuple[str, ...]:
        return tuple(future.result() for future in self._chunks)


class IncrementalDigest(_ChunkedDigest):
    """The same digest as :class:`StreamingDigest`, hashed in the caller's thread as bytes arrive.

    It keeps no reference to the buffers, so a copy that streams many files at once holds one
    read block per file instead of up to a 64 MiB chunk each (``sync``'s bounded memory).
    """

    def __init__(self, chunk_size: int = CHUNK_SIZE) -> None:
        super().__init__(chunk_size)
        self._chunks: list[str] = []
        self._current = hashlib.sha256()

    def _add(self, piece: memoryview) -> None:
        self._current.update(piece)

    def _seal_chunk(self) -> None:
        self._chunks.append(self._current.hexdigest())
        self._current = hashlib.sha256()

    def _chunk_hexes(self) -> tuple[str, ...]:
        return tuple(self._chunks)


def digest_bytes(data: bytes) -> FileDigest:
    hasher = StreamingDigest()
    hasher.update(data)
    return hasher.result()


def chunk_ranges(size: int, chunk_size: int = CHUNK_SIZE) -> list[tuple[int, int]]:
    """The ``[start, end)`` byte ranges of each chunk of a file of ``size`` bytes."""
    if size == 0:
        return [(0, 0)]
    return [(start, min(start + chunk_size, size)) for start in range(0, size, chunk_size)]


def hash_range(
    store: Store, key: str, start: int, end: int, *, on_bytes: Callable[[int], None] | None = None
) -> str:
    """SHA-256 hex of bytes ``[start, end)`` of ``key``, streamed in bounded blocks; ``on_bytes``
    hears of each block hashed, so a progress display moves within a 64 MiB chunk."""
    hasher = hashlib.sha256()
    with store.open_read(key) as f:
        f.seek(start)
        remaining = end - start
        while remaining > 0:
            block = f.read(min(_READ_BLOCK, remaining))
            if not block:
                break  # short file: the digest will not match, which is the finding
            hasher.update(block)
            remaining -= len(block)
            if on_bytes is not None:
                on_bytes(len(block))
    return hasher.hexdigest()


def digest_object(
    store: Store,
    key: str,
    size: int,
    pool: ThreadPoolExecutor,
    *,
    on_bytes: Callable[[int], None] | None = None,
) -> FileDigest:
    """Digest an existing object, its chunks hashed in parallel on ``pool``."""
    ranges = chunk_ranges(size)
    hexes = list(pool.map(lambda r: hash_range(store, key, *r, on_bytes=on_bytes), ranges))
    return FileDigest(size, root_digest(hexes), tuple(hexes))
