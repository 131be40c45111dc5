"""Files written by ``torch.save``, read without torch and without running their pickles.

Three containers (formats.md §2, §5): the zip archive (``<prefix>/data.pkl`` plus one record per
storage), the legacy stacked pickles (magic, protocol, sys_info, the object, the storage keys,
then raw storages each behind an 8-byte element count), and a bare pickle. The object pickle
goes through the symbolic interpreter; each storage it names is resolved to where its bytes
are in the file (record, absolute offset, size) by reading headers only. Every storage and
tensor is checked against what the container really holds (§3.3) and each disagreement becomes
a ``problem``; input too broken to describe raises :class:`FormatError`.
"""

from __future__ import annotations

import zlib
from dataclasses import replace
from typing import Any

from ckptkit.errors import FormatError, LimitExceededError
from ckptkit.formats import zipfile_reader as zr
from ckptkit.formats.dtypes import torch_itemsize
from ckptkit.formats.legacy import read_legacy
from ckptkit.formats.sniff import detect
from ckptkit.formats.torchfile_types import TorchFile
from ckptkit.formats.tree import check_tensor, walk_tensors
from ckptkit.pickle import Limits, load_symbolic, storage_ref_from_pid
from ckptkit.pickle.values import StorageRef, TensorRef
from ckptkit.storage.base import Store

MAX_PICKLE_BYTES = 1 << 30  # the object pickle is read whole; tensors live elsewhere
MAX_SMALL_RECORD = 4096  # byteorder, version, ...


def read_torch_file(
    store: Store, key: str, *, limits: Limits | None = None, archive: zr.ZipArchive | None = None
) -> TorchFile:
    """Read a ``torch.save`` file (zip, legacy, or bare pickle) chosen by its content.

    ``archive``: the file's zip directory where the caller read it already (structural verify
    streamed its records for their CRCs), so nothing is read twice.
    """
    limits = limits or Limits()
    if archive is not None:
        return _read_zip(store, key, limits, archive)
    found = detect(store, key)
    if found.kind == "torch-zip":
        return _read_zip(store, key, limits, zr.read_zip(store, key))
    if found.kind == "torch-legacy":
        return read_legacy(store, key, limits)
    if found.kind in ("pickle", "dcp-metadata"):
        return read_bare_pickle(store, key, limits)
    if found.bad:
        raise FormatError(found.detail)
    raise FormatError(f"{found.detail}: not a torch.save file")


def top_level_tensors(torch_file: TorchFile) -> dict[str, TensorRef]:
    """The tensors of a flat state dict (``{name: tensor}``), as HF ``.bin`` shards are."""
    value = torch_file.value
    if not isinstance(value, dict):
        return {}
    return {k: v for k, v in value.items() if isinstance(k, str) and isinstance(v, TensorRef)}


# --- zip ------------------------------------------------------------------------------------


def _read_zip(store: Store, key: str, limits: Limits, archive: zr.ZipArchive) -> TorchFile:
    problems = archive.problems
    prefix = _record_prefix(key, archive, problems)
    pickle_entry = archive.get(f"{prefix}/data.pkl")
    if pickle_entry is None:
        raise FormatError(f"{key}: zip archive has no {prefix}/data.pkl: not a torch.save file")
    if archive.get(f"{prefix}/constants.pkl") is not None:
        problems.append("a TorchScript archive: loading it with torch.jit.load runs its code")
    byteorder = _small_text(store, archive, f"{prefix}/byteorder", problems) or "little"
    if byteorder != "little":
        problems.append(
            f"byteorder is {byteorder!r}: storages are not little-endian, "
            "and ckptkit reads little-endian data"
        )
    data = zr.read_record(store, archive, pickle_entry, max_size=MAX_PICKLE_BYTES)
    _check_crc(f"{prefix}/data.pkl", pickle_entry, data, problems)
    resolver = _ZipStorages(store, archive, prefix, problems)
    result = load_symbolic(data, persistent_load=resolver, limits=limits, pickle_name=f"{prefix}/data.pkl")
    if result.size < len(data):
        problems.append(f"{len(data) - result.size} bytes follow the STOP opcode of {prefix}/data.pkl")
    tensors = walk_tensors(result.value)
    for path, tensor in tensors:
        problems.extend(check_tensor(path, tensor))
    small = (pickle_entry, archive.get(f"{prefix}/byteorder"))
    return TorchFile(
        key,
        "zip",
        result.value,
        result.globals,
        tensors,
        resolver.resolved,
        problems,
        protocol=result.protocol,
        record_prefix=prefix,
        prefix_offset=archive.prefix_offset,
        byteorder=byteorder,
        archive=archive,
        crc_checked=frozenset(entry.name for entry in small if entry is not None),
    )


def _record_prefix(key: str, archive: zr.ZipArchive, problems: list[str]) -> str:
    # torch takes the prefix from the first central-directory name, up to its first "/".
    if not archive.entries:
        raise FormatError(f"{key}: empty zip archive")
    first = archive.entries[0].name
    if "/" not in first:
        raise FormatError(f"{key}: zip entry {first!r} is not in a subdirectory, as torch.save writes them")
    prefix = first.split("/", 1)[0]
    outside = [e.name for e in archive.entries if not e.name.startswith(prefix + "/")]
    if outside:
        problems.append(f"{len(outside)} zip entries lie outside {prefix}/, e.g. {outside[0]!r}")
    pickles = [e.name for e in archive.entries if e.name.endswith("/data.pkl")]
    if len(pickles) > 1:
        problems.append(
            f"{len(pickles)} data.pkl records ({', '.join(map(repr, pickles))}): only the first is read"
        )
    return prefix


def _small_text(store: Store, archive: zr.ZipArchive, name: str, problems: list[str]) -> str | None:
    entry = archive.get(name)
    if entry is None:
        return None  # older torch writes no byteorder record; torch then assumes little
    data = zr.read_record(store, archive, entry, max_size=MAX_SMALL_RECORD)
    _check_crc(name, entry, data, problems)
    return data.decode("utf-8", "replace").strip()


def _check_crc(name: str, entry: zr.ZipEntry, data: bytes, problems: list[str]) -> None:
    # The bytes are in hand already, so the CRC torch never checks costs nothing here. Zero
    # means the writer skipped CRCs (legitimate), not a mismatch.
    if entry.crc32 and zlib.crc32(data) != entry.crc32:
        problems.append(f"{name} fails its CRC-32 check: it was altered after it was written")


class _ZipStorages:
    """``persistent_load`` for zip pickles: each storage id, resolved to its ``data/<key>`` record."""

    def __init__(self, store: Store, archive: zr.ZipArchive, prefix: str, problems: list[str]) -> None:
        self.archive, self.prefix, self.problems = archive, prefix, problems
        self.resolved: dict[str, StorageRef] = {}
        records = [e for e in archive.entries if e.name.startswith(f"{prefix}/data/")]
        # All local headers at once, in a few coalesced reads, before the pickle runs.
        self.offsets = zr.data_offsets(store, archive, records)

    def __call__(self, pid: Any) -> StorageRef:
        ref = storage_ref_from_pid(pid)
        known = self.resolved.get(ref.key)
        if known is not None:
            if known.dtype != ref.dtype:
                self.problems.append(f"storage {ref.key!r} is used as {known.dtype} and as {ref.dtype}")
            elif known.numel != ref.numel:
                self.problems.append(
                    f"storage {ref.key!r} is declared with {known.numel} and {ref.numel} elements"
                )
            return replace(known, dtype=ref.dtype, numel=ref.numel)
        resolved = self._resolve(ref)
        self.resolved[ref.key] = resolved
        return resolved

    def _resolve(self, ref: StorageRef) -> StorageRef:
        key = ref.key
        if not key or "/" in key or "\\" in key or key in (".", ".."):
            self.problems.append(f"storage key {key!r} is not a plain record name")
            return ref
        name = f"{self.prefix}/data/{key}"
        entry = self.archive.get(name)
        if entry is None:
            self.problems.append(f"storage {key!r}: record {name} is missing")
            return ref
        itemsize = torch_itemsize(ref.dtype) or 1
        if entry.size != ref.numel * itemsize:
            self.problems.append(
                f"storage {key!r}: record {name} holds {entry.size} bytes, but the pickle declares "
                f"{ref.numel} × {ref.dtype} = {ref.numel * itemsize} bytes"
            )
        if entry.method != 0:
            self.problems.append(f"storage {key!r}: record {name} is compressed (method {entry.method})")
            return replace(ref, record=name, nbytes=entry.size)
        if entry.compressed_size != entry.size:
            # A stored record's two sizes must agree; only compressed_size was bounds-checked.
            self.problems.append(
                f"storage {key!r}: stored record {name} says {entry.size} bytes, "
                f"but {entry.compressed_size} are stored"
            )
        nbytes = min(entry.size, entry.compressed_size)
        return replace(ref, record=name, byte_offset=self.offsets[name], nbytes=nbytes)


# --- bare pickle ------------------------------------------------------------------------------


def read_bare_pickle(store: Store, key: str, limits: Limits) -> TorchFile:
    """A file that is one pickle (``pickle.dump``, DCP ``.metadata``): no storages to resolve."""
    size = store.head(key).size
    if size > MAX_PICKLE_BYTES:
        raise LimitExceededError(
            f"{key}: pickle of {size} bytes exceeds the {MAX_PICKLE_BYTES} byte cap",
            path=key,
            offset=0,
            limit=MAX_PICKLE_BYTES,
            actual=size,
        )
    data = store.get(key)
    result = load_symbolic(data, limits=limits, pickle_name=key)
    problems = []
    if result.size < len(data):
        problems.append(f"{len(data) - result.size} bytes follow the pickle's STOP opcode")
    tensors = walk_tensors(result.value)
    return TorchFile(
        key, "pickle", result.value, result.globals, tensors, {}, problems, protocol=result.protocol
    )
