"""Attestation: proof that the state a trainer is about to train on is the state that was saved.

:func:`attest` hashes the live, loaded state in memory (BLAKE3 of each tensor's bytes, on CPU,
one tensor at a time) and compares it with the checkpoint's saved state, read safely from its
committed files (:mod:`ckptkit.attest_saved`; DeepSpeed engines:
:mod:`ckptkit.integrations.deepspeed_attest`).
Every tensor and field that differs is named: a model tensor, an optimizer state entry (with
its parameter's name when the model is given), a param group hyperparameter, a scheduler or
scaler field. Only what is passed is compared; each part passed must be in the checkpoint.
"""

from __future__ import annotations

import os
from typing import Any

from ckptkit.attest_core import PARTS, AttestReport, Difference, TensorDigest, attest_parts
from ckptkit.catalog import CheckpointInfo, read_manifest
from ckptkit.manifest import Manifest
from ckptkit.storage import Store, open_store

__all__ = ["AttestReport", "Difference", "TensorDigest", "attest"]


def attest(
    manifest_or_path: str | os.PathLike[str] | Store | CheckpointInfo,
    model: Any = None,
    optimizer: Any = None,
    scheduler: Any = None,
    scaler: Any = None,
    *,
    strict: bool = True,
    **storage_options: Any,
) -> AttestReport:
    """Compare the live ``model``/``optimizer``/``scheduler``/``scaler`` with what the committed
    checkpoint ``manifest_or_path`` (a path or URL, an open store, or a :class:`CheckpointInfo`
    from ``list_checkpoints``) saved. ``model`` is an ``nn.Module`` or a state dict (a DeepSpeed
    engine for a DeepSpeed checkpoint); the others anything with ``state_dict()``, or a state
    dict. With ``strict`` (the default) a difference raises
    :class:`~ckptkit.errors.AttestationError` naming what differs; else the report says so.

    Layouts: ckptkit native (``save``, ``CheckpointManager``, Lightning), HF Trainer
    (``checkpoint-N``), DCP, one ``torch.save`` or safetensors file, and DeepSpeed (pass the
    engine as ``model``).
    """
    checkpoint, manifest = _open(manifest_or_path, storage_options)
    if manifest.layout == "deepspeed":
        from ckptkit.integrations.deepspeed_attest import attest_engine

        report = attest_engine(model, checkpoint, manifest, scheduler=scheduler)
    else:
        parts = zip(PARTS, (model, optimizer, scheduler, scaler), strict=True)
        given = {part: live for part, live in parts if live is not None}
        if manifest.layout == "dcp":
            report = attest_parts(checkpoint.url, _read_dcp(checkpoint, set(given)), given)
        else:
            from ckptkit.attest_saved import attest_files

            report = attest_files(checkpoint, manifest, given)
    if strict:
        report.raise_for_differences()
    return report


def _open(target: Any, storage_options: dict[str, Any]) -> tuple[Store, Manifest]:
    if isinstance(target, CheckpointInfo):
        checkpoint = open_store(target.url, **storage_options)
        return checkpoint, target.manifest or read_manifest(checkpoint)
    if isinstance(target, Manifest):
        raise TypeError("attest needs to know where the checkpoint is: pass its path, URL or CheckpointInfo")
    checkpoint = target if isinstance(target, Store) else open_store(target, **storage_options)
    return checkpoint, read_manifest(checkpoint)


def _read_dcp(checkpoint: Store, want: set[str]) -> dict[str, Any]:
    """A DCP checkpoint's saved parts: read whole into a fresh state dict through ckptkit's
    verified reader (``.metadata`` unpickled with the DCP classes alone), as
    ``dcp_to_torch_save`` reads one; memory: the checkpoint's tensors. Here, not in
    :mod:`ckptkit.attest_saved`: the integrations use that module, and this one reads through
    theirs."""
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    from ckptkit import lineage
    from ckptkit.attest_saved import sections
    from ckptkit.integrations.dcp import CkptkitReader

    state: dict[str, Any] = {}
    with lineage.not_a_resume():
        reader = CkptkitReader(checkpoint)
        _load_state_dict(state, storage_reader=reader, planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    return sections(state, want)
