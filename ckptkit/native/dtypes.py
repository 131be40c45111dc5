"""Names of dtypes as tree.json and safetensors headers spell them.

tree.json names every torch dtype by its attribute name (``"float32"``, ``"float8_e8m0fnu"``), so
dtypes safetensors lacks survive exactly. A shard entry uses the safetensors name where one
exists, so other tools read the shards as ordinary tensors; other dtypes go in as raw ``U8``.
"""

from __future__ import annotations

import torch

from ckptkit.errors import FormatError

# The dtypes safetensors' torch binding maps (safetensors 0.8), with their element size.
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
    "C64": torch.complex64,
}
_SAFETENSORS_NAME = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}

# Every torch dtype by attribute name; aliases (torch.float is torch.float32) resolve to the
# canonical name, which is what str(dtype) shows.
_TORCH_DTYPES: dict[str, torch.dtype] = {
    str(value).removeprefix("torch."): value
    for value in vars(torch).values()
    if isinstance(value, torch.dtype)
}


def torch_name(dtype: torch.dtype) -> str:
    """``"float32"`` for ``torch.float32``."""
    return str(dtype).removeprefix("torch.")


def torch_dtype(name: object, where: str) -> torch.dtype:
    """The torch dtype called ``name``; :class:`FormatError` naming ``where`` if there is none."""
    dtype = _TORCH_DTYPES.get(name) if isinstance(name, str) else None
    if dtype is None:
        raise FormatError(f"{where}: unknown torch dtype {name!r}")
    return dtype


def safetensors_name(dtype: torch.dtype) -> str | None:
    """The safetensors name of ``dtype``, or None where safetensors has no such dtype."""
    return _SAFETENSORS_NAME.get(dtype)


def safetensors_itemsize(name: str) -> int | None:
    """Bytes per element of the safetensors dtype ``name``; None for a dtype we do not read."""
    dtype = SAFETENSORS_DTYPES.get(name)
    return None if dtype is None else dtype.itemsize
