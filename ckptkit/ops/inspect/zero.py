"""DeepSpeed ZeRO: stage, partitioning and per-rank optimizer files (formats.md §10.3).

Every data-parallel rank saves its own optimizer file holding its slice of the fp32 master
weights and of the Adam moments. Resume needs all of them, written by the same run: the
partition count must equal the number of rank files, and every rank must agree on stage,
loss scale, learning rate and step.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ckptkit.formats.dtypes import torch_itemsize
from ckptkit.ops.inspect.context import Context, Document
from ckptkit.ops.inspect.optimizer import OptimizerInfo, describe_optimizer, is_optimizer_state
from ckptkit.ops.inspect.values import as_tensor, get, number
from ckptkit.pickle import GlobalRef, VettedObject

ZERO_STAGE = GlobalRef("deepspeed.runtime.zero.config", "ZeroStageEnum")
_RANK = re.compile(r"(?:^|_)pp_rank_(\d+)_")


@dataclass
class ZeroRank:
    file: str
    rank: int | None
    stage: int | None
    partition_count: list[int]
    fp32_partition_numel: list[int]  # per param group: this rank's slice of the fp32 masters
    group_paddings: list[int]
    overflow: bool | None
    clip_grad: float | None
    lr: list[float | None]
    steps: list[float | int]
    state_bytes: int


@dataclass
class ZeroInfo:
    stage: int | None
    partition_count: int | None
    dp_world_size: int | None
    mp_world_size: int | None
    rank_files: int
    ds_version: str | None
    optimizer: OptimizerInfo | None  # rank 0's wrapped torch optimizer; params counted from the model
    ranks: list[ZeroRank]
    fp32_elements: int  # all ranks' fp32 partitions together, padding included
    problems: list[str] = field(default_factory=list)
    # DeepSpeed loads a ZeRO checkpoint only at the data-parallel size it was saved at;
    # `ckptkit reshard` (or loading through use_ckptkit) makes it load at any other.
    loads_at_dp_world_size: int | None = None
    # Set when ckptkit reshard wrote it: from/to world size, source, the RNG rule applied.
    resharded: dict[str, Any] | None = None


def describe_zero(ctx: Context) -> ZeroInfo | None:
    files = ctx.zero_files
    if not files:
        return None
    model = ctx.model_states[0].value if ctx.model_states else {}
    ranks = [_rank(ctx, doc) for doc in files]
    counts = [max(r.partition_count) for r in ranks if r.partition_count]
    partition_count = counts[0] if counts else None
    first = files[0]
    info = ZeroInfo(
        stage=ranks[0].stage if ranks[0].stage is not None else _config_stage(first.value),
        partition_count=partition_count,
        dp_world_size=number(get(model, "dp_world_size")) or partition_count,
        mp_world_size=number(get(model, "mp_world_size")),
        rank_files=len(files),
        ds_version=get(first.value, "ds_version"),
        optimizer=_base_optimizer(ctx, first, model),
        ranks=ranks,
        fp32_elements=sum(sum(r.fp32_partition_numel) for r in ranks),
    )
    info.loads_at_dp_world_size = partition_count
    info.problems = _consistency(info)
    return info


def _rank(ctx: Context, doc: Document) -> ZeroRank:
    osd = doc.value["optimizer_state_dict"]
    count = osd.get("partition_count")
    flat = osd.get("single_partition_of_fp32_groups", osd.get("fp32_flat_groups"))
    partitions = [as_tensor(t) for t in flat] if isinstance(flat, list) else []
    base = _base_state(osd)
    lrs = ctx.scalars(doc, [g.get("lr") for g in base["param_groups"]]) if base else []
    steps = (
        ctx.scalars(doc, [s.get("step") for s in base["state"].values() if isinstance(s, Mapping)])
        if base
        else []
    )
    moments = [
        v for s in (base["state"].values() if base else []) if isinstance(s, Mapping) for v in s.values()
    ]
    tensors = [t for t in (*map(as_tensor, moments), *partitions) if t is not None]
    return ZeroRank(
        file=doc.file,
        rank=rank_of(doc.file),
        stage=_stage(osd.get("zero_stage")),
        partition_count=list(count) if isinstance(count, list) else [count] if type(count) is int else [],
        fp32_partition_numel=[t.numel for t in partitions if t is not None],
        group_paddings=list(osd.get("group_paddings") or []),
        overflow=osd.get("overflow") if type(osd.get("overflow")) is bool else None,
        clip_grad=number(osd.get("clip_grad")),
        lr=lrs,
        steps=sorted({s for s in steps if s is not None}),
        state_bytes=sum(t.numel * (torch_itemsize(t.dtype) or 0) for t in tensors),
    )


def rank_of(file: str) -> int | None:
    """The data-parallel rank a ZeRO file name states (``zero_pp_rank_3_mp_rank_00_...``)."""
    match = _RANK.search(file.rsplit("/", 1)[-1])
    return int(match.group(1)) if match else None


def _base_key(osd: Mapping[str, Any]) -> str | None:
    # ZeRO-1/2 (and BF16_Optimizer) call it base_optimizer_state; ZeRO-3 nests a second
    # optimizer_state_dict inside the first.
    return next(
        (k for k in ("base_optimizer_state", "optimizer_state_dict") if is_optimizer_state(osd.get(k))), None
    )


def _base_state(osd: Mapping[str, Any]) -> Mapping[str, Any] | None:
    key = _base_key(osd)
    return None if key is None else osd[key]


def _stage(value: Any) -> int | None:
    if type(value) is VettedObject and value.cls == ZERO_STAGE:
        return value.args[0]
    return value if type(value) is int else None


def _config_stage(value: Any) -> int | None:
    return number(get(value, "ds_config", "zero_optimization", "stage"))


def _base_optimizer(ctx: Context, doc: Document, model: Any) -> OptimizerInfo | None:
    osd = doc.value["optimizer_state_dict"]
    key = _base_key(osd)
    if key is None:
        return None
    shapes = get(model, "param_shapes")
    tables = isinstance(shapes, list) and all(isinstance(g, Mapping) for g in shapes)
    per_group = [len(g) for g in shapes] if tables else None
    declared = get(doc.value, "ds_config", "optimizer", "type")
    declared = declared if isinstance(declared, str) else None
    return describe_optimizer(ctx, doc, f"optimizer_state_dict.{key}", osd[key], per_group, declared)


def _consistency(info: ZeroInfo) -> list[str]:
    problems = []
    if info.partition_count is not None and info.partition_count != info.rank_files:
        problems.append(
            f"partition count is {info.partition_count} but {info.rank_files} optimizer rank file(s) are "
            "present: a rank did not save, or files of another save are mixed in"
        )
    ranks = [r.rank for r in info.ranks if r.rank is not None]
    if sorted(ranks) != list(range(len(ranks))):
        problems.append(f"rank files are numbered {ranks}, not 0..{len(ranks) - 1}")
    for what in ("stage", "partition_count", "lr", "steps", "clip_grad"):
        values = {repr(getattr(r, what)) for r in info.ranks}
        if len(values) > 1:
            problems.append(f"ranks disagree on {what}: {', '.join(sorted(values))}")
    return problems
