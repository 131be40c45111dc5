"""Staging and commit: a checkpoint exists once its manifest is committed, and not before.

Two protocols, chosen by the store's declared capabilities:

* ``atomic_rename`` (local disk): files are written into a hidden staging sibling
  ``.<name>.ckptkit-staging-<id>``, each fsynced; the manifest is written into it last; the
  directory is fsynced and renamed into place, and the parent fsynced. The rename fails if the
  name already exists, so two writers cannot both commit.
* otherwise (object stores): files are written below ``<name>/ckptkit-<id>/`` — a prefix of
  this attempt's own, so a concurrent or crashed writer of the same step never overwrites data
  that another writer's manifest lists — and the manifest is written last to
  ``<name>/ckptkit-manifest.json`` with create-only semantics (S3 ``If-None-Match: *``).

Everything without a committed manifest is incomplete: listed as such, never returned as a
checkpoint, and removed by ``gc`` once older than a grace period.
"""

from __future__ import annotations

import re
import threading
import uuid
from collections.abc import Iterable
from typing import Any

from ckptkit.blobs import DedupFiles
from ckptkit.errors import (
    AlreadyExistsError,
    CommitConflictError,
    NotFoundError,
    PermanentStorageError,
    StorageError,
)
from ckptkit.hashing import FileDigest, StreamingDigest, choose_algorithm, digest_pieces
from ckptkit.manifest import BLOB_DIR, MANIFEST_NAME, FileEntry, Manifest, blob_store_of, validate_path
from ckptkit.storage.base import Store, join_key
from ckptkit.storage.mapped import Located, MappedStore

STAGING_MARKER = ".ckptkit-staging-"
TRASH_MARKER = ".ckptkit-trash-"
ATTEMPT_RE = re.compile(r"^ckptkit-[0-9a-f]{12}$")


def step_dir_name(step: int) -> str:
    """``step-00000100``: zero-padded so that names sort in step order."""
    if step < 0:
        raise ValueError(f"step must be non-negative, got {step}")
    return f"step-{step:08d}"


def logical_path(path: str) -> str:
    """A manifest path without the object-store attempt prefix ``ckptkit-<id>/`` it may carry:
    where the file sits in the checkpoint as its writer laid it out, wherever it was committed."""
    first, sep, rest = path.partition("/")
    return rest if sep and ATTEMPT_RE.match(first) else path


def files_of(checkpoint: Store, manifest: Manifest) -> Store:
    """Where a committed checkpoint's files lie under their logical paths: inside its attempt
    prefix on an object store (every file of one commit shares it), else the checkpoint itself;
    for a deduplicated checkpoint, a view that finds each blob in the root's blob store, and
    for a thinned one (files of two attempts, or of one and none: :mod:`ckptkit.ops.thin`), a
    view that finds each file in its attempt."""
    if manifest.blob_store is not None:
        return _mapped_files(checkpoint, manifest)
    prefixes = {e.path.partition("/")[0] if logical_path(e.path) != e.path else None for e in manifest.files}
    if len(prefixes) > 1:
        return _mapped_files(checkpoint, manifest)
    prefix = prefixes.pop() if prefixes else None
    return checkpoint.child(prefix) if prefix is not None else checkpoint


def attempt_id(attempt_key: str) -> str:
    """The 12 hex digits that end an attempt's key (``.<name>.ckptkit-staging-<id>`` on local
    disk, ``<name>/ckptkit-<id>`` on object stores)."""
    return attempt_key[-12:]


def blob_store_for(checkpoint: Store, manifest: Manifest) -> Store:
    """The blob store a deduplicated checkpoint's manifest points at (``../.ckptkit-blobs``)."""
    assert manifest.blob_store is not None
    store = checkpoint
    for _ in range(manifest.blob_store.count("../")):
        store = store.parent()
    return store.child(BLOB_DIR)


def _mapped_files(checkpoint: Store, manifest: Manifest) -> MappedStore:
    blobs = blob_store_for(checkpoint, manifest) if manifest.blob_store is not None else checkpoint
    located = {
        logical_path(e.path): (
            Located(blobs, e.blob, e.size) if e.blob else Located(checkpoint, e.path, e.size)
        )
        for e in manifest.files
    }
    return MappedStore(checkpoint.url, located)


def is_ckptkit_debris_dir(name: str) -> bool:
    """A root-level directory that only ckptkit's own staging or deletion creates."""
    return name.startswith(".") and (STAGING_MARKER in name or TRASH_MARKER in name)


def refuse_uncommittable(root: Store) -> None:
    """Refuse a store where two writers of one step could both "commit": it has neither an
    atomic rename nor a create-only write that the store itself decides. A check-then-write
    there would let a concurrent writer's manifest replace ours, so nothing is written."""
    capabilities = root.capabilities
    if not (capabilities.atomic_rename or capabilities.conditional_create):
        raise PermanentStorageError(
            f"{root.url}: cannot commit a checkpoint here: this store has no atomic rename and "
            "no create-only write, so a concurrent writer could replace the manifest "
            "(supported: local disk, s3://, gs://, az://, memory://)"
        )


def _new_id() -> str:
    return uuid.uuid4().hex[:12]


class FileRecorder:
    """Streams files into ``files``, hashing them on the way, and records their manifest entries
    (paths below ``data_prefix``; ``prefix`` places the files, e.g. a rank's ``rank-00001``).
    ``digest`` is the algorithm's recorded name (``blake3-tree``). Thread-safe. What a
    transaction writes with, and each rank of a multi-rank save."""

    def __init__(
        self,
        files: Store,
        data_prefix: str,
        prefix: str = "",
        *,
        digest: str,
        dedup: DedupFiles | None = None,
    ) -> None:
        self._files = files
        self._data_prefix = data_prefix
        self._prefix = prefix
        self.digest = digest
        self.dedup = dedup
        self._lock = threading.Lock()
        self._entries: dict[str, FileEntry] = {}

    def write(
        self, path: str, data: bytes | Iterable[bytes | memoryview], *, digest: FileDigest | None = None
    ) -> FileEntry:
        """Stream one file, hashing it on the way. Deduplicating, a ``digest`` the caller already
        has (of exactly these bytes) lets a file whose blob exists be recorded without reading
        ``data`` at all; without one, the file is written, then given to the blob store."""
        key = join_key(self._prefix, validate_path(path))
        blob = None
        source = [data] if isinstance(data, (bytes, bytearray, memoryview)) else data
        if self.dedup is not None and digest is None and isinstance(source, list):
            digest = digest_pieces(source, algorithm=self.digest)  # in memory: maybe write nothing
        if self.dedup is not None and digest is not None:
            blob = self.dedup.write_known(key, data, digest)
        else:
            hasher = StreamingDigest(algorithm=self.digest)
            self._files.put(key, hasher.tee(source))
            digest = hasher.result()
            if self.dedup is not None:
                blob = self.dedup.adopt(key, digest)
        entry = FileEntry.from_digest(join_key(self._data_prefix, key), digest, blob=blob)
        with self._lock:
            if entry.path in self._entries:
                raise AlreadyExistsError(f"{key} was written twice in one checkpoint")
            self._entries[entry.path] = entry
        return entry

    def add(self, entries: Iterable[FileEntry]) -> None:
        """Record files written and hashed elsewhere (by other ranks)."""
        with self._lock:
            for entry in entries:
                self._entries[entry.path] = entry

    @property
    def entries(self) -> list[FileEntry]:
        with self._lock:
            return list(self._entries.values())


class CheckpointTransaction:
    """Write the files of one checkpoint, then commit them atomically with a manifest.

    Use as a context manager: leaving the block with an exception aborts (removes what this
    transaction wrote, best effort; ``gc`` removes anything a crash leaves).
    """

    def __init__(
        self,
        root: Store,
        name: str,
        *,
        attempt: str | None = None,
        digest: str | None = None,
        dedup: bool = False,
    ) -> None:
        """``attempt`` (12 hex digits) names this attempt's staging place; a random one by default.
        ``sync`` passes one derived from the source manifest, so a re-run finds what an
        interrupted run already copied. ``digest`` (``blake3`` or ``sha256``) is how the files
        written here are hashed; None is the site's ``CKPTKIT_DIGEST`` or BLAKE3. An unknown
        name is a ValueError, raised before anything is written. ``dedup`` stores each file's
        bytes once in ``root``'s blob store, shared with every checkpoint there that has them
        (:mod:`ckptkit.blobs`)."""
        self.digest = choose_algorithm(digest)
        self.root = root
        self.name = validate_path(name)
        self._done = False
        refuse_uncommittable(root)
        if root.exists(join_key(name, MANIFEST_NAME)):
            raise CommitConflictError(f"{root.url}/{name} is already committed")
        attempt = attempt or _new_id()
        if not ATTEMPT_RE.match(f"ckptkit-{attempt}"):
            raise ValueError(f"attempt id must be 12 hex digits, got {attempt!r}")
        if root.capabilities.atomic_rename:
            self._staging_key = f".{name.replace('/', '_')}{STAGING_MARKER}{attempt}"
            self.data_prefix = ""
        else:
            self._staging_key = name
            self.data_prefix = f"ckptkit-{attempt}"
        # Where this attempt's files live, relative to root.
        self.attempt_key = join_key(self._staging_key, self.data_prefix)
        self.files: Store = root.child(self.attempt_key)
        self.dedup = DedupFiles(root, self.attempt_key, attempt) if dedup else None
        self._recorder = FileRecorder(self.files, self.data_prefix, digest=self.digest, dedup=self.dedup)

    def write(
        self, path: str, data: bytes | Iterable[bytes | memoryview], *, digest: FileDigest | None = None
    ) -> FileEntry:
        """Stream one file into the checkpoint, hashing it on the way. Thread-safe. ``digest``:
        see :meth:`FileRecorder.write`."""
        return self._recorder.write(path, data, digest=digest)

    def add_entries(self, entries: Iterable[FileEntry]) -> None:
        """Record files that other processes (ranks) wrote into ``files`` and hashed."""
        self._recorder.add(entries)

    def commit(
        self,
        *,
        step: int | None,
        layout: str,
        metadata: dict[str, Any] | None = None,
        metrics: dict[str, float] | None = None,
        topology: dict[str, Any] | None = None,
    ) -> Manifest:
        manifest = Manifest.create(
            step=step,
            layout=layout,
            files=self._recorder.entries,
            topology=topology,
            metadata=metadata,
            metrics=metrics,
            blob_store=blob_store_of(self.name),
        )
        self.commit_manifest(manifest)
        return manifest

    def commit_manifest(self, manifest: Manifest) -> None:
        """Commit a manifest built elsewhere (``sync`` commits the source's, paths remapped)."""
        try:
            if self.root.capabilities.atomic_rename:
                staging = self.root.child(self._staging_key)
                publish_manifest(staging, manifest)  # a retried commit meets its own manifest
                self.root.sync_prefix(self._staging_key)
                self.root.rename_prefix(self._staging_key, self.name)
            else:
                publish_manifest(self.root.child(self.name), manifest)
        except AlreadyExistsError as exc:
            raise CommitConflictError(
                f"{self.root.url}/{self.name}: another writer committed this checkpoint first"
            ) from exc
        self._done = True
        self._unpin()  # committed: the manifest protects its blobs now

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        try:
            self.root.delete_prefix(self.attempt_key)
        finally:
            self._unpin()  # the blobs written for nothing are the next sweep's to delete

    def _unpin(self) -> None:
        if self.dedup is not None:
            self.dedup.writer.close()

    def __enter__(self) -> CheckpointTransaction:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self.abort()


def publish_manifest(checkpoint: Store, manifest: Manifest, *, overwrite: bool = False) -> None:
    """Commit ``manifest`` in place: create-only unless ``overwrite`` (``index --force``).

    A create-only PUT that the client retried after its first try landed (the reply lost to a
    reset connection) meets its own manifest: the bytes are compared, and ours is success.
    """
    data = manifest.to_bytes()
    try:
        checkpoint.put(MANIFEST_NAME, data, mode="overwrite" if overwrite else "create")
    except AlreadyExistsError:
        try:
            ours = checkpoint.get(MANIFEST_NAME) == data  # the checkpoint id makes it unique
        except StorageError:
            ours = False
        if not ours:
            raise


def delete_checkpoint(root: Store, name: str) -> None:
    """Remove a checkpoint so that no crash midway leaves it looking committed."""
    if root.capabilities.atomic_rename:
        trash = f".{name.replace('/', '_')}{TRASH_MARKER}{_new_id()}"
        try:
            root.rename_prefix(name, trash)  # atomic: gone from listings in one step
        except NotFoundError:
            return  # nothing there (a mirror deleting what never arrived): as on object stores
        root.delete_prefix(trash)
    else:
        root.delete(join_key(name, MANIFEST_NAME))  # uncommit first, then the data
        root.delete_prefix(name)
