"""Symbolic (non-executing) pickle reading: values and names from a pickle, nothing run.

``load_symbolic`` interprets one pickle into plain values and the nodes of
:mod:`ckptkit.pickle.values`; ``classify`` says how a report should treat a global it names.
This package never imports torch or numpy, and never imports, calls or looks up anything a
pickle names.
"""

from ckptkit.pickle.bounds import DEFAULT_LIMITS, Limits
from ckptkit.pickle.machine import (
    CALL,
    NEW,
    PERSISTENT_ID,
    PickleFormatError,
    load_symbolic,
)
from ckptkit.pickle.names import classify, global_ref
from ckptkit.pickle.torch_refs import TorchSize, dtype_name, storage_ref_from_pid
from ckptkit.pickle.values import (
    Classification,
    GlobalRef,
    GlobalUse,
    NdArray,
    Opaque,
    PickleResult,
    StorageRef,
    TensorRef,
    VettedObject,
)

__all__ = [
    "CALL",
    "DEFAULT_LIMITS",
    "NEW",
    "PERSISTENT_ID",
    "Classification",
    "GlobalRef",
    "GlobalUse",
    "Limits",
    "NdArray",
    "Opaque",
    "PickleFormatError",
    "PickleResult",
    "StorageRef",
    "TensorRef",
    "TorchSize",
    "VettedObject",
    "classify",
    "dtype_name",
    "global_ref",
    "load_symbolic",
    "storage_ref_from_pid",
]
