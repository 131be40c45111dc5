"""``diff``: what differs between two checkpoints of any format, local or remote.

    report = diff_paths("run/checkpoint-100", "s3://bucket/run/checkpoint-200", stats=True)
    report.identical, report.counts, report.to_json()

Both sides are read the way ``inspect`` reads them (pickles symbolically: nothing in them is run;
a side naming globals ckptkit has not vetted is refused before any tensor byte is read). Tensors
are compared by content: equal manifest digests of the files holding them settle it without
reading; otherwise both sides' bytes are streamed and hashed (BLAKE3), and with ``stats`` the
changed ones get max |a - b| and ||a - b|| / ||a||. Then the non-tensor state, field by field.
"""

from __future__ import annotations

import dataclasses
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ckptkit.catalog import read_manifest
from ckptkit.commit import logical_path
from ckptkit.errors import EXIT_FINDINGS, EXIT_OK, ManifestError, NotCommittedError, NotFoundError
from ckptkit.manifest import MANIFEST_NAME
from ckptkit.ops.diff_state import SECTIONS, side_state
from ckptkit.ops.diff_tensors import TensorDiff, compare, side_tensors
from ckptkit.ops.diff_zero import zero_tensors
from ckptkit.ops.inspect.context import Context
from ckptkit.ops.inspect.resolve import Target, inspect_target
from ckptkit.pickle.policy import refuse_unsafe
from ckptkit.storage import Store

TENSOR_STATUSES = ("added", "removed", "reshaped", "dtype-changed", "changed", "identical")
ABSENT = "<absent>"  # a field one side does not record
_COMPARE_THREADS = 4


@dataclass
class FieldDiff:
    section: str  # one of diff_state.SECTIONS
    path: str
    a: Any  # ABSENT where only B records it
    b: Any


@dataclass
class DiffReport:
    a: str  # URLs as resolved (a run directory resolves to its newest checkpoint)
    b: str
    layout_a: str
    layout_b: str
    tensors: list[TensorDiff] = field(default_factory=list)  # every tensor, identical ones too
    fields: list[FieldDiff] = field(default_factory=list)  # differing non-tensor fields only
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # what the readers found wrong in files

    @property
    def counts(self) -> dict[str, int]:
        return {s: sum(t.status == s for t in self.tensors) for s in TENSOR_STATUSES}

    @property
    def identical(self) -> bool:
        """Same tensors, same values, same state, and every file read without a problem."""
        return not self.fields and not self.problems and all(t.status == "identical" for t in self.tensors)

    @property
    def exit_code(self) -> int:
        return EXIT_OK if self.identical else EXIT_FINDINGS

    def to_json(self) -> dict[str, Any]:
        return {
            "a": self.a,
            "b": self.b,
            "layout_a": self.layout_a,
            "layout_b": self.layout_b,
            "identical": self.identical,
            "counts": self.counts,
            "tensors": [_jsonable(dataclasses.asdict(t)) for t in self.tensors],
            "fields": [_jsonable(dataclasses.asdict(f)) for f in self.fields],
            "notes": self.notes,
            "problems": self.problems,
        }


def diff_paths(
    a: str | os.PathLike[str] | Store,
    b: str | os.PathLike[str] | Store,
    *,
    stats: bool = False,
    **storage_options: Any,
) -> DiffReport:
    """Compare checkpoint (or file) ``a`` with ``b``; either may be a path, a URL or an open store.

    Raises UnsafeContentError (exit 3) if either side names an unvetted global, NotFoundError
    (exit 4) if either is missing.
    """
    side_a, side_b = _Side(a, storage_options), _Side(b, storage_options)
    report = DiffReport(side_a.target.url, side_b.target.url, side_a.target.layout, side_b.target.layout)
    report.notes = _by_side(side_a.notes, side_b.notes)
    report.problems = _by_side(side_a.ctx.problems, side_b.ctx.problems)
    names = list(side_a.tensors) + [n for n in side_b.tensors if n not in side_a.tensors]
    digests = (side_a.digest_of, side_b.digest_of)

    def one(name: str) -> TensorDiff:
        ta, tb = side_a.tensors.get(name), side_b.tensors.get(name)
        if ta is None:
            return TensorDiff(name, "added", None, tb.dtype, None, list(tb.shape))
        if tb is None:
            return TensorDiff(name, "removed", ta.dtype, None, list(ta.shape), None)
        return compare(name, ta, tb, digests, stats)

    # Reads and BLAKE3 release the GIL: a few tensors at once keep disk or network busy, each
    # holding a few read chunks.
    with ThreadPoolExecutor(max_workers=_COMPARE_THREADS) as pool:
        report.tensors = list(pool.map(one, names))
    report.fields = _field_diffs(side_a.state, side_b.state)
    return report


class _Side:
    """One checkpoint: resolved, its files read once (refused if unsafe), tensors and state found."""

    def __init__(self, path: str | os.PathLike[str] | Store, storage_options: dict[str, Any]) -> None:
        self.target: Target = inspect_target(path, **storage_options)
        self.ctx = Context(self.target)
        self.notes: list[str] = list(self.target.notes)
        zero = zero_tensors(self.ctx, self.notes)
        self.tensors = side_tensors(self.ctx, self.notes, zero)
        # Every file was read by now: refuse before any of its tensor bytes are.
        unsafe = self.ctx.source.unsafe
        where = self.target.url
        if self.target.layout != "file":
            where += f" ({', '.join(dict.fromkeys(u.file for u in unsafe))})"
        refuse_unsafe(where, {u.name for u in unsafe}, "nothing in it was run")
        self.state = side_state(self.ctx, per_parameter=zero is not None)
        self._digests = self._manifest_digests()

    def digest_of(self, key: str) -> str | None:
        """The committed manifest's digest of the file ``key`` of the side's store, if any."""
        return self._digests.get(key)

    def _manifest_digests(self) -> dict[str, str]:
        checkpoint = self.target.store
        if self.target.layout == "file" or not checkpoint.exists(MANIFEST_NAME):
            return {}
        try:
            manifest = read_manifest(checkpoint)
        except (ManifestError, NotCommittedError, NotFoundError) as exc:
            self.notes.append(f"manifest not used, every tensor is hashed: {exc}")
            return {}
        by_path = {logical_path(f.path): f.digest for f in manifest.files}
        # Keys are relative to the store the tensors were read from (a native checkpoint's
        # files view); the manifest's paths to the checkpoint.
        reader = self.ctx.source.store.url.rstrip("/")
        root = checkpoint.url.rstrip("/")
        relative = reader[len(root) :].strip("/") if reader.startswith(root) else ""
        below = logical_path(relative + "/").rstrip("/") if relative else ""
        return {
            key: digest
            for path, digest in by_path.items()
            if (key := path[len(below) + 1 :] if below and path.startswith(below + "/") else path)
        }


def _by_side(a: list[str], b: list[str]) -> list[str]:
    """Lines of both sides, each said once: ``A and B:`` where both have it."""
    return (
        [f"A and B: {line}" if line in b else f"A: {line}" for line in a]
        + [f"B: {line}" for line in b if line not in a]
    )


def _field_diffs(a: dict[str, dict[str, Any]], b: dict[str, dict[str, Any]]) -> list[FieldDiff]:
    found = []
    for section in SECTIONS:
        left, right = a[section], b[section]
        for path in [*left, *(p for p in right if p not in left)]:
            va, vb = left.get(path, ABSENT), right.get(path, ABSENT)
            if not _equal(va, vb):
                found.append(FieldDiff(section, path, va, vb))
    return found


def _equal(a: Any, b: Any) -> bool:
    # NaN recorded on both sides (a best_metric never set) is no difference; True is not 1.
    if type(a) is float and type(b) is float and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return bool(a == b)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if type(value) is float and not math.isfinite(value):
        return str(value)  # JSON has no NaN or inf
    return value

