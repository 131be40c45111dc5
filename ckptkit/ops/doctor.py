"""``ckptkit doctor``: what ``torch.load(weights_only=True)`` needs to read a file, and what it must not get.

For users who must call ``torch.load`` themselves (torch >= 2.6 refuses DeepSpeed optimizer files
and HF ``rng_state.pth`` by default). From the symbolic reading of each pickle it predicts torch's
weights-only unpickler (``safe-loading.md`` §1) without importing torch:

- the globals outside torch's default allowlist, split into those on ckptkit's vetted list (with
  ready-to-paste ``add_safe_globals`` code) and those that must never be allowed;
- the dtype classes numpy arrays need (weights_only checks the class when BUILD sets a dtype's
  state, so ``numpy.dtype`` alone is not enough: ``np.random.get_state()`` also needs
  ``numpy.dtypes.UInt32DType``);
- the first opcode torch's unpickler does not implement (``FRAME`` for protocol >= 4: "Unsupported
  operand 149"), which no allowlist can fix.
"""

from __future__ import annotations

import os
import pickletools
from dataclasses import dataclass, field
from typing import Any, Literal

from ckptkit.errors import EXIT_FINDINGS, EXIT_OK, EXIT_UNSAFE, FormatError
from ckptkit.formats import zipfile_reader as zr
from ckptkit.formats.sniff import detect
from ckptkit.formats.torchfile import MAX_PICKLE_BYTES, TorchFile, read_torch_file
from ckptkit.ops.scan import scan_file, scan_target
from ckptkit.pickle import NdArray, PickleFormatError, classify
from ckptkit.pickle.numpy_refs import itemsize
from ckptkit.pickle.torch_refs import TORCH_DTYPES
from ckptkit.pickle.values import GlobalRef
from ckptkit.storage import Store

Status = Literal["vetted", "never-allow", "unvetted"]

# torch's default allowlist (torch/_weights_only_unpickler.py ``_get_allowed_globals``, torch 2.13);
# a test keeps this in step with the installed torch.
_TENSOR_TYPES = ("BFloat16", "Bool", "Byte", "Char", "Double", "Float", "Half", "Int", "Long", "Short")
_SPARSE_TYPES = tuple(t for t in _TENSOR_TYPES if t != "Bool")
_COMPLEX = ("ComplexDouble", "ComplexFloat")
_QUANTIZED = ("QInt32", "QInt8", "QUInt2x4", "QUInt4x2", "QUInt8")
TORCH_DEFAULT_GLOBALS = frozenset(
    {
        *["_codecs.encode", "builtins.bytearray", "builtins.complex", "builtins.set"],
        *["collections.Counter", "collections.OrderedDict", "torch.Size", "torch.device", "torch.Tensor"],
        *["torch.nn.parameter.Parameter", "torch.serialization._get_layout"],
        "torch._tensor._rebuild_from_type_v2",
        *(
            f"torch._utils._rebuild_{name}"
            for name in (
                *("tensor", "tensor_v2", "tensor_v3", "parameter", "parameter_with_state", "qtensor"),
                *("sparse_tensor", "nested_tensor", "meta_tensor_no_storage", "wrapper_subclass"),
                *("device_tensor_from_numpy", "device_tensor_from_cpu_tensor"),
            )
        ),
        *(f"torch.{name}" for name in TORCH_DTYPES),
        *(f"torch.per_{s}" for s in ("tensor_affine", "tensor_symmetric", "channel_affine")),
        *(f"torch.per_{s}" for s in ("channel_symmetric", "channel_affine_float_qparams")),
        *(f"torch.{t}Storage" for t in (*_TENSOR_TYPES, *_COMPLEX, *_QUANTIZED)),
        *(f"torch.cuda.{t}Storage" for t in (*_TENSOR_TYPES, *_COMPLEX)),
        *(f"torch.{t}Tensor" for t in _TENSOR_TYPES),
        *(f"torch.cuda.{t}Tensor" for t in _TENSOR_TYPES),
        *(f"torch.sparse.{t}Tensor" for t in _SPARSE_TYPES),
        *(f"torch.cuda.sparse.{t}Tensor" for t in _SPARSE_TYPES),
        "torch.storage.TypedStorage",
        "torch.storage.UntypedStorage",
    }
)
# The opcodes torch's weights-only unpickler implements (§1.1); anything else fails with
# "Unsupported operand <code>" whatever the allowlist says.
TORCH_OPCODES = frozenset(
    {
        *("GLOBAL", "NEWOBJ", "REDUCE", "BUILD", "APPEND", "APPENDS", "SETITEM", "SETITEMS", "MARK"),
        *("TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "NONE", "NEWFALSE", "NEWTRUE", "EMPTY_TUPLE"),
        *("EMPTY_LIST", "EMPTY_DICT", "EMPTY_SET", "BININT", "BININT1", "BININT2", "BINFLOAT"),
        *("BINUNICODE", "SHORT_BINSTRING", "BINPERSID", "BINGET", "LONG_BINGET", "BINPUT"),
        *("LONG_BINPUT", "LONG1", "PROTO", "STOP"),
    }
)
# Names §3 lists as never to be allowed although they are not hostile: they need a framework's
# code to load and are not needed to resume (training_args.bin, full-module saves).
_NEVER_ALLOW_PREFIXES = ("torch.nn.modules.", "transformers.", "accelerate.")
# numpy's per-dtype classes by dtype kind and item size (numpy.dtypes, numpy >= 1.25).
_NUMPY_DTYPE_CLASSES = {
    "b": {1: "BoolDType"},
    "i": {1: "Int8DType", 2: "Int16DType", 4: "Int32DType", 8: "Int64DType"},
    "u": {1: "UInt8DType", 2: "UInt16DType", 4: "UInt32DType", 8: "UInt64DType"},
    "f": {2: "Float16DType", 4: "Float32DType", 8: "Float64DType", 16: "LongDoubleDType"},
    "c": {8: "Complex64DType", 16: "Complex128DType", 32: "CLongDoubleDType"},
    "S": "BytesDType",
    "U": "StrDType",
    "V": "VoidDType",
    "M": "DateTime64DType",
    "m": "TimeDelta64DType",
}


@dataclass(frozen=True)
class AllowEntry:
    """One global torch.load would refuse by default, and what to do about it."""

    qualname: str  # as stored in the file (after Python 2 remapping)
    status: Status
    reason: str
    import_module: str = ""  # where to import it from, for vetted entries
    import_name: str = ""

    @property
    def expression(self) -> str:
        """The list element for add_safe_globals: plain, or torch's (obj, "stored.name") form."""
        name = self.import_name if "." in self.import_module else f"{self.import_module}.{self.import_name}"
        if f"{self.import_module}.{self.import_name}" == self.qualname:
            return name
        return f'({name}, "{self.qualname}")'


@dataclass
class FileDoctor:
    path: str
    kind: str
    needed: list[AllowEntry] = field(default_factory=list)
    blockers: list[str] = field(default_factory=list)  # what no allowlist can fix
    error: str | None = None

    @property
    def loads_by_default(self) -> bool:
        return not self.needed and not self.blockers and self.error is None

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "kind": self.kind,
            "loads_by_default": self.loads_by_default,
            "needed": [
                {"global": e.qualname, "status": e.status, "reason": e.reason, "expression": e.expression}
                for e in self.needed
            ],
            "blockers": self.blockers,
            "error": self.error,
        }


@dataclass
class DoctorReport:
    url: str
    files: list[FileDoctor]

    def entries(self, status: Status) -> list[AllowEntry]:
        seen: dict[str, AllowEntry] = {}
        for f in self.files:
            for entry in f.needed:
                if entry.status == status:
                    seen.setdefault(entry.qualname, entry)
        return sorted(seen.values(), key=lambda e: e.qualname)

    @property
    def exit_code(self) -> int:
        if self.entries("never-allow"):
            return EXIT_UNSAFE
        if self.entries("unvetted") or any(f.error or f.blockers for f in self.files):
            return EXIT_FINDINGS
        return EXIT_OK

    def snippet(self) -> str:
        """Ready-to-paste Python registering the vetted entries; empty when none are needed."""
        vetted = self.entries("vetted")
        if not vetted:
            return ""
        imports: dict[str, set[str]] = {}
        for entry in vetted:
            imports.setdefault(entry.import_module, set()).add(entry.import_name)
        lines = ["import torch"]
        for module, names in sorted(imports.items()):
            # A top-level package is imported whole: "from numpy import dtype" would shadow names.
            imported = ", ".join(sorted(names))
            lines.append(f"import {module}" if "." not in module else f"from {module} import {imported}")
        lines.append("")
        lines.append(f"torch.serialization.add_safe_globals([{', '.join(e.expression for e in vetted)}])")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "exit_code": self.exit_code,
            "snippet": self.snippet(),
            "vetted": [e.qualname for e in self.entries("vetted")],
            "never_allow": [e.qualname for e in self.entries("never-allow")],
            "unvetted": [e.qualname for e in self.entries("unvetted")],
            "files": [f.to_json() for f in self.files],
        }


def doctor(path: str | os.PathLike[str] | Store, **storage_options: Any) -> DoctorReport:
    """Diagnose every file torch.load would read below ``path`` (a file, directory or URL)."""
    target = scan_target(path, **storage_options)
    url = os.fspath(path) if not isinstance(path, Store) else path.url
    files = [d for d in (diagnose_file(target.store, key) for key in target.keys) if d is not None]
    return DoctorReport(url, files)


def diagnose_file(store: Store, key: str) -> FileDoctor | None:
    """What torch.load(weights_only=True) makes of ``key``; None for files torch.load does not read."""
    found = detect(store, key)
    if found.kind == "torchscript":
        return FileDoctor(key, found.kind, blockers=["TorchScript: torch.load refuses it; it holds code"])
    if found.kind == "tar":
        return FileDoctor(key, found.kind, blockers=["torch's TAR format: weights_only=True refuses it"])
    if found.kind in ("zip", "dcp-metadata"):
        return None  # torch.load refuses a zip without data.pkl; DCP reads .metadata itself
    if found.kind not in ("torch-zip", "torch-legacy", "pickle"):
        # torch.load unpickles any other file from byte 0 (its legacy path): whatever globals
        # that would meet (a broken or disguised pickle) need allowing as much as any others.
        uses = scan_file(store, key).globals
        needed = sorted({u.ref for u in uses if _extra(u.ref)}, key=str)
        return FileDoctor(key, found.kind, [_entry(ref) for ref in needed]) if uses else None
    result = FileDoctor(key, found.kind)
    if found.prefix_offset:
        result.blockers.append(f"{found.prefix_offset} bytes precede the zip archive: torch.load refuses it")
    try:
        torch_file = read_torch_file(store, key)
    except PickleFormatError as exc:  # a broken or hostile pickle still names what it read
        result.error = str(exc)
        result.needed = [_entry(r) for r in sorted({g.ref for g in exc.globals}, key=str) if _extra(r)]
        return result
    except FormatError as exc:
        result.error = str(exc)
        return result
    result.needed = _needed(torch_file)
    opcode = _first_unsupported_opcode(store, torch_file)
    if opcode is not None:
        result.blockers.append(opcode)
    return result


def _extra(ref: GlobalRef) -> bool:
    """Whether torch's weights-only unpickler refuses ``ref`` without an allowlist entry."""
    return ref.qualname not in TORCH_DEFAULT_GLOBALS


def _needed(torch_file: TorchFile) -> list[AllowEntry]:
    names = {g.ref for g in torch_file.globals if _extra(g.ref)}
    if any(ref.qualname == "numpy.dtype" for ref in names):
        names |= {GlobalRef("numpy.dtypes", cls) for cls in _numpy_dtype_classes(torch_file.value)}
    return [_entry(ref) for ref in sorted(names, key=lambda r: r.qualname)]


def _entry(ref: GlobalRef) -> AllowEntry:
    classification = classify(ref)
    if classification == "dangerous":
        return AllowEntry(ref.qualname, "never-allow", "runs code or reaches other code (never legitimate)")
    if ref.qualname.startswith(_NEVER_ALLOW_PREFIXES):
        return AllowEntry(
            ref.qualname, "never-allow", "needs a framework's code to load and is not needed to resume"
        )
    if classification == "unknown":
        return AllowEntry(ref.qualname, "unvetted", "not vetted by ckptkit: allow it only if you trust it")
    module, name = ref.module, ref.name
    if module == "numpy.core.multiarray":  # numpy 1.x wrote it; numpy 2 keeps the old path importable
        return AllowEntry(ref.qualname, "vetted", "numpy 1.x array pickling", module, name)
    return AllowEntry(ref.qualname, "vetted", "on ckptkit's vetted list", module, name)


def _numpy_dtype_classes(root: Any) -> set[str]:
    """The numpy.dtypes classes of every array and scalar dtype in the tree."""
    found: set[str] = set()
    seen: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) in seen or type(node) in (int, float, str, bytes, bool, type(None)):
            continue
        seen.add(id(node))
        if type(node) is NdArray:
            cls = _dtype_class(node.dtype)
            if cls:
                found.add(cls)
        elif isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, (list, tuple, set, frozenset)):
            stack.extend(node)
    return found


def _dtype_class(dtype: str) -> str | None:
    size = itemsize(dtype)
    kind = dtype[1:2]
    by_size = _NUMPY_DTYPE_CLASSES.get(kind)
    if isinstance(by_size, dict):
        return by_size.get(size or 0)
    return by_size


def _first_unsupported_opcode(store: Store, torch_file: TorchFile) -> str | None:
    """The first opcode torch's weights-only unpickler rejects, in the pickles torch.load reads."""
    try:
        for data in _loaded_pickles(store, torch_file):
            for opcode, _, pos in pickletools.genops(data):
                if opcode.name not in TORCH_OPCODES:
                    return _unsupported(opcode, pos, torch_file.protocol)
    except ValueError as exc:  # genops on malformed input: the symbolic reader already said why
        return f"the pickle does not decode: {exc}"
    return None


def _unsupported(opcode: pickletools.OpcodeInfo, pos: int, protocol: int | None) -> str:
    code = opcode.code.encode("latin-1")[0]
    hint = " (protocol >= 4 framing)" if opcode.name == "FRAME" else ""
    return (
        f"pickle protocol {protocol}: opcode {opcode.name}{hint} at byte {pos} fails torch's "
        f'weights-only unpickler ("Unsupported operand {code}"); no allowlist fixes that: '
        "re-save with protocol 2, or read the file with ckptkit.safe.safe_load"
    )


def _loaded_pickles(store: Store, torch_file: TorchFile) -> list[bytes]:
    """The pickles torch.load unpickles: data.pkl, the bare pickle, or a legacy file's five."""
    if torch_file.kind == "zip":
        archive = zr.read_zip(store, torch_file.key)
        entry = archive.get(f"{torch_file.record_prefix}/data.pkl")
        return [zr.read_record(store, archive, entry, max_size=MAX_PICKLE_BYTES)] if entry else []
    data = store.get(torch_file.key, 0, min(store.head(torch_file.key).size, MAX_PICKLE_BYTES))
    if torch_file.kind == "pickle":
        return [data]
    pickles, start = [], 0
    for _ in range(5):  # genops stops at STOP, so each pickle is cut out and read in turn
        end = start + next(pos for op, _, pos in pickletools.genops(data[start:]) if op.name == "STOP") + 1
        pickles.append(data[start:end])
        start = end
    return pickles
