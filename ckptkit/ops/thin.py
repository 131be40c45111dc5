"""Thinning: a committed checkpoint made weights-only (or any chosen top-level keys) in place.

The protocol (docs/storage.md, "Thinning old checkpoints"):

1. The files thinning writes (a native checkpoint's new ``tree.json``, and a shard that mixed
   kept and dropped tensors, rewritten with the kept ones) go below a fresh attempt prefix
   ``ckptkit-<id>/`` of the checkpoint, where no manifest names them yet. Killed here, the
   checkpoint is the old one, whole; ``gc`` removes the prefix as an orphaned attempt.
2. The manifest is replaced in one atomic write (local disk: a temporary file renamed over it;
   object stores: one PUT). It lists the kept files and the new ones, gets a new
   ``checkpoint_id``, and records in ``metadata["thinned"]`` what was kept and which paths were
   dropped. Killed after this, the checkpoint is the thinned one, whole, plus files that
   nothing lists: :func:`leftovers_of_thinning` names them, and ``gc`` or the next thin of the
   checkpoint deletes them.
3. The dropped files are deleted. In a deduplicated checkpoint a dropped file is a blob that
   other checkpoints may share: it is released by a blob sweep (:func:`ckptkit.blobs.sweep`),
   which deletes it only if no manifest and no save in flight names it.

Two thins of one checkpoint must not run at once (the later swap wins, and the earlier one's
deletions could take files the later one keeps); a thin re-reads the manifest just before its
swap and gives up if it changed. Readers that opened the checkpoint before the swap may find a
dropped file gone: thin checkpoints that nothing is reading (retention thins old ones).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ckptkit import blobs
from ckptkit.catalog import THINNED, read_manifest
from ckptkit.commit import blob_store_for, logical_path, publish_manifest
from ckptkit.errors import CommitConflictError, NotThinnableError, StorageError
from ckptkit.formats import deepspeed, hf_trainer
from ckptkit.hashing import StreamingDigest, choose_algorithm
from ckptkit.manifest import MANIFEST_NAME, FileEntry, Manifest, parse_manifest, utc_now
from ckptkit.ops.thin_native import ThinPlan, plan_native
from ckptkit.storage.base import Store, join_key

DEFAULT_KEEP = ("model",)
# What ``keep`` may name in a checkpoint ckptkit did not write the state tree of: the model's
# own files are always kept; the resume-only states by the name of what they hold.
_LAYOUT_STATES = {
    "hf-trainer": ("model", *hf_trainer.RESUME_STATES),
    "deepspeed": ("model", "optimizer"),
}


@dataclass
class ThinReport:
    """What thinning one checkpoint did (or, with ``dry_run``, would do)."""

    url: str
    layout: str
    kept: list[str]
    dropped: list[str]  # manifest paths that went
    written: list[str]  # manifest paths of the files thinning wrote
    bytes_dropped: int
    bytes_written: int
    checkpoint_id: str  # of the checkpoint as it is now
    from_checkpoint_id: str | None  # of the one it replaced; None when nothing changed
    dry_run: bool
    leftovers_removed: list[str] = field(default_factory=list)
    sweep: blobs.SweepReport | None = None

    @property
    def changed(self) -> bool:
        return self.from_checkpoint_id is not None

    def to_json(self) -> dict[str, Any]:
        sweep = self.sweep
        return {
            "url": self.url, "layout": self.layout, "kept": self.kept, "dropped": self.dropped,
            "written": self.written, "bytes_dropped": self.bytes_dropped,
            "bytes_written": self.bytes_written, "checkpoint_id": self.checkpoint_id,
            "from_checkpoint_id": self.from_checkpoint_id, "dry_run": self.dry_run,
            "leftovers_removed": self.leftovers_removed,
            "blobs_released": None if sweep is None else {
                "deleted": len(sweep.deleted), "freed_bytes": sweep.freed_bytes, "skipped": sweep.skipped
            },
        }


def thin_checkpoint(
    root: Store,
    name: str,
    *,
    keep: Sequence[str] = DEFAULT_KEEP,
    dry_run: bool = False,
    sweep: bool = True,
) -> ThinReport:
    """Thin the committed checkpoint ``name`` under ``root`` to ``keep`` (see the module doc).

    ``keep`` names top-level keys of a native checkpoint's state; for an HF ``checkpoint-N`` or
    a DeepSpeed tag, ``"model"`` (always kept) and the resume-only states to keep as well
    (``optimizer``, ``scheduler``, ``scaler``, ``rng``). ``sweep=False`` leaves the blobs a
    deduplicated checkpoint dropped to the next sweep (``gc``, or the caller's own). Raises
    :class:`NotThinnableError`, having changed nothing, when the checkpoint cannot be thinned so.
    """
    if isinstance(keep, str) or not keep or not all(isinstance(k, str) and k for k in keep):
        raise ValueError(f"keep must name one or more top-level keys, got {keep!r}")
    checkpoint = root.child(name)
    manifest = read_manifest(checkpoint)
    leftovers = leftovers_of_thinning(checkpoint, manifest)
    if not dry_run:
        for key in leftovers:  # an earlier thin was killed before it deleted these
            checkpoint.delete(key)
    attempt = uuid.uuid4().hex[:12]
    plan = _plan(checkpoint, manifest, list(keep), attempt)
    report = ThinReport(
        checkpoint.url, manifest.layout, plan.kept, [e.path for e in plan.dropped], [],
        sum(e.size for e in plan.dropped), 0, manifest.checkpoint_id, None, dry_run, leftovers,
    )
    if not plan.dropped or dry_run:
        report.written = [f.path for f in plan.new_files]  # what a real run would write
        return report
    prefix = f"ckptkit-{attempt}"
    try:
        written = [_write(checkpoint, manifest, join_key(prefix, f.path), f.chunks()) for f in plan.new_files]
        checkpoint.sync_prefix(prefix)
        thinned = _thinned_manifest(manifest, plan, written)
        if read_manifest(checkpoint).checkpoint_id != manifest.checkpoint_id:
            raise CommitConflictError(f"{checkpoint.url}: its manifest changed while it was thinned")
        publish_manifest(checkpoint, thinned, overwrite=True)
    except BaseException:
        with contextlib.suppress(StorageError):  # best effort: gc removes an orphaned attempt too
            checkpoint.delete_prefix(prefix)
        raise
    for entry in plan.dropped:
        checkpoint.delete(entry.path)  # a blob's own path: its hard link on local disk, or nothing
    report.written = [e.path for e in written]
    report.bytes_written = sum(e.size for e in written)
    report.checkpoint_id, report.from_checkpoint_id = thinned.checkpoint_id, manifest.checkpoint_id
    if sweep and any(e.blob is not None for e in plan.dropped):
        report.sweep = blobs.sweep(blob_root(checkpoint, manifest))
    return report


def blob_root(checkpoint: Store, manifest: Manifest) -> Store:
    """The root whose blob store a deduplicated checkpoint uses (what :func:`blobs.sweep` takes)."""
    return blob_store_for(checkpoint, manifest).parent()


def leftovers_of_thinning(
    checkpoint: Store, manifest: Manifest, *, present: Iterable[str] | None = None
) -> list[str]:
    """Files a thinning of this committed checkpoint dropped from its manifest but was killed
    before deleting: present, named in ``metadata["thinned"]["dropped"]``, and not listed.
    ``gc`` deletes them; so does the next :func:`thin_checkpoint` of the checkpoint.
    ``present``: the checkpoint's keys, when the caller has listed them already."""
    record = manifest.metadata.get(THINNED)
    dropped = record.get("dropped") if isinstance(record, dict) else None
    if not isinstance(dropped, list):
        return []
    listed = {e.path for e in manifest.files} | {MANIFEST_NAME}
    candidates = {p for p in dropped if isinstance(p, str)} - listed
    keys = (info.key for info in checkpoint.list("")) if present is None else present
    # Only keys a listing shows: a path in the metadata is never trusted to stay inside.
    return sorted(key for key in keys if key in candidates)


def _plan(checkpoint: Store, manifest: Manifest, keep: list[str], attempt: str) -> ThinPlan:
    if manifest.layout == "native":
        return plan_native(checkpoint, manifest, keep, attempt)
    known = _LAYOUT_STATES.get(manifest.layout)
    if known is None:
        raise NotThinnableError(
            f"{checkpoint.url}: layout '{manifest.layout}': thinning knows native checkpoints, "
            "HF Trainer checkpoint-N and DeepSpeed tags"
        )
    unknown = [k for k in keep if k not in known]
    if unknown or "model" not in keep:
        raise NotThinnableError(
            f"{checkpoint.url}: a {manifest.layout} checkpoint keeps 'model' and any of "
            f"{', '.join(known[1:])}; got {', '.join(keep)}"
        )
    paths = {logical_path(e.path): e for e in manifest.files}
    if manifest.layout == "hf-trainer":
        state = {path: hf_trainer.resume_state(path) for path in paths}
    else:
        state = {path: "optimizer" if deepspeed.OPTIM_STATES.search(path) else None for path in paths}
    dropped = [paths[p] for p, s in sorted(state.items()) if s is not None and s not in keep]
    if any(s == "optimizer" for s in state.values()) and "optimizer" not in keep:
        _refuse_zero3(checkpoint, manifest.layout, list(paths))
    return ThinPlan(sorted({"model", *keep}), dropped)


def _refuse_zero3(checkpoint: Store, layout: str, paths: list[str]) -> None:
    """At ZeRO-3 the model-states files hold no weights: they are partitioned across the
    optimizer's files, so dropping those would leave no weights at all."""
    zero3 = any((m := deepspeed.MODEL_STATES.search(p)) and m.group(1) is not None for p in paths)
    weights_beside = layout == "hf-trainer" and any(
        "/" not in p and p.endswith((".safetensors", ".bin")) and p != "training_args.bin" for p in paths
    )
    if zero3 and not weights_beside:
        raise NotThinnableError(
            f"{checkpoint.url}: a ZeRO-3 checkpoint keeps its weights in the optimizer-states files; "
            f"run 'ckptkit consolidate {checkpoint.url} OUT' for a weights-only copy, then delete it"
        )


def _write(checkpoint: Store, manifest: Manifest, key: str, chunks: Any) -> FileEntry:
    algorithm = manifest.files[0].algorithm if manifest.files else choose_algorithm()
    hasher = StreamingDigest(manifest.chunk_size, algorithm=algorithm)
    checkpoint.put(key, hasher.tee(chunks))
    return FileEntry.from_digest(key, hasher.result())


def _thinned_manifest(manifest: Manifest, plan: ThinPlan, written: list[FileEntry]) -> Manifest:
    gone = {e.path for e in plan.dropped}
    files = [e for e in manifest.files if e.path not in gone] + written
    earlier = manifest.metadata.get(THINNED)
    before = earlier.get("dropped") if isinstance(earlier, dict) else None
    dropped = sorted(gone | {p for p in before or [] if isinstance(p, str)})
    record = {
        "kept": plan.kept, "dropped": dropped, "from_checkpoint_id": manifest.checkpoint_id, "at": utc_now(),
    }
    thinned = replace(
        manifest,
        checkpoint_id=uuid.uuid4().hex,
        files=tuple(sorted(files, key=lambda f: f.path)),
        metadata={**manifest.metadata, THINNED: record},
        blob_store=manifest.blob_store if any(f.blob is not None for f in files) else None,
    )
    return parse_manifest(thinned.to_bytes())  # validated as a reader will read it
