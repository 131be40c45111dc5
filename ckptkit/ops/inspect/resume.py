"""The resume check: the step and the learning rate as each component recorded them.

A resume is exact when the trainer, the scheduler and the optimizer agree on where training
stopped. Some offsets are expected and are explained, not flagged:

- DeepSpeed counts fp16 overflow steps in ``global_steps`` but does not step the optimizer or
  the scheduler for them (``skipped_steps``);
- torch's GradScaler skips ``optimizer.step()`` on inf/NaN gradients, so the optimizer's
  ``step`` can trail the trainer's while the scheduler (stepped by the trainer) does not;
- HF Trainer logs the learning rate before the scheduler steps, so the last logged LR is the
  one the last step used, one scheduler step behind the saved one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from ckptkit.catalog import step_from_name
from ckptkit.ops.inspect.optimizer import OptimizerInfo
from ckptkit.ops.inspect.scaler import ScalerInfo
from ckptkit.ops.inspect.scheduler import SchedulerInfo
from ckptkit.ops.inspect.trainer_state import TrainerState
from ckptkit.ops.inspect.zero import ZeroInfo

Status = Literal["reference", "ok", "benign", "mismatch"]


@dataclass
class Reading:
    source: str  # which component and field: "scheduler.pt last_epoch"
    value: Any
    status: Status = "ok"
    note: str | None = None


@dataclass
class Check:
    quantity: str  # "step", "lr (group 0)"
    reference: Any
    readings: list[Reading] = field(default_factory=list)

    @property
    def status(self) -> Status:
        order = ("ok", "benign", "mismatch")
        worst = max((order.index(r.status) for r in self.readings if r.status != "reference"), default=0)
        return order[worst]


@dataclass
class ResumeCheck:
    checks: list[Check]

    @property
    def ok(self) -> bool:
        return all(c.status != "mismatch" for c in self.checks)


@dataclass
class Components:
    """What the views found, as the resume check needs it."""

    name: str  # directory (or file) name
    trainer: TrainerState | None
    optimizers: list[OptimizerInfo]
    zero: ZeroInfo | None
    schedulers: list[SchedulerInfo]
    scalers: list[ScalerInfo]
    model_states: Mapping[str, Any] | None  # DeepSpeed rank-0 model states
    file_steps: list[tuple[str, int]]  # (file:key, value) of plain step counters in torch files
    deepspeed_tag: str | None


def check_resume(c: Components) -> ResumeCheck:
    checks = [_steps(c)]
    checks += _lrs(c)
    if c.zero is not None and c.zero.problems:
        checks.append(
            Check(
                "deepspeed ranks",
                None,
                [Reading("zero optimizer files", p, "mismatch") for p in c.zero.problems],
            )
        )
    return ResumeCheck([check for check in checks if check.readings])


# --- steps ----------------------------------------------------------------------------------


def _steps(c: Components) -> Check:
    counters: list[tuple[str, int | None]] = []
    if c.trainer is not None:
        counters.append((f"{c.trainer.file} global_step", c.trainer.global_step))
    ms = c.model_states or {}
    if type(ms.get("global_steps")) is int:
        counters.append(("deepspeed global_steps", ms["global_steps"]))
    counters += c.file_steps
    counters.append((f"directory name {c.name}", step_from_name(c.name)))
    if c.deepspeed_tag is not None and c.deepspeed_tag != c.name:
        counters.append((f"deepspeed tag {c.deepspeed_tag}", step_from_name(c.deepspeed_tag)))
    counters = [(s, v) for s, v in counters if v is not None]
    skipped = ms.get("skipped_steps") if type(ms.get("skipped_steps")) is int else 0
    updates = _updates(c)
    reference = counters[0][1] if counters else next((v for _, v in updates if v is not None), None)
    check = Check("step", reference)
    for index, (source, value) in enumerate(counters):
        status: Status = "reference" if index == 0 else "ok" if value == reference else "mismatch"
        check.readings.append(Reading(source, value, status))
    if skipped:
        check.readings.append(
            Reading(
                "deepspeed skipped_steps",
                skipped,
                "reference",
                "fp16 overflow steps: counted in global_steps, not applied",
            )
        )
    scaler = any(s.kind == "torch GradScaler" and s.enabled for s in c.scalers)
    for source, value in updates:
        if not counters and value == reference and not check.readings:
            check.readings.append(Reading(source, value, "reference"))
        else:
            check.readings.append(_update_reading(source, value, reference, skipped, scaler))
    return check


def _updates(c: Components) -> list[tuple[str, int | float | None]]:
    """Counters of applied updates: optimizer state steps and scheduler steps."""
    found: list[tuple[str, int | float | None]] = []
    optimizers = list(c.optimizers) + ([c.zero.optimizer] if c.zero and c.zero.optimizer else [])
    for opt in optimizers:
        if opt.steps:
            found.append((f"{_where(opt.file, opt.path)} optimizer state step", max(opt.steps)))
    for sched in c.schedulers:
        if sched.steps_taken is not None:
            field_name = "last_epoch" if sched.last_epoch is not None else "last_batch_iteration + 1"
            found.append((f"{_where(sched.file, sched.path)} {sched.cls} {field_name}", sched.steps_taken))
    return found


def _update_reading(source: str, value: Any, reference: Any, skipped: int, scaler: bool) -> Reading:
    if reference is None or value == reference:
        return Reading(source, value)
    if skipped and value == reference - skipped:
        return Reading(
            source,
            value,
            "benign",
            f"{skipped} fp16 overflow step(s) skipped: DeepSpeed advances neither optimizer nor scheduler",
        )
    if scaler and "optimizer" in source and value < reference:
        return Reading(
            source,
            value,
            "benign",
            f"{reference - value} step(s) skipped by GradScaler on inf/NaN gradients do not advance "
            "the optimizer's step",
        )
    return Reading(
        source,
        value,
        "mismatch",
        f"expected {reference - skipped if skipped else reference}; a scheduler stepped per epoch "
        "also reads this way",
    )


# --- learning rates -------------------------------------------------------------------------


def _lrs(c: Components) -> list[Check]:
    per_group: dict[int, list[Reading]] = {}
    optimizers = list(c.optimizers) + ([c.zero.optimizer] if c.zero and c.zero.optimizer else [])
    for opt in optimizers:
        for group in opt.groups:
            if group.lr is not None:
                per_group.setdefault(group.index, []).append(
                    Reading(f"{_where(opt.file, opt.path)} param_groups[{group.index}].lr", group.lr)
                )
    for sched in c.schedulers:
        for index, lr in enumerate(sched.last_lr or []):
            if lr is not None:
                per_group.setdefault(index, []).append(
                    Reading(f"{_where(sched.file, sched.path)} _last_lr[{index}]", lr)
                )
    checks = []
    for index, readings in sorted(per_group.items()):
        reference = readings[0].value
        readings[0].status = "reference"
        for reading in readings[1:]:
            if not _same(reading.value, reference):
                reading.status = "mismatch"
        check = Check(f"lr (group {index})", reference, readings)
        if index == 0 and c.trainer is not None and c.trainer.last_logged_lr is not None:
            check.readings.append(_logged_lr(c.trainer, reference))
        checks.append(check)
    return checks


def _logged_lr(trainer: TrainerState, reference: float) -> Reading:
    value, step = trainer.last_logged_lr, trainer.last_logged_lr_step
    source = f"{trainer.file} last logged learning_rate (step {step})"
    if _same(value, reference):
        return Reading(source, value)
    if step == trainer.global_step:
        note = (
            f"known offset: the Trainer logs the LR step {step} used, before the scheduler steps; "
            "the saved LR is the one the next step will use"
        )
    else:
        note = f"last logged at step {step}, before the checkpoint's step {trainer.global_step}"
    return Reading(source, value, "benign", note)


def _same(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12)


def _where(file: str, path: str) -> str:
    return f"{file}:{path}" if path else file
