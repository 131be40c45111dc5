"""``convert``: a state dict from one checkpoint format to another, streamed, then reloaded and compared.

SRC is read through :mod:`ckptkit.ops.convert_source` (headers and symbolic pickles; tensor
bytes by ranged reads, one bounded chunk at a time; torch pickles never executed). DST is
written as:

* ``safetensors`` / ``torch``: HF-style shards (``model*.safetensors`` or ``pytorch_model*.bin``
  plus an index when there are several), streamed shard by shard; peak memory is a few chunks.
  A tied alias is stored once: in a torch file as a second tensor on the same storage, in
  safetensors (which refuses shared storage) as ``ckptkit.shared_params`` metadata only.
* ``dcp`` / ``native``: each tensor is first streamed (cast) into a local spool file, then
  memory-mapped and handed to ``torch.distributed.checkpoint.save`` / ckptkit's native writer.
  Memory is then the page cache of the mapped spool (reclaimable), and the spool costs local
  disk of the model's size.

A directory DST is committed through a :class:`CheckpointTransaction`; a single file DST
(``out.safetensors``, ``out.bin``) is written under a hidden temporary name next to it and moved
into place. Either way, before DST looks complete, every tensor is re-read from what was written
through the same readers and compared with SRC: names, dtype (after ``--dtype``), shape, and the
sha256 of its bytes, so values are bit-for-bit equal (after the cast). A mismatch raises
:class:`VerificationError` and leaves no DST.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ckptkit.commit import CheckpointTransaction
from ckptkit.errors import CommitConflictError, InvalidURLError, VerificationError
from ckptkit.formats.safetensors_writer import (
    SHARED_PARAMS_KEY,
    OutTensor,
    index_document,
    index_name,
    safetensors_chunks,
    shard_names,
    split_shards,
)
from ckptkit.formats.torch_writer import torch_zip_chunks
from ckptkit.ops.convert_source import Source, SourceTensor, native_source, open_source, read_directory
from ckptkit.ops.tensor_io import FLOATS, cast_chunks, out_dtype, parse_size, prefetched, sha256_of
from ckptkit.storage import Store, open_store, split_url
from ckptkit.storage.local import follow_named_path

TARGETS = ("safetensors", "torch", "dcp", "native")
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp64": "float64"}
_SINGLE_FILE = {"safetensors": (".safetensors",), "torch": (".bin", ".pt", ".pth")}
_LAYOUT = {"safetensors": "files", "torch": "files", "dcp": "dcp", "native": "native"}
DEFAULT_SHARD = "5GB"


@dataclass
class TensorCheck:
    name: str
    src_dtype: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    file: str | None
    alias_of: str | None
    ok: bool
    problem: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "src_dtype": self.src_dtype, "dtype": self.dtype, "shape": list(self.shape),
            "nbytes": self.nbytes, "file": self.file, "alias_of": self.alias_of, "ok": self.ok,
            **({"problem": self.problem} if self.problem else {}),
        }


@dataclass
class ConvertResult:
    source: str
    source_kind: str
    url: str
    to: str
    dtype: str | None
    files: list[str]
    total_size: int
    checks: list[TensorCheck]
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok, "source": self.source, "source_kind": self.source_kind, "url": self.url,
            "to": self.to, "dtype": self.dtype, "files": self.files, "total_size": self.total_size,
            "notes": self.notes, "seconds": round(self.seconds, 3),
            "tensors": [c.to_json() for c in self.checks],
        }


@dataclass
class _Plan:
    source: Source
    outs: list[OutTensor]  # stored tensors, cast; aliases follow their source (source= set)
    expected: dict[str, str] = field(default_factory=dict)  # stored name -> sha256 of written bytes


def dtype_name(dtype: str | None) -> str | None:
    if dtype is None or dtype in FLOATS:
        return dtype
    if dtype in DTYPES:
        return DTYPES[dtype]
    raise InvalidURLError(f"--dtype {dtype!r}: expected one of {', '.join([*DTYPES, *sorted(FLOATS)])}")


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    to: str,
    dtype: str | None = None,
    max_shard_size: str | int | None = None,
    **storage_options: Any,
) -> ConvertResult:
    """Convert the state dict at ``src`` into format ``to`` at ``dst``, then reload and compare it.

    Raises :class:`VerificationError` (and leaves no DST) when anything read back differs.
    """
    from ckptkit.api import split_parent

    t0 = time.perf_counter()
    if to not in TARGETS:
        raise InvalidURLError(f"--to {to!r}: expected one of {', '.join(TARGETS)}")
    target = dtype_name(dtype)
    src_text = os.fspath(src)
    src_parent, src_name = split_parent(
        follow_named_path(src_text) if split_url(src_text)[0] is None else src_text
    )
    source = open_source(open_store(src_parent, **storage_options), src_name)
    plan = _plan(source, target)
    parent, name = split_parent(dst)
    root = open_store(parent, **storage_options)
    single = to in _SINGLE_FILE and name.endswith(_SINGLE_FILE[to])
    limit = parse_size(max_shard_size or DEFAULT_SHARD)
    if single:
        files, checks = _write_single_file(root, name, to, plan, limit, max_shard_size is not None)
    else:
        files, checks = _write_directory(root, name, to, plan, limit, target)
    return ConvertResult(
        source=source.url, source_kind=source.kind, url=f"{root.url.rstrip('/')}/{name}", to=to,
        dtype=target, files=files, total_size=_stored_bytes(plan),
        checks=checks, notes=source.notes + _cast_notes(plan, target), seconds=time.perf_counter() - t0,
    )


def _plan(source: Source, dtype: str | None) -> _Plan:
    outs: list[OutTensor] = []
    for name in source.names:
        alias_of = source.aliases.get(name)
        t = source.tensors[alias_of or name]
        outs.append(_out(t, dtype, name, alias_of))
    return _Plan(source, outs)


def _out(t: SourceTensor, dtype: str | None, name: str, alias_of: str | None) -> OutTensor:
    target = out_dtype(t.dtype, dtype)
    return OutTensor(name, target, t.shape, lambda: cast_chunks(t.chunks(), t.dtype, target), source=alias_of)


def _stored_bytes(plan: _Plan) -> int:
    return sum(t.nbytes for t in plan.outs if t.source is None)


def _cast_notes(plan: _Plan, dtype: str | None) -> list[str]:
    if dtype is None:
        return []
    kept = sorted({t.dtype for t in plan.source.tensors.values() if t.dtype not in FLOATS})
    note = f"--dtype {dtype}: floating tensors (float16/bfloat16/float32/float64) cast"
    return [note + (f"; {', '.join(kept)} tensors kept as they are" if kept else "")]


def _on_written(plan: _Plan) -> Callable[[OutTensor, int, str], None]:
    def record(t: OutTensor, nbytes: int, digest: str) -> None:
        plan.expected[t.name] = digest

    return record


# --- safetensors and torch shards ----------------------------------------------------------------


def _units(outs: list[OutTensor]) -> list[list[OutTensor]]:
    units: list[list[OutTensor]] = []
    unit_of: dict[str, list[OutTensor]] = {}
    for t in outs:
        if t.source is not None:
            unit_of[t.source].append(t)  # an alias goes where its source goes: same shard
        else:
            unit_of[t.name] = [t]
            units.append(unit_of[t.name])
    return units


def _shard_streams(plan: _Plan, to: str, limit: int) -> list[tuple[str, list[OutTensor]]]:
    shards = split_shards(_units(plan.outs), limit)
    return list(zip(shard_names(len(shards), to), shards, strict=True))


def _shard_chunks(plan: _Plan, to: str, shard: list[OutTensor]) -> Iterator[bytes | memoryview]:
    if to == "torch":
        return prefetched(torch_zip_chunks(shard, _on_written(plan)))
    stored = [t for t in shard if t.source is None]
    aliases = {t.name: t.source for t in shard if t.source is not None}
    metadata = {"format": "pt"}
    if aliases:
        metadata[SHARED_PARAMS_KEY] = json.dumps(aliases, sort_keys=True)
    return prefetched(safetensors_chunks(stored, metadata, _on_written(plan)))


def _write_shards(sink: Any, plan: _Plan, to: str, limit: int) -> list[str]:
    shards = _shard_streams(plan, to, limit)
    for file, shard in shards:
        sink(file, _shard_chunks(plan, to, shard))
    files = [file for file, _ in shards]
    if len(shards) > 1:
        # A torch shard holds its aliases as tensors; a safetensors shard only names them in metadata.
        # total_size counts the tensors each shard lists, as the index reader checks it.
        listed = [(t, file) for file, shard in shards for t in shard if to == "torch" or t.source is None]
        weight_map = {t.name: file for t, file in listed}
        aliases = {t.name: t.source for t in plan.outs if t.source is not None}
        metadata = {SHARED_PARAMS_KEY: aliases} if aliases else {}
        sink(index_name(to), index_document(sum(t.nbytes for t, _ in listed), weight_map, metadata))
        files.append(index_name(to))
    return files


def _write_single_file(
    root: Store, name: str, to: str, plan: _Plan, limit: int, limited: bool
) -> tuple[list[str], list[TensorCheck]]:
    """One file: written under a hidden name, checked, then moved into place (never half-visible)."""
    if root.exists(name):
        raise CommitConflictError(f"{root.url}/{name} already exists; convert does not overwrite")
    shards = _shard_streams(plan, to, limit)
    if limited and len(shards) > 1:
        raise InvalidURLError(
            f"{name}: a single file cannot be split by --max-shard-size; give a directory as DST"
        )
    head, _, base = name.rpartition("/")
    temp = f"{head}/" * bool(head) + f".{base}.ckptkit-partial-{uuid.uuid4().hex[:12]}"
    try:
        root.put(temp, _shard_chunks(plan, to, plan.outs))
        checks = _reload_check(plan, open_source(root, temp), {temp: name})
        _raise_on_mismatch(checks)
        if root.capabilities.atomic_rename:
            root.rename_prefix(temp, name)
        else:
            root.copy(temp, name)  # one object copy: atomic on object stores
    finally:
        root.delete(temp)
    return [name], checks


def _write_directory(
    root: Store, name: str, to: str, plan: _Plan, limit: int, dtype: str | None
) -> tuple[list[str], list[TensorCheck]]:
    with CheckpointTransaction(root, name) as txn:
        if to in ("safetensors", "torch"):
            files = _write_shards(txn.write, plan, to, limit)
        else:
            files = _write_spooled(txn, plan, to, max_shard_size=limit)
        reread = native_source(txn.files) if to == "native" else read_directory(txn.files)
        checks = _reload_check(plan, reread, {})
        _raise_on_mismatch(checks)
        metadata = {"converted_from": plan.source.kind, "dtype": dtype}
        txn.commit(step=None, layout=_LAYOUT[to], metadata=metadata)
    return files, checks


# --- dcp and native: through a memory-mapped spool ----------------------------------------------------


def _write_spooled(txn: CheckpointTransaction, plan: _Plan, to: str, *, max_shard_size: int) -> list[str]:
    with tempfile.TemporaryDirectory(prefix="ckptkit-convert-") as tmp:
        state = _spooled_state(plan, os.path.join(tmp, "spool.bin"))
        if to == "native":
            from ckptkit.native import write_native

            summary = write_native(state, txn, max_shard_size=max_shard_size)
            return [*summary.shard_paths, summary.tree_path]
        return _write_dcp(txn, state, os.path.join(tmp, "dcp"))


def _spooled_state(plan: _Plan, path: str) -> dict[str, Any]:
    """Every tensor, cast, streamed into ``path`` and mapped back as a tensor of its own storage."""
    import numpy as np
    import torch

    offsets: dict[str, int] = {}
    with open(path, "wb") as spool:
        for t in plan.outs:
            if t.source is not None:
                continue
            spool.write(b"\0" * (-spool.tell() % 64))  # aligned, so every dtype view is legal
            offsets[t.name] = spool.tell()
            plan.expected[t.name] = sha256_of(_tee(t.chunks(), spool))
    state: dict[str, Any] = {}
    for t in plan.outs:
        if t.source is not None:
            state[t.name] = state[t.source]  # the same tensor object: both writers keep the tie
            continue
        dtype = getattr(torch, t.dtype)
        if t.nbytes == 0:
            state[t.name] = torch.empty(t.shape, dtype=dtype)
            continue
        mapped = np.memmap(path, dtype=np.uint8, mode="c", offset=offsets[t.name], shape=(t.nbytes,))
        state[t.name] = torch.from_numpy(mapped).view(dtype).reshape(t.shape)
    return state


def _tee(chunks: Any, spool: Any) -> Iterator[bytes | memoryview]:
    for chunk in chunks:
        spool.write(chunk)
        yield chunk


def _write_dcp(txn: CheckpointTransaction, state: dict[str, Any], directory: str) -> list[str]:
    import warnings

    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():  # "torch.distributed is ... uninitialized": single process, on purpose
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(state, storage_writer=dcp.FileSystemWriter(directory), no_dist=True)
    files = sorted(os.listdir(directory))
    for file in files:
        with open(os.path.join(directory, file), "rb") as f:
            txn.write(file, iter(lambda f=f: f.read(16 << 20), b""))
    return files


# --- reload and compare -----------------------------------------------------------------------------------


def _reload_check(plan: _Plan, written: Source, rename: dict[str, str]) -> list[TensorCheck]:
    """Every SRC name against what DST holds: dtype, shape, tie, and the sha256 of the bytes read back."""

    def check(out: OutTensor) -> TensorCheck:
        stored_as = written.aliases.get(out.name, out.name)
        found = written.tensors.get(stored_as)
        if found is None:
            problem: str | None = "missing from the written output"
        elif (found.dtype, tuple(found.shape)) != (out.dtype, tuple(out.shape)):
            problem = f"written as {found.dtype}{list(found.shape)}, meant {out.dtype}{list(out.shape)}"
        elif stored_as != out.name and stored_as != out.source:
            problem = f"tied to {stored_as!r} in the output, to {out.source!r} in the source"
        elif sha256_of(found.chunks()) != plan.expected.get(out.source or out.name):
            problem = "bytes read back differ from the source's (after the cast)"
        else:
            problem = None
        file = rename.get(found.file, found.file) if found else None
        origin = plan.source.tensors[out.source or out.name]
        return TensorCheck(
            out.name, origin.dtype, out.dtype, out.shape, out.nbytes, file, out.source, not problem, problem
        )

    with ThreadPoolExecutor(max_workers=4, thread_name_prefix="ckptkit-reload") as pool:
        checks = list(pool.map(check, plan.outs))
    extra = sorted(set(written.names) - {t.name for t in plan.outs})
    checks += [TensorCheck(n, "-", "-", (), 0, None, None, False, "not in the source") for n in extra]
    return checks


def _raise_on_mismatch(checks: list[TensorCheck]) -> None:
    bad = [c for c in checks if not c.ok]
    if bad:
        raise VerificationError(
            f"{len(bad)} tensor(s) read back differ from the source; nothing was committed: "
            + ", ".join(f"{c.name} ({c.problem})" for c in bad[:5]),
            [f"{c.name}: {c.problem}" for c in bad],
        )
