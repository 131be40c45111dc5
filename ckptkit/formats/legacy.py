"""torch's legacy stacked-pickle format (before torch 1.6, or ``_use_new_zipfile_serialization=False``).

Layout (formats.md §5.1): five pickles back to back (magic number, protocol version, sys_info,
the object, the sorted storage keys), then each storage as an 8-byte little-endian element count
followed by its raw bytes, in key order. Nothing says where a storage starts, so we walk the
count headers, reading 8 bytes each (coalesced through a small read-ahead buffer) and never the
data. Persistent ids are 6-tuples ``("storage", type, key, location, numel, view_metadata)``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from ckptkit.errors import BadHeaderError, FormatError
from ckptkit.formats.dtypes import torch_itemsize
from ckptkit.formats.sniff import LEGACY_MAGIC
from ckptkit.formats.torchfile_types import TorchFile
from ckptkit.formats.tree import check_tensor, walk_tensors
from ckptkit.pickle import Limits, PickleFormatError, load_symbolic, storage_ref_from_pid
from ckptkit.pickle.values import StorageRef
from ckptkit.storage.base import Store

PROTOCOL_VERSION = 1001
FIRST_WINDOW = 1 << 20  # most legacy pickles fit; the window grows 4x until the pickles parse
MAX_PICKLES_BYTES = 1 << 30
HEADER_READAHEAD = 64 << 10


@dataclass(frozen=True)
class _View:
    root: str
    offset: int  # elements of the root storage
    numel: int


class _Prefix:
    """The file's first bytes, fetched in growing windows so a big storage section is never read."""

    def __init__(self, store: Store, key: str, size: int) -> None:
        self.store, self.key, self.size = store, key, size
        self.data = store.get(key, 0, min(size, FIRST_WINDOW))

    def grow(self) -> bool:
        if len(self.data) >= min(self.size, MAX_PICKLES_BYTES):
            return False
        end = min(self.size, MAX_PICKLES_BYTES, len(self.data) * 4)
        self.data += self.store.get(self.key, len(self.data), end)
        return True


def read_legacy(store: Store, key: str, limits: Limits) -> TorchFile:
    size = store.head(key).size
    prefix = _Prefix(store, key, size)
    problems: list[str] = []

    magic, version_at, _ = _pickle(prefix, 0, limits, key, "magic number")
    if magic.value != LEGACY_MAGIC:
        raise BadHeaderError(f"{key}: invalid legacy magic number; corrupt file?", path=key, offset=0)
    version, pos, _ = _pickle(prefix, version_at, limits, key, "protocol version")
    if version.value != PROTOCOL_VERSION:
        raise BadHeaderError(
            f"{key}: legacy protocol version {version.value!r}, expected {PROTOCOL_VERSION}",
            path=key,
            offset=version_at,
        )
    sys_info, pos, _ = _pickle(prefix, pos, limits, key, "sys_info")
    if isinstance(sys_info.value, dict) and sys_info.value.get("little_endian") is False:
        problems.append("written on a big-endian machine: storages are big-endian")

    # Pass 1 learns the storages the object names; their places are known only after the
    # key list that follows it, so pass 2 re-reads the object with resolved storages.
    collector = _Collector(key, problems)
    main_start = pos
    _, pos, main_bytes = _pickle(prefix, pos, limits, key, "object", collector)
    keys, pos, _ = _pickle(prefix, pos, limits, key, "storage keys")
    if not (isinstance(keys.value, list) and all(type(k) is str for k in keys.value)):
        raise FormatError(f"{key}: legacy storage key list is not a list of strings")
    resolved = _locate_storages(store, key, size, pos, keys.value, collector, problems)
    resolver = _Resolver(key, resolved)
    result = load_symbolic(
        main_bytes, persistent_load=resolver, limits=limits, pickle_name=f"{key}:object", start=main_start
    )
    tensors = walk_tensors(result.value)
    for path, tensor in tensors:
        problems.extend(check_tensor(path, tensor))
    return TorchFile(
        key, "legacy", result.value, result.globals, tensors, resolved, problems, protocol=result.protocol
    )


def _pickle(
    prefix: _Prefix, start: int, limits: Limits, key: str, what: str, persistent_load: Any = None
) -> tuple[Any, int, bytes]:
    """One pickle at ``start``; the window grows until it parses or the file ends."""
    while True:
        try:
            result = load_symbolic(
                prefix.data,
                persistent_load=persistent_load,
                limits=limits,
                pickle_name=f"{key}:{what}",
                start=start,
            )
            return result, start + result.size, prefix.data
        except PickleFormatError as exc:
            if not prefix.grow():
                # Still a PickleFormatError: the globals read before (and past) the fault are the
                # findings of a scan, a payload behind a broken or limit-tripping pickle included.
                raise PickleFormatError(
                    f"{key}: legacy {what} pickle at offset {start}: {exc}",
                    offset=exc.offset,
                    pickle_name=exc.pickle_name,
                    globals=exc.globals,
                ) from None


def _legacy_ref(key: str, pid: Any) -> tuple[StorageRef, _View | None]:
    """The storage a legacy id names; a view comes back under its own key, sized as the view."""
    if not (type(pid) is tuple and len(pid) == 6 and pid[5] is not None):
        return storage_ref_from_pid(pid), None
    ref = storage_ref_from_pid(pid[:5])
    view = pid[5]
    # (view_key, offset, size): old torch's storage views, slices of the root in elements.
    if not (
        type(view) is tuple
        and len(view) == 3
        and type(view[0]) is str
        and all(type(n) is int and n >= 0 for n in view[1:])
    ):
        raise FormatError(f"{key}: malformed storage view metadata in a persistent id")
    view_key, offset, numel = view
    return replace(ref, key=view_key, numel=numel), _View(ref.key, offset, numel)


class _Collector:
    """Pass-1 ``persistent_load``: remembers each storage's dtype and element count."""

    def __init__(self, key: str, problems: list[str]) -> None:
        self.key, self.problems = key, problems
        self.roots: dict[str, StorageRef] = {}
        self.views: dict[str, _View] = {}

    def __call__(self, pid: Any) -> StorageRef:
        ref, view = _legacy_ref(self.key, pid)
        root = replace(ref, key=view.root, numel=pid[4]) if view else ref
        known = self.roots.setdefault(root.key, root)
        if known.dtype != root.dtype:
            self.problems.append(f"storage {root.key!r} is used as {known.dtype} and as {root.dtype}")
        if view is not None:
            self.views.setdefault(ref.key, view)
        return ref


class _Resolver:
    """Pass-2 ``persistent_load``: the same ids, now answered with located storages."""

    def __init__(self, key: str, resolved: dict[str, StorageRef]) -> None:
        self.key, self.resolved = key, resolved

    def __call__(self, pid: Any) -> StorageRef:
        ref, _ = _legacy_ref(self.key, pid)
        return self.resolved.get(ref.key, ref)


def _locate_storages(
    store: Store, key: str, size: int, pos: int, keys: list[str], collector: _Collector, problems: list[str]
) -> dict[str, StorageRef]:
    resolved: dict[str, StorageRef] = {}
    reader = _HeaderReader(store, key, size)
    for storage_key in keys:
        ref = collector.roots.get(storage_key)
        if ref is None:
            problems.append(
                f"storage {storage_key!r} is in the key list but not in the object; the "
                "storages after it cannot be located"
            )
            break
        count = reader.u64(pos)
        if count is None:
            problems.append(f"storage {storage_key!r}: the file ends before its header at offset {pos}")
            break
        itemsize = torch_itemsize(ref.dtype) or 1
        nbytes = count * itemsize
        if count != ref.numel:
            problems.append(
                f"storage {storage_key!r}: the file holds {count} elements, the pickle declares {ref.numel}"
            )
        if pos + 8 + nbytes > size:
            problems.append(
                f"storage {storage_key!r}: {nbytes} bytes at offset {pos + 8} run past the end of the file"
            )
            break
        resolved[storage_key] = replace(ref, record=storage_key, byte_offset=pos + 8, nbytes=nbytes)
        pos += 8 + nbytes
    else:
        if pos < size:
            problems.append(f"{size - pos} bytes follow the last storage")
    for name in sorted(set(collector.roots) - set(keys)):
        problems.append(f"storage {name!r} is named by the object but missing from the key list")
    for view_key, view in collector.views.items():
        root = resolved.get(view.root)
        if root is None:
            continue
        itemsize = torch_itemsize(root.dtype) or 1
        if view.offset + view.numel > root.numel:
            problems.append(f"storage view {view_key!r} reaches past storage {view.root!r}")
        resolved[view_key] = replace(
            root,
            key=view_key,
            numel=view.numel,
            byte_offset=(root.byte_offset or 0) + view.offset * itemsize,
            nbytes=view.numel * itemsize,
        )
    return resolved


class _HeaderReader:
    """8-byte reads at increasing offsets, served from 64 KiB read-ahead windows."""

    def __init__(self, store: Store, key: str, size: int) -> None:
        self.store, self.key, self.size = store, key, size
        self.start, self.window = 0, b""

    def u64(self, pos: int) -> int | None:
        if pos + 8 > self.size:
            return None
        if not (self.start <= pos and pos + 8 <= self.start + len(self.window)):
            self.start, self.window = (
                pos,
                self.store.get(self.key, pos, min(self.size, pos + HEADER_READAHEAD)),
            )
        offset = pos - self.start
        return int.from_bytes(self.window[offset : offset + 8], "little")
