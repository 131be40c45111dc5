"""``sync``: copy committed checkpoints between any two stores, never committing a partial one.

Each checkpoint is copied the way a save writes it: data first, into an attempt place of its own
at the destination (a hidden staging directory on local disk, ``<name>/ckptkit-<id>/`` on an
object store), then checked, then the manifest last with the destination's commit protocol. The
attempt id is derived from the source manifest's id, so a re-run after an interruption finds
what the last run copied and sends only the rest: a file counts as there when its size and
digest match, the digest read from the object's user metadata (S3) or re-hashed locally (disk),
never downloaded. A checkpoint whose committed manifest at the destination lists the same files
is up to date and costs no transfer at all. A deduplicated checkpoint's blobs go to the blob
store of the destination root, each sent once and none that is there already, under the writer's
side of the blob protocol (:mod:`ckptkit.ops.sync_blobs`).

Only committed checkpoints are copied. An incomplete ckptkit save is skipped (copied raw, never
committed, with ``include_incomplete``); a directory another tool wrote without a manifest is
refused with the hint to run ``ckptkit index``, or indexed in memory with ``index=True`` (the
source is not written to).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ckptkit.blobs import SweepReport, sweep
from ckptkit.catalog import CheckpointInfo, list_checkpoints, read_manifest, step_from_name
from ckptkit.commit import ATTEMPT_RE, CheckpointTransaction, delete_checkpoint, files_of, logical_path
from ckptkit.errors import (
    EXIT_FINDINGS,
    EXIT_OK,
    EXIT_STORAGE,
    AccessDeniedError,
    CkptkitError,
    CommitConflictError,
    InvalidURLError,
    ManifestError,
    NotCommittedError,
    NotFoundError,
    VerificationError,
)
from ckptkit.formats.deepspeed import LATEST, resolve_latest
from ckptkit.manifest import MANIFEST_NAME, FileEntry, Manifest, blob_store_of, parse_manifest
from ckptkit.ops.index import build_index_manifest
from ckptkit.ops.sync_blobs import BlobTransfers
from ckptkit.progress import NO_PROGRESS, Progress
from ckptkit.storage import Store, open_store, split_parent, split_url
from ckptkit.storage.base import join_key
from ckptkit.transfer import RetryPolicy, already_copied, copy_object, with_retries

Action = Literal["copy", "up-to-date", "delete", "skip-incomplete", "copy-incomplete", "refuse", "conflict"]
# Files copied at once. Uploads to S3 share at most 8 requests in flight per destination
# (storage/s3_client.py), which 4 files of 3 parts each keep busy; reading and hashing 4 files
# (both release the GIL) fill 2 cores. Measured on 2 cores against moto, 2 to 8 upload at the
# same speed (the server is the limit there); 4 leaves room for real S3's latency.
DEFAULT_JOBS = 4


@dataclass(frozen=True)
class FilePlan:
    """One file of a checkpoint to copy: where it is at the source and below the attempt.

    ``blob``: the key in the destination root's blob store that holds a deduplicated file's
    bytes (``send`` then says whether this checkpoint uploads it: not when the destination has
    it, nor when an earlier checkpoint of the same run does)."""

    source_key: str
    dest_key: str
    size: int
    entry: FileEntry | None  # None for raw copies of incomplete checkpoints
    send: bool
    blob: str | None = None


@dataclass
class CheckpointPlan:
    """What ``sync`` will do with one checkpoint, decided before any byte moves."""

    name: str
    dest_name: str
    step: int | None
    action: Action
    detail: str = ""
    manifest: Manifest | None = None
    files: list[FilePlan] = field(default_factory=list)
    attempt: str | None = None
    exit_code: int = EXIT_FINDINGS  # of a refusal

    @property
    def bytes_to_send(self) -> int:
        return sum(f.size for f in self.files if f.send)

    @property
    def files_to_send(self) -> int:
        return sum(1 for f in self.files if f.send)


Status = Literal[
    "committed",
    "up-to-date",
    "deleted",
    "skipped",
    "copied-uncommitted",
    "refused",
    "conflict",
    "failed",
    "planned",
]


@dataclass
class CheckpointOutcome:
    """What happened to one checkpoint."""

    name: str
    step: int | None
    action: Action
    status: Status
    files_sent: int = 0
    bytes_sent: int = 0
    files_total: int = 0
    bytes_total: int = 0
    detail: str = ""
    exit_code: int = EXIT_OK

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class SyncReport:
    source: str
    destination: str
    dry_run: bool
    outcomes: list[CheckpointOutcome]
    seconds: float = 0.0
    blobs_released: SweepReport | None = None  # after --delete deleted checkpoints: the sweep

    @property
    def bytes_sent(self) -> int:
        return sum(o.bytes_sent for o in self.outcomes)

    @property
    def files_sent(self) -> int:
        return sum(o.files_sent for o in self.outcomes)

    @property
    def exit_code(self) -> int:
        return max((o.exit_code for o in self.outcomes), default=EXIT_OK)

    @property
    def ok(self) -> bool:
        return self.exit_code == EXIT_OK

    def count(self, status: Status) -> int:
        return sum(1 for o in self.outcomes if o.status == status)

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "destination": self.destination,
            "dry_run": self.dry_run,
            "ok": self.ok,
            "bytes_sent": self.bytes_sent,
            "files_sent": self.files_sent,
            "seconds": round(self.seconds, 3),
            "checkpoints": [o.to_json() for o in self.outcomes],
            "blobs_released": None if self.blobs_released is None else {
                "deleted": len(self.blobs_released.deleted),
                "freed_bytes": self.blobs_released.freed_bytes,
                "skipped": self.blobs_released.skipped,
            },
        }


# --- naming -------------------------------------------------------------------------------------


def sync_attempt_id(manifest: Manifest) -> str:
    """The destination attempt id of a synced checkpoint: a function of the source manifest, so
    every run (and every mirror) of one checkpoint writes to the same place."""
    return hashlib.sha256(f"ckptkit-sync:{manifest.checkpoint_id}".encode()).hexdigest()[:12]


def same_content(a: Manifest, b: Manifest) -> bool:
    """Two manifests list the same files (paths without attempt prefixes, sizes, digests)."""

    def files(m: Manifest) -> set[tuple[str, int, str]]:
        return {(logical_path(f.path), f.size, f.digest) for f in m.files}

    return files(a) == files(b)


def _remapped(manifest: Manifest, data_prefix: str, name: str, blobs: Mapping[str, str]) -> Manifest:
    """The source manifest as committed at the destination: paths under its attempt prefix,
    and the deduplicated files (``blobs``: logical path → key) pointing into the destination
    root's blob store, found from a checkpoint named ``name``."""
    files = tuple(
        sorted(
            (
                dataclasses.replace(
                    f,
                    path=join_key(data_prefix, logical_path(f.path)),
                    blob=blobs.get(logical_path(f.path)),
                )
                for f in manifest.files
            ),
            key=lambda f: f.path,
        )
    )
    blob_store = blob_store_of(name) if blobs else None
    # Round-trip through the parser: a manifest we commit is one we can read.
    return parse_manifest(dataclasses.replace(manifest, files=files, blob_store=blob_store).to_bytes())


def _send_each_blob_once(plans: list[CheckpointPlan]) -> None:
    """A blob that several checkpoints of one run need (a frozen base model's) is uploaded by
    the first of them, in plan order; the others wait for that upload before they commit."""
    claimed: set[str] = set()
    for plan in plans:
        files = []
        for file in plan.files:
            if file.blob is not None and file.send:
                if file.blob in claimed:
                    file = dataclasses.replace(file, send=False)
                claimed.add(file.blob)
            files.append(file)
        plan.files = files


# --- resolving what to sync ---------------------------------------------------------------------


@dataclass(frozen=True)
class SyncTarget:
    """Source and destination roots, and the single checkpoint pair when SRC is one checkpoint."""

    src_root: Store
    dst_root: Store
    single: tuple[str, str] | None


def _is_single_checkpoint(store: Store) -> bool:
    """A committed checkpoint, or a directory another tool wrote that names a step and holds
    files at its top level (an HF ``checkpoint-500``, a DeepSpeed ``global_step7``)."""
    if store.exists(MANIFEST_NAME):
        return True
    name = store.url.rstrip("/").rsplit("/", 1)[-1]
    if step_from_name(name) is None:
        return False
    return any("/" not in info.key for info in store.list(""))


def resolve_sync_target(
    src: str | os.PathLike[str] | Store,
    dst: str | os.PathLike[str] | Store,
    *,
    src_options: dict[str, Any] | None = None,
    dst_options: dict[str, Any] | None = None,
) -> SyncTarget:
    """SRC is a root of checkpoints or one checkpoint; DST is then a root or that checkpoint's
    destination (``DST/`` with a trailing slash: a root to put it in, under the same name)."""
    target = _target(src, dst, src_options or {}, dst_options or {})
    _refuse_overlap(target, src_options or {}, dst_options or {})
    return target


def _target(
    src: str | os.PathLike[str] | Store,
    dst: str | os.PathLike[str] | Store,
    src_options: dict[str, Any],
    dst_options: dict[str, Any],
) -> SyncTarget:
    src_store = open_store(src, **src_options)
    if isinstance(src, Store) or not _is_single_checkpoint(src_store):
        return SyncTarget(src_store, open_store(dst, **dst_options), None)
    if isinstance(dst, Store):
        raise InvalidURLError("to sync one checkpoint, give the destination as a URL or path")
    src_parent, src_name = split_parent(os.fspath(src))
    dst_text = os.fspath(dst)
    if dst_text.endswith("/"):
        dst_parent, dst_name = dst_text.rstrip("/") or "/", src_name
    else:
        dst_parent, dst_name = split_parent(dst_text)
    return SyncTarget(
        open_store(src_parent, **src_options), open_store(dst_parent, **dst_options), (src_name, dst_name)
    )


def _refuse_overlap(target: SyncTarget, src_options: dict[str, Any], dst_options: dict[str, Any]) -> None:
    """Refuse, before anything is written, a destination that would change what is being read
    (inside the source, or holding it) or that lies inside a committed checkpoint, whose
    manifest would not list what sync puts there."""
    src, dst = target.src_root, target.dst_root
    if target.single is not None:
        src, dst = src.child(target.single[0]), dst.child(target.single[1])
    (src_kind, src_parts), (dst_kind, dst_parts) = _location(src, src_options), _location(dst, dst_options)
    if src_kind == dst_kind and (_within(dst_parts, src_parts) or _within(src_parts, dst_parts)):
        where = "inside the source" if _within(dst_parts, src_parts) else "holding the source"
        raise InvalidURLError(f"refusing to sync {src.url} into {dst.url}: the destination is {where}")
    holder = _enclosing_checkpoint(target.dst_root, dst_options)
    if holder is not None:
        raise InvalidURLError(
            f"refusing to sync into {target.dst_root.url}: it is inside the committed checkpoint {holder}"
        )


def _location(store: Store, options: dict[str, Any]) -> tuple[tuple[str, str | None], tuple[str, ...]]:
    """Where a store's root is, comparable between stores: (scheme, endpoint) and path parts,
    a local path resolved through its symbolic links."""
    local = store.local_path("")
    if local is not None:
        return ("file", None), Path(os.path.realpath(local)).parts
    scheme, rest = split_url(store.url)
    scheme = "s3" if scheme == "s3a" else scheme
    return (scheme or "file", options.get("endpoint_url")), tuple(p for p in rest.split("/") if p)


def _within(inner: tuple[str, ...], outer: tuple[str, ...]) -> bool:
    return inner[: len(outer)] == outer


def _enclosing_checkpoint(root: Store, options: dict[str, Any]) -> str | None:
    """The committed checkpoint ``root`` is (or lies inside), if any: one HEAD per level."""
    local = root.local_path("")
    if local is not None:
        top, parts = open_store("/"), Path(os.path.realpath(local)).parts[1:]
    else:
        scheme, rest = split_url(root.url)
        bucket, *parts = [p for p in rest.split("/") if p]
        top = open_store(f"{scheme}://{bucket}", **options)
    for depth in range(len(parts), -1, -1):
        key = join_key(*parts[:depth], MANIFEST_NAME)
        try:
            if top.exists(key):
                return top.child(join_key(*parts[:depth])).url if depth else top.url
        except AccessDeniedError:
            continue  # a policy may deny reads above the prefix it grants: no manifest seen there
    return None


def _describe_one(root: Store, name: str) -> CheckpointInfo | None:
    """The listing entry of one checkpoint, without listing its siblings."""
    try:
        manifest = read_manifest(root.child(name))
    except NotCommittedError:
        objects = list(root.list(name))
        if not objects:
            return None
        return CheckpointInfo(
            root.url,
            name,
            "incomplete",
            step_from_name(name),
            len(objects),
            sum(o.size for o in objects),
            None,
        )
    except ManifestError:
        return CheckpointInfo(root.url, name, "invalid", step_from_name(name), 0, 0, None)
    step = manifest.step if manifest.step is not None else step_from_name(name)
    return CheckpointInfo(
        root.url,
        name,
        "committed",
        step,
        len(manifest.files),
        manifest.total_size,
        manifest.created,
        manifest,
    )


def _holds_attempt_data(root: Store, name: str) -> bool:
    return any(ATTEMPT_RE.match(o.key.split("/", 1)[0]) for o in root.child(name).list(""))


# --- planning -----------------------------------------------------------------------------------


class Syncer:
    """Plans and runs one sync. Use :func:`sync` unless you need the plan on its own."""

    def __init__(
        self,
        target: SyncTarget,
        *,
        jobs: int = DEFAULT_JOBS,
        verify: bool = False,
        delete: bool = False,
        include_incomplete: bool = False,
        index: bool = False,
        retry: RetryPolicy | None = None,
        progress: Progress | None = None,
        names: Sequence[str] | None = None,
        dedup: bool = True,
    ) -> None:
        """``dedup``: a deduplicated checkpoint's blobs go to the destination root's blob store
        (each uploaded once, none the destination has); False writes every file into the
        checkpoint itself and commits a manifest without blobs."""
        if jobs < 1:
            raise ValueError("jobs must be at least 1")
        if delete and target.single is not None:
            raise InvalidURLError("--delete needs roots of checkpoints, not a single checkpoint")
        self.target = target
        self.src_root = target.src_root
        self.dst_root = target.dst_root
        self.jobs = jobs
        self.verify = verify
        self.delete = delete
        self.include_incomplete = include_incomplete
        self.index = index
        self.retry = retry or RetryPolicy()
        self.progress = progress or NO_PROGRESS
        self.names = set(names) if names is not None else None
        self.released: SweepReport | None = None  # the destination's blob sweep after --delete
        self.dedup = dedup
        self._blobs = BlobTransfers(self.dst_root, self.retry)  # one per run: see run()

    def plan(self, pool: ThreadPoolExecutor) -> list[CheckpointPlan]:
        if self.target.single is not None:
            src_name, dst_name = self.target.single
            src_info = _describe_one(self.src_root, src_name)
            if src_info is None:
                raise NotCommittedError(f"{self.src_root.url}/{src_name}: no such checkpoint")
            pairs = [(src_info, dst_name, _describe_one(self.dst_root, dst_name))]
            dst_by_name: dict[str, CheckpointInfo] = {}
        else:
            sources = list_checkpoints(self.src_root)
            if not sources and not self._source_exists():
                raise NotFoundError(f"{self.src_root.url}: nothing there (no such path, or an empty prefix)")
            if self.names is not None:
                sources = [c for c in sources if c.name in self.names]
            dst_by_name = {c.name: c for c in list_checkpoints(self.dst_root)}
            pairs = [(c, c.name, dst_by_name.get(c.name)) for c in sources]
        # Checkpoints are planned side by side (a HEAD and a LIST each on an object store); their
        # files' checks run on ``pool``, so the planners get threads of their own.
        with ThreadPoolExecutor(max_workers=max(1, min(16, len(pairs)))) as planners:
            plans = list(planners.map(lambda p: self._plan_safely(*p, pool), pairs))
        _send_each_blob_once(plans)
        if self.delete:
            plans.extend(self._plan_deletions([src for src, _, _ in pairs], dst_by_name))
        return plans

    def _source_exists(self) -> bool:
        """A local directory that exists (even empty), or a prefix holding any object."""
        local = self.src_root.local_path("")
        if local is not None:
            return local.is_dir()
        return next(iter(self.src_root.list("")), None) is not None

    def _plan_safely(
        self, src: CheckpointInfo, dst_name: str, dst: CheckpointInfo | None, pool: ThreadPoolExecutor
    ) -> CheckpointPlan:
        """One checkpoint's plan; an error planning it refuses that checkpoint, not the sync."""
        try:
            return self._plan_one(src, dst_name, dst, pool)
        except CkptkitError as exc:
            return CheckpointPlan(
                src.name, dst_name, src.step, "refuse", detail=f"cannot plan: {exc}", exit_code=exc.exit_code
            )

    def _plan_one(
        self, src: CheckpointInfo, dst_name: str, dst: CheckpointInfo | None, pool: ThreadPoolExecutor
    ) -> CheckpointPlan:
        plan = CheckpointPlan(src.name, dst_name, src.step, "copy")
        if src.status == "invalid":
            return dataclasses.replace(
                plan, action="refuse", detail="the source manifest is invalid: run 'ckptkit verify'"
            )
        manifest = src.manifest
        if src.status == "incomplete":
            if self.include_incomplete:
                return self._plan_raw(plan)
            if _holds_attempt_data(self.src_root, src.name):
                return dataclasses.replace(
                    plan,
                    action="skip-incomplete",
                    detail="an interrupted save, not committed (use --include-incomplete to copy it raw)",
                )
            if not self.index:
                return dataclasses.replace(
                    plan,
                    action="refuse",
                    detail="no ckptkit manifest (written by another tool?): run 'ckptkit index' on it, "
                    "or sync with --index",
                )
            manifest = build_index_manifest(self.src_root.child(src.name), jobs=self.jobs)
        assert manifest is not None
        plan.manifest = manifest
        if dst is not None and dst.status != "incomplete":
            if dst.manifest is not None and same_content(manifest, dst.manifest):
                return dataclasses.replace(plan, action="up-to-date")
            what = (
                "an invalid manifest"
                if dst.manifest is None
                else f"a different checkpoint (id {dst.manifest.checkpoint_id})"
            )
            return dataclasses.replace(
                plan,
                action="conflict",
                detail=f"the destination holds {what} under this name; delete it there first",
            )
        if dst is not None and self.dst_root.capabilities.atomic_rename:
            # The commit renames the staging directory to the name, which this one would block.
            return dataclasses.replace(
                plan,
                action="conflict",
                detail="the destination holds an uncommitted directory under this name "
                "(a raw copy, or another tool's files); remove it first",
            )
        plan.attempt = sync_attempt_id(manifest)
        txn = CheckpointTransaction(self.dst_root, dst_name, attempt=plan.attempt)
        present = {o.key: o.size for o in txn.files.list("")}
        placed = self._blobs.place(manifest, plan.name) if self.dedup else {}
        # A deduplicated checkpoint is read through the view of its files by logical path.
        mapped = manifest.blob_store is not None

        def file_plan(entry: FileEntry) -> FilePlan:
            key = logical_path(entry.path)
            source_key = key if mapped else entry.path
            placement = placed.get(entry.digest) if entry.blob is not None else None
            if placement is not None:
                return FilePlan(source_key, key, entry.size, entry, not placement.present, placement.key)
            there = key in present and already_copied(txn.files, key, present[key], entry)
            return FilePlan(source_key, key, entry.size, entry, send=not there)

        plan.files = list(pool.map(file_plan, manifest.files))
        return plan

    def _plan_raw(self, plan: CheckpointPlan) -> CheckpointPlan:
        objects = list(self.src_root.child(plan.name).list(""))
        files = [FilePlan(o.key, o.key, o.size, None, send=True) for o in objects]
        return dataclasses.replace(
            plan,
            action="copy-incomplete",
            files=files,
            detail="incomplete at the source: copied as is and NOT committed",
        )

    def _plan_deletions(
        self, sources: list[CheckpointInfo], dst_by_name: dict[str, CheckpointInfo]
    ) -> list[CheckpointPlan]:
        source_names = {c.name for c in sources}
        gone = [c for c in dst_by_name.values() if c.committed and c.name not in source_names]
        if gone and not source_names and self.names is None:
            raise InvalidURLError(
                f"{self.src_root.url} holds no checkpoints: refusing --delete, which would remove all "
                f"{len(gone)} at {self.dst_root.url} (wrong source path?)"
            )
        return [CheckpointPlan(c.name, c.name, c.step, "delete", detail="gone from the source") for c in gone]

    # --- running ---------------------------------------------------------------------------------

    def run(self, *, dry_run: bool = False) -> SyncReport:
        started = time.perf_counter()
        self._blobs = BlobTransfers(self.dst_root, self.retry, dry_run=dry_run)
        try:
            with ThreadPoolExecutor(max_workers=self.jobs, thread_name_prefix="ckptkit-sync") as pool:
                try:
                    plans = self.plan(pool)
                    outcomes = [self._planned(p) for p in plans] if dry_run else self._execute(plans, pool)
                except BaseException:  # Ctrl-C or a bug: do not start the copies still queued
                    pool.shutdown(wait=False, cancel_futures=True)
                    raise
        finally:
            self._blobs.close()  # every checkpoint committed or given up: unpin
        return SyncReport(
            self.src_root.url, self.dst_root.url, dry_run, outcomes, time.perf_counter() - started,
            blobs_released=self.released,
        )

    def _planned(self, plan: CheckpointPlan) -> CheckpointOutcome:
        outcome = self._outcome(plan, "planned")
        outcome.files_sent, outcome.bytes_sent = plan.files_to_send, plan.bytes_to_send
        if plan.action in ("refuse", "conflict"):
            outcome.status = "refused" if plan.action == "refuse" else "conflict"
            outcome.exit_code = plan.exit_code if plan.action == "refuse" else CommitConflictError.exit_code
        return outcome

    def _outcome(self, plan: CheckpointPlan, status: Status) -> CheckpointOutcome:
        return CheckpointOutcome(
            plan.dest_name,
            plan.step,
            plan.action,
            status,
            files_total=len(plan.manifest.files) if plan.manifest else len(plan.files),
            bytes_total=plan.manifest.total_size if plan.manifest else sum(f.size for f in plan.files),
            detail=plan.detail,
        )

    def _execute(self, plans: list[CheckpointPlan], pool: ThreadPoolExecutor) -> list[CheckpointOutcome]:
        sending = [p for p in plans if p.action in ("copy", "copy-incomplete")]
        self.progress.start(sum(p.bytes_to_send for p in sending), sum(p.files_to_send for p in sending))
        transfers: dict[int, list[Future[int]] | CkptkitError] = {}
        for plan in sending:
            try:
                transfers[id(plan)] = self._submit(plan, pool)
            except CkptkitError as exc:  # committed at the destination since we planned
                transfers[id(plan)] = exc
        outcomes = []
        try:
            for plan in plans:
                if plan.action != "delete":
                    outcomes.append(self._finish(plan, transfers.get(id(plan), []), pool))
        finally:
            self.progress.finish()
        copies_failed = any(o.status == "failed" for o in outcomes)
        for plan in plans:
            if plan.action == "delete":
                outcomes.append(self._delete(plan, blocked=copies_failed))
        if any(o.action == "delete" and o.status == "deleted" for o in outcomes):
            outcomes.extend(self._release_blobs())
        if self.target.single is None and not copies_failed:
            self._sync_deepspeed_latest(outcomes)
        return outcomes

    def _submit(self, plan: CheckpointPlan, pool: ThreadPoolExecutor) -> list[Future[int]]:
        source = self.src_root.child(plan.name)
        if plan.manifest is not None and plan.manifest.blob_store is not None:
            source = files_of(source, plan.manifest)  # each file by its logical path, wherever it lies
        # Blobs first: later checkpoints of this run wait for them, whatever becomes of this one.
        futures = [self._upload_blob(pool, source, f) for f in plan.files if f.send and f.blob is not None]
        if plan.action == "copy":
            assert plan.attempt is not None
            dest = CheckpointTransaction(self.dst_root, plan.dest_name, attempt=plan.attempt).files
        else:
            dest = self.dst_root.child(plan.dest_name)
        files = [f for f in plan.files if f.send and f.blob is None]
        return futures + [pool.submit(self._send, source, dest, f.dest_key, f) for f in files]

    def _upload_blob(self, pool: ThreadPoolExecutor, source: Store, file: FilePlan) -> Future[int]:
        blob = file.blob
        assert blob is not None
        store = self._blobs.store
        return self._blobs.upload(blob, lambda: pool.submit(self._send, source, store, blob, file))

    def _send(self, source: Store, dest: Store, dest_key: str, file: FilePlan) -> int:
        what = f"copying {source.url}/{file.source_key} to {dest.url}/{dest_key}"
        size = with_retries(
            lambda: copy_object(
                source, file.source_key, dest, dest_key, file.entry, on_bytes=self.progress.advance
            ),
            self.retry,
            what,
        )
        self.progress.file_done()
        return size

    def _borrowed_uploads(self, plan: CheckpointPlan) -> list[Future[int]]:
        """The uploads of this run, owned by an earlier checkpoint, of blobs this one needs."""
        own = {f.blob for f in plan.files if f.send}
        needed = {f.blob for f in plan.files if f.blob is not None and f.blob not in own}
        return self._blobs.uploads_of(needed)

    def _finish(
        self, plan: CheckpointPlan, transfers: list[Future[int]] | CkptkitError, pool: ThreadPoolExecutor
    ) -> CheckpointOutcome:
        if plan.action in ("copy", "copy-incomplete"):
            outcome = self._outcome(plan, "failed")
            errors: list[BaseException] = [transfers] if isinstance(transfers, CkptkitError) else []
            for future in [] if isinstance(transfers, CkptkitError) else transfers:
                try:
                    outcome.bytes_sent += future.result()
                    outcome.files_sent += 1
                except (CkptkitError, OSError) as exc:  # OSError: one no adapter translated
                    errors.append(exc)
            for future in self._borrowed_uploads(plan):
                try:
                    future.result()
                except (CkptkitError, OSError) as exc:
                    errors.append(exc)
            if errors:
                outcome.detail = f"{len(errors)} file(s) failed, not committed: {errors[0]}"
                outcome.exit_code = max(getattr(e, "exit_code", EXIT_STORAGE) for e in errors)
                return outcome
            if plan.action == "copy-incomplete":
                outcome.status = "copied-uncommitted"
                return outcome
            try:
                self._commit(plan, pool)
            except (CkptkitError, OSError) as exc:
                outcome.detail = f"not committed: {exc}"
                outcome.exit_code = getattr(exc, "exit_code", EXIT_STORAGE)
                return outcome
            outcome.status = "committed"
            return outcome
        outcome = self._planned(plan)
        outcome.files_sent = outcome.bytes_sent = 0
        outcome.status = {
            "up-to-date": "up-to-date",
            "skip-incomplete": "skipped",
            "refuse": "refused",
            "conflict": "conflict",
        }[plan.action]
        return outcome

    def _commit(self, plan: CheckpointPlan, pool: ThreadPoolExecutor) -> None:
        """Check the attempt holds exactly the manifest's files, then commit the manifest."""
        assert plan.manifest is not None and plan.attempt is not None
        txn = CheckpointTransaction(self.dst_root, plan.dest_name, attempt=plan.attempt)
        blobs = {f.dest_key: f.blob for f in plan.files if f.blob is not None}
        by_digest = {f.entry.digest: f.blob for f in plan.files if f.blob is not None and f.entry is not None}
        self._blobs.confirm(by_digest, plan.dest_name)  # a long run's pins renewed first
        linked = self.dst_root.capabilities.hard_links
        if linked:
            self._blobs.link(txn.attempt_key, blobs)
        present = {o.key: o.size for o in txn.files.list("")}
        # Blobs lie in the blob store (uploaded in this run, or found there under our pin); on
        # local disk each is also linked into the checkpoint, and checked there.
        wanted = {f.dest_key: f for f in plan.files if linked or f.blob is None}
        wrong = sorted(k for k, f in wanted.items() if present.get(k) != f.size)
        if wrong:
            raise VerificationError(
                f"{txn.files.url}: missing or wrong size after copy: {', '.join(wrong)}", wrong
            )
        for key in present.keys() - wanted.keys():
            txn.files.delete(key)  # debris of a killed write (a local temp file): not ours to commit
        if self.verify:
            self._verify_copies(txn.files, plan, pool)
        manifest = _remapped(plan.manifest, txn.data_prefix, plan.dest_name, blobs)
        with_retries(
            lambda: txn.commit_manifest(manifest),
            self.retry,
            f"committing {self.dst_root.url}/{plan.dest_name}",
        )

    def _verify_copies(self, files: Store, plan: CheckpointPlan, pool: ThreadPoolExecutor) -> None:
        from ckptkit.hashing import digest_object

        bad, damaged = [], []
        for f in plan.files:
            assert f.entry is not None
            store, key = (files, f.dest_key) if f.blob is None else (self._blobs.store, f.blob)
            copied = digest_object(store, key, f.size, pool, algorithm=f.entry.algorithm)
            if copied.digest == f.entry.digest:
                continue
            if f.blob is None:
                files.delete(f.dest_key)  # so that a re-run sends it again
                bad.append(f.dest_key)
            else:  # maybe shared with committed checkpoints: never deleted here (the blob protocol)
                damaged.append(f"{store.url}/{key}")
        if damaged:
            raise VerificationError(
                f"read back from the destination's blob store: {len(damaged)} blob(s) differ from their "
                f"digest (damaged there: run 'ckptkit verify' on its checkpoints): {', '.join(damaged)}",
                damaged,
            )
        if bad:
            raise VerificationError(
                f"read back from {files.url}: {len(bad)} file(s) differ from the source manifest "
                f"(removed, a re-run sends them again): {', '.join(bad)}",
                bad,
            )

    def _delete(self, plan: CheckpointPlan, *, blocked: bool) -> CheckpointOutcome:
        outcome = self._outcome(plan, "deleted")
        if blocked:
            outcome.status, outcome.detail = "skipped", "not deleted: some copies failed in this run"
            return outcome
        try:
            with_retries(
                lambda: delete_checkpoint(self.dst_root, plan.dest_name),
                self.retry,
                f"deleting {plan.dest_name}",
            )
        except CkptkitError as exc:
            outcome.status, outcome.detail, outcome.exit_code = "failed", str(exc), exc.exit_code
        return outcome

    def _release_blobs(self) -> list[CheckpointOutcome]:
        """After deleting checkpoints at the destination, free the blobs that only they used —
        by the blob protocol's sweep, which spares what any manifest or save in flight there
        names; never by listing what this run deleted."""
        try:
            self.released = with_retries(
                lambda: sweep(self.dst_root), self.retry, f"releasing blobs at {self.dst_root.url}"
            )
        except CkptkitError as exc:  # the deletions stand; the next gc releases the blobs
            detail = f"unreferenced blobs not released (the next gc does): {exc}"
            failed = CheckpointOutcome("blob store", None, "delete", "failed", detail=detail)
            failed.exit_code = exc.exit_code
            return [failed]
        return []

    def _sync_deepspeed_latest(self, outcomes: list[CheckpointOutcome]) -> None:
        """Carry DeepSpeed's ``latest`` over once the tag it names is committed at the destination,
        so DeepSpeed's own loader works there too."""
        tag = resolve_latest(self.src_root)
        if tag is None or not any(
            o.name == tag and o.status in ("committed", "up-to-date") for o in outcomes
        ):
            return

        def write_latest() -> None:
            current = (
                self.dst_root.get(LATEST) if self.dst_root.exists(LATEST) else None
            )
            if current is None or current.decode(errors="replace").strip() != tag:
                self.dst_root.put(LATEST, tag.encode())

        try:
            with_retries(write_latest, self.retry, f"writing {self.dst_root.url}/{LATEST}")
        except (CkptkitError, OSError) as exc:  # the checkpoints are committed: report, not raise
            outcomes.append(
                CheckpointOutcome(
                    LATEST,
                    None,
                    "copy",
                    "failed",
                    detail=f"not updated: {exc}",
                    exit_code=getattr(exc, "exit_code", EXIT_STORAGE),
                )
            )


def sync(
    src: str | os.PathLike[str] | Store,
    dst: str | os.PathLike[str] | Store,
    *,
    jobs: int = DEFAULT_JOBS,
    verify: bool = False,
    delete: bool = False,
    dry_run: bool = False,
    include_incomplete: bool = False,
    index: bool = False,
    retry: RetryPolicy | None = None,
    progress: Progress | None = None,
    names: Sequence[str] | None = None,
    src_options: dict[str, Any] | None = None,
    dst_options: dict[str, Any] | None = None,
    dedup: bool = True,
) -> SyncReport:
    """Copy the committed checkpoints of ``src`` to ``dst`` (roots, or one checkpoint each).

    Returns a report; per-checkpoint failures are in it (``report.ok``, ``report.exit_code``),
    not raised, so one bad checkpoint does not stop the others. Usage errors (a missing source,
    ``--delete`` from an empty source) raise. A deduplicated checkpoint's blobs go to the blob
    store of the destination root (a checkpoint's parent), each uploaded once and none that is
    there already; ``dedup=False`` writes every file into the checkpoint instead.
    """
    target = resolve_sync_target(src, dst, src_options=src_options, dst_options=dst_options)
    syncer = Syncer(
        target,
        jobs=jobs,
        verify=verify,
        delete=delete,
        include_incomplete=include_incomplete,
        index=index,
        retry=retry,
        progress=progress,
        names=names,
        dedup=dedup,
    )
    return syncer.run(dry_run=dry_run)
