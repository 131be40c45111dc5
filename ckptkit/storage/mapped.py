"""A read-only store whose keys name objects that lie elsewhere: a deduplicated checkpoint's files.

A checkpoint whose files are partly in its root's blob store is still read by its files' own
names: :class:`MappedStore` answers for each name from the object it maps to, so every reader
that takes a Store (load, verify, inspect, convert, the integrations) reads it unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO, NamedTuple

from ckptkit.errors import NotFoundError
from ckptkit.storage.base import ObjectInfo, ReadOnlyStore, Store, normalize_key


class Located(NamedTuple):
    """Where a name's bytes lie: ``key`` in ``store``, ``size`` bytes long."""

    store: Store
    key: str
    size: int


class MappedStore(ReadOnlyStore):
    """``objects`` maps each key of this store to where its bytes lie; ``url`` names the view."""

    def __init__(self, url: str, objects: Mapping[str, Located]) -> None:
        self._url = url.rstrip("/")
        self._objects = dict(objects)

    @property
    def url(self) -> str:
        return self._url

    def child(self, prefix: str) -> MappedStore:
        below = f"{normalize_key(prefix)}/"
        objects = {k[len(below) :]: v for k, v in self._objects.items() if k.startswith(below)}
        return MappedStore(f"{self._url}/{prefix}", objects)

    def _find(self, key: str) -> Located:
        try:
            return self._objects[normalize_key(key)]
        except KeyError:
            raise NotFoundError(f"{self._url}/{key}: no such file in this checkpoint") from None

    def get(self, key: str, start: int | None = None, end: int | None = None) -> bytes:
        found = self._find(key)
        return found.store.get(found.key, start, end)

    def open_read(self, key: str, *, size: int | None = None) -> BinaryIO:
        found = self._find(key)
        return found.store.open_read(found.key, size=found.size if size is None else size)

    def read_ranges(self, key: str, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        found = self._find(key)
        return found.store.read_ranges(found.key, ranges)

    def head(self, key: str) -> ObjectInfo:
        found = self._find(key)
        info = found.store.head(found.key)  # the object must exist, not just be listed
        return ObjectInfo(key, info.size, info.mtime)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        below = f"{normalize_key(prefix)}/" if prefix else ""
        for key in sorted(self._objects):
            if key.startswith(below):
                yield ObjectInfo(key, self._objects[key].size)

    def list_dirs(self, prefix: str = "") -> list[str]:
        below = f"{normalize_key(prefix)}/" if prefix else ""
        rests = [key[len(below) :] for key in self._objects if key.startswith(below)]
        return sorted({rest.split("/", 1)[0] for rest in rests if "/" in rest})

    def local_path(self, key: str) -> Path | None:
        found = self._objects.get(key)
        return found.store.local_path(found.key) if found is not None else None

    def where(self, key: str) -> str:
        """The URL of the object ``key`` maps to (for messages)."""
        found = self._find(key)
        return f"{found.store.url}/{found.key}"
