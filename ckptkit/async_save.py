"""Non-blocking saves: the caller waits for a copy of its tensors; a background thread does the rest.

``ckptkit.save(..., blocking=False)`` and ``CheckpointManager.save(..., blocking=False)`` encode
the state (so an unstorable value is still raised at the call), copy every tensor storage it
views into a reusable host buffer (:mod:`ckptkit.native.staging`) and return a
:class:`SaveHandle`. From then on the caller may change its tensors: the checkpoint holds the
values they had at the call. Hashing, writing, fsync and the commit run in the owner's
:class:`BackgroundSaver` thread, through the same commit protocol as a blocking save, so a
process killed before the background commit leaves no commit, only debris for ``ckptkit gc``.

One save in flight per owner: a save first waits for the previous one to be committed
(back-pressure). Memory is therefore one staged copy of the state, reused from save to save.
A failure in the background is logged when it happens and kept: ``SaveHandle.wait()`` raises it,
and so does the owner's next call (the next save, ``wait``, ``close``...), once, unless
``wait()`` already did. Nothing is lost at interpreter exit either: a save still running is
waited for then.

The background thread runs at a lower CPU priority (Linux: nice 10 on that thread alone, which
the shard-writing threads it starts inherit), so hashing and writing give way to training.

Bare ``ckptkit.save(..., blocking=False)`` calls share one saver per process (one thread and one
staging buffer): each waits for the previous non-blocking save of the process to finish. That
bounds memory to one staged copy, as for a manager, and lets the buffer be reused; a program that
saves to several places at once uses a ``CheckpointManager`` per place, each with its own saver.

This module imports no torch at module level; staging does, when called.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import sys
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

from ckptkit.manifest import Manifest

if TYPE_CHECKING:
    from ckptkit.native.staging import HostStager

log = logging.getLogger("ckptkit.async_save")

BACKGROUND_NICE = 10  # the niceness of the background thread (Linux)

Job = Callable[[], Manifest]


class SaveHandle:
    """A save running in the background: ``wait()`` for its manifest, ``done()`` to poll."""

    def __init__(self, url: str, step: int | None) -> None:
        self.url = url
        self.step = step
        self._finished = threading.Event()
        self._manifest: Manifest | None = None
        self._error: BaseException | None = None
        self._reported = False
        self._lock = threading.Lock()

    def done(self) -> bool:
        """Whether the save has committed or failed."""
        return self._finished.is_set()

    def wait(self, timeout: float | None = None) -> Manifest:
        """The committed manifest, once the save is done; re-raises its failure.

        Raises :class:`TimeoutError` if it is still running after ``timeout`` seconds.
        """
        if not self._finished.wait(timeout):
            raise TimeoutError(f"{self.url}: the save is still running after {timeout:g} s")
        with self._lock:
            self._reported = True
        if self._error is not None:
            raise self._error
        assert self._manifest is not None
        return self._manifest

    def take_unreported_error(self) -> BaseException | None:
        """The failure of a finished save that nobody has been told of yet, marked as told."""
        if not self.done():
            return None
        with self._lock:
            if self._reported:
                return None
            self._reported = True
        return self._error

    def _finish(self, manifest: Manifest | None, error: BaseException | None) -> None:
        self._manifest, self._error = manifest, error
        self._finished.set()

    def __repr__(self) -> str:
        state = "running" if not self.done() else ("failed" if self._error else "committed")
        return f"SaveHandle({self.url!r}, step={self.step}, {state})"


class BackgroundSaver:
    """One owner's background saves (a manager's, or the process's bare saves): one thread,
    one staging buffer, at most one save in flight. Used from one thread, the owner's."""

    def __init__(self, name: str = "ckptkit-save") -> None:
        self._name = name
        self._jobs: queue.SimpleQueue[tuple[SaveHandle, Job] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._current: SaveHandle | None = None
        self._stager: HostStager | None = None
        _savers.add(self)

    @property
    def stager(self) -> HostStager:
        """The staging buffer's keeper; use it only after :meth:`wait` (the previous save done)."""
        if self._stager is None:
            from ckptkit.native.staging import HostStager

            self._stager = HostStager()
        return self._stager

    @property
    def in_flight(self) -> SaveHandle | None:
        handle = self._current
        return handle if handle is not None and not handle.done() else None

    def wait(self) -> None:
        """Wait for the save in flight, then raise a failure not yet reported (see module doc)."""
        handle = self._current
        if handle is not None:
            handle._finished.wait()
        self.raise_failure()

    def raise_failure(self) -> None:
        """Raise the failure of the last save if it failed and nobody was told; never waits."""
        handle = self._current
        error = handle.take_unreported_error() if handle is not None else None
        if error is not None:
            raise error

    def submit(self, url: str, step: int | None, job: Job) -> SaveHandle:
        """Run ``job`` (write and commit a staged state) in the background; call :meth:`wait`
        first. Returns at once."""
        if self.in_flight is not None:
            raise RuntimeError("a save is already in flight: BackgroundSaver.wait() comes first")
        handle = SaveHandle(url, step)
        self._current = handle
        if self._thread is None:
            # The thread holds the queue, not the saver: a saver (a manager) dropped without
            # close() is collected, its buffer freed, and the finalizer stops the thread.
            self._thread = threading.Thread(target=_work, args=(self._jobs,), name=self._name, daemon=True)
            self._thread.start()
            weakref.finalize(self, self._jobs.put, None)
            # A script that ends right after save(blocking=False) still gets its commit. This
            # hook runs before concurrent.futures refuses new threads at shutdown (the shard
            # writers need them), and before the hooks of mirrors made earlier (newest first).
            register = getattr(threading, "_register_atexit", None)
            if register is not None:
                register(_finish_at_exit, weakref.ref(self))
        self._jobs.put((handle, job))
        return handle

    def close(self) -> None:
        """Wait for the save in flight (raising its failure), then stop the thread and free
        the buffer."""
        try:
            self.wait()
        finally:
            if self._thread is not None:
                self._jobs.put(None)
                self._thread.join()
                self._thread = None
            if self._stager is not None:
                self._stager.close()
                self._stager = None

    def _forget_parent(self) -> None:
        """In a forked child: the thread, the save in flight and the copy threads are the
        parent's; start afresh (the parent commits its own save)."""
        self._jobs = queue.SimpleQueue()
        self._thread = None
        self._current = None
        if self._stager is not None:
            self._stager.forget_threads()


def _work(jobs: queue.SimpleQueue[tuple[SaveHandle, Job] | None]) -> None:
    """The background thread: run each job, keep its outcome in its handle, until None."""
    lower_thread_priority()
    while (item := jobs.get()) is not None:
        handle, job = item
        try:
            manifest = job()
        except BaseException as exc:  # kept for the caller: it must never be lost
            log.warning("background save of %s failed: %s: %s", handle.url, type(exc).__name__, exc)
            handle._finish(None, exc)
        else:
            handle._finish(manifest, None)
        del item, job  # the staged plan: its buffer is the stager's to reuse


def lower_thread_priority(nice: int = BACKGROUND_NICE) -> None:
    """Lower the calling thread's CPU priority to ``nice`` (never raise it). Linux only: there
    ``setpriority`` on a thread id affects that thread alone; elsewhere it would renice the
    process, so nothing is done."""
    if not sys.platform.startswith("linux"):
        return
    tid = threading.get_native_id()
    with contextlib.suppress(OSError):  # a sandbox that forbids it: run at normal priority
        os.setpriority(os.PRIO_PROCESS, tid, max(nice, os.getpriority(os.PRIO_PROCESS, tid)))


_savers: weakref.WeakSet[BackgroundSaver] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for saver in list(_savers):
        saver._forget_parent()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)

_process_saver: BackgroundSaver | None = None
_process_saver_lock = threading.Lock()


def process_saver() -> BackgroundSaver:
    """The saver of bare ``ckptkit.save(..., blocking=False)`` calls (one per process)."""
    global _process_saver
    with _process_saver_lock:
        if _process_saver is None:
            _process_saver = BackgroundSaver("ckptkit-save")
        return _process_saver


def _finish_at_exit(ref: weakref.ref[BackgroundSaver]) -> None:
    saver = ref()
    handle = saver._current if saver is not None else None
    if handle is None:
        return
    if not handle.done():
        log.warning("waiting for the background save of %s before exit", handle.url)
        handle._finished.wait()
    error = handle.take_unreported_error()
    if error is not None:
        log.error("background save of %s failed, and nobody waited for it: %s", handle.url, error)
