"""``FlatShard``: the part of a tensor one rank holds, as a state tree records it.

A data-parallel job that partitions its optimizer state (ZeRO-1 by hand, a sharded master copy)
saves each rank's part as a :class:`FlatShard`: a contiguous slice of the flattened logical
tensor. Because the slice says which part of which whole it is, a checkpoint saved by N ranks
can be loaded by M: each new rank reads only the byte ranges of the saved slices that cover its
own (see :mod:`ckptkit.native.repartition`).

The rule ckptkit cuts by, and that a training loop should cut by too, is ZeRO-3's: of a tensor
of ``n`` elements, rank ``r`` of ``W`` holds flat elements ``[r*c, min(n, (r+1)*c))`` with
``c = ceil(n / W)``, so the last ranks may hold fewer elements, or none. Saved checkpoints may be
cut differently, as long as the slices tile the tensor; a resharded load always cuts by this rule.

Torch-free: the class holds whatever tensor it is given (a ``torch.Tensor`` when loaded, a
description of one under ``inspect``) and reads only its ``shape``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, eq=False)
class FlatShard:
    """``tensor`` (1-D) holds flat elements ``[offset, offset + len(tensor))`` of a logical tensor
    of ``shape``.

    Equality is exact: same ``shape`` and ``offset``, and tensors of one dtype with equal
    elements (``torch.equal``).
    """

    tensor: Any
    shape: tuple[int, ...] = field(kw_only=True)
    offset: int = field(kw_only=True)

    def __post_init__(self) -> None:
        shape = tuple(self.shape)
        if not all(type(n) is int and n >= 0 for n in shape):
            raise ValueError(f"FlatShard: shape must be non-negative ints, got {self.shape!r}")
        object.__setattr__(self, "shape", shape)  # a torch.Size or list becomes a plain tuple
        if type(self.offset) is not int or self.offset < 0:
            raise ValueError(f"FlatShard: offset must be a non-negative int, got {self.offset!r}")
        local = tuple(getattr(self.tensor, "shape", ()))
        if len(local) != 1:
            raise ValueError(f"FlatShard: the tensor must be 1-D (a flat slice), got shape {list(local)}")
        if self.offset + local[0] > self.numel:
            raise ValueError(
                f"FlatShard: elements [{self.offset}, {self.offset + local[0]}) lie outside a tensor "
                f"of shape {list(shape)} ({self.numel} elements)"
            )

    @property
    def numel(self) -> int:
        """Elements of the logical tensor (not of this slice)."""
        return math.prod(self.shape)

    @property
    def stop(self) -> int:
        """One past the last flat element this slice holds."""
        return self.offset + int(self.tensor.shape[0])

    @staticmethod
    def span(numel: int, rank: int, world: int) -> tuple[int, int]:
        """``(start, end)``: the flat elements rank ``rank`` of ``world`` holds of a tensor of
        ``numel`` elements, by the rule above."""
        if world < 1 or not 0 <= rank < world or numel < 0:
            raise ValueError(f"FlatShard.span: no rank {rank} of {world} for {numel} elements")
        chunk = -(-numel // world)
        return min(numel, rank * chunk), min(numel, (rank + 1) * chunk)

    @classmethod
    def cut(cls, tensor: Any, rank: int, world: int) -> FlatShard:
        """Rank ``rank`` of ``world``'s part of the whole ``tensor``: a view where the tensor is
        contiguous, a copy otherwise."""
        start, end = cls.span(tensor.numel(), rank, world)
        return cls(tensor.reshape(-1)[start:end], shape=tuple(tensor.shape), offset=start)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FlatShard):
            return NotImplemented
        if (self.shape, self.offset) != (other.shape, other.offset):
            return False
        mine, theirs = self.tensor, other.tensor
        if hasattr(mine, "equal") and hasattr(theirs, "equal"):  # torch tensors
            return bool(mine.dtype == theirs.dtype and mine.equal(theirs))
        return bool(mine == theirs)

    __hash__ = None  # type: ignore[assignment]  # equal by value, and tensors are mutable

    def __repr__(self) -> str:
        held = self.stop - self.offset
        return f"FlatShard(<{held} elements>, shape={list(self.shape)}, offset={self.offset})"
