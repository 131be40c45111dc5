"""numpy arrays and scalars in tree.json; imported only when a tree holds numpy values.

An array node is ``{"t": "ndarray", "dtype": "<f8", "shape": [...], "order": "F"?}`` plus either
``"b64"`` (the bytes inline, for arrays under :data:`INLINE_LIMIT`) or ``"entry"`` (a ``U8``
entry in the shards). A scalar is ``{"t": "npscalar", "dtype": "<u4", "hex": "..."}``. The dtype
string carries the byte order, so a big-endian array comes back big-endian. Fortran-ordered
arrays keep their order. Object and structured dtypes are refused: the first holds arbitrary
Python objects, and the second's field layout the dtype string does not carry.
"""

from __future__ import annotations

import base64
import math
from typing import Any

import numpy as np

from ckptkit.errors import FormatError, UnstorableValueError
from ckptkit.native.decode import ArrayNode
from ckptkit.native.nodes import TAG, TreePath, describe_type, format_path

INLINE_LIMIT = 64 << 10


def encode(value: Any, path: TreePath, blobs: list[tuple[Any, TreePath, dict[str, Any]]]) -> Any:
    """The node for a numpy value; large arrays are appended to ``blobs`` for the shards."""
    if type(value) is np.ndarray:
        _check_dtype(value.dtype, path)
        node: dict[str, Any] = {TAG: "ndarray", "dtype": value.dtype.str, "shape": list(value.shape)}
        if value.ndim > 1 and value.flags.f_contiguous and not value.flags.c_contiguous:
            node["order"] = "F"
        if value.nbytes < INLINE_LIMIT:
            node["b64"] = base64.b64encode(array_bytes(value, node)).decode("ascii")
        else:
            blobs.append((value, path, node))
        return node
    if isinstance(value, np.generic):
        _check_dtype(value.dtype, path)
        return {TAG: "npscalar", "dtype": value.dtype.str, "hex": value.tobytes().hex()}
    raise UnstorableValueError(format_path(path), f"{describe_type(type(value))} is not storable")


def array_bytes(array: np.ndarray, node: dict[str, Any]) -> memoryview:
    """The bytes of ``array`` in the order ``node`` records; copies only a non-contiguous array."""
    order = node.get("order", "C")
    dense = np.asfortranarray(array) if order == "F" else np.ascontiguousarray(array)
    return memoryview(dense.reshape(-1, order=order).view(np.uint8))


def decode_array(node: ArrayNode, data: bytes | memoryview) -> np.ndarray:
    """The array ``node`` describes over ``data``: its inline bytes, or its shard entry's."""
    dtype = _dtype(node.dtype)
    expected = math.prod(node.shape) * dtype.itemsize
    if len(data) != expected:  # the decoder checked inline bytes; an entry's are checked here
        where = node.entry.name if node.entry else "(inline)"
        raise FormatError(
            f"tree.json: ndarray {where} has {len(data)} bytes, its dtype and shape need {expected}"
        )
    # A bytearray copy of inline bytes: an array over immutable bytes would be read-only.
    buffer = bytearray(data) if isinstance(data, bytes) else data
    return np.ndarray(node.shape, dtype=dtype, buffer=buffer, order="F" if node.fortran else "C")


def decode_scalar(node: ArrayNode) -> Any:
    return np.frombuffer(node.data or b"", dtype=_dtype(node.dtype))[0]


def _check_dtype(dtype: np.dtype, path: TreePath) -> None:
    if dtype.hasobject or dtype.fields is not None:
        raise UnstorableValueError(format_path(path), f"numpy dtype {dtype} is not storable")


def _dtype(text: object) -> np.dtype:
    try:
        dtype = np.dtype(text) if isinstance(text, str) else None
    except (TypeError, ValueError):
        dtype = None
    if dtype is None or dtype.hasobject or dtype.fields is not None:
        raise FormatError(f"tree.json: unsupported numpy dtype {text!r}")
    return dtype
