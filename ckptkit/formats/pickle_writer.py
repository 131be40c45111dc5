"""A protocol-2 pickle written opcode by opcode from a symbolic tree, with nothing imported.

``reshard`` reads a DeepSpeed rank file symbolically (``ckptkit.pickle``), edits the tree and must
write it back as the ``data.pkl`` ``torch.load`` turns into the objects DeepSpeed itself saved:
loss scalers, ``ZeroStageEnum``, ``fragment_address``, ``torch.Size``, dtypes, numpy RNG state.
``pickle.Pickler`` cannot do that: its ``save_global`` imports each class to check it, and the
tree holds names (:class:`GlobalRef`), not classes. So this module emits the opcodes itself, in
the forms protocol 2 gives them (checked against CPython's pickler, numpy 2 and torch 2.13):

- containers as the pickler writes them: ``EMPTY_DICT`` + ``SETITEMS`` in batches of 1000,
  ``OrderedDict`` as ``REDUCE(collections.OrderedDict, ())`` + ``SETITEMS``, sets as
  ``REDUCE(builtins.set, ([...],))``, bytes as ``_codecs.encode(str, "latin1")``; module names
  get the Python 2 spelling protocol 2 uses (``__builtin__``), as ``torch.save`` writes them;
- :class:`VettedObject` and :class:`Opaque` as the call or ``__new__`` that made them, then their
  items and ``BUILD`` state; :class:`NdArray` as numpy 2 pickles arrays, scalars and dtypes;
- :class:`StoredTensor` as ``torch._utils._rebuild_tensor_v2`` of a persistent storage id, the
  key chosen by the caller (the zip writer, which also writes the bytes).

Plain trees need no memo. An object met twice, or lying on a cycle, is memoized and fetched
again with ``BINGET``, so shared and cyclic structure loads as pickle would have kept it (a tuple
reached again from inside its own elements is written twice and the outer copy dropped, as
CPython does). A StoredTensor is never memoized: each occurrence is its own rebuild call over
the one storage, as ``torch.save(model.state_dict())`` writes tied weights. Both walks use
explicit stacks, so no depth of tree can exhaust Python's.
"""

from __future__ import annotations

import _compat_pickle
import math
import re
import struct
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ckptkit.errors import FormatError
from ckptkit.formats.dtypes import torch_itemsize
from ckptkit.pickle.machine import CALL, NEW, PERSISTENT_ID
from ckptkit.pickle.torch_refs import TorchSize
from ckptkit.pickle.values import GlobalRef, NdArray, NodeKey, Opaque, TensorRef, VettedObject

# The typed storage class torch.save names for each dtype (torch.storage._dtype_to_storage_type_map,
# torch 2.13); a literal so that writing needs no torch. Other dtypes have no typed storage.
STORAGE_CLASS = {
    "float32": "FloatStorage",
    "float64": "DoubleStorage",
    "float16": "HalfStorage",
    "bfloat16": "BFloat16Storage",
    "complex64": "ComplexFloatStorage",
    "complex128": "ComplexDoubleStorage",
    "int64": "LongStorage",
    "int32": "IntStorage",
    "int16": "ShortStorage",
    "int8": "CharStorage",
    "uint8": "ByteStorage",
    "bool": "BoolStorage",
}

_BATCH = 1000  # pickle's _BATCHSIZE: items per APPENDS / SETITEMS
_FROM_TYPE = GlobalRef("torch._tensor", "_rebuild_from_type_v2")
_NUMPY_CORE = "numpy._core.multiarray"  # numpy 2's spelling, which numpy 2 writes
_DTYPE_STR = re.compile(r"([<>|])([biufcSUV])(\d+)|([<>|])([mM])8(?:\[(\d*)([a-zA-Z]+)\])?")

# Opcodes (pickletools), protocol 2 and below.
_MARK, _STOP, _POP = b"(", b".", b"0"
_BINFLOAT, _BININT, _BININT1, _BININT2 = b"G", b"J", b"K", b"M"
_LONG1, _LONG4, _NONE, _NEWTRUE, _NEWFALSE = b"\x8a", b"\x8b", b"N", b"\x88", b"\x89"
_BINUNICODE, _GLOBAL, _REDUCE, _NEWOBJ, _BUILD = b"X", b"c", b"R", b"\x81", b"b"
_EMPTY_DICT, _SETITEM, _SETITEMS = b"}", b"s", b"u"
_EMPTY_LIST, _APPEND, _APPENDS = b"]", b"a", b"e"
_EMPTY_TUPLE, _TUPLE, _TUPLES = b")", b"t", (b"\x85", b"\x86", b"\x87")
_BINPUT, _LONG_BINPUT, _BINGET, _LONG_BINGET, _BINPERSID = b"q", b"r", b"h", b"j", b"Q"
_PROTO2 = b"\x80\x02"


@dataclass(frozen=True)
class StoredTensor:
    """A tensor to write: dtype (torch name, e.g. "float32", "bfloat16"), shape, and its bytes
    (C-contiguous, little-endian) streamed by chunks() when the writer reaches its record."""

    dtype: str
    shape: tuple[int, ...]
    chunks: Callable[[], Iterable[bytes | memoryview]]
    requires_grad: bool = False

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * (torch_itemsize(self.dtype) or 1)


def dumps(value: Any, storage_key: Callable[[StoredTensor], str]) -> bytes:
    """``value`` as a protocol-2 pickle; ``storage_key(t)`` names the zip record of each tensor."""
    emitter = _Emitter(storage_key, _shared_ids(value))
    emitter.run(value)
    return b"".join(emitter.out)


# Types whose identity the pickle keeps (memoized when met twice). Scalars, strings and names are
# values; StoredTensors share their storage instead (see the module docstring).
_TRACKED = frozenset({dict, list, tuple, set, frozenset, OrderedDict, Counter, bytearray, TorchSize})
_NODES = frozenset({VettedObject, Opaque, NdArray})


def _children(value: Any) -> Iterable[Any]:
    t = type(value)
    if t in (dict, OrderedDict, Counter):
        return (x for pair in value.items() for x in pair)
    if t in (list, tuple, set, frozenset, TorchSize):
        return value
    if t is VettedObject:
        return (value.state, *value.args)
    if t is Opaque:
        pairs = (x for pair in value.setitems for x in pair)
        return (*value.args, *value.kwargs.values(), value.state, *value.items, *pairs)
    return ()


def _node(value: Any) -> Any:
    return value.node if type(value) is NodeKey else value


def _shared_ids(root: Any) -> set[int]:
    """ids of the objects to memoize: those reached twice, and every object on a cycle (only a
    memo entry can close one)."""
    seen: set[int] = set()
    shared: set[int] = set()
    path: list[int] = []  # the objects being walked, outermost first
    on_path: dict[int, int] = {}  # id -> its place in path
    stack: list[tuple[bool, Any]] = [(True, root)]  # (entering, value); (False, _) leaves one
    while stack:
        entering, value = stack.pop()
        if not entering:
            del on_path[path.pop()]
            continue
        value = _node(value)
        if type(value) not in _TRACKED and type(value) not in _NODES:
            continue
        key = id(value)
        if key in seen:
            shared.add(key)
            if key in on_path:
                shared.update(path[on_path[key] :])
            continue
        seen.add(key)
        on_path[key] = len(path)
        path.append(key)
        stack.append((False, None))
        stack.extend((True, child) for child in _children(value))
    return shared


class _Put:
    """Work item: memoize ``obj``, which is now on top of the unpickler's stack."""

    __slots__ = ("obj",)

    def __init__(self, obj: Any) -> None:
        self.obj = obj


class _Value:
    """Work item: emit this value (plain ``bytes`` items on the work stack are opcodes)."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


_Part = bytes | _Value | _Put
# What a handler gives: the opcodes that make the object, then those that fill it (items, BUILD
# state). A memo entry goes between the two, as pickle's save_reduce places it, so contents that
# refer back to the object fetch it.
_Parts = tuple[list[_Part], list[_Part]]


class _Emitter:
    def __init__(self, storage_key: Callable[[StoredTensor], str], shared: set[int]) -> None:
        self.storage_key = storage_key
        self.shared = shared
        self.memo: dict[int, int] = {}  # id -> memo index
        self.active: dict[int, int] = {}  # id -> times its writing has begun and not reached the memo
        self.out: list[bytes] = [_PROTO2]
        self.handlers: dict[type, Callable[[Any], _Parts]] = {
            type(None): lambda v: ([_NONE], []),
            bool: lambda v: ([_NEWTRUE if v else _NEWFALSE], []),
            int: lambda v: ([_int(v)], []),
            float: lambda v: ([_BINFLOAT + struct.pack(">d", v)], []),
            str: lambda v: ([_str(v)], []),
            bytes: lambda v: (_bytes(v), []),
            bytearray: lambda v: (_call("builtins", "bytearray", (bytes(v),)), []),
            complex: lambda v: (_call("builtins", "complex", (v.real, v.imag)), []),
            slice: lambda v: (_call("builtins", "slice", (v.start, v.stop, v.step)), []),
            GlobalRef: lambda v: ([_global(v.module, v.name)], []),
            tuple: lambda v: (_tuple(v), []),
            TorchSize: lambda v: (_call("torch", "Size", (tuple(v),)), []),
            list: lambda v: ([_EMPTY_LIST], _batched(v, _APPEND, _APPENDS, exact=True)),
            dict: lambda v: ([_EMPTY_DICT], _batched(v.items(), _SETITEM, _SETITEMS, exact=True)),
            OrderedDict: lambda v: (
                _call("collections", "OrderedDict", ()),
                _batched(v.items(), _SETITEM, _SETITEMS),
            ),
            Counter: _counter,
            set: lambda v: (_call("builtins", "set", (list(v),)), []),
            frozenset: lambda v: (_call("builtins", "frozenset", (list(v),)), []),
            VettedObject: _vetted,
            Opaque: self._opaque,
            NdArray: _ndarray,
            StoredTensor: self._tensor,
            TensorRef: _tensor_ref,
        }

    def run(self, root: Any) -> None:
        out = self.out
        work: list[_Part] = [_STOP, _Value(root)]
        while work:
            item = work.pop()
            if type(item) is bytes:
                out.append(item)
            elif type(item) is _Put:
                self._memo_put(item.obj)
            else:
                work.extend(reversed(self._expand(_node(item.value))))

    def _expand(self, value: Any) -> list[_Part]:
        key = id(value)
        index = self.memo.get(key)
        if index is not None:
            return [_get(index)]
        handler = self.handlers.get(type(value))
        if handler is None:
            raise FormatError(f"cannot write a {type(value).__name__} into a pickle")
        made, rest = handler(value)
        if key not in self.shared:
            return made + rest
        # An object met again while what makes it is still being written (a tuple holding a
        # list that holds the tuple) is written a second time, as pickle does; that inner copy
        # reaches the memoized list and ends, and the outer one is then dropped for the memo's.
        # Met a third time, it can only lead back to itself through the arguments that make it
        # (a Counter counting itself): no pickle can express that.
        if self.active.get(key, 0) == 2:
            raise FormatError(f"a {type(value).__name__} contains itself through the arguments that make it")
        self.active[key] = self.active.get(key, 0) + 1
        return [*made, _Put(value), *rest]

    def _memo_put(self, obj: Any) -> None:
        key = id(obj)
        self.active[key] -= 1
        index = self.memo.get(key)
        if index is not None:  # the inner copy was memoized first: keep that one
            self.out.append(_POP + _get(index))
            return
        index = self.memo[key] = len(self.memo)
        self.out.append(_BINPUT + bytes([index]) if index < 256 else _LONG_BINPUT + struct.pack("<I", index))

    def _tensor(self, value: StoredTensor) -> _Parts:
        return [_global("torch._utils", "_rebuild_tensor_v2"), *self._rebuild_args(value), _REDUCE], []

    def _rebuild_args(self, value: StoredTensor) -> list[_Part]:
        """``(storage, 0, shape, stride, requires_grad, OrderedDict())``, as torch.save writes them."""
        storage = STORAGE_CLASS.get(value.dtype)
        if storage is None:
            raise FormatError(f"torch.save files cannot hold dtype {value.dtype}")
        shape = tuple(value.shape)
        pid = ("storage", GlobalRef("torch", storage), self.storage_key(value), "cpu", math.prod(shape))
        return [
            _MARK,
            *_tuple(pid),
            _BINPERSID,
            _int(0),  # storage offset
            *_tuple(shape),
            *_tuple(_contiguous_stride(shape)),
            _NEWTRUE if value.requires_grad else _NEWFALSE,
            *_call("collections", "OrderedDict", ()),  # backward hooks: none
            _TUPLE,
        ]

    def _opaque(self, value: Opaque) -> _Parts:
        if value.kwargs:
            raise FormatError(f"cannot write {value.cls}: keyword arguments need protocol 4 (NEWOBJ_EX)")
        rest: list[_Part] = []
        if value.items:
            rest += _batched(value.items, _APPEND, _APPENDS)
        if value.setitems:
            rest += _batched(value.setitems, _SETITEM, _SETITEMS)
        if value.state is not None:
            rest += [_Value(value.state), _BUILD]
        return self._made(value), rest

    def _made(self, value: Opaque) -> list[_Part]:
        cls, kind, args = value.cls, value.kind, value.args
        if cls == PERSISTENT_ID:  # read without a persistent_load: the id, given back
            return [_Value(args[0]), _BINPERSID]
        if cls in (CALL, NEW):  # a call of, or __new__ on, an Opaque: args are (callee, its args)
            callee, call_args = args
            return [_Value(callee), *_tuple(call_args), _REDUCE if cls == CALL else _NEWOBJ]
        head = _global(cls.module, cls.name)
        if cls == _FROM_TYPE and kind == "reduce" and len(args) == 4 and type(args[2]) is StoredTensor:
            # A tensor with Python attributes (ZeRO-3's flat groups carry ``ds_id``): the reader
            # keeps the inner rebuild's tensor where the call had that rebuild's arguments
            # (torch_refs._rebuild_from_type_v2), so the arguments are written back in its place.
            _, new_type, tensor, state = args
            rebuild = _global("torch._utils", "_rebuild_tensor_v2")
            inner = [rebuild, _Value(new_type), *self._rebuild_args(tensor), _Value(state)]
            return [head, _MARK, *inner, _TUPLE, _REDUCE]
        if kind == "global":
            return [head]
        # INST made cls(*args), or cls.__new__(cls) when it had no args (the machine's _instantiate).
        call = kind == "reduce" or (kind == "inst" and bool(args))
        return [head, *_tuple(args), _REDUCE if call else _NEWOBJ]


# --- containers and objects ---------------------------------------------------------------------


def _tuple(value: tuple[Any, ...]) -> list[_Part]:
    if not value:
        return [_EMPTY_TUPLE]
    items: list[_Part] = [_Value(x) for x in value]
    if len(value) <= 3:
        return [*items, _TUPLES[len(value) - 1]]
    return [_MARK, *items, _TUPLE]


def _call(module: str, name: str, args: tuple[Any, ...]) -> list[_Part]:
    """REDUCE(module.name, args): how protocol 2 spells a call."""
    return [_global(module, name), *_tuple(args), _REDUCE]


def _batched(items: Iterable[Any], one: bytes, many: bytes, *, exact: bool = False) -> list[_Part]:
    """APPEND(S) or SETITEM(S) in batches of 1000 (pairs for SETITEM), as CPython's pickler
    writes them: for an exact list or dict a lone item only when it is the only one, for the
    items a reduce gives (an OrderedDict's, an object's) whenever a batch holds one."""
    pairs = one == _SETITEM
    seq = list(items)
    parts: list[_Part] = []
    for start in range(0, len(seq), _BATCH):
        batch = seq[start : start + _BATCH]
        values = [_Value(x) for entry in batch for x in (entry if pairs else (entry,))]
        single = len(seq) == 1 if exact else len(batch) == 1
        parts += [*values, one] if single else [_MARK, *values, many]
    return parts


def _counter(value: Counter[Any]) -> _Parts:
    # Counter.__reduce__ is (Counter, (dict(self),)): a fresh dict inside the call.
    counts = [_EMPTY_DICT, *_batched(value.items(), _SETITEM, _SETITEMS, exact=True)]
    return [_global("collections", "Counter"), *counts, _TUPLES[0], _REDUCE], []


def _vetted(value: VettedObject) -> _Parts:
    # With args it is a call (ZeroStageEnum(2), torch.device("cpu")); without, a plain instance
    # in the copyreg.__newobj__ form, cls.__new__(cls), which BUILD then fills.
    call = [*_tuple(value.args), _REDUCE] if value.args else [_EMPTY_TUPLE, _NEWOBJ]
    made = [_global(value.cls.module, value.cls.name), *call]
    return made, ([] if value.state is None else [_Value(value.state), _BUILD])


# --- leaves -------------------------------------------------------------------------------------


def _get(index: int) -> bytes:
    return _BINGET + bytes([index]) if index < 256 else _LONG_BINGET + struct.pack("<I", index)


def _int(value: int) -> bytes:
    if 0 <= value <= 0xFF:
        return _BININT1 + bytes([value])
    if 0 <= value <= 0xFFFF:
        return _BININT2 + struct.pack("<H", value)
    if -0x80000000 <= value <= 0x7FFFFFFF:
        return _BININT + struct.pack("<i", value)
    encoded = _encode_long(value)
    if len(encoded) < 256:
        return _LONG1 + bytes([len(encoded)]) + encoded
    return _LONG4 + struct.pack("<i", len(encoded)) + encoded


def _encode_long(value: int) -> bytes:
    # Two's complement, little-endian, shortest form (pickle.encode_long).
    size = (value.bit_length() >> 3) + 1
    result = value.to_bytes(size, "little", signed=True)
    if value < 0 and size > 1 and result[-1] == 0xFF and result[-2] & 0x80:
        result = result[:-1]
    return result


def _str(value: str) -> bytes:
    encoded = value.encode("utf-8", "surrogatepass")
    if len(encoded) > 0xFFFFFFFF:
        raise FormatError("a string over 4 GiB does not fit protocol 2")
    return _BINUNICODE + struct.pack("<I", len(encoded)) + encoded


def _bytes(value: bytes) -> list[_Part]:
    # Protocol 2 predates the bytes opcodes: torch.save's pickles spell bytes this way.
    if not value:
        return _call("builtins", "bytes", ())
    return [_global("_codecs", "encode"), _str(value.decode("latin-1")), _str("latin1"), _TUPLES[1], _REDUCE]


def _global(module: str, name: str) -> bytes:
    # Protocol 2 with fix_imports, as pickle and torch.save write it: Python 2 names, ASCII.
    mapped = _compat_pickle.REVERSE_NAME_MAPPING.get((module, name))
    if mapped is not None:
        module, name = mapped
    else:
        module = _compat_pickle.REVERSE_IMPORT_MAPPING.get(module, module)
    if not (module + name).isascii() or "\n" in module + name:
        raise FormatError(f"global {module}.{name} cannot be named in a protocol 2 pickle")
    return _GLOBAL + f"{module}\n{name}\n".encode("ascii")


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, step = [], 1
    for n in reversed(shape):
        stride.append(step)
        step *= max(n, 1)
    return tuple(reversed(stride))


def _tensor_ref(value: TensorRef) -> _Parts:
    raise FormatError(
        f"a source tensor ({value.dtype} {list(value.shape)} in storage {value.storage.key!r}) "
        "is still in the tree: replace source tensors by StoredTensor first"
    )


# --- numpy (the forms numpy 2 writes; ckptkit.pickle.numpy_refs reads them back) -----------------


def _ndarray(value: NdArray) -> _Parts:
    dtype = _numpy_dtype(value.dtype)
    if value.is_scalar:  # numpy._core.multiarray.scalar(dtype, raw)
        return [_global(_NUMPY_CORE, "scalar"), *dtype, *_bytes(value.data), _TUPLES[1], _REDUCE], []
    # _reconstruct(ndarray, (0,), b"b"), then BUILD (1, shape, dtype, fortran, raw)
    made = [_global(_NUMPY_CORE, "_reconstruct"), _global("numpy", "ndarray"), *_tuple((0,)), *_bytes(b"b")]
    fortran = _NEWTRUE if value.fortran_order else _NEWFALSE
    state = [_MARK, _int(1), *_tuple(tuple(value.shape)), *dtype, fortran, *_bytes(value.data), _TUPLE]
    return [*made, _TUPLES[2], _REDUCE], [*state, _BUILD]


def _numpy_dtype(text: str) -> list[_Part]:
    """``numpy.dtype(kind+size, False, True)`` and its BUILD state, for a dtype string."""
    match = _DTYPE_STR.fullmatch(text)
    if match is None:
        raise FormatError(f"cannot write numpy dtype {text!r}")
    if match[2] is not None:
        order, kind, size = match[1], match[2], int(match[3])
        # numpy states element size, alignment and flags only for flexible types.
        layout = {"S": (size, 1, 0), "V": (size, 1, 0), "U": (4 * size, 4, 8)}.get(kind, (-1, -1, 0))
        state: tuple[Any, ...] = (3, order, None, None, None, *layout)
        arg = f"{kind}{size}"
    else:  # datetime64 / timedelta64: version 4 carries the unit; no unit is numpy's "generic"
        order, kind = match[4], match[5]
        unit = (match[7] or "generic").encode("ascii")
        state = (4, order, None, None, None, -1, -1, 0, (None, (unit, int(match[6] or 1), 1, 1)))
        arg = f"{kind}8"
    return [*_call("numpy", "dtype", (arg, False, True)), *_tuple(state), _BUILD]
