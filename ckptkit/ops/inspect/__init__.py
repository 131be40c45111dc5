"""``inspect``: what a checkpoint holds and whether it will resume where it stopped.

Reads headers, pickles (symbolically: nothing in them is imported or called) and JSON, plus the
few bytes of 0-dim counter tensors; tensor data only for ``stats``. torch is imported only by
``stats``. Works the same on local paths and object stores.

    report = inspect_path("s3://bucket/run/checkpoint-2500")
    report.resume.ok, report.schedulers[0].last_epoch, report.to_json()
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from typing import Any

from ckptkit.formats.zero import RESHARD_KEY
from ckptkit.ops.inspect.context import Context
from ckptkit.ops.inspect.model import find_models
from ckptkit.ops.inspect.optimizer import find_optimizers
from ckptkit.ops.inspect.report import VIEWS, InspectReport
from ckptkit.ops.inspect.resolve import inspect_target
from ckptkit.ops.inspect.resume import Components, check_resume
from ckptkit.ops.inspect.rng import find_rng
from ckptkit.ops.inspect.scaler import find_scalers
from ckptkit.ops.inspect.scheduler import find_schedulers
from ckptkit.ops.inspect.stats import tensor_stats
from ckptkit.ops.inspect.trainer_state import describe_trainer_state
from ckptkit.ops.inspect.zero import describe_zero
from ckptkit.storage import Store

__all__ = ["VIEWS", "InspectReport", "inspect_path"]

# Top-level counters a training script saves next to its state ("step": 5).
STEP_KEYS = ("global_step", "step", "iteration", "global_steps")


def inspect_path(
    path: str | os.PathLike[str] | Store,
    views: Collection[str] | None = None,
    *,
    stats: str | None = None,
    **storage_options: Any,
) -> InspectReport:
    """Inspect a checkpoint file or directory (local path, URL, or an open store's root).

    ``views`` is a subset of :data:`VIEWS`; None means all of them plus the resume check.
    ``stats`` is a glob over tensor names (``*.weight``, ``optimizer.pt:state.0.*``) whose
    values are read and summarised.
    """
    chosen = tuple(VIEWS if views is None else [v for v in VIEWS if v in views])
    unknown = set(views or ()) - set(VIEWS)
    if unknown:
        raise ValueError(f"unknown view(s) {', '.join(sorted(unknown))}; choose from {', '.join(VIEWS)}")
    target = inspect_target(path, **storage_options)
    ctx = Context(target)
    report = InspectReport(target.url, target.name, target.layout, chosen, notes=list(target.notes))
    if "model" in chosen:
        report.models = find_models(ctx)
    if "optimizer" in chosen or views is None:
        report.optimizers = find_optimizers(ctx)
        report.zero = describe_zero(ctx)
        resharded = target.metadata.get(RESHARD_KEY)
        if report.zero is not None and isinstance(resharded, dict):
            report.zero.resharded = {k: v for k, v in resharded.items() if k != "certificate"}
    if "scheduler" in chosen:
        report.schedulers = find_schedulers(ctx)
    if "scaler" in chosen:
        report.scalers = find_scalers(ctx)
    if "rng" in chosen:
        report.rng = find_rng(ctx)
    if "trainer_state" in chosen:
        report.trainer_state = describe_trainer_state(ctx)
    if views is None:
        report.resume = check_resume(
            Components(
                name=target.name,
                trainer=report.trainer_state,
                optimizers=report.optimizers,
                zero=report.zero,
                schedulers=report.schedulers,
                scalers=report.scalers,
                model_states=ctx.model_states[0].value if ctx.model_states else None,
                file_steps=_file_steps(ctx),
                deepspeed_tag=target.deepspeed.tag if target.deepspeed else None,
            )
        )
    if stats is not None:
        report.stats = tensor_stats(ctx, stats)
    report.problems = list(ctx.problems)
    report.unsafe = list(ctx.source.unsafe)
    return report


def _file_steps(ctx: Context) -> list[tuple[str, int]]:
    return [
        (f"{doc.file}:{key}", doc.value[key])
        for doc in ctx.documents
        if isinstance(doc.value, Mapping)
        for key in STEP_KEYS
        if type(doc.value.get(key)) is int
    ]
