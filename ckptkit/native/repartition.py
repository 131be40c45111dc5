"""Loading a per-rank native checkpoint at another world size: which saved bytes each new rank
needs (torch-free; :mod:`ckptkit.native.repartition_reader` reads them).

A checkpoint saved by N ranks reshards on load when the ranks' states are one data-parallel
replica apart from their :class:`~ckptkit.native.partition.FlatShard` values: the same
containers, keys, leaf kinds, and tensor dtypes and shapes on every rank. Only this structure
is compared, from the ``tree.json`` files: the replica's values (tensor bytes, numbers, strings)
are taken from rank 0 and never read on the other ranks, so a value that really differs per
rank without being a FlatShard (a per-rank RNG state, say) comes back as rank 0's. The
FlatShards at one place in the tree must agree in shape and dtype and tile the logical tensor
exactly; rank r of M then gets the slice :meth:`FlatShard.span` gives it, read from the byte
ranges of the saved slices that overlap it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from ckptkit.errors import FormatError
from ckptkit.native.decode import FlatShardNode, array_node, flat_shard_node, tensor_record
from ckptkit.native.document import load_document
from ckptkit.native.nodes import TAG, Json, TreePath, format_path
from ckptkit.native.partition import FlatShard
from ckptkit.storage.base import Store

_PAIRS = ("dict", "odict", "counter")
_STRUCTURE = "to reshard on load, every rank's state must have rank 0's structure, FlatShards apart"


@dataclass(frozen=True)
class Piece:
    """Elements of one saved slice that a new slice needs."""

    rank: int  # the saved rank whose slice holds them
    node: FlatShardNode  # that slice: its entry, byte offset and dtype
    start: int  # first element, counted within the saved slice
    count: int
    at: int  # where they go, counted within the new slice


@dataclass(frozen=True)
class NewSlice:
    """What one FlatShard becomes on the loading rank."""

    like: FlatShardNode  # rank 0's slice: dtype, device and flags of the new one
    offset: int
    length: int
    pieces: tuple[Piece, ...]


@dataclass(frozen=True)
class RepartitionPlan:
    """Everything rank ``rank`` of ``world`` reads: rank 0's tree for the replica and, for each
    FlatShard node of that tree (by the node object's identity), its new slice."""

    stores: list[Store]  # each saved rank's tree.json and shards
    documents: list[dict[str, Any]]
    rank: int
    world: int
    slices: dict[int, NewSlice]


def plan_repartition(stores: list[Store], rank: int, world: int) -> RepartitionPlan | None:
    """The plan for rank ``rank`` of ``world`` to load the per-rank states in ``stores`` (one a
    saved rank); None when no rank's state holds a FlatShard, which leaves nothing to reshard.

    Raises :class:`FormatError` naming the place in the tree where the ranks' structures differ,
    or where their FlatShards do not tile the tensor.
    """
    documents = []
    for saved, store in enumerate(stores):
        with on_rank(saved):
            documents.append(load_document(store))
    if not any(_holds_flat_shard(document["tree"]) for document in documents):
        return None
    walk = _Walk(documents, rank, world)
    walk.compare([document["tree"] for document in documents], ())
    return RepartitionPlan(stores, documents, rank, world, walk.slices)


@contextmanager
def on_rank(rank: int) -> Iterator[None]:
    """Errors of reading saved rank ``rank``'s files say so: every rank's files have the same
    names. The error keeps its class and fields (a TruncatedError stays one)."""
    try:
        yield
    except FormatError as exc:
        exc.args = (f"rank {rank}: {exc}", *exc.args[1:])
        raise


def _holds_flat_shard(node: Json) -> bool:
    if type(node) is list:
        return any(_holds_flat_shard(item) for item in node)
    if type(node) is not dict:
        return False
    return node.get(TAG) == "flatshard" or any(_holds_flat_shard(item) for item in node.values())


class _Walk:
    """Walks the ranks' trees side by side, checking that they have one structure and planning
    each FlatShard's new slice."""

    def __init__(self, documents: list[dict[str, Any]], rank: int, world: int) -> None:
        self._documents = documents
        self._rank = rank
        self._world = world
        self.slices: dict[int, NewSlice] = {}

    def compare(self, nodes: list[Json], path: TreePath) -> None:
        kinds = [_kind(node) for node in nodes]
        self._same(path, "is", kinds)
        first = nodes[0]
        if type(first) is list:
            self._same(path, "has", [f"{len(node)} items" for node in nodes])
            for index in range(len(first)):
                self.compare([node[index] for node in nodes], (*path, index))
        elif type(first) is dict and TAG not in first:
            self._same_keys(path, [list(node) for node in nodes])
            for key in first:
                self.compare([node[key] for node in nodes], (*path, key))
        elif type(first) is dict:
            self._tagged(first[TAG], nodes, path)

    def _tagged(self, tag: Any, nodes: list[dict[str, Any]], path: TreePath) -> None:
        if tag in _PAIRS:
            pairs = [_items(node, tag) for node in nodes]
            self._same_keys(path, [[_pair(p, tag)[0] for p in items] for items in pairs])
            for index, (key, _) in enumerate(_pair(p, tag) for p in pairs[0]):
                shown = key if type(key) in (str, int, float, bool) or key is None else f"<key {index}>"
                self.compare([_pair(items[index], tag)[1] for items in pairs], (*path, shown))
        elif tag == "tuple":
            items = [_items(node, tag) for node in nodes]
            self._same(path, "has", [f"{len(i)} items" for i in items])
            for index in range(len(items[0])):
                self.compare([i[index] for i in items], (*path, index))
        elif tag in ("set", "frozenset"):  # unordered: their order differs between processes
            self._same(path, "has", [f"{len(_items(node, tag))} items" for node in nodes])
        elif tag == "tensor":
            records = [self._on(saved, tensor_record, node.get("i")) for saved, node in enumerate(nodes)]
            self._same(path, "is a tensor of", [f"{r.dtype} {list(r.shape)}" for r in records])
        elif tag == "ndarray":
            arrays = [self._on(saved, array_node, node) for saved, node in enumerate(nodes)]
            self._same(path, "is an array of", [f"{a.dtype} {list(a.shape)}" for a in arrays])
        elif tag == "npscalar":
            self._same(path, "is a numpy scalar of", [node.get("dtype") for node in nodes])
        elif tag == "flatshard":
            self._flat_shard(nodes, path)
        # Any other tag is a scalar leaf (int, float, bytes, dtype, ...): rank 0's value is taken.

    def _flat_shard(self, nodes: list[dict[str, Any]], path: TreePath) -> None:
        saved = [self._on(k, flat_shard_node, node) for k, node in enumerate(nodes)]
        self._same(path, "is a FlatShard of", [f"{s.record.dtype} {list(s.shape)}" for s in saved])
        numel = math.prod(saved[0].shape)
        _check_tiling(saved, numel, path)
        start, end = FlatShard.span(numel, self._rank, self._world)
        pieces = []
        for rank, piece in enumerate(saved):
            low, high = max(start, piece.offset), min(end, piece.stop)
            if low < high:
                pieces.append(Piece(rank, piece, low - piece.offset, high - low, low - start))
        self.slices[id(nodes[0])] = NewSlice(saved[0], start, end - start, tuple(pieces))

    def _on(self, saved: int, read: Any, node: Any) -> Any:
        """``read(document, node)`` on rank ``saved``'s document, its errors naming the rank."""
        with on_rank(saved):
            return read(self._documents[saved], node)

    @classmethod
    def _same_keys(cls, path: TreePath, keys: list[list[Json]]) -> None:
        """Like :meth:`_same`, naming a key that one rank has and another lacks."""
        for saved, own in enumerate(keys):
            lacking = [key for key in keys[0] if key not in own]
            extra = [key for key in own if key not in keys[0]]
            if lacking or extra:
                has, lacks = (0, saved) if lacking else (saved, 0)
                key = (lacking or extra)[0]
                raise FormatError(
                    f"{format_path(path)} has the key {key!r} on rank {has} but not on rank {lacks}: "
                    f"{_STRUCTURE}"
                )
        cls._same(path, "has its keys in the order", keys)

    @staticmethod
    def _same(path: TreePath, what: str, values: list[Any]) -> None:
        for saved, value in enumerate(values):
            if value != values[0]:
                raise FormatError(
                    f"{format_path(path)} {what} {values[0]} on rank 0 but {value} on rank {saved}: "
                    f"{_STRUCTURE}"
                )


def _check_tiling(saved: list[FlatShardNode], numel: int, path: TreePath) -> None:
    """The saved slices cover the tensor's elements once each: no gap, no overlap."""
    where = f"{format_path(path)}: the FlatShards of the {len(saved)} ranks"
    spans = sorted((s.offset, s.stop, rank) for rank, s in enumerate(saved) if s.stop > s.offset)
    covered, holder = 0, None
    for start, stop, rank in spans:
        if start > covered:
            raise FormatError(f"{where} leave elements [{covered}, {start}) of {numel} uncovered")
        if start < covered:
            raise FormatError(
                f"{where} overlap: elements [{start}, {min(stop, covered)}) are held by rank {holder} "
                f"and rank {rank}"
            )
        covered, holder = stop, rank
    if covered != numel:
        raise FormatError(f"{where} leave elements [{covered}, {numel}) of {numel} uncovered")


def _kind(node: Json) -> str:
    if type(node) is dict:
        tag = node.get(TAG)
        return "a dict" if TAG not in node else f"a {tag!r} node"
    if type(node) is list:
        return "a list"
    return "null" if node is None else f"a {type(node).__name__}"


def _items(node: dict[str, Any], tag: str) -> list[Any]:
    items = node.get("v")
    if type(items) is not list:
        raise FormatError(f"tree.json: {tag!r} node needs a list, found {items!r}")
    return items


def _pair(pair: Any, tag: str) -> tuple[Json, Json]:
    if type(pair) is not list or len(pair) != 2:
        raise FormatError(f"tree.json: malformed {tag!r} node: {pair!r} is not a key and a value")
    return pair[0], pair[1]
