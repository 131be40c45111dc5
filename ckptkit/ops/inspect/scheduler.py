"""``--scheduler``: LR scheduler state, its class told from its keys, and where it stands.

torch schedulers save ``__dict__`` minus the optimizer, so each class leaves its own keys
(``total_steps`` is OneCycleLR, ``_milestones`` SequentialLR, ...). DeepSpeed's own schedules
save only ``last_batch_iteration``; the run's ``ds_config`` then names the class.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ckptkit.ops.inspect.context import Context, find
from ckptkit.ops.inspect.values import get, number, plain

TORCH_MODULE = "torch.optim.lr_scheduler"
DEEPSPEED_MODULE = "deepspeed.runtime.lr_schedules"

# (class, keys that identify it, keys shown as its fields); the first match wins, so classes
# whose keys are a superset of another's come first.
_CLASSES: tuple[tuple[str, frozenset[str], tuple[str, ...]], ...] = (
    ("SequentialLR", frozenset({"_milestones", "_schedulers"}), ("_milestones",)),
    ("ChainedScheduler", frozenset({"_schedulers"}), ()),
    (
        "OneCycleLR",
        frozenset({"total_steps", "_schedule_phases"}),
        ("total_steps", "_anneal_func_type", "cycle_momentum", "use_beta1"),
    ),
    (
        "CyclicLR",
        frozenset({"max_lrs", "total_size", "step_ratio"}),
        ("max_lrs", "total_size", "step_ratio", "mode", "gamma", "scale_mode"),
    ),
    (
        "ReduceLROnPlateau",
        frozenset({"patience", "num_bad_epochs", "best"}),
        ("mode", "factor", "patience", "threshold", "best", "num_bad_epochs", "cooldown_counter", "min_lrs"),
    ),
    (
        "CosineAnnealingWarmRestarts",
        frozenset({"T_0", "T_i", "T_cur"}),
        ("T_0", "T_i", "T_mult", "T_cur", "eta_min"),
    ),
    ("CosineAnnealingLR", frozenset({"T_max", "eta_min"}), ("T_max", "eta_min")),
    ("MultiStepLR", frozenset({"milestones", "gamma"}), ("milestones", "gamma")),
    ("StepLR", frozenset({"step_size", "gamma"}), ("step_size", "gamma")),
    (
        "LinearLR",
        frozenset({"start_factor", "end_factor", "total_iters"}),
        ("start_factor", "end_factor", "total_iters"),
    ),
    ("ConstantLR", frozenset({"factor", "total_iters"}), ("factor", "total_iters")),
    ("PolynomialLR", frozenset({"power", "total_iters"}), ("total_iters", "power")),
    ("ExponentialLR", frozenset({"gamma", "base_lrs"}), ("gamma",)),
    # MultiplicativeLR saves the same keys; Hugging Face's schedules are all LambdaLR.
    ("LambdaLR", frozenset({"lr_lambdas"}), ()),
)


@dataclass
class SchedulerInfo:
    file: str
    path: str
    cls: str  # short class name: OneCycleLR, WarmupLR; "unknown" if the keys say nothing
    qualname: str | None  # torch.optim.lr_scheduler.OneCycleLR
    reason: str
    last_epoch: int | None
    step_count: int | None  # _step_count (torch): calls of step(), the one in __init__ included
    base_lrs: list[float] | None
    last_lr: list[float] | None
    steps_taken: int | None  # scheduler steps since the start: last_epoch, or last_batch_iteration + 1
    fields: dict[str, Any] = field(default_factory=dict)
    children: list[SchedulerInfo] = field(default_factory=list)


def is_scheduler_state(value: Any) -> bool:
    return isinstance(value, Mapping) and (
        "last_batch_iteration" in value
        or ("last_epoch" in value and ("base_lrs" in value or "_schedulers" in value or "_last_lr" in value))
    )


def find_schedulers(ctx: Context) -> list[SchedulerInfo]:
    found = []
    for doc in ctx.documents:
        for path, state in find(doc.value, is_scheduler_state):
            found.append(describe_scheduler(doc.file, path, state))
    for doc in ctx.model_states[:1]:  # every rank saves the same scheduler
        state = doc.value.get("lr_scheduler")
        if is_scheduler_state(state):
            declared = get(doc.value, "ds_config", "scheduler", "type")
            found.append(describe_scheduler(doc.file, "lr_scheduler", state, declared))
    return found


def describe_scheduler(file: str, path: str, state: Mapping[str, Any], declared: Any = None) -> SchedulerInfo:
    keys = {str(k) for k in state}
    if "last_batch_iteration" in keys and "last_epoch" not in keys:
        return _deepspeed(file, path, state, declared)
    cls, reason, shown = "unknown", f"keys {', '.join(sorted(keys))} match no torch scheduler", ()
    for name, required, fields in _CLASSES:
        if required <= keys:
            cls, reason, shown = name, f"state has {', '.join(sorted(required))}", fields
            break
    if cls == "LambdaLR":
        reason += " (MultiplicativeLR saves the same keys)"
    last_epoch = number(state.get("last_epoch"))
    info = SchedulerInfo(
        file=file,
        path=path,
        cls=cls,
        qualname=f"{TORCH_MODULE}.{cls}" if cls != "unknown" else None,
        reason=reason,
        last_epoch=last_epoch,
        step_count=number(state.get("_step_count")),
        base_lrs=_floats(state.get("base_lrs")),
        last_lr=_floats(state.get("_last_lr")),
        steps_taken=last_epoch if cls != "ReduceLROnPlateau" else None,  # it counts epochs
        fields={k: plain(state[k]) for k in shown if k in state},
    )
    if cls == "OneCycleLR":
        info.fields["phases"] = [plain(p) for p in state.get("_schedule_phases") or []]
    if cls == "LambdaLR":
        # The functions themselves are never saved: a plain function leaves None, a callable
        # object its __dict__.
        info.fields["lr_lambdas"] = len(state.get("lr_lambdas") or [])
    children = state.get("_schedulers")
    if isinstance(children, list):
        info.children = [
            describe_scheduler(file, f"{path}._schedulers.{i}", child)
            for i, child in enumerate(children)
            if isinstance(child, Mapping)
        ]
    return info


def _deepspeed(file: str, path: str, state: Mapping[str, Any], declared: Any) -> SchedulerInfo:
    iteration = number(state.get("last_batch_iteration"))
    name = declared if isinstance(declared, str) else None
    reason = (
        f"last_batch_iteration only (a DeepSpeed schedule); ds_config names {name}"
        if name
        else "last_batch_iteration only: a DeepSpeed schedule (WarmupLR, WarmupDecayLR, WarmupCosineLR, "
        "OneCycle, LRRangeTest save the same key)"
    )
    return SchedulerInfo(
        file=file,
        path=path,
        cls=name or "DeepSpeed schedule",
        qualname=f"{DEEPSPEED_MODULE}.{name}" if name else None,
        reason=reason,
        last_epoch=None,
        step_count=None,
        base_lrs=None,
        last_lr=None,
        steps_taken=iteration + 1 if type(iteration) is int else None,  # it starts at -1
        fields={
            "last_batch_iteration": iteration,
            **{k: plain(v) for k, v in state.items() if k != "last_batch_iteration"},
        },
    )


def _floats(value: Any) -> list[float] | None:
    if not isinstance(value, (list, tuple)):
        return None
    return [number(v) for v in value]
