"""Element sizes of torch dtypes by name, without importing torch (the readers are torch-free).

Names are torch's attribute names as ``str(dtype)`` shows them without ``torch.``; the table was
taken from torch 2.13 (``dtype.itemsize``) and a test keeps it in step with the installed torch.
"""

from __future__ import annotations

TORCH_ITEMSIZE: dict[str, int] = {
    "bool": 1,
    "uint8": 1,
    "int8": 1,
    "int16": 2,
    "int32": 4,
    "int64": 8,
    "uint16": 2,
    "uint32": 4,
    "uint64": 8,
    "float16": 2,
    "bfloat16": 2,
    "float32": 4,
    "float64": 8,
    "complex32": 4,
    "complex64": 8,
    "complex128": 16,
    "qint8": 1,
    "quint8": 1,
    "qint32": 4,
    "quint4x2": 1,
    "quint2x4": 1,
    "float8_e5m2": 1,
    "float8_e4m3fn": 1,
    "float8_e5m2fnuz": 1,
    "float8_e4m3fnuz": 1,
    "float8_e8m0fnu": 1,
    "float4_e2m1fn_x2": 1,
    "bits1x8": 1,
    "bits2x4": 1,
    "bits4x2": 1,
    "bits8": 1,
    "bits16": 2,
    **{f"uint{n}": 1 for n in range(1, 8)},
    **{f"int{n}": 1 for n in range(1, 8)},
}


def torch_itemsize(name: str) -> int | None:
    """Bytes per element of the torch dtype ``name``; None for a name torch does not have."""
    return TORCH_ITEMSIZE.get(name)
