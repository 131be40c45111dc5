"""``ckptkit plan``: what a resume from PATH will meet, before any GPU is allocated.

Without loading a tensor or running a pickle, :func:`plan_resume` answers what a trainer finds:

- which checkpoint it picks (DeepSpeed's ``latest``, the HF Trainer's highest ``checkpoint-N``)
  and whether that is ckptkit's choice (the newest committed one);
- whether the saved topology fits the world size, and which files each rank reads (and how many
  bytes: the memory each rank needs to load);
- what ``torch.load`` does with each of those files under the load's ``weights_only`` setting
  and the resuming torch/DeepSpeed versions (``resume_plan_loads``, ``resume_plan_versions``);
- missing rank files and RNG states, incomplete or unverified checkpoints.

Each finding carries a one-line fix. Errors mean the resume will fail (or silently load the wrong
thing); warnings mean it runs but not exactly as saved.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import asdict, dataclass, field
from typing import Any

from ckptkit.catalog import CheckpointInfo, latest_checkpoint, read_manifest
from ckptkit.commit import files_of, logical_path
from ckptkit.errors import EXIT_FINDINGS, EXIT_OK, FormatError, NotCommittedError
from ckptkit.formats import deepspeed as ds
from ckptkit.formats import hf_trainer as hf
from ckptkit.manifest import MANIFEST_NAME
from ckptkit.ops.resume_plan_loads import Severity, predict_load, transformers_rng_globals
from ckptkit.ops.resume_plan_versions import (
    DEEPSPEED_PASSES_WEIGHTS_ONLY_FALSE_SINCE,
    WEIGHTS_ONLY_DEFAULT_SINCE,
    at_least,
    installed_version,
)
from ckptkit.ops.verify import verify_checkpoint
from ckptkit.storage import Store
from ckptkit.storage.target import resolve_target

# The files the Trainer restores the model from (transformers' _load_from_checkpoint); without any
# of them it raises "Can't find a valid checkpoint".
HF_WEIGHTS = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
    "adapter_model.safetensors", "adapter_model.bin",
)

# What the Trainer restores only when the file is there (transformers' _load_optimizer_and_scheduler
# and its trainer_state.json check); without it the run goes on from fresh state, without a word.
HF_STATE = {
    "trainer_state.json": "the step, epoch and schedule position",
    "optimizer.pt": "the optimizer (moments and step counts)",
    "scheduler.pt": "the learning-rate schedule",
}


@dataclass(frozen=True)
class Finding:
    kind: str
    severity: Severity
    file: str | None
    message: str
    fix: str


@dataclass
class ResumePlan:
    url: str
    layout: str  # deepspeed | hf-trainer | torch
    checkpoint: str | None  # the checkpoint a trainer resumes from, relative to url ("" = url itself)
    ckptkit_choice: str | None  # the newest committed checkpoint under url, when url is a root
    committed: bool
    world_size: int  # the ranks that resume (0 until resolved: as saved)
    saved_world_size: int | None
    zero_stage: int | None
    weights_only: bool
    safe_globals: bool
    trainer_loads: bool  # weights_only not given: the trainer's own loader is predicted
    versions: dict[str, str | None]
    files: dict[str, int] = field(default_factory=dict)  # file → size, of those a resume reads
    rank_bytes: dict[int, int] = field(default_factory=dict)  # rank → bytes it reads to load
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(f.severity == "error" for f in self.findings)

    @property
    def exit_code(self) -> int:
        return EXIT_OK if self.ok else EXIT_FINDINGS

    def add(self, kind: str, severity: Severity, file: str | None, message: str, fix: str) -> None:
        self.findings.append(Finding(kind, severity, file, message, fix))

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["ok"] = self.ok
        data["rank_bytes"] = {str(rank): size for rank, size in self.rank_bytes.items()}
        return data


def plan_resume(
    path: str | os.PathLike[str] | Store,
    *,
    world_size: int | None = None,
    weights_only: bool | None = None,
    safe_globals: bool = False,
    torch_version: str | None = None,
    deepspeed_version: str | None = None,
    zero_stage: int | None = None,
    verify: bool = False,
    **storage_options: Any,
) -> ResumePlan:
    """Predict a resume from ``path`` (a run root, a checkpoint or a file; local or remote).

    ``world_size``: the ranks that will resume (default: as saved). ``weights_only``: what the
    loader passes to ``torch.load`` (default: what the trainer does: DeepSpeed's engine passes
    False since 0.16.4, everything else gets torch's default, True since torch 2.6).
    ``safe_globals``: the loader runs inside ``ckptkit.safe_globals()`` (or ``use_ckptkit``).
    ``torch_version`` / ``deepspeed_version``: of the resuming environment (default: installed).
    ``zero_stage``: the resuming engine's ZeRO stage, if it may differ from the saved one.
    ``verify``: hash every committed file against its manifest (default: presence and sizes).
    """
    target = resolve_target(path, **storage_options)
    versions = {
        "torch": torch_version or installed_version("torch"),
        "deepspeed": deepspeed_version or installed_version("deepspeed"),
    }
    if target.key is not None:  # one file: a plain torch.save checkpoint
        size = target.store.head(target.key).size
        plan = _new_plan(target.url, "torch", "", world_size, weights_only, safe_globals, versions)
        plan.world_size = plan.world_size or 1
        plan.files = {target.key: size}
        plan.rank_bytes = {r: size for r in range(plan.world_size)}
        _predict_loads(plan, target.store, list(plan.files))
        return plan
    root = target.store
    top = _top_names(root)
    if ds.LATEST in top["files"] or any(_is_tag_dir(root, d) for d in top["dirs"]):
        return _plan_deepspeed_root(
            root, world_size, weights_only, safe_globals, versions, zero_stage, verify
        )
    if ds.is_tag_directory(top["files"]):
        plan = _new_plan(root.url, "deepspeed", "", world_size, weights_only, safe_globals, versions)
        _plan_deepspeed_tag(plan, root, zero_stage, verify)
        return plan
    if hf.TRAINER_STATE in top["files"]:
        plan = _new_plan(root.url, "hf-trainer", "", world_size, weights_only, safe_globals, versions)
        _plan_hf_checkpoint(plan, root, verify)
        return plan
    choice = hf.newest_checkpoint(top["dirs"])
    if choice is not None:
        return _plan_hf_root(root, choice, world_size, weights_only, safe_globals, versions, verify)
    plan = _new_plan(root.url, "torch", "", world_size, weights_only, safe_globals, versions)
    _plan_files(plan, root, verify)
    return plan


# --- shared ----------------------------------------------------------------------------------


def _new_plan(
    url: str, layout: str, checkpoint: str | None, world_size: int | None, weights_only: bool | None,
    safe_globals: bool, versions: dict[str, str | None],
) -> ResumePlan:
    return ResumePlan(
        url=url, layout=layout, checkpoint=checkpoint, ckptkit_choice=None, committed=False,
        world_size=world_size or 0, saved_world_size=None, zero_stage=None,
        weights_only=_effective_weights_only(weights_only, layout, versions), safe_globals=safe_globals,
        trainer_loads=weights_only is None, versions=versions,
    )


def _effective_weights_only(explicit: bool | None, layout: str, versions: dict[str, str | None]) -> bool:
    if explicit is not None:
        return explicit
    deepspeed, torch = versions["deepspeed"], versions["torch"]
    if layout == "deepspeed" and deepspeed and at_least(deepspeed, DEEPSPEED_PASSES_WEIGHTS_ONLY_FALSE_SINCE):
        return False
    return torch is None or at_least(torch, WEIGHTS_ONLY_DEFAULT_SINCE)


def _top_names(store: Store) -> dict[str, list[str]]:
    files, dirs = [], set()
    for info in store.list(""):
        head, sep, _ = info.key.partition("/")
        if sep:
            dirs.add(head)
        else:
            files.append(head)
    return {"files": files, "dirs": sorted(dirs)}


def _is_tag_dir(root: Store, name: str) -> bool:
    return not name.startswith(".") and ds.is_tag_directory(_top_names(root.child(name))["files"])


def _checkpoint_files(plan: ResumePlan, checkpoint: Store, verify: bool) -> tuple[Store, dict[str, int]]:
    """The checkpoint's files (logical path → size) and the store that presents them: from the
    manifest when committed (checked as ``verify`` asks), else from a listing."""
    try:
        manifest = read_manifest(checkpoint)
    except NotCommittedError:
        files = {i.key: i.size for i in checkpoint.list("") if not i.key.startswith(".")}
        return checkpoint, files
    plan.committed = True
    _check_manifest(plan, checkpoint, verify)
    return files_of(checkpoint, manifest), {logical_path(e.path): e.size for e in manifest.files}


def _check_manifest(plan: ResumePlan, checkpoint: Store, verify: bool) -> None:
    """Sizes and presence of every listed file (one listing); with ``verify``, digests too."""
    report = verify_checkpoint(checkpoint, quick=not verify)
    for problem in report.findings:
        if problem.severity == "error":
            plan.add("unverified", "error", problem.path, problem.message,
                     "restore the checkpoint from a good copy, or resume from an older one")


def _not_committed(plan: ResumePlan, root_has_commits: bool, name: str) -> None:
    if root_has_commits:
        plan.add(
            "incomplete", "error", name,
            f"{name} has no committed {MANIFEST_NAME}: an interrupted save or another run's files",
            f"resume from {plan.ckptkit_choice} (ckptkit's newest committed checkpoint) instead",
        )
    else:
        plan.add(
            "uncommitted", "warning", name,
            "not committed by ckptkit: no digests, so completeness is checked by structure only",
            f"ckptkit index {plan.url.rstrip('/')}/{name}".rstrip("/"),
        )


def _predict_loads(
    plan: ResumePlan, store: Store, keys: list[str], loader_allows: dict[str, frozenset[str]] | None = None
) -> None:
    for key in keys:
        findings = predict_load(
            store, key, weights_only=plan.weights_only, safe_globals=plan.safe_globals,
            versions=plan.versions, also_allowed=(loader_allows or {}).get(key, frozenset()),
        )
        for f in findings:
            plan.add(f.kind, f.severity, key, f.message, f.fix)


def _choice(plan: ResumePlan, newest: CheckpointInfo | None, trainer_choice: str) -> None:
    """Record ckptkit's pick (the newest committed checkpoint) and how the trainer's differs."""
    plan.ckptkit_choice = newest.name if newest else None
    if newest is not None and newest.name != trainer_choice:
        plan.add(
            "choice", "warning", trainer_choice,
            f"the trainer resumes from {trainer_choice}; "
            f"ckptkit's newest committed checkpoint is {newest.name}",
            f"resume from {newest.name} explicitly if that is the one you mean",
        )


# --- DeepSpeed -------------------------------------------------------------------------------


def _plan_deepspeed_root(
    root: Store, world_size: int | None, weights_only: bool | None, safe_globals: bool,
    versions: dict[str, str | None], zero_stage: int | None, verify: bool,
) -> ResumePlan:
    plan = _new_plan(root.url, "deepspeed", None, world_size, weights_only, safe_globals, versions)
    newest = latest_checkpoint(root)
    plan.ckptkit_choice = newest.name if newest else None  # named in the fixes below
    try:
        tag = ds.resolve_latest(root)
    except FormatError as exc:
        plan.add("latest", "error", ds.LATEST, str(exc),
                 f"write the tag to resume into 'latest' ({plan.ckptkit_choice or 'a complete tag'})")
        return plan
    if tag is None:
        plan.add("latest", "error", ds.LATEST,
                 "no 'latest' file: engine.load_checkpoint(dir) finds nothing and trains from scratch",
                 f"pass tag={plan.ckptkit_choice or '<tag>'} to load_checkpoint, or write it into 'latest'")
        return plan
    plan.checkpoint = tag
    _choice(plan, newest, tag)
    _plan_deepspeed_tag(plan, root.child(tag), zero_stage, verify, root_has_commits=newest is not None)
    return plan


def _plan_deepspeed_tag(
    plan: ResumePlan, tag_store: Store, zero_stage: int | None, verify: bool, root_has_commits: bool = False
) -> None:
    store, files = _checkpoint_files(plan, tag_store, verify)
    name = plan.checkpoint or posixpath.basename(tag_store.url.rstrip("/"))
    if not plan.committed:
        _not_committed(plan, root_has_commits, name)
    names = list(files)
    found = ds.tag_files(names)
    # ZeRO-3 saves model states per rank; ZeRO-1 and 2 share one layout (planned as 2); 0 has no
    # optimizer partitions.
    per_rank_models = any((m := ds.MODEL_STATES.search(n)) and m.group(1) for n in found.model_states)
    stage = 3 if per_rank_models else 2 if found.optim_states else 0
    topology = ds.topology(names)
    saved = topology["dp_world_size"] or 1
    mp = topology["mp_world_size"]
    plan.zero_stage, plan.saved_world_size = stage, saved
    plan.world_size = plan.world_size or saved
    prefix = _optim_prefix(found.optim_states)
    needed = ds.rank_files(stage, saved, mp, prefix)
    wanted = {f for per_rank in needed.values() for f in per_rank}
    missing = sorted(wanted - set(files), key=ds.natural_key)
    for file in missing:
        plan.add("missing-rank-file", "error", file,
                 f"{file} is missing: the rank that needs it cannot load",
                 "resume from a complete tag (ckptkit verify lists them), or restore the file")
    if zero_stage is not None and ((zero_stage == 3) != (stage == 3) or (zero_stage == 0) != (stage == 0)):
        plan.add("zero-stage", "error", None,
                 f"saved at ZeRO stage {stage}, resuming at stage {zero_stage}: the partitions differ "
                 "and neither DeepSpeed nor ckptkit reshard converts between them",
                 f"resume at stage {stage}, or start from the consolidated weights (ckptkit consolidate) "
                 "with a fresh optimizer")
    if stage and plan.world_size != saved:
        plan.add("world-size", "error", None,
                 f"saved at data-parallel world size {saved}, resuming at {plan.world_size}: "
                 "DeepSpeed cannot repartition ZeRO optimizer state (ZeRO-1/2 refuse, ZeRO-3 fails "
                 "on a shape mismatch)",
                 f"ckptkit reshard {plan.url} DST --world-size {plan.world_size} "
                 "(or load through use_ckptkit, which reshards on load)")
    plan.files = {f: files[f] for per_rank in needed.values() for f in per_rank if f in files}
    plan.rank_bytes = _deepspeed_rank_bytes(plan, needed, files, stage)
    _predict_loads(plan, store, list(plan.files))


def _optim_prefix(optim_states: list[str]) -> str:
    for name in optim_states:
        match = ds.OPTIM_STATES.search(name)
        if match:
            return match.group(1)
    return ""


def _deepspeed_rank_bytes(
    plan: ResumePlan, needed: dict[tuple[int, int], list[str]], files: dict[str, int], stage: int
) -> dict[int, int]:
    """Bytes each resuming rank reads (model-parallel rank 0): its own rank files at the saved
    world size; after a reshard, the partitioned files split evenly and ZeRO-1/2's one
    model-states file read whole by every rank."""
    own = {d: sum(files.get(f, 0) for f in names) for (d, m), names in needed.items() if m == 0}
    if plan.world_size == plan.saved_world_size or not stage:
        return {r: own.get(r if stage else 0, 0) for r in range(plan.world_size)}
    every = {f for (_, m), names in needed.items() if m == 0 for f in names}
    shared = files.get(needed[(0, 0)][0], 0) if stage < 3 else 0
    partitioned = sum(files.get(f, 0) for f in every) - shared
    return {r: shared + -(-partitioned // plan.world_size) for r in range(plan.world_size)}


# --- HF Trainer ------------------------------------------------------------------------------


def _plan_hf_root(
    root: Store, choice: str, world_size: int | None, weights_only: bool | None, safe_globals: bool,
    versions: dict[str, str | None], verify: bool,
) -> ResumePlan:
    plan = _new_plan(root.url, "hf-trainer", choice, world_size, weights_only, safe_globals, versions)
    newest = latest_checkpoint(root)
    _choice(plan, newest, choice)
    _plan_hf_checkpoint(plan, root.child(choice), verify, root_has_commits=newest is not None)
    return plan


def _plan_hf_checkpoint(
    plan: ResumePlan, checkpoint: Store, verify: bool, root_has_commits: bool = False
) -> None:
    store, files = _checkpoint_files(plan, checkpoint, verify)
    name = plan.checkpoint or posixpath.basename(checkpoint.url.rstrip("/"))
    if not plan.committed:
        _not_committed(plan, root_has_commits, name)
    own = {f: size for f, size in files.items() if "/" not in f}
    if not any(f in own for f in HF_WEIGHTS):
        plan.add("missing-weights", "error", None,
                 "no model weights (model.safetensors, pytorch_model.bin, ...): the Trainer raises "
                 "\"Can't find a valid checkpoint\"", "resume from a complete checkpoint")
    for file, what in HF_STATE.items():
        if file not in own and not (file == "optimizer.pt" and any(f.startswith("optimizer") for f in own)):
            plan.add("missing-state", "error", file,
                     f"{file} is missing: the Trainer silently starts {what} afresh",
                     "resume from a checkpoint that has it (the loss or LR jumps otherwise)")
    plan.saved_world_size = max(1, sum(f.startswith("rng_state_") for f in own))
    plan.world_size = plan.world_size or plan.saved_world_size
    wanted = (
        [f"rng_state_{r}.pth" for r in range(plan.world_size)] if plan.world_size > 1 else ["rng_state.pth"]
    )
    for file in wanted:
        if file not in own:
            # transformers' _load_rng_state logs and goes on: the run resumes, not reproducibly.
            plan.add("missing-rng", "warning", file,
                     f"{file} is missing: that rank resumes with fresh random state "
                     "(transformers only logs it)",
                     f"resume at the saved world size ({plan.saved_world_size}) for an exact continuation")
    read = {f: size for f, size in own.items() if f not in hf.NOT_READ and not f.startswith("rng_state")}
    plan.files = {**read, **{f: own[f] for f in wanted if f in own}}
    shared = sum(read.values())
    rng_of = {r: wanted[r] if plan.world_size > 1 else wanted[0] for r in range(plan.world_size)}
    plan.rank_bytes = {r: shared + own.get(file, 0) for r, file in rng_of.items()}
    # The Trainer itself loads every file with weights_only=True, the RNG states inside its own
    # numpy allowlist; a loader the user names (weights_only given) gets no such help.
    allows = transformers_rng_globals(installed_version("numpy")) if plan.trainer_loads else frozenset()
    _predict_loads(plan, store, list(plan.files), {f: allows for f in wanted})


# --- plain files -----------------------------------------------------------------------------


def _plan_files(plan: ResumePlan, directory: Store, verify: bool) -> None:
    """A directory of torch files, a committed checkpoint, or a root of them (its newest)."""
    plan.world_size = plan.world_size or 1
    if not directory.exists(MANIFEST_NAME):
        newest = latest_checkpoint(directory)
        if newest is not None:
            plan.checkpoint = plan.ckptkit_choice = newest.name
            directory = directory.child(newest.name)
    store, files = _checkpoint_files(plan, directory, verify)
    if not plan.committed:
        _not_committed(plan, False, plan.checkpoint or posixpath.basename(directory.url.rstrip("/")))
    plan.files = {f: size for f, size in files.items() if f != MANIFEST_NAME}
    plan.rank_bytes = {r: sum(plan.files.values()) for r in range(plan.world_size)}
    _predict_loads(plan, store, list(plan.files))
