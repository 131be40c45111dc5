"""A mirror's catch-up reconciles deletions too (issue 11, item 9): what retention deleted
locally while the mirror's deletion died with a killed process is deleted at the mirror, and
nothing else ever is."""

from __future__ import annotations

import os
import signal
import textwrap
from pathlib import Path

import psutil
import pytest
import torch

from ckptkit.catalog import list_checkpoints
from ckptkit.commit import delete_checkpoint
from ckptkit.manager import CheckpointManager
from ckptkit.manifest import MANIFEST_NAME
from ckptkit.ops.verify import verify_checkpoint
from ckptkit.storage import open_store
from tests.helpers import start_trainer_mid_upload


def committed(url: str | Path) -> set[str]:
    return {c.name for c in list_checkpoints(open_store(url)) if c.committed}


def names(*steps: int) -> set[str]:
    return {f"step-{step:08d}" for step in steps}


CHILD = textwrap.dedent(
    """
    import sys, time, torch
    from ckptkit.manager import CheckpointManager
    manager = CheckpointManager(sys.argv[1], keep_last=2, mirror=sys.argv[2], max_shard_size=4 << 20)
    for step in range(1, 7):
        manager.save(step, {"w": torch.full((16,), float(step))})
    manager.mirror.wait()  # uploaded, with what retention had deleted by then
    # A big checkpoint: its upload is slow, and the deletions retention now queues at the
    # mirror wait behind it.
    manager.save(7, {f"w{i}": torch.full((1 << 20,), float(i)) for i in range(40)})
    print("committed", flush=True)
    time.sleep(120)
    """
)


@pytest.mark.slow  # a child killed mid-upload, then the catch-up run, on moto S3
def test_after_sigkill_the_next_run_deletes_what_retention_deleted(tmp_path: Path, s3_bucket: str) -> None:
    remote = f"{s3_bucket}/run"
    child = start_trainer_mid_upload(CHILD, tmp_path / "run", remote, "step-00000007")
    store = open_store(remote)
    workers = psutil.Process(child.pid).children(recursive=True)
    child.send_signal(signal.SIGKILL)
    child.wait()
    psutil.wait_procs(workers, timeout=10)

    assert committed(tmp_path / "run") == names(6, 7)
    left = committed(remote)
    assert names(5, 6) <= left and "step-00000007" not in left  # the queued deletions died

    manager = CheckpointManager(tmp_path / "run", keep_last=2, mirror=remote)
    manager.mirror.wait(timeout=180)
    manager.close()
    assert committed(remote) == committed(tmp_path / "run") == names(6, 7)
    assert verify_checkpoint(store.child("step-00000007")).ok
    status = manager.mirror_status()
    assert status is not None and set(status.deleted) == left - names(6)


def mirrored_root(tmp_path: Path, losses: list[float]) -> tuple[Path, Path]:
    """Steps 1..N saved with no retention and mirrored to a local directory."""
    root, mirror = tmp_path / "run", tmp_path / "mirror"
    with CheckpointManager(root, mirror=str(mirror)) as manager:
        for step, loss in enumerate(losses, start=1):
            manager.save(step, {"w": torch.full((4,), float(step))}, metrics={"loss": loss})
    assert committed(mirror) == names(*range(1, len(losses) + 1))
    return root, mirror


def reopen(root: Path, mirror: Path, **retention: object) -> CheckpointManager:
    manager = CheckpointManager(root, mirror=str(mirror), **retention)
    manager.mirror.wait(timeout=120)
    manager.close()
    return manager


def test_a_fresh_machine_never_prunes_the_mirror(tmp_path: Path) -> None:
    _root, mirror = mirrored_root(tmp_path, [5.0, 4.0, 3.0, 2.0, 1.0])
    reopen(tmp_path / "fresh", mirror, keep_last=1)  # an empty local root
    assert committed(mirror) == names(1, 2, 3, 4, 5)


def test_only_what_retention_expired_and_is_gone_locally_is_deleted(tmp_path: Path) -> None:
    root, mirror = mirrored_root(tmp_path, [0.1, 5.0, 4.0, 3.0, 2.0, 1.0])
    store = open_store(root)
    for step in (1, 3, 4):  # deleted by a retention pass whose mirror deletions were lost
        delete_checkpoint(store, f"step-{step:08d}")
    # A broken local copy: the mirror's may be the only good one.
    (root / "step-00000002" / MANIFEST_NAME).write_text("{")
    delete_checkpoint(store, "step-00000006")  # removed by hand: newer than anything left here

    manager = reopen(root, mirror, keep_last=2, keep_best="loss")
    # Of 1, 3 and 4 (gone here, older than 5): 1 is the best and 4 among the last two.
    assert committed(mirror) == names(1, 2, 4, 5, 6)
    assert manager.mirror_status().deleted == ["step-00000003"]


def test_no_deletion_on_an_incomplete_local_listing(tmp_path: Path) -> None:
    root, mirror = mirrored_root(tmp_path, [4.0, 3.0, 2.0, 1.0])
    store = open_store(root)
    for step in (1, 2):
        delete_checkpoint(store, f"step-{step:08d}")
    os.mkfifo(root / "step-00000003" / "notes")  # not a regular file: the listing is incomplete

    manager = CheckpointManager(root, keep_last=1, mirror=str(mirror))
    status = manager.mirror.wait(timeout=120)
    manager.mirror.close(raise_on_error=False)
    assert "<catch-up>" in status.failed and status.deleted == []
    assert committed(mirror) == names(1, 2, 3, 4)
