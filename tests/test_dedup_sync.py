"""``sync`` and the mirror on deduplicated roots: each blob moves once, under the blob protocol.

Local disk and a real S3 server (moto over HTTP behind the counting proxy of tests/faulty_proxy.py:
what it forwards is what an upload costs).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import ckptkit
from ckptkit.blobs import LOCK_NAME, PIN_DIR, blob_bytes, digest_of_key, referenced_blobs, sweep
from ckptkit.catalog import list_checkpoints, read_manifest
from ckptkit.cli.main import cli
from ckptkit.commit import CheckpointTransaction, blob_store_for
from ckptkit.errors import StorageError, VerificationError
from ckptkit.manager import CheckpointManager
from ckptkit.manifest import BLOB_DIR, MANIFEST_NAME, blob_key
from ckptkit.ops.sync import same_content, sync
from ckptkit.ops.sync_blobs import BlobTransfers
from ckptkit.ops.verify import verify_checkpoint
from ckptkit.storage import open_store
from ckptkit.transfer import RetryPolicy

FAST_RETRY = RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.05)
# A frozen base: each tensor 1 MiB, so each is a shard (a blob) of its own and never changes.
BASE = {f"base.{i}": torch.randn(512, 512, generator=torch.Generator().manual_seed(i)) for i in range(3)}
BASE_BYTES = sum(t.numel() * t.element_size() for t in BASE.values())


def state(step: int) -> dict[str, object]:
    adapter = torch.randn(16, 64, generator=torch.Generator().manual_seed(1000 + step))
    return {"model": {**BASE, "adapter": adapter}, "optim": {"exp_avg": adapter * 0.5}, "step": step}


def name(step: int) -> str:
    return f"step-{step:08d}"


def dedup_root(path: Path, steps: tuple[int, ...] = (1, 2, 3)) -> Path:
    for step in steps:
        ckptkit.save(state(step), path / name(step), step=step, dedup=True)
    return path


def assert_same_state(loaded: object, step: int) -> None:
    expected = state(step)
    assert isinstance(loaded, dict) and loaded["step"] == step
    for key, tensor in expected["model"].items():  # type: ignore[union-attr]
        assert torch.equal(loaded["model"][key], tensor), key
    assert torch.equal(loaded["optim"]["exp_avg"], expected["optim"]["exp_avg"])  # type: ignore[index]


def assert_whole(url: str, step: int, **options: object) -> None:
    """The checkpoint verifies (every blob there, bytes matching) and loads bit for bit."""
    report = verify_checkpoint(open_store(url, **options))
    assert report.ok, report
    assert_same_state(ckptkit.load(url, **options), step)


def base_blobs(root: Path) -> set[str]:
    """The blob keys every checkpoint of ``root`` shares: the frozen base's."""
    store = open_store(root)
    sets = [{f.blob for f in c.manifest.blobs} for c in list_checkpoints(store) if c.committed]
    return set.intersection(*sets)


def blob_puts(proxy, key: str) -> int:
    """Uploads of blob ``key`` that reached the server (one PUT each: the files are < 8 MiB)."""
    return sum(1 for e in proxy.log if e.method == "PUT" and e.path.split("?")[0].endswith(key))


# --- local disk ----------------------------------------------------------------------------------


def test_local_root_sync_stores_each_blob_once_and_links_it(tmp_path: Path) -> None:
    src = dedup_root(tmp_path / "src")
    dst = tmp_path / "dst"

    report = sync(src, dst)

    assert report.ok and report.count("committed") == 3
    # The base went over once, not once per checkpoint.
    assert report.bytes_sent == blob_bytes(open_store(src)) < 1.5 * BASE_BYTES
    assert blob_bytes(open_store(dst)) == blob_bytes(open_store(src))
    for step in (1, 2, 3):
        manifest = read_manifest(open_store(dst / name(step)))
        source = read_manifest(open_store(src / name(step)))
        assert manifest.checkpoint_id == source.checkpoint_id and manifest.blob_store == "../.ckptkit-blobs"
        assert {(f.path, f.blob) for f in manifest.files} == {(f.path, f.blob) for f in source.files}
        assert_whole(str(dst / name(step)), step)
        # As a save on local disk leaves it: every file also lies, whole, in the checkpoint (a
        # hard link to its blob, so tools that read the directory find it at no cost in bytes).
        for entry in manifest.files:
            linked = (dst / name(step) / entry.path).stat()
            blob = (dst / BLOB_DIR / entry.blob).stat()
            assert (linked.st_ino, linked.st_dev) == (blob.st_ino, blob.st_dev)
    assert not list((dst / BLOB_DIR).glob(f"{PIN_DIR}/*"))  # unpinned once committed

    again = sync(src, dst)
    assert again.count("up-to-date") == 3 and again.bytes_sent == 0


def test_copies_written_during_a_sweep_and_plain_files_sync_to_canonical_blobs(tmp_path: Path) -> None:
    """A source checkpoint saved while a sweep held its lock has blob copies (``<hex>.<id>``);
    a file adopted then is a plain file of the checkpoint. Both arrive as canonical blobs."""
    src = tmp_path / "src"
    ckptkit.save(state(1), src / name(1), step=1, dedup=True)
    lock = src / BLOB_DIR / LOCK_NAME
    lock.write_text(json.dumps({"owner": "someone", "created": 0}))
    ckptkit.save(state(2), src / name(2), step=2, dedup=True)
    with CheckpointTransaction(open_store(src), "files-1", dedup=True) as txn:
        txn.write("blob.bin", iter([b"x" * 5000]))  # streamed, then adopted: stays a plain file
        txn.commit(step=None, layout="files")
    lock.unlink()
    copies = read_manifest(open_store(src / name(2))).blobs
    assert copies and all("." in f.blob for f in copies)
    plain = read_manifest(open_store(src / "files-1"))
    assert plain.blob_store is None and plain.files[0].blob is None

    report = sync(src, tmp_path / "dst")

    assert report.ok and report.count("committed") == 3
    manifest = read_manifest(open_store(tmp_path / "dst" / name(2)))
    assert all(f.blob == blob_key(f.digest) for f in manifest.files)
    assert_whole(str(tmp_path / "dst" / name(2)), 2)
    assert (tmp_path / "dst" / "files-1" / "blob.bin").read_bytes() == b"x" * 5000


def test_sync_to_a_destination_without_dedup_is_a_faithful_copy(tmp_path: Path) -> None:
    src = dedup_root(tmp_path / "src", steps=(1, 2))
    dst = tmp_path / "flat"

    report = sync(src, dst, dedup=False)

    assert report.ok and report.count("committed") == 2
    assert not (dst / BLOB_DIR).exists()
    for step in (1, 2):
        manifest = read_manifest(open_store(dst / name(step)))
        assert manifest.blob_store is None and not manifest.blobs and manifest.schema_version == 2
        assert same_content(manifest, read_manifest(open_store(src / name(step))))
        assert_whole(str(dst / name(step)), step)
        assert all((dst / name(step) / f.path).stat().st_nlink == 1 for f in manifest.files)


def test_cli_sync_keeps_blobs_unless_told_not_to(tmp_path: Path) -> None:
    src = dedup_root(tmp_path / "src", steps=(1, 2))
    runner = CliRunner()

    kept = runner.invoke(cli, ["sync", str(src), str(tmp_path / "dedup"), "--json"])
    flat = runner.invoke(cli, ["sync", str(src), str(tmp_path / "flat"), "--no-dedup", "--json"])

    assert kept.exit_code == 0 and flat.exit_code == 0, kept.output + flat.output
    assert json.loads(kept.output)["bytes_sent"] == blob_bytes(open_store(src))
    assert json.loads(flat.output)["bytes_sent"] == sum(
        c.manifest.total_size for c in list_checkpoints(open_store(src)) if c.committed
    )
    assert blob_bytes(open_store(tmp_path / "dedup")) == blob_bytes(open_store(src))
    assert not (tmp_path / "flat" / BLOB_DIR).exists()
    for step in (1, 2):
        assert_whole(str(tmp_path / "flat" / name(step)), step)


def test_dry_run_looks_up_blobs_and_pins_nothing(tmp_path: Path) -> None:
    src = dedup_root(tmp_path / "src", steps=(1, 2))
    dst = tmp_path / "dst"
    sync(src / name(1), dst / name(1))

    report = sync(src, dst, dry_run=True)

    # step 1 is there; step 2 would send only its adapter shard and its tree, not the base.
    (outcome,) = [o for o in report.outcomes if o.name == name(2)]
    assert outcome.status == "planned" and 0 < outcome.bytes_sent < 100_000
    assert not (dst / BLOB_DIR / PIN_DIR).exists() or not list((dst / BLOB_DIR / PIN_DIR).iterdir())
    assert not (dst / name(2)).exists()


def test_single_checkpoint_gets_its_parent_as_root(tmp_path: Path) -> None:
    src = dedup_root(tmp_path / "src", steps=(1, 2))
    dst = tmp_path / "elsewhere" / "kept"

    report = sync(src / name(2), dst)

    assert report.ok
    assert (tmp_path / "elsewhere" / BLOB_DIR).is_dir()  # the blob store of the destination's root
    assert read_manifest(open_store(dst)).blob_store == "../.ckptkit-blobs"
    assert_whole(str(dst), 2)


def test_a_sweep_during_the_sync_never_breaks_it(tmp_path: Path) -> None:
    """The worst interleaving: a sweep took the destination's lock and listed its blobs (the
    base, left there by a deleted checkpoint, so referenced by nothing) before the sync pinned
    anything; it deletes everything it listed after the sync committed. The sync, seeing the
    lock, wrote copies under fresh keys and never reused what the sweep deletes."""
    src = dedup_root(tmp_path / "src", steps=(1, 2))
    dst = tmp_path / "dst"
    sync(src / name(1), dst / name(1))
    dst_store = open_store(dst)
    (dst / name(1) / MANIFEST_NAME).unlink()  # as if deleted: its blobs are garbage now
    listed = [i.key for i in dst_store.child(BLOB_DIR).list("") if digest_of_key(i.key)]
    (dst / BLOB_DIR / LOCK_NAME).write_text(json.dumps({"owner": "sweep", "created": 0}))

    report = sync(src / name(2), dst / name(2))

    assert report.ok
    manifest = read_manifest(open_store(dst / name(2)))
    assert manifest.blobs and all(f.blob not in listed and "." in f.blob for f in manifest.blobs)
    for key in listed:  # the sweep goes on, deleting all it listed
        dst_store.child(BLOB_DIR).delete(key)
    (dst / BLOB_DIR / LOCK_NAME).unlink()
    assert_whole(str(dst / name(2)), 2)
    # A real sweep afterwards keeps every blob the committed checkpoint names.
    sweep(dst_store)
    assert {f.blob for f in manifest.blobs} <= {i.key for i in dst_store.child(BLOB_DIR).list("")}
    assert_whole(str(dst / name(2)), 2)


def test_old_pins_are_renewed_before_the_commit_and_a_swept_blob_stops_it(tmp_path: Path) -> None:
    """A sweep ignores a pin older than its grace: before committing, a long run pins its blobs
    afresh and checks they are all still there, instead of committing a checkpoint that names
    a blob some gc deleted meanwhile."""
    src = dedup_root(tmp_path / "src", steps=(1,))
    manifest = read_manifest(open_store(src / name(1)))
    source_blobs = blob_store_for(open_store(src / name(1)), manifest)
    dst = open_store(tmp_path / "dst")
    transfers = BlobTransfers(dst, FAST_RETRY, refresh_after=0.0)  # every pin counts as old
    placed = transfers.place(manifest, name(1))
    for placement in placed.values():
        transfers.store.put(placement.key, source_blobs.get(placement.key))
    blobs = {d: p.key for d, p in placed.items()}

    def pins() -> list[str]:
        return [i.key for i in transfers.store.list(PIN_DIR)]

    transfers.confirm(blobs, name(1))
    assert len(pins()) == 2  # renewed: a second pin, written now

    (tmp_path / "dst" / BLOB_DIR / LOCK_NAME).write_text(json.dumps({"owner": "gc", "created": 0}))
    with pytest.raises(StorageError, match="holds the blob store's lock"):
        transfers.confirm(blobs, name(1))
    (tmp_path / "dst" / BLOB_DIR / LOCK_NAME).unlink()

    gone = sorted(blobs.values())[0]
    transfers.store.delete(gone)
    with pytest.raises(VerificationError, match="deleted by a gc") as caught:
        transfers.confirm(blobs, name(1))
    assert gone in str(caught.value)
    transfers.close()
    assert pins() == []


def test_mirror_in_thread_sweeps_the_target_after_deleting(tmp_path: Path) -> None:
    target_url = f"memory://dedup-mirror-{tmp_path.name}/run"  # mirrored in the thread itself
    manager = CheckpointManager(tmp_path / "run", dedup=True, keep_last=2, mirror=target_url)
    for step in range(1, 5):
        manager.save(step, state(step))
    manager.close()

    target = open_store(target_url)
    try:
        assert [c.name for c in list_checkpoints(target) if c.committed] == [name(3), name(4)]
        left = {i.key for i in target.child(BLOB_DIR).list("") if digest_of_key(i.key)}
        assert left == referenced_blobs(target)  # steps 1-2's own shards released, the base kept
        assert sum(i.size for i in target.child(BLOB_DIR).list("") if i.key in left) < BASE_BYTES + 100_000
        for step in (3, 4):
            assert_whole(f"{target_url}/{name(step)}", step)
    finally:
        target.delete_prefix("")


# --- S3 ------------------------------------------------------------------------------------------


@pytest.mark.slow  # several syncs against moto S3
def test_one_checkpoint_local_to_s3_to_s3_to_local(tmp_path: Path, faulty_s3, faulty_bucket: str) -> None:
    src = dedup_root(tmp_path / "src", steps=(1, 2))
    options = {"endpoint_url": faulty_s3.url}
    first, second = f"{faulty_bucket}/a/{name(2)}", f"{faulty_bucket}/b/{name(2)}"

    report = sync(src / name(2), first, dst_options=options)
    assert report.ok
    blobs_up = blob_bytes(open_store(f"{faulty_bucket}/a", **options))
    assert blobs_up == report.bytes_sent >= BASE_BYTES
    assert_whole(first, 2, **options)
    # The checkpoint's own prefix holds the manifest only: every file is a blob of the root.
    assert [o.key for o in open_store(first, **options).list("")] == [MANIFEST_NAME]

    assert sync(first, second, src_options=options, dst_options=options).ok  # S3 → S3
    assert_whole(second, 2, **options)
    assert read_manifest(open_store(second, **options)).blob_store == "../.ckptkit-blobs"

    back = tmp_path / "back" / name(2)
    assert sync(second, back, src_options=options, verify=True).ok  # S3 → local, read back
    assert_whole(str(back), 2)
    for entry in read_manifest(open_store(back)).files:
        assert (back / entry.path).stat().st_ino == (back.parent / BLOB_DIR / entry.blob).stat().st_ino

    faulty_s3.reset_counters()
    assert sync(src / name(1), f"{faulty_bucket}/a/{name(1)}", dst_options=options).ok
    # Step 1 shares the base with step 2, which is there: only its adapter shard and tree go up.
    assert faulty_s3.bytes_to_upstream < 100_000
    assert_whole(f"{faulty_bucket}/a/{name(1)}", 1, **options)


@pytest.mark.slow
def test_root_sync_uploads_each_blob_once(tmp_path: Path, faulty_s3, faulty_bucket: str) -> None:
    steps = (1, 2, 3, 4, 5)
    src = dedup_root(tmp_path / "src", steps=steps)
    remote = f"{faulty_bucket}/run"
    options = {"endpoint_url": faulty_s3.url}

    report = sync(src, remote, dst_options=options)

    assert report.ok and report.count("committed") == len(steps)
    store = open_store(remote, **options)
    stored = sum(o.size for o in store.list(""))  # unique blobs + manifests (pins are gone)
    manifests = sum(o.size for o in store.list("") if o.key.endswith(MANIFEST_NAME))
    pins = [e for e in faulty_s3.log if e.method == "PUT" and f"/{PIN_DIR}/" in e.path]
    assert len(pins) == len(steps) and not list(store.child(BLOB_DIR).list(PIN_DIR))
    # Bytes uploaded: the unique blobs and the manifests, plus a few hundred bytes of pins.
    assert stored <= faulty_s3.bytes_to_upstream <= stored + 1000 * len(pins)
    assert stored - manifests == blob_bytes(open_store(src))
    for key in base_blobs(src):
        assert blob_puts(faulty_s3, key) == 1, key
    for step in steps:
        assert_whole(f"{remote}/{name(step)}", step, **options)


@pytest.mark.slow
def test_interrupted_sync_resumes_without_resending_blobs(
    tmp_path: Path, faulty_s3, faulty_bucket: str
) -> None:
    src = dedup_root(tmp_path / "src", steps=(1,))
    remote = f"{faulty_bucket}/run/{name(1)}"
    manifest = read_manifest(open_store(src / name(1)))
    failing = sorted(base_blobs(src))[0]
    faulty_s3.set_faults(reset_before=1.0, predicate=lambda method, path: method == "PUT" and failing in path)
    # botocore's own retries off: ckptkit's are what gives up here.
    options = {"endpoint_url": faulty_s3.url, "config_kwargs": {"retries": {"total_max_attempts": 1}}}

    report = sync(src / name(1), remote, dst_options=options, retry=RetryPolicy(2, 0.01, 0.02))

    assert not report.ok and report.outcomes[0].status == "failed"
    assert not [c for c in list_checkpoints(open_store(f"{faulty_bucket}/run", **options)) if c.committed]
    faulty_s3.clear_faults()
    faulty_s3.reset_counters()

    report = sync(src / name(1), remote, dst_options=options)

    assert report.ok and report.files_sent == 1
    failed_size = next(f.size for f in manifest.files if f.blob == failing)
    assert report.bytes_sent == failed_size
    blob_uploads = [
        e.path for e in faulty_s3.log if e.method == "PUT" and BLOB_DIR in e.path and PIN_DIR not in e.path
    ]
    assert len(blob_uploads) == 1 and blob_uploads[0].endswith(failing)  # the others were there
    assert_whole(remote, 1, **options)


@pytest.mark.slow
def test_sweeps_running_throughout_a_sync_never_break_it(tmp_path: Path, s3_bucket: str) -> None:
    """Real interleavings on S3: the destination holds the base as garbage (its checkpoint was
    deleted), and sweeps run back to back, deleting it, while a root sync reuses it or writes
    copies. Every checkpoint the sync commits verifies and loads; nothing is left pinned."""
    steps = (1, 2, 3, 4)
    src = dedup_root(tmp_path / "src", steps=steps)
    remote = f"{s3_bucket}/run"
    assert sync(src / name(1), f"{remote}/old").ok
    target = open_store(remote)
    target.delete(f"old/{MANIFEST_NAME}")  # the base is referenced by nothing there now
    stop, reports = threading.Event(), []

    def sweeping() -> None:
        while not stop.is_set():
            reports.append(sweep(target))

    sweeper = threading.Thread(target=sweeping)
    sweeper.start()
    try:
        report = sync(src, remote, retry=FAST_RETRY)
    finally:
        stop.set()
        sweeper.join()

    assert report.ok and report.count("committed") == len(steps), report.outcomes
    assert len(reports) >= 2 and any(r.deleted for r in reports)  # the sweeps did delete
    for step in steps:
        assert_whole(f"{remote}/{name(step)}", step)
    sweep(target)  # and one more, with nothing in flight
    for step in steps:
        assert verify_checkpoint(target.child(name(step))).ok
    assert not list(target.child(BLOB_DIR).list(PIN_DIR))


@pytest.mark.slow  # ten saves mirrored from a child process
def test_mirror_of_a_dedup_root_uploads_the_base_once(tmp_path: Path, faulty_s3, faulty_bucket: str) -> None:
    root, remote = tmp_path / "run", f"{faulty_bucket}/run"
    options = {"endpoint_url": faulty_s3.url}
    manager = CheckpointManager(root, dedup=True, keep_last=3, mirror=remote, mirror_options=options)
    for step in range(1, 11):
        manager.save(step, state(step))
    manager.close()

    target = open_store(remote, **options)
    kept = [c for c in list_checkpoints(target) if c.committed]
    assert [c.name for c in kept] == [name(8), name(9), name(10)]
    for info in kept:
        assert_whole(f"{remote}/{info.name}", info.step or 0, **options)
    base = {f.blob for f in kept[0].manifest.blobs if f.size > 1 << 20}
    assert len(base) == 3
    for key in base:
        assert blob_puts(faulty_s3, key) == 1, key
    # Ten saves of a 3 MiB base cost one base's upload, plus ten small shards and trees.
    assert BASE_BYTES < faulty_s3.bytes_to_upstream < BASE_BYTES + 10 * 100_000
    # The mirror deleted seven checkpoints there; a sweep then released the blobs only they
    # named: what is left at the remote is exactly what its manifests reference.
    left = {i.key for i in target.child(BLOB_DIR).list("") if digest_of_key(i.key)}
    assert left == referenced_blobs(target)


@pytest.mark.slow  # a mirror to moto S3
def test_the_mirror_thins_the_remote_copy_as_retention_thins_the_local_one(
    tmp_path: Path, s3_bucket: str
) -> None:
    root, remote = tmp_path / "run", f"{s3_bucket}/thinned"
    manager = CheckpointManager(root, dedup=True, keep_optimizer_last=2, mirror=remote)
    for step in range(1, 6):
        manager.save(step, state(step))
        manager.mirror.wait()  # uploaded: the next pass may thin it (an upload reads its files)
    manager.close()
    target = open_store(remote)
    infos = {c.name: c for c in list_checkpoints(target, read_manifests=True) if c.committed}
    assert sorted(infos) == [name(s) for s in range(1, 6)]
    assert [s for s in range(1, 6) if infos[name(s)].resumable] == [4, 5]
    for step in range(1, 6):
        assert verify_checkpoint(target.child(name(step))).ok
        loaded = ckptkit.load(f"{remote}/{name(step)}")
        if step < 4:  # weights only at the remote too, and what they dropped is gone there
            assert loaded.keys() == {"model"}
        else:
            assert_same_state(loaded, step)
    left = {i.key for i in target.child(BLOB_DIR).list("") if digest_of_key(i.key)}
    assert left == referenced_blobs(target)
