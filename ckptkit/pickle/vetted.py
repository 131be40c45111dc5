"""The vetted table: globals whose calls become structured values instead of Opaque nodes.

The tiers follow ``safe-loading.md`` §3:

- tier 0 (torch's own defaults): the builtins and ``collections`` types stdlib pickle writes for
  plain data, ``_codecs.encode`` (protocol-2 ``bytes``), ``copyreg._reconstructor`` (protocol 0/1
  instances), and everything in :mod:`ckptkit.pickle.torch_refs`;
- tier 1: numpy arrays, scalars and dtypes for RNG state (:mod:`ckptkit.pickle.numpy_refs`);
- tier 2: DeepSpeed's loss scalers, ``ZeroStageEnum`` and ``fragment_address``, accepted only
  with the argument and state shapes ``formats.md`` §11 lists.

``collections.defaultdict`` becomes a plain ``dict`` when its factory is a vetted builtin type or
None: the factory only matters for missing keys, which reading a checkpoint never creates (the
factory's global is still listed). Any other factory keeps the defaultdict Opaque.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from typing import Any

from ckptkit.pickle import numpy_refs, torch_refs
from ckptkit.pickle.entries import Context, Entry, NotVetted, is_count, ref
from ckptkit.pickle.values import GlobalRef, Opaque, VettedObject

OBJECT = ref("builtins.object")
_LATIN1 = ("latin1", "latin-1")


def _elements(ctx: Context, args: tuple[Any, ...]) -> list[Any]:
    if not args:
        return []
    if len(args) != 1 or type(args[0]) not in (list, tuple, set, frozenset):
        raise NotVetted
    return [ctx.key(x) for x in args[0]]


def _set(ctx: Context, ref: GlobalRef, args: tuple[Any, ...]) -> set[Any]:
    return set(_elements(ctx, args))


def _frozenset(ctx: Context, ref: GlobalRef, args: tuple[Any, ...]) -> frozenset[Any]:
    return frozenset(_elements(ctx, args))


def _latin1(text: Any) -> bytes:
    if type(text) is not str:
        raise NotVetted
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        raise NotVetted from None


def _codecs_encode(ctx: Context, ref: GlobalRef, args: tuple[Any, ...]) -> bytes:
    # Protocol <= 2 writes bytes as _codecs.encode(str, "latin1"); other codecs are not data.
    if len(args) != 2 or args[1] not in _LATIN1:
        raise NotVetted
    return _latin1(args[0])


def _bytes(ctx: Context, ref: GlobalRef, args: tuple[Any, ...]) -> bytes:
    if args:  # protocol <= 2 writes b"" as bytes(); non-empty bytes go through _codecs.encode
        raise NotVetted
    return b""


def _bytearray(ctx: Context, ref: GlobalRef, args: tuple[Any, ...]) -> bytearray:
    if not args:
        return bytearray()
    if len(args) != 1 or type(args[0]) is not bytes:  # protocol <= 2 wraps _codecs.encode bytes
        raise NotVetted
    return bytearray(args[0])


def _complex(ctx: Context, ref: GlobalRef, args: tuple[Any, ...]) -> complex:
    if not 1 <= len(args) <= 2 or any(type(x) not in (int, float) for x in args):
        raise NotVetted
    return complex(*args)


def _slice(ctx: Context, ref: GlobalRef, args: tuple[Any, ...]) -> slice:
    if len(args) != 3 or any(x is not None and type(x) is not int for x in args):
        raise NotVetted
    return slice(*args)


def _ordered_dict(ctx: Context, ref: GlobalRef, args: tuple[Any, ...]) -> OrderedDict[Any, Any]:
    if args:  # items follow as SETITEMS
        raise NotVetted
    return OrderedDict()


def _counter(ctx: Context, ref: GlobalRef, args: tuple[Any, ...]) -> Counter[Any]:
    if not args:
        return Counter()
    if len(args) != 1 or type(args[0]) is not dict:
        raise NotVetted
    return Counter(args[0])  # the dict's keys were checked when it was built


# Factories a defaultdict may name and still be read as a dict.
_PLAIN_FACTORIES = frozenset(
    [GlobalRef("builtins", name) for name in ("list", "dict", "set", "int", "float", "str", "tuple", "bool")]
    + [ref("builtins.bytes"), ref("collections.OrderedDict"), ref("collections.Counter")]
)


def _defaultdict(ctx: Context, ref: GlobalRef, args: tuple[Any, ...]) -> dict[Any, Any]:
    factory = args[0] if len(args) == 1 else None
    if len(args) > 1 or not (factory is None or (type(factory) is GlobalRef and factory in _PLAIN_FACTORIES)):
        raise NotVetted
    return {}


def _reconstructor(ctx: Context, ref: GlobalRef, args: tuple[Any, ...]) -> Any:
    # Protocol 0/1 write plain instances as _reconstructor(cls, object, None), which is
    # object.__new__(cls): the same thing NEWOBJ(cls, ()) means in protocol 2, so it becomes
    # that. Other bases (dict or tuple subclasses) run base.__init__ with state: stays Opaque.
    if len(args) != 3 or args[1] != OBJECT or args[2] is not None:
        raise NotVetted
    return ctx.new(args[0], (), "newobj")


def _newobj(ctx: Context, ref: GlobalRef, args: tuple[Any, ...]) -> Any:
    # copyreg.__newobj__(cls, *args) is cls.__new__(cls, *args): NEWOBJ spelled as a call.
    if not args:
        raise NotVetted
    return ctx.new(args[0], args[1:], "newobj")


# --- DeepSpeed (formats.md §11) ----------------------------------------------------------------

_LOSS_SCALER_KEYS = frozenset({"cur_scale", "dynamic"})
_DYNAMIC_LOSS_SCALER_KEYS = _LOSS_SCALER_KEYS | {
    "cur_iter",
    "last_overflow_iter",
    "scale_factor",
    "scale_window",
    "min_scale",
    "delayed_shift",
    "cur_hysteresis",
    "consecutive_hysteresis",
    "raise_error_at_min_scale",
    "dtype",
}


def _scalar_state(value: Any) -> bool:
    return type(value) in (int, float, bool, type(None)) or torch_refs.dtype_name(value) is not None


def _instance_state(opaque: Opaque, state: Any, required: frozenset[str], allowed: frozenset[str]) -> dict:
    # A plain instance: cls.__new__(cls) with no arguments, then BUILD with its __dict__.
    if opaque.kind not in ("newobj", "inst") or opaque.args or opaque.kwargs or type(state) is not dict:
        raise NotVetted
    if not required <= state.keys() <= allowed or not all(_scalar_state(v) for v in state.values()):
        raise NotVetted
    return state


def _loss_scaler(opaque: Opaque, state: Any) -> VettedObject:
    return VettedObject(opaque.cls, _instance_state(opaque, state, _LOSS_SCALER_KEYS, _LOSS_SCALER_KEYS))


def _dynamic_loss_scaler(opaque: Opaque, state: Any) -> VettedObject:
    state = _instance_state(opaque, state, _LOSS_SCALER_KEYS, _DYNAMIC_LOSS_SCALER_KEYS)
    return VettedObject(opaque.cls, state)


def _fragment_address(opaque: Opaque, state: Any) -> VettedObject:
    keys = frozenset({"numel", "start"})
    state = _instance_state(opaque, state, keys, keys)
    if not (is_count(state["numel"]) and is_count(state["start"])):
        raise NotVetted
    return VettedObject(opaque.cls, state)


def _zero_stage(ctx: Context, ref: GlobalRef, args: tuple[Any, ...]) -> VettedObject:
    # An int enum: ZeroStageEnum(n) with n in disabled=0 .. weights=3.
    if len(args) != 1 or type(args[0]) is not int or not 0 <= args[0] <= 3:
        raise NotVetted
    return VettedObject(ref, args=args)


# torch.distributed.checkpoint's ``.metadata`` (resharding.md §2.2): plain dataclasses and an int
# enum, built with NEWOBJ + BUILD or a call with one int, and the pathlib path FileSystemWriter
# records as its checkpoint_id (Python 3.13 moved the classes to pathlib._local). Building one
# runs no code the file chooses, so reports need not flag them; they stay Opaque nodes (formats/dcp
# reads their state), and ckptkit.integrations.dcp unpickles ``.metadata`` with these alone.
_PATHLIB = ("pathlib", "pathlib._local")
DCP_METADATA_CLASSES = frozenset(
    [
        ref(f"torch.distributed.checkpoint.metadata.{name}")
        for name in (
            "Metadata",
            "MetadataIndex",
            "StorageMeta",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "TensorProperties",
            "_MEM_FORMAT_ENCODING",
        )
    ]
    + [ref("torch.distributed.checkpoint.filesystem._StorageInfo")]
    + [ref(f"{module}.{cls}") for module in _PATHLIB for cls in ("PosixPath", "PurePosixPath")]
)

_OWN: dict[GlobalRef, Entry] = {
    **{cls: Entry() for cls in DCP_METADATA_CLASSES},
    ref("builtins.set"): Entry(reduce=_set),
    ref("builtins.frozenset"): Entry(reduce=_frozenset),
    ref("builtins.bytes"): Entry(reduce=_bytes),
    ref("builtins.bytearray"): Entry(reduce=_bytearray),
    ref("builtins.complex"): Entry(reduce=_complex),
    ref("builtins.slice"): Entry(reduce=_slice),
    OBJECT: Entry(),
    ref("_codecs.encode"): Entry(reduce=_codecs_encode),
    ref("copyreg._reconstructor"): Entry(reduce=_reconstructor),
    ref("copyreg.__newobj__"): Entry(reduce=_newobj),
    ref("collections.OrderedDict"): Entry(reduce=_ordered_dict),
    ref("collections.Counter"): Entry(reduce=_counter),
    ref("collections.defaultdict"): Entry(reduce=_defaultdict),
    ref("deepspeed.runtime.zero.config.ZeroStageEnum"): Entry(reduce=_zero_stage),
    ref("deepspeed.runtime.fp16.loss_scaler.LossScaler"): Entry(build=_loss_scaler),
    ref("deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"): Entry(build=_dynamic_loss_scaler),
    ref("deepspeed.utils.tensor_fragment.fragment_address"): Entry(build=_fragment_address),
}

TABLE: dict[GlobalRef, Entry] = {**torch_refs.ENTRIES, **numpy_refs.ENTRIES, **_OWN}
_FAMILY = Entry()  # dtypes and storage classes: values, never called


def lookup(ref: GlobalRef) -> Entry | None:
    """The vetted entry for ``ref``, or None if it is not vetted."""
    entry = TABLE.get(ref)
    if entry is None and (torch_refs.is_torch_family(ref) or numpy_refs.is_numpy_family(ref)):
        return _FAMILY
    return entry
