"""What the symbolic pickle interpreter produces: plain values plus a few node types.

Nothing here is ever imported from a pickle or called. Containers come back as the builtin
containers they denote (dict, list, tuple, set, frozenset, OrderedDict, Counter); scalars as
themselves; everything else as one of the nodes below. Consumers (inspect, scan, doctor,
safe_load) walk this tree; they never see a live object from the file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

# How scan classifies a global a pickle references.
Classification = Literal["tensor-rebuild", "vetted", "unknown", "dangerous"]


@dataclass(frozen=True)
class GlobalRef:
    """A ``module.name`` a pickle refers to (after Python 2 name remapping)."""

    module: str
    name: str

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}"

    def __str__(self) -> str:
        return self.qualname


@dataclass(frozen=True)
class GlobalUse:
    """One reference to a global: where in which pickle, and how it is classified."""

    ref: GlobalRef
    offset: int  # byte offset of the GLOBAL / STACK_GLOBAL / INST opcode in the pickle
    classification: Classification
    pickle_name: str = ""  # e.g. "archive/data.pkl"; set by the container reader


@dataclass(frozen=True)
class StorageRef:
    """A tensor storage named by a persistent id: where its bytes live in the container."""

    key: str  # the zip record name below ``data/`` (zip format) or the legacy storage key
    dtype: str  # element dtype as torch names it: "float32", "bfloat16", ...
    numel: int  # elements, as the persistent id states
    location: str  # "cpu", "cuda:0", ...
    record: str | None = None  # the container member holding the bytes, once resolved
    byte_offset: int | None = None  # absolute offset of the bytes in the file, once resolved
    nbytes: int | None = None  # size of the record, once resolved


@dataclass(frozen=True)
class TensorRef:
    """A tensor described, not built: dtype, geometry, and where its bytes are."""

    storage: StorageRef
    dtype: str
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    storage_offset: int  # in elements
    requires_grad: bool = False
    is_parameter: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class VettedObject:
    """An instance of a vetted checkpoint class, given as its class and attribute state.

    For example DeepSpeed's ``DynamicLossScaler`` becomes
    ``VettedObject(GlobalRef("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    {"cur_scale": 65536.0, ...})``. ``state`` is what the pickle's BUILD set (usually a dict).
    """

    cls: GlobalRef
    state: Any = None
    args: tuple[Any, ...] = ()


@dataclass(frozen=True)
class NdArray:
    """A numpy array or scalar described by dtype string (with byte order), shape and raw bytes."""

    dtype: str  # numpy dtype string, e.g. "<u4"
    shape: tuple[int, ...]
    data: bytes
    fortran_order: bool = False
    is_scalar: bool = False


@dataclass
class Opaque:
    """Anything not vetted: a call of an unknown callable or an instance of an unknown class.

    ``kind`` says how the pickle made it (``reduce``: ``callable(*args)``; ``newobj``:
    ``cls.__new__(cls, *args)``; ``global``: the bare reference, never called). ``state`` is
    what BUILD would have set, ``items``/``setitems`` what APPENDS/SETITEMS would have added.
    """

    cls: GlobalRef
    kind: Literal["reduce", "newobj", "global", "inst"]
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    state: Any = None
    items: list[Any] = field(default_factory=list)
    setitems: list[tuple[Any, Any]] = field(default_factory=list)


@dataclass(frozen=True, eq=False)
class NodeKey:
    """An object node (``Opaque`` or ``VettedObject``) used as a dict key or set element.

    Object nodes are mutable and compare by content, so they cannot hash. Unpickled objects
    without ``__eq__`` hash by identity, and so does this wrapper: every occurrence in the
    pickle is its own key, as it would be after a real unpickle. (DCP's ``.metadata`` keys
    ``storage_data`` by ``MetadataIndex`` objects.)
    """

    node: Opaque | VettedObject


@dataclass
class PickleResult:
    """The value a pickle denotes, and every global it referenced."""

    value: Any
    globals: list[GlobalUse]
    protocol: int | None
    size: int
