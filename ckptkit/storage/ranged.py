"""Ranged reads of remote objects: coalesced, split into large requests, bounded, read ahead.

The one read path every command takes to an object store (``FsspecStore.get``, ``read_ranges``
and the stream ``open_read`` returns), whatever fetches the bytes. A backend supplies one thing,
``submit(start, end)``: start a ranged GET of ``[start, end)`` and return a future of what came
back (:class:`Fetched`). On top of it:

- :func:`read_ranges` sorts the ranges, merges neighbours whose gap is at most
  :data:`COALESCE_GAP` into one span, splits spans longer than :data:`REQUEST_SIZE` into several
  requests, and runs at most :data:`FILE_REQUESTS` of them at once;
- :class:`RangedReader` is a seekable stream that learns from how it is read: a seek followed by
  a small read fetches a small block (:data:`MIN_BLOCK`), so ``inspect`` jumping from pickle to
  header transfers kilobytes; reads that continue where the last one ended grow the block and
  keep up to :data:`STREAM_REQUESTS` blocks in flight ahead of the reader, never holding more than
  :data:`STREAM_BUFFER` bytes. A sequential run (a read of :data:`LARGE_READ` or more, or blocks
  grown to :data:`STREAM_BLOCK`) is then read through streamed GETs where the backend has them
  (``open_stream``): one request per :data:`SEGMENT` bytes, its body received as the reader reads,
  with up to :data:`OPEN_STREAMS` segments open at once so the next one's first byte is not waited
  for; a seek away from the run closes them;
- :data:`REQUEST_SLOTS` bounds the requests in flight across the whole process, so many files
  read at once (a pool of hashers, ``sync --jobs``) do not open hundreds of connections.
"""

from __future__ import annotations

import contextlib
import io
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Protocol

from ckptkit.errors import StorageError

COALESCE_GAP = 64 << 10  # reading a gap this small costs less than another round trip (~20 ms on S3)
REQUEST_SIZE = 16 << 20  # the largest single ranged GET of read_ranges and get
STREAM_BLOCK = 8 << 20  # the largest block of a stream: four in flight stay within STREAM_BUFFER
MIN_BLOCK = 256 << 10  # what a random (seek, then read) access fetches at least
LARGE_READ = 1 << 20  # a read this large is streaming: blocks after it are read ahead at once
STREAM_REQUESTS = 4  # blocks one stream keeps in flight ahead of its reader
STREAM_BUFFER = 32 << 20  # bytes one stream holds, in flight or unread: with its reader's copies < 64 MB
FILE_REQUESTS = 8  # requests one read_ranges call runs at once
# Few, large streamed GETs: a stream ahead of its reader is held back by TCP once it received its
# PREFETCH, so more, smaller segments add requests (on moto each copies the whole object: 288 MiB
# read as 64 MiB segments took 1.2 s, as one GET 0.5 s) but little throughput. Parallel
# connections come from parallel readers instead: verify hashes 64 MiB chunks on a pool, each
# chunk one GET (its reader's size ends the segment); sync downloads several files at once.
SEGMENT = 256 << 20  # the most one streamed GET asks for
OPEN_STREAMS = 2  # streamed GETs one reader keeps open: the one it reads and the next, whose
# first byte is then not waited for
SKIP = 1 << 20  # a forward seek this short inside an open stream reads past the gap instead
PROCESS_REQUESTS = 16  # requests in flight across the process


@dataclass(frozen=True)
class Fetched:
    """What one ranged GET returned: the bytes, and the object's size where the response said
    it (S3's ``Content-Range: bytes a-b/SIZE``), so no HEAD is needed to learn it."""

    data: bytes | bytearray  # a bytearray where the body was received into one buffer
    size: int | None = None


class Stream(Protocol):
    """One streamed GET of bytes ``[start, end)``, started when it is made (``OpenStream``).

    ``take(n)`` waits for and returns up to ``n`` next bytes as pieces, ``[]`` once the stream
    has ended: at ``end``, or at ``pos < end`` where the object ends first. ``finished``
    resolves when its connection is done with; ``close`` drops it and waits for that.
    """

    start: int
    end: int
    pos: int
    finished: Future[None]

    def take(self, wanted: int) -> list[bytes | memoryview]: ...

    def close(self) -> None: ...


# Start a GET of bytes [start, end) (None: from the start, to the end) and return its future.
Submit = Callable[[int | None, int | None], "Future[Fetched]"]
OpenStream = Callable[[int, int], Stream]
Guard = Callable[[], AbstractContextManager[object]]


class RequestSlots:
    """A process-wide bound on ranged requests in flight. Counts what went through it (requests,
    bytes asked for, the most in flight at once) for tests and benchmarks."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._slots = threading.BoundedSemaphore(limit)
        self._lock = threading.Lock()
        self.in_flight = 0
        self.peak = 0
        self.requests = 0
        self.bytes_asked = 0  # of ranges with both ends known

    def acquire(self, wait: bool = True, asked: int = 0) -> bool:
        if not self._slots.acquire(blocking=wait):
            return False
        with self._lock:
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
            self.requests += 1
            self.bytes_asked += asked
        return True

    def release(self) -> None:
        with self._lock:
            self.in_flight -= 1
        self._slots.release()

    def reset_counters(self) -> None:
        with self._lock:
            self.peak = self.in_flight
            self.requests = self.bytes_asked = 0


REQUEST_SLOTS = RequestSlots(PROCESS_REQUESTS)


def start_request(
    submit: Submit, start: int | None, end: int | None, *, wait: bool = True
) -> Future[Fetched] | None:
    """``submit(start, end)`` once a process slot is free; None if ``wait`` is False and none is.

    The slot is held until the future resolves (or is cancelled), never until its bytes are
    consumed, so a reader that stops reading cannot starve the others.
    """
    asked = end - (start or 0) if end is not None else 0
    if not REQUEST_SLOTS.acquire(wait, asked):
        return None
    try:
        future = submit(start, end)
    except BaseException:
        REQUEST_SLOTS.release()
        raise
    future.add_done_callback(lambda _: REQUEST_SLOTS.release())
    return future


def start_stream(open_stream: OpenStream, start: int, end: int, *, wait: bool = True) -> Stream | None:
    """``open_stream(start, end)`` once a process slot is free; None if ``wait`` is False and
    none is. The slot is held while the stream's connection is (until ``finished``)."""
    if not REQUEST_SLOTS.acquire(wait, end - start):
        return None
    try:
        stream = open_stream(start, end)
    except BaseException:
        REQUEST_SLOTS.release()
        raise
    stream.finished.add_done_callback(lambda _: REQUEST_SLOTS.release())
    return stream


def fetch(submit: Submit, start: int | None, end: int | None) -> Fetched:
    """One ranged GET, waited for."""
    future = start_request(submit, start, end)
    assert future is not None  # waited for a slot
    return future.result()


# --- batched ranges ------------------------------------------------------------------------------


@dataclass
class Span:
    """One coalesced region ``[start, end)`` and the indexes of the ranges it serves."""

    start: int
    end: int
    members: list[int] = field(default_factory=list)


def coalesce(ranges: Sequence[tuple[int, int]], gap: int = COALESCE_GAP) -> list[Span]:
    """The non-empty ``ranges`` merged into spans: sorted by start, a range joins the span before
    it when it begins at most ``gap`` bytes after that span's end (overlaps included)."""
    spans: list[Span] = []
    for index in sorted((i for i, (s, e) in enumerate(ranges) if e > s), key=lambda i: ranges[i]):
        start, end = ranges[index]
        if spans and start <= spans[-1].end + gap:
            spans[-1].end = max(spans[-1].end, end)
            spans[-1].members.append(index)
        else:
            spans.append(Span(start, end, [index]))
    return spans


def split(start: int, end: int, size: int = REQUEST_SIZE) -> list[tuple[int, int]]:
    """``[start, end)`` as consecutive requests of at most ``size`` bytes."""
    return [(lo, min(lo + size, end)) for lo in range(start, end, size)]


def read_ranges(
    submit: Submit, ranges: Sequence[tuple[int, int]], *, guard: Guard = contextlib.nullcontext
) -> list[bytes]:
    """The bytes of each ``[start, end)`` of ``ranges``, as ``data[start:end]`` would give them.

    Every range is read in one pass over the coalesced spans, at most :data:`FILE_REQUESTS`
    requests at a time, in offset order; a span's buffer is released once its ranges are cut.
    """
    for start, end in ranges:
        if start < 0 or end < 0:
            raise ValueError(f"byte ranges are non-negative, got [{start}, {end})")
    results: list[bytes] = [b""] * len(ranges)
    spans = coalesce(ranges)
    requests = [(i, lo, hi) for i, span in enumerate(spans) for lo, hi in split(span.start, span.end)]
    pending: deque[tuple[int, int, int, Future[Fetched]]] = deque()
    parts: list[bytes | bytearray] = []
    short = False  # a request of this span came back short: the object ends inside it
    queued = iter(requests)
    try:
        while True:
            while len(pending) < FILE_REQUESTS and (request := next(queued, None)) is not None:
                future = start_request(submit, request[1], request[2])
                assert future is not None  # waited for a slot
                pending.append((*request, future))
            if not pending:
                return results
            index, lo, hi, future = pending.popleft()
            with guard():
                data = future.result().data
            if short and data:
                raise StorageError(f"bytes [{lo}, {hi}) follow a short answer: the object changed while read")
            short = short or len(data) < hi - lo
            parts.append(data)
            span = spans[index]
            if hi == span.end:  # the span's last request: cut its ranges out
                _cut(span, parts, ranges, results)
                parts, short = [], False
    finally:
        for *_, future in pending:
            future.cancel()


def _cut(
    span: Span, parts: list[bytes | bytearray], ranges: Sequence[tuple[int, int]], results: list[bytes]
) -> None:
    data = parts[0] if len(parts) == 1 else b"".join(parts)
    for member in span.members:
        start, end = ranges[member]
        lo, hi = start - span.start, end - span.start
        whole = lo == 0 and hi >= len(data)
        results[member] = bytes(data) if whole else bytes(memoryview(data)[lo:hi])


# --- the stream ------------------------------------------------------------------------------------


@dataclass
class _Block:
    start: int
    end: int
    future: Future[Fetched]


class RangedReader(io.BufferedIOBase):
    """A seekable binary stream over ranged GETs of an object of known ``size``.

    ``first`` seeds the stream with the block at offset 0 when opening already fetched it (to
    learn the size). Reads never reach ``size``; a response that shows the object ended earlier
    (it shrank, or ``size`` was an upper bound) ends the stream there, like a short file.
    ``open_stream``, where the backend has streamed GETs, serves sequential runs.
    """

    def __init__(
        self,
        submit: Submit,
        size: int,
        name: str,
        *,
        first: Fetched | None = None,
        guard: Guard = contextlib.nullcontext,
        open_stream: OpenStream | None = None,
    ) -> None:
        super().__init__()
        self._submit, self._size, self.name, self._guard = submit, size, name, guard
        self._open_stream = open_stream
        self._streams: deque[Stream] = deque()  # open segments, in offset order
        self._pos = 0
        self._last_end = -1  # where the previous read ended: a read starting there is sequential
        self._streak = 0
        self._window = MIN_BLOCK
        self._blocks: deque[_Block] = deque()
        if first is not None:
            done: Future[Fetched] = Future()
            done.set_result(first)
            self._blocks.append(_Block(0, len(first.data), done))

    # --- io protocol ------------------------------------------------------------------------

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        self._check_open()
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._check_open()
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset}")
        self._pos = base + offset
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        self._check_open()
        wanted = self._size - self._pos if size is None or size < 0 else size
        pieces = list(self._pieces(wanted))
        if len(pieces) == 1 and isinstance(pieces[0], bytes):
            return pieces[0]  # a whole block: handed over without a copy
        return b"".join(pieces)

    def read1(self, size: int = -1) -> bytes:
        return self.read(size)

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        self._check_open()
        view = memoryview(buffer).cast("B")
        filled = 0
        for piece in self._pieces(len(view)):
            view[filled : filled + len(piece)] = piece
            filled += len(piece)
        return filled

    def close(self) -> None:
        if not self.closed:
            self._drop(len(self._blocks))
            self._close_streams()
        super().close()

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError("I/O operation on closed file")

    # --- blocks -------------------------------------------------------------------------------

    def _pieces(self, wanted: int) -> Iterator[bytes | bytearray | memoryview]:
        """The next ``wanted`` bytes (fewer at the end), piece by piece, advancing the position."""
        end = min(self._pos + max(wanted, 0), self._size)
        if self._pos >= end:
            return
        sequential = self._pos == self._last_end
        self._streak = self._streak + 1 if sequential else 0
        if not sequential:
            self._window = MIN_BLOCK
        if self._streamed(sequential, end):
            yield from self._from_streams(end)
            return
        self._close_streams()  # a seek away from the run: its connections are of no use
        yield from self._from_blocks(end)

    def _from_blocks(self, end: int, *, read_ahead: bool = True) -> Iterator[bytes | bytearray | memoryview]:
        streaming = read_ahead and (self._streak > 0 or end - self._pos >= LARGE_READ)
        size = max(min(end - self._pos, STREAM_BLOCK), self._window)
        while self._pos < end:
            block = self._block_at(self._pos, end, size, streaming)
            with self._guard():
                fetched = block.future.result()
            data = fetched.data
            if len(data) < block.end - block.start:
                self._ended_early(block, fetched)
                end = min(end, self._size)
            lo, hi = self._pos - block.start, min(end, block.end) - block.start
            if hi <= lo:
                break
            self._pos += hi - lo
            if self._pos >= block.end:
                self._blocks.popleft()
            self._last_end = self._pos
            yield data if lo == 0 and hi == len(data) else memoryview(data)[lo:hi]

    # --- streamed GETs --------------------------------------------------------------------------

    def _streamed(self, sequential: bool, end: int) -> bool:
        """Whether this read goes through streamed GETs: it continues an open stream (a short
        forward seek included), or starts a sequential run."""
        if self._open_stream is None:
            return False
        if self._streams:
            front = self._streams[0]
            if front.pos <= self._pos <= front.pos + SKIP and self._pos < front.end:
                return True
        return end - self._pos >= LARGE_READ or (sequential and self._window >= STREAM_BLOCK)

    def _from_streams(self, end: int) -> Iterator[bytes | bytearray | memoryview]:
        while self._pos < (end := min(end, self._size)):
            block = self._blocks[0] if self._blocks else None
            if block is not None and block.start <= self._pos < block.end:
                # Fetched already: used up first, and no more blocks are queued behind it.
                yield from self._from_blocks(min(end, block.end), read_ahead=False)
                continue
            self._drop(len(self._blocks))
            stream = self._stream_at(self._pos)
            with self._guard():
                pieces = stream.take(end - self._pos)
            for piece in pieces:
                self._pos += len(piece)
                yield piece
            self._last_end = self._pos
            if stream.pos >= stream.end or not pieces:
                self._streams.popleft().close()
                if stream.pos < stream.end:  # the object ends inside this segment
                    self._size = stream.pos
                    self._close_streams()

    def _stream_at(self, pos: int) -> Stream:
        """The open stream that serves ``pos`` (opened as needed, past a short gap), with the
        segments after it opened ahead where a process slot is free."""
        assert self._open_stream is not None
        front = self._streams[0] if self._streams else None
        if front is not None and not (front.pos <= pos <= front.pos + SKIP and pos < front.end):
            self._close_streams()
            front = None
        if front is None:
            front = start_stream(self._open_stream, pos, self._segment_end(pos))
            assert front is not None  # waited for a slot
            self._streams.append(front)
        while front.pos < pos:  # a short seek forward: cheaper to read past than to ask again
            with self._guard():
                if not front.take(pos - front.pos):
                    break
        while len(self._streams) < OPEN_STREAMS and (last := self._streams[-1].end) < self._size:
            ahead = start_stream(self._open_stream, last, self._segment_end(last), wait=False)
            if ahead is None:
                break
            self._streams.append(ahead)
        return front

    def _segment_end(self, start: int) -> int:
        """Where a streamed GET from ``start`` ends: SEGMENT on, or the end of the reader's
        extent, which a short remainder (under half a segment) is not left out of."""
        end = start + SEGMENT
        return self._size if self._size - end < SEGMENT // 2 else end

    def _close_streams(self) -> None:
        while self._streams:
            self._streams.pop().close()

    def _ended_early(self, block: _Block, fetched: Fetched) -> None:
        """A block came back short: the object ends there, which only its size may say."""
        ends = block.start + len(fetched.data)
        if fetched.size is not None and fetched.size != ends:
            raise StorageError(
                f"{self.name}: bytes [{block.start}, {block.end}) came back as {len(fetched.data)} bytes "
                f"of an object of {fetched.size}: a truncated response"
            )
        self._size = ends
        block.end = ends
        self._drop(len(self._blocks) - 1)  # ``block`` is the first: nothing lies past the end

    def _block_at(self, pos: int, end: int, size: int, streaming: bool) -> _Block:
        """The queued block holding ``pos``, queuing it (and what follows) as needed."""
        while self._blocks and self._blocks[0].end <= pos:
            self._drop_first()
        if self._blocks and self._blocks[0].start > pos:
            self._drop(len(self._blocks))  # a seek backwards: what is queued is of no use
        if not self._blocks:
            self._queue(pos, size, wait=True)
        self._fill(end, streaming)
        return self._blocks[0]

    def _fill(self, end: int, streaming: bool) -> None:
        """Queue blocks up to ``end`` (waiting for process slots), and ahead of it while the
        reading is sequential or streaming (only where a slot is free: read-ahead never waits).
        Each new block is four times the last (at least what the read still needs), up to
        :data:`STREAM_BLOCK`: few requests for a long sequential read, small ones for a short one."""
        while True:
            last = self._blocks[-1]
            if last.end >= self._size or len(self._blocks) >= STREAM_REQUESTS:
                return
            needed = last.end < end
            if not needed and not streaming:
                return
            # Four times the last block, or what the read still needs if that is more.
            size = min(max(self._window * 4, (last.end - last.start) * 4, end - last.end), STREAM_BLOCK)
            if sum(b.end - b.start for b in self._blocks) + size > STREAM_BUFFER:
                return  # the stream's memory bound; consuming a block makes room again
            if not self._queue(last.end, size, wait=needed):
                return
            self._window = size

    def _queue(self, start: int, size: int, *, wait: bool) -> bool:
        end = min(start + size, self._size)
        future = start_request(self._submit, start, end, wait=wait)
        if future is None:
            return False
        self._blocks.append(_Block(start, end, future))
        return True

    def _drop_first(self) -> None:
        self._blocks.popleft().future.cancel()

    def _drop(self, count: int) -> None:
        for _ in range(count):
            self._blocks.pop().future.cancel()
