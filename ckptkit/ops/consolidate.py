"""``consolidate``: a DeepSpeed ZeRO checkpoint as one fp32 (or bf16/fp16) HF-style state dict.

The algorithm is ``zero_to_fp32``'s (formats.md §10.5), but nothing is unpickled: the optimizer
and model-states files go through ckptkit's symbolic reader, which says where each flat fp32
partition's bytes lie in its file, and every output tensor is then described as a list of byte
ranges ("pieces") in the rank files. Writing reads one tensor's pieces at a time with ranged
reads, casts it and streams it into the output shard, so peak memory is about one tensor (plus
the symbolic trees), never the model.

Differences from DeepSpeed's tool, on purpose:

* **Frozen parameters at stage 1** are recovered from rank 0's ``module`` (stored in the
  training dtype); ``zero_to_fp32`` silently drops them.
* **One output dtype**: every floating tensor (trainable, frozen, buffer) is cast to ``dtype``,
  as HF checkpoints are; ``zero_to_fp32``'s library API keeps frozen params in the training
  dtype. Upcasting bf16/fp16 to fp32 is exact, so nothing is lost.
* **Tied parameters** (``shared_params``, alias -> source): safetensors cannot store aliases, and
  HF's ``save_pretrained`` drops the alias, relying on the model class to re-tie it. A consumer of
  a consolidated checkpoint may have no model class, so both names are written (the alias as a
  copy, in the same shard as its source) and the alias map is recorded in the safetensors
  metadata and the index metadata (``ckptkit.shared_params``). ``--format torch`` stores both
  names as one shared tensor, which ``torch.save`` preserves.

The plan becomes a :class:`~ckptkit.ops.convert_source.Source` and goes through
:mod:`ckptkit.ops.pipeline`, the write–reload–commit pipeline ``convert`` uses too: the output is
committed (layout ``files``) only after every written tensor has been re-read from the staged
files and compared (a digest of its bytes) with what was meant to be written.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from ckptkit.errors import FormatError, InvalidURLError, NotFoundError
from ckptkit.formats.deepspeed import check_tag_name, is_tag_directory, resolve_latest, tag_files
from ckptkit.formats.dtypes import torch_itemsize
from ckptkit.formats.torchfile import read_torch_file
from ckptkit.hashing import choose_algorithm
from ckptkit.ops.convert_source import Source, SourceTensor, read_directory
from ckptkit.ops.inspect.values import as_tensor
from ckptkit.ops.pipeline import WriteReport, dtype_name, make_plan, write_checkpoint
from ckptkit.ops.tensor_io import (
    Piece,
    cast_chunks,
    itemsize_of,
    out_dtype,
    parse_size,
    read_pieces,
    slice_pieces,
)
from ckptkit.pickle import GlobalRef, TensorRef, VettedObject
from ckptkit.progress import Progress
from ckptkit.storage import Store
from ckptkit.storage.target import resolve_target

FORMATS = ("safetensors", "torch")
_ZERO_STAGE = GlobalRef("deepspeed.runtime.zero.config", "ZeroStageEnum")
_RANK = re.compile(r"(?:^|_)pp_rank_(\d+)_")


# --- the plan: each output tensor as byte ranges in the source files --------------------------------


@dataclass
class PlannedTensor:
    name: str
    kind: str  # trainable | frozen | buffer | shared
    shape: tuple[int, ...]
    src_dtype: str
    pieces: list[Piece]
    source: str | None = None  # for kind "shared": the name this one aliases

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class ZeroPlan:
    store: Store
    tag: str
    stage: int
    world_size: int
    tensors: dict[str, PlannedTensor]  # in output order; aliases follow their source
    shared_params: dict[str, str]
    global_steps: int | None
    notes: list[str] = field(default_factory=list)


def contiguous_piece(key: str, ref: TensorRef, what: str) -> Piece:
    """The one byte range of a contiguous tensor: where ranged reads can take it directly."""
    storage = ref.storage
    itemsize = torch_itemsize(ref.dtype)
    if storage.byte_offset is None or storage.nbytes is None or itemsize is None:
        raise FormatError(f"{key}: {what}: storage record missing or compressed")
    expected, stride = 1, []
    for d in reversed(ref.shape):
        stride.append(expected)
        expected *= d
    if ref.numel > 1 and tuple(reversed(stride)) != tuple(ref.stride):
        raise FormatError(f"{key}: {what} is not contiguous (stride {ref.stride}); not supported")
    start = ref.storage_offset * itemsize
    if start + ref.numel * itemsize > storage.nbytes:
        raise FormatError(f"{key}: {what} runs past its storage")
    return Piece(key, storage.byte_offset + start, ref.numel)


class _Virtual:
    """Several 1-D fp32 tensors back to back, addressed as one vector (a rank's flat groups)."""

    def __init__(self, segments: list[Piece]) -> None:
        self.segments = segments
        self.length = sum(s.numel for s in segments)

    def take(self, start: int, count: int) -> list[Piece]:
        return slice_pieces(self.segments, start, count, 4)


def zero_stage_of(value: Any) -> int | None:
    if type(value) is VettedObject and value.cls == _ZERO_STAGE:
        return int(value.args[0])
    return value if type(value) is int else None


def find_tag_directory(store: Store, tag: str | None) -> tuple[str, list[str]]:
    """The tag directory (key prefix) and its file names: explicit tag, else ``latest``, else SRC itself."""
    names = [o.key for o in store.list("")]
    if not names:
        raise NotFoundError(f"{store.url}: no such file or directory, or it is empty")
    if tag is None and is_tag_directory(names):
        return "", [n for n in names if "/" not in n]
    if tag is None:
        tag = resolve_latest(store)
        if tag is None:
            raise NotFoundError(f"{store.url}: no 'latest' file and no *_model_states.pt here; pass --tag")
    else:
        _check_user_tag(tag)
    inside = [n[len(tag) + 1 :] for n in names if n.startswith(tag + "/")]
    if not inside:
        raise NotFoundError(f"{store.url}/{tag}: tag directory is missing or empty")
    return tag, [n for n in inside if "/" not in n]


def _check_user_tag(tag: str) -> None:
    # The same rule as for a tag read from `latest`, but a user typed it: a usage error.
    try:
        check_tag_name(tag, "--tag")
    except FormatError as exc:
        raise InvalidURLError(str(exc)) from None


def plan_zero(
    src: str | os.PathLike[str] | Store, *, tag: str | None = None, **storage_options: Any
) -> ZeroPlan:
    """Read the ZeRO checkpoint's structure (pickles only, no tensor bytes) and plan every tensor."""
    found = resolve_target(src, **storage_options)
    if found.key is not None:
        raise FormatError(f"{found.url}: a file; consolidate reads a DeepSpeed save dir or tag directory")
    tag, names = find_tag_directory(found.store, tag)
    store = found.store.child(tag) if tag else found.store
    files = tag_files(names)
    optim, models = files.optim_states, files.model_states
    if not optim or not models:
        raise FormatError(
            f"{store.url}: not a DeepSpeed ZeRO tag directory (no optimizer or model-states files)"
        )
    optim_values = [read_torch_file(store, k).value for k in optim]
    osds = [v.get("optimizer_state_dict") if isinstance(v, dict) else None for v in optim_values]
    if not all(isinstance(o, dict) for o in osds):
        raise FormatError(f"{store.url}: an optimizer file has no optimizer_state_dict: not ZeRO")
    stage = zero_stage_of(osds[0].get("zero_stage"))
    count = osds[0].get("partition_count")
    world = max(count) if isinstance(count, list) else count
    if stage not in (1, 2, 3) or type(world) is not int:
        raise FormatError(f"{store.url}: unsupported ZeRO stage {stage!r} / partition count {count!r}")
    if world != len(optim):
        raise FormatError(
            f"{store.url}: partition count is {world} but {len(optim)} optimizer rank file(s) are present "
            f"({', '.join(optim)}): a rank did not save, or files of another save are mixed in"
        )
    ranks = [_RANK.search(n) for n in optim]
    if [int(m.group(1)) if m else None for m in ranks] != list(range(world)):
        raise FormatError(f"{store.url}: optimizer files are not ranks 0..{world - 1}: {', '.join(optim)}")
    if stage == 3:
        models = [n for n in models if _RANK.search(n)]
        if len(models) != world:
            raise FormatError(f"{store.url}: ZeRO-3 needs {world} model-states files, found {len(models)}")
    else:
        mp0 = [n for n in models if n == "mp_rank_00_model_states.pt"]
        if not mp0:
            raise FormatError(f"{store.url}: mp_rank_00_model_states.pt is missing")
        models = mp0
    model_values = [read_torch_file(store, k).value for k in models]
    m0 = model_values[0]
    shapes = m0.get("param_shapes")
    if not isinstance(shapes, list):
        raise FormatError(f"{store.url}/{models[0]}: no param_shapes list")
    groups = [_flat_groups(store, optim[r], osds[r]) for r in range(world)]

    tensors: dict[str, PlannedTensor] = {}
    if stage == 3:
        _plan_stage3(tensors, shapes, groups)
    else:
        _plan_stage12(tensors, shapes, groups, osds, world)
    notes: list[str] = []
    _plan_frozen(tensors, store, stage, models, model_values, notes)
    module = m0.get("module") if isinstance(m0.get("module"), dict) else {}
    for name in m0.get("buffer_names") or []:
        ref = as_tensor(module.get(name))
        if ref is not None and name not in tensors:
            tensors[name] = PlannedTensor(
                name, "buffer", tuple(ref.shape), ref.dtype, [contiguous_piece(models[0], ref, name)]
            )
    shared = {k: v for k, v in (m0.get("shared_params") or {}).items() if isinstance(k, str)}
    ordered: dict[str, PlannedTensor] = {}
    aliases_of: dict[str, list[str]] = {}
    for alias, source in shared.items():
        aliases_of.setdefault(source, []).append(alias)
    for name, t in tensors.items():
        if name in shared and name != shared[name]:
            continue  # placed right after its source below
        ordered[name] = t
        for alias in aliases_of.get(name, []):
            ordered[alias] = PlannedTensor(alias, "shared", t.shape, t.src_dtype, t.pieces, source=name)
    for alias, source in shared.items():
        if source not in tensors:
            notes.append(f"shared param {alias} -> {source}: the source is not in the checkpoint; skipped")
    steps = m0.get("global_steps")
    return ZeroPlan(
        store, tag, stage, world, ordered, dict(shared), steps if type(steps) is int else None, notes
    )


def _flat_groups(store: Store, key: str, osd: dict[str, Any]) -> list[Piece]:
    flat = osd.get("single_partition_of_fp32_groups", osd.get("fp32_flat_groups"))
    if not isinstance(flat, list):
        raise FormatError(
            f"{key}: no flat fp32 partitions (single_partition_of_fp32_groups / fp32_flat_groups)"
        )
    pieces = []
    for g, value in enumerate(flat):
        ref = as_tensor(value)  # ZeRO-3 wraps its flat groups (ds_id attribute): see as_tensor
        if ref is None or ref.dtype != "float32" or len(ref.shape) != 1:
            raise FormatError(f"{key}: flat group {g} is not a 1-D fp32 tensor")
        pieces.append(contiguous_piece(key, ref, f"flat group {g}"))
    return pieces


def _plan_stage12(
    tensors: dict[str, PlannedTensor],
    shapes: list[Any],
    groups: list[list[Piece]],
    osds: list[dict[str, Any]],
    world: int,
) -> None:
    for osd in osds:
        for paddings in osd.get("param_alignment_paddings") or []:
            if any(p for p in (paddings if isinstance(paddings, list) else [paddings])):
                # Per-param alignment shifts every later param; consolidating back to back would be wrong.
                raise FormatError(
                    "param_alignment_paddings holds non-zero values (parameter_alignment was on): "
                    "consolidating this layout is not supported"
                )
    for g, group_shapes in enumerate(shapes):
        # Rank partitions are consecutive cuts of the group's flat buffer: concatenating them in rank
        # order gives the buffer (saved lean, so the tail padding may be absent: walking from the
        # start works either way).
        try:
            vector = _Virtual([groups[r][g] for r in range(world)])
        except IndexError:
            raise FormatError(f"param group {g}: a rank has fewer flat groups than param_shapes") from None
        offset = 0
        for name, shape in group_shapes.items():
            t = PlannedTensor(name, "trainable", tuple(shape), "float32", [])
            t.pieces = vector.take(offset, t.numel)
            tensors[name] = t
            offset += t.numel
        align = 2 * world
        if -(-offset // align) * align != -(-vector.length // align) * align:
            raise FormatError(
                f"param group {g}: params take {offset} elements but the partitions hold {vector.length}"
            )


def _plan_stage3(tensors: dict[str, PlannedTensor], shapes: list[Any], groups: list[list[Piece]]) -> None:
    world = len(groups)
    vectors = [_Virtual(rank_groups) for rank_groups in groups]
    offset = 0
    for group_shapes in shapes:
        for name, shape in group_shapes.items():
            t = PlannedTensor(name, "trainable", tuple(shape), "float32", [])
            part = -(-t.numel // world)  # every rank holds ceil(numel / world) at the same offset
            pieces = [p for v in vectors for p in v.take(offset, part)]
            t.pieces = slice_pieces(pieces, 0, t.numel, 4)
            tensors[name] = t
            offset += part
    for r, v in enumerate(vectors):
        if v.length != offset:
            raise FormatError(f"rank {r}: params take {offset} elements but its flat groups hold {v.length}")


def _plan_frozen(
    tensors: dict[str, PlannedTensor],
    store: Store,
    stage: int,
    models: list[str],
    model_values: list[Any],
    notes: list[str],
) -> None:
    m0 = model_values[0]
    module = m0.get("module") if isinstance(m0.get("module"), dict) else {}
    frozen_shapes = m0.get("frozen_param_shapes")
    shared = m0.get("shared_params") or {}
    buffers = set(m0.get("buffer_names") or [])
    if stage == 1 or not isinstance(frozen_shapes, dict):
        # Stage 1 records no frozen params at all: they exist only in `module`, in the training dtype.
        # Every module entry that is not trainable, a buffer or a tied alias is a frozen param.
        found = []
        for name, value in module.items():
            ref = as_tensor(value)
            if ref is None or name in tensors or name in buffers or name in shared:
                continue
            tensors[name] = PlannedTensor(
                name, "frozen", tuple(ref.shape), ref.dtype, [contiguous_piece(models[0], ref, name)]
            )
            found.append(name)
        if found:
            notes.append(
                f"frozen params recovered from rank 0's module (zero_to_fp32 drops them): {', '.join(found)}"
            )
        return
    for name, shape in frozen_shapes.items():
        numel = 1
        for d in shape:
            numel *= d
        fragments = []
        for key, value in zip(models, model_values, strict=True):
            ref = as_tensor((value.get("frozen_param_fragments") or {}).get(name))
            if ref is None:
                raise FormatError(f"{key}: frozen param {name} has no fragment")
            fragments.append((contiguous_piece(key, ref, name), ref.dtype))
            if stage != 3:
                break  # stage 2: rank 0's fragment is the whole tensor
        if sum(p.numel for p, _ in fragments) < numel:
            raise FormatError(f"frozen param {name}: fragments hold fewer than its {numel} elements")
        pieces = slice_pieces([p for p, _ in fragments], 0, numel, itemsize_of(fragments[0][1]))
        tensors[name] = PlannedTensor(name, "frozen", tuple(shape), fragments[0][1], pieces)


# --- the plan as a pipeline source, and lazily as a state dict ----------------------------------------


def zero_source(plan: ZeroPlan) -> Source:
    """The planned tensors as a :class:`Source` the write pipeline (and :class:`LazyStateDict`)
    reads: each stored tensor streams its pieces; a tied alias names its source."""
    source = Source(plan.store.url, "deepspeed-zero", {}, order=list(plan.tensors))
    for t in plan.tensors.values():
        if t.source is not None:
            source.aliases[t.name] = t.source
            continue
        key = t.pieces[0].key if t.pieces else ""
        source.tensors[t.name] = SourceTensor(
            t.name, t.src_dtype, t.shape, key, _piece_reader(plan.store, t), kind=t.kind
        )
    return source


def _piece_reader(store: Store, t: PlannedTensor) -> Callable[[], Iterator[bytes]]:
    """The tensor's bytes in its source dtype, in bounded ranged reads (element-aligned chunks)."""
    return lambda: read_pieces(store, t.pieces, itemsize_of(t.src_dtype))


class LazyStateDict(Mapping[str, Any]):
    """A state dict whose tensors are read (ranged reads) and cast only when accessed.

    Tied aliases load as their own tensor (equal values, not shared storage).
    """

    def __init__(self, source: Source, dtype: str | None) -> None:
        self._source, self._dtype = source, dtype
        self._names = source.names

    def _tensor(self, name: str) -> SourceTensor:
        if name not in self._source.tensors and name not in self._source.aliases:
            raise KeyError(name)
        return self._source.tensors[self._source.aliases.get(name, name)]

    def __getitem__(self, name: str) -> Any:
        import torch

        t = self._tensor(name)
        target = out_dtype(t.dtype, self._dtype)
        raw = bytearray()
        for data in cast_chunks(t.chunks(), t.dtype, target):
            raw += data
        torch_dtype = getattr(torch, target)
        value = torch.frombuffer(raw, dtype=torch_dtype) if raw else torch.empty(0, dtype=torch_dtype)
        return value.reshape(t.shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._tensor(name).shape


def zero_state_dict(
    src: str | os.PathLike[str] | Store,
    *,
    tag: str | None = None,
    dtype: str = "fp32",
    **storage_options: Any,
) -> LazyStateDict:
    """The consolidated state dict of a ZeRO checkpoint, lazily: nothing is read until a value is accessed."""
    plan = plan_zero(src, tag=tag, **storage_options)
    return LazyStateDict(zero_source(plan), dtype_name(dtype))


# --- writing: through the write–reload–commit pipeline --------------------------------------------------


@dataclass(kw_only=True)
class ConsolidateResult(WriteReport):
    tag: str
    stage: int
    world_size: int
    shared_params: dict[str, str]
    _output: Store | None = field(default=None, repr=False)

    @property
    def format(self) -> str:
        return self.to

    @property
    def source_label(self) -> str:
        return f"ZeRO-{self.stage} x{self.world_size} ({self.tag})"

    def state_dict(self) -> LazyStateDict:
        """The written output as a lazy state dict (read back from OUT on access)."""
        if self._output is None:
            raise FormatError("no output to read")
        return LazyStateDict(read_directory(self._output), None)

    def to_json(self) -> dict[str, Any]:
        return {
            **super().to_json(), "tag": self.tag, "stage": self.stage, "world_size": self.world_size,
            "format": self.format, "shared_params": self.shared_params,
        }


def consolidate_zero(
    src: str | os.PathLike[str] | Store,
    out: str | os.PathLike[str],
    *,
    tag: str | None = None,
    dtype: str = "fp32",
    max_shard_size: str | int = "5GB",
    fmt: str = "safetensors",
    progress: Progress | None = None,
    digest: str | None = None,
    **storage_options: Any,
) -> ConsolidateResult:
    """Consolidate the ZeRO checkpoint ``src`` into an HF-style state dict committed at ``out``.

    ``src`` is a DeepSpeed save dir (holding ``latest``) or a tag directory; ``out`` any store URL,
    whose last component becomes the committed checkpoint. ``progress`` hears of the tensor bytes
    as they are written; ``digest`` is how the manifest hashes the files, as in ``ckptkit.save``.
    Raises :class:`VerificationError` (and commits nothing) if any tensor read back differs from
    what was written.
    """
    t0 = time.perf_counter()
    digest = choose_algorithm(digest)  # a bad name fails before anything is read
    target = dtype_name(dtype)
    if fmt not in FORMATS:
        raise InvalidURLError(f"format {fmt!r}: expected one of {', '.join(FORMATS)}")
    limit = parse_size(max_shard_size)
    zero = plan_zero(src, tag=tag, **storage_options)
    plan = make_plan(
        zero_source(zero), fmt, target, alias_copies=True,
        metadata={"ckptkit.source": "deepspeed-zero"}, progress=progress,
    )
    metadata = {
        "consolidated_from": "deepspeed-zero", "zero_stage": zero.stage, "tag": zero.tag,
        "dtype": dtype, "dp_world_size": zero.world_size,
    }
    written = write_checkpoint(
        plan, out, max_shard_size=limit, step=zero.global_steps, metadata=metadata, digest=digest,
        **storage_options,
    )
    return ConsolidateResult(
        url=written.url, source=zero.store.url, to=fmt, dtype=target, files=written.files,
        total_size=written.total_size, checks=written.checks, notes=zero.notes,
        seconds=time.perf_counter() - t0, tag=zero.tag, stage=zero.stage, world_size=zero.world_size,
        shared_params=zero.shared_params, _output=written.root.child(written.name),
    )
