"""``read_native``: tree.json plus shards back to the state tree, reading only what is asked."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack
from typing import Any

import torch

from ckptkit.errors import FormatError
from ckptkit.native.buffers import host_memoryview
from ckptkit.native.decode import ArrayNode, TreeDecoder
from ckptkit.native.document import EntryRef, TensorRecord, load_document
from ckptkit.native.dtypes import torch_dtype
from ckptkit.native.files import TREE_FILE
from ckptkit.native.plan import element_extent
from ckptkit.native.safetensors_io import ShardReader
from ckptkit.native.subtree import MissingKeyError, select_keys
from ckptkit.storage.base import Store

__all__ = ["MissingKeyError", "TorchLeaves", "load_document", "read_native", "select_keys"]

MapLocation = (
    None | str | torch.device | dict[str, str | torch.device] | Callable[[torch.Tensor, str], torch.Tensor]
)


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
    tree = document["tree"] if keys is None else select_keys(document, keys)
    with ExitStack() as stack:
        leaves = TorchLeaves(ShardReader(store, mmap=mmap, stack=stack), map_location)
        return TreeDecoder(document, leaves).decode(tree)


class TorchLeaves:
    """Builds the torch and numpy leaves: each record a tensor on first use, and tensors over one
    entry views of one storage."""

    def __init__(self, shards: ShardReader, map_location: MapLocation) -> None:
        self._shards = shards
        self._map_location = map_location
        self._bases: dict[tuple[str, torch.device], torch.Tensor] = {}

    def tensor(self, record: TensorRecord) -> torch.Tensor:
        dtype = torch_dtype(record.dtype, f"{TREE_FILE}: tensor {record.index}")
        device = self._target_device(record.device)
        if record.entry is None:  # no elements, so no bytes
            tensor = torch.empty_strided(record.shape, record.stride, dtype=dtype, device=device)
        else:
            tensor = self._view(record, record.entry, dtype, device)
        return self._finish(tensor, record)

    def place(self, tensor: torch.Tensor, like: TensorRecord) -> torch.Tensor:
        """A CPU ``tensor`` built elsewhere (a resharded slice) made what ``like``'s tensor would
        be: on its device after ``map_location``, a Parameter or requiring grad as it was."""
        return self._finish(tensor.to(self._target_device(like.device)), like)

    def _finish(self, tensor: torch.Tensor, record: TensorRecord) -> torch.Tensor:
        if callable(self._map_location):
            tensor = self._map_location(tensor, record.device)
        if record.parameter:
            return torch.nn.Parameter(tensor, requires_grad=record.requires_grad)
        return tensor.requires_grad_() if record.requires_grad else tensor

    def size(self, dims: tuple[int, ...]) -> torch.Size:
        return torch.Size(dims)

    def dtype(self, name: str) -> torch.dtype:
        return torch_dtype(name, TREE_FILE)

    def device(self, name: str) -> torch.device:
        return torch.device(name)

    def array(self, node: ArrayNode) -> Any:
        from ckptkit.native import numpy_values

        data = node.data if node.entry is None else host_memoryview(self._entry(node.entry))
        return numpy_values.decode_array(node, data)

    def scalar(self, node: ArrayNode) -> Any:
        from ckptkit.native import numpy_values

        return numpy_values.decode_scalar(node)

    def _view(
        self, record: TensorRecord, entry: EntryRef, dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        base = self._entry(entry, device)
        size = base.numel() * base.element_size()
        if record.offset + element_extent(record.shape, record.stride) * record.itemsize > size:
            raise FormatError(
                f"{TREE_FILE}: tensor {record.index}: {dtype} {list(record.shape)} stride "
                f"{list(record.stride)} at byte {record.offset} lies outside entry {entry.name!r} "
                f"of {size} bytes"
            )
        storage = base.untyped_storage()
        start = base.storage_offset() * base.element_size() + record.offset
        tensor = torch.empty(0, dtype=dtype, device=storage.device)
        return tensor.set_(storage, start // record.itemsize, record.shape, record.stride)

    def _entry(self, entry: EntryRef, device: torch.device | None = None) -> torch.Tensor:
        """``entry`` on ``device``, moved there once so that its views share storage."""
        target = device or torch.device("cpu")
        key = (entry.name, target)
        if key not in self._bases:
            cpu_key = (entry.name, torch.device("cpu"))
            if cpu_key not in self._bases:
                self._bases[cpu_key] = self._read_entry(entry)
            self._bases[key] = self._bases[cpu_key].to(target)
        return self._bases[key]

    def _read_entry(self, entry: EntryRef) -> torch.Tensor:
        info, tensor = self._shards.entry(entry.shard, entry.name)
        if info.dtype != entry.dtype or tuple(info.shape) != entry.shape:
            raise FormatError(
                f"{entry.shard}: tensor {entry.name!r} is {info.dtype} {list(info.shape)} in the shard "
                f"header, {entry.dtype} {list(entry.shape)} in {TREE_FILE}"
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
