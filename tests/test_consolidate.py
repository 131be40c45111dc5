"""``consolidate``: every real ZeRO fixture case, consolidated bit-exactly against DeepSpeed's own tool."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from ckptkit.cli.main import cli
from ckptkit.errors import FormatError
from ckptkit.ops.consolidate import consolidate_zero, parse_size, zero_state_dict
from ckptkit.ops.convert import convert
from ckptkit.storage import open_store
from tests.fixtures.gen_deepspeed import ALL_CASES

CASE_NAMES = [c.name for c in ALL_CASES]
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def _same(got: torch.Tensor, expected: torch.Tensor) -> bool:
    """Bit-identical; a lower-precision expected tensor (frozen params) is compared after an exact upcast."""
    if got.shape != expected.shape:
        return False
    if got.dtype != expected.dtype:
        if not (got.dtype == torch.float32 and expected.dtype in (torch.bfloat16, torch.float16)):
            return False
        # bf16/fp16 -> fp32 is exact and injective, so this is bit-identity of the stored values.
        return torch.equal(_bits(got.to(expected.dtype)), _bits(expected)) and torch.equal(
            _bits(got), _bits(expected.to(torch.float32))
        )
    return torch.equal(_bits(got), _bits(expected))


@pytest.mark.parametrize("name", CASE_NAMES)
def test_bit_identical_to_zero_to_fp32(deepspeed_checkpoints: Any, tmp_path: Path, name: str) -> None:
    case = deepspeed_checkpoints[name]
    result = consolidate_zero(case.save_dir, tmp_path / "out")
    assert result.ok and result.stage == case.stage and result.world_size == case.world_size
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    expected = case.expected_fp32()
    for key, value in expected.items():
        assert key in got, key
        assert _same(got[key], value), key
    # Frozen params (even at stage 1, where zero_to_fp32 drops them), buffers and tied params.
    for key in case.expected["frozen_param_names"] + case.expected["buffer_names"]:
        assert key in got and got[key].dtype == torch.float32
    for alias, source in case.expected["shared_params"].items():
        assert torch.equal(got[alias], got[source])
    assert set(got) == set(expected) | set(case.expected["frozen_param_names"])
    assert all(c.ok for c in result.checks) and {c.name for c in result.checks} == set(got)
    # The lazy views (source and output) give the same tensors.
    lazy = zero_state_dict(case.save_dir)
    out_view = result.state_dict()
    for key in got:
        assert torch.equal(lazy[key], got[key]) and torch.equal(out_view[key], got[key])
    if case.stage == 1:
        assert any("frozen" in note for note in result.notes)


def test_stage1_frozen_param_from_module(deepspeed_checkpoints: Any, tmp_path: Path) -> None:
    case = deepspeed_checkpoints["z1_bf16_none"]
    got = zero_state_dict(case.save_dir)["frozen_scale"]
    assert "frozen_scale" not in case.expected_fp32()
    assert got.dtype == torch.float32
    # The module holds it in bf16: its values are linspace(0.5, 1.5) rounded to bf16.
    assert torch.equal(got, torch.linspace(0.5, 1.5, got.numel()).to(torch.bfloat16).float())


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_dtype_cast(deepspeed_checkpoints: Any, tmp_path: Path, dtype: str) -> None:
    case = deepspeed_checkpoints["z3_bf16_warmuplr_4rank"]
    consolidate_zero(case.save_dir, tmp_path / "out", dtype=dtype)
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    for key, value in case.expected_fp32().items():
        assert got[key].dtype == TORCH_DTYPES[dtype]
        assert torch.equal(got[key], value.float().to(TORCH_DTYPES[dtype])), key


def test_sharding_and_torch_format(deepspeed_checkpoints: Any, tmp_path: Path) -> None:
    case = deepspeed_checkpoints["z2_fp32_steplr"]
    expected = case.expected_fp32()
    result = consolidate_zero(case.save_dir, tmp_path / "st", max_shard_size=600)
    index = json.loads((tmp_path / "st" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert index["metadata"]["ckptkit.shared_params"] == {"head.weight": "embed.weight"}
    merged: dict[str, torch.Tensor] = {}
    for shard in shards:
        part = load_file(str(tmp_path / "st" / shard))
        assert all(index["weight_map"][k] == shard for k in part)
        merged.update(part)
    assert set(merged) == set(index["weight_map"]) and result.ok
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in merged.values())
    assert index["weight_map"]["head.weight"] == index["weight_map"]["embed.weight"]
    for key, value in expected.items():
        assert _same(merged[key], value), key

    result = consolidate_zero(case.save_dir, tmp_path / "pt", fmt="torch", max_shard_size=600)
    assert result.ok and (tmp_path / "pt" / "pytorch_model.bin.index.json").exists()
    tindex = json.loads((tmp_path / "pt" / "pytorch_model.bin.index.json").read_text())
    loaded: dict[str, torch.Tensor] = {}
    for shard in sorted(set(tindex["weight_map"].values())):
        loaded.update(torch.load(tmp_path / "pt" / shard, weights_only=True))
    for key, value in expected.items():
        assert _same(loaded[key], value), key
    assert loaded["head.weight"].data_ptr() == loaded["embed.weight"].data_ptr()  # one tied tensor


def test_out_on_s3(deepspeed_checkpoints: Any, s3_bucket: str) -> None:
    case = deepspeed_checkpoints["z3_fp16_overflow"]
    result = consolidate_zero(case.save_dir, f"{s3_bucket}/consolidated")
    assert result.ok
    view = result.state_dict()
    for key, value in case.expected_fp32().items():
        assert _same(view[key], value), key
    keys = [o.key for o in open_store(f"{s3_bucket}/consolidated").list("")]
    assert "ckptkit-manifest.json" in keys and any(k.endswith("/model.safetensors") for k in keys)


def test_cli_json_and_exit_codes(deepspeed_checkpoints: Any, tmp_path: Path) -> None:
    case = deepspeed_checkpoints["z2_bf16_warmupcosine"]
    runner = CliRunner()
    res = runner.invoke(cli, ["consolidate", str(case.save_dir), str(tmp_path / "a"), "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["ok"] and doc["stage"] == 2 and doc["files"] == ["model.safetensors"]
    assert {t["name"] for t in doc["tensors"]} >= set(case.expected["consolidated_keys"])
    res = runner.invoke(
        cli,
        [
            "consolidate",
            str(case.save_dir),
            str(tmp_path / "b"),
            "--tag",
            case.tag,
            "--dtype",
            "bf16",
            "--format",
            "torch",
        ],
    )
    assert res.exit_code == 0 and "OK: ZeRO-2" in res.output
    # The output exists: committing again is refused, not overwritten.
    res = runner.invoke(cli, ["consolidate", str(case.save_dir), str(tmp_path / "a")])
    assert res.exit_code == 2
    res = runner.invoke(cli, ["consolidate", str(tmp_path / "nowhere"), str(tmp_path / "c")])
    assert res.exit_code in (1, 4)


def test_missing_rank_file(deepspeed_checkpoints: Any, tmp_path: Path) -> None:
    case = deepspeed_checkpoints["z3_bf16_warmuplr_4rank"]
    broken = tmp_path / "ckpt"
    shutil.copytree(case.save_dir, broken)
    next((broken / case.tag).glob("*pp_rank_2_*optim_states.pt")).unlink()
    with pytest.raises(FormatError, match="partition count is 4 but 3 optimizer rank file"):
        consolidate_zero(broken, tmp_path / "out")
    res = CliRunner().invoke(cli, ["consolidate", str(broken), str(tmp_path / "out2"), "--json"])
    assert res.exit_code == 1
    assert "partition count" in res.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()


def test_parse_size() -> None:
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size(100) == 100


def test_each_shard_names_only_its_own_ties(deepspeed_checkpoints: Any, tmp_path: Path) -> None:
    """A shard's metadata names the ties it holds, so one shard reads on its own (each named every
    tie of the model, and one without the tie's source was refused: "refers to 'embed.weight'")."""
    case = deepspeed_checkpoints["z2_fp32_steplr"]
    consolidate_zero(case.save_dir, tmp_path / "st", max_shard_size=600)
    index = json.loads((tmp_path / "st" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    for shard in shards:
        result = convert(tmp_path / "st" / shard, tmp_path / f"{shard}.bin", to="torch")
        assert result.ok
        assert {c.name for c in result.checks} == {k for k, v in index["weight_map"].items() if v == shard}


def test_report_is_converts(deepspeed_checkpoints: Any, tmp_path: Path) -> None:
    """consolidate reports through convert's renderer: each tensor's source dtype, kind and tie."""
    case = deepspeed_checkpoints["z2_fp32_steplr"]
    runner = CliRunner()
    res = runner.invoke(cli, ["consolidate", str(case.save_dir), str(tmp_path / "a"), "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["to"] == doc["format"] == "safetensors"
    head = next(t for t in doc["tensors"] if t["name"] == "head.weight")
    assert (head["kind"], head["alias_of"], head["src_dtype"], head["ok"]) == (
        "shared", "embed.weight", "float32", True
    )
    res = runner.invoke(cli, ["consolidate", str(case.save_dir), str(tmp_path / "b"), "--format", "torch"])
    assert res.exit_code == 0, res.output
    assert res.output.split()[:7] == ["tensor", "kind", "dtype", "shape", "file", "tie", "read"]
    assert "tied to embed.weight" in res.output
    assert f"OK: ZeRO-2 x{case.world_size} ({case.tag}) -> torch " in res.output
