"""Walking a symbolic pickle tree: where its tensors are, and whether each fits its storage."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from ckptkit.formats.dtypes import torch_itemsize
from ckptkit.pickle.values import NdArray, Opaque, StorageRef, TensorRef, VettedObject

ROOT = "state"
# A zero-stride expand can declare a huge tensor over a tiny storage (formats.md §3.3); past this
# many bytes, and past its storage, we say so (pytorch-reader uses the same 10 GiB cap).
MAX_DECLARED_BYTES = 10 << 30


def walk_tensors(value: Any, root: str = ROOT) -> list[tuple[str, TensorRef]]:
    """Every TensorRef in ``value`` with its path, e.g. ``state["model"]["w"]``.

    Each container is entered once, even if the pickle shares it (memo GETs) or contains itself,
    so a hostile pickle's fan-out cannot make the walk exponential; a shared container's tensors
    are listed under the first path that reached them.
    """
    found: list[tuple[str, TensorRef]] = []
    seen: set[int] = set()
    stack: list[tuple[str, Any]] = [(root, value)]
    while stack:
        path, node = stack.pop()
        if type(node) is TensorRef:
            found.append((path, node))
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        stack.extend(reversed(list(_children(path, node))))  # reversed: document order out
    return found


def _children(path: str, node: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for key, item in node.items():
            yield f"{path}[{_key(key)}]", item
    elif isinstance(node, (list, tuple)):
        for index, item in enumerate(node):
            yield f"{path}[{index}]", item
    elif isinstance(node, (set, frozenset)):
        for index, item in enumerate(node):
            yield f"{path}{{{index}}}", item
    elif isinstance(node, VettedObject):
        yield f"{path}.state", node.state
        yield from _children(f"{path}.args", node.args)
    elif isinstance(node, Opaque):
        yield from _children(f"{path}.args", node.args)
        yield from _children(f"{path}.kwargs", node.kwargs)
        yield f"{path}.state", node.state
        yield from _children(f"{path}.items", node.items)
        for index, (key, item) in enumerate(node.setitems):
            yield f"{path}.setitems[{index}]", (key, item)


def _key(key: Any) -> str:
    if isinstance(key, str):
        return json.dumps(key, ensure_ascii=False)
    if isinstance(key, (int, float, bool)) or key is None:
        return repr(key)
    return repr(key) if not isinstance(key, (NdArray, bytes)) else type(key).__name__


def is_row_major(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    """Row-major and dense; strides of size-1 dims do not matter (torch leaves them arbitrary)."""
    if len(stride) != len(shape):
        return False
    step = 1
    for n, s in zip(reversed(shape), reversed(stride), strict=True):
        if n > 1 and s != step:
            return False
        step *= n
    return True


def check_storage(storage: StorageRef) -> str | None:
    """Whether the storage's bytes are located and its record holds exactly what it declares.

    Readers record a short record as a problem and keep going; whoever reads the bytes
    (``safe_load``, ``inspect --stats``) refuses the storage here, before allocating anything
    sized by the declared element count, which a 650-byte file can set to 10**12.
    """
    itemsize = torch_itemsize(storage.dtype)
    if storage.byte_offset is None or storage.nbytes is None or itemsize is None:
        return f"storage {storage.key!r}: its record is missing or compressed, or its dtype unknown"
    declared = storage.numel * itemsize
    if storage.nbytes != declared:
        return (
            f"storage {storage.key!r}: record {storage.record} holds {storage.nbytes} bytes, but it is "
            f"declared as {storage.numel} × {storage.dtype} = {declared} bytes"
        )
    return None


def check_tensor(path: str, tensor: TensorRef) -> list[str]:
    """Whether the tensor's view (offset, shape, stride) lies inside its storage (formats.md §3.3)."""
    storage = tensor.storage
    itemsize = torch_itemsize(tensor.dtype)
    storage_itemsize = torch_itemsize(storage.dtype)
    if itemsize is None or storage_itemsize is None:
        return [f"{path}: unknown dtype {tensor.dtype!r}"]
    if len(tensor.shape) != len(tensor.stride):
        return [f"{path}: shape {tensor.shape} and stride {tensor.stride} differ in length"]
    if any(n < 0 for n in (*tensor.shape, *tensor.stride, tensor.storage_offset)):
        return [f"{path}: negative size, stride or offset"]
    storage_bytes = storage.numel * storage_itemsize
    problems = []
    if tensor.numel:
        last = tensor.storage_offset + sum(
            (n - 1) * s for n, s in zip(tensor.shape, tensor.stride, strict=True)
        )
        needed = (last + 1) * itemsize
        if needed > storage_bytes:
            problems.append(
                f"{path}: {tensor.dtype} view (offset {tensor.storage_offset}, shape {list(tensor.shape)}, "
                f"stride {list(tensor.stride)}) reaches byte {needed} of storage {storage.key!r}, "
                f"which holds {storage_bytes}"
            )
        declared = tensor.numel * itemsize
        if declared > MAX_DECLARED_BYTES and declared > storage_bytes:
            problems.append(
                f"{path}: declares {declared} bytes of {tensor.dtype} over a storage of {storage_bytes} "
                "bytes (a zero-stride expand)"
            )
    elif tensor.storage_offset * itemsize > storage_bytes:
        problems.append(f"{path}: offset {tensor.storage_offset} lies past storage {storage.key!r}")
    return problems
