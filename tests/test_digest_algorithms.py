"""BLAKE3 by default, SHA-256 still read and selectable: saves, verification, old manifests,
mixed manifests, and the choice on every writer (library, CLI, environment)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch
from click.testing import CliRunner

import ckptkit
from ckptkit.cli.main import cli
from ckptkit.commit import CheckpointTransaction
from ckptkit.hashing import CHUNK_SIZE, digest_bytes
from ckptkit.manifest import MANIFEST_NAME, FileEntry, parse_manifest
from ckptkit.ops.sync import sync
from ckptkit.ops.verify import verify_checkpoint
from ckptkit.storage import open_store
from ckptkit.transfer import already_copied
from tests.test_distributed_save import SHARD, _ok, rank_state, run_ranks
from tests.test_manifest_schema import load_schema

ALGORITHMS = {"blake3": "blake3-tree", "sha256": "sha256-tree"}

# A manifest as ckptkit wrote it before BLAKE3 (schema version 1), for the files of V1_FILES.
V1_FILES = {"model.bin": b"weights " * 512, "optim/rank_0.bin": b"optimizer state\n", "empty.txt": b""}
V1_MANIFEST = """{
 "format": "ckptkit.manifest",
 "schema_version": 1,
 "checkpoint_id": "033a135016f948ac8beebe13a91c2630",
 "step": 1200,
 "created": "2026-11-29T04:35:19.269409Z",
 "layout": "files",
 "producer": {"python": "3.11.7", "ckptkit": "0.1.0", "torch": "2.13.0+cpu"},
 "digest": {"algorithm": "sha256-tree", "chunk_size": 67108864},
 "files": [
  {"path": "empty.txt", "size": 0,
   "digest": "sha256-tree:5df6e0e2761359d30a8275058e299fcc0381534545f55cf43e41983f5d4c9456",
   "chunks": ["e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"]},
  {"path": "model.bin", "size": 4096,
   "digest": "sha256-tree:219ccd8609d3d4581b2c72dc98063ac37a9cf1769e3870b9d3965e0a67f8f164",
   "chunks": ["b2191f2bda70411ff11484be1f0b202b873187c24314594384ff95f2138f92b1"]},
  {"path": "optim/rank_0.bin", "size": 16,
   "digest": "sha256-tree:481951bdba6e28297588187e00cf12a4f2c2806fc9d7b66b1d8a196ddcb3df92",
   "chunks": ["1a0ce0b2200a69b19b6bec9a418d57ffa626f7cfa5faf0bd92d1857e31606d91"]}
 ],
 "topology": null,
 "metadata": {"run": "demo"},
 "metrics": {"loss": 1.84}
}
"""


@pytest.fixture(autouse=True)
def no_site_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CKPTKIT_DIGEST", raising=False)


def manifest_json(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / MANIFEST_NAME).read_bytes())


def file_algorithms(doc: dict[str, Any]) -> set[str]:
    return {f["digest"].split(":")[0] for f in doc["files"]}


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


STATE = {"w": torch.arange(3000, dtype=torch.float32).reshape(30, 100), "step": 7, "opt": {"lr": 1e-3}}


def test_save_is_blake3_by_default_and_loads_and_verifies(tmp_path: Path) -> None:
    manifest = ckptkit.save(STATE, tmp_path / "ckpt", step=7)
    doc = manifest_json(tmp_path / "ckpt")
    assert doc["schema_version"] == 2 and doc["digest"] == {"chunk_size": CHUNK_SIZE}
    assert file_algorithms(doc) == {"blake3-tree"}
    assert {e.algorithm for e in manifest.files} == {"blake3-tree"}
    jsonschema.Draft202012Validator(load_schema(2)).validate(doc)
    loaded = ckptkit.load(tmp_path / "ckpt")
    assert torch.equal(loaded["w"], STATE["w"]) and loaded["opt"] == {"lr": 1e-3}
    report = verify_checkpoint(open_store(tmp_path / "ckpt"))
    assert report.ok and report.files_checked == len(doc["files"])


def test_save_with_sha256_writes_a_version_1_manifest(tmp_path: Path) -> None:
    ckptkit.save(STATE, tmp_path / "ckpt", digest="sha256")
    doc = manifest_json(tmp_path / "ckpt")
    # What a ckptkit from before BLAKE3 reads: version 1, the algorithm named as it expects.
    assert doc["schema_version"] == 1 and doc["digest"]["algorithm"] == "sha256-tree"
    assert file_algorithms(doc) == {"sha256-tree"}
    jsonschema.Draft202012Validator(load_schema(1)).validate(doc)
    tree = (tmp_path / "ckpt" / "tree.json").read_bytes()
    assert doc["files"][-1]["path"] == "tree.json"
    assert doc["files"][-1]["chunks"] == list(digest_bytes(tree, algorithm="sha256").chunks)
    assert verify_checkpoint(open_store(tmp_path / "ckpt")).ok
    assert torch.equal(ckptkit.load(tmp_path / "ckpt")["w"], STATE["w"])


def test_site_policy_applies_where_the_caller_does_not_choose(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CKPTKIT_DIGEST", "sha256")
    ckptkit.save(STATE, tmp_path / "policy")
    ckptkit.save(STATE, tmp_path / "explicit", digest="blake3")
    assert file_algorithms(manifest_json(tmp_path / "policy")) == {"sha256-tree"}
    assert file_algorithms(manifest_json(tmp_path / "explicit")) == {"blake3-tree"}


@pytest.mark.parametrize("choice", ["blake3", "sha256"])
def test_flipped_byte_is_found_and_named_with_its_chunk_range(tmp_path: Path, choice: str) -> None:
    root = open_store(tmp_path)
    with CheckpointTransaction(root, "ckpt", digest=choice) as txn:
        txn.write("big.bin", bytes(range(256)) * ((CHUNK_SIZE + 4096) // 256))
        txn.write("small.bin", b"small" * 100)
        txn.commit(step=1, layout="files")
    assert verify_checkpoint(root.child("ckpt")).ok
    flip(tmp_path / "ckpt" / "big.bin", CHUNK_SIZE + 10)
    flip(tmp_path / "ckpt" / "small.bin", 3)
    findings = verify_checkpoint(root.child("ckpt")).findings
    assert [(f.path, f.kind, f.byte_range) for f in findings] == [
        ("big.bin", "digest", (CHUNK_SIZE, CHUNK_SIZE + 4096)),
        ("small.bin", "digest", (0, 500)),
    ]
    assert f"in bytes [{CHUNK_SIZE}, {CHUNK_SIZE + 4096}) (chunk 1: expected {choice} " in findings[0].message


def test_a_version_1_manifest_reads_and_verifies_unchanged(tmp_path: Path) -> None:
    checkpoint = tmp_path / "step-00001200"
    for path, data in V1_FILES.items():
        (checkpoint / path).parent.mkdir(parents=True, exist_ok=True)
        (checkpoint / path).write_bytes(data)
    (checkpoint / MANIFEST_NAME).write_text(V1_MANIFEST)

    manifest = parse_manifest(V1_MANIFEST.encode())
    assert manifest.schema_version == 1 and {e.algorithm for e in manifest.files} == {"sha256-tree"}
    assert json.loads(manifest.to_bytes()) == json.loads(V1_MANIFEST)  # re-written as it was read
    store = open_store(checkpoint)
    assert verify_checkpoint(store).ok
    listed = ckptkit.list_checkpoints(open_store(tmp_path))
    assert [c.name for c in listed if c.committed] == [checkpoint.name]

    flip(checkpoint / "model.bin", 100)
    (finding,) = verify_checkpoint(store).findings
    assert finding.byte_range == (0, 4096)
    assert "(chunk 0: expected sha256 b2191f2bda70411f…" in finding.message


def test_a_manifest_may_mix_algorithms(tmp_path: Path) -> None:
    root = open_store(tmp_path)
    with CheckpointTransaction(root, "ckpt") as txn:  # BLAKE3, and one file hashed with SHA-256
        txn.write("new.bin", b"n" * 1000)
        txn.files.put("old.bin", b"o" * 2000)
        txn.add_entries([FileEntry.from_digest("old.bin", digest_bytes(b"o" * 2000, algorithm="sha256"))])
        txn.commit(step=1, layout="files")
    doc = manifest_json(tmp_path / "ckpt")
    assert doc["schema_version"] == 2 and file_algorithms(doc) == {"blake3-tree", "sha256-tree"}
    jsonschema.Draft202012Validator(load_schema(2)).validate(doc)
    assert verify_checkpoint(root.child("ckpt")).ok

    flip(tmp_path / "ckpt" / "new.bin", 0)
    flip(tmp_path / "ckpt" / "old.bin", 0)
    found = verify_checkpoint(root.child("ckpt")).findings
    assert [(f.path, f.byte_range) for f in found] == [("new.bin", (0, 1000)), ("old.bin", (0, 2000))]
    assert "(chunk 0: expected blake3 " in found[0].message
    assert "(chunk 0: expected sha256 " in found[1].message


def test_sync_keeps_each_files_algorithm(tmp_path: Path) -> None:
    src = open_store(tmp_path / "src")
    ckptkit.save(STATE, tmp_path / "src" / "step-00000001", step=1, digest="sha256")
    ckptkit.save(STATE, tmp_path / "src" / "step-00000002", step=2)
    report = sync(src, tmp_path / "dst", verify=True)
    assert report.ok, report
    assert file_algorithms(manifest_json(tmp_path / "dst" / "step-00000001")) == {"sha256-tree"}
    assert file_algorithms(manifest_json(tmp_path / "dst" / "step-00000002")) == {"blake3-tree"}
    again = sync(src, tmp_path / "dst")
    assert again.ok and again.bytes_sent == 0
    for name in ("step-00000001", "step-00000002"):
        assert verify_checkpoint(open_store(tmp_path / "dst" / name)).ok


def test_a_copied_file_is_recognised_by_its_own_algorithm(tmp_path: Path) -> None:
    """What an interrupted sync left is re-hashed with the manifest entry's algorithm."""
    dst = open_store(tmp_path)
    dst.put("model.bin", b"m" * 3000)
    for choice in ("sha256", "blake3"):
        entry = FileEntry.from_digest("model.bin", digest_bytes(b"m" * 3000, algorithm=choice))
        assert already_copied(dst, "model.bin", 3000, entry)
        other = FileEntry.from_digest("model.bin", digest_bytes(b"x" * 3000, algorithm=choice))
        assert not already_copied(dst, "model.bin", 3000, other)


def test_an_unknown_algorithm_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    named = r"unknown digest algorithm 'md5' \(expected one of blake3, sha256\)"
    with pytest.raises(ValueError, match=named):
        ckptkit.save(STATE, tmp_path / "ckpt", digest="md5")
    with pytest.raises(ValueError, match="unknown digest algorithm 'crc32'"):
        ckptkit.CheckpointManager(tmp_path / "run", digest="crc32")
    assert list(tmp_path.iterdir()) == []


def test_manager_saves_with_its_digest(tmp_path: Path) -> None:
    manager = ckptkit.CheckpointManager(tmp_path / "run", digest="sha256")
    info = manager.save(3, STATE)
    assert {e.algorithm for e in info.manifest.files} == {"sha256-tree"}
    assert manifest_json(tmp_path / "run" / "step-00000003")["schema_version"] == 1


def rank0_policy_save(rank: int, world: int, root: str) -> dict[str, Any]:
    # Only rank 0 has the site policy: the one manifest must still have one algorithm, rank 0's.
    if rank == 0:
        os.environ["CKPTKIT_DIGEST"] = "sha256"
    else:
        os.environ.pop("CKPTKIT_DIGEST", None)
    manifest = ckptkit.save(rank_state(rank, 1), f"{root}/step-1", step=1, max_shard_size=SHARD)
    return {"algorithms": sorted({e.algorithm for e in manifest.files})}


@pytest.mark.slow  # forks two gloo ranks
def test_every_rank_hashes_with_rank_0s_choice(tmp_path: Path) -> None:
    results = _ok(*run_ranks(rank0_policy_save, 2, str(tmp_path / "run"), tmp_path / "out"))
    assert [r["algorithms"] for r in results] == [["sha256-tree"], ["sha256-tree"]]
    checkpoint = tmp_path / "run" / "step-1"
    doc = manifest_json(checkpoint)
    assert doc["schema_version"] == 1 and len({f["path"].split("/")[0] for f in doc["files"]}) == 2
    assert verify_checkpoint(open_store(checkpoint)).ok


# --- the CLI ---------------------------------------------------------------------------------------


def invoke(*args: str, env: dict[str, str] | None = None) -> Any:
    return CliRunner().invoke(cli, list(args), env=env)


def foreign_directory(path: Path) -> Path:
    (path / "nested").mkdir(parents=True)
    (path / "weights.bin").write_bytes(b"w" * 5000)
    (path / "nested" / "opt.bin").write_bytes(b"o" * 100)
    return path


@pytest.mark.parametrize("choice", ["blake3", "sha256"])
def test_index_digest_option(tmp_path: Path, choice: str) -> None:
    checkpoint = foreign_directory(tmp_path / "checkpoint-5")
    res = invoke("index", str(checkpoint), "--digest", choice)
    assert res.exit_code == 0, res.output
    doc = manifest_json(checkpoint)
    assert file_algorithms(doc) == {ALGORITHMS[choice]}
    assert doc["schema_version"] == {"blake3": 2, "sha256": 1}[choice]
    res = invoke("verify", str(checkpoint))
    assert res.exit_code == 0 and "OK: 1 checkpoint(s) checked, sizes and content digests" in res.output


def test_cli_digest_from_the_environment(tmp_path: Path) -> None:
    checkpoint = foreign_directory(tmp_path / "checkpoint-5")
    res = invoke("index", str(checkpoint), env={"CKPTKIT_DIGEST": "sha256"})
    assert res.exit_code == 0, res.output
    assert file_algorithms(manifest_json(checkpoint)) == {"sha256-tree"}


@pytest.mark.parametrize(
    ("args", "env"),
    [(["--digest", "md5"], None), ([], {"CKPTKIT_DIGEST": "md5"})],
    ids=["option", "environment"],
)
def test_cli_refuses_an_unknown_digest_as_a_usage_error(tmp_path: Path, args: list[str], env: Any) -> None:
    checkpoint = foreign_directory(tmp_path / "checkpoint-5")
    res = invoke("index", str(checkpoint), *args, env=env)
    assert res.exit_code == 2
    assert "Invalid value for '--digest'" in res.output
    assert "'md5' is not one of 'blake3', 'sha256'" in res.output
    assert not (checkpoint / MANIFEST_NAME).exists()


def test_convert_digest_option(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"a": torch.ones(10, 10), "b": torch.arange(7)}, str(tmp_path / "model.safetensors"))
    res = invoke("convert", str(tmp_path / "model.safetensors"), str(tmp_path / "out"), "--to", "native",
                 "--digest", "sha256")
    assert res.exit_code == 0, res.output
    doc = manifest_json(tmp_path / "out")
    assert doc["schema_version"] == 1 and file_algorithms(doc) == {"sha256-tree"}
    assert invoke("verify", str(tmp_path / "out")).exit_code == 0


def test_writers_refuse_an_unknown_digest_before_reading(tmp_path: Path) -> None:
    from ckptkit.ops.consolidate import consolidate_zero
    from ckptkit.ops.convert import convert
    from ckptkit.ops.index import index_checkpoint

    missing = tmp_path / "nowhere"  # reading it would be a NotFoundError: the name is checked first
    with pytest.raises(ValueError, match="unknown digest algorithm 'md5'"):
        convert(missing, tmp_path / "out", to="native", digest="md5")
    with pytest.raises(ValueError, match="unknown digest algorithm 'md5'"):
        consolidate_zero(missing, tmp_path / "out", digest="md5")
    with pytest.raises(ValueError, match="unknown digest algorithm 'md5'"):
        index_checkpoint(open_store(missing), digest="md5")
    res = invoke("consolidate", str(missing), str(tmp_path / "out"), "--digest", "md5")
    assert res.exit_code == 2 and "Invalid value for '--digest'" in res.output
    assert list(tmp_path.iterdir()) == []


def test_consolidate_digest_option(deepspeed_checkpoints: Any, tmp_path: Path) -> None:  # slow: fixture
    case = deepspeed_checkpoints["z2_bf16_warmupcosine"]
    res = invoke("consolidate", str(case.save_dir), str(tmp_path / "out"), "--digest", "sha256")
    assert res.exit_code == 0, res.output
    assert file_algorithms(manifest_json(tmp_path / "out")) == {"sha256-tree"}
    assert invoke("verify", str(tmp_path / "out")).exit_code == 0


# --- integrations ----------------------------------------------------------------------------------


@pytest.mark.slow  # imports transformers
def test_hf_commit_with_sha256(tmp_path: Path) -> None:
    from ckptkit.integrations.hf import CkptkitCallback, commit_hf_checkpoint

    foreign_directory(tmp_path / "checkpoint-5")
    manifest = commit_hf_checkpoint(open_store(tmp_path), "checkpoint-5", step=5, digest="sha256")
    assert {e.algorithm for e in manifest.files} == {"sha256-tree"}
    assert verify_checkpoint(open_store(tmp_path / "checkpoint-5")).ok
    with pytest.raises(ValueError, match="unknown digest algorithm 'md5'"):
        CkptkitCallback(digest="md5")


@pytest.mark.slow  # imports pytorch_lightning
def test_lightning_extra_file_is_checked_with_its_own_algorithm(tmp_path: Path) -> None:
    from ckptkit.integrations.lightning import load_lightning_checkpoint, save_lightning_checkpoint

    root = open_store(tmp_path)
    checkpoint = {"state_dict": {"w": torch.ones(3)}, "global_step": 4, "odd": {1, 2, 3}}  # a set: extra
    manifest = save_lightning_checkpoint(root, "epoch=0.ckpt", checkpoint, digest="sha256")
    assert {e.algorithm for e in manifest.files} == {"sha256-tree"}
    loaded = load_lightning_checkpoint(root.child("epoch=0.ckpt"))
    assert loaded["odd"] == {1, 2, 3} and torch.equal(loaded["state_dict"]["w"], torch.ones(3))
