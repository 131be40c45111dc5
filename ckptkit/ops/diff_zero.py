"""``diff`` of DeepSpeed ZeRO checkpoints per parameter, not per rank partition.

Each rank's optimizer file holds a flat slice of every group's fp32 masters and moments, cut
where the world size puts the boundaries; two saves of one run at 2 and 4 ranks hold the same
parameters in different slices. :func:`ckptkit.ops.zero_source.read_zero` (reshard's reader)
gives each parameter's master and per-element states as byte ranges across the rank files, so
they are compared as ``fp32:fc1.weight``, ``exp_avg:fc1.weight`` whatever the partitioning.
"""

from __future__ import annotations

from ckptkit.errors import FormatError
from ckptkit.ops.diff_tensors import SideTensor
from ckptkit.ops.inspect.context import Context
from ckptkit.ops.tensor_io import Piece, itemsize_of, read_pieces
from ckptkit.ops.zero_source import read_zero
from ckptkit.storage import Store


def zero_tensors(ctx: Context, notes: list[str]) -> dict[str, SideTensor] | None:
    """Every parameter's fp32 master and optimizer states (and ZeRO-3's frozen parameters);
    None, with a note, where the tag is not one reshard reads (the rank files are then compared
    as they are)."""
    tag = ctx.target.deepspeed
    if tag is None or not ctx.zero_files:
        return None
    store = ctx.target.store.child(tag.prefix) if tag.prefix else ctx.target.store
    try:
        zero = read_zero(store)
    except FormatError as exc:
        notes.append(f"ZeRO optimizer files compared rank by rank, not per parameter: {exc}")
        return None
    found: dict[str, SideTensor] = {}
    for param in zero.params:
        for state, pieces in param.states.items():
            name = f"{state}:{param.name}"
            found[name] = _tensor(zero.store, name, "float32", param.shape, pieces)
    for param_name, (shape, dtype, pieces) in zero.frozen.items():
        name = f"frozen:{param_name}"
        found[name] = _tensor(zero.store, name, dtype, shape, pieces)
    return found


def _tensor(store: Store, name: str, dtype: str, shape: tuple[int, ...], pieces: list[Piece]) -> SideTensor:
    itemsize = itemsize_of(dtype)
    file = next((p.key for p in pieces if p.key), "")
    return SideTensor(name, dtype, shape, file, lambda: read_pieces(store, pieces, itemsize))
