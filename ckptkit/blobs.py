"""Deduplicated files: the root's content-addressed blob store, and deleting a blob only when
nothing can still need it.

Below a root (docs/manifest.md, "Deduplicated files and the blob protocol"):

    .ckptkit-blobs/<algorithm>/<2 hex>/<64 hex>   a file's bytes, named by its digest
    .ckptkit-blobs/<...>/<64 hex>.<12 hex>        a copy under its own name, written while a sweep ran
    .ckptkit-blobs/pins/<attempt>-<8 hex>.json    digests that an unfinished save will reference
    .ckptkit-blobs/gc.lock                        held while a sweep deletes blobs

A save (:class:`BlobWriter`) pins the digests it is about to reference, *then* looks for the
lock: with no sweep running it reuses the blobs that exist and writes the missing ones under
their digest's name; with one running it reuses nothing and writes copies under fresh names,
which that sweep never listed. It commits its manifest, then unpins. A sweep (:func:`sweep`)
takes the lock, lists the blobs, then reads the pins, then every manifest below the root, and
deletes the listed blobs that nothing names, checking before each batch that the lock is still
its own; it rewrites the lock while it runs, so a lock left alone for LOCK_STALE_AFTER is a
dead sweep's, which the next sweep takes over. Why no crash or interleaving deletes a blob that
a committed or unfinished checkpoint needs is argued in docs/manifest.md;
tests/test_dedup_crash.py and test_dedup_concurrency.py try it.
"""

from __future__ import annotations

import contextlib
import json
import posixpath
import re
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ckptkit.errors import AlreadyExistsError, ManifestError, NotFoundError, StorageError
from ckptkit.hashing import FileDigest
from ckptkit.manifest import BLOB_DIR, MANIFEST_NAME, blob_key, parse_manifest
from ckptkit.storage.base import Chunks, Store, join_key

PIN_DIR = "pins"
LOCK_NAME = "gc.lock"
# A pin or lock this old belongs to a process that died: a save or sweep that runs longer than
# this loses its protection (docs/manifest.md). Sweeps take the same grace from `gc --grace`.
DEFAULT_STALE_AFTER = 3600.0
# A running sweep rewrites its lock every _LOCK_RENEW seconds, so a lock left alone for
# LOCK_STALE_AFTER is a dead sweep's even when stale_after is longer: a sweep killed midway
# (a preempted job's retention) makes saves write copies for minutes, not for an hour.
LOCK_STALE_AFTER = 300.0
_LOCK_RENEW = LOCK_STALE_AFTER / 5
_LOOKUPS = 8  # HEADs in flight when a save asks which of its blobs exist
_KEY_PATTERN = r"(?P<algorithm>[a-z0-9-]+)/[0-9a-f]{2}/(?P<hex>[0-9a-f]{64})(\.[0-9a-f]{12})?"
_KEY_RE = re.compile(_KEY_PATTERN)
_DELETE_BATCH = 64


def digest_of_key(key: str) -> str | None:
    """``blake3-tree:<hex>`` for a blob key (a copy's too); None for anything else in the store."""
    match = _KEY_RE.fullmatch(key)
    return f"{match['algorithm']}:{match['hex']}" if match else None


@dataclass(frozen=True)
class Placement:
    """Where one file's bytes go: ``key`` in the blob store, and whether they are there already."""

    key: str
    present: bool


class BlobWriter:
    """The blob side of one save into ``root``: pins, lookups, and where each file goes.

    Thread-safe: the shards of one save are written concurrently. ``close`` unpins; call it
    after the commit (or the abort). A crashed save's pins go stale and stop protecting anything.
    """

    def __init__(self, root: Store, attempt: str) -> None:
        self.root = root
        self.store = root.child(BLOB_DIR)
        self.attempt = attempt
        self._lock = threading.Lock()
        self._pins: list[str] = []

    def place(self, digests: Sequence[str]) -> list[Placement]:
        """Pin ``digests``, then say where each file goes. Pin first: a sweep that has not read
        the pins yet will see this one; one that has holds the lock, which we then see."""
        pin = join_key(PIN_DIR, f"{self.attempt}-{uuid.uuid4().hex[:8]}.json")
        self.store.put(pin, json.dumps({"digests": sorted(set(digests))}).encode())
        with self._lock:
            self._pins.append(pin)
        if self.store.exists(LOCK_NAME):
            return [Placement(blob_key(d, copy=self.attempt), False) for d in digests]
        keys = [blob_key(d) for d in digests]
        with ThreadPoolExecutor(max_workers=max(1, min(_LOOKUPS, len(keys)))) as pool:
            present = list(pool.map(self.store.exists, keys))
        return [Placement(k, p) for k, p in zip(keys, present, strict=True)]

    def close(self) -> None:
        with self._lock:
            pins, self._pins = self._pins, []
        for pin in pins:
            with contextlib.suppress(StorageError):  # a stale pin protects nothing: swept later
                self.store.delete(pin)


class DedupFiles:
    """How one save's files reach the blob store. Keys are relative to the attempt (its staging
    place ``attempt_key`` below ``root``). Where the store has hard links, each file is also
    linked at its own path in the checkpoint, so tools that read the directory without the
    manifest (DeepSpeed's loader, the HF Trainer) find whole files there, at no cost in bytes."""

    def __init__(self, root: Store, attempt_key: str, attempt: str) -> None:
        self.root = root
        self.attempt_key = attempt_key
        self.writer = BlobWriter(root, attempt)
        self._links = root.capabilities.hard_links
        self._placed: dict[str, Placement] = {}
        self._lock = threading.Lock()

    def reserve(self, digests: Sequence[str]) -> None:
        """Place many files at once, ahead of :meth:`write_known`: one pin and one lock check
        for a whole save instead of one per file."""
        placements = self.writer.place(digests)
        with self._lock:
            self._placed.update(zip(digests, placements, strict=True))

    def write_known(self, key: str, data: bytes | Chunks, digest: FileDigest) -> str:
        """Write a file whose digest the caller computed from these very bytes: nothing at all
        when its blob exists. Returns the blob key."""
        with self._lock:
            reserved = self._placed.get(digest.digest)
        [placement] = [reserved] if reserved is not None else self.writer.place([digest.digest])
        blob = join_key(BLOB_DIR, placement.key)
        if not placement.present:
            self.root.put(blob, data)
        if self._links:
            self.root.link(blob, join_key(self.attempt_key, key))
        return placement.key

    def adopt(self, key: str, digest: FileDigest) -> str | None:
        """Give a file just written (and hashed) to the blob store; the blob key, or None where
        a running sweep means it stays an ordinary file of this checkpoint."""
        [placement] = self.writer.place([digest.digest])
        if placement.key != blob_key(digest.digest):
            return None  # a sweep holds the lock: a copy would cost a rewrite for nothing
        written, blob = join_key(self.attempt_key, key), join_key(BLOB_DIR, placement.key)
        if self._links:
            if not placement.present:
                try:
                    self.root.link(written, blob)
                    return placement.key
                except AlreadyExistsError:
                    pass  # another save stored the same bytes first: share theirs
            self.root.delete(written)
            self.root.link(blob, written)
        else:
            if not placement.present:
                self.root.copy(written, blob)
            self.root.delete(written)
        return placement.key


@dataclass
class SweepReport:
    """What one sweep of a root's blob store did."""

    deleted: list[str] = field(default_factory=list)
    freed_bytes: int = 0
    kept: int = 0
    stale_pins: list[str] = field(default_factory=list)
    skipped: str | None = None  # why nothing was deleted, when nothing could be
    has_store: bool = True  # False: the root has no blob store (never deduplicated); nothing done


def referenced_blobs(root: Store, *, tick: Callable[[], None] | None = None) -> set[str]:
    """Every blob key that a manifest anywhere below ``root`` names in ``root``'s blob store.

    Staging and trash directories count too: a staged manifest is about to be renamed into
    place. A manifest that cannot be parsed (damaged, or from a newer ckptkit) still protects
    every blob key its bytes mention. ``tick`` is called before each manifest is read (a sweep
    renews its lock there: reading a large root's manifests may take long).
    """
    referenced: set[str] = set()
    listings = [root.list(name) for name in root.list_dirs("") if name != BLOB_DIR]
    for info in (info for listing in listings for info in listing):
        if posixpath.basename(info.key) != MANIFEST_NAME:
            continue
        if tick is not None:
            tick()
        try:
            data = root.get(info.key)
        except NotFoundError:
            continue  # deleted since the listing: it protects nothing any more
        referenced |= _blobs_named(data, posixpath.dirname(info.key))
    return referenced


def _blobs_named(data: bytes, directory: str) -> set[str]:
    try:
        manifest = parse_manifest(data)
    except ManifestError:
        text = data.decode("utf-8", "replace")
        return {m.group(0) for m in _KEY_RE.finditer(text)}
    if manifest.blob_store is None:
        return set()
    # A staging or trash directory is one hidden level below the root whatever the depth of
    # the checkpoint's name (``a/b`` stages in ``.a_b.ckptkit-staging-<id>``), so its relative
    # blob store does not resolve from there: it is the root's all the same.
    staged = directory.startswith(".")
    if not staged and posixpath.normpath(posixpath.join(directory or ".", manifest.blob_store)) != BLOB_DIR:
        return set()  # a nested root's own blob store
    return {entry.blob for entry in manifest.blobs if entry.blob is not None}


def sweep(root: Store, *, stale_after: float = DEFAULT_STALE_AFTER, dry_run: bool = False) -> SweepReport:
    """Delete the blobs of ``root`` that no manifest and no live pin names (the blob protocol).

    ``stale_after``: seconds after which a pin or a lock is a dead process's (``gc --grace``).
    ``dry_run`` takes no lock and deletes nothing: ``deleted`` lists what would go. A root
    without a blob store is left as it is (``has_store`` False)."""
    store = root.child(BLOB_DIR)
    report = SweepReport()
    if next(iter(store.list("")), None) is None:
        # Nothing to release, and taking the lock would create a blob store in a plain root.
        report.has_store = False
        return report
    lock = _Lock(store)
    if not dry_run and not lock.acquire(min(stale_after, LOCK_STALE_AFTER)):
        report.skipped = "another gc holds the blob store's lock"
        return report
    try:
        blobs = {i.key: i.size for i in store.list("") if digest_of_key(i.key) is not None}
        # Pins after blobs, manifests after pins: the order the protocol's argument needs. The
        # pins are listed again once the blob walk is done: that walk reaches directories in any
        # order, and a save may pin and write a copy while it is under way (a copy it lists must
        # have its pin in the listing that follows).
        pinned: set[str] = set()
        now = time.time()
        for info in store.list(PIN_DIR):
            if info.mtime is not None and now - info.mtime > stale_after:
                report.stale_pins.append(info.key)
                continue
            pinned |= _pinned_digests(store, info.key)
        referenced = referenced_blobs(root, tick=None if dry_run else lock.renew)
        doomed = [k for k in sorted(blobs) if k not in referenced and digest_of_key(k) not in pinned]
        report.kept = len(blobs) - len(doomed)
        if dry_run:
            report.deleted, report.freed_bytes = doomed, sum(blobs[k] for k in doomed)
            return report
        for start in range(0, len(doomed), _DELETE_BATCH):
            if not lock.held():
                report.skipped = "the blob store's lock was taken over by another gc; stopped"
                break
            lock.renew()
            for key in doomed[start : start + _DELETE_BATCH]:
                store.delete(key)
                report.deleted.append(key)
                report.freed_bytes += blobs[key]
        for key in report.stale_pins:
            store.delete(key)
    finally:
        if not dry_run:
            lock.release()
    return report


def _pinned_digests(store: Store, key: str) -> set[str]:
    try:
        digests = json.loads(store.get(key)).get("digests", [])
    except NotFoundError:
        return set()  # unpinned since the listing: its save committed, and its manifest counts
    except (ValueError, AttributeError):
        return set()  # a torn pin: its writer died writing it, before it looked anything up
    return {d for d in digests if isinstance(d, str)}


class _Lock:
    """``gc.lock`` as one sweep holds it: taken create-only (or over, from a dead sweep),
    renewed while the sweep runs, released only if still its own."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.owner = uuid.uuid4().hex
        self._renewed = time.monotonic()

    def _claim(self) -> bytes:
        return json.dumps({"owner": self.owner, "created": time.time()}).encode()

    def acquire(self, stale_after: float) -> bool:
        try:
            self.store.put(LOCK_NAME, self._claim(), mode="create")
            return True
        except AlreadyExistsError:
            pass
        try:
            info = self.store.head(LOCK_NAME)
        except NotFoundError:
            return self.acquire(stale_after)  # released meanwhile: try again
        if info.mtime is None or time.time() - info.mtime <= stale_after:
            return False
        self.store.put(LOCK_NAME, self._claim())  # a dead sweep's lock: take it over
        self._renewed = time.monotonic()
        return self.held()

    def held(self) -> bool:
        try:
            return json.loads(self.store.get(LOCK_NAME)).get("owner") == self.owner
        except (NotFoundError, ValueError, AttributeError):
            return False

    def renew(self) -> None:
        """Rewrite the lock when it is due, so that no other sweep takes it for a dead one's.
        If another sweep took it over meanwhile and we overwrite theirs, the lock was present
        throughout all the same: they stop at their next check, and we go on."""
        if time.monotonic() - self._renewed < _LOCK_RENEW or not self.held():
            return
        self.store.put(LOCK_NAME, self._claim())
        self._renewed = time.monotonic()

    def release(self) -> None:
        if self.held():
            self.store.delete(LOCK_NAME)


def blob_bytes(root: Store) -> int:
    """Bytes the blob store of ``root`` holds: what a root's deduplicated files cost, once."""
    return sum(i.size for i in root.child(BLOB_DIR).list("") if digest_of_key(i.key) is not None)

