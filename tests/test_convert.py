"""``ckptkit convert``: real torch.save / DCP / native / safetensors files, converted and read back.

Values are checked with torch and safetensors' own loaders, tensor by tensor and bit for bit,
besides convert's own reload-and-compare.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from ckptkit.api import load, save
from ckptkit.cli.main import cli
from ckptkit.errors import EXIT_FINDINGS, EXIT_OK, EXIT_UNSAFE, FormatError, UnsafeContentError
from ckptkit.ops.convert import convert
from tests.malicious.corpus import PAYLOADS


def _state() -> dict[str, torch.Tensor]:
    """A small LM-like state dict: bf16 weights, a tied head, an int buffer, an fp32 norm."""
    gen = torch.Generator().manual_seed(0)
    embed = torch.randn(32, 16, generator=gen).to(torch.bfloat16)
    return {
        "embed.weight": embed,
        "layer.weight": torch.randn(16, 16, generator=gen).to(torch.bfloat16),
        "norm.weight": torch.randn(16, generator=gen),
        "position_ids": torch.arange(32),
        "lm_head.weight": embed,  # tied, as model.state_dict() gives it
    }


def _same(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(expected)  # safetensors keeps a tied alias after its source
    for name, value in expected.items():
        assert got[name].dtype == value.dtype, name
        assert got[name].shape == value.shape, name
        bits = value.contiguous().view(-1).view(torch.uint8)
        assert torch.equal(got[name].contiguous().view(-1).view(torch.uint8), bits), name


def _run(*args: str) -> Any:
    return CliRunner().invoke(cli, list(args))


@pytest.fixture
def torch_file(tmp_path: Path) -> Path:
    path = tmp_path / "pytorch_model.bin"
    torch.save(_state(), path)
    return path


def test_torch_to_safetensors_to_torch(torch_file: Path, tmp_path: Path) -> None:
    st = tmp_path / "model.safetensors"
    result = convert(torch_file, st, to="safetensors")
    assert result.ok and [c.name for c in result.checks] == list(_state())
    # safetensors refuses shared storage: one copy, the tie in the metadata.
    loaded = load_file(st)
    assert "lm_head.weight" not in loaded
    from safetensors import safe_open

    with safe_open(str(st), "pt") as f:
        assert json.loads(f.metadata()["ckptkit.shared_params"]) == {"lm_head.weight": "embed.weight"}
    back = tmp_path / "back.bin"
    assert convert(st, back, to="torch").ok
    for mmap in (False, True):
        restored = torch.load(back, weights_only=True, mmap=mmap)
        _same(restored, _state())
        assert restored["lm_head.weight"].data_ptr() == restored["embed.weight"].data_ptr()  # tied again


def test_dcp_to_safetensors_bf16_and_tied(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    state = _state()
    with pytest.warns(UserWarning):  # DCP says it runs single-process
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(tmp_path / "dcp")), no_dist=True)
    out = tmp_path / "st"
    result = convert(tmp_path / "dcp", out, to="safetensors")
    assert result.ok and result.source_kind == "dcp"
    _same(load_file(out / "model.safetensors"), state)  # DCP stored the tie as two items: two copies
    # And back to DCP, read by DCP's own loader.
    convert(out, tmp_path / "dcp2", to="dcp")
    target = {k: torch.zeros_like(v) for k, v in state.items()}
    dcp.load(target, storage_reader=dcp.FileSystemReader(str(tmp_path / "dcp2")), no_dist=True)
    _same(target, state)


def test_sharded_and_single(torch_file: Path, tmp_path: Path) -> None:
    sharded = tmp_path / "sharded"
    result = convert(torch_file, sharded, to="safetensors", max_shard_size="600B")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and result.files[-1] == "model.safetensors.index.json"
    assert index["metadata"]["ckptkit.shared_params"] == {"lm_head.weight": "embed.weight"}
    merged = {k: v for s in shards for k, v in load_file(sharded / s).items()}
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in merged.values())
    # Sharded safetensors -> sharded torch (with index) -> one safetensors file.
    bins = tmp_path / "bins"
    convert(sharded, bins, to="torch", max_shard_size="600B")
    assert (bins / "pytorch_model.bin.index.json").exists()
    single = tmp_path / "one.safetensors"
    assert convert(bins, single, to="safetensors").ok
    back = tmp_path / "one.bin"
    convert(single, back, to="torch")
    _same(torch.load(back, weights_only=True), _state())
    with pytest.raises(Exception, match="single file cannot be split"):
        convert(torch_file, tmp_path / "x.safetensors", to="safetensors", max_shard_size="600B")


def test_native_both_ways(torch_file: Path, tmp_path: Path) -> None:
    save(_state(), tmp_path / "run" / "step-1")
    st = tmp_path / "from_native.safetensors"
    assert convert(tmp_path / "run" / "step-1", st, to="safetensors").ok
    loaded = load_file(st)
    assert set(loaded) == set(_state()) - {"lm_head.weight"}
    convert(st, tmp_path / "run" / "native", to="native")
    restored = load(tmp_path / "run" / "native")
    _same(restored, _state())
    assert restored["lm_head.weight"].data_ptr() == restored["embed.weight"].data_ptr()


def test_dtype_cast(torch_file: Path, tmp_path: Path) -> None:
    res = _run("convert", str(torch_file), str(tmp_path / "bf.safetensors"), "--to", "safetensors",
               "--dtype", "bfloat16", "--json")
    assert res.exit_code == EXIT_OK, res.output
    report = json.loads(res.output)
    norm = next(t for t in report["tensors"] if t["name"] == "norm.weight")
    assert (norm["src_dtype"], norm["dtype"], norm["ok"]) == ("float32", "bfloat16", True)
    assert any("int64 tensors kept" in n for n in report["notes"])
    loaded = load_file(tmp_path / "bf.safetensors")
    expected = _state()
    assert torch.equal(loaded["norm.weight"], expected["norm.weight"].to(torch.bfloat16))  # torch's rounding
    assert loaded["position_ids"].dtype == torch.int64


def test_cli_table(torch_file: Path, tmp_path: Path) -> None:
    res = _run("convert", str(torch_file), str(tmp_path / "out"), "--to", "torch")
    assert res.exit_code == EXIT_OK, res.output
    assert "tied to embed.weight" in res.output and "OK: torch -> torch" in res.output
    assert (tmp_path / "out" / "ckptkit-manifest.json").exists()
    res = _run("convert", str(torch_file), str(tmp_path / "out"), "--to", "torch")
    assert res.exit_code != EXIT_OK and "already committed" in res.output


@pytest.mark.parametrize("payload", ["torch_zip_payload", "torch_zip_mark_flood", "torch_legacy_mark_flood"])
def test_malicious_global_refused(tmp_path: Path, payload: str) -> None:
    """Also a payload behind one of the interpreter's limits (300 MARKs first): unsafe, not broken."""
    evil = tmp_path / "evil.pt"
    sentinel = tmp_path / "ran"
    PAYLOADS[payload].build(evil, sentinel, None)
    res = _run("convert", str(evil), str(tmp_path / "out.safetensors"), "--to", "safetensors")
    assert res.exit_code == EXIT_UNSAFE
    assert "posix.system" in res.output
    assert not sentinel.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.pt"]  # nothing written
    with pytest.raises(UnsafeContentError):
        convert(evil, tmp_path / "out", to="torch")


@pytest.mark.parametrize("kind", ["torch", "safetensors"])
def test_truncated_source(torch_file: Path, tmp_path: Path, kind: str) -> None:
    src = torch_file
    if kind == "safetensors":
        src = tmp_path / "model.safetensors"
        convert(torch_file, src, to="safetensors")
    cut = tmp_path / f"cut-{src.name}"
    cut.write_bytes(src.read_bytes()[: src.stat().st_size - 100])
    res = _run("convert", str(cut), str(tmp_path / "dst"), "--to", "safetensors")
    assert res.exit_code == EXIT_FINDINGS
    assert "Traceback" not in res.output and "error:" in res.output
    assert not (tmp_path / "dst").exists()
    assert not [p for p in tmp_path.iterdir() if "staging" in p.name or "partial" in p.name]
    with pytest.raises(FormatError):
        convert(cut, tmp_path / "dst.safetensors", to="safetensors")


def test_s3_source_and_destination(torch_file: Path, s3_bucket: str, tmp_path: Path) -> None:
    convert(torch_file, f"{s3_bucket}/models/sharded", to="safetensors", max_shard_size="600B")
    result = convert(f"{s3_bucket}/models/sharded", f"{s3_bucket}/models/model.bin", to="torch")
    assert result.ok
    convert(f"{s3_bucket}/models/model.bin", tmp_path / "local.bin", to="torch")
    _same(torch.load(tmp_path / "local.bin", weights_only=True), _state())
    res = _run("convert", f"{s3_bucket}/models/model.bin", f"{s3_bucket}/models/dcp", "--to", "dcp")
    assert res.exit_code == EXIT_OK, res.output


# VmHWM, not ru_maxrss: on Linux ru_maxrss keeps the forking parent's high-water mark across exec,
# so with a large test process both readings would be the parent's and the growth zero.
_MEMORY_SCRIPT = """
import json, sys
from ckptkit.ops.convert import convert
import numpy  # used by casts; imported before the baseline like any library

def peak():
    status = open("/proc/self/status").read()
    return int(status.split("VmHWM:")[1].split()[0]) * 1024

before = peak()
result = convert(sys.argv[1], sys.argv[2], to="safetensors", dtype=sys.argv[3], max_shard_size="64MB")
print(json.dumps({"ok": result.ok, "files": len(result.files), "growth": peak() - before}))
"""


@pytest.mark.slow  # writes and converts a 512 MB model, twice, in child processes
def test_peak_memory_bounded(tmp_path: Path) -> None:
    """A 512 MB model (sixteen 32 MB tensors) converts with RSS growth below half the model size
    (it is about 190 MB whatever the model size: read-ahead, one 64 MB shard, the compare)."""
    src = tmp_path / "big.bin"
    torch.save({f"layer{i}.weight": torch.full((8 << 20,), float(i)) for i in range(16)}, src)
    model = 16 * (32 << 20)
    for dtype in ("float32", "bfloat16"):
        out = subprocess.run(
            [sys.executable, "-c", _MEMORY_SCRIPT, str(src), str(tmp_path / f"out-{dtype}"), dtype],
            capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1],
        )
        report = json.loads(out.stdout)
        assert report["ok"] and report["files"] > 2
        assert report["growth"] < model / 2, report


def test_torch_writer_zip64_fields(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Records and offsets past the ZIP64 threshold (lowered here: 4 GiB files are too slow for a test)."""
    import zipfile

    import ckptkit.formats.torch_writer as torch_writer

    monkeypatch.setattr(torch_writer, "ZIP64_LIMIT", 100)
    src = tmp_path / "m.safetensors"
    convert(_write(tmp_path), src, to="safetensors")
    out = tmp_path / "z64.bin"
    assert convert(src, out, to="torch").ok  # ckptkit's own reader re-read it
    assert zipfile.ZipFile(out).testzip() is None  # CRCs hold
    for mmap in (False, True):
        _same(torch.load(out, weights_only=True, mmap=mmap), _state())


def _write(tmp_path: Path) -> Path:
    path = tmp_path / "src.bin"
    torch.save(_state(), path)
    return path


def test_report_names_each_tensors_kind_and_tie(torch_file: Path, tmp_path: Path) -> None:
    """convert and consolidate print one report: the same tensor fields and the same table."""
    res = _run("convert", str(torch_file), str(tmp_path / "out"), "--to", "safetensors", "--json")
    assert res.exit_code == EXIT_OK, res.output
    report = json.loads(res.output)
    assert report["to"] == "safetensors" and report["source_kind"] == "torch"
    head = next(t for t in report["tensors"] if t["name"] == "lm_head.weight")
    assert head == {
        "name": "lm_head.weight", "src_dtype": "bfloat16", "dtype": "bfloat16", "shape": [32, 16],
        "nbytes": 1024, "file": "model.safetensors", "alias_of": "embed.weight", "kind": "shared", "ok": True,
    }
    assert {t["kind"] for t in report["tensors"]} == {"tensor", "shared"}
    res = _run("convert", str(torch_file), str(tmp_path / "one.bin"), "--to", "torch")
    assert res.exit_code == EXIT_OK, res.output
    assert res.output.split()[:7] == ["tensor", "kind", "dtype", "shape", "file", "tie", "read"]
