"""One ranged GET of an S3 object, streamed: its body is received while the reader reads it.

A sequential reader (hashing a chunk, the zip records' CRC pass, a download) costs one request
per large segment this way, instead of one per block: on moto each GET costs ~0.2 s before its
first byte, on S3 10-50 ms. The body is received on s3fs's event loop at most
:data:`PREFETCH` bytes ahead of the reader; past that the loop stops reading the socket and TCP
holds the server back, so an open stream the reader has not reached yet costs little memory.

A body that breaks off (a reset, a truncated answer) is asked for again from the first byte not
yet received, with ``If-Match`` on the first answer's ETag so the rest comes from the same
object; after :data:`BODY_ATTEMPTS` breaks a :class:`StorageError` says so. Short or wrong bytes
are never handed out.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import re
import threading
from collections import deque
from concurrent.futures import Future
from typing import Any

from ckptkit.errors import StorageError

BODY_ATTEMPTS = 5  # breaks of one stream's body before it gives up
PIECE = 1 << 20  # what one read of the body asks for (aiohttp hands over what it has, often less)
PREFETCH = 8 << 20  # bytes received ahead of the reader, per stream
_CLOSE_WAIT = 10.0  # seconds close() waits for the loop to drop the connection
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class S3BodyStream:
    """Bytes ``[start, end)`` of ``bucket/key`` as one streamed GET, started at construction.

    ``take`` hands over the next bytes in order; ``pos`` is the next byte it will hand over.
    The stream ends at ``end``, or earlier where the object does (its answer's ``Content-Range``
    says so): then ``take`` returns ``[]`` with ``pos < end``. ``finished`` resolves once the
    connection is done with (the body received, failed, or dropped by ``close``).
    """

    def __init__(self, fs: Any, bucket: str, key: str, extra: dict[str, str], start: int, end: int) -> None:
        self.start, self.end, self.pos = start, end, start
        self._fs, self._bucket, self._key, self._extra = fs, bucket, key, extra
        self._loop = fs.loop
        self._received = start  # the next byte the connection delivers
        self._stop = end  # where the bytes end: ``end``, or the object's end if that comes first
        self._pieces: deque[bytes | memoryview] = deque()
        self._held = 0
        self._ready = threading.Condition()
        self._done = False
        self._error: BaseException | None = None
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._room = asyncio.Event()  # set on the loop when the reader made room
        self.finished: Future[None] = asyncio.run_coroutine_threadsafe(self._run(), self._loop)

    # --- the reader's side (any thread) -----------------------------------------------------

    def take(self, wanted: int) -> list[bytes | memoryview]:
        """Up to ``wanted`` next bytes, as pieces; waits for at least one byte unless the stream
        has ended (``[]``). Raises what broke the stream once the bytes before it are taken."""
        with self._ready:
            while not self._pieces and not self._done:
                self._ready.wait()
            if not self._pieces:
                if self._error is not None:
                    raise self._error
                return []
            out: list[bytes | memoryview] = []
            got = 0
            while self._pieces and got < wanted:
                piece = self._pieces[0]
                if len(piece) <= wanted - got:
                    out.append(self._pieces.popleft())
                    got += len(piece)
                else:
                    view = memoryview(piece)
                    out.append(view[: wanted - got])
                    self._pieces[0] = view[wanted - got :]
                    got = wanted
            was_full = self._held >= PREFETCH
            self._held -= got
            self.pos += got
            make_room = was_full and self._held < PREFETCH
        if make_room:
            with contextlib.suppress(RuntimeError):  # the loop is gone (interpreter exit)
                self._loop.call_soon_threadsafe(self._room.set)
        return out

    def close(self) -> None:
        """Drop the connection (nothing more is received) and wait until it is dropped, so a
        closed reader leaves no request running."""
        if self.finished.done():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:  # a finaliser on the loop itself: it cannot wait for itself
            self._closing = True
            if self._task is not None:
                self._task.cancel()
            return
        stopping = asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
        with contextlib.suppress(Exception):
            stopping.result(_CLOSE_WAIT)
            self.finished.result(_CLOSE_WAIT)

    # --- the loop's side --------------------------------------------------------------------

    async def _shutdown(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        self._task = asyncio.current_task()
        try:
            if not self._closing:
                await self._receive()
        except asyncio.CancelledError:
            if not self._closing:
                raise
        except BaseException as exc:  # the reader raises it; nobody reads this task's result
            self._error = exc
        finally:
            with self._ready:
                self._done = True
                self._ready.notify_all()

    async def _receive(self) -> None:
        breaks, problem, etag = 0, "", None
        while self._received < self._stop:
            extra = {**self._extra, "Range": f"bytes={self._received}-{self._stop - 1}"}
            if etag is not None:
                extra["IfMatch"] = etag  # the rest of the same object, or an error
            response = await self._request(extra, resuming=etag is not None)
            if response is None:
                return  # the range starts at or past the object's end
            body = response["Body"]
            try:
                skip = self._check(response)
                etag = etag or response.get("ETag")
                before = self._received
                if await self._relay(body, skip, response.get("ContentLength")) and self._received > before:
                    continue  # the body came whole (a server may answer less than asked)
                problem = "the body ended early"
            except StorageError:
                raise
            except Exception as exc:  # aiohttp, botocore: the connection broke inside the body
                problem = f"{type(exc).__name__}: {exc}"
            finally:
                body.close()  # a body not read to its end closes its connection, never reuses it
            breaks += 1
            if breaks >= BODY_ATTEMPTS:
                raise StorageError(
                    f"s3://{self._bucket}/{self._key}: bytes [{self.start}, {self.end}): the response "
                    f"body broke off {BODY_ATTEMPTS} times, last at byte {self._received} ({problem})"
                )

    async def _request(self, extra: dict[str, str], *, resuming: bool) -> Any:
        try:
            return await self._fs._call_s3("get_object", Bucket=self._bucket, Key=self._key, **extra)
        except OSError as exc:
            if exc.errno == errno.EINVAL and error_says(exc, "PreconditionFailed") and resuming:
                raise StorageError(
                    f"s3://{self._bucket}/{self._key}: the object changed while it was read "
                    f"(at byte {self._received})"
                ) from exc
            if exc.errno == errno.EINVAL and range_not_satisfiable(exc):
                if resuming:
                    raise StorageError(
                        f"s3://{self._bucket}/{self._key}: the object shrank while it was read"
                    ) from exc
                self._stop = self._received
                return None
            raise

    def _check(self, response: dict[str, Any]) -> int:
        """Where the answer starts against what was asked: the bytes to skip (a server that
        ignored the Range header sends the whole object). Learns where the object ends."""
        content_range = response.get("ContentRange")
        if not content_range:
            self._stop = min(self._stop, int(response.get("ContentLength") or 0))
            return self._received
        match = _CONTENT_RANGE.fullmatch(content_range)
        if match is None or int(match.group(1)) != self._received:
            raise StorageError(
                f"s3://{self._bucket}/{self._key}: asked for bytes from {self._received}, "
                f"the answer holds {content_range!r}"
            )
        if match.group(3) != "*":
            self._stop = min(self._stop, int(match.group(3)))
        return 0

    async def _relay(self, body: Any, skip: int, length: int | None) -> bool:
        """Hand the body over as it arrives, never more than PREFETCH ahead of the reader.
        True if it arrived whole (as long as its Content-Length)."""
        got = 0
        while self._received < self._stop:
            await self._wait_for_room()
            piece = await body.read(PIECE)
            if not piece:
                return length is None or got == length
            got += len(piece)
            if skip:
                dropped = min(skip, len(piece))
                piece, skip = piece[dropped:], skip - dropped
            piece = piece[: self._stop - self._received]
            if piece:
                with self._ready:
                    self._pieces.append(piece)
                    self._held += len(piece)
                    self._received += len(piece)
                    self._ready.notify_all()
        return True

    async def _wait_for_room(self) -> None:
        while True:
            with self._ready:
                if self._held < PREFETCH:
                    return
                self._room.clear()
            await self._room.wait()


def error_says(exc: BaseException, *words: str) -> bool:
    """Whether ``exc`` or what caused it names one of ``words``: s3fs turns S3's error codes
    into OSErrors (a 416 and a 412 are both EINVAL), gcsfs and adlfs into their own errors."""
    cause: BaseException | None = exc
    while cause is not None:
        if any(word in str(cause) for word in words):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


def range_not_satisfiable(exc: BaseException) -> bool:
    """The answer to a range that starts at or past the end (416, S3's and Azure's InvalidRange)."""
    return error_says(exc, "InvalidRange", "416")
