"""The manifest: the one JSON file that makes a checkpoint exist.

The manifest lists every file of a checkpoint with its size and content digest, and is written
last. It is validated both when written and when read: paths must stay inside the checkpoint,
and a manifest from a newer schema is refused rather than guessed at. The JSON Schemas shipped in
``ckptkit/schema/manifest-v<N>.schema.json`` describe the same rules for other tools;
``docs/manifest.md`` is the human description.

Each file's digest names its algorithm (``blake3-tree:…``, ``sha256-tree:…``). Schema version 1
knows SHA-256 only; version 2 lets every file name its own. A manifest whose files are all
SHA-256 is still written as version 1, so that a ckptkit from before version 2 reads it; any
other is version 2, which such a ckptkit refuses as "newer, upgrade" instead of misreading it.
Version 3 adds deduplicated files: an entry with a ``blob`` key lies in the root's shared,
content-addressed blob store (``blob_store``, relative to the checkpoint), not at its path.
Only a manifest with such an entry is written as version 3.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import platform
import re
import uuid
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from typing import Any

from ckptkit import nesting
from ckptkit.errors import ManifestError, UnsafePathError, UnsupportedSchemaError
from ckptkit.hashing import ALGORITHMS, CHUNK_SIZE, SHA256_TREE, FileDigest

MANIFEST_NAME = "ckptkit-manifest.json"
FORMAT_NAME = "ckptkit.manifest"
SCHEMA_VERSION = 3  # the newest this ckptkit reads and writes
SHA256_ONLY_VERSION = 1  # before per-file algorithms: every digest is sha256-tree
PER_FILE_ALGORITHM_VERSION = 2  # each file's digest names its algorithm
BLOBS_VERSION = 3  # files may lie in the root's blob store
BLOB_DIR = ".ckptkit-blobs"  # the blob store: a hidden directory of the root, never a checkpoint
LAYOUTS = ("native", "deepspeed", "hf-trainer", "dcp", "files")

_DIGEST_RE = re.compile(r"(?P<algorithm>[a-z0-9][a-z0-9-]*):[0-9a-f]{64}")
_HEX_RE = re.compile(r"[0-9a-f]{64}")
_DRIVE_RE = re.compile(r"^[A-Za-z]:")
# <algorithm>/<first 2 hex>/<64 hex>, and a copy of the same bytes under its own name (a writer
# that met a running gc writes one: blobs.py) with a 12-hex suffix.
_BLOB_KEY_RE = re.compile(
    r"(?P<algorithm>[a-z0-9-]+)/(?P<fan>[0-9a-f]{2})/(?P<hex>[0-9a-f]{64})(\.[0-9a-f]{12})?"
)
_BLOB_STORE_RE = re.compile(r"(\.\./)+" + re.escape(BLOB_DIR))
_MAX_PATH = 4096
# JSON levels a manifest may nest (its own object is level 1, ``metadata`` level 2): far more
# than any real metadata, far less than where json and the walkers of a manifest run out of stack.
MAX_NESTING = 100


def validate_path(path: object) -> str:
    """Return ``path`` if it is a safe, normalised, relative ``/``-separated path."""
    if not isinstance(path, str) or not path:
        raise UnsafePathError(str(path), "must be a non-empty string")
    if len(path) > _MAX_PATH:
        raise UnsafePathError(path[:80] + "...", "longer than 4096 characters")
    if "\x00" in path:
        raise UnsafePathError(path, "contains NUL")
    if any(ord(c) < 0x20 for c in path):
        raise UnsafePathError(path, "contains a control character")
    if "\\" in path:
        raise UnsafePathError(path, "contains a backslash")
    if path.startswith("/"):
        raise UnsafePathError(path, "is absolute")
    if _DRIVE_RE.match(path):
        raise UnsafePathError(path, "starts with a drive letter")
    parts = path.split("/")
    if ".." in parts:
        raise UnsafePathError(path, "contains '..'")
    if any(part in ("", ".") for part in parts):
        raise UnsafePathError(path, "is not normalised (empty or '.' component)")
    return path


def blob_key(digest: str, copy: str | None = None) -> str:
    """Where the blob store keeps a file's bytes: named by its digest (``blake3-tree/ab/ab…``),
    or, for a ``copy`` (12 hex digits), by its digest and that suffix."""
    algorithm, _, hex_digest = digest.partition(":")
    key = f"{algorithm}/{hex_digest[:2]}/{hex_digest}"
    return f"{key}.{copy}" if copy else key


def blob_store_of(name: str) -> str:
    """The blob store relative to a checkpoint named ``name`` (``a/b``: ``../../.ckptkit-blobs``):
    the root's, shared by every checkpoint below it."""
    return "../" * len(validate_path(name).split("/")) + BLOB_DIR


@dataclass(frozen=True)
class FileEntry:
    """One file of a checkpoint, relative to the checkpoint root.

    ``blob`` (schema version 3) is the key of the file's bytes in the root's blob store when the
    file is deduplicated; its bytes then lie there, shared with every checkpoint that lists it.
    """

    path: str
    size: int
    digest: str
    chunks: tuple[str, ...]
    blob: str | None = None

    @classmethod
    def from_digest(cls, path: str, digest: FileDigest, *, blob: str | None = None) -> FileEntry:
        return cls(validate_path(path), digest.size, digest.digest, digest.chunks, blob)

    @property
    def algorithm(self) -> str:
        """The digest algorithm of this file (``blake3-tree``), named by its digest's prefix."""
        return self.digest.partition(":")[0]

    def to_json(self) -> dict[str, Any]:
        entry = {"path": self.path, "size": self.size, "digest": self.digest, "chunks": list(self.chunks)}
        if self.blob is not None:
            entry["blob"] = self.blob
        return entry


def producer_versions() -> dict[str, str | None]:
    """Versions of the software that wrote a checkpoint, read without importing it."""
    return dict(_installed_versions())


@functools.cache
def _installed_versions() -> tuple[tuple[str, str | None], ...]:
    # Read once per process: the package metadata scan costs ~7 ms, at every save otherwise.
    versions: list[tuple[str, str | None]] = [("python", platform.python_version())]
    for package in ("ckptkit", "torch", "deepspeed", "transformers"):
        try:
            versions.append((package, importlib_metadata.version(package)))
        except importlib_metadata.PackageNotFoundError:
            versions.append((package, None))
    return tuple(versions)


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class Manifest:
    """A validated manifest. Build with :meth:`create`, read with :func:`parse_manifest`."""

    checkpoint_id: str
    step: int | None
    created: str
    layout: str
    files: tuple[FileEntry, ...]
    producer: dict[str, str | None] = field(default_factory=dict)
    topology: dict[str, Any] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    chunk_size: int = CHUNK_SIZE
    blob_store: str | None = None  # relative to the checkpoint; set when a file is a blob

    @classmethod
    def create(
        cls,
        *,
        step: int | None,
        layout: str,
        files: list[FileEntry],
        topology: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        metrics: dict[str, float] | None = None,
        blob_store: str | None = None,
    ) -> Manifest:
        manifest = cls(
            checkpoint_id=uuid.uuid4().hex,
            step=step,
            created=utc_now(),
            layout=layout,
            files=tuple(sorted(files, key=lambda f: f.path)),
            producer=producer_versions(),
            topology=topology,
            metadata=dict(metadata or {}),
            metrics=dict(metrics or {}),
            blob_store=blob_store if any(f.blob is not None for f in files) else None,
        )
        # Validate on write exactly as on read, so a manifest we commit is one we can read.
        return parse_manifest(manifest.to_bytes())

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def schema_version(self) -> int:
        """The lowest version that says what this manifest holds, so that older readers read
        it: 3 with a blob, else 1 while every file is SHA-256, else 2."""
        if self.blob_store is not None:
            return BLOBS_VERSION
        if all(f.algorithm == SHA256_TREE for f in self.files):
            return SHA256_ONLY_VERSION
        return PER_FILE_ALGORITHM_VERSION

    @property
    def blobs(self) -> tuple[FileEntry, ...]:
        """The files whose bytes lie in the blob store."""
        return tuple(f for f in self.files if f.blob is not None)

    def file(self, path: str) -> FileEntry:
        for entry in self.files:
            if entry.path == path:
                return entry
        raise KeyError(path)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "schema_version": self.schema_version,
            "checkpoint_id": self.checkpoint_id,
            "step": self.step,
            "created": self.created,
            "layout": self.layout,
            "producer": self.producer,
            "digest": self._digest_json(),
            "files": [f.to_json() for f in self.files],
            **({"blob_store": self.blob_store} if self.blob_store is not None else {}),
            "topology": self.topology,
            "metadata": self.metadata,
            "metrics": self.metrics,
        }

    def _digest_json(self) -> dict[str, Any]:
        if self.schema_version == SHA256_ONLY_VERSION:
            return {"algorithm": SHA256_TREE, "chunk_size": self.chunk_size}
        return {"chunk_size": self.chunk_size}  # each file's digest names its algorithm

    def to_bytes(self) -> bytes:
        try:
            text = json.dumps(self.to_json(), indent=1, allow_nan=False, ensure_ascii=False)
        except RecursionError:
            # Nested far past MAX_NESTING: parse_manifest would refuse it anyway.
            raise ManifestError(
                f"manifest metadata nested too deep to write; the limit is {MAX_NESTING} levels"
            ) from None
        except (TypeError, ValueError) as exc:
            raise ManifestError(f"manifest metadata is not JSON-serialisable: {exc}") from exc
        return text.encode() + b"\n"


def _require(obj: dict[str, Any], name: str, kinds: type | tuple[type, ...]) -> Any:
    if name not in obj:
        raise ManifestError(f"manifest has no '{name}' field")
    value = obj[name]
    # bool is an int subclass; a boolean is never a valid size, step or version.
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise ManifestError(f"manifest field '{name}' has type bool")
    if not isinstance(value, kinds):
        raise ManifestError(f"manifest field '{name}' has type {type(value).__name__}")
    return value


def _parse_file(raw: object, index: int, chunk_size: int, version: int) -> FileEntry:
    if not isinstance(raw, dict):
        raise ManifestError(f"manifest files[{index}] is not an object")
    path = validate_path(raw.get("path"))
    size = _require(raw, "size", int)
    digest = _require(raw, "digest", str)
    chunks = _require(raw, "chunks", list)
    if size < 0:
        raise ManifestError(f"{path}: negative size {size}")
    match = _DIGEST_RE.fullmatch(digest)
    if not match:
        raise ManifestError(f"{path}: digest {digest!r} is not '<algorithm>:<64 hex>'")
    algorithm = match["algorithm"]
    if algorithm not in ALGORITHMS:
        raise ManifestError(
            f"{path}: unknown digest algorithm {algorithm!r} (known: {', '.join(ALGORITHMS)}); "
            "a newer ckptkit may know it"
        )
    if version == SHA256_ONLY_VERSION and algorithm != SHA256_TREE:
        raise ManifestError(
            f"{path}: digest algorithm {algorithm!r} in a schema version 1 manifest, which allows "
            f"{SHA256_TREE!r} only"
        )
    if not all(isinstance(c, str) and _HEX_RE.fullmatch(c) for c in chunks):
        raise ManifestError(f"{path}: chunk digests must be 64 lowercase hex characters")
    expected_chunks = max(1, -(-size // chunk_size))
    if len(chunks) != expected_chunks:
        raise ManifestError(
            f"{path}: {len(chunks)} chunk digests for {size} bytes (expected {expected_chunks})"
        )
    return FileEntry(path, size, digest, tuple(chunks), _parse_blob(raw, path, digest, version))


def _parse_blob(raw: dict[str, Any], path: str, digest: str, version: int) -> str | None:
    """A blob key names its file's bytes by their digest, so it must be this file's digest:
    a manifest cannot point one path at another file's bytes."""
    if "blob" not in raw:
        return None
    blob = raw["blob"]
    if version < BLOBS_VERSION:
        raise ManifestError(f"{path}: 'blob' in a schema version {version} manifest (blobs are version 3)")
    if not isinstance(blob, str) or not (match := _BLOB_KEY_RE.fullmatch(blob)):
        raise ManifestError(f"{path}: blob {blob!r} is not '<algorithm>/<2 hex>/<64 hex>[.<12 hex>]'")
    if blob_key(digest) != f"{match['algorithm']}/{match['fan']}/{match['hex']}":
        raise ManifestError(f"{path}: blob {blob!r} does not name the file's digest {digest}")
    return blob


def _refuse_constant(name: str) -> None:
    raise ManifestError(f"manifest contains {name}, which is not JSON")


def parse_manifest(data: bytes) -> Manifest:
    """Parse and validate manifest bytes; raise :class:`ManifestError` naming the problem."""
    try:
        obj = nesting.loads_bounded(data, MAX_NESTING, "manifest", parse_constant=_refuse_constant)
    except nesting.NestingError as exc:
        raise ManifestError(str(exc)) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"manifest is not valid JSON: {exc}") from exc
    if not isinstance(obj, dict) or obj.get("format") != FORMAT_NAME:
        raise ManifestError("not a ckptkit manifest (no 'format': 'ckptkit.manifest')")
    version = _require(obj, "schema_version", int)
    if version > SCHEMA_VERSION:
        raise UnsupportedSchemaError(
            f"manifest schema version {version} is newer than this ckptkit supports "
            f"({SCHEMA_VERSION}); upgrade ckptkit to read it"
        )
    if version < 1:
        raise ManifestError(f"invalid manifest schema version {version}")
    digest_info = _require(obj, "digest", dict)
    if version == SHA256_ONLY_VERSION and digest_info.get("algorithm") != SHA256_TREE:
        raise ManifestError(
            f"unknown digest algorithm {digest_info.get('algorithm')!r} "
            f"(a schema version 1 manifest has {SHA256_TREE!r})"
        )
    chunk_size = digest_info.get("chunk_size")
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size <= 0:
        raise ManifestError("manifest digest.chunk_size must be a positive integer")
    step = obj.get("step")
    if step is not None and (not isinstance(step, int) or isinstance(step, bool) or step < 0):
        raise ManifestError(f"manifest step must be a non-negative integer or null, not {step!r}")
    layout = _require(obj, "layout", str)
    if layout not in LAYOUTS:
        raise ManifestError(f"unknown layout {layout!r} (expected one of {', '.join(LAYOUTS)})")
    raw_files = _require(obj, "files", list)
    files = tuple(_parse_file(raw, i, chunk_size, version) for i, raw in enumerate(raw_files))
    seen: set[str] = set()
    for entry in files:
        if entry.path in seen:
            raise ManifestError(f"manifest lists {entry.path!r} twice")
        if entry.path == MANIFEST_NAME:
            raise ManifestError(f"manifest lists itself ({MANIFEST_NAME})")
        seen.add(entry.path)
    blob_store = obj.get("blob_store")
    if any(entry.blob is not None for entry in files):
        if not isinstance(blob_store, str) or not _BLOB_STORE_RE.fullmatch(blob_store):
            raise ManifestError(
                f"manifest blob_store {blob_store!r} is not '../' repeated, then {BLOB_DIR!r}"
            )
    elif blob_store is not None:
        raise ManifestError("manifest has a blob_store but no file in it")
    topology = obj.get("topology")
    if topology is not None and not isinstance(topology, dict):
        raise ManifestError("manifest topology must be an object or null")
    metrics = obj.get("metrics", {})
    if not isinstance(metrics, dict) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in metrics.values()
    ):
        raise ManifestError("manifest metrics must map names to numbers")
    return Manifest(
        checkpoint_id=_require(obj, "checkpoint_id", str),
        step=step,
        created=_require(obj, "created", str),
        layout=layout,
        files=files,
        producer=_require(obj, "producer", dict),
        topology=topology,
        metadata=_require(obj, "metadata", dict),
        metrics={k: float(v) for k, v in metrics.items()},
        chunk_size=chunk_size,
        blob_store=blob_store,
    )
