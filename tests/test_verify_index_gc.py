"""verify, index and gc on every store: corruption is found and named, debris is removed."""

from __future__ import annotations

import json
import random
import time

import pytest

from ckptkit.catalog import list_checkpoints, read_manifest
from ckptkit.commit import CheckpointTransaction
from ckptkit.errors import CommitConflictError, FormatError, ManifestError, NotCommittedError
from ckptkit.hashing import CHUNK_SIZE
from ckptkit.manifest import MANIFEST_NAME
from ckptkit.ops.gc import collect_garbage, find_debris
from ckptkit.ops.index import index_checkpoint
from ckptkit.ops.verify import verify_checkpoint, verify_tree
from ckptkit.storage import Store
from tests.helpers import commit_files, sample_files


def _data_key(store: Store, name: str, logical: str) -> str:
    manifest = read_manifest(store.child(name))
    (entry,) = [e for e in manifest.files if e.path == logical or e.path.endswith("/" + logical)]
    return f"{name}/{entry.path}"


def test_intact_checkpoint_verifies(any_store: Store) -> None:
    commit_files(any_store, "step-00000001", sample_files(), step=1)
    report = verify_checkpoint(any_store.child("step-00000001"))
    assert report.ok and report.status == "ok" and report.findings == []
    assert report.files_checked == 3
    assert report.bytes_checked == sum(map(len, sample_files().values()))


@pytest.mark.parametrize("logical", ["model.bin", "optim/state.bin", "meta.json"])
def test_flipped_bit_is_named_with_its_byte_range(any_store: Store, logical: str) -> None:
    commit_files(any_store, "step-00000001", sample_files(), step=1)
    key = _data_key(any_store, "step-00000001", logical)
    data = bytearray(any_store.get(key))
    offset = random.Random(logical).randrange(len(data))
    data[offset] ^= 1 << random.Random(offset).randrange(8)
    any_store.put(key, bytes(data))
    report = verify_checkpoint(any_store.child("step-00000001"))
    assert not report.ok
    (finding,) = report.findings
    assert finding.kind == "digest" and finding.path.endswith(logical)
    start, end = finding.byte_range
    assert start <= offset < end
    assert logical in finding.message


def test_flip_in_a_later_chunk_names_that_chunk(tmp_path) -> None:
    from ckptkit.storage import open_store

    store = open_store(tmp_path)
    big = bytes(CHUNK_SIZE + 1000)
    commit_files(store, "step-00000001", {"big.bin": big}, step=1)
    path = tmp_path / "step-00000001" / "big.bin"
    with open(path, "r+b") as f:
        f.seek(CHUNK_SIZE + 10)
        f.write(b"\x01")
    (finding,) = verify_checkpoint(store.child("step-00000001")).findings
    assert finding.byte_range == (CHUNK_SIZE, CHUNK_SIZE + 1000)


def test_truncated_missing_and_unlisted_files(any_store: Store) -> None:
    commit_files(any_store, "step-00000001", sample_files(), step=1)
    model = _data_key(any_store, "step-00000001", "model.bin")
    any_store.put(model, any_store.get(model)[:1000])
    any_store.delete(_data_key(any_store, "step-00000001", "meta.json"))
    any_store.put("step-00000001/extra.txt", b"dropped in later")
    report = verify_checkpoint(any_store.child("step-00000001"))
    kinds = {(f.kind, f.path.rsplit("/", 1)[-1], f.severity) for f in report.findings}
    assert kinds == {("size", "model.bin", "error"), ("missing", "meta.json", "error"),
                     ("unlisted", "extra.txt", "warning")}
    size_finding = next(f for f in report.findings if f.kind == "size")
    assert "truncated" in size_finding.message
    assert verify_checkpoint(any_store.child("step-00000001"), quick=True).ok is False


def test_quick_verify_checks_sizes_not_digests(any_store: Store) -> None:
    commit_files(any_store, "step-00000001", {"a.bin": b"a" * 100}, step=1)
    key = _data_key(any_store, "step-00000001", "a.bin")
    any_store.put(key, b"b" * 100)
    assert verify_checkpoint(any_store.child("step-00000001"), quick=True).ok
    assert not verify_checkpoint(any_store.child("step-00000001")).ok


@pytest.mark.parametrize("bad_path", ["../escape", "/etc/passwd", "a/../../b", "C:/win", "a\\b", "x\x00y"])
def test_manifest_with_unsafe_path_is_rejected(any_store: Store, bad_path: str) -> None:
    commit_files(any_store, "step-00000001", {"a.bin": b"a"}, step=1)
    raw = json.loads(any_store.get(f"step-00000001/{MANIFEST_NAME}"))
    raw["files"][0]["path"] = bad_path
    any_store.put(f"step-00000001/{MANIFEST_NAME}", json.dumps(raw).encode())
    with pytest.raises(ManifestError):
        read_manifest(any_store.child("step-00000001"))
    report = verify_checkpoint(any_store.child("step-00000001"))
    assert not report.ok and report.findings[0].kind == "manifest"
    assert "unsafe path" in report.findings[0].message
    assert [c.status for c in list_checkpoints(any_store)] == ["invalid"]


def test_future_schema_version_is_a_clear_error(any_store: Store) -> None:
    commit_files(any_store, "step-00000001", {"a.bin": b"a"}, step=1)
    raw = json.loads(any_store.get(f"step-00000001/{MANIFEST_NAME}"))
    raw["schema_version"] = 7
    any_store.put(f"step-00000001/{MANIFEST_NAME}", json.dumps(raw).encode())
    report = verify_checkpoint(any_store.child("step-00000001"))
    assert "newer than this ckptkit supports" in report.findings[0].message


def test_verify_tree_on_a_root_and_on_nothing(any_store: Store) -> None:
    any_store.put("notes.txt", b"not a checkpoint")
    with pytest.raises(NotCommittedError):
        verify_tree(any_store)
    commit_files(any_store, "step-00000001", {"a": b"1"}, step=1)
    commit_files(any_store, "step-00000002", {"a": b"2"}, step=2)
    reports = verify_tree(any_store)
    assert [r.step for r in reports] == [1, 2] and all(r.ok for r in reports)


def test_index_hf_like_directory(any_store: Store) -> None:
    ckpt = any_store.child("checkpoint-2500")
    ckpt.put("trainer_state.json", json.dumps({"global_step": 2500, "epoch": 1.5}).encode())
    ckpt.put("model.safetensors", b"\x00" * 4096)
    ckpt.put("optimizer.pt", b"PK" + b"\x00" * 1000)
    result = index_checkpoint(ckpt)
    assert result.manifest.layout == "hf-trainer" and result.manifest.step == 2500
    assert sorted(f.path for f in result.manifest.files) == [
        "model.safetensors", "optimizer.pt", "trainer_state.json"]
    assert verify_checkpoint(ckpt).ok
    with pytest.raises(CommitConflictError):
        index_checkpoint(ckpt)
    ckpt.put("optimizer.pt", b"changed")
    assert not verify_checkpoint(ckpt).ok
    assert index_checkpoint(ckpt, force=True).replaced
    assert verify_checkpoint(ckpt).ok


def test_index_deepspeed_root_follows_validated_latest(any_store: Store) -> None:
    tag = any_store.child("global_step7")
    for rank in range(2):
        tag.put(f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", b"o" * 100)
    tag.put("mp_rank_00_model_states.pt", b"m" * 100)
    any_store.put("latest", b"global_step7\n")
    result = index_checkpoint(any_store)
    assert result.url.endswith("global_step7")
    assert result.manifest.layout == "deepspeed" and result.manifest.step == 7
    assert result.manifest.topology["dp_world_size"] == 2
    # --force on the root re-indexes the tag, not the root.
    assert index_checkpoint(any_store, force=True).url.endswith("global_step7")
    assert not any_store.exists("ckptkit-manifest.json")
    any_store.put("latest", b"../../etc")
    with pytest.raises(FormatError, match="not a tag directory"):
        index_checkpoint(any_store)
    any_store.put("latest", b"global_step9")
    with pytest.raises(FormatError, match="does not exist"):
        index_checkpoint(any_store)


def test_gc_removes_only_ckptkit_debris(any_store: Store) -> None:
    commit_files(any_store, "step-00000001", {"a": b"1"}, step=1)
    CheckpointTransaction(any_store, "step-00000002").write("a", b"interrupted")
    any_store.put("checkpoint-100/model.bin", b"another tool's checkpoint")
    assert [d.objects for d in find_debris(any_store)] == [1]
    young = collect_garbage(any_store)  # default grace: an hour
    assert young.removed == [] and len(young.kept_young) == 1
    dry = collect_garbage(any_store, grace_seconds=0, dry_run=True)
    assert len(dry.removed) == 1 and find_debris(any_store)
    report = collect_garbage(any_store, grace_seconds=0)
    assert len(report.removed) == 1 and report.bytes_removed == len(b"interrupted")
    assert find_debris(any_store) == []
    keys = sorted(i.key for i in any_store.list(""))
    assert "checkpoint-100/model.bin" in keys
    assert verify_checkpoint(any_store.child("step-00000001")).ok


def test_gc_grace_uses_object_age(any_store: Store) -> None:
    CheckpointTransaction(any_store, "step-00000002").write("a", b"x")
    (item,) = find_debris(any_store)
    assert item.age_seconds < 60
    assert find_debris(any_store, now=time.time() + 7200)[0].age_seconds > 3600


def test_index_keeps_a_trainer_step_of_zero(any_store: Store) -> None:
    ckpt = any_store.child("checkpoint-9")
    ckpt.put("trainer_state.json", b'{"global_step": 0}')
    assert index_checkpoint(ckpt).manifest.step == 0


@pytest.mark.parametrize(
    ("name", "step"),
    [
        ("step-00000100", 100), ("checkpoint-2500", 2500), ("global_step7", 7),
        ("logs2", None), ("det2", None),
        ("epoch=3-step=400.ckpt", 400), ("epoch=3-step=400-v1.ckpt", 400), ("last.ckpt", None),
    ],
)
def test_step_names(name: str, step: int | None) -> None:
    from ckptkit.catalog import step_from_name

    assert step_from_name(name) == step
