"""SIGKILL a process that saves into a deduplicated root, applies retention (which sweeps the
blob store) and runs ``gc --grace 0``, at random moments: every committed checkpoint must still
verify and load bit for bit (nothing it references deleted), and a final ``gc`` must leave no
debris, no pin, no lock and no unreferenced blob. Local disk and S3 (moto), 60 kills in all.

The children come from the session forkserver (torch and ckptkit preloaded), as in
tests/test_crash_consistency.py.
"""

from __future__ import annotations

import multiprocessing as mp
import random
import time

import pytest

from ckptkit.blobs import LOCK_NAME, PIN_DIR
from ckptkit.manifest import BLOB_DIR
from ckptkit.ops.gc import find_debris
from ckptkit.storage import open_store
from tests import dedup_worker
from tests.dedup_worker import assert_clean_after_gc, assert_root_whole

pytestmark = pytest.mark.slow


def _kill_loop(context: mp.context.BaseContext, root: str, *, kills: int, seed: int, window: float) -> None:
    rng = random.Random(seed)
    store = open_store(root)
    blob_store = store.child(BLOB_DIR)
    mid_save = mid_sweep = 0
    next_step = 1
    for trial in range(kills):
        ready = context.Event()
        gc_every = 2 if trial % 2 else 0  # half the workers also run gc between saves
        child = context.Process(target=dedup_worker.save_forever, args=(root, next_step, ready, gc_every))
        child.start()
        assert ready.wait(60), "worker did not start"
        time.sleep(rng.uniform(0.0, window))
        child.kill()
        child.join()
        assert child.exitcode == -9
        left = {i.key for i in blob_store.list("")}
        mid_save += bool(find_debris(store)) or any(k.startswith(PIN_DIR + "/") for k in left)
        mid_sweep += LOCK_NAME in left
        steps = assert_root_whole(root)  # verifies every committed checkpoint, loads each one
        next_step = max(steps, default=0) + 1
    assert mid_save >= kills // 5, f"only {mid_save} of {kills} kills landed mid-save"
    assert next_step > 5, "the worker never got far enough to exercise retention"
    print(f"{root}: {kills} kills, {mid_save} mid-save, {mid_sweep} mid-sweep, reached step {next_step - 1}")
    survivors = assert_root_whole(root)
    assert_clean_after_gc(root)
    assert assert_root_whole(root) == survivors


def test_sigkill_dedup_saves_retention_and_gc_local(forkserver, tmp_path) -> None:
    _kill_loop(forkserver, str(tmp_path / "run"), kills=36, seed=16, window=0.6)


def test_sigkill_dedup_saves_retention_and_gc_s3(forkserver, s3_bucket: str) -> None:
    # Over HTTP each save takes longer: a wider window reaches every phase.
    _kill_loop(forkserver, s3_bucket + "/run", kills=24, seed=17, window=1.5)
