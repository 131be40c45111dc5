"""Background mirroring from ``CheckpointManager`` to the moto S3 server."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest
import torch

from ckptkit.catalog import list_checkpoints
from ckptkit.manager import CheckpointManager
from ckptkit.mirror import MirrorError
from ckptkit.ops.sync import same_content
from ckptkit.ops.verify import verify_checkpoint
from ckptkit.retention import RetentionPolicy
from ckptkit.storage import open_store
from tests.helpers import start_trainer_mid_upload

# Background uploads that run to the end (five tests take 2-20 s here), two from a child process.
pytestmark = pytest.mark.slow


def remote_committed(url: str) -> dict[str, object]:
    return {c.name: c.manifest for c in list_checkpoints(open_store(url)) if c.committed}


def state(step: int) -> dict[str, object]:
    generator = torch.Generator().manual_seed(step)
    return {"w": torch.randn(256, 256, generator=generator), "step": step}


def test_mirror_ends_with_every_retained_checkpoint(tmp_path: Path, s3_bucket: str) -> None:
    remote = f"{s3_bucket}/run"
    manager = CheckpointManager(tmp_path / "run", keep_last=2, keep_every=4, mirror=remote)
    for step in range(1, 8):
        manager.save(step, state(step))
    manager.close()

    local = {c.name: c.manifest for c in list_checkpoints(open_store(tmp_path / "run")) if c.committed}
    assert set(local) == {"step-00000004", "step-00000006", "step-00000007"}
    mirrored = remote_committed(remote)
    assert set(mirrored) == set(local)  # retention applied at the mirror too
    for name, manifest in mirrored.items():
        assert same_content(manifest, local[name])
        assert verify_checkpoint(open_store(remote).child(name)).ok
    status = manager.mirror_status()
    assert status is not None and status.ok and not status.pending
    assert {"step-00000004", "step-00000007"} <= set(status.uploaded)
    assert torch.equal(CheckpointManager(remote).restore()["w"], state(7)["w"])


def test_keep_best_survives_at_the_mirror(tmp_path: Path, s3_bucket: str) -> None:
    remote = f"{s3_bucket}/run"
    policy = RetentionPolicy(keep_last=1, keep_best="loss")
    with CheckpointManager(tmp_path / "run", retention=policy, mirror=remote) as manager:
        for step, loss in [(1, 3.0), (2, 0.5), (3, 2.0), (4, 1.0)]:
            manager.save(step, state(step), metrics={"loss": loss})
    assert set(remote_committed(remote)) == {"step-00000002", "step-00000004"}


def test_a_failing_mirror_is_reported_never_silent(tmp_path: Path, s3_endpoint: str, caplog) -> None:
    manager = CheckpointManager(tmp_path / "run", mirror="s3://no-such-bucket-ckptkit/run")
    manager.save(1, state(1))  # training goes on: the local commit is all save waits for
    assert CheckpointManager(tmp_path / "run").latest().step == 1
    status = manager.mirror.wait(timeout=60)
    assert "step-00000001" in status.failed and "bucket does not exist" in status.failed["step-00000001"]
    assert any("mirror" in r.message and "failed" in r.message for r in caplog.records)
    with pytest.raises(MirrorError, match="not mirrored"):
        manager.close()


CHILD = textwrap.dedent(
    """
    import sys, time, torch
    from ckptkit.manager import CheckpointManager
    manager = CheckpointManager(sys.argv[1], mirror=sys.argv[2], max_shard_size=4 << 20)
    manager.save(1, {f"w{i}": torch.full((1 << 20,), float(i)) for i in range(40)})  # 40 shards
    print("committed", flush=True)
    time.sleep(120)
    """
)


def test_killed_mid_upload_the_next_run_finishes_it(tmp_path: Path, s3_bucket: str) -> None:
    remote = f"{s3_bucket}/run"
    child = start_trainer_mid_upload(CHILD, tmp_path / "run", remote, "step-00000001")
    store = open_store(remote)
    workers = [
        p
        for p in psutil.Process(child.pid).children(recursive=True)
        if "mirror_worker" in " ".join(p.cmdline())
    ]
    assert workers and workers[0].nice() > psutil.Process().nice()  # a niced child process uploads
    child.send_signal(signal.SIGKILL)
    child.wait()
    psutil.wait_procs(workers, timeout=10)
    assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)  # died with it

    uploaded = [o.key for o in store.list("step-00000001")]
    assert uploaded, "no upload started within a minute"
    assert "step-00000001" not in remote_committed(remote)  # no commit for the interrupted upload
    assert len(uploaded) < 41  # killed mid-upload: some of the 40 shards + tree.json are missing

    manager = CheckpointManager(tmp_path / "run", mirror=remote)  # a new run catches up
    manager.mirror.wait(timeout=120)
    manager.close()
    assert set(remote_committed(remote)) == {"step-00000001"}
    assert verify_checkpoint(open_store(remote).child("step-00000001")).ok


def test_uploads_finish_at_exit_without_close(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import sys, torch
        from ckptkit.manager import CheckpointManager
        manager = CheckpointManager(sys.argv[1], mirror=sys.argv[2], max_shard_size=1 << 20)
        manager.save(1, {f"w{i}": torch.randn(1 << 18) for i in range(20)})
        # no close(): the interpreter exits with the upload in flight
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "run"), str(tmp_path / "mirror")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert set(remote_committed(str(tmp_path / "mirror"))) == {"step-00000001"}
    assert verify_checkpoint(open_store(tmp_path / "mirror").child("step-00000001")).ok


def test_deleting_what_never_reached_the_mirror_is_not_a_failure(tmp_path: Path) -> None:
    from ckptkit.mirror import Mirror

    mirror = Mirror(open_store(tmp_path / "run"), str(tmp_path / "mirror"), isolated=False)
    mirror.remove("step-00000001")
    status = mirror.close()
    assert status.deleted == ["step-00000001"] and status.ok
