"""What PATH is: a file, or a checkpoint directory of some layout, and which files to read.

Names only choose which files to open (``trainer_state.json``, ``*_optim_states.pt``); every
file is then read by a reader that checks its content. A DeepSpeed ``latest`` file is treated as
untrusted input: it must name one existing tag directory next to it, never a path.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from ckptkit.api import native_files, split_parent
from ckptkit.catalog import latest_checkpoint, read_manifest
from ckptkit.errors import FormatError, InvalidURLError, NotFoundError
from ckptkit.formats.deepspeed import MODEL_STATES, OPTIM_STATES
from ckptkit.formats.sniff import detect
from ckptkit.manifest import MANIFEST_NAME
from ckptkit.storage import Store, open_store, split_url
from ckptkit.storage.base import ObjectInfo
from ckptkit.storage.local import follow_named_path

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl")
TRAINER_STATE = "trainer_state.json"
NATIVE_TREE = "tree.json"
DCP_METADATA = ".metadata"
MAX_LATEST_BYTES = 1024
# Files resuming never reads and that only their own code can load.
NOT_READ = {
    "training_args.bin": "a pickled TrainingArguments: loading it needs transformers' code, "
    "and resuming does not read it",
}
_HF_CHECKPOINT = re.compile(r"checkpoint-(\d+)")


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

    @property
    def url(self) -> str:
        base = self.store.url.rstrip("/")
        return f"{base}/{self.name}" if self.layout == "file" else base


def open_target(path: str | os.PathLike[str] | Store, **storage_options: object) -> Target:
    """Resolve a path or URL (file or directory) or an open store (a directory)."""
    if isinstance(path, Store):
        return resolve_directory(path)
    text = os.fspath(path).rstrip("/") or "/"
    if split_url(text)[0] is None:
        text = follow_named_path(text)
    try:
        parent_url, name = split_parent(text)
    except InvalidURLError:  # s3://bucket: a directory with no parent
        return resolve_directory(open_store(text, **storage_options))
    parent = open_store(parent_url, **storage_options)
    try:
        parent.head(name)
    except NotFoundError:
        return resolve_directory(parent.child(name))
    return resolve_file(parent, name)


def resolve_file(store: Store, key: str) -> Target:
    target = Target(store, key.rsplit("/", 1)[-1], "file")
    found = detect(store, key)
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
    if MANIFEST_NAME in files and NATIVE_TREE not in files:
        manifest = read_manifest(store)
        if manifest.layout == "native":
            return Target(store, name, "native", native=native_files(store, manifest))
    if NATIVE_TREE in files:
        return Target(store, name, "native", native=store)
    if DCP_METADATA in files:
        return Target(store, name, "dcp", dcp_prefix="")
    target = Target(store, name, "directory")
    _collect_files(target, files)
    target.deepspeed = _deepspeed(store, files, dirs, objects)
    if target.deepspeed is not None or target.trainer_state or target.torch_files or target.safetensors:
        target.layout = _layout(target)
        return target
    return _descend(store, dirs)


def _collect_files(target: Target, files: dict[str, ObjectInfo]) -> None:
    for key in sorted(files):
        if key in NOT_READ:
            target.notes.append(f"not read: {key}: {NOT_READ[key]}")
        elif key == TRAINER_STATE:
            target.trainer_state = key
        elif key.endswith(".safetensors"):
            target.safetensors.append(key)
        elif key.endswith(TORCH_SUFFIXES) and not MODEL_STATES.search(key) and not OPTIM_STATES.search(key):
            target.torch_files.append(key)


def _layout(target: Target) -> str:
    parts = ["hf-trainer"] if target.trainer_state else []
    if target.deepspeed is not None:
        parts.append("deepspeed")
    return "+".join(parts) or "directory"


def _deepspeed(
    store: Store, files: dict[str, ObjectInfo], dirs: list[str], objects: list[ObjectInfo]
) -> DeepSpeedTag | None:
    if any(MODEL_STATES.search(key) for key in files):  # the tag directory itself
        name = store.url.rstrip("/").rsplit("/", 1)[-1]
        return _tag(name, "", list(files))
    if "latest" not in files:
        return None
    raw = store.get("latest", 0, MAX_LATEST_BYTES)
    tag = raw.decode("utf-8", "replace").strip()
    # DeepSpeed joins the tag onto the save dir: only one existing directory name is acceptable.
    if not tag or tag in (".", "..") or any(c in tag for c in "/\\\0") or tag not in dirs:
        raise FormatError(
            f"{store.url}/latest names {tag[:80]!r}, which is not a tag directory next to it "
            f"(tags here: {', '.join(dirs) or 'none'})"
        )
    inside = [o.key[len(tag) + 1 :] for o in objects if o.key.startswith(tag + "/")]
    found = _tag(tag, tag, [key for key in inside if "/" not in key])
    if not found.model_states:
        raise FormatError(f"{store.url}/latest names {tag!r}, which holds no *_model_states.pt files")
    found.latest = tag
    return found


def _tag(tag: str, prefix: str, names: list[str]) -> DeepSpeedTag:
    def keys(pattern: re.Pattern[str]) -> list[str]:
        chosen = sorted((n for n in names if pattern.search(n)), key=natural_key)
        return [f"{prefix}/{n}" if prefix else n for n in chosen]

    return DeepSpeedTag(prefix, tag, keys(MODEL_STATES), keys(OPTIM_STATES))


def natural_key(name: str) -> list[object]:
    """rank_10 after rank_9, as DeepSpeed's own loader sorts rank files."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _descend(store: Store, dirs: list[str]) -> Target:
    # A run directory: resume takes its newest checkpoint (Trainer's get_last_checkpoint picks
    # the highest checkpoint-N; ckptkit's own roots the latest committed manifest).
    steps = {int(m.group(1)): d for d in dirs if (m := _HF_CHECKPOINT.fullmatch(d))}
    if steps:
        chosen = steps[max(steps)]
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
