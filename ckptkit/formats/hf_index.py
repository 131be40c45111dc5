"""Hugging Face sharded-checkpoint index files, checked against the shards they name.

``model.safetensors.index.json`` and ``pytorch_model.bin.index.json`` map tensor names to shard
files; nothing in the safetensors library validates them (formats.md §7). This reader checks that
every shard path stays inside the checkpoint, every shard exists, the shards hold exactly the
tensors the index assigns them (safetensors shards by their headers, ``.bin`` shards by their
pickles, read symbolically), and that ``metadata.total_size`` matches either meaning it has in the
wild: the sum of tensor bytes or the sum of shard file sizes.
"""

from __future__ import annotations

import json
import posixpath
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from ckptkit.errors import FormatError, LimitExceededError
from ckptkit.formats.dtypes import torch_itemsize
from ckptkit.formats.safetensors import read_safetensors_header
from ckptkit.formats.sniff import detect
from ckptkit.formats.torchfile import read_torch_file, top_level_tensors
from ckptkit.storage.base import Store

MAX_INDEX_SIZE = 64 << 20
_DRIVE = re.compile(r"^[A-Za-z]:")


@dataclass
class HfIndex:
    key: str
    weight_map: dict[str, str]  # tensor name -> shard path as written in the index
    shards: dict[str, str]  # shard path as written -> store key
    metadata: dict[str, Any]
    total_size: int | None  # metadata.total_size, when the index states one
    tensor_bytes: int | None  # sum of the shards' tensor bytes (None if a shard could not be read)
    file_bytes: int | None  # sum of the shard file sizes (None if a shard is missing)
    total_size_meaning: Literal["tensor-bytes", "file-bytes"] | None = None
    shard_tensors: dict[str, list[str]] = field(default_factory=dict)  # shard path -> names found in it
    problems: list[str] = field(default_factory=list)


def read_hf_index(store: Store, key: str, *, check_shards: bool = True) -> HfIndex:
    """Parse the index ``key`` and (by default) check it against its shards' headers."""
    document = _load(store, key)
    problems: list[str] = []
    weight_map = _weight_map(key, document, problems)
    metadata = document.get("metadata", {})
    if not isinstance(metadata, dict):
        problems.append(f"metadata is {type(metadata).__name__}, not an object")
        metadata = {}
    total_size = metadata.get("total_size")
    if total_size is not None and (type(total_size) is not int or total_size < 0):
        problems.append(f"metadata.total_size is {total_size!r}, not a non-negative integer")
        total_size = None
    base = posixpath.dirname(key)
    shards: dict[str, str] = {}
    for path in dict.fromkeys(weight_map.values()):
        reason = _unsafe_reason(path)
        if reason:
            problems.append(f"shard path {path!r} {reason}")
        else:
            shards[path] = posixpath.join(base, path) if base else path
    index = HfIndex(key, weight_map, shards, metadata, total_size, None, None, problems=problems)
    if check_shards:
        _check_shards(store, index)
    return index


def _load(store: Store, key: str) -> dict[str, Any]:
    size = store.head(key).size
    if size > MAX_INDEX_SIZE:
        raise LimitExceededError(
            f"{key}: {size} bytes, over the {MAX_INDEX_SIZE} byte cap for an index file",
            path=key,
            offset=0,
            limit=MAX_INDEX_SIZE,
            actual=size,
        )
    try:
        document = json.loads(store.get(key).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise FormatError(f"{key}: not a valid JSON index file: {exc}") from None
    if not isinstance(document, dict):
        raise FormatError(f"{key}: index is not a JSON object")
    return document


def _weight_map(key: str, document: dict[str, Any], problems: list[str]) -> dict[str, str]:
    raw = document.get("weight_map")
    if not isinstance(raw, dict):
        raise FormatError(f"{key}: index has no weight_map object")
    weight_map = {}
    for name, shard in raw.items():
        if isinstance(shard, str) and shard:
            weight_map[name] = shard
        else:  # non-standard indexes map to objects; we cannot tell which shard holds the tensor
            problems.append(f"weight_map[{name!r}] is {shard!r}, not a shard file name")
    return weight_map


def _unsafe_reason(path: str) -> str | None:
    """Why ``path`` cannot be a shard of this checkpoint, or None if it is a plain relative path."""
    if path.startswith(("/", "\\")) or _DRIVE.match(path):
        return "is absolute"
    if "\\" in path or "\x00" in path:
        return "contains a backslash or NUL"
    parts = path.split("/")
    if ".." in parts:
        return "escapes the checkpoint directory ('..')"
    if any(part in ("", ".") for part in parts):
        return "is not a normalised relative path"
    return None


def _check_shards(store: Store, index: HfIndex) -> None:
    problems = index.problems
    expected: dict[str, set[str]] = {path: set() for path in index.shards}
    for name, path in index.weight_map.items():
        if path in expected:
            expected[path].add(name)
    owners: dict[str, str] = {}
    tensor_bytes: int | None = 0
    file_bytes: int | None = 0
    for path, shard_key in index.shards.items():
        if not store.exists(shard_key):
            problems.append(f"shard {path!r} is missing")
            tensor_bytes = file_bytes = None
            continue
        if file_bytes is not None:
            file_bytes += store.head(shard_key).size
        try:
            names, nbytes = _shard_contents(store, shard_key, problems)
        except FormatError as exc:
            problems.append(f"shard {path!r} cannot be read: {exc}")
            tensor_bytes = None
            continue
        index.shard_tensors[path] = names
        if tensor_bytes is not None:
            tensor_bytes += nbytes
        for name in names:
            if name in owners:
                problems.append(f"tensor {name!r} is in two shards: {owners[name]!r} and {path!r}")
            owners.setdefault(name, path)
        missing = sorted(expected[path] - set(names))
        extra = sorted(set(names) - expected[path])
        if missing:
            problems.append(
                f"shard {path!r} lacks {len(missing)} tensors the index assigns it: {_names(missing)}"
            )
        if extra:
            problems.append(
                f"shard {path!r} holds {len(extra)} tensors the index does not list: {_names(extra)}"
            )
    index.tensor_bytes, index.file_bytes = tensor_bytes, file_bytes
    _check_total_size(index)


def _shard_contents(store: Store, shard_key: str, problems: list[str]) -> tuple[list[str], int]:
    """Tensor names in a shard and their bytes, chosen by content, not by the file name."""
    found = detect(store, shard_key)
    if found.kind == "safetensors":
        header = read_safetensors_header(store, shard_key, strict=False)
        problems.extend(f"{shard_key}: {problem}" for problem in header.problems)
        return list(header.entries), header.tensor_bytes
    if found.kind in ("torch-zip", "torch-legacy", "pickle"):
        torch_file = read_torch_file(store, shard_key)
        problems.extend(f"{shard_key}: {problem}" for problem in torch_file.problems)
        tensors = top_level_tensors(torch_file)
        return list(tensors), sum(t.numel * (torch_itemsize(t.dtype) or 0) for t in tensors.values())
    raise FormatError(found.detail)


def _check_total_size(index: HfIndex) -> None:
    if index.total_size is None:
        return
    if index.total_size == index.tensor_bytes:
        index.total_size_meaning = "tensor-bytes"
    elif index.total_size == index.file_bytes:
        index.total_size_meaning = "file-bytes"
    elif index.tensor_bytes is not None and index.file_bytes is not None:
        index.problems.append(
            f"metadata.total_size is {index.total_size}, but the shards hold {index.tensor_bytes} tensor "
            f"bytes in {index.file_bytes} file bytes"
        )


def _names(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
