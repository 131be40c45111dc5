"""SIGKILL a saving process at random moments; what is committed must always be whole.

The children come from a forkserver that has torch and ckptkit imported, so each restart costs
milliseconds and fifty kills per store stay cheap.
"""

from __future__ import annotations

import multiprocessing as mp
import random
import time

import pytest
import torch

from ckptkit import CheckpointManager
from ckptkit.ops.gc import collect_garbage, find_debris
from ckptkit.ops.verify import verify_tree
from ckptkit.storage import open_store
from tests import crash_worker

# Crash loops: fifty SIGKILLs per store, from a forkserver that imports torch.
pytestmark = pytest.mark.slow

KILLS = 50


def _assert_committed_state_is_whole(root: str) -> int | None:
    manager = CheckpointManager(root)
    latest = manager.latest()
    if latest is None:
        return None
    restored = manager.restore()
    expected = crash_worker.state_for_step(latest.step)
    assert restored["step"] == latest.step
    for name, tensor in expected["model"].items():
        assert torch.equal(restored["model"][name], tensor), (latest.name, name)
    assert torch.equal(
        restored["optimizer"]["state"][0]["exp_avg"], expected["optimizer"]["state"][0]["exp_avg"]
    )
    assert all(report.ok for report in verify_tree(open_store(root))), latest.name
    return latest.step


def _kill_loop(context: mp.context.BaseContext, root: str, seed: int, window: float) -> None:
    """Kill a worker ``KILLS`` times, each after a random delay in ``[0, window)`` seconds."""
    rng = random.Random(seed)
    store = open_store(root)
    landed_mid_save = 0
    next_step = 1
    for _ in range(KILLS):
        ready = context.Event()
        child = context.Process(target=crash_worker.save_forever, args=(root, next_step, ready))
        child.start()
        assert ready.wait(60), "worker did not start"
        time.sleep(rng.uniform(0.0, window))
        child.kill()
        child.join()
        assert child.exitcode == -9
        landed_mid_save += bool(find_debris(store))
        latest = _assert_committed_state_is_whole(root)
        next_step = (latest or 0) + 1
    # The kills must really have hit saves in flight, or this test proves nothing.
    assert landed_mid_save >= KILLS // 5, f"only {landed_mid_save} of {KILLS} kills landed mid-save"
    assert next_step > 5, "the worker never got far enough to exercise retention"
    collect_garbage(store, grace_seconds=0)
    assert find_debris(store) == []
    assert _assert_committed_state_is_whole(root) == next_step - 1


def test_sigkill_at_random_moments_local(forkserver, tmp_path) -> None:
    _kill_loop(forkserver, str(tmp_path / "run"), seed=1, window=0.3)


def test_sigkill_at_random_moments_s3(forkserver, s3_bucket: str) -> None:
    # Saves to moto over HTTP take longer than to disk: a wider window reaches every phase.
    _kill_loop(forkserver, s3_bucket + "/run", seed=2, window=1.2)


def test_two_processes_commit_same_step_on_s3(forkserver, s3_bucket: str) -> None:
    root = s3_bucket + "/race"
    barrier = forkserver.Barrier(2)
    results = forkserver.Queue()
    children = [
        forkserver.Process(target=crash_worker.save_once, args=(root, 7, barrier, results)) for _ in range(2)
    ]
    for child in children:
        child.start()
    for child in children:
        child.join(120)
        assert child.exitcode == 0
    outcomes = sorted(results.get(timeout=5) for _ in range(2))
    assert outcomes[1] == "won"
    assert (
        outcomes[0].startswith("lost: ") and "another writer committed this checkpoint first" in outcomes[0]
    )
    assert _assert_committed_state_is_whole(root) == 7
