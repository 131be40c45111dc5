"""Finding checkpoints under a root: committed or incomplete, and the latest committed one.

"Latest" is derived from committed manifests only, never from a pointer file. One recursive
listing of the root finds every checkpoint directory; manifests are then read in parallel, so
listing a root with a thousand checkpoints on S3 costs a few list requests plus one small GET per
committed checkpoint.
"""

from __future__ import annotations

import datetime as dt
import re
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

from ckptkit.commit import ATTEMPT_RE, is_ckptkit_debris_dir
from ckptkit.errors import IncompleteListingError, ManifestError, NotCommittedError, NotFoundError
from ckptkit.manifest import MANIFEST_NAME, Manifest, parse_manifest
from ckptkit.storage.base import ObjectInfo, Store

# "invalid": a manifest is present but does not parse or validate; never treated as committed.
Status = Literal["committed", "incomplete", "invalid"]
# The manifest metadata key thinning records (ckptkit.ops.thin): what was kept and dropped. A
# checkpoint that has it holds weights (or the kept keys) only, and cannot resume training.
THINNED = "thinned"
# step-00000100 (ckptkit), checkpoint-2500 (HF), global_step7 (DeepSpeed), and kin.
_STEP_NAME = re.compile(
    r"(?:step|checkpoint|global_step|ckpt|iter|iteration|epoch)[-_=]?(\d+)", re.IGNORECASE
)
# Lightning's ModelCheckpoint: epoch=3-step=400.ckpt, epoch=3-step=400-v1.ckpt, step=400.ckpt.
_LIGHTNING_NAME = re.compile(r"(?:.*-)?step=(\d+)(?:-.*)?\.ckpt")


@dataclass(frozen=True)
class CheckpointInfo:
    """One checkpoint directory under a root, as a listing sees it."""

    root_url: str
    name: str
    status: Status
    step: int | None
    files: int
    size: int
    created: str | None
    manifest: Manifest | None = None

    @property
    def url(self) -> str:
        return f"{self.root_url.rstrip('/')}/{self.name}"

    @property
    def committed(self) -> bool:
        return self.status == "committed"

    @property
    def resumable(self) -> bool | None:
        """Whether training can resume from it: committed and not thinned to weights only.
        None when the listing did not read its manifest (``read_manifests=False``)."""
        if self.manifest is None:
            return False if self.status != "committed" else None
        return is_resumable(self.manifest)


def is_resumable(manifest: Manifest) -> bool:
    """Whether a committed checkpoint still holds everything its writer saved (not thinned)."""
    return THINNED not in manifest.metadata


def step_from_name(name: str) -> int | None:
    """The step a directory name carries: ``step-00000100``, ``checkpoint-2500``, ``global_step7``,
    ``epoch=3-step=400.ckpt``."""
    match = _STEP_NAME.fullmatch(name) or _LIGHTNING_NAME.fullmatch(name)
    return int(match.group(1)) if match else None


def _looks_like_checkpoint(name: str, objects: list[ObjectInfo]) -> bool:
    """An uncommitted directory is listed only if it looks like a checkpoint: a step-numbered
    name or ckptkit's own attempt data; other directories under a root are not our business."""
    return step_from_name(name) is not None or any(
        ATTEMPT_RE.match(o.key.split("/")[1]) for o in objects if o.key.count("/") >= 2
    )


def read_manifest(checkpoint: Store) -> Manifest:
    """The committed manifest of the checkpoint rooted at ``checkpoint``."""
    try:
        data = checkpoint.get(MANIFEST_NAME)
    except NotFoundError as exc:
        raise NotCommittedError(
            f"{checkpoint.url}: no {MANIFEST_NAME}; not a committed checkpoint "
            "(incomplete, or written by another tool: run 'ckptkit index' on it)"
        ) from exc
    return parse_manifest(data)


def _iso(mtime: float | None) -> str | None:
    if mtime is None:
        return None
    return dt.datetime.fromtimestamp(mtime, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def list_checkpoints(
    root: Store,
    *,
    read_manifests: bool = True,
    jobs: int = 16,
    unreadable: list[tuple[str, str]] | None = None,
) -> list[CheckpointInfo]:
    """Every checkpoint directory under ``root``, oldest first (by step, then creation time).

    With ``read_manifests=False`` only the listing is used (a few LIST requests however many
    checkpoints there are): a checkpoint counts as committed when its manifest object exists,
    its step comes from its name, its size and file count from the objects present, and its
    creation time is the manifest's mtime. Manifests are then neither parsed nor validated.

    A listing that could not see everything raises :class:`IncompleteListingError`, so nothing
    acts on a partial view; a caller that only shows what it saw passes ``unreadable``, a list
    that receives the ``(path, reason)`` pairs instead.
    """
    groups: dict[str, list[ObjectInfo]] = defaultdict(list)
    try:
        for info in root.list(""):
            top, sep, _rest = info.key.partition("/")
            if sep and not is_ckptkit_debris_dir(top) and not top.startswith("."):
                groups[top].append(info)
    except IncompleteListingError as exc:
        if unreadable is None:
            raise
        unreadable.extend(exc.problems)

    committed = [
        name for name, objs in groups.items() if any(o.key == f"{name}/{MANIFEST_NAME}" for o in objs)
    ]

    def load(name: str) -> Manifest | ManifestError | None:
        try:
            return read_manifest(root.child(name))
        except ManifestError as exc:
            return exc
        except (NotCommittedError, NotFoundError):
            return None  # deleted between listing and reading: no longer committed

    if read_manifests:
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            manifests = dict(zip(committed, pool.map(load, committed), strict=False))
    else:
        manifests = {}

    result = []
    for name, objects in groups.items():
        manifest = manifests.get(name)
        if not read_manifests and name in committed:
            result.append(_from_listing(root, name, objects))
            continue
        if manifest is None and not _looks_like_checkpoint(name, objects):
            continue
        newest = max((o.mtime or 0.0) for o in objects) or None
        if isinstance(manifest, Manifest):
            result.append(
                CheckpointInfo(
                    root.url, name, "committed",
                    manifest.step if manifest.step is not None else step_from_name(name),
                    len(manifest.files), manifest.total_size, manifest.created, manifest,
                )
            )
        else:
            status: Status = "invalid" if isinstance(manifest, ManifestError) else "incomplete"
            result.append(
                CheckpointInfo(
                    root.url, name, status, step_from_name(name),
                    len(objects), sum(o.size for o in objects), _iso(newest),
                )
            )
    result.sort(key=lambda c: (c.step if c.step is not None else -1, c.created or "", c.name))
    return result


def _from_listing(root: Store, name: str, objects: list[ObjectInfo]) -> CheckpointInfo:
    manifest_key = f"{name}/{MANIFEST_NAME}"
    data = [o for o in objects if o.key != manifest_key]
    committed_at = next(o.mtime for o in objects if o.key == manifest_key)
    return CheckpointInfo(
        root.url, name, "committed", step_from_name(name),
        len(data), sum(o.size for o in data), _iso(committed_at),
    )


def latest_checkpoint(root: Store) -> CheckpointInfo | None:
    """The committed checkpoint with the highest step (ties: the most recently created)."""
    committed = [c for c in list_checkpoints(root) if c.committed]
    return committed[-1] if committed else None
