"""``--optimizer``: torch optimizer state dicts, their kind, param groups, steps and state sizes.

The optimizer class is not in a state dict, so it is inferred from the per-parameter state
slots (``exp_avg`` + ``exp_avg_sq`` is the Adam family, ``momentum_buffer`` is SGD, ...) and
the param-group keys, and the report says which evidence decided it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ckptkit.formats.dtypes import torch_itemsize
from ckptkit.ops.inspect.context import Context, Document, find
from ckptkit.ops.inspect.values import as_tensor, number

# Hyper-parameters shown as columns; every other param-group key goes to ``options``.
_COLUMNS = ("lr", "betas", "eps", "weight_decay", "momentum", "params")


@dataclass
class ParamGroup:
    index: int
    lr: float | None
    betas: list[float] | None
    eps: float | None
    weight_decay: float | None
    momentum: float | None
    num_params: int | None
    step: float | int | None  # the step all its params' state agrees on; None if none or they differ
    steps: list[float | int] = field(default_factory=list)  # every distinct step among its params
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class StateSlot:
    name: str  # exp_avg, exp_avg_sq, momentum_buffer, step...
    dtypes: list[str]
    tensors: int
    numel: int
    bytes: int


@dataclass
class OptimizerInfo:
    file: str
    path: str  # where in the file: "" (the file is the state dict), "optimizer", ...
    kind: str
    reason: str
    groups: list[ParamGroup]
    slots: list[StateSlot]
    num_params: int
    num_state_entries: int
    state_bytes: int
    steps: list[float | int]


def is_optimizer_state(value: Any) -> bool:
    return (
        isinstance(value, Mapping)
        and isinstance(value.get("state"), Mapping)
        and isinstance(value.get("param_groups"), list)
        and all(isinstance(g, Mapping) for g in value["param_groups"])
    )


def find_optimizers(ctx: Context) -> list[OptimizerInfo]:
    found = []
    for doc in ctx.documents:
        for path, state_dict in find(doc.value, is_optimizer_state):
            found.append(describe_optimizer(ctx, doc, path, state_dict))
    return found


def describe_optimizer(
    ctx: Context,
    doc: Document,
    path: str,
    state_dict: Mapping[str, Any],
    params_per_group: list[int] | None = None,
    declared: str | None = None,
) -> OptimizerInfo:
    """``params_per_group`` overrides the groups' own ``params`` lists (DeepSpeed keeps one flat
    partition per group there); ``declared`` is a type the run's config names."""
    state: Mapping[Any, Any] = state_dict["state"]
    groups_raw: list[Mapping[str, Any]] = state_dict["param_groups"]
    entries = [(pid, slots) for pid, slots in state.items() if isinstance(slots, Mapping)]
    steps = ctx.scalars(doc, [slots.get("step") for _, slots in entries])
    step_of = {pid: step for (pid, _), step in zip(entries, steps, strict=True) if step is not None}
    lrs = ctx.scalars(doc, [g.get("lr") for g in groups_raw])
    groups = []
    for index, (raw, lr) in enumerate(zip(groups_raw, lrs, strict=True)):
        params = raw.get("params") if isinstance(raw.get("params"), list) else []
        distinct = sorted({step_of[p] for p in params if p in step_of})
        betas = raw.get("betas")
        groups.append(
            ParamGroup(
                index=index,
                lr=lr,
                betas=[number(b) for b in betas] if isinstance(betas, (list, tuple)) else None,
                eps=number(raw.get("eps")),
                weight_decay=number(raw.get("weight_decay")),
                momentum=number(raw.get("momentum")),
                num_params=params_per_group[index]
                if params_per_group and index < len(params_per_group)
                else len(params),
                step=distinct[0] if len(distinct) == 1 else None,
                steps=distinct,
                options={k: v for k, v in raw.items() if k not in _COLUMNS and _is_option(v)},
            )
        )
    kind, reason = infer_kind(entries, groups_raw, declared)
    slots = _slots(entries)
    return OptimizerInfo(
        file=doc.file,
        path=path,
        kind=kind,
        reason=reason,
        groups=groups,
        slots=slots,
        num_params=sum(g.num_params or 0 for g in groups),
        num_state_entries=len(entries),
        state_bytes=sum(s.bytes for s in slots),
        steps=sorted(set(step_of.values())),
    )


def _is_option(value: Any) -> bool:
    return value is None or type(value) in (bool, int, float, str)


def _slots(entries: list[tuple[Any, Mapping[str, Any]]]) -> list[StateSlot]:
    slots: dict[str, StateSlot] = {}
    for _, state in entries:
        for name, value in state.items():
            tensor = as_tensor(value)
            if tensor is None:
                continue
            slot = slots.setdefault(str(name), StateSlot(str(name), [], 0, 0, 0))
            if tensor.dtype not in slot.dtypes:
                slot.dtypes.append(tensor.dtype)
            slot.tensors += 1
            slot.numel += tensor.numel
            slot.bytes += tensor.numel * (torch_itemsize(tensor.dtype) or 0)
    return list(slots.values())


def infer_kind(
    entries: list[tuple[Any, Mapping[str, Any]]], groups: list[Mapping[str, Any]], declared: str | None
) -> tuple[str, str]:
    """The optimizer class the state implies, and why."""
    keys = {str(k) for _, state in entries for k in state}
    group_keys = {str(k) for g in groups for k in g}
    kind, reason = _kind_from_state(keys, group_keys, groups)
    if declared:
        reason += f"; the run's config declares {declared}"
    return kind, reason


def _kind_from_state(
    keys: set[str], group_keys: set[str], groups: list[Mapping[str, Any]]
) -> tuple[str, str]:
    if {"exp_avg", "exp_avg_sq"} <= keys:
        if "mu_product" in keys:
            return "NAdam", "state has exp_avg, exp_avg_sq and mu_product"
        decoupled = {g.get("decoupled_weight_decay") for g in groups}
        if "amsgrad" not in group_keys and "decoupled_weight_decay" in group_keys:
            return "RAdam", "state has exp_avg, exp_avg_sq; groups have decoupled_weight_decay but no amsgrad"
        if decoupled == {True}:
            return "AdamW", "state has exp_avg, exp_avg_sq; param groups say decoupled_weight_decay=True"
        if decoupled == {False}:
            return "Adam", "state has exp_avg, exp_avg_sq; param groups say decoupled_weight_decay=False"
        return "Adam/AdamW", (
            "state has exp_avg, exp_avg_sq; the groups do not say whether weight decay is decoupled"
        )
    if {"exp_avg", "exp_inf"} <= keys:
        return "Adamax", "state has exp_avg and exp_inf"
    if {"square_avg", "acc_delta"} <= keys:
        return "Adadelta", "state has square_avg and acc_delta"
    if "square_avg" in keys:
        return "RMSprop", "state has square_avg"
    if "sum" in keys:
        return "Adagrad", "state has sum"
    if {"prev", "step_size"} <= keys:
        return "Rprop", "state has prev and step_size"
    if {"ax", "eta", "mu"} <= keys:
        return "ASGD", "state has ax, eta and mu"
    if "exp_avg_sq_row" in keys:
        return "Adafactor", "state has exp_avg_sq_row"
    if "momentum_buffer" in keys or {"nesterov", "dampening"} <= group_keys:
        return (
            "SGD",
            "state has momentum_buffer" if "momentum_buffer" in keys else "groups have nesterov, dampening",
        )
    if "exp_avg" in keys:
        return "unknown (exp_avg only: Lion-like)", "state has exp_avg without exp_avg_sq"
    if not keys:
        return "unknown", "no per-parameter state (no step taken yet, or a stateless optimizer)"
    return "unknown", f"state slots {', '.join(sorted(keys))} match no known optimizer"
