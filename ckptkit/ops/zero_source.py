"""A DeepSpeed ZeRO tag directory read for resharding: every parameter as byte ranges.

:func:`read_zero` reads every rank file of a ZeRO-1/2/3 tag directory symbolically (nothing is
unpickled) and describes each trainable parameter's fp32 master and each per-element optimizer
state (``exp_avg``, ``exp_avg_sq``, or whatever the torch optimizer keeps per element) as
:class:`~ckptkit.ops.tensor_io.Piece` lists: byte ranges in the source files, in the parameter's
element order, wherever the saved partitions cut it (:mod:`ckptkit.formats.zero`).

Before anything is described, every rank must agree on what resume needs to be global (loss
scaler, clip_grad, stage, partition count, step, param groups): files of different saves mixed
in one tag directory are refused. So is what is out of scope, each with a FormatError naming
the reason: tensor or pipeline parallelism (``mp_rank`` > 0), MoE expert files,
``parameter_alignment``, ``round_robin_gradients``, elastic checkpoints, AutoEP partition
groups and the BF16_Optimizer layout.
"""


from __future__ import annotations

import posixpath
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from ckptkit.errors import FormatError
from ckptkit.formats.deepspeed import tag_files
from ckptkit.formats.dtypes import torch_itemsize
from ckptkit.formats.torchfile import read_torch_file
from ckptkit.formats.zero import (
    flat_partition_numel,
    flat_partition_span,
    param_partition_numel,
)
from ckptkit.ops.consolidate import contiguous_piece, find_tag_directory, zero_stage_of
from ckptkit.ops.inspect.values import as_tensor
from ckptkit.ops.tensor_io import Piece, read_pieces, slice_pieces
from ckptkit.pickle import TensorRef
from ckptkit.storage import Store
from ckptkit.storage.target import resolve_target

FP32 = "fp32"  # the name of the master weights among a parameter's states
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
            p.states = {k: slice_pieces(v, offset, p.numel, 4) for k, v in vectors.items()}
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
                pieces = [piece for v in vectors for piece in slice_pieces([v[key]], offset, part, 4)]
                p.states[key] = slice_pieces(pieces, 0, p.numel, 4)
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
        ckpt.frozen[name] = (tuple(shape), dtype or "float32", _whole(pieces, numel, itemsize, name))


def _whole(pieces: list[Piece], numel: int, itemsize: int, name: str) -> list[Piece]:
    """The first ``numel`` elements of a frozen param's fragments (the tail rank's is padded)."""
    if sum(p.numel for p in pieces) < numel:
        raise FormatError(f"frozen param {name}: its fragments hold fewer than its {numel} elements")
    return slice_pieces(pieces, 0, numel, itemsize)


def _numel(shape: Any) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n
