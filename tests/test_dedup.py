"""Deduplicated saves: each file's bytes stored once per root, read back as any checkpoint.

The deletion protocol has its own tests (test_dedup_protocol.py, _crash.py, _concurrency.py);
these check what a save writes, what every reader makes of it, and what a damaged blob store
looks like to ``verify``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from click.testing import CliRunner
from safetensors.torch import save as safetensors_bytes

import ckptkit
from ckptkit.api import save_to
from ckptkit.catalog import read_manifest
from ckptkit.cli.main import cli
from ckptkit.commit import CheckpointTransaction, files_of, logical_path
from ckptkit.manifest import BLOB_DIR, MANIFEST_NAME, blob_key
from ckptkit.native.plan import DEDUP_OWN_SHARD
from ckptkit.ops.verify import verify_tree
from ckptkit.storage import LocalStore, Store, open_store
from ckptkit.storage.base import Chunks, ObjectInfo, WriteMode

BASE_SHAPE = (256, 1024)  # 1 MiB of float32: a shard of its own


def frozen_base(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {f"layer{i}.weight": torch.randn(BASE_SHAPE, generator=generator) for i in range(4)}


def state_at(step: int, base: dict[str, torch.Tensor]) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(100 + step)
    adapter = torch.randn(8, 64, generator=generator)
    return {"model": {**base, "adapter": adapter}, "optimizer": {"exp_avg": adapter * 0.1}, "step": step}


class RecordingStore(LocalStore):
    """Local disk that remembers every key written (child stores share the record)."""

    def __init__(self, root: str | os.PathLike[str], written: list[str] | None = None) -> None:
        super().__init__(root)
        self.written: list[str] = [] if written is None else written

    def child(self, prefix: str) -> RecordingStore:
        return RecordingStore(self._path(prefix), self.written)

    def parent(self) -> RecordingStore:
        return RecordingStore(self.root.parent, self.written)

    def put(
        self, key: str, data: bytes | Chunks, mode: WriteMode = "overwrite", *, metadata: Any = None
    ) -> ObjectInfo:
        self.written.append(str(self._path(key).relative_to(Path(os.sep))))
        return super().put(key, data, mode, metadata=metadata)


def inodes_bytes(root: Path) -> int:
    """Bytes on disk below ``root``, each hard-linked file counted once."""
    seen: dict[int, int] = {}
    for path in root.rglob("*"):
        if path.is_file():
            seen[path.stat().st_ino] = path.stat().st_size
    return sum(seen.values())


def blobs_of(root: Store) -> list[str]:
    listed = root.child(BLOB_DIR).list("")
    return sorted(i.key for i in listed if "/" in i.key and not i.key.startswith("pins/"))


def large_blobs(root: Path) -> list[str]:
    return [b for b in blobs_of(LocalStore(root)) if (root / BLOB_DIR / b).stat().st_size >= DEDUP_OWN_SHARD]


def assert_equal_states(a: Any, b: Any) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_equal_states(a[key], b[key])
    else:
        assert a == b


def test_unchanged_tensors_are_written_once_and_every_save_loads_whole(tmp_path: Path) -> None:
    root = RecordingStore(tmp_path / "run")
    base = frozen_base()
    sizes = []
    for step in range(3):
        before = len(root.written)
        manifest = save_to(root, f"step-{step}", state_at(step, base), step=step, dedup=True)
        written = [k for k in root.written[before:] if f"/{BLOB_DIR}/" in k and "/pins/" not in k]
        sizes.append(inodes_bytes(tmp_path / "run"))
        assert manifest.schema_version == 3 and manifest.blob_store == "../.ckptkit-blobs"
        # Each large base tensor is a file of its own, named by its digest: written by the first
        # save only; later saves write the small shard (adapter, optimizer) and tree.json (the
        # step in it changed).
        big = [e for e in manifest.files if e.size >= DEDUP_OWN_SHARD]
        assert len(big) == len(base)
        assert all(e.blob == blob_key(e.digest) for e in manifest.files)
        if step == 0:
            assert len(written) == len(manifest.files)
        else:
            small = {e.blob for e in manifest.files if e.size < DEDUP_OWN_SHARD}
            assert len(small) == 2 and {k.rsplit(f"{BLOB_DIR}/", 1)[1] for k in written} == small
    base_bytes = sum(t.numel() * 4 for t in base.values())
    assert sizes[0] > base_bytes and sizes[2] - sizes[0] < 64 << 10  # two more saves: < 64 KiB
    for step in range(3):
        assert_equal_states(ckptkit.load(str(tmp_path / "run" / f"step-{step}")), state_at(step, base))
    assert [r.ok for r in verify_tree(open_store(tmp_path / "run"))] == [True] * 3


def test_local_checkpoint_directories_hold_every_file_as_a_hard_link(tmp_path: Path) -> None:
    """DeepSpeed's loader and the HF Trainer read directories, not manifests: every file is at
    its path, sharing its inode with the blob."""
    base = frozen_base()
    for step in range(2):
        ckptkit.save(state_at(step, base), tmp_path / "run" / f"step-{step}", step=step, dedup=True)
    for step in range(2):
        checkpoint = tmp_path / "run" / f"step-{step}"
        manifest = read_manifest(LocalStore(checkpoint))
        for entry in manifest.files:
            placed = checkpoint / entry.path
            blob = tmp_path / "run" / BLOB_DIR / entry.blob
            assert placed.stat().st_ino == blob.stat().st_ino
    shared = [
        e for e in read_manifest(LocalStore(tmp_path / "run/step-1")).files if e.size >= DEDUP_OWN_SHARD
    ]
    assert all((tmp_path / "run" / BLOB_DIR / e.blob).stat().st_nlink == 3 for e in shared)


def test_a_save_without_dedup_is_unchanged(tmp_path: Path) -> None:
    manifest = ckptkit.save(state_at(0, frozen_base()), tmp_path / "run" / "plain", step=0)
    assert manifest.schema_version == 2 and manifest.blob_store is None
    assert all(e.blob is None for e in manifest.files)
    assert not (tmp_path / "run" / BLOB_DIR).exists()


def test_dedup_on_s3_uploads_each_blob_once_and_reads_back(s3_bucket: str) -> None:
    url = f"{s3_bucket}/run"
    base = frozen_base(1)
    manifests = [ckptkit.save(state_at(s, base), f"{url}/step-{s}", step=s, dedup=True) for s in range(3)]
    root = open_store(url)
    blobs = blobs_of(root)
    unique = {e.blob for m in manifests for e in m.files}
    assert set(blobs) == unique
    # Nothing below the checkpoints but the manifests: every file is a blob.
    listed = [i.key for i in root.list("") if not i.key.startswith(BLOB_DIR + "/")]
    assert sorted(listed) == [f"step-{s}/{MANIFEST_NAME}" for s in range(3)]
    assert not list(root.child(BLOB_DIR).list("pins"))  # every save unpinned after its commit
    for s in range(3):
        assert_equal_states(ckptkit.load(f"{url}/step-{s}"), state_at(s, base))
    assert all(r.ok for r in verify_tree(root))


def _commit_hf_like(root: Store, name: str, tensors: dict[str, torch.Tensor], step: int) -> None:
    with CheckpointTransaction(root, name, dedup=True) as txn:
        txn.write("model.safetensors", safetensors_bytes(tensors))
        txn.write("trainer_state.json", json.dumps({"global_step": step}).encode())
        txn.commit(step=step, layout="hf-trainer")


def test_other_layouts_are_inspected_and_converted_from_the_blob_store(
    s3_bucket: str, tmp_path: Path
) -> None:
    root = open_store(f"{s3_bucket}/hf")
    tensors = {"w": torch.arange(12.0).reshape(3, 4), "b": torch.ones(3)}
    _commit_hf_like(root, "checkpoint-1", tensors, 1)
    runner = CliRunner()
    inspected = runner.invoke(cli, ["inspect", f"{s3_bucket}/hf/checkpoint-1", "--json"])
    assert inspected.exit_code == 0, inspected.output
    assert "model.safetensors" in inspected.output
    converted = runner.invoke(
        cli,
        ["convert", f"{s3_bucket}/hf/checkpoint-1", str(tmp_path / "out.safetensors"), "--to", "safetensors"],
    )
    assert converted.exit_code == 0, converted.output
    from safetensors.torch import load_file

    assert_equal_states(load_file(tmp_path / "out.safetensors"), tensors)


def test_verify_reports_a_missing_and_a_damaged_blob(tmp_path: Path) -> None:
    base = frozen_base()
    for step in range(2):
        ckptkit.save(state_at(step, base), tmp_path / "run" / f"step-{step}", step=step, dedup=True)
    manifest = read_manifest(LocalStore(tmp_path / "run/step-1"))
    shared = [e for e in manifest.files if e.size >= DEDUP_OWN_SHARD]
    blobs = tmp_path / "run" / BLOB_DIR
    (blobs / shared[0].blob).unlink()  # the checkpoint directories keep their links
    damaged = blobs / shared[1].blob
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0xFF
    os.unlink(damaged)  # break the hard links: only the blob is damaged
    damaged.write_bytes(bytes(data))
    result = CliRunner().invoke(cli, ["verify", str(tmp_path / "run"), "--json"])
    assert result.exit_code == 1, result.output
    reports = json.loads(result.output)["checkpoints"]
    for report in reports:
        kinds = {(f["path"], f["kind"]) for f in report["findings"]}
        assert kinds == {(shared[0].path, "missing"), (shared[1].path, "digest")}
        missing = next(f for f in report["findings"] if f["kind"] == "missing")
        assert shared[0].blob in missing["message"]


def test_files_of_maps_each_name_where_it_lies(tmp_path: Path) -> None:
    root = LocalStore(tmp_path / "run")
    with CheckpointTransaction(root, "a/b", dedup=True) as txn:  # nested: the root's blob store
        txn.write("x/data.bin", b"payload" * 10)
        manifest = txn.commit(step=1, layout="files")
    assert manifest.blob_store == "../../.ckptkit-blobs"
    checkpoint = root.child("a/b")
    files = files_of(checkpoint, read_manifest(checkpoint))
    [entry] = manifest.files
    assert files.get(logical_path(entry.path)) == b"payload" * 10
    assert [i.key for i in files.list("")] == ["x/data.bin"] and files.list_dirs("") == ["x"]
    assert files.local_path("x/data.bin") == tmp_path / "run" / BLOB_DIR / entry.blob


def _tensors(items: Iterable[tuple[str, int]]) -> dict[str, torch.Tensor]:
    return {name: torch.full((n,), float(len(name))) for name, n in items}


def test_manager_and_lightning_io_deduplicate(tmp_path: Path) -> None:
    base = frozen_base(2)
    with ckptkit.CheckpointManager(tmp_path / "managed", dedup=True) as manager:
        for step in range(1, 4):
            manager.save(step, state_at(step, base))
        restored = manager.restore()
    assert_equal_states(restored, state_at(3, base))
    assert len(large_blobs(tmp_path / "managed")) == 4

    from ckptkit.integrations.lightning import CkptkitCheckpointIO

    io = CkptkitCheckpointIO(dedup=True)
    for epoch in range(2):
        checkpoint = {"state_dict": dict(base), "epoch": epoch, "global_step": epoch}
        io.save_checkpoint(checkpoint, tmp_path / f"l/e{epoch}.ckpt")
    assert len(large_blobs(tmp_path / "l")) == 4
    loaded = io.load_checkpoint(tmp_path / "l/e1.ckpt")
    assert_equal_states(loaded["state_dict"], base)


def test_scan_reads_a_deduplicated_checkpoint_where_its_files_lie(s3_bucket: str) -> None:
    """On an object store the checkpoint's directory holds only its manifest: a scan of it that
    listed the directory would call a hostile file clean."""
    root = open_store(f"{s3_bucket}/scanned")
    with CheckpointTransaction(root, "step-1", dedup=True) as txn:
        txn.write("evil.pt", b"cos\nsystem\n(S'echo pwned'\ntR.")
        txn.commit(step=1, layout="files")
    result = CliRunner().invoke(cli, ["scan", f"{s3_bucket}/scanned/step-1"])
    assert result.exit_code == 3, result.output
    assert "evil.pt" in result.output and "os.system" in result.output


def test_a_non_blocking_deduplicated_save_commits_in_the_background(tmp_path: Path) -> None:
    base = frozen_base(3)
    with ckptkit.CheckpointManager(tmp_path / "bg", dedup=True) as manager:
        handles = [manager.save(step, state_at(step, base), blocking=False) for step in (1, 2)]
        manifests = [h.wait() for h in handles]
    assert [m.schema_version for m in manifests] == [3, 3]
    large = [{e.blob for e in m.files if e.size >= DEDUP_OWN_SHARD} for m in manifests]
    assert large[0] == large[1] and len(large[0]) == 4
    assert_equal_states(ckptkit.load(str(tmp_path / "bg")), state_at(2, base))
