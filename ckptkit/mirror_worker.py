"""One mirror job in a process of its own: ``python -m ckptkit.mirror_worker`` < job JSON.

:class:`ckptkit.mirror.Mirror` runs its uploads and deletions here rather than in a thread of the
training process: hashing, request signing and checksums then never hold the training process's
GIL, and at a lower CPU priority (nice 10) they take the cores training leaves idle. The process
dies with its parent (Linux ``PR_SET_PDEATHSIG``), so a killed training run never leaves an upload
going on behind its back; the next run's catch-up finishes it.

Job (stdin): ``{"kind": "upload"|"delete", "name", "source", "source_options", "target",
"target_options", "jobs", "retry": [attempts, base_delay, max_delay], "parent": pid}``.
Answer (stdout): ``{"report": SyncReport.to_json()}``, ``{"deleted": name, "released": ...}``
(see :func:`delete_at_target`) or ``{"error": {"type", "message"}}``.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ckptkit.errors import CkptkitError

if TYPE_CHECKING:  # imported by the job itself, once this process is tied to its parent
    from ckptkit.storage.base import Store
    from ckptkit.transfer import RetryPolicy

_PR_SET_PDEATHSIG = 1
NICENESS = 10


def _die_with_parent(parent: int) -> None:
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):  # no prctl: the job still ends on its own
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def delete_at_target(target: Store, name: str, retry: RetryPolicy) -> dict[str, Any]:
    """Delete checkpoint ``name`` at the mirror, then release the blobs that nothing there needs
    any more — by a sweep of the target's blob store (the blob protocol: it spares every blob a
    manifest or a save in flight there names, another run's mirror included), never by deleting
    the deleted manifest's blobs, which other checkpoints share.

    The deletion stands when the sweep fails or another sweep holds the lock: the blobs are
    only garbage then, released by the next deletion's sweep or ``ckptkit gc`` at the target.
    """
    from ckptkit.blobs import sweep
    from ckptkit.commit import delete_checkpoint
    from ckptkit.manifest import BLOB_DIR
    from ckptkit.transfer import with_retries

    with_retries(lambda: delete_checkpoint(target, name), retry, f"deleting {name}")
    answer: dict[str, Any] = {"deleted": name}
    try:
        if BLOB_DIR in target.list_dirs(""):  # a root that was never deduplicated needs no sweep
            report = sweep(target)
            answer["released"] = {
                "blobs": len(report.deleted), "bytes": report.freed_bytes, "skipped": report.skipped
            }
    except CkptkitError as exc:
        answer["released"] = {"blobs": 0, "bytes": 0, "skipped": f"the sweep failed: {exc}"}
    return answer


def thin_at_target(target: Store, name: str, keep: Sequence[str], retry: RetryPolicy) -> dict[str, Any]:
    """Thin checkpoint ``name`` at the mirror as retention thinned it locally: the same protocol
    (new files, one manifest swap, then the dropped files and a blob sweep), run on the target.
    A checkpoint the target does not have (deleted there since) is nothing to do."""
    from ckptkit.errors import NotCommittedError, NotFoundError
    from ckptkit.ops.thin import thin_checkpoint
    from ckptkit.transfer import with_retries

    with contextlib.suppress(NotCommittedError, NotFoundError):
        with_retries(lambda: thin_checkpoint(target, name, keep=tuple(keep)), retry, f"thinning {name}")
    return {"thinned": name}


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    from ckptkit.ops.sync import Syncer, SyncTarget
    from ckptkit.storage import open_store
    from ckptkit.transfer import RetryPolicy

    source = open_store(job["source"], **job["source_options"])
    target = open_store(job["target"], **job["target_options"])
    retry = RetryPolicy(*job["retry"])
    name = job["name"]
    if job["kind"] == "delete":
        return delete_at_target(target, name, retry)
    if job["kind"] == "thin":
        return thin_at_target(target, name, job["keep"], retry)
    syncer = Syncer(SyncTarget(source, target, (name, name)), jobs=job["jobs"], retry=retry)
    return {"report": syncer.run().to_json()}


def main() -> None:
    job = json.loads(sys.stdin.read())
    _die_with_parent(job["parent"])
    os.nice(NICENESS)
    try:
        answer = run_job(job)
    except (CkptkitError, OSError) as exc:
        answer = {"error": {"type": type(exc).__name__, "message": str(exc)}}
    sys.stdout.write(json.dumps(answer))


if __name__ == "__main__":
    main()
