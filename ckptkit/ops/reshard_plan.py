"""A ZeRO checkpoint as per-parameter byte ranges, and its rank files for another world size.

:func:`read_zero` reads every rank file of a DeepSpeed ZeRO-1/2/3 tag directory symbolically
(nothing is unpickled) and describes each trainable parameter's fp32 master and each
per-element optimizer state (``exp_avg``, ``exp_avg_sq``, or whatever the torch optimizer keeps
per element) as :class:`~ckptkit.ops.tensor_io.Piece` lists: byte ranges in the source files,
in the parameter's element order. :func:`rank_trees` then cuts those ranges the way DeepSpeed
cuts them at world size M (:mod:`ckptkit.formats.zero`) and returns each new rank file as a
pickle tree whose tensors stream their bytes from the source when written: nothing is held but
the trees (kilobytes) and one read chunk.

Everything else is carried from rank 0's files unchanged (loss scaler, clip_grad, step,
param_groups, LR scheduler, global_steps/global_samples/skipped_steps, client_state, buffers,
frozen params, tied-weight records, ds_config) after checking every rank agrees; the fields
that depend on the world size are recomputed: ``partition_count``, ``group_paddings``,
``param_slice_mappings``, ``dp_world_size`` and, at ZeRO-3, the frozen-parameter fragments.

Out of scope, refused with a FormatError naming the reason: tensor or pipeline parallelism
(``mp_rank`` > 0), MoE expert files, ``parameter_alignment``, ``round_robin_gradients``,
elastic checkpoints, AutoEP partition groups, the BF16_Optimizer layout, and ZeRO-3 layouts
whose sub-group boundaries would move at the new world size.
"""

from __future__ import annotations

import posixpath
import re
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from ckptkit.errors import FormatError
from ckptkit.formats.deepspeed import tag_files
from ckptkit.formats.dtypes import torch_itemsize
from ckptkit.formats.pickle_writer import StoredTensor
from ckptkit.formats.torchfile import read_torch_file
from ckptkit.formats.zero import (
    flat_group_padding,
    flat_partition_numel,
    flat_partition_span,
    param_partition_numel,
    param_partition_span,
)
from ckptkit.ops.consolidate import contiguous_piece, find_tag_directory, zero_stage_of
from ckptkit.ops.inspect.values import as_tensor
from ckptkit.ops.tensor_io import Piece, read_pieces
from ckptkit.pickle import GlobalRef, Opaque, TensorRef, VettedObject
from ckptkit.storage import Store
from ckptkit.storage.target import resolve_target

FP32 = "fp32"  # the name of the master weights among a parameter's states
FRAGMENT_ADDRESS = GlobalRef("deepspeed.utils.tensor_fragment", "fragment_address")
_RANK = re.compile(r"zero_pp_rank_(\d+)_mp_rank_(\d+)_")
_MOE = re.compile(r"(^|_)expp?_rank_|_expert_\d+_")
# Per-rank fields of a ZeRO-1/2 optimizer file every rank must agree on (resharding.md §1.1).
_SHARED_12 = (
    "loss_scaler",
    "dynamic_loss_scale",
    "overflow",
    "clip_grad",
    "zero_stage",
    "partition_count",
    "ds_version",
    "param_alignment_paddings",
)
_SHARED_3 = ("loss_scaler", "dynamic_loss_scale", "overflow", "zero_stage", "partition_count")


@dataclass
class ParamState:
    """One trainable parameter: each state (``fp32`` and the optimizer's per-element ones) as
    pieces covering its ``numel`` float32 elements in order."""

    name: str
    shape: tuple[int, ...]
    numel: int
    states: dict[str, list[Piece]] = field(default_factory=dict)


@dataclass
class Group:
    """A param group (ZeRO-1/2) or sub-group (ZeRO-3): its params in flattening order, the
    per-element optimizer states it has, and its 0-d (or otherwise whole) optimizer tensors."""

    params: list[ParamState]
    state_keys: list[str]

    @property
    def numel(self) -> int:
        return sum(p.numel for p in self.params)


@dataclass
class ZeroCheckpoint:
    """A ZeRO tag directory, read for resharding."""

    store: Store  # the tag directory
    tag: str
    stage: int
    world_size: int
    optim_names: list[str]  # per rank, natural order
    model_names: list[str]  # per rank at ZeRO-3; [mp_rank_00_model_states.pt] at 1/2
    optim_trees: list[Any]
    model_trees: list[Any]
    groups: list[Group]
    frozen: dict[str, tuple[tuple[int, ...], str, list[Piece]]]  # ZeRO-3: name -> shape, dtype, pieces
    optim_prefix: str  # "bf16_" or ""
    save_dir: Store | None = None  # the save dir around the tag, when SRC named it

    @property
    def osd(self) -> dict[str, Any]:
        """Rank 0's ``optimizer_state_dict``."""
        return self.optim_trees[0]["optimizer_state_dict"]

    @property
    def model_states(self) -> dict[str, Any]:
        return self.model_trees[0]

    @property
    def params(self) -> Iterator[ParamState]:
        for group in self.groups:
            yield from group.params

    def optim_name(self, rank: int) -> str:
        return f"{self.optim_prefix}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"

    def model_name(self, rank: int) -> str:
        return (
            f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt"
            if self.stage == 3
            else "mp_rank_00_model_states.pt"
        )


# --- reading ----------------------------------------------------------------------------------------


def read_zero(src: str | Store, *, tag: str | None = None, **storage_options: Any) -> ZeroCheckpoint:
    """Read the ZeRO tag directory ``src`` (a save dir holding ``latest``, or the tag directory)."""
    found = resolve_target(src, **storage_options)
    if found.key is not None:
        raise FormatError(f"{found.url}: a file; reshard reads a DeepSpeed save dir or tag directory")
    tag_key, names = find_tag_directory(found.store, tag)
    store = found.store.child(tag_key) if tag_key else found.store
    tag_name = tag_key or posixpath.basename(store.url.rstrip("/"))
    _refuse_out_of_scope(store, names)
    files = tag_files(names)
    optim = files.optim_states
    if not optim or not files.model_states:
        raise FormatError(
            f"{store.url}: not a DeepSpeed ZeRO tag directory (no optimizer or model-states files)"
        )
    optim_trees = [_read_tree(store, k) for k in optim]
    osds = [t.get("optimizer_state_dict") if isinstance(t, dict) else None for t in optim_trees]
    if not all(isinstance(o, dict) for o in osds):
        raise FormatError(f"{store.url}: an optimizer file has no optimizer_state_dict: not ZeRO")
    stage = zero_stage_of(osds[0].get("zero_stage"))
    if stage is None and "single_partition_of_fp32_groups" in osds[0]:
        raise FormatError(
            f"{store.url}: the BF16_Optimizer layout (no zero_stage) is not supported by reshard"
        )
    if stage not in (1, 2, 3):
        raise FormatError(f"{store.url}: unsupported ZeRO stage {stage!r}")
    world = _check_ranks(store, optim, osds[0].get("partition_count"))
    prefix = optim[0][: optim[0].index("zero_pp_rank_")]
    if stage == 3:
        models = [n for n in files.model_states if _RANK.search(n)]
        if len(models) != world:
            raise FormatError(
                f"{store.url}: ZeRO-3 needs one model-states file per rank ({world}), found {len(models)}"
            )
    else:
        models = [n for n in files.model_states if n == "mp_rank_00_model_states.pt"]
        if not models:
            raise FormatError(f"{store.url}: mp_rank_00_model_states.pt is missing")
    model_trees = [_read_tree(store, k) for k in models]
    shapes = model_trees[0].get("param_shapes")
    if not isinstance(shapes, list) or not all(isinstance(g, dict) for g in shapes):
        raise FormatError(f"{store.url}/{models[0]}: no param_shapes list")
    _check_agreement(store, optim, osds, _SHARED_3 if stage == 3 else _SHARED_12)
    _check_steps_agree(store, optim, osds, stage)
    if stage == 3:
        _check_agreement(store, models, model_trees, ("global_steps", "global_samples", "skipped_steps"))
    ckpt = ZeroCheckpoint(
        store,
        tag_name,
        stage,
        world,
        optim,
        models,
        optim_trees,
        model_trees,
        [],
        {},
        prefix,
        save_dir=found.store if tag_key else None,
    )
    if stage == 3:
        _read_stage3(ckpt, shapes, osds)
    else:
        _read_stage12(ckpt, shapes, osds)
    return ckpt


def _read_tree(store: Store, key: str) -> Any:
    return read_torch_file(store, key).value


def _refuse_out_of_scope(store: Store, names: list[str]) -> None:
    for name in names:
        if _MOE.search(name):
            raise FormatError(f"{store.url}/{name}: MoE expert files are not supported by reshard")
        match = _RANK.search(name) or re.search(r"mp_rank_(\d+)_model_states", name)
        if match and int(match.groups()[-1]) > 0:
            raise FormatError(
                f"{store.url}/{name}: tensor or pipeline parallelism (mp_rank > 0) is not supported "
                "by reshard"
            )


def _check_ranks(store: Store, optim: list[str], count: Any) -> int:
    world = max(count) if isinstance(count, list) and count else count
    if type(world) is not int or world < 1:
        raise FormatError(f"{store.url}: unreadable partition_count {count!r}")
    ranks = [int(m.group(1)) if (m := _RANK.search(n)) else None for n in optim]
    if ranks != list(range(world)):
        missing = sorted(set(range(world)) - {r for r in ranks if r is not None})
        detail = f"rank file(s) {missing} missing" if missing else f"unexpected files {', '.join(optim)}"
        raise FormatError(
            f"{store.url}: partition count is {world} but the optimizer files are not ranks 0..{world - 1}: "
            f"{detail}"
        )
    return world


def _check_agreement(
    store: Store, optim: list[str], osds: list[dict[str, Any]], keys: tuple[str, ...]
) -> None:
    for key in keys:
        for name, osd in zip(optim[1:], osds[1:], strict=True):
            if osd.get(key) != osds[0].get(key):
                raise FormatError(
                    f"{store.url}: {name} and {optim[0]} disagree on {key}: files of different saves "
                    "are mixed"
                )


def _check_steps_agree(store: Store, optim: list[str], osds: list[dict[str, Any]], stage: int) -> None:
    """Every rank holds the same torch optimizer ``param_groups`` and whole-tensor states (``step``).
    With a static loss scale, rank files of two saves of one run differ in nothing else that
    ``_check_agreement`` sees, so this is what tells them apart."""
    inner = "optimizer_state_dict" if stage == 3 else "base_optimizer_state"
    bases = [osd.get(inner) if isinstance(osd.get(inner), dict) else {} for osd in osds]
    _check_agreement(store, optim, bases, ("param_groups",))
    values = [_whole_states(store, name, base.get("state")) for name, base in zip(optim, bases, strict=True)]
    for name, value in zip(optim[1:], values[1:], strict=True):
        if value != values[0]:
            raise FormatError(
                f"{store.url}: {name} and {optim[0]} disagree on the optimizer step: files of different "
                "saves are mixed"
            )


def _whole_states(store: Store, name: str, state: Any) -> dict[tuple[Any, Any], tuple[str, bytes]]:
    """(group, key) -> (dtype, bytes) of each 0-d optimizer state tensor of one rank file."""
    out = {}
    for g, entry in (state.items() if isinstance(state, dict) else ()):
        for key, value in (entry.items() if isinstance(entry, dict) else ()):
            ref = as_tensor(value)
            if ref is not None and len(ref.shape) == 0:
                piece = contiguous_piece(name, ref, f"{key} of group {g}")
                data = b"".join(read_pieces(store, [piece], torch_itemsize(ref.dtype) or 1))
                out[g, key] = (ref.dtype, data)
    return out


def _tensor(value: Any, where: str) -> TensorRef:
    ref = as_tensor(value)
    if ref is None:
        raise FormatError(f"{where}: not a tensor")
    return ref


def _flat(store: Store, name: str, value: Any, where: str) -> Piece:
    ref = _tensor(value, f"{name}: {where}")
    if ref.dtype != "float32" or len(ref.shape) != 1:
        raise FormatError(f"{store.url}/{name}: {where} is not a 1-D float32 tensor")
    return contiguous_piece(name, ref, where)


def _take(pieces: list[Piece], start: int, count: int) -> list[Piece]:
    """Elements ``[start, start + count)`` of the vector the pieces form (float32)."""
    out, base = [], 0
    for p in pieces:
        lo, hi = max(start, base), min(start + count, base + p.numel)
        if lo < hi:
            out.append(Piece(p.key, p.offset + (lo - base) * 4 if p.key else 0, hi - lo))
        base += p.numel
    if sum(p.numel for p in out) != count:
        raise FormatError(
            f"elements [{start}, {start + count}) lie past the end of a {base}-element partition"
        )
    return out


def _per_element_keys(store: Store, name: str, state: Any, length: int, where: str) -> list[str]:
    """The optimizer states of one flat partition that are per element (length ``length``);
    whole tensors (``step``) are carried as they are. Anything else cannot be re-cut."""
    if not isinstance(state, dict):
        raise FormatError(f"{store.url}/{name}: {where} is not a dict")
    keys = []
    for key, value in state.items():
        ref = as_tensor(value)
        if ref is None or len(ref.shape) == 0:
            continue
        if ref.dtype != "float32" or ref.shape != (length,):
            raise FormatError(
                f"{store.url}/{name}: {where}[{key!r}] has shape {list(ref.shape)} ({ref.dtype}); "
                f"a per-element state of this partition would be [{length}] float32"
            )
        keys.append(key)
    return keys


def _read_stage12(ckpt: ZeroCheckpoint, shapes: list[Any], osds: list[dict[str, Any]]) -> None:
    store, world = ckpt.store, ckpt.world_size
    config = ckpt.optim_trees[0].get("ds_config")
    zero_config = config.get("zero_optimization") if isinstance(config, dict) else None
    if isinstance(zero_config, dict) and zero_config.get("round_robin_gradients"):
        raise FormatError(
            f"{store.url}: round_robin_gradients orders parameters by rank, so the layout changes with "
            "the world size: not supported by reshard"
        )
    for paddings in osds[0].get("param_alignment_paddings") or []:
        if any(paddings if isinstance(paddings, list) else [paddings]):
            raise FormatError(f"{store.url}: parameter_alignment padding is not supported by reshard")
    for name, osd in zip(ckpt.optim_names, osds, strict=True):
        base = osd.get("base_optimizer_state")
        if not isinstance(base, dict) or not isinstance(base.get("state"), dict):
            raise FormatError(
                f"{store.url}/{name}: base_optimizer_state is not the rigid form (elastic_checkpoint?): "
                "not supported by reshard"
            )
    for g, group_shapes in enumerate(shapes):
        params = [ParamState(n, tuple(s), _numel(s)) for n, s in group_shapes.items()]
        total = sum(p.numel for p in params)
        padded = flat_partition_numel(total, world)
        vectors: dict[str, list[Piece]] = {FP32: []}
        state_keys: list[str] | None = None
        for r, (name, osd) in enumerate(zip(ckpt.optim_names, osds, strict=True)):
            start, end = flat_partition_span(total, world, r)
            lean = end - start
            try:
                fp32 = _flat(
                    store, name, osd["single_partition_of_fp32_groups"][g], f"fp32 partition of group {g}"
                )
            except (KeyError, IndexError, TypeError):
                raise FormatError(f"{store.url}/{name}: no fp32 partition for param group {g}") from None
            if fp32.numel not in (lean, padded):
                raise FormatError(
                    f"{store.url}/{name}: the fp32 partition of group {g} holds {fp32.numel} elements; "
                    f"params of {total} elements over {world} ranks give this rank {lean}: "
                    "the partitions do not cover the parameters"
                )
            vectors[FP32].append(replace(fp32, numel=lean))
            state = osd["base_optimizer_state"]["state"].get(g, {})
            keys = _per_element_keys(store, name, state, padded, f"optimizer state of group {g}")
            if state_keys is None:
                state_keys = keys
            elif keys != state_keys:
                raise FormatError(
                    f"{store.url}/{name}: group {g} has optimizer states {keys}, rank 0 {state_keys}"
                )
            for key in keys:
                piece = _flat(store, name, state[key], f"{key} of group {g}")
                vectors.setdefault(key, []).append(replace(piece, numel=lean))
        offset = 0
        for p in params:
            p.states = {k: _take(v, offset, p.numel) for k, v in vectors.items()}
            offset += p.numel
        ckpt.groups.append(Group(params, state_keys or []))


def _read_stage3(ckpt: ZeroCheckpoint, shapes: list[Any], osds: list[dict[str, Any]]) -> None:
    store, world = ckpt.store, ckpt.world_size
    if any(osd.get("ds_zero_partition_groups") is not None for osd in osds):
        raise FormatError(
            f"{store.url}: AutoEP partition groups (ds_zero_partition_groups) are not supported"
        )
    for g, group_shapes in enumerate(shapes):
        params = [ParamState(n, tuple(s), _numel(s)) for n, s in group_shapes.items()]
        flat_len = sum(param_partition_numel(p.numel, world) for p in params)
        vectors: list[dict[str, Piece]] = []
        state_keys: list[str] | None = None
        for name, osd in zip(ckpt.optim_names, osds, strict=True):
            try:
                fp32 = _flat(store, name, osd["fp32_flat_groups"][g], f"fp32 flat group {g}")
                inner = osd["optimizer_state_dict"]["state"]
            except (KeyError, IndexError, TypeError):
                raise FormatError(
                    f"{store.url}/{name}: no fp32 flat group / optimizer state for sub-group {g}"
                ) from None
            if fp32.numel != flat_len:
                raise FormatError(
                    f"{store.url}/{name}: fp32 flat group {g} holds {fp32.numel} elements, its params need "
                    f"{flat_len}: the partitions do not cover the parameters"
                )
            state = inner.get(g, {}) if isinstance(inner, dict) else {}
            keys = _per_element_keys(store, name, state, flat_len, f"optimizer state of sub-group {g}")
            if state_keys is None:
                state_keys = keys
            elif keys != state_keys:
                raise FormatError(f"{store.url}/{name}: sub-group {g} has states {keys}, rank 0 {state_keys}")
            vectors.append(
                {FP32: fp32, **{k: _flat(store, name, state[k], f"{k} of sub-group {g}") for k in keys}}
            )
        offset = 0
        for p in params:
            part = param_partition_numel(p.numel, world)
            for key in vectors[0]:
                pieces = [piece for v in vectors for piece in _take([v[key]], offset, part)]
                p.states[key] = _take(pieces, 0, p.numel)
            offset += part
        ckpt.groups.append(Group(params, state_keys or []))
    _read_frozen3(ckpt)


def _read_frozen3(ckpt: ZeroCheckpoint) -> None:
    shapes = ckpt.model_states.get("frozen_param_shapes")
    if not isinstance(shapes, dict):
        return
    for name, shape in shapes.items():
        numel = _numel(shape)
        pieces, dtype = [], None
        for key, tree in zip(ckpt.model_names, ckpt.model_trees, strict=True):
            ref = as_tensor((tree.get("frozen_param_fragments") or {}).get(name))
            if ref is None:
                raise FormatError(f"{ckpt.store.url}/{key}: frozen param {name} has no fragment")
            dtype = dtype or ref.dtype
            pieces.append(contiguous_piece(key, ref, name))
        itemsize = torch_itemsize(dtype or "float32") or 4
        ckpt.frozen[name] = (tuple(shape), dtype or "float32", _take_bytes(pieces, numel, itemsize))


def _take_bytes(pieces: list[Piece], numel: int, itemsize: int) -> list[Piece]:
    """The first ``numel`` elements of pieces of any dtype (the frozen fragments keep theirs)."""
    out, left = [], numel
    for p in pieces:
        n = min(p.numel, left)
        if n:
            out.append(Piece(p.key, p.offset, n))
        left -= n
    if left:
        raise FormatError(f"fragments hold {numel - left} of {numel} elements ({itemsize}-byte)")
    return out


def _numel(shape: Any) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


# --- the rank files at a new world size ----------------------------------------------------------


class SourceTensors:
    """StoredTensors that stream from the source: one per distinct source tensor (so a tied
    weight stays one storage), and new ones cut from pieces. ``reads`` lists every source byte
    range they will read, ``(key, start, end)``, so a loader can check those bytes first."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.reads: list[tuple[str, int, int]] = []
        self._copies: dict[tuple[Any, ...], StoredTensor] = {}

    def copy(self, key: str, ref: TensorRef) -> StoredTensor:
        ident = (key, ref.storage.key, ref.storage_offset, ref.shape, ref.stride, ref.dtype)
        if ident not in self._copies:
            piece = contiguous_piece(key, ref, f"tensor in storage {ref.storage.key}")
            self._copies[ident] = self.cut(ref.dtype, ref.shape, [piece], ref.requires_grad)
        return self._copies[ident]

    def cut(
        self, dtype: str, shape: tuple[int, ...], pieces: list[Piece], requires_grad: bool = False
    ) -> StoredTensor:
        itemsize = torch_itemsize(dtype)
        if itemsize is None:
            raise FormatError(f"unknown dtype {dtype!r}")
        self.reads += [(p.key, p.offset, p.offset + p.numel * itemsize) for p in pieces if p.key]
        store = self.store
        return StoredTensor(
            dtype, tuple(shape), lambda: stream_pieces(store, pieces, itemsize), requires_grad
        )


def stream_pieces(store: Store, pieces: list[Piece], itemsize: int) -> Iterator[bytes]:
    """The pieces' bytes in bounded ranged reads; a piece with no key is that many zeros."""
    run: list[Piece] = []
    for p in pieces:
        if p.key:
            run.append(p)
            continue
        if run:
            yield from read_pieces(store, run, itemsize)
            run = []
        for start in range(0, p.numel * itemsize, 16 << 20):
            yield bytes(min(16 << 20, p.numel * itemsize - start))
    if run:
        yield from read_pieces(store, run, itemsize)


def _zeros(n: int) -> list[Piece]:
    return [Piece("", 0, n)] if n else []


def _rebuild(value: Any, on_tensor: Callable[[TensorRef], StoredTensor]) -> Any:
    """A copy of a symbolic tree with every tensor replaced (containers keep their types)."""
    kind = type(value)
    if kind is TensorRef:
        return on_tensor(value)
    if isinstance(value, dict):
        out = OrderedDict() if kind is OrderedDict else {} if kind is dict else kind()
        for k, v in value.items():
            out[k] = _rebuild(v, on_tensor)
        return out
    if isinstance(value, list):
        return [_rebuild(v, on_tensor) for v in value]
    if isinstance(value, tuple):
        items = [_rebuild(v, on_tensor) for v in value]
        return tuple(items) if kind is tuple else kind(items)
    if kind is VettedObject:
        return VettedObject(
            value.cls, _rebuild(value.state, on_tensor), tuple(_rebuild(a, on_tensor) for a in value.args)
        )
    if kind is Opaque:
        return replace(
            value,
            args=tuple(_rebuild(a, on_tensor) for a in value.args),
            state=_rebuild(value.state, on_tensor),
            items=[_rebuild(v, on_tensor) for v in value.items],
            setitems=[(k, _rebuild(v, on_tensor)) for k, v in value.setitems],
        )
    return value


def _copy_tree(ckpt: ZeroCheckpoint, tensors: SourceTensors, key: str, tree: Any) -> Any:
    return _rebuild(tree, lambda ref: tensors.copy(key, ref))


def rank_trees(
    ckpt: ZeroCheckpoint, world: int, tensors: SourceTensors | None = None
) -> dict[str, Callable[[], Any]]:
    """The rank files of ``ckpt`` resharded to ``world`` ranks: file name -> a function making
    its tree (made on demand, one file at a time, so a rank loading on the fly builds only its own)."""
    if ckpt.stage == 3:
        _check_sub_groups(ckpt, world)
    tensors = tensors or SourceTensors(ckpt.store)
    files: dict[str, Callable[[], Any]] = {}
    for r in range(world):
        if ckpt.stage == 3:
            files[ckpt.model_name(r)] = lambda r=r: _model_tree3(ckpt, tensors, world, r)
        files[ckpt.optim_name(r)] = lambda r=r: _optim_tree(ckpt, tensors, world, r)
    if ckpt.stage != 3:
        files[ckpt.model_name(0)] = lambda: _model_tree12(ckpt, tensors, world)
    return files


def _check_sub_groups(ckpt: ZeroCheckpoint, world: int) -> None:
    """ZeRO-3 closes a sub-group once its params' partitions reach ``sub_group_size`` elements;
    partitions grow as the world shrinks, so the boundaries can move. Refuse when they would."""
    config = ckpt.optim_trees[0].get("ds_config")
    zero_config = (config.get("zero_optimization") if isinstance(config, dict) else None) or {}
    size = (
        zero_config.get("sub_group_size", 1_000_000_000) if isinstance(zero_config, dict) else 1_000_000_000
    )
    param_groups = ckpt.osd["optimizer_state_dict"].get("param_groups") or []
    for pg in param_groups:
        members = pg.get("params") if isinstance(pg, dict) else None
        if not isinstance(members, list) or not all(type(m) is int and m < len(ckpt.groups) for m in members):
            raise FormatError(f"{ckpt.store.url}: ZeRO-3 param_groups do not list sub-group indices")
        params = [p for m in members for p in ckpt.groups[m].params]
        saved = [len(ckpt.groups[m].params) for m in members]
        if _sub_group_sizes(params, world, size) != saved:
            raise FormatError(
                f"{ckpt.store.url}: at {world} ranks ZeRO-3 would split param group into sub-groups of "
                f"{_sub_group_sizes(params, world, size)} params, not {saved} (sub_group_size {size}): "
                "not supported by reshard"
            )


def _sub_group_sizes(params: list[ParamState], world: int, size: int | None) -> list[int]:
    """Params per sub-group as DeepSpeed's ``_create_fp16_sub_groups`` cuts them."""
    partitions = [param_partition_numel(p.numel, world) for p in params]
    if size is None or size >= sum(partitions):
        return [len(params)]
    counts, count, held = [], 0, 0
    for i, n in enumerate(partitions):
        count, held = count + 1, held + n
        if held >= size or i == len(partitions) - 1:
            counts.append(count)
            count, held = 0, 0
    return counts


def _model_tree12(ckpt: ZeroCheckpoint, tensors: SourceTensors, world: int) -> Any:
    tree = _copy_tree(ckpt, tensors, ckpt.model_names[0], ckpt.model_states)
    tree["dp_world_size"] = world
    return tree


def _model_tree3(ckpt: ZeroCheckpoint, tensors: SourceTensors, world: int, rank: int) -> Any:
    tree = _copy_tree(ckpt, tensors, ckpt.model_names[0], ckpt.model_states)
    tree["dp_world_size"] = world
    if rank > 0 and isinstance(tree.get("shared_params"), dict):
        tree["shared_params"] = {}  # DeepSpeed records tied weights on rank 0 only (_get_shared_params)
    fragments = tree.get("frozen_param_fragments")
    if isinstance(fragments, dict):
        for name, (shape, dtype, pieces) in ckpt.frozen.items():
            numel = _numel(shape)
            part = param_partition_numel(numel, world)
            start, end = param_partition_span(numel, world, rank)
            itemsize = torch_itemsize(dtype) or 4
            cut = _cut_bytes(pieces, start, end - start, itemsize) + _zeros(part - (end - start))
            fragments[name] = tensors.cut(dtype, (part,), cut)
    return tree


def _cut_bytes(pieces: list[Piece], start: int, count: int, itemsize: int) -> list[Piece]:
    out, base = [], 0
    for p in pieces:
        lo, hi = max(start, base), min(start + count, base + p.numel)
        if lo < hi:
            out.append(Piece(p.key, p.offset + (lo - base) * itemsize, hi - lo))
        base += p.numel
    return out


def _optim_tree(ckpt: ZeroCheckpoint, tensors: SourceTensors, world: int, rank: int) -> Any:
    tree = _copy_tree(ckpt, tensors, ckpt.optim_names[0], ckpt.optim_trees[0])
    osd = tree["optimizer_state_dict"]
    if ckpt.stage == 3:
        _optim_state3(ckpt, tensors, osd, world, rank)
    else:
        _optim_state12(ckpt, tensors, osd, world, rank)
    return tree


def _requires_grad(master: Any) -> bool:
    """Whether the source saved this fp32 master partition with ``requires_grad`` set, as DeepSpeed
    does (the partitions are the optimizer's leaf tensors): the new partition keeps the flag."""
    ref = as_tensor(master)
    return ref is not None and ref.requires_grad


def _group_vector(group: Group, key: str) -> list[Piece]:
    return [piece for p in group.params for piece in p.states[key]]


def _optim_state12(
    ckpt: ZeroCheckpoint, tensors: SourceTensors, osd: dict[str, Any], world: int, rank: int
) -> None:
    fp32, paddings, mappings = [], [], []
    states = osd["base_optimizer_state"]["state"]
    masters = ckpt.osd["single_partition_of_fp32_groups"]
    for g, group in enumerate(ckpt.groups):
        total = group.numel
        start, end = flat_partition_span(total, world, rank)
        padding = flat_group_padding(total, world, rank)
        pieces = _take(_group_vector(group, FP32), start, end - start)
        fp32.append(tensors.cut("float32", (end - start,), pieces, _requires_grad(masters[g])))
        for key in group.state_keys:
            pieces = _take(_group_vector(group, key), start, end - start) + _zeros(padding)
            states[g][key] = tensors.cut("float32", (end - start + padding,), pieces)
        paddings.append(padding)
        mappings.append(_slice_mappings(group, start, end))
    osd["single_partition_of_fp32_groups"] = fp32
    osd["group_paddings"] = paddings
    osd["partition_count"] = [world] * len(ckpt.groups)
    osd["param_slice_mappings"] = mappings


def _slice_mappings(group: Group, start: int, end: int) -> OrderedDict[str, VettedObject]:
    """``name -> fragment_address(numel, start)`` for the params overlapping ``[start, end)``,
    ``start`` being the fragment's offset inside the rank's partition (formats.md §10.4)."""
    out: OrderedDict[str, VettedObject] = OrderedDict()
    offset = 0
    for p in group.params:
        lo, hi = max(offset, start), min(offset + p.numel, end)
        if lo < hi:
            out[p.name] = VettedObject(FRAGMENT_ADDRESS, {"numel": hi - lo, "start": lo - start})
        offset += p.numel
    return out


def _optim_state3(
    ckpt: ZeroCheckpoint, tensors: SourceTensors, osd: dict[str, Any], world: int, rank: int
) -> None:
    states = osd["optimizer_state_dict"]["state"]
    flat = []
    for g, group in enumerate(ckpt.groups):
        cut: dict[str, list[Piece]] = {key: [] for key in [FP32, *group.state_keys]}
        for p in group.params:
            part = param_partition_numel(p.numel, world)
            start, end = param_partition_span(p.numel, world, rank)
            for key in cut:
                cut[key] += _take(p.states[key], start, end - start) + _zeros(part - (end - start))
        length = sum(param_partition_numel(p.numel, world) for p in group.params)
        grad = _requires_grad(ckpt.osd["fp32_flat_groups"][g])
        flat.append(tensors.cut("float32", (length,), cut[FP32], grad))
        for key in group.state_keys:
            states[g][key] = tensors.cut("float32", (length,), cut[key])
    osd["fp32_flat_groups"] = flat
    osd["partition_count"] = world
