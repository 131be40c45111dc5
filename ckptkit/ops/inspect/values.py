"""Reading the symbolic value tree: tensors, scalars and JSON-ready summaries, nothing executed.

The pickle interpreter gives plain containers plus nodes (TensorRef, VettedObject, Opaque, ...);
the views only need a few questions answered about them, collected here so that each view reads
like the state dict it describes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

from ckptkit.pickle import GlobalRef, NdArray, Opaque, TensorRef, VettedObject, dtype_name

_REBUILD_FROM_TYPE = GlobalRef("torch._tensor", "_rebuild_from_type_v2")
# Below CPython's 4300-digit limit on int -> str (sys.set_int_max_str_digits): printable as is.
_PRINTABLE_INT_BITS = 14_000


def as_tensor(value: Any) -> TensorRef | None:
    """The tensor ``value`` describes, if any.

    The interpreter leaves ``_rebuild_from_type_v2`` calls Opaque when they carry Python
    attributes (DeepSpeed ZeRO-3 tags its ``fp32_flat_groups`` with ``ds_id``); the tensor
    inside is still an ordinary one, and its attributes do not matter to a description.
    """
    if type(value) is TensorRef:
        return value
    if type(value) is Opaque and value.cls == _REBUILD_FROM_TYPE and len(value.args) >= 3:
        inner = value.args[2]
        return inner if type(inner) is TensorRef else None
    return None


def printable_int(value: int) -> int | str:
    """``value`` itself, or a description when it has too many digits for ``str()`` and JSON:
    a pickle can hold any int (``torch.save({"step": 10**5000})``), CPython refuses to print one
    of over 4300 digits."""
    if value.bit_length() <= _PRINTABLE_INT_BITS:
        return value
    return f"<int of {math.floor(math.log10(abs(value))) + 1} digits>"


def number(value: Any) -> float | int | None:
    """An int or float as itself; anything else (tensor, None, bool...) as None."""
    return value if type(value) in (int, float) else None


def integral(value: float | int | None) -> float | int | None:
    """``12.0`` as ``12``: optimizer steps are stored as float tensors but count steps."""
    if type(value) is float and math.isfinite(value) and value.is_integer():
        return int(value)
    return value


def get(mapping: Any, *keys: str) -> Any:
    """``mapping[keys[0]][keys[1]]...`` or None where a level is missing or not a dict."""
    for key in keys:
        if not isinstance(mapping, Mapping):
            return None
        mapping = mapping.get(key)
    return mapping


def state_of(value: Any, module: str, name: str) -> dict[str, Any] | None:
    """The attribute dict of a vetted instance of ``module.name``, or None."""
    if type(value) is VettedObject and value.cls == GlobalRef(module, name) and isinstance(value.state, dict):
        return value.state
    return None


def walk_named_tensors(value: Any, prefix: str = "") -> Iterator[tuple[str, TensorRef]]:
    """Every tensor under ``value`` with a dotted name (``state.0.exp_avg``), each container once."""
    seen: set[int] = set()
    stack: list[tuple[str, Any]] = [(prefix, value)]
    while stack:
        name, node = stack.pop()
        tensor = as_tensor(node)
        if tensor is not None:
            yield name, tensor
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, Mapping):
            children = [(_join(name, key), item) for key, item in node.items()]
        elif isinstance(node, (list, tuple)):
            children = [(_join(name, i), item) for i, item in enumerate(node)]
        elif type(node) is VettedObject and isinstance(node.state, Mapping):
            children = [(_join(name, key), item) for key, item in node.state.items()]
        else:
            continue
        stack.extend(reversed(children))


def _join(prefix: str, key: Any) -> str:
    part = key if isinstance(key, str) else repr(key)
    return f"{prefix}.{part}" if prefix else part


def plain(value: Any, depth: int = 0) -> Any:
    """A JSON-ready rendering of a symbolic value: numbers stay numbers, nodes become names."""
    if depth > 8:
        return "…"
    if value is None or type(value) in (bool, int, str):
        return value
    if type(value) is float:
        return value if math.isfinite(value) else str(value)
    tensor = as_tensor(value)
    if tensor is not None:
        return {"tensor": tensor.dtype, "shape": list(tensor.shape)}
    dtype = dtype_name(value)
    if dtype is not None:
        return dtype
    if type(value) is GlobalRef:
        return value.qualname
    if type(value) is VettedObject:
        if value.cls == GlobalRef("torch", "device"):
            return ":".join(str(a) for a in value.args)
        if isinstance(value.state, Mapping):
            return {"class": value.cls.qualname, **{k: plain(v, depth + 1) for k, v in value.state.items()}}
        return {"class": value.cls.qualname, "args": [plain(a, depth + 1) for a in value.args]}
    if type(value) is Opaque:
        return {"opaque": value.cls.qualname}
    if type(value) is NdArray:
        return {"ndarray": value.dtype, "shape": list(value.shape)}
    if isinstance(value, (bytes, bytearray)):
        return f"<{len(value)} bytes>"
    if isinstance(value, Mapping):
        return {str(k): plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v, depth + 1) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((plain(v, depth + 1) for v in value), key=repr)
    return repr(value)[:80]
