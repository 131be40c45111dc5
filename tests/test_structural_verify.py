"""verify_structure: checkpoints without a ckptkit manifest, checked by what their files say.

Real checkpoints pass; copies with one defect each fail, naming it. Tests corrupt copies only:
the generated fixtures are shared by the whole session.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from ckptkit.formats import zipfile_reader as zr
from ckptkit.ops.structural import verify_structure
from ckptkit.storage import open_store


def _errors(path: Path) -> list[str]:
    report = verify_structure(open_store(path))
    assert report.status == ("structural-ok" if report.ok else "failed")
    return [f"{f.kind}: {f.path}: {f.message}" for f in report.findings if f.severity == "error"]


def test_real_checkpoints_hold(torch_checkpoints, hf_trainer_checkpoint, deepspeed_checkpoints) -> None:
    roots = [torch_checkpoints.root, *hf_trainer_checkpoint.checkpoints.values()]
    roots += [case.save_dir for case in deepspeed_checkpoints.cases.values()]
    for root in roots:
        report = verify_structure(open_store(root))
        assert report.status == "structural-ok", (root, [f.message for f in report.findings])
        assert any(f.kind == "no-manifest" and "ckptkit index" in f.message for f in report.findings)
        assert report.bytes_checked > 0
    assert (
        verify_structure(open_store(deepspeed_checkpoints["z3_bf16_warmuplr_4rank"].save_dir)).layout
        == "deepspeed"
    )


def test_flipped_tensor_byte_fails_crc(torch_checkpoints, tmp_path: Path) -> None:
    # torch.load would load this silently: it never checks zip CRCs.
    path = tmp_path / "model.pt"
    shutil.copy(torch_checkpoints.path("sequential.pt"), path)
    store = open_store(tmp_path)
    entry = next(e for e in zr.read_zip(store, "model.pt").entries if "/data/" in e.name and e.size)
    data = bytearray(path.read_bytes())
    data[zr.data_offset(store, entry)] ^= 0x01  # local headers carry torch's alignment padding
    path.write_bytes(bytes(data))
    errors = _errors(tmp_path)
    assert any(e.startswith("crc:") and entry.name in e for e in errors), errors


def test_truncated_and_impostor_files(torch_checkpoints, tmp_path: Path) -> None:
    data = torch_checkpoints.path("adamw_onecycle.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "pointer.bin").write_bytes(
        b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 9\n"
    )
    errors = _errors(tmp_path)
    assert any("truncated.pt" in e and "truncated" in e for e in errors), errors
    assert any("pointer.bin" in e and "git lfs pull" in e for e in errors), errors


def test_tensor_view_past_its_record(tmp_path: Path) -> None:
    import torch

    torch.save({"w": torch.ones(4)}, tmp_path / "ok.pt")
    with zipfile.ZipFile(tmp_path / "ok.pt") as src, zipfile.ZipFile(tmp_path / "short.pt", "w") as dst:
        for info in src.infolist():
            body = src.read(info)
            dst.writestr(info.filename, body[:-4] if "/data/" in info.filename else body)
    (tmp_path / "ok.pt").unlink()
    errors = _errors(tmp_path)
    assert any("short.pt" in e and "holds 12 bytes" in e for e in errors), errors


def test_missing_deepspeed_rank_file(deepspeed_checkpoints, tmp_path: Path) -> None:
    case = deepspeed_checkpoints["z3_bf16_warmuplr_4rank"]
    copy = tmp_path / "ckpt"
    shutil.copytree(case.save_dir, copy)
    victim = next((copy / case.tag).glob("*zero_pp_rank_2_*optim_states.pt"))
    victim.unlink()
    errors = _errors(copy)
    assert any(e.startswith("deepspeed:") and victim.name in e and "dp_world_size 4" in e for e in errors), (
        errors
    )
    (copy / "latest").write_text("global_step999")
    assert any("global_step999" in e for e in _errors(copy))


def test_hf_index_and_safetensors_defects(hf_trainer_checkpoint, tmp_path: Path) -> None:
    directory = tmp_path / "ckpt"
    shutil.copytree(next(iter(hf_trainer_checkpoint.checkpoints.values())), directory)
    weights = directory / "model.safetensors"
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {"x.weight": "model-00002-of-00002.safetensors"}})
    )
    weights.write_bytes(weights.read_bytes() + b"\0" * 8)  # trailing bytes after the last tensor
    errors = _errors(directory)
    assert any(e.startswith("hf-index:") and "model-00002-of-00002.safetensors" in e for e in errors), errors
    assert any(e.startswith("safetensors:") and "model.safetensors" in e for e in errors), errors


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_dcp_missing_data_file(tmp_path: Path) -> None:
    import torch
    import torch.distributed.checkpoint as dcp

    dcp.save({"w": torch.arange(10.0), "b": torch.ones(3)}, checkpoint_id=str(tmp_path / "dcp"))
    assert _errors(tmp_path / "dcp") == []
    next((tmp_path / "dcp").glob("*.distcp")).unlink()
    errors = _errors(tmp_path / "dcp")
    assert any(e.startswith("dcp:") and "missing" in e for e in errors), errors


def _verify_cli(path: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "ckptkit", "verify", str(path)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_deepspeed_defects_through_the_cli(deepspeed_checkpoints, tmp_path: Path) -> None:
    case = deepspeed_checkpoints["z2_fp16_overflow"]
    pristine = tmp_path / "pristine"
    shutil.copytree(case.save_dir, pristine)
    intact = _verify_cli(pristine)
    assert intact.returncode == 0, intact.stdout + intact.stderr

    def broken(name: str) -> Path:
        copy = tmp_path / name
        shutil.copytree(case.save_dir, copy)
        return copy

    truncated = broken("truncated")
    partition = next((truncated / case.tag).glob("*zero_pp_rank_1_*optim_states.pt"))
    partition.write_bytes(partition.read_bytes()[: partition.stat().st_size // 2])
    out = _verify_cli(truncated)
    assert out.returncode == 1 and partition.name in out.stdout, out.stdout

    dangling = broken("dangling")
    (dangling / "latest").write_text("global_step999")
    out = _verify_cli(dangling)
    assert out.returncode == 1 and "latest names tag 'global_step999', which has no files" in out.stdout

    escaping = broken("escaping")
    (escaping / "latest").write_text("../../etc")
    out = _verify_cli(escaping)
    assert out.returncode == 1 and "latest names '../../etc', not a tag directory" in out.stdout

    mixed = broken("mixed")
    (mixed / case.tag).rename(mixed / "global_step1")
    (mixed / "latest").write_text("global_step1")
    out = _verify_cli(mixed)
    assert out.returncode == 1 and "tag global_step1 holds global_steps" in out.stdout, out.stdout


def test_partition_sizes_must_match_param_shapes(deepspeed_checkpoints, tmp_path: Path) -> None:
    import torch

    case = deepspeed_checkpoints["z2_fp16_overflow"]
    copy = tmp_path / "mixed"
    shutil.copytree(case.save_dir, copy)
    assert _errors(copy) == []
    # Model states that claim one parameter is bigger than the one the partitions hold (the
    # test's own fixture, so unpickling it here is safe).
    model_states = copy / case.tag / "mp_rank_00_model_states.pt"
    state = torch.load(model_states, weights_only=False)
    group = state["param_shapes"][0]
    name = next(iter(group))
    group[name] = torch.Size([*group[name][:-1], group[name][-1] + 64])
    torch.save(state, model_states)
    errors = _errors(copy)
    assert any("partitions do not match param_shapes" in e for e in errors), errors
