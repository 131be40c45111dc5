"""A one-line progress display for long transfers: bytes, rate, ETA, files. Terminal only."""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

from ckptkit.cli.render import format_bytes

_REFRESH_SECONDS = 0.2


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class TerminalProgress:
    """Redraws one line of ``stream`` at most five times a second; thread-safe (copies run in a
    pool). Counts may go down: a failed attempt takes back the bytes it had counted."""

    def __init__(self, stream: TextIO | None = None, label: str = "sync") -> None:
        self.stream = stream or sys.stderr
        self.label = label
        self._lock = threading.Lock()
        self._total = 0
        self._done = 0
        self._files_total = 0
        self._files_done = 0
        self._started = time.monotonic()
        self._drawn_at = 0.0
        self._active = False

    def start(self, total_bytes: int, total_files: int) -> None:
        with self._lock:
            self._total, self._files_total = total_bytes, total_files
            self._started = time.monotonic()
            self._active = total_files > 0
        self._draw(force=True)

    def advance(self, nbytes: int) -> None:
        with self._lock:
            self._done += nbytes
        self._draw()

    def file_done(self) -> None:
        with self._lock:
            self._files_done += 1
        self._draw()

    def finish(self) -> None:
        self._draw(force=True)
        with self._lock:
            if self._active:
                self.stream.write("\n")
                self.stream.flush()
            self._active = False

    def line(self) -> str:
        elapsed = max(time.monotonic() - self._started, 1e-9)
        rate = self._done / elapsed
        percent = 100.0 * self._done / self._total if self._total else 100.0
        eta = _clock((self._total - self._done) / rate) if rate > 0 and self._done < self._total else "-"
        return (
            f"{self.label}: {format_bytes(self._done)} / {format_bytes(self._total)} {percent:5.1f}%  "
            f"{format_bytes(int(rate))}/s  ETA {eta}  files {self._files_done}/{self._files_total}"
        )

    def _draw(self, *, force: bool = False) -> None:
        with self._lock:
            now = time.monotonic()
            if not self._active or (not force and now - self._drawn_at < _REFRESH_SECONDS):
                return
            self._drawn_at = now
            self.stream.write("\r\x1b[K" + self.line())
            self.stream.flush()
