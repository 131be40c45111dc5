"""The rank files of a ZeRO checkpoint at another world size, as pickle trees that stream.

:func:`rank_trees` cuts each parameter's byte ranges (:mod:`ckptkit.ops.zero_source`) the way
DeepSpeed cuts them at world size M (:mod:`ckptkit.formats.zero`) and returns each new rank file
as a pickle tree whose tensors stream their bytes from the source when written
(:func:`ckptkit.formats.torch_writer.torch_tree_chunks`): nothing is held but the trees
(kilobytes) and one read chunk.

Everything else is carried from the saved files unchanged (loss scaler, clip_grad, step,
param_groups, LR scheduler, global_steps/global_samples/skipped_steps, client_state, buffers,
frozen params, tied-weight records, ds_config); the fields that depend on the world size are
recomputed: ``partition_count``, ``group_paddings``, ``param_slice_mappings``,
``dp_world_size`` and, at ZeRO-3, the frozen-parameter fragments. A ZeRO-3 checkpoint whose
sub-group boundaries (``sub_group_size``) would move at M is refused.
"""


from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from ckptkit.errors import FormatError
from ckptkit.formats.dtypes import torch_itemsize
from ckptkit.formats.pickle_writer import StoredTensor
from ckptkit.formats.zero import (
    flat_group_padding,
    flat_partition_span,
    param_partition_numel,
    param_partition_span,
)
from ckptkit.ops.consolidate import contiguous_piece
from ckptkit.ops.inspect.values import as_tensor
from ckptkit.ops.tensor_io import Piece, read_pieces, slice_pieces
from ckptkit.ops.zero_source import FP32, Group, ParamState, ZeroCheckpoint
from ckptkit.pickle import GlobalRef, Opaque, TensorRef, VettedObject
from ckptkit.storage import Store

FRAGMENT_ADDRESS = GlobalRef("deepspeed.utils.tensor_fragment", "fragment_address")


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
            dtype, tuple(shape), lambda: read_pieces(store, pieces, itemsize), requires_grad
        )


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
            numel = math.prod(shape)
            part = param_partition_numel(numel, world)
            start, end = param_partition_span(numel, world, rank)
            itemsize = torch_itemsize(dtype) or 4
            cut = slice_pieces(pieces, start, end - start, itemsize) + _zeros(part - (end - start))
            fragments[name] = tensors.cut(dtype, (part,), cut)
    return tree


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
        pieces = slice_pieces(_group_vector(group, FP32), start, end - start, 4)
        fp32.append(tensors.cut("float32", (end - start,), pieces, _requires_grad(masters[g])))
        for key in group.state_keys:
            pieces = slice_pieces(_group_vector(group, key), start, end - start, 4) + _zeros(padding)
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
                cut[key] += slice_pieces(p.states[key], start, end - start, 4) + _zeros(part - (end - start))
        length = sum(param_partition_numel(p.numel, world) for p in group.params)
        grad = _requires_grad(ckpt.osd["fp32_flat_groups"][g])
        flat.append(tensors.cut("float32", (length,), cut[FP32], grad))
        for key in group.state_keys:
            states[g][key] = tensors.cut("float32", (length,), cut[key])
    osd["fp32_flat_groups"] = flat
    osd["partition_count"] = world
