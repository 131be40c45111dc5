"""``reshard``: a DeepSpeed ZeRO checkpoint saved on N ranks, rewritten for M ranks, proven exact.

DST becomes a committed ckptkit checkpoint that is also a plain DeepSpeed save dir for M ranks:
``DST/latest`` names the tag, ``DST/<tag>/`` holds the rank files DeepSpeed writes at world size
M, so ``engine.load_checkpoint(DST)`` loads it at M ranks with no universal mode and no patch.
Files the source save dir holds beside its tag (an HF Trainer ``checkpoint-N``: trainer state,
scheduler, config, weights) are carried too, and per-rank RNG states ``rng_state_<r>.pth`` follow
:func:`rng_rule`.

How: every source rank file is read symbolically (:mod:`ckptkit.ops.zero_source`); each new
rank file is a pickle tree whose tensors stream from byte ranges of the source partitions
(:mod:`ckptkit.ops.zero_rank_files`), so memory holds the trees and one read chunk, never a
model. The files go into a :class:`CheckpointTransaction` (staging directory or attempt
prefix); nothing is visible at DST until the manifest is committed, and a crash leaves only
what ``gc`` removes.

**Conservation certificate.** Before writing, a digest (BLAKE3) of every trainable parameter's
fp32 master weights and of each per-element optimizer state (Adam's ``exp_avg`` and
``exp_avg_sq``) is computed from the source partitions, in the parameter's element order. After
writing, the same digests are computed from the written partitions, read back through the same
reader. Any difference is a :class:`VerificationError` and nothing is committed; otherwise the
certificate is recorded in DST's manifest, where ``ckptkit verify DST`` re-checks it.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ckptkit.commit import CheckpointTransaction
from ckptkit.errors import FormatError, InvalidURLError, VerificationError
from ckptkit.formats.deepspeed import LATEST, MODEL_STATES, OPTIM_STATES
from ckptkit.formats.torch_writer import torch_tree_chunks
from ckptkit.hashing import choose_algorithm
from ckptkit.manifest import MANIFEST_NAME
from ckptkit.ops.reshard_certificate import CERTIFICATE_KEY, certify
from ckptkit.ops.verify import default_jobs
from ckptkit.ops.zero_rank_files import rank_trees
from ckptkit.ops.zero_source import ZeroCheckpoint, read_zero
from ckptkit.progress import NO_PROGRESS, Progress
from ckptkit.storage import Store, open_store, split_parent

# Files DeepSpeed copies beside its tags that are code, not state (ckptkit consolidates itself).
_RECOVERY_SCRIPTS = frozenset({"zero_to_fp32.py", "zero_to_torch.py"})
_RNG_STATE = re.compile(r"^rng_state_(\d+)\.pth$")


def rng_rule(rank: int, source_world: int) -> int:
    """The source rank whose RNG state new rank ``rank`` gets: its own where it existed
    (``rank < N``), else ``rank mod N``. Ranks that existed keep their random streams exactly;
    a new rank repeats an existing rank's stream (the data it sees differs, so its dropout masks
    do not matter for correctness); the states of ranks beyond M are dropped."""
    return rank % source_world


@dataclass(kw_only=True)
class ReshardResult:
    url: str
    source: str
    tag: str
    stage: int
    from_world_size: int
    world_size: int
    files: list[str]
    total_size: int
    params: int
    states: list[str]
    rng_states: dict[int, int]
    carried: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return True  # a failed certificate raises: nothing is committed, no result is returned

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "url": self.url,
            "source": self.source,
            "tag": self.tag,
            "stage": self.stage,
            "from_world_size": self.from_world_size,
            "world_size": self.world_size,
            "files": self.files,
            "total_size": self.total_size,
            "params": self.params,
            "states": self.states,
            "rng_states": {str(k): v for k, v in self.rng_states.items()},
            "carried": self.carried,
            "seconds": round(self.seconds, 3),
        }


def reshard_zero(
    src: str | os.PathLike[str] | Store,
    dst: str | os.PathLike[str],
    *,
    world_size: int,
    tag: str | None = None,
    digest: str | None = None,
    progress: Progress | None = None,
    **storage_options: Any,
) -> ReshardResult:
    """Rewrite the ZeRO checkpoint ``src`` (a DeepSpeed save dir or tag directory, on any store)
    for ``world_size`` data-parallel ranks, committed at ``dst`` (see the module docstring).

    Raises :class:`FormatError` for a checkpoint that is incomplete, inconsistent or out of
    scope, and :class:`VerificationError` if the written partitions do not conserve every
    parameter's master weights and optimizer state; in both cases nothing is committed.
    """
    t0 = time.perf_counter()
    if type(world_size) is not int or world_size < 1:
        raise InvalidURLError(f"--world-size must be a positive integer, got {world_size!r}")
    digest = choose_algorithm(digest)
    progress = progress or NO_PROGRESS
    src_url = src if isinstance(src, Store) else os.fspath(src)
    ckpt = read_zero(src_url, tag=tag, **storage_options)
    jobs = default_jobs(ckpt.store)
    parent, name = split_parent(dst)
    root = open_store(parent, **storage_options)
    trees = rank_trees(ckpt, world_size)
    total = 0
    # The transaction refuses a committed DST before the certificate reads every source byte.
    with CheckpointTransaction(root, name, digest=digest) as txn:
        before = certify(ckpt, jobs)
        progress.start(_source_bytes(ckpt), len(trees))
        try:
            for file_name, make in trees.items():
                entry = txn.write(f"{ckpt.tag}/{file_name}", _counted(torch_tree_chunks(make()), progress))
                total += entry.size
                progress.file_done()
        finally:
            progress.finish()  # also on error: the CLI's progress line ends before the error line
        rng, carried = _carry_save_dir_files(ckpt.save_dir, txn, ckpt.world_size, world_size)
        txn.write(LATEST, ckpt.tag.encode())
        written = read_zero(txn.files, tag=ckpt.tag)
        after = certify(written, jobs)
        if after != before:
            raise VerificationError(_certificate_mismatch(before, after))
        steps = ckpt.model_states.get("global_steps")
        txn.commit(
            step=steps if type(steps) is int else None,
            layout="deepspeed",
            topology={
                "world_size": world_size,
                "dp_world_size": world_size,
                "mp_world_size": 1,
                "zero_stage": ckpt.stage,
            },
            metadata={
                "tag": ckpt.tag,
                CERTIFICATE_KEY: {
                    "source": ckpt.store.url,
                    "from_world_size": ckpt.world_size,
                    "world_size": world_size,
                    "zero_stage": ckpt.stage,
                    "rng_states": {str(k): v for k, v in rng.items()},
                    "certificate": {"algorithm": "blake3", "params": before},
                },
            },
        )
    files = [f"{ckpt.tag}/{n}" for n in trees]
    return ReshardResult(
        url=root.child(name).url,
        source=ckpt.store.url,
        tag=ckpt.tag,
        stage=ckpt.stage,
        from_world_size=ckpt.world_size,
        world_size=world_size,
        files=files,
        total_size=total,
        params=len(before),
        states=sorted({k for v in before.values() for k in v}),
        rng_states=rng,
        carried=carried,
        seconds=time.perf_counter() - t0,
    )


def _source_bytes(ckpt: ZeroCheckpoint) -> int:
    return sum(o.size for o in ckpt.store.list("") if "/" not in o.key)


def _counted(chunks: Iterator[bytes | memoryview], progress: Progress) -> Iterator[bytes | memoryview]:
    for chunk in chunks:
        progress.advance(len(chunk))
        yield chunk


def _carry_save_dir_files(
    source_root: Store | None, txn: CheckpointTransaction, source_world: int, world: int
) -> tuple[dict[int, int], list[str]]:
    """Copy the save dir's own files (not tags, ``latest``, recovery scripts or manifests) and
    give each new rank its RNG state by :func:`rng_rule`. Returns the rule as applied and the
    names copied."""
    if source_root is None:
        return {}, []
    names = [o.key for o in source_root.list("") if "/" not in o.key]
    rng_files = {int(m.group(1)): n for n in names if (m := _RNG_STATE.match(n))}
    carried = []
    for n in names:
        if n in _RECOVERY_SCRIPTS or n in (LATEST, MANIFEST_NAME) or n in rng_files.values():
            continue
        if MODEL_STATES.search(n) or OPTIM_STATES.search(n):
            continue
        txn.write(n, source_root.get(n))
        carried.append(n)
    rule: dict[int, int] = {}
    if rng_files:
        if sorted(rng_files) != list(range(source_world)):
            raise FormatError(
                f"{source_root.url}: RNG states for ranks {sorted(rng_files)}, expected 0..{source_world - 1}"
            )
        for rank in range(world):
            rule[rank] = rng_rule(rank, source_world)
            txn.write(f"rng_state_{rank}.pth", source_root.get(rng_files[rule[rank]]))
            carried.append(f"rng_state_{rank}.pth")
    return rule, carried


def _certificate_mismatch(before: dict[str, dict[str, str]], after: dict[str, dict[str, str]]) -> str:
    bad = sorted(n for n in set(before) | set(after) if before.get(n) != after.get(n))
    return (
        f"{len(bad)} parameter(s) read back from the written partitions differ from the source; "
        f"nothing was committed: {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}"
    )
