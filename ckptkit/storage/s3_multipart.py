"""Streaming a body of unknown length to S3: a multipart upload, a few parts in flight.

s3fs's file object buffers each part in a ``BytesIO`` and copies it on the way out (about four
part-sized copies per stream, ~90 MB each at 16 MiB parts) and uploads one part at a time. Here a
part is the caller's chunks joined once (not at all when a chunk is a whole part, as ``sync``'s
8 MiB reads are), and the next part is read while the last ones upload. Parts are 8 MiB for the
first thousand (8 GB), then double every thousand, so the 10,000-part limit of S3 is reached only
beyond 8 TB. Nothing is visible until ``CompleteMultipartUpload``; any failure aborts the upload.
A body smaller than one part goes up in a single ``PutObject``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

PART_SIZE = 8 << 20
PARTS_PER_SIZE = 1000  # parts of one size before the size doubles
PARTS_IN_FLIGHT = 2


def part_size(part_number: int) -> int:
    """The size of part ``part_number`` (1-based): 8 MiB, doubling every thousand parts."""
    return PART_SIZE << ((part_number - 1) // PARTS_PER_SIZE)


def upload_stream(fs: Any, path: str, chunks: Iterator[memoryview], extra: dict[str, Any]) -> int:
    """Upload ``chunks`` to ``path`` (``bucket/key``) with the s3fs filesystem ``fs``; returns
    the size. ``extra`` goes to PutObject / CreateMultipartUpload (``Metadata``)."""
    bucket, key, _ = fs.split_path(path)
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
            while pending_size >= part_size((upload.parts_started if upload else 0) + 1):
                if upload is None:
                    upload = _Upload(fs, bucket, key, extra)
                body, pending, pending_size = _take(pending, part_size(upload.parts_started + 1))
                upload.send(body)
        if upload is None:  # the whole body is smaller than one part
            fs.call_s3("put_object", Bucket=bucket, Key=key, Body=_join(pending), **extra)
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
    rest = list(pieces)
    while taken < size:
        piece = rest.pop(0)
        need = size - taken
        if len(piece) > need:
            body.append(piece[:need])
            rest.insert(0, piece[need:])
            taken = size
        else:
            body.append(piece)
            taken += len(piece)
    return _join(body), rest, sum(len(p) for p in rest)


class _Upload:
    """One multipart upload: parts sent on s3fs's event loop, at most ``PARTS_IN_FLIGHT`` at once."""

    def __init__(self, fs: Any, bucket: str, key: str, extra: dict[str, Any]) -> None:
        self.fs = fs
        self.bucket = bucket
        self.key = key
        self.upload_id = fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key, **extra)["UploadId"]
        self.parts_started = 0
        self._in_flight: deque[tuple[int, Future[dict[str, Any]]]] = deque()
        self._done: list[dict[str, Any]] = []

    def send(self, body: bytes) -> None:
        while len(self._in_flight) >= PARTS_IN_FLIGHT:
            self._finish_oldest()
        self.parts_started += 1
        coroutine = self.fs._call_s3(
            "upload_part",
            Bucket=self.bucket,
            Key=self.key,
            UploadId=self.upload_id,
            PartNumber=self.parts_started,
            Body=body,
        )
        future = asyncio.run_coroutine_threadsafe(coroutine, self.fs.loop)
        self._in_flight.append((self.parts_started, future))

    def _finish_oldest(self) -> None:
        number, future = self._in_flight.popleft()
        self._done.append({"PartNumber": number, "ETag": future.result()["ETag"]})

    def complete(self) -> None:
        while self._in_flight:
            self._finish_oldest()
        self.fs.call_s3(
            "complete_multipart_upload",
            Bucket=self.bucket,
            Key=self.key,
            UploadId=self.upload_id,
            MultipartUpload={"Parts": self._done},
        )

    def abort(self) -> None:
        """Best effort: wait out the parts in flight, then abort so S3 keeps no parts."""
        for _, future in self._in_flight:
            with contextlib.suppress(BaseException):
                future.result()
        with contextlib.suppress(Exception):
            self.fs.call_s3(
                "abort_multipart_upload", Bucket=self.bucket, Key=self.key, UploadId=self.upload_id
            )
