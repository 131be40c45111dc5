"""Which files of a committed checkpoint make up a native state: torch-free, so ``inspect``,
``convert`` and the integrations find them without the reader.

A native checkpoint holds one ``tree.json`` and its shards, or, when saved by several ranks
each with its own state, one such set per rank under ``rank-NNNNN/``; the manifest's
``topology.ranks`` lists each rank's files.
"""

from __future__ import annotations

from ckptkit.commit import files_of, logical_path
from ckptkit.errors import FormatError, TopologyMismatchError
from ckptkit.formats.native_layout import NATIVE_TREE as TREE_FILE
from ckptkit.manifest import Manifest
from ckptkit.storage.base import Store


def rank_files(checkpoint: Store, manifest: Manifest) -> list[list[str]] | None:
    """Each rank's files (by rank) of a per-rank native checkpoint; None for any other."""
    topology = manifest.topology
    if manifest.layout != "native" or not topology or "ranks" not in topology:
        return None
    ranks = topology["ranks"]
    # Topology paths are compared without attempt prefixes: where the files sit depends on which
    # store committed the checkpoint, not on how its writer laid it out.
    listed = {logical_path(f.path): f.path for f in manifest.files}
    if not (
        isinstance(ranks, list)
        and topology.get("world_size") == len(ranks)
        and all(isinstance(r, dict) and r.get("rank") == i for i, r in enumerate(ranks))
        and all(
            isinstance(r.get("files"), list) and {logical_path(str(p)) for p in r["files"]} <= listed.keys()
            for r in ranks
        )
    ):
        raise FormatError(f"{checkpoint.url}: the manifest's topology.ranks does not match its files")
    return [[listed[logical_path(p)] for p in r["files"]] for r in ranks]


def native_files(checkpoint: Store, manifest: Manifest, rank: int | None = None) -> Store:
    """The store holding a native checkpoint's ``tree.json`` and shards (``rank``'s, for a
    per-rank checkpoint, which needs one)."""
    per_rank = rank_files(checkpoint, manifest)
    paths: list[str] = [f.path for f in manifest.files]
    if per_rank is not None:
        what = "name the rank to read" if rank is None else f"there is no rank {rank}"
        if rank is None or not 0 <= rank < len(per_rank):
            raise TopologyMismatchError(
                f"{checkpoint.url}: saved by {len(per_rank)} ranks, one state per rank: "
                f"{what} (0 to {len(per_rank) - 1})"
            )
        paths = per_rank[rank]
    trees = [p for p in paths if p.rsplit("/", 1)[-1] == TREE_FILE]
    if manifest.layout != "native" or len(trees) != 1:
        raise FormatError(
            f"{checkpoint.url}: layout '{manifest.layout}' is not a ckptkit native checkpoint; "
            "use the format's own loader (or 'ckptkit convert')"
        )
    # Through the files' logical paths: a deduplicated or thinned checkpoint's lie in several places.
    prefix = logical_path(trees[0]).rpartition("/")[0]
    files = files_of(checkpoint, manifest)
    return files.child(prefix) if prefix else files
