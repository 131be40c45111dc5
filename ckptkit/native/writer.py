"""``write_native``: a state tree to ``tree.json`` plus safetensors shards, through a sink."""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

from ckptkit.hashing import FileDigest, digest_pieces
from ckptkit.native import jsonfmt
from ckptkit.native.document import FLAT_SHARD_VERSION, FORMAT_NAME, PLAIN_VERSION
from ckptkit.native.files import TREE_FILE
from ckptkit.native.nodes import Json
from ckptkit.native.plan import Entry, Plan, assign_dedup_shards, assign_shards, plan_entries, shard_name
from ckptkit.native.safetensors_io import shard_chunks
from ckptkit.native.tree import TreeEncoder


class FileSink(Protocol):
    """Where the files of one checkpoint go; ``CheckpointTransaction`` is one.

    ``write`` must be thread-safe: shards are written concurrently. ``path`` is relative
    (``"tree.json"``); ``data`` is bytes or an iterable of buffers, to be streamed, not joined.
    ``digest``, given when the sink deduplicates (``dedup`` is set), is the digest of ``data``
    under the sink's ``digest`` algorithm: a sink that has those bytes already skips them.
    """

    digest: str
    dedup: Any  # ckptkit.blobs.DedupFiles when deduplicating: ``reserve`` places many files at once

    def write(
        self, path: str, data: bytes | Iterable[bytes | memoryview], *, digest: FileDigest | None = None
    ) -> object: ...


@dataclass(frozen=True)
class NativeSummary:
    tensor_count: int
    tensor_bytes: int
    shard_paths: list[str] = field(default_factory=list)
    tree_path: str = TREE_FILE


@dataclass(frozen=True)
class NativePlan:
    """A state encoded and planned, ready to write: its typed-JSON tree (fresh objects, not the
    state's) and the entries whose ``read`` gives the tensor bytes when they are written."""

    tree: Json
    plan: Plan
    flat_shards: bool  # whether the tree holds a FlatShard: format version 2


def check_write_options(max_shard_size: int, jobs: int) -> None:
    if max_shard_size < 1:
        raise ValueError(f"max_shard_size must be positive, got {max_shard_size}")
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")


def plan_native(state: Any) -> NativePlan:
    """Encode ``state`` and plan its entries; raises :class:`UnstorableValueError` naming the
    path of the first value the format cannot represent."""
    encoder = TreeEncoder()
    tree = encoder.encode(state)
    return NativePlan(tree, plan_entries(encoder), encoder.flat_shards > 0)


def write_native(
    state: Any, sink: FileSink, *, max_shard_size: int = 1 << 30, jobs: int = 4
) -> NativeSummary:
    """Write ``state`` in ckptkit's pickle-free format to ``sink``.

    Raises :class:`UnstorableValueError` naming the path of the first value the format cannot
    represent, before anything is written. ``tree.json`` is written last, after every shard.
    """
    check_write_options(max_shard_size, jobs)
    return write_planned(plan_native(state), sink, max_shard_size=max_shard_size, jobs=jobs)


def write_planned(
    planned: NativePlan, sink: FileSink, *, max_shard_size: int = 1 << 30, jobs: int = 4
) -> NativeSummary:
    """Write a planned state to ``sink``: the shards, then ``tree.json``.

    Into a deduplicating sink, every large tensor gets a shard of its own, so a tensor that did
    not change since a checkpoint in the same root is the same file, stored once."""
    check_write_options(max_shard_size, jobs)
    plan = planned.plan
    dedup = getattr(sink, "dedup", None) is not None
    shards = (assign_dedup_shards if dedup else assign_shards)(plan.entries, max_shard_size)
    paths = [shard_name(i, len(shards)) for i in range(len(shards))]
    if shards:
        _write_shards(sink, list(zip(paths, shards, strict=True)), jobs, digest_first=dedup)
    document = {
        "format": FORMAT_NAME,
        "version": FLAT_SHARD_VERSION if planned.flat_shards else PLAIN_VERSION,
        "shards": paths,
        "entries": {
            entry.name: {"shard": index, "dtype": entry.dtype, "shape": list(entry.shape)}
            for index, shard in enumerate(shards)
            for entry in shard
        },
        "tensors": plan.records,
        "tree": planned.tree,
    }
    sink.write(TREE_FILE, jsonfmt.dumps(document).encode("utf-8"))
    return NativeSummary(
        tensor_count=len(plan.records),
        tensor_bytes=sum(entry.nbytes for entry in plan.entries),
        shard_paths=paths,
    )


def _write_shards(
    sink: FileSink, shards: list[tuple[str, list[Entry]]], jobs: int, *, digest_first: bool
) -> None:
    with ThreadPoolExecutor(max_workers=min(jobs, len(shards)), thread_name_prefix="ckptkit-shard") as pool:
        digests: list[FileDigest | None] = [None] * len(shards)
        if digest_first:
            # The bytes are in memory (the caller's tensors, or a save's staged copy): hashing
            # them first costs one pass at hashing speed, and a shard whose blob exists is never
            # written. All shards are placed at once: one pin for the save (ckptkit.blobs).
            shard_digest = partial(_shard_digest, sink.digest)
            digests = list(pool.map(shard_digest, (entries for _, entries in shards)))
            sink.dedup.reserve([d.digest for d in digests if d is not None])
        futures = [
            pool.submit(_write_shard, sink, path, entries, digest)
            for (path, entries), digest in zip(shards, digests, strict=True)
        ]
        done, pending = wait(futures, return_when=FIRST_EXCEPTION)
        for future in pending:  # a shard failed: start no more; running ones finish
            future.cancel()
        for future in done:
            future.result()


def _write_shard(sink: FileSink, path: str, entries: list[Entry], digest: FileDigest | None) -> None:
    if digest is None:
        sink.write(path, shard_chunks(entries))  # any sink: ``digest`` is for deduplicating ones
    else:
        sink.write(path, shard_chunks(entries), digest=digest)


def _shard_digest(algorithm: str, entries: list[Entry]) -> FileDigest:
    return digest_pieces(shard_chunks(entries), algorithm=algorithm)
