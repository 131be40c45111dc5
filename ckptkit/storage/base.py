"""The Store contract: a flat key → bytes store with declared capabilities.

Keys are ``/``-separated and relative to the store's root. Implementations translate backend
exceptions into ckptkit errors once, at the adapter, so code above this layer never sees a
botocore or OSError detail it would have to interpret.
"""

from __future__ import annotations

import abc
import posixpath
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

from ckptkit.errors import InvalidURLError, ReadOnlyStoreError

WriteMode = Literal["overwrite", "create"]
Chunks = Iterable["bytes | bytearray | memoryview"]


@dataclass(frozen=True)
class StoreCapabilities:
    """What a store guarantees, declared up front so callers choose a protocol without probing.

    atomic_rename: a whole prefix ("directory") can be renamed atomically (POSIX rename).
    conditional_create: ``put(mode="create")`` is atomic against concurrent writers.
    durable_writes: a successful ``put`` survives power loss (fsync or the service's guarantee).
    read_only: every write (``put``, ``delete``, ``delete_prefix``, ``copy``, ``rename_prefix``)
        raises :class:`~ckptkit.errors.ReadOnlyStoreError` and changes nothing.
    hard_links: ``link`` gives an object a second name without copying its bytes (a POSIX hard
        link), so deduplicated files can also lie where tools that bypass manifests look.
    """

    atomic_rename: bool
    conditional_create: bool
    durable_writes: bool
    read_only: bool = False
    hard_links: bool = False


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object: its key relative to the store root, size in bytes, and mtime."""

    key: str
    size: int
    mtime: float | None = None


def normalize_key(key: str) -> str:
    """Validate a store key: relative, ``/``-separated, no empty, ``.`` or ``..`` parts."""
    if not key or key.startswith("/") or "\\" in key or "\x00" in key:
        raise InvalidURLError(f"invalid store key {key!r}")
    parts = key.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise InvalidURLError(f"invalid store key {key!r}")
    return key


def join_key(*parts: str) -> str:
    """Join key fragments with ``/``, dropping empty fragments."""
    return posixpath.join(*[p.strip("/") for p in parts if p.strip("/")]) if parts else ""


class Store(abc.ABC):
    """A flat key → bytes store rooted at ``url``."""

    capabilities: StoreCapabilities

    @property
    @abc.abstractmethod
    def url(self) -> str:
        """The URL of the store root, usable with :func:`ckptkit.open_store`."""

    @abc.abstractmethod
    def child(self, prefix: str) -> Store:
        """A store rooted at ``prefix`` below this one, sharing the same backend connection."""

    # --- reads ---------------------------------------------------------------------------

    @abc.abstractmethod
    def get(self, key: str, start: int | None = None, end: int | None = None) -> bytes:
        """Bytes ``[start, end)`` of ``key`` (the whole object by default)."""

    @abc.abstractmethod
    def open_read(self, key: str, *, size: int | None = None) -> BinaryIO:
        """A streaming, seekable binary reader of ``key``.

        ``size`` is the object's size where the caller knows it (a listing, a manifest), or the
        end of the range it will read (hashing one chunk passes the chunk's end): a remote store
        then needs no request to learn the size and reads ahead no further. A caller that passes
        it reads no further than it; a remote stream ends early where the object does.
        """

    def read_ranges(self, key: str, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        """The bytes of each ``(start, end)`` of ``key``, as ``get(key, start, end)`` returns them.

        One call for many ranges of one object lets a remote store merge neighbours into one
        request and run requests concurrently (``storage/ranged.py``); this default reads them
        one by one. A missing key is :class:`NotFoundError` as for ``get``.
        """
        return [self.get(key, start, end) for start, end in ranges]

    @abc.abstractmethod
    def head(self, key: str) -> ObjectInfo:
        """Size and mtime of ``key``; :class:`NotFoundError` if absent."""

    def exists(self, key: str) -> bool:
        from ckptkit.errors import NotFoundError

        try:
            self.head(key)
        except NotFoundError:
            return False
        return True

    @abc.abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object whose key starts with ``prefix/`` (or all, for ``""``), recursively."""

    @abc.abstractmethod
    def list_dirs(self, prefix: str = "") -> list[str]:
        """Names of the immediate "subdirectories" of ``prefix`` (common prefixes)."""

    def local_path(self, key: str) -> Path | None:
        """A filesystem path for ``key`` when the store is a local directory, else None."""
        return None

    # --- writes --------------------------------------------------------------------------

    @abc.abstractmethod
    def put(
        self,
        key: str,
        data: bytes | Chunks,
        mode: WriteMode = "overwrite",
        *,
        metadata: Mapping[str, str] | None = None,
    ) -> ObjectInfo:
        """Write ``key`` atomically: readers see the old object or the whole new one.

        ``data`` is bytes or an iterable of buffers, streamed without holding the whole object.
        With ``mode="create"`` an existing key raises :class:`AlreadyExistsError`; this is
        atomic against other writers only where ``capabilities.conditional_create`` holds.
        ``metadata`` is kept with the object where the backend has user metadata (S3
        ``x-amz-meta-*``) and dropped elsewhere; read it back with :meth:`user_metadata`.
        """

    def user_metadata(self, key: str) -> dict[str, str]:
        """The ``metadata`` that ``put`` stored with ``key``; ``{}`` where the store keeps none."""
        self.head(key)  # a missing key is NotFoundError here as everywhere
        return {}

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key``; a missing key is not an error."""

    def delete_prefix(self, prefix: str) -> None:
        """Remove every object below ``prefix``."""
        for info in list(self.list(prefix)):
            self.delete(info.key)

    @abc.abstractmethod
    def copy(self, src: str, dst: str) -> None:
        """Copy one object within the store."""

    def rename_prefix(self, src: str, dst: str) -> None:
        """Atomically move everything below ``src`` to ``dst``; needs ``atomic_rename``.

        Raises :class:`AlreadyExistsError` if ``dst`` already holds objects.
        """
        raise TypeError(f"{type(self).__name__} declares no atomic_rename capability")

    def parent(self) -> Store:
        """The store one level up (``s3://b/run`` for ``s3://b/run/step-1``), with the same
        settings: where a checkpoint finds its root's blob store."""
        raise TypeError(f"{type(self).__name__} has no parent")

    def link(self, src: str, dst: str) -> None:
        """Give object ``src`` the second name ``dst`` without copying it; needs ``hard_links``.

        Raises :class:`AlreadyExistsError` if ``dst`` exists.
        """
        raise TypeError(f"{type(self).__name__} declares no hard_links capability")

    def sync_prefix(self, prefix: str) -> None:  # noqa: B027 - optional hook, no-op by default
        """Make the names below ``prefix`` durable (fsync a directory); a no-op by default."""

    def close(self) -> None:  # noqa: B027 - optional hook, no-op by default
        """Release connections held by the store."""

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


class ReadOnlyStore(Store):
    """A view over another store's objects that refuses every write, as ``read_only`` promises."""

    capabilities = StoreCapabilities(
        atomic_rename=False, conditional_create=False, durable_writes=False, read_only=True
    )

    def put(
        self,
        key: str,
        data: bytes | Chunks,
        mode: WriteMode = "overwrite",
        *,
        metadata: Mapping[str, str] | None = None,
    ) -> ObjectInfo:
        raise ReadOnlyStoreError(self.url, f"put {key!r}")

    def delete(self, key: str) -> None:
        raise ReadOnlyStoreError(self.url, f"delete {key!r}")

    def delete_prefix(self, prefix: str) -> None:
        raise ReadOnlyStoreError(self.url, f"delete_prefix {prefix!r}")

    def copy(self, src: str, dst: str) -> None:
        raise ReadOnlyStoreError(self.url, f"copy {src!r} to {dst!r}")

    def rename_prefix(self, src: str, dst: str) -> None:
        raise ReadOnlyStoreError(self.url, f"rename_prefix {src!r} to {dst!r}")


def iter_chunks(data: bytes | Chunks) -> Iterator[memoryview]:
    """Yield ``data`` as memoryviews, whether it is one buffer or an iterable of them."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        yield memoryview(data)
        return
    for chunk in data:
        yield memoryview(chunk)
