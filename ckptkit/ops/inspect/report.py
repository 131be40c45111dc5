"""The report ``inspect_path`` returns: what was found per view, the resume check, problems."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from ckptkit.errors import EXIT_FINDINGS, EXIT_OK, EXIT_UNSAFE
from ckptkit.ops.inspect.model import ModelSet
from ckptkit.ops.inspect.optimizer import OptimizerInfo
from ckptkit.ops.inspect.resume import ResumeCheck
from ckptkit.ops.inspect.rng import RngState
from ckptkit.ops.inspect.scaler import ScalerInfo
from ckptkit.ops.inspect.scheduler import SchedulerInfo
from ckptkit.ops.inspect.source import UnsafeGlobal
from ckptkit.ops.inspect.stats import TensorStats
from ckptkit.ops.inspect.trainer_state import TrainerState
from ckptkit.ops.inspect.values import printable_int
from ckptkit.ops.inspect.zero import ZeroInfo

VIEWS = ("model", "optimizer", "scheduler", "scaler", "rng", "trainer_state")


@dataclass
class InspectReport:
    url: str
    name: str
    layout: str
    views: tuple[str, ...]  # the views asked for
    models: list[ModelSet] = field(default_factory=list)
    optimizers: list[OptimizerInfo] = field(default_factory=list)
    zero: ZeroInfo | None = None
    schedulers: list[SchedulerInfo] = field(default_factory=list)
    scalers: list[ScalerInfo] = field(default_factory=list)
    rng: list[RngState] = field(default_factory=list)
    trainer_state: TrainerState | None = None
    resume: ResumeCheck | None = None
    stats: list[TensorStats] | None = None
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # what the readers found wrong in files
    unsafe: list[UnsafeGlobal] = field(default_factory=list)  # what torch.load would import unvetted

    @property
    def ok(self) -> bool:
        """No reader problem, nothing unsafe, and no unexplained disagreement in the resume check."""
        return not self.problems and not self.unsafe and (self.resume is None or self.resume.ok)

    @property
    def exit_code(self) -> int:
        """3 for unsafe content (as ``scan``), 1 for problems or a disagreement, else 0."""
        if self.unsafe:
            return EXIT_UNSAFE
        return EXIT_OK if self.ok else EXIT_FINDINGS

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "url": self.url,
            "name": self.name,
            "layout": self.layout,
            "ok": self.ok,
            "views": list(self.views),
        }
        sections = {
            "model": {"models": self.models},
            "optimizer": {"optimizers": self.optimizers, "zero": self.zero},
            "scheduler": {"schedulers": self.schedulers},
            "scaler": {"scalers": self.scalers},
            "rng": {"rng": self.rng},
            "trainer_state": {"trainer_state": self.trainer_state},
        }
        for view in self.views:
            data.update(sections[view])
        if self.resume is not None:
            data["resume"] = {
                "ok": self.resume.ok,
                "checks": [
                    {
                        "quantity": c.quantity,
                        "reference": c.reference,
                        "status": c.status,
                        "readings": c.readings,
                    }
                    for c in self.resume.checks
                ],
            }
        if self.stats is not None:
            data["stats"] = self.stats
        data.update(notes=self.notes, problems=self.problems, unsafe=self.unsafe)
        return _jsonable(data)


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if type(value) is float and not math.isfinite(value):
        return str(value)  # JSON has no NaN or inf; say what it was
    if type(value) is int:
        return printable_int(value)
    return value
