"""ckptkit's own pickle-free checkpoint format: safetensors shards plus a typed JSON tree.

A checkpoint directory holds ``tree.json`` (format version, entry and tensor tables, and the
state tree in typed JSON; see :mod:`ckptkit.native.tree`) and ``tensors-NNNNN-of-NNNNN.safetensors``
shards that any safetensors reader opens. Loading runs no code from the checkpoint. This package
imports torch; ``ckptkit`` imports it only on the code paths that make tensors.
"""

from ckptkit.native.reader import MissingKeyError, read_native
from ckptkit.native.writer import FileSink, NativeSummary, write_native

__all__ = ["FileSink", "MissingKeyError", "NativeSummary", "read_native", "write_native"]
