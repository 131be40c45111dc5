"""Which versions of torch and DeepSpeed a resume will run under, and the names they lack.

A pickle names its classes by import path; a file written under one version can name a class that
the version resuming it does not have (moved, renamed, or not yet written). Unpickling then fails
with ``AttributeError`` or ``ModuleNotFoundError`` whether ``weights_only`` is on or off, and no
allowlist helps. :data:`RENAMES` is the small table of such names ckptkit knows, each row with its
source; :func:`missing_in` asks it. Torch-free: installed versions come from package metadata.
"""

from __future__ import annotations

import importlib.metadata
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class NameSpan:
    """A pickled global and the versions of ``package`` that define it: ``[since, until)``."""

    qualname: str
    package: str  # "torch" | "deepspeed"
    since: str | None  # first version that has it (None: always had it, as far as ckptkit knows)
    until: str | None  # first version that no longer has it (None: still there)
    source: str


_SCALER = "deepspeed.runtime.fp16.loss_scaler"
_MOVE = "DeepSpeed v0.3.0 package move"
_SCALERS = ("LossScaler", "DynamicLossScaler")
RENAMES: tuple[NameSpan, ...] = (
    # DeepSpeed v0.3.0 moved the package deepspeed.pt.* to deepspeed.runtime.* (the loss scalers to
    # deepspeed/runtime/fp16/loss_scaler.py): files of either side name classes the other lacks.
    *(NameSpan(f"{_SCALER}.{cls}", "deepspeed", "0.3.0", None, _MOVE) for cls in _SCALERS),
    *(NameSpan(f"deepspeed.pt.loss_scaler.{cls}", "deepspeed", None, "0.3.0", _MOVE) for cls in _SCALERS),
    # The ZeRO config became a pydantic model with ZeroStageEnum (DeepSpeed PR #2004, merged
    # 2022-06-09, first released in 0.7.0); optimizer files pickle the stage as that enum since.
    NameSpan("deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed", "0.7.0", None, "DeepSpeed PR #2004"),
    # torch/_utils.py gained _rebuild_tensor_v3 (tensors whose dtype differs from their untyped
    # storage) in torch 2.1.0; torch 2.0 cannot unpickle it.
    NameSpan("torch._utils._rebuild_tensor_v3", "torch", "2.1.0", None, "torch v2.1.0 torch/_utils.py"),
    # New dtypes: float8 in torch 2.1.0, the fnuz float8 variants in 2.2.0, uint16/32/64 in 2.3.0
    # (each release's torch/_C/_VariableFunctions dtype list); a tensor of one names it.
    *(
        NameSpan(f"torch.{d}", "torch", "2.1.0", None, "torch v2.1.0 release notes (float8 dtypes)")
        for d in ("float8_e4m3fn", "float8_e5m2")
    ),
    *(
        NameSpan(f"torch.{d}", "torch", "2.2.0", None, "torch v2.2.0 release notes (fnuz float8 dtypes)")
        for d in ("float8_e4m3fnuz", "float8_e5m2fnuz")
    ),
    *(
        NameSpan(f"torch.{d}", "torch", "2.3.0", None, "torch v2.3.0 release notes (unsigned dtypes)")
        for d in ("uint16", "uint32", "uint64")
    ),
)
_BY_NAME = {row.qualname: row for row in RENAMES}

# torch 2.6 flipped torch.load's default to weights_only=True (pytorch/pytorch#137602).
WEIGHTS_ONLY_DEFAULT_SINCE = "2.6.0"
# DeepSpeed's TorchCheckpointEngine passes weights_only=False itself since DeepSpeed PR #7000
# (released in 0.16.4), so its own loads never meet torch 2.6's default.
DEEPSPEED_PASSES_WEIGHTS_ONLY_FALSE_SINCE = "0.16.4"

_NUMBERS = re.compile(r"\d+")


def parse_version(text: str) -> tuple[int, ...]:
    """``"2.6.0+cpu"`` → ``(2, 6, 0)``: the leading dotted numbers, padded to three."""
    parts = []
    for piece in text.strip().split("."):
        match = _NUMBERS.match(piece)
        if match is None:
            break
        parts.append(int(match.group()))
        if match.end() != len(piece):  # "0rc1", "0+cpu": the rest is not a release number
            break
    if not parts:
        raise ValueError(f"not a version: {text!r}")
    return tuple(parts + [0] * (3 - len(parts)))


def at_least(version: str, floor: str) -> bool:
    return parse_version(version) >= parse_version(floor)


def installed_version(package: str) -> str | None:
    """The installed distribution's version, from its metadata (nothing is imported)."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def missing_in(qualname: str, versions: dict[str, str | None]) -> NameSpan | None:
    """The table row saying ``qualname`` does not exist in the given package versions, if any."""
    row = _BY_NAME.get(qualname)
    version = versions.get(row.package) if row else None
    if row is None or version is None:
        return None
    if row.since is not None and not at_least(version, row.since):
        return row
    if row.until is not None and at_least(version, row.until):
        return row
    return None
