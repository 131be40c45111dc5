"""The blob protocol, step by step: pins, the gc lock and its takeover, stale pins, manifests
that cannot be parsed, copies written while a sweep holds the lock; and its callers: retention,
``gc`` (library and CLI) and ``sync --delete`` release blobs only through a sweep."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import ckptkit
from ckptkit import CheckpointManager, blobs
from ckptkit.api import save_to
from ckptkit.blobs import LOCK_NAME, PIN_DIR, BlobWriter, digest_of_key, sweep
from ckptkit.catalog import read_manifest
from ckptkit.cli.main import cli
from ckptkit.commit import delete_checkpoint, step_dir_name
from ckptkit.manifest import BLOB_DIR, MANIFEST_NAME, Manifest
from ckptkit.ops.gc import collect_garbage
from ckptkit.ops.sync import sync
from ckptkit.storage import LocalStore, open_store
from tests.dedup_worker import assert_root_whole, assert_same_state, blob_keys, state_for_step


def _save(root: Path, step: int) -> Manifest:
    manifest = ckptkit.save(state_for_step(step), root / step_dir_name(step), step=step, dedup=True)
    assert isinstance(manifest, Manifest)
    return manifest


def _blobs_of(manifest: Manifest) -> set[str]:
    return {e.blob for e in manifest.blobs if e.blob is not None}


def _sizes(root: LocalStore) -> dict[str, int]:
    return {i.key: i.size for i in root.child(BLOB_DIR).list("") if digest_of_key(i.key)}


def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


@pytest.fixture
def three(tmp_path: Path) -> tuple[Path, LocalStore, list[Manifest]]:
    root = tmp_path / "run"
    manifests = [_save(root, step) for step in (1, 2, 3)]
    return root, open_store(root), manifests


def test_sweep_deletes_exactly_the_blobs_no_manifest_names(three) -> None:
    root, store, (m1, m2, m3) = three
    assert sweep(store).deleted == []  # everything is referenced
    sizes = _sizes(store)
    delete_checkpoint(store, step_dir_name(1))
    only_first = _blobs_of(m1) - _blobs_of(m2) - _blobs_of(m3)
    assert only_first  # step 1's optimizer state and adapter shard, at least

    report = sweep(store)

    assert sorted(report.deleted) == sorted(only_first)
    assert report.freed_bytes == sum(sizes[k] for k in only_first)
    assert report.kept == len(_blobs_of(m2) | _blobs_of(m3))
    assert blob_keys(store) == _blobs_of(m2) | _blobs_of(m3)
    assert not (root / BLOB_DIR / LOCK_NAME).exists()  # released
    assert assert_root_whole(str(root)) == [2, 3]


def test_a_live_pin_protects_what_no_manifest_names_yet(three) -> None:
    root, store, (m1, m2, _) = three
    delete_checkpoint(store, step_dir_name(1))
    wanted = sorted(_blobs_of(m1) - _blobs_of(m2))[0]
    writer = BlobWriter(store, "0123456789ab")
    [placement] = writer.place([digest_of_key(wanted)])
    assert placement.key == wanted and placement.present  # a save about to reuse it

    kept = sweep(store)
    assert wanted not in kept.deleted and wanted in blob_keys(store)
    assert kept.deleted  # the rest of step 1's blobs went

    writer.close()  # unpinned without a manifest naming it: an aborted save
    assert list((root / BLOB_DIR).glob(f"{PIN_DIR}/*")) == []
    assert sweep(store).deleted == [wanted]


def test_a_stale_pin_protects_nothing_and_is_removed(three) -> None:
    root, store, (m1, m2, _) = three
    delete_checkpoint(store, step_dir_name(1))
    wanted = sorted(_blobs_of(m1) - _blobs_of(m2))[0]
    BlobWriter(store, "0123456789ab").place([digest_of_key(wanted)])  # its process died: no close
    [pin] = (root / BLOB_DIR / PIN_DIR).iterdir()
    _age(pin, 120)

    report = sweep(store, stale_after=60)

    assert wanted in report.deleted
    assert report.stale_pins == [f"{PIN_DIR}/{pin.name}"]
    assert not pin.exists()


def test_a_fresh_lock_means_another_gc_runs_so_nothing_is_deleted(three) -> None:
    root, store, _ = three
    delete_checkpoint(store, step_dir_name(1))
    lock = root / BLOB_DIR / LOCK_NAME
    lock.write_text(json.dumps({"owner": "someone-else", "created": time.time()}))
    before = blob_keys(store)

    report = sweep(store)

    assert report.skipped == "another gc holds the blob store's lock"
    assert report.deleted == [] and blob_keys(store) == before
    assert json.loads(lock.read_text())["owner"] == "someone-else"  # theirs, left alone


def test_a_dead_sweeps_lock_is_taken_over_after_stale_after(three) -> None:
    root, store, (m1, m2, m3) = three
    delete_checkpoint(store, step_dir_name(1))
    lock = root / BLOB_DIR / LOCK_NAME
    lock.write_text(json.dumps({"owner": "dead", "created": 0}))
    _age(lock, 120)

    report = sweep(store, stale_after=60)

    assert report.skipped is None
    assert set(report.deleted) == _blobs_of(m1) - _blobs_of(m2) - _blobs_of(m3)
    assert not lock.exists()


def test_a_sweep_whose_lock_is_taken_over_midway_stops_deleting(three, monkeypatch) -> None:
    root, store, _ = three
    delete_checkpoint(store, step_dir_name(1))
    before = blob_keys(store)
    original = blobs.referenced_blobs

    def taken_over_meanwhile(root_store, **options):  # another gc judged this sweep dead
        store.child(BLOB_DIR).put(LOCK_NAME, json.dumps({"owner": "newer"}).encode())
        return original(root_store, **options)

    monkeypatch.setattr(blobs, "referenced_blobs", taken_over_meanwhile)
    report = sweep(store)

    assert report.deleted == [] and blob_keys(store) == before
    assert report.skipped is not None and "taken over" in report.skipped
    assert json.loads((root / BLOB_DIR / LOCK_NAME).read_text())["owner"] == "newer"


def test_a_save_meeting_a_held_lock_reuses_nothing_and_writes_copies(three) -> None:
    root, store, (m1, _, _) = three
    (root / BLOB_DIR / LOCK_NAME).write_text(json.dumps({"owner": "sweeping", "created": time.time()}))

    m4 = _save(root, 4)

    deduplicated = [e for e in m4.files if e.blob is not None]
    assert deduplicated and all(digest_of_key(e.blob) == e.digest for e in deduplicated)
    assert all(e.blob.rsplit(".", 1)[-1] != e.blob for e in deduplicated)  # a suffix: a copy
    assert not _blobs_of(m4) & _blobs_of(m1)  # the base's canonical blobs were not relied on
    # The sweep that held the lock listed the blobs before this save wrote its copies; once it
    # is done (here: its lock gone) and step 1 deleted, what step 4 needs is all still there.
    (root / BLOB_DIR / LOCK_NAME).unlink()
    delete_checkpoint(store, step_dir_name(1))
    sweep(store)
    assert _blobs_of(m4) <= blob_keys(store)
    assert assert_root_whole(str(root)) == [2, 3, 4]


def test_a_lock_left_alone_for_lock_stale_after_is_a_dead_sweeps(three) -> None:
    # A sweep renews its lock while it runs: one not rewritten for LOCK_STALE_AFTER (5 min) was
    # left by a killed sweep, even where pins stay live for an hour.
    root, store, _ = three
    delete_checkpoint(store, step_dir_name(1))
    lock = root / BLOB_DIR / LOCK_NAME
    lock.write_text(json.dumps({"owner": "killed", "created": 0}))
    _age(lock, blobs.LOCK_STALE_AFTER + 60)

    report = sweep(store)  # stale_after: the default hour

    assert report.skipped is None and report.deleted
    assert not lock.exists()


def test_a_long_sweep_renews_its_lock_so_no_other_gc_takes_it(three, monkeypatch) -> None:
    root, store, _ = three
    delete_checkpoint(store, step_dir_name(1))
    lock = root / BLOB_DIR / LOCK_NAME
    monkeypatch.setattr(blobs, "_LOCK_RENEW", 0.0)  # renew at every chance
    original = blobs.referenced_blobs
    meanwhile: list[blobs.SweepReport] = []

    def slow_reading(root_store, **options):
        _age(lock, blobs.LOCK_STALE_AFTER + 60)  # as if reading manifests took that long...
        referenced = original(root_store, **options)  # ...renewing the lock as it read them
        meanwhile.append(sweep(store))  # another gc starts now
        return referenced

    monkeypatch.setattr(blobs, "referenced_blobs", slow_reading)
    report = sweep(store)

    assert meanwhile[0].skipped == "another gc holds the blob store's lock"
    assert report.skipped is None and report.deleted
    assert not lock.exists()


@pytest.mark.parametrize("damage", ["torn", "future-version"])
def test_a_manifest_that_cannot_be_parsed_protects_every_blob_it_mentions(three, damage) -> None:
    root, store, (m1, _, _) = three
    path = root / step_dir_name(1) / MANIFEST_NAME
    if damage == "torn":
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) * 3 // 4])
    else:
        document = json.loads(path.read_bytes())
        document["schema_version"] = 99
        path.write_text(json.dumps(document))
    mentioned = {k for k in _blobs_of(m1) if k in path.read_text()}
    assert mentioned

    report = sweep(store)

    assert not mentioned & set(report.deleted)
    assert mentioned <= blob_keys(store)


def test_a_staged_manifest_of_a_nested_name_protects_its_blobs(tmp_path: Path) -> None:
    # "runs/step-1" stages in ".runs_step-1.ckptkit-staging-<id>", one level below the root, while
    # its manifest says "../../.ckptkit-blobs": the root's blob store all the same.
    root = tmp_path / "run"
    store = open_store(root)
    manifest = save_to(store, "runs/step-1", state_for_step(1), step=1, dedup=True)
    assert manifest.blob_store == f"../../{BLOB_DIR}"
    staged = root / ".runs_step-1.ckptkit-staging-0123456789ab"
    staged.mkdir()
    shutil.copy(root / "runs" / "step-1" / MANIFEST_NAME, staged / MANIFEST_NAME)
    delete_checkpoint(store, "runs/step-1")

    assert sweep(store).deleted == []
    assert _blobs_of(manifest) == blob_keys(store)
    shutil.rmtree(staged)
    assert sorted(sweep(store).deleted) == sorted(_blobs_of(manifest))


def test_a_sweep_of_a_root_that_never_deduplicated_creates_nothing(tmp_path: Path) -> None:
    root = tmp_path / "plain"
    ckptkit.save(state_for_step(1), root / "step-00000001", step=1)
    report = sweep(open_store(root))
    assert not report.has_store and report.deleted == []
    assert not (root / BLOB_DIR).exists()
    assert collect_garbage(open_store(root)).blobs is None


# --- the callers ---------------------------------------------------------------------------------


def test_retention_releases_the_blobs_only_expired_checkpoints_used(tmp_path: Path) -> None:
    root = tmp_path / "run"
    manager = CheckpointManager(root, dedup=True, keep_last=2)
    for step in range(1, 7):
        manager.save(step, state_for_step(step))
    store = open_store(root)
    kept = [read_manifest(store.child(step_dir_name(s))) for s in (5, 6)]
    assert blob_keys(store) == set().union(*map(_blobs_of, kept))
    # Six steps' optimizer states were written; two are left, and the base is stored once.
    assert len({k for k in blob_keys(store)}) == len(_blobs_of(kept[0]) | _blobs_of(kept[1]))
    assert assert_root_whole(str(root)) == [5, 6]
    assert list((root / BLOB_DIR).glob(f"{PIN_DIR}/*")) == [] and not (root / BLOB_DIR / LOCK_NAME).exists()


def test_gc_sweeps_blobs_and_reports_them(three) -> None:
    root, store, (m1, m2, m3) = three
    delete_checkpoint(store, step_dir_name(1))
    doomed = _blobs_of(m1) - _blobs_of(m2) - _blobs_of(m3)
    freed = sum(_sizes(store)[k] for k in doomed)
    BlobWriter(store, "0123456789ab").place([digest_of_key(sorted(doomed)[0])])  # a dead save's pin
    [pin] = (root / BLOB_DIR / PIN_DIR).iterdir()
    _age(pin, 7200)

    dry = CliRunner().invoke(cli, ["gc", str(root), "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert all(f"blob {k}" in dry.output for k in doomed)
    assert f"blobs: would remove {len(doomed)} unreferenced" in dry.output
    assert "would remove 1 stale pin(s)" in dry.output
    assert doomed <= blob_keys(store) and pin.exists()  # a dry run deletes nothing

    result = CliRunner().invoke(cli, ["gc", str(root), "--json"])
    assert result.exit_code == 0, result.output
    swept = json.loads(result.output)["blobs"]
    assert sorted(swept["deleted"]) == sorted(doomed)
    assert swept["freed_bytes"] == freed
    assert swept["stale_pins"] == [f"{PIN_DIR}/{pin.name}"]
    assert swept["skipped"] is None and swept["kept"] == len(blob_keys(store))
    assert not doomed & blob_keys(store) and not pin.exists()
    assert assert_root_whole(str(root)) == [2, 3]


def test_gc_says_when_another_gc_holds_the_lock(three) -> None:
    root, store, _ = three
    delete_checkpoint(store, step_dir_name(1))
    (root / BLOB_DIR / LOCK_NAME).write_text(json.dumps({"owner": "other", "created": time.time()}))
    before = blob_keys(store)

    text = CliRunner().invoke(cli, ["gc", str(root)])
    as_json = CliRunner().invoke(cli, ["gc", str(root), "--json"])

    assert text.exit_code == 0 and as_json.exit_code == 0
    assert "blobs: skipped: another gc holds the blob store's lock" in text.output
    assert json.loads(as_json.output)["blobs"]["skipped"] == "another gc holds the blob store's lock"
    assert blob_keys(store) == before


def test_gc_grace_is_the_pins_stale_after(three) -> None:
    root, store, (m1, m2, m3) = three
    delete_checkpoint(store, step_dir_name(1))
    doomed = _blobs_of(m1) - _blobs_of(m2) - _blobs_of(m3)
    pinned = sorted(doomed)[0]
    BlobWriter(store, "0123456789ab").place([digest_of_key(pinned)])
    [pin] = (root / BLOB_DIR / PIN_DIR).iterdir()
    _age(pin, 600)  # ten minutes old

    assert pinned not in collect_garbage(store, grace_seconds=3600).blobs.deleted
    report = collect_garbage(store, grace_seconds=300).blobs
    assert report.deleted == [pinned] and report.stale_pins == [f"{PIN_DIR}/{pin.name}"]


def test_sync_delete_releases_blobs_by_a_sweep_and_keeps_shared_ones(three, tmp_path: Path) -> None:
    dest, store, (m1, m2, m3) = three
    source = tmp_path / "source"
    shutil.copytree(dest, source)  # the same three checkpoints, then the source drops 1 and 2
    for step in (1, 2):
        delete_checkpoint(open_store(source), step_dir_name(step))
    doomed = (_blobs_of(m1) | _blobs_of(m2)) - _blobs_of(m3)

    report = sync(str(source), str(dest), delete=True)

    assert report.ok, report.to_json()
    assert report.count("deleted") == 2
    assert blob_keys(store) == _blobs_of(m3)  # shared base blobs stay, step 1 and 2's went
    assert report.blobs_released is not None and sorted(report.blobs_released.deleted) == sorted(doomed)
    assert report.to_json()["blobs_released"]["deleted"] == len(doomed)
    assert assert_root_whole(str(dest)) == [3]
    loaded = ckptkit.load(dest / step_dir_name(3))
    assert_same_state(loaded, state_for_step(3), "step 3 after sync --delete")


@pytest.mark.slow  # moto over HTTP
def test_sync_delete_to_s3_releases_blobs_there(tmp_path: Path, s3_bucket: str) -> None:
    dest = f"{s3_bucket}/run"
    on_s3 = CheckpointManager(dest, dedup=True)
    for step in (1, 2, 3):
        on_s3.save(step, state_for_step(step))
    store = open_store(dest)
    manifests = {s: read_manifest(store.child(step_dir_name(s))) for s in (1, 2, 3)}
    CheckpointManager(tmp_path / "source", dedup=True).save(3, state_for_step(3))  # same content

    report = sync(str(tmp_path / "source"), dest, delete=True)

    assert report.ok, report.to_json()
    assert report.count("deleted") == 2 and report.count("up-to-date") == 1
    assert blob_keys(store) == _blobs_of(manifests[3])
    assert report.blobs_released is not None
    only_deleted = (_blobs_of(manifests[1]) | _blobs_of(manifests[2])) - _blobs_of(manifests[3])
    assert set(report.blobs_released.deleted) == only_deleted
    assert assert_root_whole(dest) == [3]


def test_gc_spares_a_save_in_flight_whose_files_are_links_to_old_blobs(tmp_path) -> None:
    """On local disk a deduplicated save's staging directory holds hard links, which carry the
    blob's mtime: a frozen base written hours ago makes every file look hours old. gc must age
    the directory by when it was written into, not by its files' mtimes."""
    root = tmp_path / "run"
    store = open_store(root)
    ckptkit.save(state_for_step(1), root / step_dir_name(1), step=1, dedup=True)
    hours_ago = time.time() - 3 * 3600
    for path in (root / BLOB_DIR).rglob("*"):
        if path.is_file():
            os.utime(path, (hours_ago, hours_ago))
    from ckptkit.commit import CheckpointTransaction

    base = next(e for e in read_manifest(store.child(step_dir_name(1))).files if e.size >= 1 << 20)
    txn = CheckpointTransaction(store, step_dir_name(2), dedup=True)
    txn.write(base.path, store.child(step_dir_name(1)).get(base.path))  # reuses the old blob
    report = collect_garbage(store)  # default grace: an hour
    assert report.removed == []
    txn.commit(step=2, layout="files")
    assert read_manifest(store.child(step_dir_name(2))).files[0].blob == base.blob
