"""One mirror job in a process of its own: ``python -m ckptkit.mirror_worker`` < job JSON.

:class:`ckptkit.mirror.Mirror` runs its uploads and deletions here rather than in a thread of the
training process: hashing, request signing and checksums then never hold the training process's
GIL, and at a lower CPU priority (nice 10) they take the cores training leaves idle. The process
dies with its parent (Linux ``PR_SET_PDEATHSIG``), so a killed training run never leaves an upload
going on behind its back; the next run's catch-up finishes it.

Job (stdin): ``{"kind": "upload"|"delete", "name", "source", "source_options", "target",
"target_options", "jobs", "retry": [attempts, base_delay, max_delay], "parent": pid}``.
Answer (stdout): ``{"report": SyncReport.to_json()}``, ``{"deleted": name}`` or
``{"error": {"type", "message"}}``.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import sys
from typing import Any

from ckptkit.errors import CkptkitError

_PR_SET_PDEATHSIG = 1
NICENESS = 10


def _die_with_parent(parent: int) -> None:
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):  # no prctl: the job still ends on its own
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    from ckptkit.commit import delete_checkpoint
    from ckptkit.ops.sync import Syncer, SyncTarget
    from ckptkit.storage import open_store
    from ckptkit.transfer import RetryPolicy, with_retries

    source = open_store(job["source"], **job["source_options"])
    target = open_store(job["target"], **job["target_options"])
    retry = RetryPolicy(*job["retry"])
    name = job["name"]
    if job["kind"] == "delete":
        with_retries(lambda: delete_checkpoint(target, name), retry, f"deleting {name}")
        return {"deleted": name}
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
