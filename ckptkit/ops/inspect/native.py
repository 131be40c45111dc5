"""A ckptkit native checkpoint as the same value tree the pickle reader gives, without torch.

``tree.json`` says everything inspect needs, and :mod:`ckptkit.native.decode` (the loader's
decoder) reads it; the leaves here describe what the loader would build: a tensor as a
``TensorRef`` whose storage is its shard entry (the shard headers give each entry's absolute
offset, so ``--stats`` reads a tensor's bytes like any other), a numpy value as an ``NdArray``.
"""

from __future__ import annotations

from typing import Any

from ckptkit.errors import FormatError
from ckptkit.native.decode import ArrayNode, TreeDecoder
from ckptkit.native.document import TensorRecord, load_document
from ckptkit.native.files import TREE_FILE
from ckptkit.ops.inspect.source import Source
from ckptkit.pickle import GlobalRef, NdArray, StorageRef, TensorRef, TorchSize, VettedObject

__all__ = ["TREE_FILE", "read_native_tree"]


def read_native_tree(source: Source) -> Any:
    """The state of the native checkpoint at the root of ``source.store``."""
    document = load_document(source.store)
    return TreeDecoder(document, _Described(source)).decode(document["tree"])


class _Described:
    """Leaves as the pickle reader describes them; no tensor or array bytes are read."""

    def __init__(self, source: Source) -> None:
        self._source = source

    def tensor(self, record: TensorRecord) -> TensorRef:
        shard, absolute, nbytes = None, None, 0
        if record.entry is not None:
            shard = record.entry.shard
            entry = self._source.safetensors(shard).entries.get(record.entry.name)
            if entry is None:
                raise FormatError(f"{shard}: has no entry {record.entry.name!r}, which {TREE_FILE} refers to")
            absolute, nbytes = entry.offset, entry.nbytes
        # The entry is the storage, counted in bytes (views of several dtypes may share it), and
        # the byte offset the tensor's place in it, as for a pickled view: the shared checks then
        # hold the view to the entry's bounds.
        name = None if record.entry is None else record.entry.name
        storage = StorageRef(
            str(name), "uint8", nbytes, record.device, record=shard, byte_offset=absolute, nbytes=nbytes
        )
        return TensorRef(
            storage,
            record.dtype,
            record.shape,
            record.stride,
            record.offset // record.itemsize,
            requires_grad=record.requires_grad,
            is_parameter=record.parameter,
        )

    def size(self, dims: tuple[int, ...]) -> TorchSize:
        return TorchSize(dims)

    def dtype(self, name: str) -> GlobalRef:
        return GlobalRef("torch", name)

    def device(self, name: str) -> VettedObject:
        return VettedObject(GlobalRef("torch", "device"), args=(name,))

    def array(self, node: ArrayNode) -> NdArray:
        # An array stored in a shard is described without its bytes, as a tensor is.
        return NdArray(node.dtype, node.shape, node.data or b"", fortran_order=node.fortran)

    def scalar(self, node: ArrayNode) -> NdArray:
        return NdArray(node.dtype, (), node.data or b"", is_scalar=True)
