"""A ckptkit native checkpoint as the same value tree the pickle reader gives, without torch.

``tree.json`` says everything inspect needs: the state tree in typed JSON and a table of tensor
records (dtype, shape, stride, byte offset into a shard entry). The shard headers give each
entry's absolute offset, so ``--stats`` can read a tensor's bytes like any other.
"""

from __future__ import annotations

import base64
import binascii
import struct
from collections import Counter, OrderedDict
from typing import Any

from ckptkit.errors import FormatError, UnsafePathError
from ckptkit.formats.dtypes import torch_itemsize
from ckptkit.manifest import validate_path
from ckptkit.nesting import NestingError, check_tree_depth
from ckptkit.ops.inspect.source import Source
from ckptkit.pickle import GlobalRef, NdArray, StorageRef, TensorRef, TorchSize, VettedObject

TREE_FILE = "tree.json"
FORMAT_NAME = "ckptkit.native"
_PAIRS = {"dict": dict, "odict": OrderedDict, "counter": Counter}
_SEQUENCES = {"tuple": tuple, "set": set, "frozenset": frozenset}


def read_native_tree(source: Source) -> Any:
    """The state of the native checkpoint at the root of ``source.store``."""
    document = source.json(TREE_FILE)
    if not isinstance(document, dict) or document.get("format") != FORMAT_NAME:
        raise FormatError(f"{TREE_FILE}: not a ckptkit native tree")
    shards, entries, records = document.get("shards"), document.get("entries"), document.get("tensors")
    if not (isinstance(shards, list) and isinstance(entries, dict) and isinstance(records, list)):
        raise FormatError(f"{TREE_FILE}: 'shards', 'entries' or 'tensors' is malformed")
    for index, shard in enumerate(shards):
        _check_shard(index, shard)
    tensors = [_tensor(source, shards, entries, record) for record in records]
    try:
        check_tree_depth(document.get("tree"), f"{TREE_FILE}: the state tree")
    except NestingError as exc:  # deeper than the writer writes: _Decoder would run out of stack
        raise FormatError(str(exc)) from None
    return _Decoder(tensors).decode(document.get("tree"))


def _check_shard(index: int, shard: Any) -> None:
    # A shard is read through the store, so it must be a path inside the checkpoint; an int or
    # null here would otherwise surface as a raw TypeError or a misleading storage error.
    try:
        validate_path(shard)
    except UnsafePathError as exc:
        raise FormatError(
            f"{TREE_FILE}: shard {index} {shard!r} is not a file inside the checkpoint ({exc.reason})"
        ) from None


def _tensor(source: Source, shards: list[Any], entries: dict[str, Any], record: Any) -> TensorRef:
    if not isinstance(record, dict):
        raise FormatError(f"{TREE_FILE}: a tensor record is not an object")
    dtype, shape, stride = record.get("dtype"), record.get("shape"), record.get("stride")
    itemsize = torch_itemsize(dtype) if isinstance(dtype, str) else None
    offset = record.get("offset", 0)
    if (
        itemsize is None
        or not _ints(shape)
        or not _ints(stride)
        or len(shape) != len(stride)
        or type(offset) is not int
        or offset < 0
        or offset % itemsize
    ):
        raise FormatError(f"{TREE_FILE}: malformed tensor record {str(record)[:120]}")
    name = record.get("entry")
    shard, absolute, nbytes = None, None, 0
    spec = entries.get(name) if isinstance(name, str) else None
    if isinstance(spec, dict) and type(spec.get("shard")) is int and 0 <= spec["shard"] < len(shards):
        shard = shards[spec["shard"]]
        header = source.safetensors(shard)
        entry = header.entries.get(name)
        if entry is None:
            raise FormatError(f"{shard}: has no entry {name!r}, which {TREE_FILE} refers to")
        absolute, nbytes = entry.offset, entry.nbytes
    elif name is not None:
        raise FormatError(f"{TREE_FILE}: tensor entry {name!r} is not in the entry table")
    # The entry is the storage, counted in bytes (views of several dtypes may share it), and
    # the byte offset the tensor's place in it, as for a pickled view: the shared checks then
    # hold the view to the entry's bounds.
    storage = StorageRef(
        str(name),
        "uint8",
        nbytes,
        str(record.get("device", "cpu")),
        record=shard,
        byte_offset=absolute,
        nbytes=nbytes,
    )
    return TensorRef(
        storage,
        dtype,
        tuple(shape),
        tuple(stride),
        offset // itemsize,
        requires_grad=record.get("requires_grad") is True,
        is_parameter=record.get("parameter") is True,
    )


def _ints(value: Any) -> bool:
    return isinstance(value, list) and all(type(n) is int and n >= 0 for n in value)


class _Decoder:
    def __init__(self, tensors: list[TensorRef]) -> None:
        self.tensors = tensors

    def decode(self, node: Any) -> Any:
        if node is None or type(node) in (bool, str, int, float):
            return node
        if type(node) is list:
            return [self.decode(item) for item in node]
        if type(node) is not dict:
            raise FormatError(f"{TREE_FILE}: unexpected JSON value {str(node)[:80]}")
        if "t" not in node:
            return {key: self.decode(item) for key, item in node.items()}
        try:
            return self._tagged(node["t"], node, node.get("v"))
        except (KeyError, TypeError, ValueError, IndexError, binascii.Error, struct.error) as exc:
            raise FormatError(f"{TREE_FILE}: malformed {node['t']!r} node: {exc!r}") from None

    def _tagged(self, tag: Any, node: dict[str, Any], value: Any) -> Any:
        if tag == "tensor":
            return self.tensors[node["i"]]
        if tag in _PAIRS:
            return _PAIRS[tag]((self.decode(k), self.decode(v)) for k, v in value)
        if tag in _SEQUENCES:
            return _SEQUENCES[tag](self.decode(item) for item in value)
        if tag == "int":
            return int(value, 16)
        if tag == "float":
            return _float(value)
        if tag == "complex":
            return complex(*(self.decode(part) for part in value))
        if tag in ("bytes", "bytearray"):
            return base64.b64decode(value, validate=True)
        if tag == "size":
            return TorchSize(value)
        if tag == "dtype":
            return GlobalRef("torch", value)
        if tag == "device":
            return VettedObject(GlobalRef("torch", "device"), args=(value,))
        if tag in ("ndarray", "npscalar"):
            # Array bytes are not needed to describe one; inline scalars carry theirs in hex.
            data = bytes.fromhex(node["hex"]) if tag == "npscalar" else b""
            return NdArray(node["dtype"], tuple(node.get("shape", ())), data, is_scalar=tag == "npscalar")
        raise FormatError(f"{TREE_FILE}: unknown node type {tag!r}")


def _float(value: Any) -> float:
    if type(value) is float:
        return value
    if value in ("inf", "-inf", "nan"):
        return float(value)
    if isinstance(value, str) and value.startswith("nan:"):
        return struct.unpack("<d", struct.pack("<Q", int(value[4:], 16)))[0]
    raise ValueError(f"bad float {value!r}")
