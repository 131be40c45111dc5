"""``sync`` under hostile conditions: a proxy injecting throttling, resets and truncated bodies,
and SIGKILL at random moments. The destination never shows a partial checkpoint as committed."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ckptkit.catalog import list_checkpoints
from ckptkit.ops.sync import same_content, sync
from ckptkit.ops.verify import verify_checkpoint
from ckptkit.storage import open_store
from ckptkit.transfer import RetryPolicy
from tests.helpers import commit_files

# sync through a fault-injecting proxy, with retries, SIGKILL loops and a memory measurement.
pytestmark = pytest.mark.slow

FAST_RETRY = RetryPolicy(attempts=8, base_delay=0.01, max_delay=0.1)


def big_files(seed: int, sizes: tuple[int, ...]) -> dict[str, bytes]:
    rng = random.Random(seed)
    return {f"shard-{i}.bin": rng.randbytes(size) for i, size in enumerate(sizes)}


def make_root(path: Path, sizes: tuple[int, ...], steps: tuple[int, ...] = (1, 2)) -> Path:
    root = open_store(path)
    for step in steps:
        commit_files(root, f"step-{step:08d}", big_files(step, sizes), step=step)
    return path


def assert_committed_ones_are_whole(src: Path, dst_url: str, **options) -> set[str]:
    """Every checkpoint committed at the destination verifies and equals its source."""
    source = {c.name: c.manifest for c in list_checkpoints(open_store(src)) if c.committed}
    store = open_store(dst_url, **options)
    names = set()
    for info in list_checkpoints(store):
        if info.committed:
            assert same_content(info.manifest, source[info.name]), info.name
            report = verify_checkpoint(store.child(info.name))
            assert report.ok, (info.name, report)
            names.add(info.name)
    return names


def test_sync_completes_through_throttling_resets_and_truncation(
    tmp_path: Path, faulty_s3, faulty_bucket
) -> None:
    src = make_root(tmp_path / "src", sizes=(20 << 20, 300_000, 1000))
    remote = f"{faulty_bucket}/run"
    options = {"endpoint_url": faulty_s3.url}
    faulty_s3.set_faults(slowdown=0.15, reset_before=0.05, reset_after=0.05, truncate=0.05, seed=3)

    report = sync(src, remote, dst_options=options, retry=FAST_RETRY, jobs=4)
    assert report.ok, report.outcomes
    back = tmp_path / "back"
    report = sync(remote, back, src_options=options, retry=FAST_RETRY, jobs=4)
    assert report.ok, report.outcomes
    faulty_s3.clear_faults()

    assert sum(faulty_s3.faults.values()) >= 10  # the faults did happen, and were survived
    assert {"slowdown", "truncate"} <= set(faulty_s3.faults)
    assert assert_committed_ones_are_whole(src, remote, **options) == {"step-00000001", "step-00000002"}
    for step in (1, 2):
        for name, data in big_files(step, (20 << 20, 300_000, 1000)).items():
            assert (back / f"step-{step:08d}" / name).read_bytes() == data


def test_persistent_failure_is_a_clear_error_and_commits_nothing(
    tmp_path: Path, faulty_s3, faulty_bucket
) -> None:
    src = make_root(tmp_path / "src", sizes=(200_000,), steps=(1,))
    remote = f"{faulty_bucket}/run"
    # Every upload of a data file is reset; listing and reads work.
    faulty_s3.set_faults(
        reset_before=1.0, predicate=lambda method, path: method in ("PUT", "POST") and "shard-" in path
    )
    # botocore's own retries off (s3fs still retries a reset a few times): ckptkit's are under test.
    options = {
        "endpoint_url": faulty_s3.url,
        "config_kwargs": {"retries": {"total_max_attempts": 1}},
    }
    report = sync(src, remote, dst_options=options, retry=RetryPolicy(2, 0.01, 0.02))
    faulty_s3.clear_faults()

    (outcome,) = report.outcomes
    assert outcome.status == "failed" and report.exit_code == 4
    assert "failed 2 time(s), giving up" in outcome.detail and "shard-0.bin" in outcome.detail
    assert not [c for c in list_checkpoints(open_store(remote, endpoint_url=faulty_s3.url)) if c.committed]


def test_sigkill_at_random_moments_then_rerun(tmp_path: Path, s3_endpoint: str, faulty_bucket) -> None:
    sizes = (40 << 20, 8 << 20, 100_000)
    src = make_root(tmp_path / "src", sizes=sizes, steps=(1, 2, 3))
    remote = f"{faulty_bucket}/run"
    command = [sys.executable, "-m", "ckptkit", "sync", str(src), remote, "--jobs", "2"]
    env = {**os.environ, "AWS_ENDPOINT_URL": s3_endpoint}
    # Kill moments are drawn across the duration of a whole sync on this machine, measured first.
    started = time.monotonic()
    subprocess.run([*command[:-3], f"{faulty_bucket}/timing", "--jobs", "2"], env=env, check=True)
    duration = time.monotonic() - started
    rng = random.Random(11)
    kills = 0
    for _ in range(10):
        child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.1, 0.95) * duration)
        finished_first = child.poll() is not None
        if not finished_first:
            child.send_signal(signal.SIGKILL)
            kills += 1
        child.wait()
        # In between: whatever is committed is whole; the rest is not listed as committed.
        committed = assert_committed_ones_are_whole(src, remote)
        if finished_first or len(committed) == 3:
            # Done before the kill (a run that resumed a partial sync is shorter than the one
            # measured): start over, so the next kill lands in a whole sync again.
            open_store(remote).delete_prefix("")
    assert kills >= 5, "too few kills landed while the sync was running"

    final = subprocess.run([*command, "--verify"], env=env, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stdout + final.stderr
    assert assert_committed_ones_are_whole(src, remote) == {"step-00000001", "step-00000002", "step-00000003"}


@pytest.mark.parametrize("kind", ["reset_after", "slowdown"])
def test_manifest_commit_survives_a_lost_reply(tmp_path: Path, faulty_s3, faulty_bucket, kind: str) -> None:
    """The create-only manifest PUT lands but its reply is lost (or throttled): the retry meets our
    own manifest, which is success, not a conflict."""
    src = make_root(tmp_path / "src", sizes=(1000,), steps=(1,))
    faulty_s3.set_faults(
        **{kind: 1.0}, limit=1, predicate=lambda method, path: method == "PUT" and "ckptkit-manifest" in path
    )
    report = sync(src, f"{faulty_bucket}/run", dst_options={"endpoint_url": faulty_s3.url}, retry=FAST_RETRY)
    assert faulty_s3.faults[kind] == 1
    assert report.ok and report.outcomes[0].status == "committed", report.outcomes


# VmHWM, not ru_maxrss: on Linux ru_maxrss keeps the forking parent's high-water mark across exec.
MEASURE_SYNC = """
import sys
import ckptkit.ops.sync, s3fs  # the libraries are loaded before the baseline

def peak():
    status = open("/proc/self/status").read()
    return int(status.split("VmHWM:")[1].split()[0]) * 1024

before = peak()
report = ckptkit.ops.sync.sync(sys.argv[1], sys.argv[2], jobs=2)
assert report.ok, report.outcomes
print(before, peak())
"""


def test_memory_stays_bounded_whatever_the_file_size(tmp_path: Path, s3_endpoint: str, faulty_bucket) -> None:
    """Two 256 MiB files, two at a time: the syncing process holds a few blocks per file in flight,
    never a whole file (an 8 MiB read block, and s3fs's 16 MiB part with its copies on the way)."""
    from ckptkit.commit import CheckpointTransaction

    size = 256 << 20
    root = open_store(tmp_path / "src")
    with CheckpointTransaction(root, "step-00000001") as txn:
        for i in range(2):
            txn.write(f"big-{i}.bin", (bytes([i]) * (4 << 20) for _ in range(size // (4 << 20))))
        txn.commit(step=1, layout="files")
    env = {**os.environ, "AWS_ENDPOINT_URL": s3_endpoint}
    result = subprocess.run(
        [sys.executable, "-c", MEASURE_SYNC, str(tmp_path / "src"), f"{faulty_bucket}/run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    before, after = map(int, result.stdout.split()[-2:])
    growth = (after - before) >> 20
    assert growth < size >> 20, f"peak RSS grew by {growth} MiB while copying two {size >> 20} MiB files"
    assert assert_committed_ones_are_whole(tmp_path / "src", f"{faulty_bucket}/run") == {"step-00000001"}
