"""ckptkit's own pickle-free checkpoint format: safetensors shards plus a typed JSON tree.

A checkpoint directory holds ``tree.json`` (format version, entry and tensor tables, and the
state tree in typed JSON; see :mod:`ckptkit.native.tree`) and ``tensors-NNNNN-of-NNNNN.safetensors``
shards that any safetensors reader opens. Loading runs no code from the checkpoint. The reader
and writer import torch, so the names below are imported on first use (PEP 562): the torch-free
modules of this package (``files``, ``nodes``, ``document``, ``decode``) stay importable without it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> module that defines it
_EXPORTS = {
    "FileSink": "ckptkit.native.writer",
    "MissingKeyError": "ckptkit.native.reader",
    "NativeSummary": "ckptkit.native.writer",
    "read_native": "ckptkit.native.reader",
    "write_native": "ckptkit.native.writer",
}

__all__ = ["FileSink", "MissingKeyError", "NativeSummary", "read_native", "write_native"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ckptkit.native' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


if TYPE_CHECKING:
    from ckptkit.native.reader import MissingKeyError, read_native
    from ckptkit.native.writer import FileSink, NativeSummary, write_native
