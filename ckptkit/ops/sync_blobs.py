"""The blob side of ``sync``: a deduplicated checkpoint's blobs reach the destination root's blob
store, each at most once per run and none that is there already, under the writer's side of the
blob protocol (:mod:`ckptkit.blobs`: pin the digests, then look for a sweep's lock, then look the
blobs up; unpin once the checkpoints are committed).
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor

from ckptkit.blobs import DEFAULT_STALE_AFTER, BlobWriter, Placement
from ckptkit.errors import AlreadyExistsError, StorageError, VerificationError
from ckptkit.manifest import BLOB_DIR, Manifest, blob_key
from ckptkit.storage.base import Store, join_key
from ckptkit.transfer import RetryPolicy, with_retries

_LOOKUPS = 8  # HEADs in flight when a dry run asks which blobs the destination holds
# A pin this old is renewed before the commit that relies on it, well before sweeps ignore it.
REFRESH_AFTER = DEFAULT_STALE_AFTER / 2


class BlobTransfers:
    """One run's blobs at the destination ``root``: where each goes, which upload brings it.

    A fresh writer id per run: copies written while a sweep holds the lock get names that no
    earlier run used (a copy an interrupted run left may be on the list that sweep deletes).
    """

    def __init__(
        self, root: Store, retry: RetryPolicy, *, dry_run: bool = False, refresh_after: float = REFRESH_AFTER
    ) -> None:
        self.root = root
        self._writer = BlobWriter(root, uuid.uuid4().hex[:12])
        self.store = self._writer.store
        self._retry = retry
        self._dry_run = dry_run
        self._refresh_after = refresh_after
        self._lock = threading.Lock()
        self._uploads: dict[str, Future[int]] = {}
        self._pinned_at: dict[str, float] = {}  # digest → when its newest pin was written

    def place(self, manifest: Manifest, name: str) -> dict[str, Placement]:
        """Where each deduplicated file of ``manifest`` goes, by digest, and whether it is there
        already. Pins the digests until :meth:`close` (a dry run only looks, and pins nothing)."""
        digests = sorted({e.digest for e in manifest.blobs})
        if not digests:
            return {}
        placements = self._peek(digests) if self._dry_run else self._pin(digests, name)
        return dict(zip(digests, placements, strict=True))

    def _pin(self, digests: list[str], name: str) -> list[Placement]:
        pinned_at = time.monotonic()  # before the pin is written: the conservative age
        placements = with_retries(
            lambda: self._writer.place(digests),
            self._retry,
            f"looking up the blobs of {name} in {self.store.url}",
        )
        with self._lock:
            self._pinned_at.update(dict.fromkeys(digests, pinned_at))
        return placements

    def confirm(self, blobs: Mapping[str, str], name: str) -> None:
        """Before committing ``name``, whose blobs (digest → key) are all uploaded or were found:
        if their pins have grown old (a long run), pin them afresh and check each is still
        there. A sweep ignores a stale pin, so one may have deleted a blob this checkpoint
        names; committing then would leave it with a missing blob."""
        now = time.monotonic()
        with self._lock:
            old = sorted(d for d in blobs if now - self._pinned_at.get(d, now) >= self._refresh_after)
        if not old:
            return
        placements = self._pin(old, name)
        if any(p.key != blob_key(d) for d, p in zip(old, placements, strict=True)):
            raise StorageError(
                f"{self.store.url}: a gc holds the blob store's lock while {name}'s pins were "
                "renewed; not committed (run the sync again)"
            )
        missing = [blobs[d] for d in old if not self.store.exists(blobs[d])]
        if missing:
            raise VerificationError(
                f"{self.store.url}: {len(missing)} blob(s) of {name} deleted by a gc after their "
                f"pins went stale; not committed (run the sync again): {', '.join(missing)}",
                missing,
            )

    def _peek(self, digests: list[str]) -> list[Placement]:
        keys = [blob_key(d) for d in digests]
        with ThreadPoolExecutor(max_workers=min(_LOOKUPS, len(keys))) as lookups:
            present = list(lookups.map(self.store.exists, keys))
        return [Placement(k, p) for k, p in zip(keys, present, strict=True)]

    def upload(self, key: str, start: Callable[[], Future[int]]) -> Future[int]:
        """The one upload of blob ``key`` in this run: started now if no checkpoint started it."""
        with self._lock:
            if key not in self._uploads:
                self._uploads[key] = start()
            return self._uploads[key]

    def uploads_of(self, keys: set[str]) -> list[Future[int]]:
        """The uploads of this run that bring ``keys`` (blobs the destination had are absent)."""
        with self._lock:
            return [self._uploads[k] for k in sorted(keys) if k in self._uploads]

    def link(self, attempt_key: str, blobs: Mapping[str, str]) -> None:
        """Give each blob (path → key) its file's name in the attempt too, as a save on local
        disk does, so tools that read the directory find whole files there."""
        for path, blob in blobs.items():
            with contextlib.suppress(AlreadyExistsError):  # linked by an interrupted earlier run
                self.root.link(join_key(BLOB_DIR, blob), join_key(attempt_key, path))

    def close(self) -> None:
        """Unpin: every checkpoint of the run is committed (its manifest protects its blobs now)
        or given up (what it uploaded is the next sweep's to delete)."""
        self._writer.close()
