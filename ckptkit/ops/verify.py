"""Verify a committed checkpoint against its manifest.

Every listed file must be present with its recorded size and digest; a mismatch names the file
and the 64 MiB byte range that differs. Files present but not listed are warnings (a trainer may
drop extra files in; they are not part of the checkpoint). Chunks of all files are hashed in
parallel, so verification runs at disk speed rather than one core's hashing speed.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ckptkit.catalog import CheckpointInfo, list_checkpoints, read_manifest
from ckptkit.commit import files_of, logical_path
from ckptkit.errors import ManifestError, NotCommittedError, NotFoundError
from ckptkit.formats.zero import RESHARD_KEY
from ckptkit.hashing import chunk_ranges, get_algorithm, hash_range
from ckptkit.manifest import MANIFEST_NAME, FileEntry, Manifest
from ckptkit.ops.structural import verify_structure
from ckptkit.ops.verify_report import Finding, VerifyReport
from ckptkit.progress import NO_PROGRESS, Progress
from ckptkit.storage.base import Store
from ckptkit.storage.target import resolve_target

# Chunks hashed at once when the checkpoint is remote: each chunk is one streamed GET that waits
# on the network far longer than it hashes, so cores are the wrong measure there. The
# process-wide request bound (storage/ranged.py) still caps the connections.
REMOTE_JOBS = 8


def default_jobs(store: Store | None = None) -> int:
    """Chunks hashed at once: one per core for local files, :data:`REMOTE_JOBS` for a remote
    store. Locally, reads and BLAKE3 both release the GIL and one thread keeps its core busy: on
    a 2-core Xeon, 1 GB warm in tmpfs or page cache verified fastest with 2 threads (3 and 4 were
    10-30 % slower; SHA-256's old default of 2 x cores was slower than 1)."""
    cores = os.cpu_count() or 1
    if store is not None and store.local_path(MANIFEST_NAME) is None:
        return max(REMOTE_JOBS, cores)
    return cores


@dataclass
class _Pending:
    """A checkpoint whose listing was checked against its manifest; its digests come next, once
    the bytes of every checkpoint in the run are known (one progress total for all of them)."""

    checkpoint: Store
    report: VerifyReport
    manifest: Manifest | None = None
    to_hash: list[FileEntry] = field(default_factory=list)

    @property
    def bytes_to_hash(self) -> int:
        return 0 if self.report.quick else sum(e.size for e in self.to_hash)


def verify_checkpoint(
    checkpoint: Store, *, quick: bool = False, jobs: int | None = None, progress: Progress | None = None
) -> VerifyReport:
    """Check the checkpoint rooted at ``checkpoint`` against its committed manifest;
    ``progress`` hears of the bytes hashed."""
    (report,) = _check_contents([_check_listing(checkpoint, quick)], jobs, progress)
    return report


def _check_listing(checkpoint: Store, quick: bool) -> _Pending:
    """Presence and sizes: everything but the digests."""
    started = time.perf_counter()
    report = VerifyReport(url=checkpoint.url, status="failed", quick=quick)
    try:
        manifest = read_manifest(checkpoint)
    except NotCommittedError as exc:
        report.status = "not-committed"
        report.findings.append(Finding(MANIFEST_NAME, "manifest", str(exc)))
        return _Pending(checkpoint, report)
    except ManifestError as exc:
        report.findings.append(Finding(MANIFEST_NAME, "manifest", f"invalid manifest: {exc}"))
        return _Pending(checkpoint, report)
    report.step, report.layout = manifest.step, manifest.layout

    present = {info.key: info.size for info in checkpoint.list("")}
    present.update(_blob_sizes(checkpoint, manifest))
    to_hash: list[FileEntry] = []
    for entry in manifest.files:
        if present.get(entry.path) is None:
            where = f" (blob {entry.blob} is not in the blob store)" if entry.blob else ""
            report.findings.append(Finding(entry.path, "missing", f"{entry.path}: file is missing{where}"))
        elif present[entry.path] != entry.size:
            actual = present[entry.path]
            report.findings.append(
                Finding(
                    entry.path, "size",
                    f"{entry.path}: size {actual} bytes, manifest records {entry.size}"
                    + (" (truncated)" if actual < entry.size else ""),
                    byte_range=(min(actual, entry.size), max(actual, entry.size)),
                )
            )
        else:
            to_hash.append(entry)
    listed = {entry.path for entry in manifest.files} | {MANIFEST_NAME}
    for key in sorted(present.keys() - listed):
        report.findings.append(
            Finding(key, "unlisted", f"{key}: present but not in the manifest", "warning")
        )

    report.files_checked = len(manifest.files)
    report.bytes_checked = sum(e.size for e in to_hash)
    report.seconds = time.perf_counter() - started
    return _Pending(checkpoint, report, manifest, to_hash)


def _blob_sizes(checkpoint: Store, manifest: Manifest) -> dict[str, int | None]:
    """The size of each deduplicated file's blob (None: missing), by the file's manifest path.
    A blob is what readers read, so it is what must be there, whatever lies at the path."""
    if not manifest.blobs:
        return {}
    files = files_of(checkpoint, manifest)

    def size(entry: FileEntry) -> tuple[str, int | None]:
        try:
            return entry.path, files.head(logical_path(entry.path)).size
        except NotFoundError:
            return entry.path, None

    with ThreadPoolExecutor(max_workers=default_jobs(checkpoint)) as pool:
        return dict(pool.map(size, manifest.blobs))


def _check_contents(
    pending: list[_Pending], jobs: int | None, progress: Progress | None
) -> list[VerifyReport]:
    """The digests of every pending checkpoint, under one progress display."""
    progress = progress or NO_PROGRESS
    progress.start(sum(p.bytes_to_hash for p in pending))
    try:
        return [_check_content(p, jobs or default_jobs(p.checkpoint), progress) for p in pending]
    finally:
        progress.finish()


def _check_content(pending: _Pending, jobs: int, progress: Progress) -> VerifyReport:
    report = pending.report
    if pending.manifest is None:  # no manifest to check against: the listing said why
        return report
    started = time.perf_counter()
    if not report.quick:
        report.findings.extend(
            _check_digests(pending.checkpoint, pending.manifest, pending.to_hash, jobs, progress)
        )
        if RESHARD_KEY in pending.manifest.metadata and report.ok:
            report.findings.extend(_check_certificate(pending.checkpoint, pending.manifest, jobs))
    report.status = "ok" if report.ok else "failed"
    report.seconds += time.perf_counter() - started
    return report


def _check_certificate(checkpoint: Store, manifest: Manifest, jobs: int) -> list[Finding]:
    """A resharded checkpoint's conservation certificate, re-checked against its partitions.
    Only once every file matched its digest: a corrupt file is already a finding, and its
    partitions may not even parse."""
    from ckptkit.ops.reshard_certificate import check_certificate  # torch-free, but not needed otherwise

    files = files_of(checkpoint, manifest)
    return [
        Finding(RESHARD_KEY, "certificate", f"reshard certificate: {problem}")
        for problem in check_certificate(files, manifest.metadata, jobs)
    ]


def verify_path(
    url: str,
    *,
    quick: bool = False,
    jobs: int | None = None,
    progress: Progress | None = None,
    **storage_options: Any,
) -> list[VerifyReport]:
    """:func:`verify_tree` for a path or URL, which may also name a single file: a file gets
    the structural checks of its format (a file has no manifest of its own)."""
    target = resolve_target(url, **storage_options)
    if target.key is not None:
        sizes = {target.key: target.size}
        return [verify_structure(target.store, keys=[target.key], sizes=sizes, progress=progress)]
    return verify_tree(target.store, quick=quick, jobs=jobs, progress=progress)


def _verify_foreign(store: Store, progress: Progress | None) -> VerifyReport:
    report = verify_structure(store, progress=progress)
    if not report.checkpoint_files and report.ok:
        raise NotCommittedError(
            f"{store.url}: no checkpoint here (no {MANIFEST_NAME}, no committed checkpoint below it, "
            "and no checkpoint files to check); for a checkpoint another tool wrote, run "
            "'ckptkit index' on it"
        )
    return report


def _check_digests(
    checkpoint: Store, manifest: Manifest, entries: list[FileEntry], jobs: int, progress: Progress
) -> list[Finding]:
    # A deduplicated file is read where its bytes lie: in the blob store.
    files = files_of(checkpoint, manifest) if manifest.blobs else checkpoint
    work = [
        (entry, index, start, end)
        for entry in entries
        for index, (start, end) in enumerate(chunk_ranges(entry.size, manifest.chunk_size))
    ]
    # Largest chunks first keeps every worker busy until the end.
    work.sort(key=lambda w: w[3] - w[2], reverse=True)

    def check(item: tuple[FileEntry, int, int, int]) -> Finding | None:
        entry, index, start, end = item
        try:
            # Each file under the algorithm its own digest names: a manifest may mix them.
            store, key = (files, logical_path(entry.path)) if entry.blob else (checkpoint, entry.path)
            actual = hash_range(store, key, start, end, algorithm=entry.algorithm, on_bytes=progress.advance)
        except NotFoundError:
            return Finding(entry.path, "missing", f"{entry.path}: removed while verifying")
        if actual == entry.chunks[index]:
            return None
        algorithm = get_algorithm(entry.algorithm).choice
        return Finding(
            entry.path, "digest",
            f"{entry.path}: content differs from the manifest in bytes [{start}, {end}) "
            f"(chunk {index}: expected {algorithm} {entry.chunks[index][:16]}…, got {actual[:16]}…)",
            byte_range=(start, end),
        )

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        found = [f for f in pool.map(check, work) if f is not None]
    return sorted(found, key=lambda f: (f.path, f.byte_range or (0, 0)))


def verify_tree(
    store: Store, *, quick: bool = False, jobs: int | None = None, progress: Progress | None = None
) -> list[VerifyReport]:
    """Verify ``store`` as one checkpoint if it holds a manifest, else every committed checkpoint
    below it; a directory with neither (a checkpoint another tool wrote) gets the structural
    checks that need no manifest (:mod:`ckptkit.ops.structural`)."""
    if store.exists(MANIFEST_NAME):
        return [verify_checkpoint(store, quick=quick, jobs=jobs, progress=progress)]
    local = store.local_path("")
    if local is not None and not local.exists():
        raise NotFoundError(f"{store.url}: no such file or directory")
    checkpoints = list_checkpoints(store)
    if not any(c.committed for c in checkpoints):
        return [_verify_foreign(store, progress)]
    return _check_contents([_listed(store, info, quick) for info in checkpoints], jobs, progress)


def _listed(store: Store, info: CheckpointInfo, quick: bool) -> _Pending:
    # An invalid manifest is verified on its own, so the finding says what is wrong with it.
    if info.committed or info.status == "invalid":
        pending = _check_listing(store.child(info.name), quick)
        if not info.committed:
            pending.report.step = info.step  # from its name: the manifest that would say did not parse
        return pending
    report = VerifyReport(url=info.url, status="not-committed", step=info.step, quick=quick)
    report.findings.append(
        Finding(
            info.name, "incomplete",
            f"{info.name}: {info.status}, not a committed checkpoint; latest() ignores it"
            + (" ('ckptkit gc' removes ckptkit's own debris)" if info.status == "incomplete" else ""),
            "warning" if info.status == "incomplete" else "error",
        )
    )
    return _Pending(store.child(info.name), report)
