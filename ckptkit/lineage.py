"""Lineage: where a checkpoint comes from, recorded in its manifest as ``metadata["lineage"]``.

Every checkpoint ckptkit commits records ``{"run_id", "parent", "config_digest", "data"}``:

* ``run_id``: one random id per process run; ``CKPTKIT_RUN_ID`` overrides it, so all ranks of
  a job (and a job restarted under the same id, if one wants that) share it. Multi-rank saves
  commit rank 0's metadata, so rank 0's id is the one recorded.
* ``parent``: the checkpoint this process resumed from (``{"url", "checkpoint_id", "step"}``),
  or None. Each integration's load path calls :func:`resumed_from`; the next save records it.
* ``config_digest``: BLAKE3 of the canonical JSON of the training config the integration can
  see (ds_config, TrainingArguments less volatile fields, Lightning hparams), or None.
* ``data``: what the integration can see of the data position (``epoch``, ``global_step``,
  ``samples_consumed``, ``sampler_seed``); keys it cannot see are left out.

Process-wide state, torch-free; ``ckptkit log`` reads it back from manifests alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from ckptkit.manifest import Manifest

LINEAGE_KEY = "lineage"
RUN_ID_ENV = "CKPTKIT_RUN_ID"
DATA_FIELDS = ("epoch", "global_step", "samples_consumed", "sampler_seed")

# TrainingArguments fields that change between runs of one training without changing what it
# trains: where it writes and logs, how it was launched, how to resume. Left out of the digest
# so a resume with a new output_dir or resume path still digests as the same config.
VOLATILE_TRAINING_ARGS = frozenset({
    "output_dir", "logging_dir", "run_name", "resume_from_checkpoint", "overwrite_output_dir",
    "local_rank", "hub_token", "push_to_hub_token", "hub_model_id", "push_to_hub",
    "report_to", "logging_steps", "save_steps", "save_total_limit", "dataloader_num_workers",
    "ddp_backend", "disable_tqdm",
})

_lock = threading.Lock()
_run_id: str | None = None
_parent: dict[str, Any] | None = None
_reading = threading.local()  # inside not_a_resume(): per thread, as loads run in the caller's


def run_id() -> str:
    """This process run's id: ``CKPTKIT_RUN_ID`` if set, else a random one made once."""
    global _run_id
    configured = os.environ.get(RUN_ID_ENV)
    if configured:
        return configured
    with _lock:
        if _run_id is None:
            _run_id = uuid.uuid4().hex[:16]
        return _run_id


@contextlib.contextmanager
def not_a_resume() -> Iterator[None]:
    """Loads inside (attestation reading the saved state) leave the parent as it is."""
    _reading.depth = getattr(_reading, "depth", 0) + 1
    try:
        yield
    finally:
        _reading.depth -= 1


def resumed_from(checkpoint_url: str, manifest: Manifest) -> None:
    """Record that this process loaded committed checkpoint ``checkpoint_url`` to resume from
    it: the parent of every checkpoint it saves from now on."""
    global _parent
    if getattr(_reading, "depth", 0):
        return
    with _lock:
        _parent = {"url": checkpoint_url, "checkpoint_id": manifest.checkpoint_id, "step": manifest.step}


def current_parent() -> dict[str, Any] | None:
    with _lock:
        return dict(_parent) if _parent is not None else None


def forget_parent() -> None:
    """Start afresh (a new training in the same process; tests)."""
    global _parent
    with _lock:
        _parent = None


def config_digest(config: Mapping[str, Any] | None) -> str | None:
    """``blake3:<hex>`` of ``config`` as canonical JSON (sorted keys, no spaces; values JSON
    cannot hold written as ``str``), or None for no config."""
    if config is None:
        return None
    from blake3 import blake3

    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str, ensure_ascii=True)
    return "blake3:" + blake3(text.encode()).hexdigest()


def training_args_config(args_dict: Mapping[str, Any]) -> dict[str, Any]:
    """``TrainingArguments.to_dict()`` without its volatile fields (:data:`VOLATILE_TRAINING_ARGS`)."""
    return {k: v for k, v in args_dict.items() if k not in VOLATILE_TRAINING_ARGS}


def data_position(**fields: Any) -> dict[str, Any]:
    """The data position fields that are known (not None), as JSON numbers."""
    unknown = set(fields) - set(DATA_FIELDS)
    if unknown:
        raise ValueError(f"unknown data position fields: {sorted(unknown)}")
    return {k: (float(v) if isinstance(v, float) else int(v)) for k, v in fields.items() if v is not None}


def record(config: Mapping[str, Any] | None = None, data: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The lineage record of a checkpoint saved now by this process."""
    return {
        "run_id": run_id(),
        "parent": current_parent(),
        "config_digest": config_digest(config),
        "data": dict(data or {}),
    }


def stamp(
    metadata: Mapping[str, Any] | None,
    *,
    config: Mapping[str, Any] | None = None,
    data: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """``metadata`` with ``lineage`` added. Fields the caller already put in
    ``metadata["lineage"]`` win (a user who knows the config or data position better)."""
    stamped = dict(metadata or {})
    own = stamped.get(LINEAGE_KEY)
    lineage = record(config, data)
    if isinstance(own, Mapping):
        lineage.update(own)
    stamped[LINEAGE_KEY] = lineage
    return stamped


@dataclass(frozen=True)
class Lineage:
    """A manifest's lineage record, read back leniently: a manifest without one (written before
    lineage existed, or by another tool) has None."""

    run_id: str | None
    parent: dict[str, Any] | None
    config_digest: str | None
    data: dict[str, Any]

    @classmethod
    def of(cls, manifest: Manifest) -> Lineage | None:
        raw = manifest.metadata.get(LINEAGE_KEY)
        if not isinstance(raw, Mapping):
            return None
        parent = raw.get("parent")
        data = raw.get("data")
        return cls(
            run_id=raw.get("run_id") if isinstance(raw.get("run_id"), str) else None,
            parent=dict(parent) if isinstance(parent, Mapping) else None,
            config_digest=raw.get("config_digest") if isinstance(raw.get("config_digest"), str) else None,
            data=dict(data) if isinstance(data, Mapping) else {},
        )
