"""``diff``'s tensors: every tensor of one checkpoint under a name comparable across formats, and
the comparison of two of them by streamed BLAKE3 digests (and, on request, value statistics).

Tensors are found by the symbolic readers ``inspect`` uses (nothing in a pickle is run) and
their bytes streamed in bounded ranged reads, so memory stays a few chunks per tensor.

Names: the model's weights (safetensors files, flat ``{name: tensor}`` torch files, a native
tree, DCP fqns, and anything in a single file) keep their own names, so a ``torch.save`` state
dict and its safetensors conversion line up; tensors inside other files (``optimizer.pt``,
DeepSpeed's rank files) are named ``file:path``, with the DeepSpeed tag directory left out so
that two tags of one run line up.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from ckptkit.errors import FormatError
from ckptkit.formats.dcp import METADATA, read_dcp
from ckptkit.formats.tree import check_storage, check_tensor, is_row_major
from ckptkit.ops.convert_source import read_file
from ckptkit.ops.inspect.context import Context
from ckptkit.ops.inspect.model import is_state_dict, model_tensors
from ckptkit.ops.inspect.values import walk_named_tensors
from ckptkit.ops.tensor_io import Piece, cast, content_digest, itemsize_of, read_pieces
from ckptkit.pickle import TensorRef
from ckptkit.storage import Store
from ckptkit.storage.base import join_key

Chunks = Callable[[], Iterable[bytes | memoryview]]
_NUMPY = {
    "float16": "<f2", "float32": "<f4", "float64": "<f8", "int8": "i1", "int16": "<i2",
    "int32": "<i4", "int64": "<i8", "uint8": "u1", "bool": "?",
}
_FRAGMENTS = "frozen_param_fragments."  # ZeRO-3's per-rank slices of frozen parameters
_STATS_CHUNK = 1 << 20  # elements per float64 step of --stats: working memory of ~16 MB


@dataclass(frozen=True)
class SideTensor:
    """One tensor of one side: what it is, and how to stream its row-major bytes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str  # the file holding its bytes, as the side's store names it
    chunks: Chunks
    # Where its bytes lie verbatim (file, byte offset, stride), for the manifest-digest shortcut;
    # None where they are assembled (DCP chunks, non-contiguous views).
    location: tuple[str, int, tuple[int, ...]] | None = None


@dataclass
class TensorStatsDiff:
    max_abs: float | None  # max |a - b| over the elements (NaN-free pairs)
    relative: float | None  # ||a - b|| / ||a|| (L2); None where ||a|| is 0


@dataclass
class TensorDiff:
    name: str
    status: str  # identical | changed | added | removed | reshaped | dtype-changed
    dtype_a: str | None
    dtype_b: str | None
    shape_a: list[int] | None
    shape_b: list[int] | None
    how: str | None = None  # manifest-digest (no bytes read) | blake3 (both sides hashed)
    digest_a: str | None = None
    digest_b: str | None = None
    stats: TensorStatsDiff | None = None


def side_tensors(
    ctx: Context, notes: list[str], zero: dict[str, SideTensor] | None = None
) -> dict[str, SideTensor]:
    """Every tensor of the inspected checkpoint, by comparable name; ``zero`` is a ZeRO tag's
    per-parameter view (:mod:`ckptkit.ops.diff_zero`), which replaces its rank partitions."""
    target = ctx.target
    found: dict[str, SideTensor] = {}

    def add(name: str, qualified: str, tensor: SideTensor) -> None:
        if name in found:  # two weight files both hold ``name``: keep both, told apart by file
            notes.append(f"{name!r} is in several files; the one in {tensor.file} is named {qualified!r}")
            name = qualified
        found[name] = tensor

    store = ctx.source.store
    for named in model_tensors(ctx):
        add(named.name, named.label, _from_ref(store, named.file, named.name, named.tensor))
    for key in target.safetensors if target.native is None else []:
        for alias, source in read_file(store, key).aliases.items():  # ties convert recorded
            if source in found:
                add(alias, f"{key}:{alias}", found[source])
    for name, tensor in (zero or {}).items():
        add(name, name, tensor)
    # With the per-parameter view, the rank partitions, ZeRO-3's empty placeholders and frozen
    # fragments, and its other ranks' copies of the buffers add nothing but the world size's cuts.
    documents = [*ctx.documents, *ctx.model_states, *ctx.zero_files]
    if zero is not None:
        documents = [*ctx.documents, *ctx.model_states[:1]]
    for doc in documents:
        prefix = path_prefix(ctx, doc.file)
        bare = is_state_dict(doc.value)  # model weights, whatever the file's name
        for path, ref in walk_named_tensors(doc.value):
            file = doc.bytes_file or ref.storage.record
            if file is None or (zero is not None and (ref.numel == 0 or path.startswith(_FRAGMENTS))):
                continue
            qualified = f"{strip_tag(ctx, doc.file)}:{path}"
            add(path if bare else prefix + path, qualified, _from_ref(store, file, path, ref))
    if target.dcp_prefix is not None:
        metadata = join_key(target.dcp_prefix, METADATA)
        ctx.source.note_globals(metadata, read_dcp(store, target.dcp_prefix).globals)
        source = read_file(store, metadata)  # refuses unvetted globals in the items' pickles
        notes.extend(source.notes)
        for t in source.tensors.values():
            add(t.name, f"{t.file}:{t.name}", SideTensor(t.name, t.dtype, t.shape, t.file, t.chunks))
    return found


def path_prefix(ctx: Context, file: str) -> str:
    """What names of things in ``file`` start with: nothing where the checkpoint is that one
    file (or a native tree, one state), else ``file:``."""
    if ctx.target.layout == "file" or ctx.target.native is not None:
        return ""
    return f"{strip_tag(ctx, file)}:"


def strip_tag(ctx: Context, file: str) -> str:
    """``global_step10/mp_rank_00_model_states.pt`` as ``mp_rank_00_model_states.pt``: the tag
    directory's name differs between any two checkpoints of a run."""
    tag = ctx.target.deepspeed
    if tag is not None and tag.prefix and file.startswith(tag.prefix + "/"):
        return file[len(tag.prefix) + 1 :]
    return file


def _from_ref(store: Store, file: str, name: str, ref: TensorRef) -> SideTensor:
    """A described tensor's bytes, after the checks every reader applies (the view lies inside a
    storage that holds what it declares), so nothing is allocated from a declared size alone."""
    label = f"{file}:{name}"
    problems = [f"{label}: {p}" for p in [check_storage(ref.storage)] if p] + check_tensor(label, ref)
    if problems:
        raise FormatError("; ".join(problems))
    itemsize = itemsize_of(ref.dtype)
    start = ref.storage.byte_offset + ref.storage_offset * itemsize
    shape = tuple(ref.shape)
    if ref.numel == 0:
        return SideTensor(name, ref.dtype, shape, file, lambda: iter(()), (file, start, ()))
    if is_row_major(shape, tuple(ref.stride)):
        pieces = [Piece(file, start, ref.numel)]
        return SideTensor(
            name, ref.dtype, shape, file, lambda: read_pieces(store, pieces, itemsize), (file, start, ())
        )
    return SideTensor(name, ref.dtype, shape, file, lambda: [_gather(store, file, start, ref, itemsize)])


def _gather(store: Store, file: str, start: int, ref: TensorRef, itemsize: int) -> bytes:
    """A strided view's elements in row-major order (memory: this one tensor's span)."""
    import numpy as np

    span = 1 + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride, strict=True))
    data = b"".join(read_pieces(store, [Piece(file, start, span)], itemsize))
    flat = np.frombuffer(data, dtype=f"V{itemsize}")
    strides = [s * itemsize for s in ref.stride]
    view = np.lib.stride_tricks.as_strided(flat, ref.shape, strides, writeable=False)
    return np.ascontiguousarray(view).tobytes()


def compare(
    name: str,
    a: SideTensor,
    b: SideTensor,
    digests: tuple[Callable[[str], str | None], Callable[[str], str | None]],
    stats: bool,
) -> TensorDiff:
    result = TensorDiff(name, "identical", a.dtype, b.dtype, list(a.shape), list(b.shape))
    if a.shape != b.shape:
        result.status = "reshaped"
        return result
    if a.dtype != b.dtype:
        result.status = "dtype-changed"
        if stats:
            result.stats = _value_stats(a, b)
        return result
    if _same_bytes_on_record(a, b, digests):
        result.how = "manifest-digest"
        return result
    result.how = "blake3"
    result.digest_a, result.digest_b = content_digest(a.chunks()), content_digest(b.chunks())
    if result.digest_a != result.digest_b:
        result.status = "changed"
        # A second read, of changed tensors only: most of a fine-tune's tensors are identical.
        result.stats = _value_stats(a, b) if stats else None
    return result


def _same_bytes_on_record(
    a: SideTensor, b: SideTensor, digests: tuple[Callable[[str], str | None], Callable[[str], str | None]]
) -> bool:
    """Both tensors lie at the same place of files whose committed manifests give one digest:
    the files' bytes are equal, so these are, without reading them."""
    if a.location is None or b.location is None or a.location[1:] != b.location[1:]:
        return False
    digest = digests[0](a.location[0])
    return digest is not None and digest == digests[1](b.location[0])


def _value_stats(a: SideTensor, b: SideTensor) -> TensorStatsDiff | None:
    """max |a - b| and ||a - b|| / ||a||, values as float64 (so across dtypes too: a tensor saved
    in fp32 and converted to bf16); None for dtypes without arithmetic here (fp8, complex)."""
    if not all(t.dtype in _NUMPY or t.dtype == "bfloat16" for t in (a, b)):
        return None
    acc = _StatsAccumulator()
    xs = (_floats(c, a.dtype) for c in a.chunks())
    ys = (_floats(c, b.dtype) for c in b.chunks())
    for x, y in _aligned(xs, ys):
        acc.add(x, y)
    return acc.result()


def _floats(data: bytes | memoryview, dtype: str) -> Any:
    import numpy as np

    if dtype == "bfloat16":
        data, dtype = cast(data, "bfloat16", "float32"), "float32"
    return np.frombuffer(data, dtype=_NUMPY[dtype]).astype(np.float64)


def _aligned(xs: Iterable[Any], ys: Iterable[Any]) -> Iterator[tuple[Any, Any]]:
    """Pairs of equally long slices of two streams of 1-d arrays that hold the same number of
    elements but are cut differently (one file's ranged reads, another's DCP chunks)."""
    left, right = iter(xs), iter(ys)
    x: Any = ()
    y: Any = ()
    while True:
        if not len(x):
            x = next((item for item in left if len(item)), None)
        if not len(y):
            y = next((item for item in right if len(item)), None)
        if x is None or y is None:
            if x is not None or y is not None:
                raise FormatError("the two tensors' bytes differ in length though their shapes agree")
            return
        n = min(len(x), len(y))
        for start in range(0, n, _STATS_CHUNK):
            end = min(n, start + _STATS_CHUNK)
            yield x[start:end], y[start:end]
        x, y = x[n:], y[n:]


@dataclass
class _StatsAccumulator:
    """max |a - b| and the L2 norms of a - b and a, over chunks."""

    max_abs: float = -math.inf
    diff_norm: float = 0.0
    norm: float = 0.0

    def add(self, a: Any, b: Any) -> None:
        import numpy as np

        delta = np.abs(a - b)
        finite = delta[~np.isnan(delta)]
        if finite.size:
            self.max_abs = max(self.max_abs, float(finite.max()))
        self.diff_norm = math.hypot(self.diff_norm, float(np.linalg.norm(finite)))
        self.norm = math.hypot(self.norm, float(np.linalg.norm(a)))

    def result(self) -> TensorStatsDiff:
        max_abs = self.max_abs if self.max_abs != -math.inf else 0.0
        return TensorStatsDiff(max_abs, self.diff_norm / self.norm if self.norm else None)
