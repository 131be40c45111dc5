"""The one decoder of ``tree.json``'s state tree (the format is in :mod:`ckptkit.native.tree`).

It turns typed JSON back into Python values and checks every node on the way, without torch or
numpy. What a torch or numpy leaf becomes is up to the reader, who passes :class:`Leaves`:
``ckptkit.load`` builds tensors, dtypes, devices and arrays; ``inspect`` describes them as the
pickle reader does. Either gets each leaf already checked (a tensor as its
:class:`~ckptkit.native.document.TensorRecord`, an array as an :class:`ArrayNode`), so the two
accept the same trees and refuse the same damage with the same message.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
import struct
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol

from ckptkit.errors import FormatError
from ckptkit.formats.dtypes import torch_itemsize
from ckptkit.native.document import EntryRef, TensorRecord, entry_ref, is_dims, tensor_record
from ckptkit.native.files import TREE_FILE
from ckptkit.native.nodes import TAG, Json
from ckptkit.native.partition import FlatShard

_PAIRS: dict[str, type] = {"dict": dict, "odict": OrderedDict, "counter": Counter}
_SEQUENCES: dict[str, type] = {"tuple": tuple, "set": set, "frozenset": frozenset}
_NAN_BITS = re.compile(r"nan:[0-9a-f]{16}")  # as the writer spells a NaN's 64 bits
# A numpy dtype as ``dtype.str`` spells it: byte order, kind, size ("<f8", "|b1", "<M8[s]").
# Object arrays hold arbitrary Python objects and are never read.
_NUMPY_DTYPE = re.compile(r"[<>|]([biufcmMSUV])(\d+)(?:\[\w+\])?")


@dataclass(frozen=True)
class ArrayNode:
    """An ``ndarray`` or ``npscalar`` node, checked but not built (that needs numpy)."""

    dtype: str  # numpy's dtype string, byte order included: "<u4"
    shape: tuple[int, ...]  # () for a scalar
    fortran: bool
    data: bytes | None  # the bytes, in ``fortran`` order; None when they are in ``entry``
    entry: EntryRef | None


@dataclass(frozen=True)
class FlatShardNode:
    """A ``flatshard`` node, checked: its local tensor's record (1-D, contiguous) and which flat
    elements of which logical shape it holds."""

    record: TensorRecord
    shape: tuple[int, ...]
    offset: int

    @property
    def stop(self) -> int:
        return self.offset + self.record.shape[0]


class Leaves(Protocol):
    """What a reader makes of the leaves that are torch or numpy values."""

    def tensor(self, record: TensorRecord) -> Any: ...
    def size(self, dims: tuple[int, ...]) -> Any: ...
    def dtype(self, name: str) -> Any: ...
    def device(self, name: str) -> Any: ...
    def array(self, node: ArrayNode) -> Any: ...
    def scalar(self, node: ArrayNode) -> Any: ...


class TreeDecoder:
    """Decodes the state tree of ``document`` (as :func:`~ckptkit.native.document.load_document`
    gives it); each tensor record becomes one leaf, however often the tree refers to it."""

    def __init__(self, document: dict[str, Any], leaves: Leaves) -> None:
        self._document = document
        self._leaves = leaves
        self._tensors: dict[int, Any] = {}

    def decode(self, node: Json) -> Any:
        if node is None or type(node) in (bool, str, int, float):
            return node
        if type(node) is list:
            return [self.decode(item) for item in node]
        if type(node) is not dict:
            raise FormatError(f"{TREE_FILE}: unexpected JSON value {str(node)[:80]}")
        if TAG not in node:
            return {key: self.decode(item) for key, item in node.items()}
        tag = node[TAG]
        if type(tag) is not str:
            raise FormatError(f"{TREE_FILE}: unknown node type {tag!r}")
        try:
            return self._tagged(tag, node)
        except FormatError:
            raise
        except (KeyError, TypeError, ValueError, RuntimeError, binascii.Error) as exc:
            # A pair that is no pair, an unhashable key, or a value torch or numpy refuses.
            raise FormatError(f"{TREE_FILE}: malformed {tag!r} node: {exc!r}") from None

    def _tagged(self, tag: str, node: dict[str, Any]) -> Any:
        value = node.get("v")
        if tag in _PAIRS:
            items = {self.decode(key): self.decode(item) for key, item in _expect(value, list, tag)}
            # Counter(mapping) copies the counts as they are; Counter(pairs) would count pairs.
            return _PAIRS[tag](items)
        if tag in _SEQUENCES:
            return _SEQUENCES[tag](self.decode(item) for item in _expect(value, list, tag))
        if tag == "tensor":
            return self._tensor(_expect(node.get("i"), int, tag))
        if tag == "flatshard":
            return self.flat_shard(node)
        if tag in ("ndarray", "npscalar"):
            return self._numpy(tag, node)
        return _scalar(tag, node, self._leaves)

    def flat_shard(self, node: dict[str, Any]) -> Any:
        """The value of the ``flatshard`` node ``node``: the slice as saved. A decoder that
        reshards on load gives the loading rank its new slice instead."""
        checked = flat_shard_node(self._document, node)
        return FlatShard(self._tensor(checked.record.index), shape=checked.shape, offset=checked.offset)

    def _tensor(self, index: int) -> Any:
        if index not in self._tensors:
            self._tensors[index] = self._leaves.tensor(tensor_record(self._document, index))
        return self._tensors[index]

    def _numpy(self, tag: str, node: dict[str, Any]) -> Any:
        if tag == "npscalar":
            dtype, itemsize = _numpy_dtype(node.get("dtype"))
            data = bytes.fromhex(_expect(node.get("hex"), str, tag))
            if len(data) != itemsize:
                raise FormatError(f"{TREE_FILE}: numpy scalar of {dtype} with {len(data)} bytes")
            return self._leaves.scalar(ArrayNode(dtype, (), False, data, None))
        return self._leaves.array(array_node(self._document, node))


def _scalar(tag: str, node: dict[str, Any], leaves: Leaves) -> Any:
    """The value of a tagged leaf that holds no tensor or array."""
    value = node.get("v")
    if tag == "int":
        return int(_expect(value, str, tag), 16)
    if tag == "float":
        return _float(node)
    if tag == "complex":
        real, imag = _expect(value, list, tag)
        return complex(_float(real), _float(imag))
    if tag in ("bytes", "bytearray"):
        data = base64.b64decode(_expect(value, str, tag), validate=True)
        return data if tag == "bytes" else bytearray(data)
    if tag == "size":
        if not (isinstance(value, list) and all(type(n) is int for n in value)):
            raise FormatError(f"{TREE_FILE}: 'size' node needs a list of ints, found {value!r}")
        return leaves.size(tuple(value))
    if tag == "dtype":
        if not isinstance(value, str) or torch_itemsize(value) is None:
            raise FormatError(f"{TREE_FILE}: unknown torch dtype {value!r}")
        return leaves.dtype(value)
    if tag == "device":
        return leaves.device(_expect(value, str, tag))
    # Every node type a version adds comes with that version number, which load_document
    # checks first: an unknown type here is damage, not a newer format.
    raise FormatError(f"{TREE_FILE}: unknown node type {tag!r}")


def _float(node: Json) -> float:
    if type(node) is float:
        return node
    if type(node) is not dict or node.get(TAG) != "float" or type(node.get("v")) is not str:
        raise FormatError(f"{TREE_FILE}: expected a float, found {node!r}")
    text = node["v"]
    if text in ("inf", "-inf"):
        return float(text)
    if text == "nan":
        return float("nan")
    if _NAN_BITS.fullmatch(text):
        # NaNs carry a sign and payload, which the writer keeps bit for bit.
        return struct.unpack("<d", struct.pack("<Q", int(text[4:], 16)))[0]
    raise FormatError(f"{TREE_FILE}: bad float {text!r}")


def flat_shard_node(document: dict[str, Any], node: dict[str, Any]) -> FlatShardNode:
    """A ``flatshard`` node checked: a 1-D contiguous tensor inside its logical shape."""
    record = tensor_record(document, _expect(node.get("i"), int, "flatshard"))
    shape, offset = node.get("shape"), node.get("offset")
    if not is_dims(shape) or type(offset) is not int or offset < 0:
        raise FormatError(f"{TREE_FILE}: 'flatshard' node: malformed shape {shape!r} or offset {offset!r}")
    if len(record.shape) != 1 or (record.shape[0] > 1 and record.stride != (1,)):
        raise FormatError(
            f"{TREE_FILE}: 'flatshard' node: tensor {record.index} is {list(record.shape)} stride "
            f"{list(record.stride)}, not a contiguous 1-D slice"
        )
    if offset + record.shape[0] > math.prod(shape):
        raise FormatError(
            f"{TREE_FILE}: 'flatshard' node: elements [{offset}, {offset + record.shape[0]}) lie "
            f"outside its shape {shape} ({math.prod(shape)} elements)"
        )
    return FlatShardNode(record, tuple(shape), offset)


def array_node(document: dict[str, Any], node: dict[str, Any]) -> ArrayNode:
    """An ``ndarray`` node checked: dtype, shape, order, and inline bytes that fit them."""
    dtype, itemsize = _numpy_dtype(node.get("dtype"))
    shape, order = node.get("shape"), node.get("order", "C")
    if not is_dims(shape):
        raise FormatError(f"{TREE_FILE}: bad ndarray shape {shape!r}")
    if order not in ("C", "F"):
        raise FormatError(f"{TREE_FILE}: bad ndarray order {order!r}")
    if "entry" in node:
        return ArrayNode(dtype, tuple(shape), order == "F", None, entry_ref(document, node["entry"]))
    data = base64.b64decode(_expect(node.get("b64"), str, "ndarray"), validate=True)
    expected = math.prod(shape) * itemsize
    if len(data) != expected:
        raise FormatError(
            f"{TREE_FILE}: ndarray (inline) has {len(data)} bytes, its dtype and shape need {expected}"
        )
    return ArrayNode(dtype, tuple(shape), order == "F", data, None)


def _numpy_dtype(text: object) -> tuple[str, int]:
    """A numpy dtype string and its element size, read without numpy."""
    match = _NUMPY_DTYPE.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise FormatError(f"{TREE_FILE}: unsupported numpy dtype {text!r}")
    kind, size = match.group(1), int(match.group(2))
    return match.group(0), size * 4 if kind == "U" else size  # a "U" size counts UCS-4 characters


def _expect(value: Any, kind: type, tag: str) -> Any:
    if type(value) is not kind:
        raise FormatError(f"{TREE_FILE}: {tag!r} node needs a {kind.__name__}, found {value!r}")
    return value
