"""torch in a pickle, without torch: storages from persistent ids, tensors from rebuild calls.

``torch.save`` pickles each tensor as ``REDUCE(torch._utils._rebuild_tensor_v2, (storage, offset,
size, stride, requires_grad, backward_hooks))`` where ``storage`` is a persistent id naming a
record (``formats.md`` §3). Here those calls become :class:`TensorRef` descriptions. Calls whose
arguments are not exactly what torch writes stay Opaque (``entries.NotVetted``); bounds of a
tensor against its storage record are the container reader's check, since only it knows the
record sizes (``formats.md`` §3.3).

Torch dtypes stay ``GlobalRef("torch", "float32")`` values (classified "vetted"): a dtype is a
name, and :func:`dtype_name` reads it. ``torch.Size`` becomes :class:`TorchSize`, a tuple that
remembers what it was, so shapes compare equal to tuples and still restore as ``torch.Size``.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import replace
from typing import Any

from ckptkit.errors import FormatError
from ckptkit.pickle.entries import Context, Entry, NotVetted, is_count, is_counts, ref
from ckptkit.pickle.values import GlobalRef, NdArray, Opaque, StorageRef, TensorRef, VettedObject

# Every torch dtype by the name ``torch.save`` pickles (``dtype.__reduce__`` gives its canonical
# attribute name, so aliases such as ``torch.float`` never appear).
TORCH_DTYPES = frozenset(
    (
        *("bool", "float16", "float32", "float64", "bfloat16", "complex32", "complex64", "complex128"),
        *("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"),
        *("int1", "int2", "int3", "int4", "int5", "int6", "int7"),
        *("uint1", "uint2", "uint3", "uint4", "uint5", "uint6", "uint7"),
        *("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu"),
        *("float4_e2m1fn_x2", "bits1x8", "bits2x4", "bits4x2", "bits8", "bits16"),
        *("qint8", "quint8", "qint32", "quint4x2", "quint2x4"),
    )
)

# Legacy typed storage classes and their element dtype (torch/storage.py). UntypedStorage holds
# bytes; the tensor's dtype then comes from ``_rebuild_tensor_v3``'s dtype argument.
STORAGE_DTYPES = {
    "FloatStorage": "float32",
    "DoubleStorage": "float64",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "QInt8Storage": "qint8",
    "QUInt8Storage": "quint8",
    "QInt32Storage": "qint32",
    "QUInt4x2Storage": "quint4x2",
    "QUInt2x4Storage": "quint2x4",
    "UntypedStorage": "uint8",
}
# torch.save names typed storages from ``torch``; UntypedStorage from ``torch.storage``; files
# from GPU runs of old torch name ``torch.cuda.FloatStorage``.
STORAGE_MODULES = frozenset({"torch", "torch.storage", "torch.cuda"})

TORCH_TENSOR = GlobalRef("torch", "Tensor")
TORCH_PARAMETER = GlobalRef("torch.nn.parameter", "Parameter")


class TorchSize(tuple):  # type: ignore[type-arg]
    """A ``torch.Size``: equal to (and hashed as) the tuple of its dimensions."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"TorchSize({tuple.__repr__(self)})"


def dtype_name(value: Any) -> str | None:
    """``"float32"`` for the value a pickled ``torch.float32`` becomes; None for anything else."""
    if type(value) is GlobalRef and value.module == "torch" and value.name in TORCH_DTYPES:
        return value.name
    return None


def is_torch_family(ref: GlobalRef) -> bool:
    """Dtypes and storage classes: vetted names that are values, never called."""
    if ref.module == "torch" and ref.name in TORCH_DTYPES:
        return True
    return ref.module in STORAGE_MODULES and ref.name in STORAGE_DTYPES


def storage_ref_from_pid(pid: Any) -> StorageRef:
    """The storage a torch persistent id names; usable as ``load_symbolic(persistent_load=...)``.

    Accepts the zip format's ``("storage", storage_type, key, location, numel)`` and the legacy
    format's 6-tuple whose last element (``view_metadata``) is None. Anything else (another
    typename such as ``"module"``, a storage view, wrong types) is a :class:`FormatError`.
    """
    if type(pid) is not tuple or len(pid) not in (5, 6) or pid[0] != "storage":
        raise FormatError(f"persistent id is not a torch storage id: {_describe(pid)}")
    _, storage_type, key, location, numel = pid[:5]
    if len(pid) == 6 and pid[5] is not None:
        raise FormatError("persistent id describes a storage view (legacy format); not supported")
    if not (type(storage_type) is GlobalRef and storage_type.module in STORAGE_MODULES):
        raise FormatError(f"persistent id names {_describe(storage_type)}, not a storage class")
    dtype = STORAGE_DTYPES.get(storage_type.name)
    if dtype is None:
        raise FormatError(f"persistent id names unknown storage class {storage_type}")
    if type(key) is not str or type(location) is not str or not is_count(numel):
        raise FormatError(
            "persistent id fields have the wrong types: key "
            f"{_describe(key)}, location {_describe(location)}, numel {_describe(numel)}"
        )
    return StorageRef(key=key, dtype=dtype, numel=numel, location=location)


def _describe(value: Any) -> str:
    # Error messages show short str/int/GlobalRef values and name the type of anything else:
    # repr() of hostile data could be huge, and str() of a huge int is quadratic.
    if type(value) is str and len(value) <= 80:
        return repr(value)
    if type(value) is int and value.bit_length() <= 64:
        return repr(value)
    if type(value) is GlobalRef and len(value.module) + len(value.name) <= 80:
        return str(value)
    return type(value).__name__


def _tensor(
    storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any, dtype: str | None
) -> TensorRef:
    if type(storage) is not StorageRef or not is_count(offset) or type(requires_grad) is not bool:
        raise NotVetted
    if not (is_counts(size) and is_counts(stride) and len(size) == len(stride)):
        raise NotVetted
    return TensorRef(storage, dtype or storage.dtype, size, stride, offset, requires_grad)


def _no_hooks_or_metadata(hooks: Any, metadata: Any = None) -> None:
    # Backward hooks are callables and metadata sets tensor flags (conj, neg): neither fits a
    # TensorRef, so a tensor that has them stays Opaque rather than losing them.
    if type(hooks) not in (dict, OrderedDict) or hooks or metadata:
        raise NotVetted


def _rebuild_tensor(ctx: Context, ref: GlobalRef, args: tuple[Any, ...]) -> TensorRef:
    if len(args) != 4:
        raise NotVetted
    return _tensor(*args, requires_grad=False, dtype=None)


def _rebuild_tensor_v2(ctx: Context, ref: GlobalRef, args: tuple[Any, ...]) -> TensorRef:
    if len(args) not in (6, 7):
        raise NotVetted
    storage, offset, size, stride, requires_grad, hooks, *metadata = args
    _no_hooks_or_metadata(hooks, *metadata)
    return _tensor(storage, offset, size, stride, requires_grad, None)


def _rebuild_tensor_v3(ctx: Context, ref: GlobalRef, args: tuple[Any, ...]) -> TensorRef:
    if len(args) not in (7, 8):
        raise NotVetted
    storage, offset, size, stride, requires_grad, hooks, dtype, *metadata = args
    _no_hooks_or_metadata(hooks, *metadata)
    name = dtype_name(dtype)
    if name is None:
        raise NotVetted
    return _tensor(storage, offset, size, stride, requires_grad, name)


def _parameter(data: Any, requires_grad: Any) -> TensorRef:
    if type(data) is not TensorRef or type(requires_grad) is not bool:
        raise NotVetted
    return replace(data, requires_grad=requires_grad, is_parameter=True)


def _rebuild_parameter(ctx: Context, ref: GlobalRef, args: tuple[Any, ...]) -> TensorRef:
    if len(args) != 3:
        raise NotVetted
    data, requires_grad, hooks = args
    _no_hooks_or_metadata(hooks)
    return _parameter(data, requires_grad)


def _rebuild_parameter_with_state(ctx: Context, ref: GlobalRef, args: tuple[Any, ...]) -> TensorRef:
    # The state holds Python attributes set on the Parameter object; they are not tensor data,
    # and a TensorRef has nowhere to keep them, so they are dropped (the global is still listed).
    if len(args) != 4:
        raise NotVetted
    data, requires_grad, hooks, _state = args
    _no_hooks_or_metadata(hooks)
    return _parameter(data, requires_grad)


def _parameter_class(ctx: Context, ref: GlobalRef, args: tuple[Any, ...]) -> TensorRef:
    # Parameter(data, requires_grad=True), called or via __new__: both give a parameter.
    if len(args) not in (1, 2):
        raise NotVetted
    return _parameter(args[0], args[1] if len(args) == 2 else True)


def _rebuild_from_type_v2(ctx: Context, ref: GlobalRef, args: tuple[Any, ...]) -> Any:
    # (func, new_type, args, state): torch runs func(*args), then casts to new_type and sets
    # state. Only the plain cases unwrap to the inner tensor; a subclass or Python attributes
    # keep the whole call visible as an Opaque holding the interpreted inner tensor.
    if len(args) != 4 or type(args[2]) is not tuple:
        raise NotVetted
    func, new_type, inner_args, state = args
    inner = ctx.call(func, inner_args, "reduce")
    if type(inner) is not TensorRef or state or new_type not in (TORCH_TENSOR, TORCH_PARAMETER):
        return Opaque(ref, "reduce", (func, new_type, inner, state))
    return replace(inner, is_parameter=True) if new_type == TORCH_PARAMETER else inner


def _size(ctx: Context, ref: GlobalRef, args: tuple[Any, ...]) -> TorchSize:
    if len(args) != 1 or not is_counts(args[0]):
        raise NotVetted
    return TorchSize(args[0])


def _device(ctx: Context, ref: GlobalRef, args: tuple[Any, ...]) -> VettedObject:
    # torch.device("cuda", 0) or torch.device("cpu"): kept as the call, never resolved.
    if not (1 <= len(args) <= 2 and type(args[0]) is str and (len(args) == 1 or is_count(args[1]))):
        raise NotVetted
    return VettedObject(ref, args=args)


def _get_layout(ctx: Context, ref: GlobalRef, args: tuple[Any, ...]) -> VettedObject:
    if len(args) != 1 or type(args[0]) is not str or not args[0].startswith("torch."):
        raise NotVetted
    return VettedObject(ref, args=args)


def _device_tensor_from_numpy(ctx: Context, ref: GlobalRef, args: tuple[Any, ...]) -> VettedObject:
    # (data, dtype, device, requires_grad): the tensor's bytes are inline in an ndarray.
    if len(args) != 4:
        raise NotVetted
    data, dtype, device, requires_grad = args
    if type(data) is not NdArray or dtype_name(dtype) is None:
        raise NotVetted
    if type(device) is not str or type(requires_grad) is not bool:
        raise NotVetted
    return VettedObject(ref, args=args)


_REBUILD = "tensor-rebuild"
ENTRIES: dict[GlobalRef, Entry] = {
    ref("torch._utils._rebuild_tensor"): Entry(_REBUILD, reduce=_rebuild_tensor),
    ref("torch._utils._rebuild_tensor_v2"): Entry(_REBUILD, reduce=_rebuild_tensor_v2),
    ref("torch._utils._rebuild_tensor_v3"): Entry(_REBUILD, reduce=_rebuild_tensor_v3),
    ref("torch._utils._rebuild_parameter"): Entry(_REBUILD, reduce=_rebuild_parameter),
    ref("torch._utils._rebuild_parameter_with_state"): Entry(_REBUILD, reduce=_rebuild_parameter_with_state),
    ref("torch._tensor._rebuild_from_type_v2"): Entry(_REBUILD, reduce=_rebuild_from_type_v2),
    ref("torch._utils._rebuild_device_tensor_from_numpy"): Entry(_REBUILD, reduce=_device_tensor_from_numpy),
    TORCH_PARAMETER: Entry(_REBUILD, reduce=_parameter_class, new=_parameter_class),
    # Tensors torch can rebuild but a TensorRef cannot describe: named, left Opaque.
    **{
        ref(f"torch._utils.{name}"): Entry(_REBUILD)
        for name in (
            "_rebuild_qtensor",
            "_rebuild_sparse_tensor",
            "_rebuild_nested_tensor",
            "_rebuild_meta_tensor_no_storage",
            "_rebuild_wrapper_subclass",
            "_rebuild_device_tensor_from_cpu_tensor",
            "_rebuild_xla_tensor",
        )
    },
    TORCH_TENSOR: Entry(),
    ref("torch.Size"): Entry(reduce=_size),
    ref("torch.device"): Entry(reduce=_device),
    ref("torch.serialization._get_layout"): Entry(reduce=_get_layout),
}
