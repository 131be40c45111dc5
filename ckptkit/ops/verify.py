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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from ckptkit.catalog import list_checkpoints, read_manifest
from ckptkit.errors import ManifestError, NotCommittedError, NotFoundError
from ckptkit.hashing import chunk_ranges, hash_range
from ckptkit.manifest import MANIFEST_NAME, FileEntry, Manifest
from ckptkit.storage import open_store, split_url
from ckptkit.storage.base import Store
from ckptkit.storage.local import follow_named_path

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Finding:
    """One problem: which file, what kind, and for digests the byte range that is wrong."""

    path: str
    kind: str  # missing | size | digest | unlisted | manifest | incomplete
    message: str
    severity: Severity = "error"
    byte_range: tuple[int, int] | None = None


@dataclass
class VerifyReport:
    url: str
    status: str  # ok | failed | not-committed
    step: int | None = None
    layout: str | None = None
    files_checked: int = 0
    bytes_checked: int = 0
    quick: bool = False
    seconds: float = 0.0
    # Without a manifest: how many files were recognised as checkpoint content by the
    # structural checks (None when a manifest was verified).
    checkpoint_files: int | None = None
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(f.severity == "error" for f in self.findings)

    def to_json(self) -> dict[str, object]:
        data = asdict(self)
        data["ok"] = self.ok
        return data


def default_jobs() -> int:
    # Hashing releases the GIL; two threads per core keep the disk busy while others hash.
    return max(2, 2 * (os.cpu_count() or 1))


def verify_checkpoint(checkpoint: Store, *, quick: bool = False, jobs: int | None = None) -> VerifyReport:
    """Check the checkpoint rooted at ``checkpoint`` against its committed manifest."""
    started = time.perf_counter()
    report = VerifyReport(url=checkpoint.url, status="failed", quick=quick)
    try:
        manifest = read_manifest(checkpoint)
    except NotCommittedError as exc:
        report.status = "not-committed"
        report.findings.append(Finding(MANIFEST_NAME, "manifest", str(exc)))
        return report
    except ManifestError as exc:
        report.findings.append(Finding(MANIFEST_NAME, "manifest", f"invalid manifest: {exc}"))
        return report
    report.step, report.layout = manifest.step, manifest.layout

    present = {info.key: info.size for info in checkpoint.list("")}
    to_hash: list[FileEntry] = []
    for entry in manifest.files:
        if entry.path not in present:
            report.findings.append(Finding(entry.path, "missing", f"{entry.path}: file is missing"))
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
    if not quick:
        report.findings.extend(_check_digests(checkpoint, manifest, to_hash, jobs or default_jobs()))
    report.status = "ok" if report.ok else "failed"
    report.seconds = time.perf_counter() - started
    return report


def verify_path(
    url: str, *, quick: bool = False, jobs: int | None = None, **storage_options: Any
) -> list[VerifyReport]:
    """:func:`verify_tree` for a path or URL, which may also name a single file: a file gets
    the structural checks of its format (a file has no manifest of its own)."""
    from ckptkit.api import split_parent
    from ckptkit.ops.structural import verify_structure

    scheme, rest = split_url(url)
    if scheme in (None, "file", "local"):
        local = follow_named_path(rest)
        if Path(local).is_file():
            parent, name = split_parent(local)
            return [verify_structure(open_store(parent, **storage_options), keys=[name])]
        return verify_tree(open_store(local, **storage_options), quick=quick, jobs=jobs)
    store = open_store(url, **storage_options)
    if "/" in rest.strip("/") and not store.exists(MANIFEST_NAME):
        parent, name = split_parent(url)
        parent_store = open_store(parent, **storage_options)
        if parent_store.exists(name):  # one HEAD: the URL names an object, not a prefix
            return [verify_structure(parent_store, keys=[name])]
    return verify_tree(store, quick=quick, jobs=jobs)


def _verify_foreign(store: Store) -> VerifyReport:
    from ckptkit.ops.structural import verify_structure

    report = verify_structure(store)
    if not report.checkpoint_files and report.ok:
        raise NotCommittedError(
            f"{store.url}: no checkpoint here (no {MANIFEST_NAME}, no committed checkpoint below it, "
            "and no checkpoint files to check); for a checkpoint another tool wrote, run "
            "'ckptkit index' on it"
        )
    return report


def _check_digests(
    checkpoint: Store, manifest: Manifest, entries: list[FileEntry], jobs: int
) -> list[Finding]:
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
            actual = hash_range(checkpoint, entry.path, start, end)
        except NotFoundError:
            return Finding(entry.path, "missing", f"{entry.path}: removed while verifying")
        if actual == entry.chunks[index]:
            return None
        return Finding(
            entry.path, "digest",
            f"{entry.path}: content differs from the manifest in bytes [{start}, {end}) "
            f"(chunk {index}: expected sha256 {entry.chunks[index][:16]}…, got {actual[:16]}…)",
            byte_range=(start, end),
        )

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        found = [f for f in pool.map(check, work) if f is not None]
    return sorted(found, key=lambda f: (f.path, f.byte_range or (0, 0)))


def verify_tree(store: Store, *, quick: bool = False, jobs: int | None = None) -> list[VerifyReport]:
    """Verify ``store`` as one checkpoint if it holds a manifest, else every committed checkpoint
    below it; a directory with neither (a checkpoint another tool wrote) gets the structural
    checks that need no manifest (:mod:`ckptkit.ops.structural`)."""
    if store.exists(MANIFEST_NAME):
        return [verify_checkpoint(store, quick=quick, jobs=jobs)]
    local = store.local_path("")
    if local is not None and not local.exists():
        raise NotFoundError(f"{store.url}: no such file or directory")
    checkpoints = list_checkpoints(store)
    if not any(c.committed for c in checkpoints):
        return [_verify_foreign(store)]
    reports = []
    for info in checkpoints:
        # An invalid manifest is verified on its own, so the finding says what is wrong with it.
        if info.committed or info.status == "invalid":
            report = verify_checkpoint(store.child(info.name), quick=quick, jobs=jobs)
            if not info.committed:
                report.step = info.step  # from its name: the manifest that would say did not parse
            reports.append(report)
        else:
            report = VerifyReport(url=info.url, status="not-committed", step=info.step, quick=quick)
            report.findings.append(
                Finding(
                    info.name, "incomplete",
                    f"{info.name}: {info.status}, not a committed checkpoint; latest() ignores it"
                    + (" ('ckptkit gc' removes ckptkit's own debris)" if info.status == "incomplete" else ""),
                    "warning" if info.status == "incomplete" else "error",
                )
            )
            reports.append(report)
    return reports

