"""numpy arrays, scalars and dtypes in a pickle, as :class:`NdArray` values and dtype strings.

The shapes are those numpy writes (checked with numpy 2.4; numpy 1.x spells the module
``numpy.core``). A dtype pickles as ``numpy.dtype("u4", False, True)`` plus a BUILD of
``(3, "<", None, None, None, -1, -1, 0)`` and becomes the string ``"<u4"``. An array pickles as
``_reconstruct(numpy.ndarray, (0,), b"b")`` plus a BUILD of ``(1, shape, dtype, fortran, raw)``
or, with protocol 5, as ``_frombuffer(raw, dtype, shape, order)``. Object arrays (``"|O"``),
structured and subarray dtypes, and subclasses of ndarray are not vetted: they nest arbitrary
pickled objects, so they stay Opaque.
"""

from __future__ import annotations

import re
from math import prod
from typing import Any

from ckptkit.pickle.entries import Context, Entry, NotVetted, is_count, is_counts, ref
from ckptkit.pickle.values import GlobalRef, NdArray, Opaque

NDARRAY = ref("numpy.ndarray")

# Byte order, kind, item size, and the unit datetimes carry: "<u4", "|b1", "<U5", "<M8[ns]".
_DTYPE_STR = re.compile(r"([<>|])([biufcSUV])(\d+)|([<>|])([mM])8(\[\d*[a-zA-Z]+\])?")
_DTYPE_ARG = re.compile(r"[biufcSUV]\d+|[mM]8")


def itemsize(dtype: str) -> int | None:
    """Bytes per element of a dtype string this module produces; None if it is not one."""
    match = _DTYPE_STR.fullmatch(dtype)
    if match is None:
        return None
    if match[2] is None:
        return 8  # datetime64 / timedelta64
    return int(match[3]) * (4 if match[2] == "U" else 1)  # "U5" counts UCS-4 characters


def is_numpy_family(ref: GlobalRef) -> bool:
    """numpy 2's per-dtype classes (``numpy.dtypes.UInt32DType``): vetted names, never called.

    They are the classes of dtype instances, which is why torch's allowlists name them; a
    pickle references one only when a dtype class itself was pickled.
    """
    return ref.module == "numpy.dtypes" and ref.name.endswith("DType") and ref.name.isidentifier()


def _dtype(opaque: Opaque, state: Any) -> str:
    # args: (typestr, align, copy); state: (version, byteorder, subarray, names, fields, elsize,
    # alignment, flags[, metadata]). Version 4 carries datetime metadata as its last element.
    args = opaque.args
    if opaque.kind != "reduce" or len(args) != 3 or type(args[0]) is not str:
        raise NotVetted
    if type(state) is not tuple or len(state) not in (8, 9) or type(state[0]) is not int:
        raise NotVetted
    if state[0] not in (3, 4):
        raise NotVetted
    if not _DTYPE_ARG.fullmatch(args[0]) or state[1] not in ("<", ">", "|") or state[2:5] != (None,) * 3:
        raise NotVetted
    unit = ""
    if args[0] in ("M8", "m8"):
        unit = _datetime_unit(state[8] if len(state) == 9 else None)
    return state[1] + args[0] + unit


def _datetime_unit(metadata: Any) -> str:
    # numpy writes (None, (b"ns", 1, 1, 1)): (metadata dict, (unit, count, num, den)).
    if metadata is None:
        return ""
    if type(metadata) is not tuple or len(metadata) != 2:
        raise NotVetted
    if type(metadata[1]) is not tuple or len(metadata[1]) != 4:
        raise NotVetted
    unit, count, _, _ = metadata[1]
    if type(unit) is not bytes or not unit.isalpha() or not is_count(count):
        raise NotVetted
    return f"[{count if count != 1 else ''}{unit.decode('ascii')}]"


def _array(dtype: Any, shape: Any, data: Any, fortran: Any) -> NdArray:
    size = itemsize(dtype) if type(dtype) is str else None
    if size is None or not is_counts(shape) or type(fortran) is not bool:
        raise NotVetted
    if type(data) in (bytearray, str):
        # Protocol 0-2 pickles from Python 2 carry the bytes as a latin-1 str.
        try:
            data = bytes(data, "latin-1") if type(data) is str else bytes(data)
        except UnicodeEncodeError:
            raise NotVetted from None
    if type(data) is not bytes or len(data) != prod(shape) * size:
        raise NotVetted
    return NdArray(dtype, shape, data, fortran_order=fortran)


def _reconstruct(opaque: Opaque, state: Any) -> NdArray:
    if opaque.kind != "reduce" or len(opaque.args) != 3 or opaque.args[0] != NDARRAY:
        raise NotVetted
    if type(state) is not tuple or len(state) != 5 or state[0] != 1 or type(state[0]) is not int:
        raise NotVetted
    _, shape, dtype, fortran, data = state
    return _array(dtype, shape, data, fortran)


def _frombuffer(ctx: Context, ref: GlobalRef, args: tuple[Any, ...]) -> NdArray:
    if len(args) != 4 or args[3] not in ("C", "F"):
        raise NotVetted
    data, dtype, shape, order = args
    return _array(dtype, shape, data, order == "F")


def _scalar(ctx: Context, ref: GlobalRef, args: tuple[Any, ...]) -> NdArray:
    if len(args) != 2:
        raise NotVetted
    array = _array(args[0], (), args[1], False)
    return NdArray(array.dtype, (), array.data, is_scalar=True)


_CORES = ("numpy.core", "numpy._core")  # numpy < 2 and numpy >= 2
ENTRIES: dict[GlobalRef, Entry] = {
    NDARRAY: Entry(),
    ref("numpy.dtype"): Entry(build=_dtype),
    **{ref(f"{core}.multiarray._reconstruct"): Entry(build=_reconstruct) for core in _CORES},
    **{ref(f"{core}.multiarray.scalar"): Entry(reduce=_scalar) for core in _CORES},
    **{ref(f"{core}.numeric._frombuffer"): Entry(reduce=_frombuffer) for core in _CORES},
}
