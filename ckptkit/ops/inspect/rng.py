"""``--rng``: which random-number-generator states a checkpoint holds, per rank.

HF writes ``rng_state.pth`` (one process) or ``rng_state_{rank}.pth``: ``{"python", "numpy",
"cpu", "cuda", ...}``; training scripts often keep a similar dict under ``"rng"``. Python and
numpy states are inline in the pickle, so a short fingerprint of each costs nothing and shows
whether ranks were seeded apart; torch's states are tensors and are only described.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ckptkit.ops.inspect.context import Context, find
from ckptkit.ops.inspect.values import as_tensor, plain
from ckptkit.pickle import NdArray

_KNOWN = frozenset(
    {"python", "numpy", "cpu", "torch", "cuda", "xla", "npu", "hpu", "mlu", "musa", "mps", "xpu"}
)
_RANK = re.compile(r"rng_state_(\d+)\.pth$|random_states_(\d+)\.pkl$")


@dataclass
class RngState:
    file: str
    path: str
    rank: int | None
    present: list[str]  # the generators it holds: python, numpy, torch cpu, cuda:0 ...
    details: dict[str, Any] = field(default_factory=dict)


def is_rng_state(value: Any) -> bool:
    return isinstance(value, Mapping) and len(_KNOWN & {str(k) for k in value}) >= 2


def find_rng(ctx: Context) -> list[RngState]:
    found = []
    for doc in ctx.documents:
        for path, state in find(doc.value, is_rng_state, max_depth=2):
            match = _RANK.search(doc.file)
            rank = next((int(g) for g in match.groups() if g), None) if match else None
            found.append(_describe(doc.file, path, rank, state))
    return found


def _describe(file: str, path: str, rank: int | None, state: Mapping[str, Any]) -> RngState:
    info = RngState(file, path, rank, [])
    for key, value in state.items():
        key = str(key)
        if key == "python" and isinstance(value, tuple) and len(value) == 3:
            info.present.append("python")
            info.details["python"] = {
                "version": value[0],
                "state_len": len(value[1]),
                "fingerprint": _digest(repr(value[1]).encode()),
            }
        elif key == "numpy" and isinstance(value, tuple) and len(value) >= 3 and type(value[1]) is NdArray:
            info.present.append("numpy")
            info.details["numpy"] = {
                "kind": value[0],
                "pos": value[2],
                "key_len": value[1].shape[0] if value[1].shape else 0,
                "fingerprint": _digest(value[1].data),
            }
        elif key in ("cpu", "torch") and as_tensor(value) is not None:
            info.present.append("torch cpu")
            info.details["torch cpu"] = plain(value)
        elif key == "cuda" or key in _KNOWN:
            # Per-device states: a list of tensors (one per device) or a single tensor.
            devices = value if isinstance(value, (list, tuple)) else [value]
            tensors = [t for t in devices if as_tensor(t) is not None]
            info.present += [f"{key}:{i}" for i in range(len(tensors))] or [key]
            info.details[key] = [plain(t) for t in devices]
        else:
            info.details[key] = plain(value)
    return info


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:12]
