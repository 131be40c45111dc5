"""What ``torch.load`` will make of each file a resume loads, predicted without loading it.

The symbolic reading of ``ops/doctor`` says which globals a file needs beyond torch's default
allowlist (a table kept equal to the installed torch's ``_get_allowed_globals`` by a test) and
what no allowlist fixes (opcodes torch's unpickler lacks, TorchScript). From that and the load's
settings this module predicts the outcome:

- ``weights_only=True``: every needed global must be allowed: by the defaults, or, when the
  loader runs inside ``ckptkit.safe_globals()`` (or ``use_ckptkit``), by the names it registers;
- ``weights_only=False``: everything loads that the resuming versions can import;
- either way, a name the resuming torch or DeepSpeed lacks fails (``resume_plan_versions``).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Literal

from ckptkit.ops.doctor import AllowEntry, diagnose_file
from ckptkit.ops.resume_plan_versions import at_least, missing_in
from ckptkit.ops.scan import scan_file
from ckptkit.pickle.registered import DEEPSPEED_GLOBALS, NUMPY_CORES, NUMPY_GLOBALS
from ckptkit.storage import Store


def transformers_rng_globals(numpy_version: str | None) -> frozenset[str]:
    """What the HF Trainer allows around its ``torch.load(rng_file, weights_only=True)``
    (transformers.trainer_pt_utils.safe_globals): numpy's ``_reconstruct`` under the running
    numpy's own module path only, so a numpy-1 file resumed under numpy 2 is still refused."""
    core = "numpy._core" if numpy_version and at_least(numpy_version, "2.0.0") else "numpy.core"
    return frozenset(
        {f"{core}.multiarray._reconstruct", "numpy.ndarray", "numpy.dtype", "numpy.dtypes.UInt32DType"}
    )


Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class LoadFinding:
    kind: str  # weights-only | unsupported | version-skew | unreadable | runs-code
    severity: Severity
    message: str
    fix: str


def ckptkit_registered_names() -> frozenset[str]:
    """The globals ``ckptkit.safe_globals()`` registers here, by name (``safe.vetted_globals``
    without importing anything: DeepSpeed's only when it is installed, as there)."""
    names: set[str] = set()
    if importlib.util.find_spec("deepspeed") is not None:
        names.update(f"{module}.{name}" for module, name in DEEPSPEED_GLOBALS)
    if importlib.util.find_spec("numpy") is not None:
        names.update(f"{module}.{name}" for module, name in NUMPY_GLOBALS)
        names.update(f"{core}._reconstruct" for core in NUMPY_CORES)
    return frozenset(names)


def predict_load(
    store: Store,
    key: str,
    *,
    weights_only: bool,
    safe_globals: bool,
    versions: dict[str, str | None],
    also_allowed: frozenset[str] = frozenset(),
) -> list[LoadFinding]:
    """What ``torch.load(key, weights_only=...)`` meets that fails (or runs code); nothing for a
    file torch.load does not read (safetensors, JSON). ``also_allowed``: globals the loader itself
    registers around this load (transformers' numpy allowlist for ``rng_state.pth``)."""
    diagnosis = diagnose_file(store, key)
    if diagnosis is None:
        return []
    findings: list[LoadFinding] = []
    if diagnosis.error is not None:
        findings.append(
            LoadFinding("unreadable", "error", f"does not unpickle: {diagnosis.error}",
                        "restore this file from a good copy (ckptkit verify names what broke)")
        )
    for qualname in _all_globals(store, key):
        row = missing_in(qualname, versions)
        if row is not None:
            have = versions[row.package]
            findings.append(
                LoadFinding(
                    "version-skew", "error",
                    f"names {qualname}, which {row.package} {have} does not have ({row.source})",
                    f"resume under a {row.package} version that has it, or read the file with "
                    "ckptkit.safe_load (names are not imported)",
                )
            )
    if weights_only:
        refused = [entry for entry in diagnosis.needed if entry.qualname not in also_allowed]
        findings += _weights_only(diagnosis.blockers, refused, safe_globals)
    else:
        unsafe = [e.qualname for e in diagnosis.needed if e.status == "never-allow"]
        if unsafe:
            findings.append(
                LoadFinding(
                    "runs-code", "warning",
                    f"weights_only=False imports and calls {', '.join(unsafe)}",
                    "load it with ckptkit.safe_load, which runs nothing from the file",
                )
            )
    return findings


def _all_globals(store: Store, key: str) -> list[str]:
    """Every global the file names, torch's defaults included (``_rebuild_tensor_v3`` is one
    that an older torch lacks); doctor's list keeps only the non-defaults."""
    return sorted({use.ref.qualname for use in scan_file(store, key).globals})


def _weights_only(
    blockers: list[str], needed: list[AllowEntry], safe_globals: bool
) -> list[LoadFinding]:
    findings = [
        LoadFinding("unsupported", "error", blocker, "read it with ckptkit.safe_load, or re-save it")
        for blocker in blockers
    ]
    allowed = ckptkit_registered_names() if safe_globals else frozenset()
    refused = [entry.qualname for entry in needed if entry.qualname not in allowed]
    if not refused:
        return findings
    never = [entry.qualname for entry in needed if entry.status == "never-allow"]
    if never:  # allowing these would run code (or a framework's): no allowlist is the fix
        fix = (f"never allow {', '.join(never)}; read the file with ckptkit.safe_load (which refuses "
               "them), or re-save it without them")
    elif all(name in ckptkit_registered_names() for name in refused):
        fix = ("load inside ckptkit.safe_globals() (or through use_ckptkit / ckptkit.safe_load), or "
               f"torch.serialization.add_safe_globals([{', '.join(refused)}])")
    else:
        fix = (f"torch.serialization.add_safe_globals([{', '.join(refused)}]) if you trust them, "
               "or read the file with ckptkit.safe_load")
    findings.append(
        LoadFinding(
            "weights-only", "error",
            f"torch.load(weights_only=True) refuses {', '.join(refused)}",
            fix,
        )
    )
    return findings
