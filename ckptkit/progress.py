"""How long operations report progress: ops count, the CLI draws (ops never print).

Every long op (``verify``, ``index``, ``gc``, ``sync``, ``convert``, ``consolidate``) takes an
optional :class:`Progress` and calls ``start`` once with the work it found, ``advance`` as bytes
are done (from several threads: implementations must be thread-safe), ``file_done`` per file or
object where that means something, and ``finish`` at the end, also on error. Torch-free and
click-free, so library users can plug in a display of their own (tqdm, a log line, a metric).
"""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    def start(self, total_bytes: int, total_files: int = 0) -> None:
        """The work ahead: bytes, and files when counting them means something (0: not shown)."""

    def advance(self, nbytes: int) -> None:
        """``nbytes`` more are done (negative: a failed attempt takes back what it counted)."""

    def file_done(self, count: int = 1) -> None:
        """``count`` more files (or objects) are done."""

    def finish(self) -> None:
        """The op is over; a display draws its last state."""


class NoProgress:
    """The default: counts nothing, draws nothing."""

    def start(self, total_bytes: int, total_files: int = 0) -> None:
        pass

    def advance(self, nbytes: int) -> None:
        pass

    def file_done(self, count: int = 1) -> None:
        pass

    def finish(self) -> None:
        pass


NO_PROGRESS = NoProgress()
