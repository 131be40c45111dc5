"""What PATH is: a file, or a checkpoint directory of some layout, and which files to read.

Names only choose which files to open (``trainer_state.json``, ``*_optim_states.pt``); every
file is then read by a reader that checks its content. A DeepSpeed ``latest`` file is treated as
untrusted input: it must name one existing tag directory next to it, never a path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from ckptkit.catalog import THINNED, is_resumable, latest_checkpoint, read_manifest
from ckptkit.commit import files_of
from ckptkit.errors import FormatError, NotFoundError
from ckptkit.formats import deepspeed
from ckptkit.formats.hf_trainer import NOT_READ, TRAINER_STATE, newest_checkpoint
from ckptkit.formats.layout import detect_layout
from ckptkit.formats.sniff import detect
from ckptkit.manifest import MANIFEST_NAME, Manifest
from ckptkit.native.files import native_files
from ckptkit.storage import Store
from ckptkit.storage.base import ObjectInfo
from ckptkit.storage.target import resolve_target

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl")


@dataclass
class DeepSpeedTag:
    """One DeepSpeed tag directory: its model-states and per-rank optimizer files."""

    prefix: str  # key prefix of the tag directory inside the target's store ("" if the target)
    tag: str
    model_states: list[str]
    optim_states: list[str]
    latest: str | None = None  # the content of the ``latest`` file that led here


@dataclass
class Target:
    store: Store
    name: str  # the directory or file name: checkpoint-2500, global_step2500, model.pt
    layout: str  # file | hf-trainer | deepspeed | hf-trainer+deepspeed | native | dcp | directory
    torch_files: list[str] = field(default_factory=list)
    safetensors: list[str] = field(default_factory=list)
    trainer_state: str | None = None
    deepspeed: DeepSpeedTag | None = None
    native: Store | None = None  # store holding tree.json and its shards
    dcp_prefix: str | None = None
    notes: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)  # the committed manifest's, if any

    @property
    def url(self) -> str:
        base = self.store.url.rstrip("/")
        return f"{base}/{self.name}" if self.layout == "file" else base


def inspect_target(path: str | os.PathLike[str] | Store, **storage_options: object) -> Target:
    """Resolve a path or URL (file or directory) or an open store (a directory)."""
    found = resolve_target(path, **storage_options)
    if found.key is not None:
        return resolve_file(found.store, found.key, found.size)
    return resolve_directory(found.store)


def resolve_file(store: Store, key: str, size: int | None = None) -> Target:
    target = Target(store, key.rsplit("/", 1)[-1], "file")
    found = detect(store, key, size)
    if found.kind in ("torch-zip", "torch-legacy", "pickle"):
        target.torch_files.append(key)
    elif found.kind == "safetensors":
        target.safetensors.append(key)
    elif found.kind == "json" and key.endswith(TRAINER_STATE):
        target.trainer_state = key
    elif found.kind == "dcp-metadata":
        return resolve_directory(store.child(key.rsplit("/", 1)[0]) if "/" in key else store)
    else:
        raise FormatError(f"{found.detail}: not a file ckptkit inspect reads")
    return target


def resolve_directory(store: Store) -> Target:
    objects = list(store.list(""))
    if not objects:
        raise NotFoundError(f"{store.url}: no such file or directory, or it is empty")
    files = {o.key: o for o in objects if "/" not in o.key}
    dirs = sorted({o.key.split("/", 1)[0] for o in objects if "/" in o.key})
    name = store.url.rstrip("/").rsplit("/", 1)[-1]
    layout = detect_layout(files).kind  # of this directory's own files: a root's are below
    metadata: dict[str, Any] = {}
    notes: list[str] = []
    if MANIFEST_NAME in files and layout != "native":
        manifest = read_manifest(store)  # committed: the manifest says what it is
        notes = _thinned_notes(manifest)
        if manifest.layout == "native":
            native = native_files(store, manifest)
            return Target(store, name, "native", native=native, notes=notes, metadata=manifest.metadata)
        metadata = manifest.metadata
        view = files_of(store, manifest)
        if manifest.blob_store is not None or (notes and view is not store):  # read files where they lie
            found = resolve_directory(view)
            found.metadata = metadata
            found.notes[:0] = notes
            return found
    if layout == "native":
        return Target(store, name, "native", native=store)
    if layout == "dcp":
        return Target(store, name, "dcp", dcp_prefix="")
    target = Target(store, name, "directory", metadata=metadata, notes=notes)
    _collect_files(target, files)
    target.deepspeed = _deepspeed(store, files, objects)
    if target.deepspeed is not None or target.trainer_state or target.torch_files or target.safetensors:
        target.layout = _layout(target)
        return target
    return _descend(store, dirs)


def _thinned_notes(manifest: Manifest) -> list[str]:
    """A note for a checkpoint thinned to weights only (``ckptkit thin``), which cannot resume."""
    if is_resumable(manifest):
        return []
    record = manifest.metadata.get(THINNED)
    kept = record.get("kept") if isinstance(record, dict) else None
    dropped = record.get("dropped") if isinstance(record, dict) else None
    what = ", ".join(map(str, kept)) if isinstance(kept, list) else "?"
    count = f"; {len(dropped)} file(s) dropped" if isinstance(dropped, list) else ""
    return [f"weights-only: thinned to {what}{count}; it cannot resume training"]


def _collect_files(target: Target, files: dict[str, ObjectInfo]) -> None:
    for key in sorted(files):
        if key in NOT_READ:
            target.notes.append(f"not read: {key}: {NOT_READ[key]}")
        elif key == TRAINER_STATE:
            target.trainer_state = key
        elif key.endswith(".safetensors"):
            target.safetensors.append(key)
        elif key.endswith(TORCH_SUFFIXES) and not deepspeed.is_deepspeed([key]):
            target.torch_files.append(key)


def _layout(target: Target) -> str:
    parts = ["hf-trainer"] if target.trainer_state else []
    if target.deepspeed is not None:
        parts.append("deepspeed")
    return "+".join(parts) or "directory"


def _deepspeed(store: Store, files: dict[str, ObjectInfo], objects: list[ObjectInfo]) -> DeepSpeedTag | None:
    if deepspeed.is_tag_directory(files):  # the tag directory itself
        name = store.url.rstrip("/").rsplit("/", 1)[-1]
        return _tag(name, "", list(files))
    tag = deepspeed.resolve_latest(store) if deepspeed.LATEST in files else None
    if tag is None:
        return None
    inside = [o.key[len(tag) + 1 :] for o in objects if o.key.startswith(tag + "/")]
    found = _tag(tag, tag, inside)
    if not found.model_states:
        raise FormatError(f"{store.url}/latest names {tag!r}, which holds no *_model_states.pt files")
    found.latest = tag
    return found


def _tag(tag: str, prefix: str, names: list[str]) -> DeepSpeedTag:
    files = deepspeed.tag_files(names, prefix)
    return DeepSpeedTag(prefix, tag, files.model_states, files.optim_states)


def _descend(store: Store, dirs: list[str]) -> Target:
    # A run directory: resume takes its newest checkpoint (Trainer's get_last_checkpoint picks
    # the highest checkpoint-N; ckptkit's own roots the latest committed manifest).
    chosen = newest_checkpoint(dirs)
    if chosen is not None:
        target = resolve_directory(store.child(chosen))
        target.notes.insert(0, f"{store.url} is a run directory: inspecting its newest checkpoint, {chosen}")
        return target
    latest = latest_checkpoint(store)
    if latest is not None:
        target = resolve_directory(store.child(latest.name))
        target.notes.insert(
            0, f"{store.url} is a root: inspecting its latest committed checkpoint, {latest.name}"
        )
        return target
    raise FormatError(f"{store.url}: no checkpoint files found (nothing inspect knows how to read)")
