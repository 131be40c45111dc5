"""``convert``: a state dict from one checkpoint format to another, streamed, then reloaded and compared.

SRC is read through :mod:`ckptkit.ops.convert_source` (headers and symbolic pickles; tensor
bytes by ranged reads, one bounded chunk at a time; torch pickles never executed) and written
through :mod:`ckptkit.ops.pipeline`, the write–reload–commit pipeline ``consolidate`` uses too:

* ``safetensors`` / ``torch``: HF-style shards (``model*.safetensors`` or ``pytorch_model*.bin``
  plus an index when there are several). A tied alias is stored once: in a torch file as a second
  tensor on the same storage, in safetensors (which refuses shared storage) as
  ``ckptkit.shared_params`` metadata only. A DST named like a weight file (``out.safetensors``,
  ``out.bin``) is one file, moved into place once verified.
* ``dcp`` / ``native``: through a memory-mapped local spool.

Before DST looks complete, every tensor is re-read from what was written and compared with SRC
(names, dtype after ``--dtype``, shape, tie, digest of the bytes); a mismatch raises
:class:`VerificationError` and leaves no DST.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from ckptkit.hashing import choose_algorithm
from ckptkit.ops.convert_source import Source, read_directory, read_file
from ckptkit.ops.pipeline import (
    WriteReport,
    check_target,
    dtype_name,
    is_single_file,
    make_plan,
    write_checkpoint,
    write_file,
)
from ckptkit.ops.tensor_io import FLOATS
from ckptkit.progress import Progress
from ckptkit.storage.target import resolve_target


@dataclass(kw_only=True)
class ConvertResult(WriteReport):
    source_kind: str

    @property
    def source_label(self) -> str:
        return self.source_kind

    def to_json(self) -> dict[str, Any]:
        return {**super().to_json(), "source_kind": self.source_kind}


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    to: str,
    dtype: str | None = None,
    max_shard_size: str | int | None = None,
    progress: Progress | None = None,
    digest: str | None = None,
    **storage_options: Any,
) -> ConvertResult:
    """Convert the state dict at ``src`` into format ``to`` at ``dst``, then reload and compare it.

    ``progress`` hears of the tensor bytes as they are written (up to the report's
    ``total_size``). ``digest`` is how a directory DST's manifest hashes its files, as in
    ``ckptkit.save`` (a single-file DST has no manifest). Raises :class:`VerificationError`
    (and leaves no DST) when anything read back differs.
    """
    t0 = time.perf_counter()
    check_target(to)
    digest = choose_algorithm(digest)  # a bad name fails before anything is read
    target = dtype_name(dtype)
    found = resolve_target(src, **storage_options)
    source = read_file(found.store, found.key) if found.key is not None else read_directory(found.store)
    plan = make_plan(source, to, target, progress=progress)
    if is_single_file(to, dst):
        written = write_file(plan, dst, max_shard_size=max_shard_size, **storage_options)
    else:
        metadata = {"converted_from": source.kind, "dtype": target}
        written = write_checkpoint(
            plan, dst, max_shard_size=max_shard_size, step=None, metadata=metadata, digest=digest,
            **storage_options,
        )
    return ConvertResult(
        url=written.url, source=source.url, source_kind=source.kind, to=to, dtype=target,
        files=written.files, total_size=written.total_size, checks=written.checks,
        notes=source.notes + _cast_notes(source, target), seconds=time.perf_counter() - t0,
    )


def _cast_notes(source: Source, dtype: str | None) -> list[str]:
    if dtype is None:
        return []
    kept = sorted({t.dtype for t in source.tensors.values() if t.dtype not in FLOATS})
    note = f"--dtype {dtype}: floating tensors (float16/bfloat16/float32/float64) cast"
    return [note + (f"; {', '.join(kept)} tensors kept as they are" if kept else "")]
