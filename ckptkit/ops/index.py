"""Commit a manifest for a checkpoint directory that another tool wrote.

Most checkpoints in the wild have no manifest: HF Trainer's ``checkpoint-N/``, DeepSpeed's
``global_stepN/``, DCP directories, plain files. ``index`` hashes what is there, records the
layout it detects from content (file names and small JSON files, never extensions alone) and
the step, and commits the manifest create-only, exactly as a save would.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ckptkit.catalog import step_from_name
from ckptkit.commit import ATTEMPT_RE, publish_manifest
from ckptkit.errors import AlreadyExistsError, CommitConflictError, FormatError, NotFoundError
from ckptkit.formats.deepspeed import resolve_latest
from ckptkit.formats.hf_trainer import trainer_step
from ckptkit.formats.layout import detect_layout
from ckptkit.hashing import choose_algorithm, digest_objects
from ckptkit.manifest import MANIFEST_NAME, FileEntry, Manifest, validate_path
from ckptkit.ops.verify import default_jobs
from ckptkit.progress import NO_PROGRESS, Progress
from ckptkit.storage.base import ObjectInfo, Store
from ckptkit.storage.local import TEMP_MARKER


@dataclass(frozen=True)
class IndexResult:
    url: str
    manifest: Manifest
    replaced: bool


def _step(checkpoint: Store, kind: str, dir_name: str) -> int | None:
    """The Trainer's own record of the step, else the one the directory's name carries."""
    step = trainer_step(checkpoint) if kind == "hf-trainer" else None
    return step if step is not None else step_from_name(dir_name)


def _indexable(info: ObjectInfo) -> bool:
    name = info.key.rsplit("/", 1)[-1]
    return info.key != MANIFEST_NAME and not name.startswith(TEMP_MARKER)


def index_checkpoint(
    checkpoint: Store,
    *,
    force: bool = False,
    step: int | None = None,
    metadata: dict[str, Any] | None = None,
    jobs: int | None = None,
    progress: Progress | None = None,
    digest: str | None = None,
) -> IndexResult:
    """Hash every file below ``checkpoint`` and commit a manifest for them; ``progress`` hears
    of the bytes hashed; ``digest`` is as for :class:`~ckptkit.commit.CheckpointTransaction`.

    If ``checkpoint`` is a DeepSpeed root with a ``latest`` file, the tag it names is indexed.
    """
    algorithm = choose_algorithm(digest)  # a bad name fails before anything is read
    tag = resolve_latest(checkpoint)
    if tag is not None and not checkpoint.exists(MANIFEST_NAME):
        checkpoint = checkpoint.child(tag)
    existing = checkpoint.exists(MANIFEST_NAME)
    if existing and not force:
        raise CommitConflictError(f"{checkpoint.url} is already committed (use --force to re-index)")
    manifest = build_index_manifest(
        checkpoint, step=step, metadata=metadata, jobs=jobs, allow_attempt_data=existing, progress=progress,
        digest=algorithm,
    )
    try:
        publish_manifest(checkpoint, manifest, overwrite=force)
    except AlreadyExistsError as exc:
        raise CommitConflictError(f"{checkpoint.url} was committed by another writer meanwhile") from exc
    return IndexResult(checkpoint.url, manifest, replaced=existing)


def build_index_manifest(
    checkpoint: Store,
    *,
    step: int | None = None,
    metadata: dict[str, Any] | None = None,
    jobs: int | None = None,
    allow_attempt_data: bool = False,
    progress: Progress | None = None,
    digest: str | None = None,
) -> Manifest:
    """Hash every file below ``checkpoint`` into a manifest, without publishing it
    (``index`` publishes it in place; ``sync --index`` commits it at the destination only)."""
    algorithm = choose_algorithm(digest)
    objects = [info for info in checkpoint.list("") if _indexable(info)]
    if not objects:
        raise NotFoundError(f"{checkpoint.url}: no such directory, or no files to index")
    for info in objects:
        validate_path(info.key)
        if ATTEMPT_RE.match(info.key.split("/")[0]) and not allow_attempt_data:
            raise FormatError(
                f"{checkpoint.url} holds ckptkit attempt data ({info.key}) from an interrupted "
                "save; it is debris for 'ckptkit gc', not a checkpoint to index"
            )
    dir_name = checkpoint.url.rstrip("/").rsplit("/", 1)[-1]
    layout = detect_layout(o.key for o in objects)
    entries = _digest_all(checkpoint, objects, algorithm, jobs or default_jobs(), progress or NO_PROGRESS)
    return Manifest.create(
        step=step if step is not None else _step(checkpoint, layout.kind, dir_name),
        layout=layout.kind,
        files=entries,
        topology=layout.topology,
        metadata={"indexed": True, **(metadata or {})},
    )


def _digest_all(
    checkpoint: Store, objects: list[ObjectInfo], algorithm: str, jobs: int, progress: Progress
) -> list[FileEntry]:
    progress.start(sum(o.size for o in objects), len(objects))
    entries = []
    try:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            digests = digest_objects(
                checkpoint, [(o.key, o.size) for o in objects], pool,
                algorithm=algorithm, on_bytes=progress.advance,
            )
            for info, digest in zip(objects, digests, strict=True):
                entries.append(FileEntry.from_digest(info.key, digest))
                progress.file_done()
        return entries
    finally:
        progress.finish()
