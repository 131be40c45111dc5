"""``ckptkit scan``: every global every pickle in a file or directory names, and what it is.

Files are chosen by content (:func:`ckptkit.formats.sniff.detect`), never by name, and every
place a pickle can hide is read symbolically: a torch zip's ``data.pkl`` and any other pickle
member, legacy stacked pickles, bare and concatenated pickles, DCP ``.metadata``, pickles inside
other zips and tars, object-dtype ``.npy`` arrays. Files of other kinds are still probed from
byte 0, because that is where ``pickle.load`` would start on them (a polyglot, or a pickle whose
tail was broken on purpose so the sniffer no longer calls it one). Nothing is imported or run.

The verdict follows ``safe-loading.md`` §4: anything ``unknown`` or ``dangerous``, a pickle
hidden behind a pickle-free name (``model.safetensors``), or TorchScript code is ``unsafe``
(exit 3); a pickle that could not be read to its end is ``incomplete`` (exit 1), never clean.
"""

from __future__ import annotations

import os
import posixpath
import tarfile
from dataclasses import dataclass, field
from typing import Any

from ckptkit.catalog import read_manifest
from ckptkit.commit import files_of
from ckptkit.errors import (
    EXIT_FINDINGS,
    EXIT_OK,
    EXIT_UNSAFE,
    FormatError,
    ManifestError,
    NotCommittedError,
    NotFoundError,
)
from ckptkit.formats import zipfile_reader as zr
from ckptkit.formats.sniff import Detected, detect
from ckptkit.formats.torchfile import MAX_PICKLE_BYTES, read_torch_file
from ckptkit.pickle import PickleFormatError, load_symbolic
from ckptkit.pickle.policy import UNSAFE_CLASSES
from ckptkit.pickle.values import GlobalUse
from ckptkit.storage import Store
from ckptkit.storage.read_cache import ReadCache
from ckptkit.storage.target import resolve_target

PROBE_BYTES = 1 << 20  # how much of a non-pickle file is probed as pickle.load would read it
MAX_MEMBER_BYTES = 256 << 20  # archive members read whole to look for pickles
MAX_STACKED = 64  # pickles read back to back from one blob (legacy torch writes 5)
PICKLE_KINDS = frozenset({"torch-zip", "torch-legacy", "pickle", "dcp-metadata", "torchscript"})
# Names that promise content without pickles; a pickle behind one is a disguise (CVE-2025-1889).
PICKLE_FREE_SUFFIXES = frozenset(
    {".safetensors", ".json", ".npy", ".txt", ".md", ".yaml", ".yml", ".gguf", ".onnx", ".msgpack", ".h5"}
)
# What each extension claims, for the "not what its name says" report.
_CLAIMS: dict[str, tuple[frozenset[str], str]] = {
    ".safetensors": (frozenset({"safetensors"}), "a safetensors file"),
    ".json": (frozenset({"json", "error-json"}), "JSON"),
    ".npy": (frozenset({"npy"}), "a numpy .npy array"),
    ".npz": (frozenset({"zip"}), "a numpy .npz archive"),
    **{
        ext: (frozenset({"torch-zip", "torch-legacy", "pickle"}), "a torch.save file")
        for ext in (".pt", ".pth", ".bin", ".ckpt")
    },
    **{ext: (frozenset({"pickle"}), "a pickle") for ext in (".pkl", ".pickle")},
}


@dataclass(frozen=True)
class Target:
    """What a PATH names: one file (``keys`` holds its name) or every file below a directory."""

    store: Store
    keys: list[str]
    is_file: bool


def scan_target(path: str | os.PathLike[str] | Store, **storage_options: Any) -> Target:
    """Open a local path or URL that names either a file or a directory (checkpoint or root)."""
    found = resolve_target(path, **storage_options)
    if found.key is not None:
        return Target(found.store, [found.key], True)
    store = _deduplicated_files(found.store) or found.store
    keys = _all_keys(store)
    if not keys and store.local_path("") is None:  # a prefix with nothing below it
        raise NotFoundError(f"{found.url}: no such file, or nothing below it")
    return Target(store, keys, False)


def _deduplicated_files(store: Store) -> Store | None:
    """A deduplicated checkpoint's files where they lie (its root's blob store): what a loader
    reads is what must be scanned, not what happens to sit in the directory."""
    try:
        manifest = read_manifest(store)
    except (NotCommittedError, ManifestError):
        return None  # scanned as a directory, as any uncommitted one
    return files_of(store, manifest) if manifest.blob_store is not None else None


def _all_keys(store: Store) -> list[str]:
    return sorted(info.key for info in store.list(""))


@dataclass
class FileScan:
    """What one file holds: its kind by content, each global use, and what stopped the reading."""

    path: str
    kind: str
    detail: str
    globals: list[GlobalUse] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    claimed: str | None = None  # what the name says the file is, when the content disagrees
    disguised: bool = False  # a pickle behind a name that promises no pickle
    code: str | None = None  # why the file holds code (TorchScript)
    incomplete: list[str] = field(default_factory=list)  # pickles not read to their end, and why
    protocol: int | None = None

    @property
    def unsafe_globals(self) -> list[GlobalUse]:
        return [g for g in self.globals if g.classification in UNSAFE_CLASSES]

    @property
    def unsafe(self) -> bool:
        return bool(self.unsafe_globals) or self.disguised or self.code is not None

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "kind": self.kind,
            "detail": self.detail,
            "protocol": self.protocol,
            "claimed": self.claimed,
            "disguised": self.disguised,
            "code": self.code,
            "unsafe": self.unsafe,
            "incomplete": self.incomplete,
            "problems": self.problems,
            "globals": [global_json(g) for g in self.globals],
        }


def global_json(use: GlobalUse) -> dict[str, Any]:
    return {
        "global": use.ref.qualname,
        "module": use.ref.module,
        "name": use.ref.name,
        "classification": use.classification,
        "pickle": use.pickle_name,
        "offset": use.offset,
    }


@dataclass
class ScanReport:
    url: str
    files: list[FileScan]

    @property
    def verdict(self) -> str:
        if any(f.unsafe for f in self.files):
            return "unsafe"
        return "incomplete" if any(f.incomplete for f in self.files) else "clean"

    @property
    def exit_code(self) -> int:
        return {"unsafe": EXIT_UNSAFE, "incomplete": EXIT_FINDINGS}.get(self.verdict, EXIT_OK)

    def to_json(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for f in self.files:
            for g in f.globals:
                counts[g.classification] = counts.get(g.classification, 0) + 1
        return {
            "url": self.url,
            "verdict": self.verdict,
            "exit_code": self.exit_code,
            "counts": counts,
            "files": [f.to_json() for f in self.files],
        }


def scan(path: str | os.PathLike[str] | Store, **storage_options: Any) -> ScanReport:
    """Scan a file, a checkpoint directory or a root (local path or URL); nothing is executed."""
    target = scan_target(path, **storage_options)
    url = os.fspath(path) if not isinstance(path, Store) else path.url
    return ScanReport(url, [scan_file(target.store, key) for key in target.keys])


def scan_file(store: Store, key: str) -> FileScan:
    """Scan one file of ``store``, dispatching on its content."""
    size = store.head(key).size
    # The readers below ask for the size again (the tar reader to open its stream) and re-read
    # what sniffing read: one HEAD per file, and each small range fetched once.
    store = ReadCache(store, {key: size})
    found = detect(store, key, size)
    result = FileScan(key, found.kind, found.detail)
    reader = _READERS.get(found.kind, _probe)
    try:
        reader(store, key, found, result)
    except PickleFormatError as exc:
        _partial(result, exc)
    except FormatError as exc:
        result.incomplete.append(str(exc))
    _check_name(key, found, result)
    return result


# --- readers by kind ---------------------------------------------------------------------------


def _torch(store: Store, key: str, found: Detected, result: FileScan) -> None:
    torch_file = read_torch_file(store, key)
    result.globals.extend(torch_file.globals)
    result.problems.extend(torch_file.problems)
    result.protocol = torch_file.protocol
    if found.kind == "torch-zip":
        # torch.load reads only data.pkl; other loaders (and other readers) may read any member.
        main = f"{torch_file.record_prefix}/data.pkl"
        _zip_members(store, key, result, skip=lambda name: name == main or "/data/" in name)


def _torchscript(store: Store, key: str, found: Detected, result: FileScan) -> None:
    result.code = "TorchScript archive: torch.jit.load compiles and runs the Python code it contains"
    _zip_members(store, key, result, skip=lambda name: "/data/" in name)


def _zip(store: Store, key: str, found: Detected, result: FileScan) -> None:
    _zip_members(store, key, result, skip=lambda name: False)


def _stacked(store: Store, key: str, found: Detected, result: FileScan) -> None:
    size = store.head(key).size
    if size > MAX_PICKLE_BYTES:
        raise FormatError(f"{key}: pickle of {size} bytes exceeds the {MAX_PICKLE_BYTES} byte cap")
    _pickles(store.get(key), key, result, first_must_parse=True)


def _npy(store: Store, key: str, found: Detected, result: FileScan) -> None:
    size = store.head(key).size
    head = store.get(key, 0, min(size, 64 << 10))
    start = _npy_pickle_start(head)
    if start is not None:  # np.load(allow_pickle=True) unpickles an object array's data
        if size > MAX_PICKLE_BYTES:
            raise FormatError(f"{key}: object array of {size} bytes exceeds the {MAX_PICKLE_BYTES} byte cap")
        _pickles(store.get(key), f"{key}:object-array", result, first_must_parse=True, start=start)


def _tar(store: Store, key: str, found: Detected, result: FileScan) -> None:
    # torch's pre-1.6 TAR format keeps its pickles in members named sys_info, pickle, storages.
    with store.open_read(key) as raw, tarfile.open(fileobj=raw, mode="r:") as archive:
        for member in archive:
            if not member.isfile():
                continue
            if member.size > MAX_MEMBER_BYTES:
                result.incomplete.append(f"tar member {member.name!r} ({member.size} bytes) is too large")
                continue
            extracted = archive.extractfile(member)
            data = extracted.read() if extracted is not None else b""
            _member(data, f"{key}:{member.name}", result)


def _probe(store: Store, key: str, found: Detected, result: FileScan) -> None:
    # pickle.load(f) on this file would start at byte 0: whatever globals it would meet there
    # are findings even though the file is not a pickle by its looks.
    size = store.head(key).size
    if size == 0:
        return
    data = store.get(key, 0, min(size, PROBE_BYTES))
    try:
        load_symbolic(data, pickle_name=key)
    except PickleFormatError as exc:
        if exc.globals:
            _partial(result, exc)


_READERS = {
    "torch-zip": _torch,
    "torch-legacy": _torch,
    "pickle": _stacked,
    "dcp-metadata": _stacked,
    "torchscript": _torchscript,
    "zip": _zip,
    "npy": _npy,
    "tar": _tar,
}


# --- pickles in blobs and archives -------------------------------------------------------------


def _pickles(data: bytes, name: str, result: FileScan, *, first_must_parse: bool, start: int = 0) -> None:
    """Every pickle stored back to back in ``data`` from ``start`` (legacy torch, concatenated dumps).

    The first one must parse; after it, bytes that do not parse are trailing data (a problem),
    unless they named globals before failing: then they are a broken payload and count.
    """
    pos, count = start, 0
    while pos < len(data) and count < MAX_STACKED:
        try:
            parsed = load_symbolic(data, pickle_name=name, start=pos)
        except PickleFormatError as exc:
            if (count == 0 and first_must_parse) or exc.globals:
                _partial(result, exc)
            else:
                result.problems.append(f"{name}: {len(data) - pos} bytes after the last pickle are no pickle")
            return
        result.globals.extend(parsed.globals)
        if count == 0:
            result.protocol = parsed.protocol
        pos += parsed.size
        count += 1
    if pos < len(data):
        result.incomplete.append(f"{name}: over {MAX_STACKED} pickles back to back; the rest was not read")


def _zip_members(store: Store, key: str, result: FileScan, skip: Any) -> None:
    archive = zr.read_zip(store, key)
    for problem in archive.problems:
        if problem not in result.problems:
            result.problems.append(problem)
    for entry in archive.entries:
        if skip(entry.name) or entry.name.endswith("/"):
            continue
        if entry.size > MAX_MEMBER_BYTES:
            result.incomplete.append(f"zip member {entry.name!r} ({entry.size} bytes) is too large to scan")
            continue
        try:
            data = zr.read_record(store, archive, entry, max_size=MAX_MEMBER_BYTES)
        except FormatError as exc:
            result.incomplete.append(f"zip member {entry.name!r} cannot be read: {exc}")
            continue
        _member(data, f"{key}:{entry.name}", result)


def _member(data: bytes, name: str, result: FileScan) -> None:
    """An archive member: scanned if it is a pickle, an object array, or another archive."""
    if data.startswith(zr.LOCAL_SIG) or data[257:262] == b"ustar":
        result.incomplete.append(f"{name} is an archive inside an archive; it was not opened")
        return
    if data.startswith(b"\x93NUMPY"):
        start = _npy_pickle_start(data)
        if start is not None:
            _pickles(data, f"{name}:object-array", result, first_must_parse=True, start=start)
        return
    if looks_like_pickle(data):
        _pickles(data, name, result, first_must_parse=True)
        return
    try:  # anything else is probed, as pickle.load would read it
        load_symbolic(data[:PROBE_BYTES], pickle_name=name)
    except PickleFormatError as exc:
        if exc.globals:
            _partial(result, exc)


def looks_like_pickle(data: bytes) -> bool:
    """A PROTO opcode, or a protocol 0/1 start that ends in STOP (the cheap test sniff uses too)."""
    if len(data) >= 2 and data[0] == 0x80 and 2 <= data[1] <= 5:
        return True
    return bool(data) and data[:1] in b"c(}]I)" and data.endswith(b".")


def _npy_pickle_start(data: bytes) -> int | None:
    """Where an object-dtype .npy's pickle starts, or None when the array holds plain data."""
    if not data.startswith(b"\x93NUMPY") or len(data) < 10:
        return None
    major = data[6]
    width = 2 if major == 1 else 4
    length = int.from_bytes(data[8 : 8 + width], "little")
    header = data[8 + width : 8 + width + length]
    # The header is a Python dict literal; an object dtype is spelled '|O' (or 'O' in lists).
    return 8 + width + length if b"'|O'" in header or b"'O'" in header or b"('O'" in header else None


def _partial(result: FileScan, exc: PickleFormatError) -> None:
    # A parse that stopped early still names what it read (a payload followed by garbage).
    result.globals.extend(g for g in exc.globals if g not in result.globals)
    result.incomplete.append(str(exc))


def _check_name(key: str, found: Detected, result: FileScan) -> None:
    suffix = posixpath.splitext(key)[1].lower()
    holds_pickle = found.kind in PICKLE_KINDS or bool(result.globals)
    if suffix in PICKLE_FREE_SUFFIXES and holds_pickle:
        result.disguised = True
        result.claimed = _CLAIMS.get(suffix, (frozenset(), f"a {suffix} file"))[1]
        return
    claim = _CLAIMS.get(suffix)
    if claim is not None and found.kind not in claim[0]:
        result.claimed = claim[1]

