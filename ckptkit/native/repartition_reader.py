"""Reading a per-rank native checkpoint at another world size, by a
:class:`~ckptkit.native.repartition.RepartitionPlan`: rank 0's tree is decoded as ``load`` always
decodes it, except that each FlatShard becomes the loading rank's new slice, assembled from the
byte ranges of the saved slices that overlap it. No saved slice is read whole unless the new one
needs all of it, and the bytes of the other ranks' replica are never read.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from typing import Any, cast

import torch

from ckptkit.errors import FormatError, TruncatedError
from ckptkit.native.buffers import host_memoryview
from ckptkit.native.decode import TreeDecoder
from ckptkit.native.document import EntryRef
from ckptkit.native.dtypes import torch_dtype
from ckptkit.native.files import TREE_FILE
from ckptkit.native.partition import FlatShard
from ckptkit.native.reader import MapLocation, TorchLeaves, select_keys
from ckptkit.native.repartition import NewSlice, Piece, RepartitionPlan, on_rank
from ckptkit.native.safetensors_io import ShardReader


def read_repartitioned(
    plan: RepartitionPlan,
    *,
    keys: Sequence[str] | None = None,
    map_location: MapLocation = None,
    mmap: bool = True,
) -> Any:
    """The state of rank ``plan.rank`` of ``plan.world``; ``keys``, ``map_location`` and ``mmap``
    as for :func:`~ckptkit.native.reader.read_native`. A new slice is built on the CPU and then
    placed as rank 0's slice would be (its device after ``map_location``)."""
    document = plan.documents[0]
    tree = document["tree"] if keys is None else select_keys(document, keys)
    with ExitStack() as stack:
        shards = [ShardReader(store, mmap=mmap, stack=stack) for store in plan.stores]
        return _Repartitioning(plan, shards, TorchLeaves(shards[0], map_location)).decode(tree)


class _Repartitioning(TreeDecoder):
    def __init__(self, plan: RepartitionPlan, shards: list[ShardReader], leaves: TorchLeaves) -> None:
        super().__init__(plan.documents[0], leaves)
        self._plan = plan
        self._shards = shards  # by saved rank; rank 0's also reads the replica, sharing its headers
        self._torch = leaves

    def flat_shard(self, node: dict[str, Any]) -> FlatShard:
        new = self._plan.slices.get(id(node))
        if new is None:  # the plan walked every node of this tree: only a bug lands here
            raise FormatError(f"{TREE_FILE}: a FlatShard outside the tree that was planned")
        like = new.like.record
        tensor = torch.empty(new.length, dtype=torch_dtype(like.dtype, f"{TREE_FILE}: tensor {like.index}"))
        self._fill(tensor, new)
        return FlatShard(self._torch.place(tensor, like), shape=new.like.shape, offset=new.offset)

    def _fill(self, tensor: torch.Tensor, new: NewSlice) -> None:
        view = host_memoryview(tensor)
        itemsize = new.like.record.itemsize
        by_file: dict[tuple[int, str], list[Piece]] = {}
        for piece in new.pieces:
            by_file.setdefault((piece.rank, _entry(piece).shard), []).append(piece)
        # One read_ranges call per saved shard file: a remote store runs its ranges concurrently.
        for (rank, shard), pieces in by_file.items():
            ranges = [self._byte_range(piece) for piece in pieces]
            chunks = self._plan.stores[rank].read_ranges(shard, ranges)
            for piece, (start, end), data in zip(pieces, ranges, chunks, strict=True):
                if len(data) != end - start:
                    raise TruncatedError(
                        f"rank {rank}: {shard}: the slice of {_entry(piece).name!r} is truncated",
                        path=shard,
                        offset=start + len(data),
                        expected=end,
                        actual=start + len(data),
                    )
                view[piece.at * itemsize : (piece.at + piece.count) * itemsize] = data

    def _byte_range(self, piece: Piece) -> tuple[int, int]:
        """Where ``piece``'s elements lie in its saved shard file, checked against the header."""
        record, entry = piece.node.record, _entry(piece)
        with on_rank(piece.rank):
            info = self._shards[piece.rank].header(entry.shard).entries.get(entry.name)
        where = f"rank {piece.rank}: {entry.shard}"
        if info is None:
            raise FormatError(f"{where}: has no tensor {entry.name!r}, which {TREE_FILE} refers to")
        if info.dtype != entry.dtype or tuple(info.shape) != entry.shape:
            raise FormatError(
                f"{where}: tensor {entry.name!r} is {info.dtype} {list(info.shape)} in the shard header, "
                f"{entry.dtype} {list(entry.shape)} in {TREE_FILE}"
            )
        if record.offset + record.shape[0] * record.itemsize > info.nbytes:
            raise FormatError(
                f"{where}: the FlatShard's {record.shape[0]} elements at byte {record.offset} lie "
                f"outside entry {entry.name!r} of {info.nbytes} bytes"
            )
        start = info.offset + record.offset + piece.start * record.itemsize
        return start, start + piece.count * record.itemsize


def _entry(piece: Piece) -> EntryRef:
    # A piece holds elements, and tensor_record refuses a tensor with elements but no entry.
    return cast(EntryRef, piece.node.record.entry)
