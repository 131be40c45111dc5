"""``diff``'s non-tensor state: every scalar a checkpoint records outside its tensors, by path.

Each file's symbolic value tree (nothing in it run) is flattened to ``path -> value`` leaves and
each leaf filed under what holds it: an optimizer (hyper-parameters per param group, plus the
per-group step its state agrees on, read from the 0-dim ``step`` tensors as ``inspect`` reads
them), an LR scheduler, a grad or loss scaler, RNG states (fingerprinted: changed or not),
the trainer state (``trainer_state.json``: its log history counted, not listed), the run's
configuration (``config.json``, ``ds_config``, ``hparams``, ``hyper_parameters``), or the rest.
Paths are named like ``diff``'s tensors (``file:path``, the DeepSpeed tag left out).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from ckptkit.formats.hf_trainer import TRAINER_STATE
from ckptkit.ops.diff_tensors import path_prefix
from ckptkit.ops.inspect.context import Context, Document, find
from ckptkit.ops.inspect.model import is_state_dict
from ckptkit.ops.inspect.optimizer import find_optimizers, is_optimizer_state
from ckptkit.ops.inspect.rng import is_rng_state
from ckptkit.ops.inspect.scaler import is_grad_scaler_state
from ckptkit.ops.inspect.scheduler import is_scheduler_state
from ckptkit.ops.inspect.values import as_tensor, plain
from ckptkit.ops.inspect.zero import describe_zero
from ckptkit.pickle import NdArray, VettedObject

SECTIONS = ("optimizer", "scheduler", "scaler", "rng", "trainer_state", "config", "other")
_SUMMARISED = 16  # a list of more scalars than this (an RNG state, a params list) is one leaf
_MAX_DEPTH = 24
_MAX_CONFIG_BYTES = 4 << 20  # config files are small; a tokenizer.json is not configuration
# Path components that say what a sub-tree is when its shape does not (DeepSpeed's lr_scheduler,
# its loss_scaler): the innermost one decides, except that all of a configuration is config
# (``ds_config.scheduler.type`` configures a scheduler, it is not one).
_CONFIG_WORDS = ("config", "hparams", "hyper_parameters", "args")
_KEYWORDS = (
    ("scaler", "scaler"), ("sched", "scheduler"), ("rng", "rng"), ("random", "rng"), ("optim", "optimizer"),
)
# ZeRO fields that follow from the world size (partition_count itself is kept: it says so).
_PARTITION_LAYOUT = ("group_paddings", "param_slice_mappings", "frozen_param_fragments")
_RECOGNISERS = (
    (is_optimizer_state, "optimizer"),
    (is_scheduler_state, "scheduler"),
    (is_grad_scaler_state, "scaler"),
    (is_rng_state, "rng"),
)

Leaves = dict[str, dict[str, Any]]  # section -> {path: value}


def side_state(ctx: Context, *, per_parameter: bool = False) -> Leaves:
    """The non-tensor leaves of one checkpoint, by section and path. ``per_parameter``: a ZeRO
    tag whose tensors are compared per parameter; its state is then rank 0's, without the
    fields that only say where the world size cut the partitions."""
    leaves: Leaves = {section: {} for section in SECTIONS}
    documents = [*ctx.documents, *ctx.model_states, *ctx.zero_files]
    if per_parameter:  # every rank agrees on the rest (reshard's reader checked it)
        documents = [*ctx.documents, *ctx.model_states[:1], *ctx.zero_files[:1]]
    for doc in documents:
        if is_state_dict(doc.value):
            continue  # tensors only: the tensor diff covers them
        prefix = path_prefix(ctx, doc.file)
        regions = _regions(doc)
        for path, value in _flatten(doc.value, ""):
            if not (per_parameter and any(f".{name}" in path for name in _PARTITION_LAYOUT)):
                leaves[_section(path, regions)][prefix + path] = value
    _optimizer_steps(ctx, leaves["optimizer"], per_parameter)
    trainer = ctx.trainer_state
    if isinstance(trainer, Mapping):
        state = dict(trainer)
        history = state.pop("log_history", None)
        state["log_history.length"] = len(history) if isinstance(history, list) else None
        leaves["trainer_state"].update(_flatten(state, f"{TRAINER_STATE}:"))
    for key in _config_files(ctx):
        leaves["config"].update(_flatten(ctx.source.json(key), f"{key}:"))
    return leaves


def _regions(doc: Document) -> list[tuple[str, str]]:
    """(path, section) of the sub-trees whose shape says what they are, innermost last."""
    regions = []
    for recognise, section in _RECOGNISERS:
        regions += [(path, section) for path, _ in find(doc.value, recognise, max_depth=3)]
    return sorted(regions, key=lambda r: len(r[0]))


def _section(path: str, regions: list[tuple[str, str]]) -> str:
    parts = [p.lower() for p in path.replace(":", ".").split(".")]
    if any(p == word or p.endswith(f"_{word}") for p in parts for word in _CONFIG_WORDS):
        return "config"
    chosen = None
    for prefix, section in regions:  # outermost first: the last match is the innermost
        if not prefix or path == prefix or path.startswith(prefix + "."):
            chosen = section
    if chosen is not None:
        return chosen
    for part in reversed(parts):
        for word, section in _KEYWORDS:
            if word in part:
                return section
    return "other"


def _optimizer_steps(ctx: Context, into: dict[str, Any], rank0_only: bool) -> None:
    """The step each param group's state agrees on (0-dim tensors, read as inspect reads them)
    and tensor learning rates as numbers: ``optimizer.state.0.step`` differs at every save."""
    for opt in find_optimizers(ctx):
        prefix = path_prefix(ctx, opt.file)
        base = f"{prefix}{opt.path}." if opt.path else prefix
        for group in opt.groups:
            step = group.step if group.step is not None else group.steps
            into[f"{base}param_groups.{group.index}.step"] = step
            into[f"{base}param_groups.{group.index}.lr"] = group.lr
    zero = describe_zero(ctx)
    ranks = zero.ranks if zero is not None else []
    for rank in ranks[:1] if rank0_only else ranks:
        prefix = path_prefix(ctx, rank.file)
        into[f"{prefix}steps"] = rank.steps
        into[f"{prefix}lr"] = rank.lr


def _config_files(ctx: Context) -> list[str]:
    """JSON files of the checkpoint directory that configure the run (config.json, ds_config.json)."""
    if ctx.target.layout in ("file", "native", "dcp"):
        return []
    return sorted(
        info.key
        for info in ctx.source.store.list("")
        if "/" not in info.key
        and info.key.endswith(".json")
        and "config" in info.key
        and info.size <= _MAX_CONFIG_BYTES
    )


def _flatten(value: Any, path: str, depth: int = 0) -> list[tuple[str, Any]]:
    """``(dotted path, JSON-ready scalar)`` for every non-tensor leaf under ``value``."""
    if as_tensor(value) is not None:
        return []
    if depth > _MAX_DEPTH:
        return [(path, "…")]
    if type(value) is VettedObject and isinstance(value.state, Mapping):
        return [(_join(path, "class"), value.cls.qualname), *_flatten(dict(value.state), path, depth + 1)]
    if type(value) is NdArray:
        return [(path, f"<ndarray {value.dtype} {list(value.shape)} {_fingerprint(value.data)}>")]
    if isinstance(value, Mapping):
        if not value:
            return [(path, {})]
        return [leaf for k, v in value.items() for leaf in _flatten(v, _join(path, k), depth + 1)]
    if isinstance(value, (list, tuple)):
        if len(value) > _SUMMARISED and all(_is_scalar(v) for v in value):
            return [(path, f"<{len(value)} values {_fingerprint(repr(list(value)).encode())}>")]
        if not value:
            return [(path, [])]
        return [leaf for i, v in enumerate(value) for leaf in _flatten(v, _join(path, i), depth + 1)]
    return [(path, plain(value))]


def _is_scalar(value: Any) -> bool:
    return value is None or type(value) in (bool, int, float, str)


def _join(path: str, key: Any) -> str:
    part = key if isinstance(key, str) else repr(key)
    if not path or path.endswith(":"):
        return f"{path}{part}"
    return f"{path}.{part}"


def _fingerprint(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:12]
