"""safe_load against torch.load(weights_only=False), and safe_globals against torch.load(weights_only=True).

torch.load(weights_only=False) runs the file's pickle, so it only ever runs in a subprocess; both
sides are reduced to the same plain description (``describe``) and compared: tensors bit for bit
with dtype, shape, stride, offset, requires_grad, Parameter-ness and which storages they share;
numpy arrays bit for bit; DeepSpeed objects by class name and attributes.
"""

from __future__ import annotations

import enum
import hashlib
import json
import os
import subprocess
import sys
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any

import pytest

from ckptkit.errors import FormatError, UnsafeContentError
from ckptkit.pickle import classify
from ckptkit.pickle.entries import ref
from ckptkit.safe import RestoredObject, safe_globals, safe_load, vetted_globals

REPO_ROOT = Path(__file__).resolve().parents[1]


def describe(value: Any, storages: dict[int, int] | None = None) -> Any:
    """A JSON-able description of a loaded checkpoint that keeps everything a test compares."""
    import numpy as np
    import torch

    storages = {} if storages is None else storages
    if isinstance(value, torch.Tensor):
        storage = value.untyped_storage()
        key = storage.data_ptr() if storage.nbytes() else None
        flat = value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        return {
            "tensor": str(value.dtype),
            "shape": list(value.shape),
            "stride": list(value.stride()),
            "offset": value.storage_offset(),
            "requires_grad": value.requires_grad,
            "parameter": isinstance(value, torch.nn.Parameter),
            "storage": None if key is None else storages.setdefault(key, len(storages)),
            "sha256": hashlib.sha256(flat).hexdigest(),
            "attrs": describe(dict(vars(value)), storages),  # e.g. DeepSpeed ZeRO-3's ds_id
        }
    if isinstance(value, np.ndarray):
        return {"ndarray": value.dtype.str, "shape": list(value.shape), "bytes": value.tobytes().hex()}
    if isinstance(value, np.generic):
        return {"npscalar": value.dtype.str, "bytes": value.tobytes().hex()}
    if isinstance(value, enum.Enum):
        return ["int", int(value.value)]  # ZeroStageEnum: safe_load gives its int value, equal to it
    if isinstance(value, RestoredObject):
        return {"object": value.class_name, "state": describe(dict(value.state), storages)}
    if isinstance(value, torch.Size):
        return {"Size": list(value)}
    if isinstance(value, (torch.dtype, torch.device, torch.layout)):
        return {type(value).__name__: str(value)}
    if isinstance(value, dict):
        out = {
            "dict": type(value).__name__,
            "items": [[describe(k, storages), describe(v, storages)] for k, v in value.items()],
        }
        if type(value) in (OrderedDict, Counter) and vars(value):
            out["attrs"] = describe(dict(vars(value)), storages)
        return out
    if isinstance(value, (list, tuple)):
        return {type(value).__name__: [describe(v, storages) for v in value]}
    if isinstance(value, (set, frozenset)):
        return {type(value).__name__: sorted(json.dumps(describe(v, storages)) for v in value)}
    if isinstance(value, float):
        return {"float": repr(value)}
    if isinstance(value, (bool, int, str)) or value is None:
        return [type(value).__name__, value]
    if isinstance(value, bytes):
        return {"bytes": value.hex()}
    if hasattr(value, "__dict__"):  # a live DeepSpeed object (only in the subprocess)
        return {
            "object": f"{type(value).__module__}.{type(value).__qualname__}",
            "state": describe(vars(value), storages),
        }
    raise TypeError(f"cannot describe {type(value).__name__}")


def torch_load_described(paths: list[Path]) -> list[Any]:
    """``describe(torch.load(p, weights_only=False))`` for each path, run in a subprocess."""
    code = (
        "import json, sys, torch\nfrom tests.test_safe_load import describe\n"
        "loaded = [torch.load(p, map_location='cpu', weights_only=False) for p in sys.argv[1:]]\n"
        "print(json.dumps([describe(value) for value in loaded]))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-c", code, *map(str, paths)], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def _compare(paths: list[Path]) -> None:
    expected = torch_load_described(paths)
    for path, want in zip(paths, expected, strict=True):
        got = json.loads(json.dumps(describe(safe_load(path))))
        assert got == want, path


def test_torch_files_equal_torch_load(torch_checkpoints) -> None:
    # zip, legacy and protocol-4 files: the same object saved three ways, and SGD + momentum.
    _compare([torch_checkpoints.path(name) for name in torch_checkpoints.names])


def test_hf_trainer_files_equal_torch_load(hf_trainer_checkpoint) -> None:
    directory = next(iter(hf_trainer_checkpoint.checkpoints.values()))
    _compare([directory / name for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth")])


def test_deepspeed_files_equal_torch_load(deepspeed_checkpoints) -> None:
    paths = []
    for name in ("z1_fp16_steplr", "z1_bf16_none", "z2_fp16_overflow", "z3_fp16_overflow"):
        paths += sorted(p for p in deepspeed_checkpoints[name].tag_dir.glob("*.pt"))
    _compare(paths)


def test_deepspeed_objects_without_deepspeed(deepspeed_checkpoints) -> None:
    # safe_load never imports deepspeed: the scaler is a read-only attribute object.
    case = deepspeed_checkpoints["z2_fp16_overflow"]
    path = next(case.tag_dir.glob("*zero_pp_rank_0*optim_states.pt"))
    code = (
        "import sys\nfrom ckptkit.safe import safe_load\n"
        f"state = safe_load({str(path)!r})['optimizer_state_dict']\n"
        "assert 'deepspeed' not in sys.modules\nprint(state['loss_scaler'].cur_scale, state['zero_stage'])"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(case.expected["cur_scale"]), str(case.stage)]
    scaler = safe_load(path)["optimizer_state_dict"]["loss_scaler"]
    assert scaler["cur_scale"] == scaler.cur_scale == case.expected["cur_scale"]
    with pytest.raises(AttributeError):
        scaler.cur_scale = 1.0


def test_views_share_storage_and_map_location(tmp_path: Path) -> None:
    import torch

    base = torch.arange(12, dtype=torch.float64)
    state = {
        "base": base,
        "view": base[2:8].view(2, 3),
        "t": base.view(3, 4).t(),
        "p": torch.nn.Parameter(base[:3]),
    }
    torch.save(state, tmp_path / "views.pt")
    loaded = safe_load(tmp_path / "views.pt", map_location="cpu")
    assert loaded["view"].untyped_storage().data_ptr() == loaded["base"].untyped_storage().data_ptr()
    assert loaded["t"].stride() == (1, 4) and torch.equal(loaded["t"], state["t"])
    assert isinstance(loaded["p"], torch.nn.Parameter) and loaded["p"].requires_grad
    loaded["base"][2] = -1.0  # one storage: the write shows through the view, as with torch.load
    assert loaded["view"][0, 0] == -1.0
    remapped = safe_load(tmp_path / "views.pt", map_location={"cpu": "meta"})
    assert remapped["base"].device.type == "meta"


def test_refuses_unvetted_and_inconsistent_files(tmp_path: Path, hf_trainer_checkpoint) -> None:
    directory = next(iter(hf_trainer_checkpoint.checkpoints.values()))
    with pytest.raises(UnsafeContentError, match=r"transformers\.training_args\.TrainingArguments"):
        safe_load(directory / "training_args.bin")
    # A storage record one byte short of what the pickle declares: refused, nothing built.
    import torch

    torch.save({"w": torch.ones(4)}, tmp_path / "ok.pt")
    import zipfile

    with zipfile.ZipFile(tmp_path / "ok.pt") as src, zipfile.ZipFile(tmp_path / "short.pt", "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            dst.writestr(info.filename, data[:-1] if "/data/" in info.filename else data)
    with pytest.raises(FormatError, match="holds 15 bytes"):
        safe_load(tmp_path / "short.pt")
    with pytest.raises(FormatError, match="directory"):
        safe_load(tmp_path)


def test_safe_globals_registers_only_vetted_names() -> None:
    for entry in vetted_globals():
        _, name = entry if isinstance(entry, tuple) else (entry, f"{entry.__module__}.{entry.__qualname__}")
        assert classify(ref(name)) == "vetted", name


def test_safe_globals_lets_weights_only_load(hf_trainer_checkpoint, deepspeed_checkpoints) -> None:
    # Runs torch.load(weights_only=True), the loader of last resort, with our allowlist.
    import torch

    directory = next(iter(hf_trainer_checkpoint.checkpoints.values()))
    optim = next(deepspeed_checkpoints["z1_fp16_steplr"].tag_dir.glob("*optim_states.pt"))
    for path in (directory / "rng_state.pth", optim):
        with pytest.raises(Exception, match="Weights only load failed"):
            torch.load(path, weights_only=True)
        with safe_globals() as entries:
            assert torch.load(path, weights_only=True)
        assert entries and not set(map(id, entries)) & set(map(id, torch.serialization.get_safe_globals()))
