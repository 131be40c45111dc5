"""How an fsspec filesystem answers one ranged read: the ``submit`` that ``storage/ranged.py``
builds on.

- S3 (s3fs): a ``GetObject`` with a ``Range`` header, run on s3fs's own event loop (no thread per
  request). The answer's ``Content-Range`` gives the object's size, so opening a stream needs no
  HEAD. A body that breaks off or arrives short is fetched again, at most
  :data:`BODY_ATTEMPTS` times, then a :class:`StorageError` says so: wrong or short bytes are
  never returned.
- Any other asynchronous filesystem (gcsfs, adlfs, http): its ``_cat_file`` on its loop.
- A synchronous one: its ``cat_file`` on a shared pool of :data:`ranged.PROCESS_REQUESTS` threads.

Sequential runs are read through streamed GETs (:func:`streamer`) where the backend has them:
on S3, one ``GetObject`` whose body is read as the reader reads (``storage/s3_stream.py``).

Exceptions come back untranslated; the store translates them where it waits for them.
"""

from __future__ import annotations

import asyncio
import errno
import re
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from ckptkit.errors import StorageError
from ckptkit.storage import ranged
from ckptkit.storage.ranged import Fetched, OpenStream, Submit
from ckptkit.storage.s3_stream import BODY_ATTEMPTS, S3BodyStream, range_not_satisfiable

_BODY_STEP = 1 << 20
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_POOL: ThreadPoolExecutor | None = None


def submitter(fs: Any, protocol: str, path: str) -> Submit:
    """``submit(start, end)`` for ``path`` of ``fs``."""
    if protocol in ("s3", "s3a"):
        bucket, key, version = fs.split_path(path)
        extra = {"VersionId": version} if version else {}
        return lambda start, end: _on_loop(fs, _s3_get(fs, bucket, key, start, end, extra))
    if getattr(fs, "async_impl", False):
        return lambda start, end: _on_loop(fs, _async_cat(fs, path, start, end))
    return lambda start, end: _pool().submit(lambda: Fetched(fs.cat_file(path, start=start, end=end)))


def streamer(fs: Any, protocol: str, path: str) -> OpenStream | None:
    """``open_stream(start, end)`` for ``path`` of ``fs``; None where reads stay ranged blocks
    (gcsfs and adlfs hand out whole answers only)."""
    if protocol not in ("s3", "s3a"):
        return None
    bucket, key, version = fs.split_path(path)
    extra = {"VersionId": version} if version else {}
    return lambda start, end: S3BodyStream(fs, bucket, key, extra, start, end)


def _on_loop(fs: Any, coroutine: Any) -> Future[Fetched]:
    return asyncio.run_coroutine_threadsafe(coroutine, fs.loop)


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(ranged.PROCESS_REQUESTS, thread_name_prefix="ckptkit-read")
    return _POOL


async def _async_cat(fs: Any, path: str, start: int | None, end: int | None) -> Fetched:
    try:
        return Fetched(await fs._cat_file(path, start=start, end=end))
    except Exception as exc:  # gcsfs, adlfs: each their own error for a 416
        if start is not None and range_not_satisfiable(exc):
            return Fetched(b"")  # a range at or past the end, as a slice gives it
        raise


async def _s3_get(
    fs: Any, bucket: str, key: str, start: int | None, end: int | None, extra: dict[str, str]
) -> Fetched:
    """Bytes ``[start, end)`` of ``bucket/key`` (all of it for None, None) and the object's size.

    A range at or past the end is ``b""`` (S3 answers 416). Request failures are retried by
    s3fs and botocore; a body cut off after the headers is retried here.
    """
    if start is not None or end is not None:
        last = "" if end is None else str(end - 1)
        extra = {**extra, "Range": f"bytes={start or 0}-{last}"}
    problem = ""
    for _ in range(BODY_ATTEMPTS):
        try:
            response = await fs._call_s3("get_object", Bucket=bucket, Key=key, **extra)
        except OSError as exc:
            if exc.errno == errno.EINVAL and "Range" in extra and range_not_satisfiable(exc):
                return Fetched(b"")
            raise
        length = response.get("ContentLength")
        try:
            data = await _read_body(response["Body"], length)
        except Exception as exc:  # aiohttp, botocore: the connection broke inside the body
            problem = f"{type(exc).__name__}: {exc}"
            continue
        finally:
            response["Body"].close()
        if length is None or len(data) == length:
            return _answered(data, response.get("ContentRange"), start or 0, end, "Range" in extra)
        problem = f"{len(data)} of {length} bytes arrived"
    span = f"bytes [{start or 0}, {'end' if end is None else end})"
    raise StorageError(
        f"s3://{bucket}/{key}: {span}: the response body broke off {BODY_ATTEMPTS} times ({problem})"
    )


async def _read_body(body: Any, length: int | None) -> bytes | bytearray:
    """The body, received into one buffer of its announced length: reading it whole would hold
    every received piece and then their join, twice the block, for a moment."""
    if length is None:
        return await body.read()
    buffer = bytearray(length)
    view = memoryview(buffer)
    got = 0
    while got < length and (piece := await body.read(min(length - got, _BODY_STEP))):
        view[got : got + len(piece)] = piece
        got += len(piece)
    view.release()
    del buffer[got:]  # short: the caller sees it and fetches again
    return buffer


def _answered(
    data: bytes | bytearray, content_range: str | None, start: int, end: int | None, ranged: bool
) -> Fetched:
    """The bytes asked for and the object's size, from the body and its ``Content-Range``."""
    if not ranged or not content_range:
        # Not ranged, or a server that ignored the Range header and sent the whole object.
        return Fetched(data[start:end] if ranged else data, len(data))
    match = _CONTENT_RANGE.fullmatch(content_range)
    if match is None or int(match.group(1)) != start:
        raise StorageError(f"asked for bytes from {start}, the answer holds {content_range!r}")
    return Fetched(data, int(match.group(3)) if match.group(3) != "*" else None)
