"""``--scaler``: fp16 loss scaling state: torch's GradScaler and DeepSpeed's loss scalers.

A GradScaler saves a plain dict (``{}`` when disabled). DeepSpeed pickles the scaler instance
itself into every rank's optimizer file; the symbolic reader gives its attribute dict, checked
against the keys those classes have (formats.md §11).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ckptkit.ops.inspect.context import Context, find
from ckptkit.ops.inspect.values import plain, state_of
from ckptkit.ops.inspect.zero import rank_of

GRAD_SCALER_KEYS = frozenset({"scale", "growth_factor", "backoff_factor", "growth_interval"})
_DS_MODULE = "deepspeed.runtime.fp16.loss_scaler"
_DS_FIELDS = (
    "cur_iter",
    "scale_window",
    "min_scale",
    "last_overflow_iter",
    "scale_factor",
    "delayed_shift",
    "cur_hysteresis",
    "consecutive_hysteresis",
    "raise_error_at_min_scale",
    "dtype",
)


@dataclass
class ScalerInfo:
    file: str
    path: str
    kind: str  # "torch GradScaler", "DeepSpeed DynamicLossScaler", "DeepSpeed LossScaler"
    enabled: bool
    dynamic: bool | None
    scale: float | None
    fields: dict[str, Any] = field(default_factory=dict)
    rank: int | None = None
    note: str | None = None


def is_grad_scaler_state(value: Any) -> bool:
    return isinstance(value, Mapping) and value.keys() >= GRAD_SCALER_KEYS


def find_scalers(ctx: Context) -> list[ScalerInfo]:
    found: list[ScalerInfo] = []
    for doc in ctx.documents:
        for path, state in find(doc.value, is_grad_scaler_state):
            values = ctx.scalars(doc, [state.get(k) for k in state])
            numbers = dict(zip(state, values, strict=True))
            found.append(
                ScalerInfo(
                    file=doc.file,
                    path=path,
                    kind="torch GradScaler",
                    enabled=True,
                    dynamic=True,
                    scale=numbers.get("scale"),
                    fields={
                        k: numbers[k] if numbers[k] is not None else plain(v)
                        for k, v in state.items()
                        if k != "scale"
                    },
                )
            )
        if _disabled_scaler(doc):
            found.append(
                ScalerInfo(
                    doc.file,
                    "",
                    "torch GradScaler",
                    enabled=False,
                    dynamic=None,
                    scale=None,
                    note="saved disabled (an empty state dict): no loss scaling",
                )
            )
    for doc in ctx.zero_files:
        osd = doc.value["optimizer_state_dict"]
        found.append(_deepspeed(doc.file, osd, rank_of(doc.file)))
    return found


def _disabled_scaler(doc: Any) -> bool:
    # HF writes scaler.pt only when a scaler exists; an empty dict there means it was disabled.
    return doc.file.rsplit("/", 1)[-1] == "scaler.pt" and doc.value == {}


def _deepspeed(file: str, osd: Mapping[str, Any], rank: int | None) -> ScalerInfo:
    scaler = osd.get("loss_scaler")
    dynamic_state = state_of(scaler, _DS_MODULE, "DynamicLossScaler")
    static_state = state_of(scaler, _DS_MODULE, "LossScaler")
    state = dynamic_state or static_state or {}
    flags = {k: osd[k] for k in ("dynamic_loss_scale", "overflow") if type(osd.get(k)) is bool}
    scale = state.get("cur_scale")
    kind = "DeepSpeed DynamicLossScaler" if dynamic_state is not None else "DeepSpeed LossScaler"
    note = None
    if not state:
        kind, note = "none", "no loss scaler in this optimizer file (BF16_Optimizer saves none)"
    elif static_state is not None and scale == 1.0:
        note = "static scale 1.0: no loss scaling (fp32 or bf16 training)"
    return ScalerInfo(
        file=file,
        path="optimizer_state_dict.loss_scaler",
        kind=kind,
        enabled=bool(state) and not (static_state is not None and scale == 1.0),
        dynamic=state.get("dynamic") if state else None,
        scale=scale if type(scale) in (int, float) else None,
        fields={**{k: plain(state[k]) for k in _DS_FIELDS if k in state}, **flags},
        rank=rank,
        note=note,
    )
