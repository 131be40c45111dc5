"""Verify a checkpoint that has no ckptkit manifest, with every check its own files allow.

Most checkpoints in the wild were written by torch, DeepSpeed, HF Trainer or DCP and record no
content digests, so bit rot cannot be ruled out; but much can still be proven from the files
themselves: every zip record against its CRC-32 (torch.load never checks them), zip directories
and record bounds, tensor views against their storage records, safetensors layout rules, HF
index files against their shards, DCP ``.metadata`` against its ``.distcp`` files, and that a
DeepSpeed tag holds every rank's model and optimizer file for the world size its files state.
Files are read through the Store, so this works the same on local disk and S3.
"""

from __future__ import annotations

import json
import posixpath
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ckptkit.errors import FormatError
from ckptkit.formats import zipfile_reader as zr
from ckptkit.formats.dcp import METADATA, read_dcp
from ckptkit.formats.deepspeed import (
    GLOBAL_STEP_TAG,
    LATEST,
    MODEL_STATES,
    OPTIM_STATES,
    expected_files,
    is_deepspeed,
    resolve_latest,
)
from ckptkit.formats.hf_index import read_hf_index
from ckptkit.formats.layout import detect_layout
from ckptkit.formats.safetensors import read_safetensors_header
from ckptkit.formats.sniff import detect
from ckptkit.formats.torchfile import TorchFile, read_torch_file
from ckptkit.ops.verify_report import Finding, VerifyReport
from ckptkit.progress import NO_PROGRESS, Progress
from ckptkit.storage import Store
from ckptkit.storage.read_cache import ReadCache

MAX_JSON_BYTES = 64 << 20
# Extensions that promise a checkpoint format: unknown content behind one is a finding.
_CHECKPOINT_SUFFIXES = frozenset({".pt", ".pth", ".bin", ".ckpt", ".pkl", ".safetensors", ".distcp"})
NO_DIGESTS = (
    "no ckptkit manifest: only structural checks ran, and no content digests were available "
    "to compare against; 'ckptkit index' records them for later verifies"
)


@dataclass
class _Context:
    store: Store
    report: VerifyReport
    torch_files: dict[str, TorchFile] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)  # known from the listing: no HEAD per file
    # DCP data files, checked against their .metadata; their bytes are DCP's own layout.
    dcp_data: set[str] = field(default_factory=set)

    def error(self, path: str, kind: str, message: str) -> None:
        self.report.findings.append(Finding(path, kind, message))

    def warn(self, path: str, kind: str, message: str) -> None:
        self.report.findings.append(Finding(path, kind, message, "warning"))


def verify_structure(
    store: Store,
    keys: list[str] | None = None,
    sizes: Mapping[str, int | None] | None = None,
    progress: Progress | None = None,
) -> VerifyReport:
    """Check every file below ``store`` (or just ``keys``, whose ``sizes`` the caller may know)
    for internal consistency; no manifest is needed. ``progress`` hears of each file checked."""
    started = time.perf_counter()
    url = f"{store.url.rstrip('/')}/{keys[0]}" if keys and len(keys) == 1 else store.url
    if keys is None:
        known = {info.key: info.size for info in store.list("")}
        keys = list(known)
    else:
        known = {k: size for k, size in (sizes or {}).items() if size is not None}
    # Several readers look at each file in turn (sniffing, the zip directory, the pickle): through
    # the cache each small range is fetched once, and the listing's sizes answer every HEAD.
    ctx = _Context(ReadCache(store, known), VerifyReport(url=url, status="failed"), sizes=known)
    keys = sorted(keys)
    ctx.report.layout = detect_layout(keys).kind
    _check_files(ctx, keys, progress or NO_PROGRESS)
    _check_deepspeed(ctx, keys)
    _check_latest(ctx, keys)
    ctx.report.files_checked = len(keys)
    ctx.warn("", "no-manifest", NO_DIGESTS)
    ctx.report.status = "structural-ok" if ctx.report.ok else "failed"
    ctx.report.seconds = time.perf_counter() - started
    return ctx.report


def _check_files(ctx: _Context, keys: list[str], progress: Progress) -> None:
    # Counted per file, whole: a file's check reads from its header up to all of it (zip CRCs).
    progress.start(sum(ctx.sizes.get(k, 0) for k in keys), len(keys))
    try:
        # .metadata first: the data files it names are checked by the DCP reader, not sniffed.
        for key in sorted(keys, key=lambda k: posixpath.basename(k) != METADATA):
            if key not in ctx.dcp_data:
                try:
                    _check_file(ctx, key)
                except FormatError as exc:
                    ctx.error(key, "format", str(exc))
            progress.advance(ctx.sizes.get(key, 0))
            progress.file_done()
    finally:
        progress.finish()


# --- one file ---------------------------------------------------------------------------------


_CHECKPOINT_KINDS = frozenset(
    {"torch-zip", "torchscript", "torch-legacy", "pickle", "dcp-metadata", "safetensors", "npy"}
)


def _check_file(ctx: _Context, key: str) -> None:
    found = detect(ctx.store, key, ctx.sizes.get(key))
    if found.bad:
        suffix = posixpath.splitext(key)[1].lower()
        if found.kind != "unknown" or suffix in _CHECKPOINT_SUFFIXES:
            ctx.error(key, found.kind, found.detail)
        return
    if found.kind in _CHECKPOINT_KINDS:
        ctx.report.checkpoint_files = (ctx.report.checkpoint_files or 0) + 1
    archive = _check_zip(ctx, key) if found.kind in ("torch-zip", "torchscript", "zip") else None
    if found.kind in ("torch-zip", "torch-legacy", "pickle"):
        torch_file = read_torch_file(ctx.store, key, archive=archive)
        ctx.torch_files[key] = torch_file
        for problem in torch_file.problems:
            if "CRC-32" not in problem:  # _check_zip reported every record's CRC already
                ctx.error(key, "tensor" if "storage" in problem or "view" in problem else "pickle", problem)
    elif found.kind == "dcp-metadata":
        prefix = posixpath.dirname(key)
        checkpoint = read_dcp(ctx.store, prefix)
        ctx.dcp_data.update(posixpath.join(prefix, name) for name in checkpoint.files)
        for problem in checkpoint.problems:
            ctx.error(key, "dcp", problem)
    elif found.kind == "safetensors":
        header = read_safetensors_header(ctx.store, key, strict=False)
        for problem in header.problems:
            ctx.error(key, "safetensors", problem)
    elif found.kind == "json":
        _check_json(ctx, key)


def _check_zip(ctx: _Context, key: str) -> zr.ZipArchive:
    archive = zr.read_zip(ctx.store, key)  # directory and record bounds: FormatError if broken
    for problem in archive.problems:
        ctx.error(key, "zip", problem)
    # Every record in one pass in offset order: a remote file is read once, in large requests.
    crcs = zr.record_crcs(ctx.store, archive)
    for entry in archive.entries:
        if entry.crc32 == 0 and entry.size:
            ctx.warn(key, "crc", f"{entry.name}: no CRC-32 recorded (written with CRCs off); not checked")
            continue
        ctx.report.bytes_checked += entry.compressed_size
        if crcs[entry.index] != entry.crc32:
            ctx.error(key, "crc", f"{entry.name}: fails its CRC-32 check: the bytes changed after writing")
    return archive


def _check_json(ctx: _Context, key: str) -> None:
    size = ctx.store.head(key).size
    if size > MAX_JSON_BYTES:
        return
    try:
        document = json.loads(ctx.store.get(key))
    except (ValueError, RecursionError) as exc:
        ctx.error(key, "json", f"not valid JSON: {exc}")
        return
    if key.endswith(".index.json") and isinstance(document, dict) and "weight_map" in document:
        for problem in read_hf_index(ctx.store, key).problems:
            ctx.error(key, "hf-index", problem)


# --- across files -------------------------------------------------------------------------------


def _check_deepspeed(ctx: _Context, keys: list[str]) -> None:
    """Every rank's model and optimizer file, for the data- and model-parallel sizes the files state."""
    by_dir: dict[str, list[str]] = {}
    for key in keys:
        by_dir.setdefault(posixpath.dirname(key), []).append(posixpath.basename(key))
    for directory, names in sorted(by_dir.items()):
        models = sorted(n for n in names if MODEL_STATES.search(n))
        if models:
            _check_tag(ctx, directory, set(names), models)


def _check_tag(ctx: _Context, directory: str, names: set[str], models: list[str]) -> None:
    first = posixpath.join(directory, models[0])
    state = ctx.torch_files.get(first)
    value = state.value if state is not None else None
    dp, mp = _count(value, "dp_world_size"), _count(value, "mp_world_size")
    if dp is None or mp is None:
        ctx.error(first, "deepspeed", "model states state no dp_world_size / mp_world_size")
        return
    config = value.get("ds_config") if isinstance(value, dict) else None
    zero = config.get("zero_optimization") if isinstance(config, dict) else None
    stage = zero.get("stage", 0) if isinstance(zero, dict) else 0
    optims = [m for m in map(OPTIM_STATES.search, names) if m]
    prefix = optims[0].group(1) if optims else ""
    missing = [n for n in expected_files(stage, dp, mp, prefix) if n not in names]
    for name in missing:
        ctx.error(
            posixpath.join(directory, name),
            "deepspeed",
            f"{name} is missing: ZeRO stage {stage} with dp_world_size {dp}, mp_world_size {mp} "
            "writes one per rank",
        )
    for match in optims:
        _check_partition_count(ctx, posixpath.join(directory, match.group(0)), dp)
    _check_tag_step(ctx, first, directory, value)
    if stage and mp == 1 and not missing:
        _check_partition_sizes(ctx, directory)


def _check_partition_sizes(ctx: _Context, directory: str) -> None:
    """Every rank's flat partitions must hold exactly the parameters ``param_shapes`` lists,
    split the way the ZeRO stage splits them: the plan consolidation would follow, without
    reading tensor bytes."""
    from ckptkit.ops.consolidate import plan_zero

    try:
        plan_zero(ctx.store.child(directory) if directory else ctx.store)
    except FormatError as exc:
        ctx.error(directory or ".", "deepspeed", f"partitions do not match param_shapes: {exc}")


def _check_tag_step(ctx: _Context, key: str, directory: str, value: Any) -> None:
    """A ``global_stepN`` tag must hold the state of step N: a mismatch means files were moved
    or mixed between tags."""
    tag_step = GLOBAL_STEP_TAG.fullmatch(posixpath.basename(directory))
    steps = value.get("global_steps") if isinstance(value, dict) else None
    if tag_step and type(steps) is int and steps != int(tag_step.group(1)):
        ctx.error(key, "deepspeed", f"tag {posixpath.basename(directory)} holds global_steps {steps}")


def _check_partition_count(ctx: _Context, key: str, dp: int) -> None:
    torch_file = ctx.torch_files.get(key)
    value = torch_file.value if torch_file is not None else None
    state = value.get("optimizer_state_dict") if isinstance(value, dict) else None
    counts = state.get("partition_count") if isinstance(state, dict) else None
    counts = [counts] if type(counts) is int else counts
    if isinstance(counts, list) and any(c != dp for c in counts):
        ctx.error(key, "deepspeed", f"partition_count {counts} differs from dp_world_size {dp}")


def _check_latest(ctx: _Context, keys: list[str]) -> None:
    """DeepSpeed's ``latest`` beside DeepSpeed files must pass the rules every reader applies."""
    for key in keys:
        base = posixpath.dirname(key)
        beside = [k for k in keys if k.startswith(f"{base}/" if base else "")]
        if posixpath.basename(key) != LATEST or not is_deepspeed(beside):
            continue
        try:
            resolve_latest(ctx.store.child(base) if base else ctx.store)
        except FormatError as exc:
            ctx.error(key, "deepspeed", str(exc))


def _count(value: Any, name: str) -> int | None:
    found = value.get(name) if isinstance(value, dict) else None
    return found if type(found) is int and found > 0 else None
