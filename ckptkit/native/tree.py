"""The typed-JSON encoding of state trees: exact round trips without pickle. Reading it back is
:mod:`ckptkit.native.decode`'s (torch-free, so ``inspect`` reads with the same decoder).

Values JSON holds exactly are written as themselves: ``null``, booleans, strings, ints within
±2**53 (what every JSON reader keeps exact), finite floats (Python writes the shortest repr that
reads back bit for bit), lists, and dicts whose keys are all strings (and none is ``"t"``).
Everything else is a tagged object ``{"t": <tag>, ...}``:

=========================  ==========================================================
``int``                    ``{"v": "-0x1f..."}``: hex, which has no digit limit
``float``                  ``{"v": "inf" | "-inf" | "nan" | "nan:<16 hex digits>"}``
``complex``                ``{"v": [re, im]}`` (float nodes)
``bytes``, ``bytearray``   ``{"v": base64}``
``tuple``, ``set``,        ``{"v": [items]}``
``frozenset``
``dict``, ``odict``,       ``{"v": [[key, value], ...]}`` in insertion order
``counter``
``tensor``                 ``{"i": index into the document's tensor table}``
``size``                   ``{"v": [ints]}`` (``torch.Size``)
``dtype``, ``device``      ``{"v": "float32"}``, ``{"v": "cuda:0"}``
``ndarray``, ``npscalar``  see :mod:`ckptkit.native.numpy_values`
``flatshard``              ``{"i": tensor index, "shape": [ints], "offset": int}``: a
                           :class:`~ckptkit.native.partition.FlatShard`, whose 1-D
                           contiguous tensor holds flat elements ``[offset, ...)`` of a
                           tensor of ``shape`` (format version 2)
=========================  ==========================================================

Types are matched exactly (a ``dict`` subclass is not a ``dict``), because the round trip must
give back the same types, and a class this codec does not know could only come back by running
its code.
"""

from __future__ import annotations

import base64
import math
import struct
from collections import Counter, OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from ckptkit.errors import UnstorableValueError
from ckptkit.native.dtypes import torch_name
from ckptkit.native.nodes import TAG, Json, TreePath, describe_type, format_path
from ckptkit.native.partition import FlatShard
from ckptkit.nesting import MAX_TREE_DEPTH

# Ints beyond this magnitude lose precision in JSON readers that use doubles (JavaScript, jq).
JSON_SAFE_INT = 1 << 53
_CANONICAL_NAN = 0x7FF8000000000000
_PAIR_CONTAINERS: dict[type, str] = {dict: "dict", OrderedDict: "odict", Counter: "counter"}
_SEQUENCES: dict[type, str] = {tuple: "tuple", set: "set", frozenset: "frozenset"}
_KEY_SCALARS = (type(None), bool, str, int, float, complex, bytes)

def encode_float(value: float) -> Json:
    if math.isfinite(value):
        return value
    if math.isinf(value):
        return {TAG: "float", "v": "inf" if value > 0 else "-inf"}
    # NaNs carry a sign and payload; keep them, since the round trip is bit for bit.
    bits = struct.unpack("<Q", struct.pack("<d", value))[0]
    return {TAG: "float", "v": "nan" if bits == _CANONICAL_NAN else f"nan:{bits:016x}"}


def _is_storable_key(key: object, levels: int = MAX_TREE_DEPTH) -> bool:
    """Whether ``key`` is made of storable scalars; past ``levels`` of nesting it says yes and
    leaves the refusal to :meth:`TreeEncoder.encode`, whose error names the depth limit."""
    if type(key) in (tuple, frozenset):
        return levels <= 0 or all(_is_storable_key(item, levels - 1) for item in key)  # type: ignore[attr-defined]
    return type(key) in _KEY_SCALARS


class TreeEncoder:
    """Turns a state tree into JSON nodes, collecting tensors and large arrays on the way.

    ``tensors`` holds each distinct tensor object once (identity, not value), in first-seen
    order, with the path where it was first seen in ``tensor_paths``. ``blobs`` holds the numpy
    arrays too large to inline: ``(array, path, node)``; the writer stores the array and sets
    ``node["entry"]``.
    """

    def __init__(self) -> None:
        self.tensors: list[torch.Tensor] = []
        self.tensor_paths: list[TreePath] = []
        self.blobs: list[tuple[Any, TreePath, dict[str, Any]]] = []
        self._tensor_index: dict[int, int] = {}
        self.flat_shards = 0  # how many FlatShard nodes: a tree with any needs format version 2
        self._open: set[int] = set()  # containers on the current path; meeting one is a cycle

    def encode(self, value: Any, path: TreePath = ()) -> Json:
        kind = type(value)
        if value is None or kind in (bool, str):
            return value
        if kind is int:
            return value if -JSON_SAFE_INT < value < JSON_SAFE_INT else {TAG: "int", "v": hex(value)}
        if kind is float:
            return encode_float(value)
        if kind is complex:
            return {TAG: "complex", "v": [encode_float(value.real), encode_float(value.imag)]}
        if kind in (bytes, bytearray):
            return {TAG: kind.__name__, "v": base64.b64encode(value).decode("ascii")}
        if kind is list or kind in _SEQUENCES or kind in _PAIR_CONTAINERS:
            with self._entered(value, path):
                return self._container(value, path)
        if kind in (torch.Tensor, torch.nn.Parameter):
            return {TAG: "tensor", "i": self._tensor(value, path)}
        if kind is FlatShard:
            return self._flat_shard(value, path)
        if kind is torch.Size:
            return {TAG: "size", "v": list(value)}
        if kind is torch.dtype:
            return {TAG: "dtype", "v": torch_name(value)}
        if kind is torch.device:
            return {TAG: "device", "v": str(value)}
        if kind.__module__.split(".")[0] == "numpy":
            from ckptkit.native import numpy_values

            return numpy_values.encode(value, path, self.blobs)
        raise UnstorableValueError(format_path(path), f"{describe_type(kind)} is not storable")

    @contextmanager
    def _entered(self, container: object, path: TreePath) -> Iterator[None]:
        if id(container) in self._open:
            raise UnstorableValueError(format_path(path), "cycle: a container holds itself")
        # Encoding, writing and reading a tree recurse per level; the limit keeps them all far
        # from Python's recursion limit, and the reader refuses what is deeper than it.
        if len(self._open) >= MAX_TREE_DEPTH:
            raise UnstorableValueError(
                format_path(path),
                f"containers nested more than {MAX_TREE_DEPTH} levels deep; the native format "
                f"stores at most {MAX_TREE_DEPTH}",
            )
        self._open.add(id(container))
        try:
            yield
        finally:
            self._open.discard(id(container))

    def _container(self, value: Any, path: TreePath) -> Json:
        kind = type(value)
        if kind is list:
            return [self.encode(item, (*path, i)) for i, item in enumerate(value)]
        if kind in _SEQUENCES:
            return {TAG: _SEQUENCES[kind], "v": [self.encode(x, (*path, i)) for i, x in enumerate(value)]}
        for key in value:
            if not _is_storable_key(key, MAX_TREE_DEPTH - len(self._open)):
                raise UnstorableValueError(
                    format_path(path), f"dict key of type {describe_type(type(key))} is not storable"
                )
        if kind is dict and TAG not in value and all(type(key) is str for key in value):
            return {key: self.encode(item, (*path, key)) for key, item in value.items()}
        pairs = [[self.encode(key), self.encode(item, (*path, key))] for key, item in value.items()]
        return {TAG: _PAIR_CONTAINERS[kind], "v": pairs}

    def _flat_shard(self, shard: FlatShard, path: TreePath) -> Json:
        tensor = shard.tensor
        if type(tensor) not in (torch.Tensor, torch.nn.Parameter):
            raise UnstorableValueError(
                format_path(path), f"a FlatShard of {describe_type(type(tensor))}: it must hold a tensor"
            )
        if tensor.numel() > 1 and tensor.stride() != (1,):
            # A loader at another world size reads byte ranges of the slice: store its elements
            # contiguous, not as the strided view lies in memory.
            tensor = tensor.contiguous()
        self.flat_shards += 1
        index = self._tensor(tensor, path)
        return {TAG: "flatshard", "i": index, "shape": list(shard.shape), "offset": shard.offset}

    def _tensor(self, tensor: torch.Tensor, path: TreePath) -> int:
        index = self._tensor_index.get(id(tensor))
        if index is None:
            _check_tensor(tensor, path)
            index = len(self.tensors)
            self._tensor_index[id(tensor)] = index
            self.tensors.append(tensor)
            self.tensor_paths.append(path)
        return index


def _check_tensor(tensor: torch.Tensor, path: TreePath) -> None:
    if tensor.layout != torch.strided:
        raise UnstorableValueError(format_path(path), f"tensor with layout {tensor.layout} is not storable")
    if tensor.is_quantized:
        raise UnstorableValueError(format_path(path), "quantized tensor is not storable")
    if tensor.device.type == "meta":
        raise UnstorableValueError(format_path(path), "meta tensor has no data to store")
