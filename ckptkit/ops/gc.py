"""Remove what interrupted saves and deletions leave behind, and nothing else.

Debris is only what ckptkit itself creates: hidden staging and trash directories at the root,
temporary files of interrupted writes, attempt prefixes (``ckptkit-<id>/``) that no committed
manifest lists, and the files a killed thinning dropped from its manifest but left in place
(:func:`ckptkit.ops.thin.leftovers_of_thinning`). A directory another tool wrote is never
touched, committed or not. Nothing newer than the grace period is removed, so a save in
progress in another process is safe.

A deduplicated root's blob store is then swept by the blob protocol (:func:`ckptkit.blobs.sweep`),
with the same grace for the pins of saves in flight: blobs go only when no committed or staged
manifest and no live pin names them, never because a listing shows them alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field

from ckptkit.blobs import SweepReport, sweep
from ckptkit.catalog import read_manifest
from ckptkit.commit import ATTEMPT_RE, STAGING_MARKER, is_ckptkit_debris_dir
from ckptkit.errors import InvalidURLError, ManifestError, NotCommittedError, NotFoundError
from ckptkit.manifest import MANIFEST_NAME
from ckptkit.ops.thin import leftovers_of_thinning
from ckptkit.progress import NO_PROGRESS, Progress
from ckptkit.storage.base import ObjectInfo, Store, normalize_key
from ckptkit.storage.local import TEMP_MARKER

DEFAULT_GRACE_SECONDS = 3600.0
THINNING_LEFTOVER = "file a thinning dropped from its checkpoint's manifest"


@dataclass(frozen=True)
class Debris:
    prefix: str  # a key prefix (directory) or a single key
    reason: str
    objects: int
    size: int
    age_seconds: float


@dataclass(frozen=True)
class SkippedKey:
    """An object key no store path can name (``a//b``, ``./x``, ``../x``, ``dir/``): some other
    tool wrote it, and ckptkit can neither read nor delete it by name, so gc leaves it."""

    key: str
    reason: str


@dataclass
class GcReport:
    url: str
    dry_run: bool
    removed: list[Debris] = field(default_factory=list)
    kept_young: list[Debris] = field(default_factory=list)
    skipped: list[SkippedKey] = field(default_factory=list)
    blobs: SweepReport | None = None  # the blob store's sweep; None where the root has none

    @property
    def bytes_removed(self) -> int:
        """Bytes of debris removed; blobs freed are ``blobs.freed_bytes``."""
        return sum(d.size for d in self.removed)


def _debris(prefix: str, reason: str, objects: list[ObjectInfo], now: float) -> Debris:
    newest = max((o.mtime or now for o in objects), default=now)
    return Debris(prefix, reason, len(objects), sum(o.size for o in objects), max(0.0, now - newest))


def _directory_age(root: Store, name: str, now: float) -> float | None:
    """How long ago anything was last written into directory ``name`` or one below it, on
    local disk (None elsewhere). A file's mtime does not say it: a hard link carries its
    target's, and a deduplicated save's staging directory holds links to blobs written hours
    ago."""
    path = root.local_path(name)
    if path is None:
        return None
    newest = None
    for directory, _dirs, _files in os.walk(path):
        with contextlib.suppress(FileNotFoundError):
            mtime = os.stat(directory).st_mtime
            newest = mtime if newest is None else max(newest, mtime)
    return None if newest is None else max(0.0, now - newest)


def _nameable(key: str) -> bool:
    try:
        normalize_key(key)
    except InvalidURLError:
        return False
    return True


def find_debris(
    root: Store, *, now: float | None = None, skipped: list[SkippedKey] | None = None
) -> list[Debris]:
    """Everything under ``root`` that ckptkit left behind and no committed checkpoint uses.

    Keys no store path can name are left alone, and so is any debris that holds one (deleting
    it would fail on that key midway); ``skipped`` receives each such key with the reason.
    """
    now = time.time() if now is None else now
    by_top: dict[str, list[ObjectInfo]] = defaultdict(list)
    odd: list[str] = []
    for info in root.list(""):
        if _nameable(info.key):
            by_top[info.key.split("/", 1)[0]].append(info)
        else:
            odd.append(info.key)

    # A save killed right after creating its staging directory leaves it empty; object
    # listings do not show empty directories, so look at the root's directories too.
    for name in root.list_dirs(""):
        if is_ckptkit_debris_dir(name) and name not in by_top:
            by_top[name] = []
    found: list[Debris] = []
    for top, objects in sorted(by_top.items()):
        if is_ckptkit_debris_dir(top):
            staging = STAGING_MARKER in top
            kind = "staging directory of an interrupted save" if staging else "checkpoint being deleted"
            item = _debris(top, kind, objects, now)
            written = _directory_age(root, top, now)
            if written is not None and (not objects or written < item.age_seconds):
                item = dataclasses.replace(item, age_seconds=written)
            found.append(item)
            continue
        temps = [o for o in objects if o.key.rsplit("/", 1)[-1].startswith(TEMP_MARKER)]
        found.extend(_debris(o.key, "temporary file of an interrupted write", [o], now) for o in temps)
        found.extend(_orphan_attempts(root, top, objects, now))
        found.extend(_thinning_leftovers(root, top, objects, now))
    return _without_odd_keys(found, odd, skipped if skipped is not None else [])


def _without_odd_keys(found: list[Debris], odd: list[str], skipped: list[SkippedKey]) -> list[Debris]:
    holding = {key: next((d.prefix for d in found if key.startswith(d.prefix + "/")), None) for key in odd}
    for key, prefix in holding.items():
        where = f"; {prefix} holds it and is left in place too" if prefix else ""
        skipped.append(SkippedKey(key, f"no store path can name this key (empty, '.' or '..' part){where}"))
    blocked = set(holding.values())
    return [d for d in found if d.prefix not in blocked]


def _orphan_attempts(root: Store, top: str, objects: list[ObjectInfo], now: float) -> list[Debris]:
    attempts: dict[str, list[ObjectInfo]] = defaultdict(list)
    for info in objects:
        parts = info.key.split("/")
        if len(parts) >= 3 and ATTEMPT_RE.match(parts[1]):
            attempts[parts[1]].append(info)
    if not attempts:
        return []
    listed: set[str] = set()
    if any(o.key == f"{top}/{MANIFEST_NAME}" for o in objects):
        try:
            manifest = read_manifest(root.child(top))
        except (ManifestError, NotCommittedError):
            return []  # an unreadable manifest: leave everything for a human to look at
        listed = {entry.path.split("/", 1)[0] for entry in manifest.files}
    return [
        _debris(f"{top}/{attempt}", "data of an uncommitted or superseded save attempt", objs, now)
        for attempt, objs in sorted(attempts.items())
        if attempt not in listed
    ]


def _thinning_leftovers(root: Store, top: str, objects: list[ObjectInfo], now: float) -> list[Debris]:
    """Files a thinning dropped from a committed manifest but was killed before deleting."""
    if not any(o.key == f"{top}/{MANIFEST_NAME}" for o in objects):
        return []
    try:
        manifest = read_manifest(root.child(top))
    except (ManifestError, NotCommittedError):
        return []  # unreadable, or deleted since the listing: nothing to say what was dropped
    below = {o.key[len(top) + 1 :]: o for o in objects}
    leftovers = leftovers_of_thinning(root.child(top), manifest, present=below)
    return [_debris(f"{top}/{key}", THINNING_LEFTOVER, [below[key]], now) for key in leftovers]


def collect_garbage(
    root: Store,
    *,
    grace_seconds: float = DEFAULT_GRACE_SECONDS,
    dry_run: bool = False,
    progress: Progress | None = None,
) -> GcReport:
    """Remove debris older than ``grace_seconds`` (or only report it, with ``dry_run``), then
    sweep the blob store: unreferenced blobs go, pins older than ``grace_seconds`` stop
    protecting anything and go too. ``progress`` hears of the debris objects and bytes removed."""
    local = root.local_path("")
    if local is not None and not local.is_dir():
        raise NotFoundError(f"{root.url}: no such directory")
    report = GcReport(root.url, dry_run)
    for item in find_debris(root, skipped=report.skipped):
        (report.kept_young if item.age_seconds < grace_seconds else report.removed).append(item)
    if not dry_run:
        _remove(root, report.removed, progress or NO_PROGRESS)
    # After the debris: a staged manifest of a dead save protects its blobs until it is gone.
    swept = sweep(root, stale_after=grace_seconds, dry_run=dry_run)
    report.blobs = swept if swept.has_store else None
    return report


def _remove(root: Store, items: list[Debris], progress: Progress) -> None:
    progress.start(sum(d.size for d in items), sum(d.objects for d in items))
    try:
        for item in items:
            temporary = item.prefix.rsplit("/", 1)[-1].startswith(TEMP_MARKER)
            if item.objects == 1 and (temporary or item.reason == THINNING_LEFTOVER):
                root.delete(item.prefix)
            else:
                root.delete_prefix(item.prefix)
            progress.advance(item.size)
            progress.file_done(item.objects)
    finally:
        progress.finish()
