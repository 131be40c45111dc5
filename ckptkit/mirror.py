"""Background mirroring: committed checkpoints uploaded to a second store while training goes on.

Training waits only for the local commit. One worker thread then copies each checkpoint with
``sync`` (so the remote commits it the same way: data first, manifest last, and a killed upload
leaves no committed checkpoint there; a deduplicated checkpoint's blobs go up once each, into
the remote root's blob store), deletes at the remote what retention deleted locally (then sweeps
the remote's blob store, so only blobs that nothing there names go: :func:`delete_at_target`), and
keeps a status that says what is uploaded, pending and failed. Each upload runs in a child
process at a lower CPU priority (:mod:`ckptkit.mirror_worker`), so its hashing and request
signing never contend with training for the GIL; stores that exist only in this process
(``memory://``, or a target given as a Store object) are mirrored in the thread itself.
Failures are never silent: they are logged, kept in :meth:`Mirror.status`, tried again with the
next job, and raised by :meth:`Mirror.close`. A mirror started on a root that an earlier
process left half-uploaded finishes those uploads first (:meth:`Mirror.catch_up`).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import queue
import subprocess
import sys
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ckptkit.catalog import CheckpointInfo, list_checkpoints
from ckptkit.errors import CkptkitError
from ckptkit.mirror_worker import delete_at_target, thin_at_target
from ckptkit.ops.sync import DEFAULT_JOBS, Syncer, SyncTarget
from ckptkit.retention import RetentionPolicy, candidate, order_candidates
from ckptkit.storage import Store, open_store
from ckptkit.transfer import RetryPolicy

log = logging.getLogger("ckptkit.mirror")

_Job = tuple[Literal["upload", "delete", "thin", "catch-up", "stop"], str]


class MirrorError(CkptkitError):
    """Some checkpoints could not be mirrored; ``failed`` maps each name to its last error."""

    exit_code = 4

    def __init__(self, message: str, failed: dict[str, str]) -> None:
        super().__init__(message)
        self.failed = failed


@dataclass
class MirrorStatus:
    """A snapshot of the mirror: what is at the remote, on its way, and failed (with why)."""

    target: str
    uploaded: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    deleted: list[str] = field(default_factory=list)
    bytes_sent: int = 0

    @property
    def ok(self) -> bool:
        return not self.failed


class Mirror:
    """Mirror checkpoints of ``source`` (a root) to ``target`` (a root URL or store)."""

    def __init__(
        self,
        source: Store,
        target: str | Store,
        *,
        jobs: int = DEFAULT_JOBS,
        retry: RetryPolicy | None = None,
        source_options: dict[str, Any] | None = None,
        isolated: bool | None = None,
        **storage_options: Any,
    ) -> None:
        """``source_options``: the storage options ``source`` was opened with, for the child
        process to open it again. ``isolated``: run uploads in a child process (the default
        wherever that is possible, see :func:`_process_spec`)."""
        self.source = source
        self.target = open_store(target, **storage_options)
        spec = _process_spec(source, source_options or {}, target, storage_options)
        if isolated and spec is None:
            raise ValueError(
                "isolated=True needs URLs of stores a child process can open, with JSON-serialisable "
                "options (not memory://, not a Store object as target)"
            )
        self._process_spec = spec if isolated is not False else None
        self.jobs = jobs
        self.retry = retry or RetryPolicy()
        self._queue: queue.Queue[_Job] = queue.Queue()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._outstanding = 0
        self._pending: list[str] = []
        self._status = MirrorStatus(self.target.url)
        self._failed_jobs: dict[str, _Job] = {}  # what to try again, by the key in status.failed
        self._retention: RetentionPolicy | None = None  # what a catch-up reconciles deletions by
        self._thin_keep: dict[str, tuple[str, ...]] = {}  # what each "thin" job keeps
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="ckptkit-mirror", daemon=True)
        self._thread.start()
        # A script that never calls close() still gets its uploads finished (or reported) at exit.
        # It must run before concurrent.futures refuses new work at interpreter shutdown, which a
        # plain atexit handler would not: threading's exit hooks run first, the newest first.
        register = getattr(threading, "_register_atexit", atexit.register)
        register(_close_at_exit, weakref.ref(self))

    # --- what callers ask for --------------------------------------------------------------------

    def submit(self, name: str) -> None:
        """Upload checkpoint ``name`` (committed under ``source``) in the background."""
        with self._lock:
            retry_now = [
                job for key, job in self._failed_jobs.items() if key != name and key not in self._pending
            ]
        for job in retry_now:  # each new job is also a new try, of the same kind, of what failed
            self._put(job)
        self._put(("upload", name))

    def remove(self, name: str) -> None:
        """Delete checkpoint ``name`` at the remote (retention deleted it locally)."""
        self._put(("delete", name))

    def thin(self, name: str, keep: Sequence[str]) -> None:
        """Thin checkpoint ``name`` at the remote to the top-level ``keep`` (retention's
        ``keep_optimizer_last`` thinned it locally), releasing what it alone named there."""
        with self._lock:
            self._thin_keep[name] = tuple(keep)
        self._put(("thin", name))

    def catch_up(self, retention: RetentionPolicy | None = None) -> None:
        """Upload every committed checkpoint of ``source`` that the remote lacks or holds only
        partly (a process killed mid-upload), in the background.

        With ``retention`` (the policy that deletes under ``source``), also delete at the remote
        what that policy deleted here while the remote deletion died with an earlier process
        (see :func:`stale_at_target`).
        """
        self._retention = retention
        self._put(("catch-up", ""))

    def pending(self) -> set[str]:
        """Checkpoints queued or being uploaded: retention must not delete them locally yet."""
        with self._lock:
            return set(self._pending)

    def status(self) -> MirrorStatus:
        with self._lock:
            return MirrorStatus(
                self._status.target,
                list(self._status.uploaded),
                list(self._pending),
                dict(self._status.failed),
                list(self._status.deleted),
                self._status.bytes_sent,
            )

    def wait(self, timeout: float | None = None) -> MirrorStatus:
        """Block until every queued job has run (or ``timeout`` seconds passed)."""
        with self._idle:
            self._idle.wait_for(lambda: self._outstanding == 0, timeout=timeout)
        return self.status()

    def close(self, timeout: float | None = None, *, raise_on_error: bool = True) -> MirrorStatus:
        """Finish queued uploads, stop the worker; raise :class:`MirrorError` if any failed."""
        if not self._closed:
            self._closed = True
            self._queue.put(("stop", ""))
            self._thread.join(timeout)
        status = self.status()
        if raise_on_error and (status.failed or status.pending):
            problems = dict(status.failed)
            problems.update({name: "still pending when the mirror closed" for name in status.pending})
            details = "; ".join(f"{name}: {why}" for name, why in sorted(problems.items()))
            raise MirrorError(
                f"{len(problems)} checkpoint(s) not mirrored to {self.target.url}: {details}", problems
            )
        return status

    # --- the worker ------------------------------------------------------------------------------

    def _put(self, job: _Job) -> None:
        if self._closed:
            raise CkptkitError(f"the mirror to {self.target.url} is closed")
        self._enqueue(job)

    def _enqueue(self, job: _Job) -> None:
        with self._lock:
            self._outstanding += 1
            if job[0] == "upload":
                self._pending.append(job[1])
        self._queue.put(job)

    def _work(self) -> None:
        while True:
            kind, name = self._queue.get()
            if kind == "stop":
                if self._queue.empty():
                    return
                self._queue.put((kind, name))  # jobs a catch-up queued behind the stop run first
                continue
            try:
                self._run(kind, name)
            except Exception as exc:  # the worker must survive anything a job throws
                log.warning(
                    "mirror %s of %s to %s failed: %s", kind, name or "the root", self.target.url, exc
                )
                with self._lock:
                    self._fail((kind, name), str(exc))
            finally:
                with self._idle:
                    if kind == "upload":
                        self._pending.remove(name)
                    self._outstanding -= 1
                    self._idle.notify_all()

    def _run(self, kind: str, name: str) -> None:
        if kind == "catch-up":
            self._catch_up()
            return
        answer = self._in_process(kind, name) if self._process_spec else self._in_thread(kind, name)
        if "error" in answer:
            raise CkptkitError(answer["error"]["message"])
        if "thinned" in answer:
            with self._lock:
                self._succeed(name)
            return
        if "deleted" in answer:
            released = answer.get("released") or {}
            if released.get("skipped"):  # garbage left for the next sweep, not a failure
                log.info("blobs at %s not released after deleting %s: %s", self.target.url, name,
                         released["skipped"])
            with self._lock:
                self._status.deleted.append(name)
                self._succeed(name)
            return
        self._record(answer["report"])

    def _catch_up(self) -> None:
        # Both listings must be complete (list_checkpoints raises otherwise) before anything
        # is deleted: what a listing could not see would count as gone.
        local = list_checkpoints(self.source, read_manifests=self._retention is not None)
        if self._retention is not None:
            for name in stale_at_target(local, list_checkpoints(self.target), self._retention):
                self._enqueue(("delete", name))
        for info in local:
            if info.committed and info.name not in self.pending():
                self._enqueue(("upload", info.name))
        with self._lock:
            self._succeed("<catch-up>")

    def _in_thread(self, kind: str, name: str) -> dict[str, Any]:
        if kind == "delete":
            return delete_at_target(self.target, name, self.retry)
        if kind == "thin":
            return thin_at_target(self.target, name, self._thin_keep[name], self.retry)
        syncer = Syncer(SyncTarget(self.source, self.target, (name, name)), jobs=self.jobs, retry=self.retry)
        return {"report": syncer.run().to_json()}

    def _in_process(self, kind: str, name: str) -> dict[str, Any]:
        assert self._process_spec is not None
        job = {
            "kind": kind,
            "name": name,
            "keep": list(self._thin_keep.get(name, ())),
            **self._process_spec,
            "jobs": self.jobs,
            "retry": [self.retry.attempts, self.retry.base_delay, self.retry.max_delay],
            "parent": os.getpid(),
        }
        done = subprocess.run(
            [sys.executable, "-m", "ckptkit.mirror_worker"],
            input=json.dumps(job),
            capture_output=True,
            text=True,
            check=False,
        )
        try:
            return json.loads(done.stdout)
        except json.JSONDecodeError:
            lines = done.stderr.strip().splitlines()
            raise CkptkitError(
                f"the mirror worker exited with {done.returncode}: {lines[-1] if lines else 'no output'}"
            ) from None

    def _fail(self, job: _Job, why: str) -> None:
        """Record a failed job, to be tried again as the same job (caller holds the lock)."""
        key = job[1] or "<catch-up>"
        self._status.failed[key] = why
        self._failed_jobs[key] = job

    def _succeed(self, name: str) -> None:
        self._status.failed.pop(name, None)
        self._failed_jobs.pop(name, None)

    def _record(self, report: dict[str, Any]) -> None:
        with self._lock:
            self._status.bytes_sent += report["bytes_sent"]
            for outcome in report["checkpoints"]:
                name, status = outcome["name"], outcome["status"]
                if status in ("committed", "up-to-date"):
                    self._succeed(name)
                    if name not in self._status.uploaded:
                        self._status.uploaded.append(name)
                elif status in ("failed", "conflict", "refused"):
                    self._fail(("upload", name), outcome["detail"])
                    log.warning("mirror of %s to %s failed: %s", name, self.target.url, outcome["detail"])


def stale_at_target(
    local: Sequence[CheckpointInfo], remote: Sequence[CheckpointInfo], retention: RetentionPolicy
) -> list[str]:
    """Committed checkpoints at the mirror that ``retention`` deleted locally while their
    deletion at the mirror never happened (it was queued in a process that was killed).

    The mirror holds what local retention keeps. A remote checkpoint is stale only if no
    directory of its name is left locally (an invalid or incomplete local copy counts: the
    remote one may be the only good copy), it is older than the newest local committed
    checkpoint (a newer one was not written here, or was deleted here by hand), and the policy,
    applied to the local checkpoints plus those older remote ones, expires it, as the lost
    retention pass would have; the newest and the best are never expired. An empty local root
    (a fresh machine, a root emptied on purpose) says nothing about what the mirror should
    hold: nothing is stale then.
    """
    present = {c.name for c in local}
    committed = [candidate(c) for c in local if c.committed]
    if not committed or not retention.has_rules:
        return []
    gone = [candidate(c) for c in remote if c.committed and c.name not in present]
    ordered = order_candidates(committed + gone)
    newest_local = max(i for i, c in enumerate(ordered) if c.name in present)
    considered = ordered[: newest_local + 1]
    expired = set(retention.expired_names(considered))
    return [c.name for c in considered if c.name in expired and c.name not in present]


def _process_spec(
    source: Store, source_options: dict[str, Any], target: str | Store, target_options: dict[str, Any]
) -> dict[str, Any] | None:
    """What a child process needs to open both stores again, or None where it cannot: a
    ``memory://`` store lives in this process only, a Store object as target has no options to
    pass on, and the options must survive JSON."""
    if not isinstance(target, str) or "memory://" in (source.url + target):
        return None
    spec = {
        "source": source.url,
        "source_options": source_options,
        "target": target,
        "target_options": target_options,
    }
    try:
        json.dumps(spec)
    except (TypeError, ValueError):
        return None
    return spec


def _close_at_exit(ref: weakref.ref[Mirror]) -> None:
    mirror = ref()
    if mirror is None or mirror._closed:
        return
    pending = mirror.pending()
    if pending:
        log.warning("waiting for %d mirror upload(s) to %s before exit", len(pending), mirror.target.url)
    status = mirror.close(raise_on_error=False)
    if status.failed:
        log.error("not mirrored to %s: %s", mirror.target.url, status.failed)
