"""Staging for non-blocking saves: a planned state's bytes copied into one reusable host buffer.

The plan (:mod:`ckptkit.native.plan`) already knows every byte span that will be written, one
per storage (so tied weights and views stay one span and stay tied); staging copies exactly
those spans, back to back, into one buffer and points each entry's ``read`` at its copy. The
writer then streams from the buffer: one staged copy, never a second one, and nothing read from
the caller's tensors after :meth:`HostStager.stage` returns.

The buffer is kept and reused by the next save whose bytes fit (no allocation in steady state;
it grows when a save needs more and never shrinks, so memory is bounded by the largest state
saved). It is pinned when a source tensor is on a CUDA device, so the device-to-host copies run
at full speed (untested here: ckptkit's CI has no GPU). Host memory is copied with ``memmove`` in
pieces spread over a few threads (``memmove`` releases the GIL): about 1.5x faster than
``Tensor.copy_`` per core, and large states use several cores' memory bandwidth.
"""

from __future__ import annotations

import ctypes
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from functools import partial

import torch

from ckptkit.native.buffers import host_memoryview
from ckptkit.native.plan import Entry
from ckptkit.native.writer import NativePlan

_ALIGN = 64  # each copy starts on a cache line
_PIECE = 64 << 20  # host copies are cut into pieces of this size to spread them over threads


class HostStager:
    """Copies planned states into a host buffer it keeps for the next save (see module doc).

    Not thread-safe, and a staged plan is valid only until the next :meth:`stage`: its owner
    stages the next save only once the previous one is written (one save in flight).
    """

    def __init__(self, copy_threads: int | None = None) -> None:
        self._threads = copy_threads or min(4, os.cpu_count() or 1)
        self._pool: ThreadPoolExecutor | None = None
        self._buffer: torch.Tensor | None = None
        self._pinned = False

    @property
    def buffer(self) -> torch.Tensor | None:
        """The staging buffer (a flat ``uint8`` tensor), or None before the first save."""
        return self._buffer

    def stage(self, planned: NativePlan) -> NativePlan:
        """``planned`` with every entry's bytes copied into the buffer; returns once copied."""
        entries = planned.plan.entries
        offsets, total = _layout(entries)
        buffer = self._reserve(total, pinned=_on_cuda(entries) and torch.cuda.is_available())
        host_copies: list[tuple[int, int, int]] = []  # (destination, source, size) addresses
        devices: set[torch.device] = set()
        staged: list[Entry] = []
        for entry, offset in zip(entries, offsets, strict=True):
            target = buffer[offset : offset + entry.nbytes]
            if entry.source is None:  # a numpy array's bytes: small, rare
                host_memoryview(target)[:] = entry.read()
            else:
                storage, start = entry.source
                if storage.device.type == "cpu":
                    host_copies.append((target.data_ptr(), storage.data_ptr() + start, entry.nbytes))
                else:
                    source = torch.empty(0, dtype=torch.uint8, device=storage.device)
                    source.set_(storage, start, (entry.nbytes,))
                    target.copy_(source, non_blocking=self._pinned)
                    devices.add(storage.device)
            staged.append(replace(entry, read=partial(host_memoryview, target), source=None))
        self._memmove(host_copies)
        for device in devices:  # the caller may change its tensors once we return
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        return replace(planned, plan=replace(planned.plan, entries=staged))

    def close(self) -> None:
        """Free the buffer and stop the copy threads."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        self._buffer = None

    def forget_threads(self) -> None:
        """After a fork: the copy threads stayed in the parent; start new ones on demand."""
        self._pool = None

    def _reserve(self, total: int, *, pinned: bool) -> torch.Tensor:
        buffer = self._buffer
        if buffer is not None and buffer.numel() >= total and (self._pinned or not pinned):
            return buffer
        self._buffer = None  # let the old buffer go before the new one is allocated
        del buffer
        self._buffer = torch.empty(max(total, 1), dtype=torch.uint8, pin_memory=pinned)
        self._pinned = pinned
        return self._buffer

    def _memmove(self, copies: list[tuple[int, int, int]]) -> None:
        pieces = [
            (dst + at, src + at, min(_PIECE, size - at))
            for dst, src, size in copies
            for at in range(0, size, _PIECE)
        ]
        if self._threads < 2 or sum(p[2] for p in pieces) < 2 * _PIECE:
            for piece in pieces:
                ctypes.memmove(*piece)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="ckptkit-stage")
        # Largest first, so that the threads finish together.
        pieces.sort(key=lambda p: -p[2])
        for _ in self._pool.map(lambda piece: ctypes.memmove(*piece), pieces):
            pass


def _layout(entries: list[Entry]) -> tuple[list[int], int]:
    """Each entry's offset in the buffer, and the buffer's size."""
    offsets = []
    total = 0
    for entry in entries:
        offsets.append(total)
        total += -(-entry.nbytes // _ALIGN) * _ALIGN
    return offsets, total


def _on_cuda(entries: list[Entry]) -> bool:
    return any(e.source is not None and e.source[0].device.type == "cuda" for e in entries)
