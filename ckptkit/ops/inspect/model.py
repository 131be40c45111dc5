"""``--model``: the model's tensors (dtype, shape, size), totals by dtype, parameter count.

From safetensors headers, from state dicts inside torch files (described by their pickles),
from DeepSpeed model-states files, and from a native checkpoint's tree. A state dict does not
say which entries are buffers, so the parameter count leaves out what are buffers by name
(BatchNorm statistics, DeepSpeed's ``buffer_names``), integer tensors, and tied aliases.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ckptkit.formats.dcp import read_dcp
from ckptkit.formats.dtypes import torch_itemsize
from ckptkit.ops.inspect.context import Context, Document, find
from ckptkit.ops.inspect.optimizer import is_optimizer_state
from ckptkit.ops.inspect.rng import is_rng_state
from ckptkit.ops.inspect.source import NamedTensor
from ckptkit.ops.inspect.values import as_tensor, get
from ckptkit.pickle import Opaque, StorageRef, TensorRef

BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")
FLOATING = frozenset(
    {
        "float16",
        "bfloat16",
        "float32",
        "float64",
        "float8_e4m3fn",
        "float8_e5m2",
        "float8_e4m3fnuz",
        "float8_e5m2fnuz",
        "complex64",
        "complex128",
    }
)
# safetensors dtype names as torch names them.
SAFETENSORS_TO_TORCH = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "C64": "complex64",
}


@dataclass
class TensorInfo:
    name: str
    dtype: str
    shape: list[int]
    numel: int
    bytes: int
    role: str = "parameter"  # parameter | frozen | buffer | tied (an alias of another entry)


@dataclass
class DtypeTotal:
    tensors: int = 0
    numel: int = 0
    bytes: int = 0


@dataclass
class ModelSet:
    """One model's state: a safetensors checkpoint, a state dict in a file, DeepSpeed's module."""

    label: str
    files: list[str]
    tensors: list[TensorInfo]
    num_parameters: int
    num_trainable: int | None  # known only where the checkpoint says (DeepSpeed)
    by_dtype: dict[str, DtypeTotal]
    total_bytes: int
    notes: list[str] = field(default_factory=list)


def find_models(ctx: Context) -> list[ModelSet]:
    sets = []
    safetensors = [k for k in ctx.target.safetensors if ctx.target.native is None]
    if safetensors:
        sets.append(_safetensors_set(ctx, safetensors))
    for doc in ctx.documents:
        for path, state in _state_dicts(doc.value):
            label = f"{doc.file}:{path}" if path else doc.file
            sets.append(_state_dict_set(label, doc.file, state))
    if ctx.model_states:
        sets.append(_deepspeed_set(ctx, ctx.model_states[0]))
    if ctx.target.dcp_prefix is not None:
        sets.append(_dcp_set(ctx, ctx.target.dcp_prefix))
    return sets


def model_tensors(ctx: Context) -> list[NamedTensor]:
    """Every model tensor with where its bytes are, for ``--stats``."""
    named = []
    for key in ctx.target.safetensors if ctx.target.native is None else []:
        for entry in ctx.source.safetensors(key).entries.values():
            dtype = SAFETENSORS_TO_TORCH.get(entry.dtype, entry.dtype)
            itemsize = torch_itemsize(dtype) or 1
            storage = StorageRef(
                entry.name, dtype, entry.nbytes // itemsize, "cpu", key, entry.offset, entry.nbytes
            )
            named.append(
                NamedTensor(
                    key, entry.name, TensorRef(storage, dtype, entry.shape, _contiguous(entry.shape), 0)
                )
            )
    return named


def is_state_dict(value: Any) -> bool:
    return (
        isinstance(value, Mapping)
        and bool(value)
        and all(isinstance(k, str) for k in value)
        and all(as_tensor(v) is not None for v in value.values())
    )


def _state_dicts(value: Any) -> list[tuple[str, Mapping[str, Any]]]:
    # Optimizer and RNG states stop the search: an optimizer's per-parameter state is itself a
    # dict of tensors, and is not a model.
    found = find(value, lambda v: is_state_dict(v) or is_optimizer_state(v) or is_rng_state(v), max_depth=2)
    return [(path, node) for path, node in found if is_state_dict(node)]


def _safetensors_set(ctx: Context, keys: list[str]) -> ModelSet:
    tensors = []
    for key in keys:
        for entry in ctx.source.safetensors(key).entries.values():
            dtype = SAFETENSORS_TO_TORCH.get(entry.dtype, entry.dtype)
            tensors.append(_info(entry.name, dtype, list(entry.shape), entry.nbytes))
    label = keys[0] if len(keys) == 1 else f"{len(keys)} safetensors files"
    return _finish(label, keys, tensors)


def _state_dict_set(label: str, file: str, state: Mapping[str, Any]) -> ModelSet:
    tensors, seen = [], set()
    for name, value in state.items():
        tensor = as_tensor(value)
        info = _info(name, tensor.dtype, list(tensor.shape), None)
        # Tied weights pickle as views of one storage: count the first, mark the others.
        view = (tensor.storage.key, tensor.storage_offset, tensor.shape, tensor.stride)
        if view in seen:
            info.role = "tied"
        seen.add(view)
        tensors.append(info)
    return _finish(label, [file], tensors)


def _deepspeed_set(ctx: Context, doc: Document) -> ModelSet:
    value = doc.value
    module = value.get("module") if isinstance(value.get("module"), Mapping) else {}
    groups = value.get("param_shapes")
    groups = [g for g in groups if isinstance(g, Mapping)] if isinstance(groups, (list, tuple)) else []
    shapes: dict[Any, list[int]] = {}
    for group in groups:
        shapes.update(_declared_shapes(ctx, doc.file, "param_shapes", group))
    trainable = set(shapes)
    frozen = value.get("frozen_param_shapes")
    if isinstance(frozen, Mapping):
        shapes.update(_declared_shapes(ctx, doc.file, "frozen_param_shapes", frozen))
    names = value.get("buffer_names")
    buffers = {n for n in names if type(n) is str} if isinstance(names, (list, tuple)) else set()
    shared = value.get("shared_params") if isinstance(value.get("shared_params"), Mapping) else {}
    tensors = []
    for name, entry in module.items():
        tensor = as_tensor(entry)
        if tensor is None:
            continue
        # ZeRO-3 saves empty placeholders for parameters: their shapes are in param_shapes.
        shape = shapes.get(name, list(tensor.shape))
        info = _info(name, tensor.dtype, shape, None)
        info.role = (
            "tied"
            if name in shared
            else "buffer"
            if name in buffers
            else "parameter"
            if name in trainable
            else "frozen"
        )
        tensors.append(info)
    result = _finish(f"{doc.file}:module", [doc.file], tensors)
    result.num_trainable = sum(t.numel for t in tensors if t.role == "parameter")
    if any(as_tensor(v) is not None and as_tensor(v).numel == 0 for v in module.values()):
        result.notes.append(
            "ZeRO-3: the module holds empty placeholders; shapes come from param_shapes, "
            "the values live in the rank optimizer files"
        )
    if get(value, "frozen_param_shapes") is None and any(t.role == "frozen" for t in tensors):
        result.notes.append("ZeRO-1 keeps frozen parameters only in module (zero_to_fp32 drops them)")
    return result


def _declared_shapes(ctx: Context, file: str, field: str, group: Mapping[Any, Any]) -> dict[Any, list[int]]:
    """``{name: shape}`` of a model-states shape table; an entry that is no shape (a damaged
    file: ``torch.Size`` renamed into an unknown class) is a problem, not a crash."""
    shapes = {}
    for name, shape in group.items():
        if isinstance(shape, (tuple, list)) and all(type(n) is int and n >= 0 for n in shape):
            shapes[name] = list(shape)
        else:
            what = shape.cls.qualname if type(shape) is Opaque else type(shape).__name__
            label = repr(name[:80]) if type(name) is str else f"of type {type(name).__name__}"
            ctx.problems.append(f"{file}: {field} entry {label} is not a shape but {what}")
    return shapes


def _dcp_set(ctx: Context, prefix: str) -> ModelSet:
    # DCP keeps a whole training state flat under dotted names; .metadata lists every tensor.
    checkpoint = read_dcp(ctx.source.store, prefix)
    metadata = f"{prefix}/.metadata" if prefix else ".metadata"
    ctx.problems.extend(checkpoint.problems)
    ctx.source.note_globals(metadata, checkpoint.globals)
    tensors = [
        _info(e.fqn, e.dtype, list(e.size), None)
        for e in checkpoint.entries.values()
        if e.kind == "tensor" and e.dtype is not None and e.size is not None
    ]
    return _finish(".metadata", [metadata], tensors)


def _info(name: str, dtype: str, shape: list[int], nbytes: int | None) -> TensorInfo:
    numel = 1
    for n in shape:
        numel *= n
    role = "buffer" if name.rsplit(".", 1)[-1] in BUFFER_SUFFIXES or dtype not in FLOATING else "parameter"
    size = nbytes if nbytes is not None else numel * (torch_itemsize(dtype) or 0)
    return TensorInfo(name, dtype, shape, numel, size, role)


def _finish(label: str, files: list[str], tensors: list[TensorInfo]) -> ModelSet:
    by_dtype: dict[str, DtypeTotal] = {}
    for t in tensors:
        total = by_dtype.setdefault(t.dtype, DtypeTotal())
        total.tensors += 1
        if t.role != "tied":  # an alias shares its source's bytes
            total.numel += t.numel
            total.bytes += t.bytes
    return ModelSet(
        label=label,
        files=files,
        tensors=tensors,
        num_parameters=sum(t.numel for t in tensors if t.role in ("parameter", "frozen")),
        num_trainable=None,
        by_dtype=by_dtype,
        total_bytes=sum(t.bytes for t in tensors if t.role != "tied"),
    )


def _contiguous(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))
