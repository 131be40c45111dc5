"""The one progress display of every long command: bytes, percent, rate, ETA (and files), on one
line of stderr, and only when stderr is a terminal and the output is not ``--json``.

Ours rather than ``click.progressbar``: the ops report from worker threads (chunks hashed and
files copied in pools), which click's bar is not made for; it counts items, not bytes, so rate
and sizes would need a formatter of our own anyway; and off a terminal it still prints its label
once, where a pipe or a log must get nothing but the command's normal output.
"""

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


def terminal_progress(label: str, *, as_json: bool = False) -> TerminalProgress | None:
    """The display for command ``label``, or None (ops then count nothing) under ``--json`` or
    when stderr is not a terminal: a pipe, a log file or a test runner gets no progress text."""
    if as_json or not sys.stderr.isatty():
        return None
    return TerminalProgress(sys.stderr, label)


class TerminalProgress:
    """Implements :class:`ckptkit.progress.Progress`. Redraws one line of ``stream`` at most five
    times a second; thread-safe. Counts may go down: a failed attempt takes back its bytes."""

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

    def start(self, total_bytes: int, total_files: int = 0) -> None:
        with self._lock:
            self._total, self._files_total = total_bytes, total_files
            self._started = time.monotonic()
            self._active = total_bytes > 0 or total_files > 0  # no work, no line
        self._draw(force=True)

    def advance(self, nbytes: int) -> None:
        with self._lock:
            self._done += nbytes
        self._draw()

    def file_done(self, count: int = 1) -> None:
        with self._lock:
            self._files_done += count
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
        files = f"  files {self._files_done}/{self._files_total}" if self._files_total else ""
        return (
            f"{self.label}: {format_bytes(self._done)} / {format_bytes(self._total)} {percent:5.1f}%  "
            f"{format_bytes(int(rate))}/s  ETA {eta}{files}"
        )

    def _draw(self, *, force: bool = False) -> None:
        with self._lock:
            now = time.monotonic()
            if not self._active or (not force and now - self._drawn_at < _REFRESH_SECONDS):
                return
            self._drawn_at = now
            self.stream.write("\r\x1b[K" + self.line())
            self.stream.flush()
