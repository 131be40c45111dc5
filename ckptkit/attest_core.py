"""The core of attestation: tensors as digests, the report, and the comparison of a saved
digest tree with a live one (see :func:`ckptkit.attest`). torch is imported only to hash
a live tensor."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ckptkit.errors import AttestationError

# How many differences the error message names before it counts the rest.
_SHOWN = 20

@dataclass(frozen=True)
class TensorDigest:
    """A tensor as attestation compares it: dtype name, shape, BLAKE3 of its bytes in element order."""

    dtype: str
    shape: tuple[int, ...]
    digest: str


@dataclass(frozen=True)
class Difference:
    """One tensor or field whose live value is not the saved one."""

    what: str  # "model.fc.weight", "optimizer.state[1].exp_avg", "scheduler.last_epoch"
    reason: str
    param: str | None = None  # the parameter an optimizer state entry belongs to, when known

    def __str__(self) -> str:
        where = f"{self.what} ({self.param})" if self.param else self.what
        return f"{where}: {self.reason}"


@dataclass
class AttestReport:
    """What :func:`attest` compared and what differs; ``ok`` when nothing does."""

    checkpoint: str
    compared: dict[str, int] = field(default_factory=dict)  # part -> tensors and fields compared
    differences: list[Difference] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.differences

    def to_json(self) -> dict[str, Any]:
        return {
            "checkpoint": self.checkpoint,
            "ok": self.ok,
            "compared": dict(self.compared),
            "differences": [
                {"what": d.what, "param": d.param, "reason": d.reason} for d in self.differences
            ],
        }

    def raise_for_differences(self) -> None:
        if self.ok:
            return
        shown = [str(d) for d in self.differences[:_SHOWN]]
        more = len(self.differences) - len(shown)
        raise AttestationError(
            f"{self.checkpoint}: the loaded state is not the saved state; {len(self.differences)} "
            "tensor(s) or field(s) differ: " + "; ".join(shown) + (f"; and {more} more" if more else ""),
            checkpoint=self.checkpoint, differences=[str(d) for d in self.differences],
        )


PARTS = ("model", "optimizer", "scheduler", "scaler")


def attest_parts(url: str, saved: Mapping[str, Any], given: Mapping[str, Any]) -> AttestReport:
    """Compare each live part in ``given`` (``model``, ``optimizer``, ``scheduler``, ``scaler``:
    objects with ``state_dict()``, or state dicts) with ``saved[part]``, a digest tree; a part
    the checkpoint lacks is a difference (``saved["_where"]`` says where it was looked for)."""
    report = AttestReport(url)
    names = _param_names(given.get("model"), given.get("optimizer"))
    for part, live in given.items():
        if part not in saved:
            report.differences.append(Difference(part, f"not in the checkpoint ({saved.get('_where')})"))
            continue
        before = len(report.differences)
        state = _state_of(live)
        report.compared[part] = compare(
            saved[part], digest_tree(state), part, report.differences, names if part == "optimizer" else None
        )
        if part == "model":
            forgive_tied(report.differences, before, state, saved[part])
    return report


def _state_of(live: Any) -> Any:
    state_dict = getattr(live, "state_dict", None)
    return state_dict() if callable(state_dict) else live


def _param_names(model: Any, optimizer: Any) -> dict[int, str]:
    """The optimizer's state-dict parameter indices -> the model's parameter names, where both
    are given: optimizer state entries are numbered, and a number alone tells the user little."""
    named = getattr(model, "named_parameters", None)
    groups = getattr(optimizer, "param_groups", None)
    if not callable(named) or not isinstance(groups, list):
        return {}
    by_id = {id(p): name for name, p in named()}
    params = [p for group in groups for p in group["params"]]
    return {i: by_id[id(p)] for i, p in enumerate(params) if id(p) in by_id}


# --- digests -----------------------------------------------------------------------------------


def tensor_digest(tensor: Any) -> TensorDigest:
    """A tensor's dtype, shape and BLAKE3 of its bytes, copied to CPU first if it is elsewhere."""
    import torch
    from blake3 import blake3

    data = tensor.detach()
    if data.device.type != "cpu":
        data = data.cpu()
    flat = data.contiguous().reshape(-1)
    raw = flat.view(torch.uint8) if flat.numel() else flat
    hasher = blake3()
    if raw.numel():
        hasher.update(memoryview(raw.numpy()))
    return TensorDigest(str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape), hasher.hexdigest())


def digest_tree(value: Any) -> Any:
    """``value`` with every tensor replaced by its :class:`TensorDigest` (containers rebuilt)."""
    if type(value).__module__.startswith("torch") and hasattr(value, "dtype") and hasattr(value, "shape"):
        return tensor_digest(value)
    if isinstance(value, Mapping):
        # Keys as strings: DCP and JSON-like stores keep an optimizer's state keys 0, 1 as "0", "1".
        return {str(k): digest_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [digest_tree(v) for v in value]
    return value


# --- comparison ---------------------------------------------------------------------------------


def compare(
    saved: Any, live: Any, path: str, out: list[Difference], param_names: dict[int, str] | None = None
) -> int:
    """Append to ``out`` what differs between digest trees ``saved`` and ``live``; returns how
    many leaves (tensors and fields) were compared."""
    if isinstance(saved, TensorDigest) or isinstance(live, TensorDigest):
        _compare_tensor(saved, live, path, out, _param_of(path, param_names))
        return 1
    if isinstance(saved, Mapping) and isinstance(live, Mapping):
        count = 0
        for key in list(saved) + [k for k in live if k not in saved]:
            where = _join(path, key)
            param = _param_of(where, param_names)
            if key not in live:
                out.append(Difference(where, "saved, missing from the live state", param))
            elif key not in saved:
                out.append(Difference(where, "in the live state, not in the checkpoint", param))
            else:
                count += compare(saved[key], live[key], where, out, param_names)
        return count
    if _is_sequence(saved) and _is_sequence(live):
        if len(saved) != len(live):
            out.append(Difference(path, f"{len(saved)} entries saved, {len(live)} live"))
            return 1
        pairs = enumerate(zip(saved, live, strict=True))
        return sum(compare(s, v, f"{path}[{i}]", out, param_names) for i, (s, v) in pairs)
    if not _same_value(saved, live):
        param = _param_of(path, param_names)
        out.append(Difference(path, f"saved {_short(saved)}, live {_short(live)}", param))
    return 1


def _compare_tensor(saved: Any, live: Any, path: str, out: list[Difference], param: str | None) -> None:
    if not (isinstance(saved, TensorDigest) and isinstance(live, TensorDigest)):
        kind = "a tensor" if isinstance(saved, TensorDigest) else _short(saved)
        other = "a tensor" if isinstance(live, TensorDigest) else _short(live)
        out.append(Difference(path, f"saved {kind}, live {other}", param))
    elif saved.shape != live.shape:
        out.append(Difference(path, f"shape {list(saved.shape)} saved, {list(live.shape)} live", param))
    elif saved.dtype != live.dtype:
        out.append(Difference(path, f"dtype {saved.dtype} saved, {live.dtype} live", param))
    elif saved.digest != live.digest:
        out.append(Difference(path, "values differ", param))


def forgive_tied(out: list[Difference], start: int, live_state: Any, saved: Any) -> None:
    """A live model tensor that is absent from the checkpoint but shares storage with one that is
    in it: a tied weight (``lm_head.weight`` = ``embed_tokens.weight``), which safetensors
    files store once. Not a difference."""
    if not isinstance(live_state, Mapping) or not isinstance(saved, Mapping):
        return
    pointers: dict[int, set[str]] = {}
    for name, tensor in live_state.items():
        pointer = getattr(tensor, "data_ptr", None)
        if callable(pointer) and tensor.numel():
            pointers.setdefault(pointer(), set()).add(name)
    kept = out[:start]
    for difference in out[start:]:
        name = difference.what.removeprefix("model.")
        tensor = live_state.get(name)
        has_storage = callable(getattr(tensor, "data_ptr", None))
        twins = pointers.get(tensor.data_ptr(), set()) if has_storage else set()
        if difference.reason.startswith("in the live state") and any(t in saved for t in twins - {name}):
            continue
        kept.append(difference)
    out[:] = kept


def _param_of(path: str, names: dict[int, str] | None) -> str | None:
    if not names or not path.startswith("optimizer.state."):
        return None
    index = path.removeprefix("optimizer.state.").partition(".")[0]
    return names.get(int(index)) if index.isdigit() else None


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}"


def _is_sequence(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes, bytearray))


def _same_value(saved: Any, live: Any) -> bool:
    if isinstance(saved, float) and isinstance(live, float) and math.isnan(saved) and math.isnan(live):
        return True
    if type(saved).__name__ == "RestoredObject":  # a vetted class the safe loader kept as its state
        return dict(saved.state) == dict(getattr(live, "__dict__", {}))
    try:
        return bool(saved == live)
    except Exception:  # an object without a usable __eq__ (an array-like): not equal, and said so
        return False


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
