"""Attestation of a DeepSpeed engine against a committed ZeRO-1/2/3 checkpoint.

The saved side is the checkpoint's per-parameter digests of the fp32 master and every
per-element optimizer state (``exp_avg``, ...), consolidated from the rank files' partitions
by :mod:`ckptkit.ops.zero_source` and :func:`~ckptkit.ops.reshard_certificate.certify` (byte
ranges read symbolically, nothing unpickled); plus the engine counters and the LR scheduler
from the model-states file, through the safe loader. The live side is what the engine holds
after its load: each parameter's full fp32 master and optimizer states
(``deepspeed.utils.safe_get_full_fp32_param`` / ``safe_get_full_optimizer_state``), which are
collectives: every rank calls this, parameters in the same order, as every rank calls
``load_checkpoint``.
"""

from __future__ import annotations

from typing import Any

from ckptkit.attest_core import AttestReport, Difference, compare, digest_tree, tensor_digest
from ckptkit.commit import files_of
from ckptkit.manifest import Manifest
from ckptkit.storage import Store

_COUNTERS = ("global_steps", "global_samples", "skipped_steps")
FP32 = "fp32"


def attest_engine(
    engine: Any, checkpoint: Store, manifest: Manifest, *, tag: str | None = None, scheduler: Any = None
) -> AttestReport:
    """Compare DeepSpeed ``engine`` (after ``load_checkpoint``) with the ZeRO checkpoint
    ``checkpoint``; ``tag`` where the checkpoint is a whole save dir (default: its ``latest``)."""
    if engine is None or not callable(getattr(engine, "zero_optimization_stage", None)):
        raise TypeError(
            f"{checkpoint.url} is a DeepSpeed checkpoint: pass the DeepSpeed engine as model="
        )
    from ckptkit.ops.reshard_certificate import certify
    from ckptkit.ops.zero_source import read_zero
    from ckptkit.safe import safe_load_key

    ckpt = read_zero(files_of(checkpoint, manifest), tag=tag)
    saved = certify(ckpt, jobs=4)
    report = AttestReport(checkpoint.url)
    report.compared["params"] = _compare_params(engine, saved, report.differences)
    model_states = safe_load_key(ckpt.store, ckpt.model_names[0], "cpu")
    counters = {k: model_states.get(k) for k in _COUNTERS if k in model_states}
    report.compared["engine"] = compare(
        counters, {k: getattr(engine, k, None) for k in counters}, "engine", report.differences
    )
    live_scheduler = scheduler if scheduler is not None else getattr(engine, "lr_scheduler", None)
    if live_scheduler is not None:
        saved_scheduler = model_states.get("lr_scheduler")
        if saved_scheduler is None:
            report.differences.append(Difference("scheduler", "not in the checkpoint"))
        else:
            report.compared["scheduler"] = compare(
                digest_tree(saved_scheduler), digest_tree(live_scheduler.state_dict()), "scheduler",
                report.differences,
            )
    return report


def _compare_params(engine: Any, saved: dict[str, dict[str, str]], out: list[Difference]) -> int:
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    # ZeRO-1/2 link each param to its optimizer-state fragments at the first step after init;
    # right after a load (no step yet) the link is made here, as DeepSpeed's own step would.
    getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", lambda: None)()
    live = {name: p for name, p in engine.module.named_parameters() if p.requires_grad}
    count = 0
    for name in [n for n in saved if n not in live]:
        out.append(Difference(f"params.{name}", "saved, not a trainable parameter of the live model"))
    for name, param in live.items():  # the same order on every rank: these are collectives
        digests = saved.get(name)
        fp32 = safe_get_full_fp32_param(param)
        if digests is None:
            out.append(Difference(f"params.{name}", "a trainable parameter of the live model, not saved"))
            continue
        for key in sorted(digests):
            value = fp32 if key == FP32 else _optimizer_state(safe_get_full_optimizer_state, param, key)
            count += 1
            where = f"params.{name}.{key}"
            if value is None:
                out.append(Difference(where, "saved, not loaded (the live optimizer has no such state)"))
            elif tensor_digest(value.float()).digest != digests[key]:
                out.append(Difference(where, "values differ"))
    return count


def _optimizer_state(get: Any, param: Any, key: str) -> Any:
    """The full optimizer state ``key`` of ``param``, None where the optimizer has none (its
    state was not loaded): ZeRO-3 raises KeyError then, on every rank alike."""
    try:
        return get(param, key)
    except KeyError:
        return None
