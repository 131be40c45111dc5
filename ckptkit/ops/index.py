"""Commit a manifest for a checkpoint directory that another tool wrote.

Most checkpoints in the wild have no manifest: HF Trainer's ``checkpoint-N/``, DeepSpeed's
``global_stepN/``, DCP directories, plain files. ``index`` hashes what is there, records the
layout it detects from content (file names and small JSON files, never extensions alone) and
the step, and commits the manifest create-only, exactly as a save would.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ckptkit.catalog import step_from_name
from ckptkit.commit import ATTEMPT_RE, publish_manifest
from ckptkit.errors import AlreadyExistsError, CommitConflictError, FormatError, NotFoundError
from ckptkit.formats.deepspeed import MODEL_STATES, OPTIM_STATES
from ckptkit.hashing import digest_object
from ckptkit.manifest import MANIFEST_NAME, FileEntry, Manifest, validate_path
from ckptkit.ops.verify import default_jobs
from ckptkit.storage.base import ObjectInfo, Store
from ckptkit.storage.local import TEMP_MARKER


@dataclass(frozen=True)
class Layout:
    kind: str
    step: int | None
    topology: dict[str, Any] | None = None


@dataclass(frozen=True)
class IndexResult:
    url: str
    manifest: Manifest
    replaced: bool


def resolve_deepspeed_latest(root: Store) -> str | None:
    """The tag named by a DeepSpeed ``latest`` file, validated to be a directory in ``root``."""
    try:
        raw = root.get("latest")
    except NotFoundError:
        return None
    tag = raw.decode("utf-8", errors="replace").strip()
    if not tag or "/" in tag or "\\" in tag or tag in (".", "..") or "\x00" in tag:
        raise FormatError(f"{root.url}/latest names {tag!r}, which is not a tag directory name")
    if tag not in root.list_dirs(""):
        raise FormatError(f"{root.url}/latest names tag {tag!r}, but {root.url}/{tag}/ does not exist")
    return tag


def detect_layout(checkpoint: Store, names: list[str], dir_name: str) -> Layout:
    """Tell the layout from what the directory holds."""
    basenames = {n.rsplit("/", 1)[-1] for n in names}
    if "trainer_state.json" in basenames:
        hf_step = _hf_step(checkpoint)
        return Layout("hf-trainer", hf_step if hf_step is not None else step_from_name(dir_name))
    ds_models = {m.group(2) for n in basenames if (m := MODEL_STATES.search(n))}
    ds_optims = [m for n in basenames if (m := OPTIM_STATES.search(n))]
    if ds_models or ds_optims:
        dp = {m.group(2) for m in ds_optims}
        mp = ds_models | {m.group(3) for m in ds_optims}
        topology = {"framework": "deepspeed", "dp_world_size": len(dp) or None, "mp_world_size": len(mp) or 1}
        return Layout("deepspeed", step_from_name(dir_name), topology)
    if ".metadata" in basenames and any(n.endswith(".distcp") for n in basenames):
        return Layout("dcp", step_from_name(dir_name))
    if "tree.json" in basenames:
        return Layout("native", step_from_name(dir_name))
    return Layout("files", step_from_name(dir_name))


def _hf_step(checkpoint: Store) -> int | None:
    try:
        state = json.loads(checkpoint.get("trainer_state.json"))
    except (NotFoundError, ValueError):
        return None
    step = state.get("global_step") if isinstance(state, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) and step >= 0 else None


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
) -> IndexResult:
    """Hash every file below ``checkpoint`` and commit a manifest for them.

    If ``checkpoint`` is a DeepSpeed root with a ``latest`` file, the tag it names is indexed.
    """
    tag = resolve_deepspeed_latest(checkpoint)
    if tag is not None and not checkpoint.exists(MANIFEST_NAME):
        checkpoint = checkpoint.child(tag)
    existing = checkpoint.exists(MANIFEST_NAME)
    if existing and not force:
        raise CommitConflictError(f"{checkpoint.url} is already committed (use --force to re-index)")
    manifest = build_index_manifest(
        checkpoint, step=step, metadata=metadata, jobs=jobs, allow_attempt_data=existing
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
) -> Manifest:
    """Hash every file below ``checkpoint`` into a manifest, without publishing it
    (``index`` publishes it in place; ``sync --index`` commits it at the destination only)."""
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
    layout = detect_layout(checkpoint, [o.key for o in objects], dir_name)
    with ThreadPoolExecutor(max_workers=jobs or default_jobs()) as pool:
        entries = [
            FileEntry.from_digest(info.key, digest_object(checkpoint, info.key, info.size, pool))
            for info in objects
        ]
    return Manifest.create(
        step=step if step is not None else layout.step,
        layout=layout.kind,
        files=entries,
        topology=layout.topology,
        metadata={"indexed": True, **(metadata or {})},
    )
