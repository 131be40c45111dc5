"""Sweeps racing saves on a deduplicated root: no interleaving deletes a blob that a committed
checkpoint or a save in flight needs.

The two deterministic races pause real code at the protocol's critical points (a hook around
``BlobWriter.place`` and around the sweep's check of its lock before deleting); the last test
lets two saving processes and a deleting one run freely.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

import ckptkit
from ckptkit import blobs
from ckptkit.blobs import BlobWriter, sweep
from ckptkit.commit import CheckpointTransaction, delete_checkpoint, step_dir_name
from ckptkit.manifest import BLOB_DIR, blob_key
from ckptkit.ops.verify import verify_tree
from ckptkit.storage import LocalStore, open_store
from tests import dedup_worker
from tests.dedup_worker import assert_clean_after_gc, assert_root_whole, blob_keys, state_for_step

WAIT = 60


def _save(root: Path, step: int) -> ckptkit.Manifest:
    return ckptkit.save(state_for_step(step), root / step_dir_name(step), step=step, dedup=True, jobs=1)


def test_a_sweep_between_a_saves_pin_and_its_commit_spares_what_the_save_reuses(tmp_path, monkeypatch):
    root = tmp_path / "run"
    first = _save(root, 1)
    store = open_store(root)
    placed, paused, resume = [], threading.Event(), threading.Event()
    original = BlobWriter.place

    def place_then_pause(self, digests):
        placements = original(self, digests)
        placed.extend(placements)
        paused.set()
        assert resume.wait(WAIT)
        return placements

    monkeypatch.setattr(BlobWriter, "place", place_then_pause)
    outcome: list[object] = []
    # Step 4 has step 1's base and its "cycle" tensor (4 % 3 == 1 % 3): it reuses their blobs.
    saver = threading.Thread(target=lambda: outcome.append(_save(root, 4)))
    saver.start()
    try:
        assert paused.wait(WAIT)
        delete_checkpoint(store, step_dir_name(1))  # now no manifest names the blobs being reused
        report = sweep(store)
    finally:
        monkeypatch.setattr(BlobWriter, "place", original)  # the save's later files: unpaused
        resume.set()
        saver.join(WAIT)

    reused = {p.key for p in placed if p.present}
    assert reused, "the save paused before it reused anything: the race was not run"
    assert not reused & set(report.deleted)
    assert report.deleted  # step 1's own optimizer state went: the sweep did run
    assert isinstance(outcome[0], ckptkit.Manifest)
    assert {e.blob for e in first.blobs} & {e.blob for e in outcome[0].blobs} >= reused
    assert assert_root_whole(str(root)) == [4]


def test_a_save_that_meets_a_sweeps_lock_is_safe_from_that_sweeps_deletions(tmp_path, monkeypatch):
    root = tmp_path / "run"
    first = _save(root, 1)
    store = open_store(root)
    delete_checkpoint(store, step_dir_name(1))  # its blobs are garbage now...
    paused, resume = threading.Event(), threading.Event()
    original = blobs._Lock.held
    checks = []

    def pause_before_deleting(lock):
        checks.append(lock.owner)
        if len(checks) == 1:  # the sweep has listed, read pins and manifests: about to delete
            paused.set()
            assert resume.wait(WAIT)
        return original(lock)

    monkeypatch.setattr(blobs._Lock, "held", pause_before_deleting)
    reports: list[blobs.SweepReport] = []
    sweeper = threading.Thread(target=lambda: reports.append(sweep(store)))
    sweeper.start()
    try:
        assert paused.wait(WAIT)
        # ...and a save that has the same base and "cycle" tensors commits while the sweep is
        # about to delete them: it must not have relied on them.
        fourth = _save(root, 4)
    finally:
        resume.set()
        sweeper.join(WAIT)

    [report] = reports
    canonical = {blob_key(e.digest) for e in first.blobs}
    assert canonical <= set(report.deleted) | blob_keys(store)
    assert {e.blob for e in fourth.blobs if e.blob} <= blob_keys(store)
    assert not {e.blob for e in fourth.blobs} & set(report.deleted)
    assert assert_root_whole(str(root)) == [4]
    assert (root / BLOB_DIR).is_dir()


@pytest.mark.slow  # three processes, ~20 saves
@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_savers_and_a_deleting_sweeper_never_break_a_committed_checkpoint(
    forkserver, tmp_path, where, request
) -> None:
    (tmp_path / "run").mkdir()  # the sweeper may start first: gc refuses a missing directory
    root = str(tmp_path / "run") if where == "local" else request.getfixturevalue("s3_bucket") + "/run"
    steps = 10 if where == "local" else 6
    errors, rounds, stop = forkserver.Queue(), forkserver.Queue(), forkserver.Event()
    odd_and_even = [list(range(first, 2 * steps + 1, 2)) for first in (1, 2)]
    savers = [
        forkserver.Process(target=dedup_worker.save_steps, args=(root, s, errors)) for s in odd_and_even
    ]
    sweeper = forkserver.Process(target=dedup_worker.retain_and_sweep, args=(root, stop, errors, rounds))
    sweeper.start()
    for child in savers:
        child.start()
    for child in savers:
        child.join(300)
    stop.set()
    sweeper.join(120)
    problems = []
    while not errors.empty():
        problems.append(errors.get())
    assert problems == []
    assert [c.exitcode for c in (*savers, sweeper)] == [0, 0, 0]
    assert rounds.get(timeout=5) >= 3, "the sweeper hardly ran while the savers saved"
    survivors = assert_root_whole(root)
    assert survivors and survivors[-1] >= 2 * steps - 1
    assert_clean_after_gc(root)
    assert assert_root_whole(root) == survivors


def test_a_copy_written_while_the_sweep_lists_is_spared(tmp_path, monkeypatch):
    """A sweep lists the blob store in one walk: a save that pins, meets the lock and writes a
    copy while that walk is under way must not lose the copy. Here the walk reaches the pins
    before the save pins and the copy's directory after the save wrote it (the CI failure:
    the copy was deleted, and the save's link to it failed)."""
    root = tmp_path / "run"
    _save(root, 1)
    store = open_store(root)
    blob_dir = str(root / BLOB_DIR)
    walking, resume = threading.Event(), threading.Event()
    original = LocalStore.list

    def pins_first_then_pause(self, prefix=""):
        if str(self.root) != blob_dir or prefix or not (root / BLOB_DIR / blobs.LOCK_NAME).exists():
            yield from original(self, prefix)  # not the sweep's walk under its lock
            return
        listed = list(original(self, ""))
        yield from (i for i in listed if i.key.startswith(blobs.PIN_DIR + "/"))
        walking.set()  # the walk has passed the pins; the blobs' directories come next
        assert resume.wait(WAIT)
        yield from (i for i in original(self, "") if not i.key.startswith(blobs.PIN_DIR + "/"))

    monkeypatch.setattr(LocalStore, "list", pins_first_then_pause)
    reports: list[blobs.SweepReport] = []
    sweeper = threading.Thread(target=lambda: reports.append(sweep(store)))
    sweeper.start()
    txn = CheckpointTransaction(store, step_dir_name(2), dedup=True)
    try:
        assert walking.wait(WAIT)
        entry = txn.write("weights.bin", b"fresh bytes of a save in flight" * 1000)
        assert entry.blob is None or "." in entry.blob  # the lock was seen: no canonical blob reused
    finally:
        resume.set()
        sweeper.join(WAIT)
    [report] = reports
    written = [k for k in blob_keys(store) if k.startswith(blob_key(entry.digest))]
    assert entry.blob is None or entry.blob in written, report.deleted
    txn.commit(step=2, layout="files")
    assert [r.status for r in verify_tree(store)] == ["ok", "ok"]
