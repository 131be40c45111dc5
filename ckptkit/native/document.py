"""``tree.json`` as a document: loaded with its limits checked, and its tables read into checked,
torch-free descriptions.

Besides the state tree (see :mod:`ckptkit.native.decode`), the document holds three tables:
``shards`` (the shard files, relative paths), ``entries`` (entry name -> shard index, safetensors
dtype and shape) and ``tensors`` (one record per tensor: dtype, shape, stride, byte offset into
an entry, device, and the ``requires_grad`` and ``parameter`` flags). ``ckptkit.load`` and
``inspect`` both read them here, so both accept and refuse the same records.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ckptkit.errors import FormatError, UnsafePathError
from ckptkit.formats.dtypes import torch_itemsize
from ckptkit.manifest import validate_path
from ckptkit.native.files import TREE_FILE
from ckptkit.nesting import TREE_JSON_DEPTH, NestingError, check_tree_depth, loads_bounded
from ckptkit.storage.base import Store

FORMAT_NAME = "ckptkit.native"
# A tree.json carries the lowest version that can read it, so that what older readers can read
# stays readable by them: 1, or 2 once the tree holds a ``flatshard`` node. A reader refuses a
# version above its own before it decodes anything.
FORMAT_VERSION = 2
PLAIN_VERSION = 1
FLAT_SHARD_VERSION = 2


@dataclass(frozen=True)
class EntryRef:
    """A shard entry as the entry table declares it; who reads the shard checks its header
    against ``dtype`` and ``shape``."""

    name: str
    shard: str  # the shard's path, relative to the checkpoint
    dtype: str  # safetensors name: "F32"
    shape: tuple[int, ...]


@dataclass(frozen=True)
class TensorRecord:
    """One row of the tensor table, checked: geometry in elements, ``offset`` in bytes."""

    index: int
    dtype: str  # torch's name: "float32"
    itemsize: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int  # bytes from the start of the entry, a multiple of ``itemsize``
    device: str  # where it was when saved: "cpu", "cuda:0"
    entry: EntryRef | None  # None for a tensor without elements, which has no bytes
    requires_grad: bool
    parameter: bool


def load_document(store: Store) -> dict[str, Any]:
    """The ``tree.json`` at the root of ``store``, with its shape, version and depth checked."""
    try:
        document = loads_bounded(store.get(TREE_FILE).decode("utf-8"), TREE_JSON_DEPTH, f"{TREE_FILE}: JSON")
    except NestingError as exc:
        raise FormatError(str(exc)) from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise FormatError(f"{TREE_FILE}: not valid JSON: {exc}") from exc
    if not isinstance(document, dict) or document.get("format") != FORMAT_NAME:
        raise FormatError(f"{TREE_FILE}: not a ckptkit native tree")
    version = document.get("version")
    if type(version) is not int or version > FORMAT_VERSION:
        raise FormatError(
            f"{TREE_FILE}: format version {version!r}; this ckptkit reads up to {FORMAT_VERSION} "
            "(a newer ckptkit wrote it: upgrade ckptkit to read it)"
        )
    for field, kind in (("shards", list), ("entries", dict), ("tensors", list)):
        if not isinstance(document.get(field), kind):
            raise FormatError(f"{TREE_FILE}: '{field}' is missing or not a {kind.__name__}")
    if "tree" not in document:
        raise FormatError(f"{TREE_FILE}: 'tree' is missing")
    try:
        check_tree_depth(document["tree"], f"{TREE_FILE}: the state tree")
    except NestingError as exc:  # deeper than the writer writes: the decoder would run out of stack
        raise FormatError(str(exc)) from None
    for index, shard in enumerate(document["shards"]):
        _check_shard(index, shard)
    return document


def _check_shard(index: int, shard: Any) -> None:
    # Shards are read through the store: only a path inside the checkpoint will do, and an int
    # or null here would otherwise surface as a raw TypeError or a misleading storage error.
    try:
        validate_path(shard)
    except UnsafePathError as exc:
        raise FormatError(
            f"{TREE_FILE}: shard {index} {shard!r} is not a file inside the checkpoint ({exc.reason})"
        ) from None


def entry_ref(document: dict[str, Any], name: Any) -> EntryRef:
    """The entry called ``name`` in the document's entry table."""
    spec = document["entries"].get(name) if isinstance(name, str) else None
    if not isinstance(spec, dict):
        raise FormatError(f"{TREE_FILE}: refers to entry {name!r}, which its entry table lacks")
    shard, shards = spec.get("shard"), document["shards"]
    if type(shard) is not int or not 0 <= shard < len(shards):
        raise FormatError(f"{TREE_FILE}: entry {name!r} names shard {shard!r}, which does not exist")
    dtype, shape = spec.get("dtype"), spec.get("shape")
    if not isinstance(dtype, str) or not is_dims(shape):
        raise FormatError(f"{TREE_FILE}: entry {name!r} has a malformed dtype or shape")
    return EntryRef(name, shards[shard], dtype, tuple(shape))


def tensor_record(document: dict[str, Any], index: Any) -> TensorRecord:
    """Row ``index`` of the document's tensor table."""
    records = document["tensors"]
    if type(index) is not int or not 0 <= index < len(records) or not isinstance(records[index], dict):
        raise FormatError(f"{TREE_FILE}: reference to tensor {index!r}, which the table lacks")
    record = records[index]
    dtype, shape, stride = record.get("dtype"), record.get("shape"), record.get("stride")
    offset, device = record.get("offset"), record.get("device")
    itemsize = torch_itemsize(dtype) if isinstance(dtype, str) else None
    if itemsize is None:
        raise _malformed(index, f"unknown torch dtype {dtype!r}")
    if not (is_dims(shape) and is_dims(stride) and len(shape) == len(stride)):
        raise _malformed(index, f"shape {shape!r} and stride {stride!r} are not non-negative ints alike")
    if type(offset) is not int or offset < 0 or offset % itemsize:
        raise _malformed(index, f"offset {offset!r} is not a byte offset of a {itemsize}-byte element")
    if not isinstance(device, str):
        raise _malformed(index, f"device {device!r} is not a string")
    name = record.get("entry")
    if name is None and math.prod(shape):
        raise FormatError(f"{TREE_FILE}: tensor {index}: has {math.prod(shape)} elements but no stored bytes")
    return TensorRecord(
        index,
        dtype,
        itemsize,
        tuple(shape),
        tuple(stride),
        offset,
        device,
        None if name is None else entry_ref(document, name),
        requires_grad=record.get("requires_grad") is True,
        parameter=record.get("parameter") is True,
    )


def _malformed(index: int, why: str) -> FormatError:
    return FormatError(f"{TREE_FILE}: malformed tensor record {index}: {why}")


def is_dims(value: Any) -> bool:
    """A JSON list of non-negative ints: a shape or a stride."""
    return isinstance(value, list) and all(type(n) is int and n >= 0 for n in value)
