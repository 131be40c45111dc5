"""``read_native``: tree.json plus shards back to the state tree, reading only what is asked."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from typing import Any

import torch

from ckptkit.errors import FormatError, UnsafePathError
from ckptkit.manifest import validate_path
from ckptkit.native.buffers import host_memoryview
from ckptkit.native.dtypes import torch_dtype
from ckptkit.native.plan import element_extent
from ckptkit.native.safetensors_io import ShardReader
from ckptkit.native.tree import TAG, TreeDecoder
from ckptkit.native.writer import FORMAT_NAME, FORMAT_VERSION, TREE_FILE
from ckptkit.nesting import TREE_JSON_DEPTH, NestingError, check_tree_depth, loads_bounded
from ckptkit.storage.base import Store

MapLocation = (
    None | str | torch.device | dict[str, str | torch.device] | Callable[[torch.Tensor, str], torch.Tensor]
)


class MissingKeyError(KeyError):
    """``keys=`` named a top-level key the checkpoint does not have."""

    def __str__(self) -> str:  # KeyError would show the message in quotes
        return str(self.args[0])


def read_native(
    store: Store,
    *,
    keys: Sequence[str] | None = None,
    map_location: MapLocation = None,
    mmap: bool = True,
) -> Any:
    """Read the native checkpoint whose ``tree.json`` and shards are at the root of ``store``.

    ``keys`` keeps only those top-level keys of a dict state, and only their tensors' bytes are
    read. ``map_location`` is None (each tensor's original device), a device, a dict mapping
    original device strings to devices, or ``f(tensor, original_device) -> tensor``. Tensors that
    shared storage when saved share it again, unless a callable ``map_location`` copies them.
    On a local store with ``mmap=True`` tensors are memory-mapped from the shards.
    """
    document = load_document(store)
    tree = document["tree"] if keys is None else select_keys(document["tree"], keys)
    with ExitStack() as stack:
        loader = _TensorLoader(document, ShardReader(store, mmap=mmap, stack=stack), map_location)
        return TreeDecoder(loader.tensor, loader.array).decode(tree)


def load_document(store: Store) -> dict[str, Any]:
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
            f"{TREE_FILE}: format version {version!r}; this ckptkit reads up to {FORMAT_VERSION}"
        )
    for field, kind in (("shards", list), ("entries", dict), ("tensors", list)):
        if not isinstance(document.get(field), kind):
            raise FormatError(f"{TREE_FILE}: '{field}' is missing or not a {kind.__name__}")
    if "tree" not in document:
        raise FormatError(f"{TREE_FILE}: 'tree' is missing")
    try:
        check_tree_depth(document["tree"], f"{TREE_FILE}: the state tree")
    except NestingError as exc:
        raise FormatError(str(exc)) from None
    for index, shard in enumerate(document["shards"]):
        _check_shard(index, shard)
    return document


def _check_shard(index: int, shard: Any) -> None:
    # Shards are read through the store: only a path inside the checkpoint will do, and an int
    # or null here would otherwise surface as a raw AttributeError at the first tensor.
    try:
        validate_path(shard)
    except UnsafePathError as exc:
        raise FormatError(
            f"{TREE_FILE}: shard {index} {shard!r} is not a file inside the checkpoint ({exc.reason})"
        ) from None


def select_keys(tree: Any, keys: Sequence[str]) -> Any:
    """The tree node of a dict state, cut down to ``keys`` (kept in the state's own order)."""
    wanted = [keys] if isinstance(keys, str) else list(keys)
    if isinstance(tree, dict) and TAG not in tree:
        available = list(tree)
        _check_present(wanted, available)
        return {key: node for key, node in tree.items() if key in wanted}
    if isinstance(tree, dict) and tree.get(TAG) in ("dict", "odict", "counter"):
        pairs = tree.get("v")
        if not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 for p in pairs):
            raise FormatError(f"{TREE_FILE}: malformed {tree[TAG]!r} node at the top")
        decode_key = TreeDecoder(_no_tensors, _no_tensors).decode
        keyed = [(decode_key(pair[0]), pair) for pair in pairs]
        _check_present(wanted, [key for key, _ in keyed])
        return {**tree, "v": [pair for key, pair in keyed if key in wanted]}
    raise TypeError("keys= needs a checkpoint whose state is a dict")


def _check_present(wanted: list[str], available: list[Any]) -> None:
    missing = [key for key in wanted if key not in available]
    if missing:
        raise MissingKeyError(f"no top-level key {missing[0]!r} in the checkpoint; available: {available!r}")


def _no_tensors(_: Any) -> Any:
    raise FormatError(f"{TREE_FILE}: a dict key holds an array or tensor")


class _TensorLoader:
    """Builds tensors from records on first use: one object per record, views of one storage."""

    def __init__(self, document: dict[str, Any], shards: ShardReader, map_location: MapLocation) -> None:
        self._records: list[Any] = document["tensors"]
        self._entries: dict[str, Any] = document["entries"]
        self._shard_paths: list[Any] = document["shards"]
        self._shards = shards
        self._map_location = map_location
        self._tensors: dict[int, torch.Tensor] = {}
        self._bases: dict[tuple[str, torch.device], torch.Tensor] = {}

    def tensor(self, index: int) -> torch.Tensor:
        if index not in self._tensors:
            if not 0 <= index < len(self._records) or not isinstance(self._records[index], dict):
                raise FormatError(f"{TREE_FILE}: reference to tensor {index}, which the table lacks")
            self._tensors[index] = self._build(index, self._records[index])
        return self._tensors[index]

    def array(self, node: dict[str, Any]) -> Any:
        from ckptkit.native import numpy_values

        if "entry" not in node:
            return numpy_values.decode_array(node, None)
        return numpy_values.decode_array(node, host_memoryview(self._entry(node["entry"])))

    def _build(self, index: int, record: dict[str, Any]) -> torch.Tensor:
        where = f"{TREE_FILE}: tensor {index}"
        dtype = torch_dtype(record.get("dtype"), where)
        shape, stride = _ints(record.get("shape"), where), _ints(record.get("stride"), where)
        offset, original = record.get("offset"), record.get("device")
        if len(shape) != len(stride) or type(offset) is not int or not isinstance(original, str):
            raise FormatError(f"{where}: inconsistent shape, stride, offset or device")
        device = self._target_device(original)
        if record.get("entry") is None:
            if math.prod(shape) != 0:
                raise FormatError(f"{where}: has {math.prod(shape)} elements but no stored bytes")
            tensor = torch.empty_strided(shape, stride, dtype=dtype, device=device)
        else:
            tensor = self._view(where, record["entry"], device, dtype, shape, stride, offset)
        if callable(self._map_location):
            tensor = self._map_location(tensor, original)
        requires_grad = record.get("requires_grad", False) is True
        if record.get("parameter", False) is True:
            return torch.nn.Parameter(tensor, requires_grad=requires_grad)
        return tensor.requires_grad_() if requires_grad else tensor

    def _view(
        self,
        where: str,
        name: Any,
        device: torch.device,
        dtype: torch.dtype,
        shape: list[int],
        stride: list[int],
        offset: int,
    ) -> torch.Tensor:
        base = self._entry(name, device)
        itemsize = dtype.itemsize
        size = base.numel() * base.element_size()
        extent = element_extent(shape, stride)
        if offset < 0 or offset % itemsize or offset + extent * itemsize > size:
            raise FormatError(
                f"{where}: {dtype} {shape} stride {stride} at byte {offset} lies outside "
                f"entry {name!r} of {size} bytes"
            )
        storage = base.untyped_storage()
        start = base.storage_offset() * base.element_size() + offset
        tensor = torch.empty(0, dtype=dtype, device=storage.device)
        return tensor.set_(storage, start // itemsize, shape, stride)

    def _entry(self, name: Any, device: torch.device | None = None) -> torch.Tensor:
        """Entry ``name`` on ``device``, moved there once so that its views share storage."""
        target = device or torch.device("cpu")
        key = (name, target)
        if key not in self._bases:
            cpu_key = (name, torch.device("cpu"))
            if cpu_key not in self._bases:
                self._bases[cpu_key] = self._read_entry(name)
            self._bases[key] = self._bases[cpu_key].to(target)
        return self._bases[key]

    def _read_entry(self, name: Any) -> torch.Tensor:
        spec = self._entries.get(name) if isinstance(name, str) else None
        if not isinstance(spec, dict):
            raise FormatError(f"{TREE_FILE}: refers to entry {name!r}, which its entry table lacks")
        shard = spec.get("shard")
        if type(shard) is not int or not 0 <= shard < len(self._shard_paths):
            raise FormatError(f"{TREE_FILE}: entry {name!r} names shard {shard!r}, which does not exist")
        path = self._shard_paths[shard]
        info, tensor = self._shards.entry(path, name)
        if info.dtype != spec.get("dtype") or list(info.shape) != spec.get("shape"):
            raise FormatError(
                f"{path}: tensor {name!r} is {info.dtype} {list(info.shape)} in the shard header, "
                f"{spec.get('dtype')} {spec.get('shape')} in {TREE_FILE}"
            )
        return tensor

    def _target_device(self, original: str) -> torch.device:
        location = self._map_location
        if location is None:
            return torch.device(original)
        if isinstance(location, (str, torch.device)):
            return torch.device(location)
        if isinstance(location, dict):
            return torch.device(location.get(original, original))
        return torch.device("cpu")  # a callable gets CPU tensors and places them itself


def _ints(value: Any, where: str) -> list[int]:
    if not isinstance(value, list) or not all(type(n) is int and n >= 0 for n in value):
        raise FormatError(f"{where}: expected a list of non-negative ints, found {value!r}")
    return value
