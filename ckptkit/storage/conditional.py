"""Create-only writes: each object store's own conditional request.

The commit protocol publishes a manifest with ``put(mode="create")``; two writers of one step
must not both succeed, so the check and the write have to be one request the store decides:

- S3 (s3fs): PutObject with ``If-None-Match: *`` (s3fs's ``mode="create"``); 412 → exists.
- Google Cloud Storage (gcsfs): an upload with ``ifGenerationMatch=0`` (gcsfs's
  ``mode="create"``); 412 → exists. Sent as one request that carries the bytes and the
  precondition together: the emulator (fake-gcs-server) ignores the precondition on a
  resumable session, which gcsfs would open for 50 MiB or more.
- Azure Blob Storage (adlfs): ``upload_blob(overwrite=False)``, i.e. ``If-None-Match: *``;
  ResourceExistsError → exists.
- memory: fsspec's in-process dict checks and writes under our lock.

A protocol not named here has no such write: its stores declare ``conditional_create`` False,
and a create there is a check and then a write, which a concurrent writer can slip between.
"""

from __future__ import annotations

import threading
from typing import Any

_GCS = frozenset({"gs", "gcs"})
_AZURE = frozenset({"az", "abfs", "abfss"})
CONDITIONAL_CREATE = frozenset({"s3", "s3a", "memory"}) | _GCS | _AZURE

_MEMORY_LOCK = threading.Lock()


def put_if_absent(fs: Any, protocol: str, path: str, data: bytes, extra: dict[str, Any]) -> None:
    """Write ``data`` to ``path`` of ``fs`` unless it exists, atomically against other writers;
    FileExistsError if it does. ``protocol`` must be in :data:`CONDITIONAL_CREATE`."""
    if protocol not in CONDITIONAL_CREATE:
        raise ValueError(f"{protocol}:// has no conditional create")
    if protocol == "memory":
        with _MEMORY_LOCK:
            fs.pipe_file(path, data, mode="create")
    elif protocol in _GCS:
        fs.pipe_file(path, data, mode="create", chunksize=max(len(data) + 1, 50 << 20), **extra)
    else:  # s3fs and adlfs both map mode="create" to their store's conditional write
        fs.pipe_file(path, data, mode="create", **extra)
