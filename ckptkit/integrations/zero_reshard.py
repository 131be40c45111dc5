"""Reshard on load: a committed ZeRO checkpoint served to DeepSpeed at another world size.

When ``engine.load_checkpoint`` runs through ckptkit's checkpoint engine at a data-parallel
world size other than the saved one, DeepSpeed is shown the rank files it would have written at
the new size (:func:`ckptkit.ops.zero_rank_files.rank_trees`) and each is made only when DeepSpeed
asks for it. A rank asks only for its own files (and, at ZeRO-1/2, the shared model states), so
it reads only the byte ranges of the source partitions its new partition covers.

Integrity without reading whole files: before the symbolic reader parses a source file, the
manifest's chunk digests of its first and last chunks (the pickle and the zip directory) are
checked; before a new rank file is made, those of every chunk its byte ranges fall in. A
mismatch is a :class:`ChecksumMismatchError`, as for a whole-file load.
"""

from __future__ import annotations

import io
from typing import Any

from ckptkit.commit import files_of, logical_path
from ckptkit.errors import FormatError
from ckptkit.formats.deepspeed import MODEL_STATES, OPTIM_STATES
from ckptkit.formats.torch_writer import torch_tree_chunks
from ckptkit.manifest import FileEntry, Manifest
from ckptkit.ops.zero_rank_files import SourceTensors, rank_trees
from ckptkit.ops.zero_source import read_zero
from ckptkit.safe import safe_globals
from ckptkit.storage import Store
from ckptkit.verified_reads import VerifiedFiles


def tag_entries(manifest: Manifest, inner: str = "") -> dict[str, FileEntry]:
    """The manifest's files below ``inner`` (``"<tag>/"`` when the whole save dir was committed,
    ``""`` when the tag directory was), by their path inside the tag directory."""
    return {
        path[len(inner) :]: e for e in manifest.files if (path := logical_path(e.path)).startswith(inner)
    }


def saved_dp_world_size(entries: dict[str, FileEntry]) -> int | None:
    """The data-parallel size a tag directory's optimizer rank files state (None: no ZeRO)."""
    ranks = {m.group(2) for path in entries if "/" not in path and (m := OPTIM_STATES.search(path))}
    return len(ranks) or None


class ReshardedRankFiles:
    """The rank files of a committed ZeRO checkpoint's tag at ``world`` ranks: the tag directory
    is ``inner`` inside ``checkpoint`` (see :func:`tag_entries`)."""

    def __init__(
        self, checkpoint: Store, manifest: Manifest, world: int, stage: int, inner: str = ""
    ) -> None:
        files = files_of(checkpoint, manifest)
        self.files = files.child(inner.rstrip("/")) if inner else files
        self.world = world
        self._verified = VerifiedFiles(self.files, tag_entries(manifest, inner), manifest.chunk_size)
        for key, entry in self._verified.entries.items():
            if "/" not in key and (MODEL_STATES.search(key) or OPTIM_STATES.search(key)):
                self._verified.check(key, [(0, 1), (max(entry.size - 1, 0), entry.size)])
        self.source = read_zero(self.files)
        if self.source.stage != stage:
            raise FormatError(
                f"{checkpoint.url}: saved with ZeRO stage {self.source.stage}, this engine runs stage "
                f"{stage}: resharding keeps the stage; load it with the stage it was saved with"
            )
        self.names = list(rank_trees(self.source, world))

    def load(self, name: str, map_location: Any = None) -> Any:
        """The new rank file ``name``, as ``torch.load`` returns it (vetted classes only)."""
        import torch

        tensors = SourceTensors(self.files)
        tree = rank_trees(self.source, self.world, tensors)[name]()
        self._check_reads(tensors.reads)
        data = b"".join(torch_tree_chunks(tree))
        with safe_globals():
            return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)

    def _check_reads(self, reads: list[tuple[str, int, int]]) -> None:
        by_key: dict[str, list[tuple[int, int]]] = {}
        for key, start, end in reads:
            by_key.setdefault(key, []).append((start, end))
        for key, ranges in by_key.items():
            self._verified.check(key, ranges)
