"""Streaming a body of unknown length to S3: a multipart upload, a few parts in flight.

Every request goes through the filesystem's threaded data path (``s3_client``): the caller's
thread reads (and, in ``sync``, hashes) the next part while earlier ones are on the wire from
the pool, at most ``PARTS_IN_FLIGHT`` per stream. Requests that carry data (parts, a single
``PutObject``) run on the pool, so at most ``DATA_THREADS`` bodies are in flight per store
whatever the number of files; the small control requests (create, complete, abort) run in the
caller's thread. A part is the caller's chunks joined once, and
not copied at all when a chunk is a whole part (``sync``'s reads are exactly one part): the
``bytes`` object read from the source is the body botocore sends. Parts are 8 MiB for the first
thousand (8 GB), then double every thousand, so the 10,000-part limit of S3 is reached only
beyond 8 TB. Nothing is visible until ``CompleteMultipartUpload``; any failure (the caller's
iterator raising, a digest mismatch, a request failing, Ctrl-C) aborts the upload, so S3 keeps
neither an object nor parts. A body of at most one part goes up in a single ``PutObject``.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

from ckptkit.storage.s3_client import DataPath, data_path

PART_SIZE = 8 << 20
PARTS_PER_SIZE = 1000  # parts of one size before the size doubles
# Parts of one stream on the wire at once; with sync's files in flight this fills the data
# path's pool (s3_client.DATA_THREADS) and bounds a stream's memory to a few parts.
PARTS_IN_FLIGHT = 3


def part_size(part_number: int) -> int:
    """The size of part ``part_number`` (1-based): 8 MiB, doubling every thousand parts."""
    return PART_SIZE << ((part_number - 1) // PARTS_PER_SIZE)


def upload_stream(fs: Any, path: str, chunks: Iterator[memoryview], extra: dict[str, Any]) -> int:
    """Upload ``chunks`` to ``path`` (``bucket/key``) of the s3fs filesystem ``fs``; returns the
    size. ``extra`` goes to PutObject / CreateMultipartUpload (``Metadata``)."""
    bucket, key, _ = fs.split_path(path)
    data = data_path(fs)
    pending: list[memoryview] = []
    pending_size = 0
    upload: _Upload | None = None
    size = 0
    try:
        for chunk in chunks:
            view = chunk if chunk.format == "B" and chunk.ndim == 1 else chunk.cast("B")
            pending.append(view)
            pending_size += len(view)
            size += len(view)
            # A body of exactly one part stays one PutObject: the upload starts on more than that.
            while pending_size >= part_size((upload.parts_started if upload else 0) + 1) and (
                upload is not None or pending_size > PART_SIZE
            ):
                if upload is None:
                    upload = _Upload(data, bucket, key, extra)
                body, pending, pending_size = _take(pending, part_size(upload.parts_started + 1))
                upload.send(body)
        if upload is None:  # the whole body is at most one part
            # On the pool like a part: bodies in flight stay bounded however many files are put.
            data.submit("put_object", Bucket=bucket, Key=key, Body=_join(pending), **extra).result()
            return size
        if pending_size:
            upload.send(_join(pending))
        upload.complete()
        return size
    except BaseException:
        if upload is not None:
            upload.abort()
        raise


def _join(pieces: list[memoryview]) -> bytes:
    if len(pieces) == 1 and isinstance(pieces[0].obj, bytes) and len(pieces[0]) == len(pieces[0].obj):
        return pieces[0].obj  # a whole bytes object: no copy
    return b"".join(pieces)


def _take(pieces: list[memoryview], size: int) -> tuple[bytes, list[memoryview], int]:
    """The first ``size`` bytes of ``pieces`` as one body, and what is left over."""
    body: list[memoryview] = []
    taken = 0
    rest = deque(pieces)
    while taken < size:
        piece = rest.popleft()
        need = size - taken
        if len(piece) > need:
            body.append(piece[:need])
            rest.appendleft(piece[need:])
            taken = size
        else:
            body.append(piece)
            taken += len(piece)
    return _join(body), list(rest), sum(len(p) for p in rest)


class _Upload:
    """One multipart upload: parts sent from the data path's pool, ``PARTS_IN_FLIGHT`` at most."""

    def __init__(self, data: DataPath, bucket: str, key: str, extra: dict[str, Any]) -> None:
        self.data = data
        self.bucket = bucket
        self.key = key
        self.upload_id = data.call("create_multipart_upload", Bucket=bucket, Key=key, **extra)["UploadId"]
        self.parts_started = 0
        self._in_flight: deque[tuple[int, Future[dict[str, Any]]]] = deque()
        self._done: list[dict[str, Any]] = []

    def send(self, body: bytes) -> None:
        while len(self._in_flight) >= PARTS_IN_FLIGHT:
            self._finish_oldest()
        self.parts_started += 1
        future = self.data.submit(
            "upload_part",
            Bucket=self.bucket,
            Key=self.key,
            UploadId=self.upload_id,
            PartNumber=self.parts_started,
            Body=body,
        )
        self._in_flight.append((self.parts_started, future))

    def _finish_oldest(self) -> None:
        number, future = self._in_flight.popleft()
        self._done.append({"PartNumber": number, "ETag": future.result()["ETag"]})

    def complete(self) -> None:
        while self._in_flight:
            self._finish_oldest()
        try:
            self.data.call(
                "complete_multipart_upload",
                Bucket=self.bucket,
                Key=self.key,
                UploadId=self.upload_id,
                MultipartUpload={"Parts": self._done},
            )
        except Exception:
            # Assembling a large object can outlast the read timeout; botocore then retries, and
            # the retry of a completion that already landed finds no such upload (S3: 404
            # NoSuchUpload; moto: 500). The object tells whether it was ours.
            if not self._landed():
                raise

    def _landed(self) -> bool:
        """True if ``key`` now holds exactly this upload: S3's multipart ETag is the MD5 of the
        parts' MD5s and their count, which no other upload of other bytes produces."""
        digests = b"".join(bytes.fromhex(part["ETag"].strip('"')) for part in self._done)
        expected = f'"{hashlib.md5(digests, usedforsecurity=False).hexdigest()}-{len(self._done)}"'
        try:
            found = self.data.call("head_object", Bucket=self.bucket, Key=self.key)
        except Exception:
            return False
        return found.get("ETag") == expected

    def abort(self) -> None:
        """Best effort: drop the parts not started, wait out those on the wire (a part that
        lands after the abort would be kept), then abort so S3 keeps no parts."""
        for _, future in self._in_flight:
            future.cancel()
        for _, future in self._in_flight:
            with contextlib.suppress(BaseException):
                future.result()
        with contextlib.suppress(Exception):
            self.data.call(
                "abort_multipart_upload", Bucket=self.bucket, Key=self.key, UploadId=self.upload_id
            )
