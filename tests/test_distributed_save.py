"""Multi-rank native saves on real gloo process groups (2 and 4 CPU ranks, forked from the test).

Each test forks ``world`` ranks that join a gloo group through a free loopback port, run one
scenario function and write what they saw to ``result_rank<r>.json``; the test then checks the
store from the parent, which is a process of world size 1.
"""

from __future__ import annotations

import datetime as dt
import json
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptkit
from ckptkit.catalog import list_checkpoints, read_manifest
from ckptkit.distributed import TopologyMismatchError
from ckptkit.ops.verify import verify_checkpoint
from ckptkit.storage import open_store
from tests.fixtures._common import free_port
from tests.fixtures.gen_deepspeed import rank_environment

# Every test forks 2-4 gloo ranks (one waits out a commit timeout on purpose).
pytestmark = pytest.mark.slow

COMMIT_TIMEOUT_S = 10.0
SHARD = 4_000  # small shards, so that every rank writes several files
EXIT_FAILED = 3
EXIT_GAVE_UP = 5  # a hung rank that stopped waiting once its peers had given up

Scenario = Callable[[int, int, str], dict[str, Any]]


def rank_state(rank: int, step: int) -> dict[str, Any]:
    """A state whose every value depends on (rank, step), with tensors of several dtypes."""
    gen = torch.Generator().manual_seed(1000 * rank + step)
    return {
        "rank": rank,
        "step": step,
        "model": {f"layer{i}.weight": torch.randn(24, 24, generator=gen) for i in range(3)},
        "ids": torch.arange(10 * rank, 10 * rank + 7),
        "half": torch.randn(9, generator=gen).to(torch.bfloat16),
        "optimizer": {"lr": 0.1 * (rank + 1), "betas": (0.9, 0.999), "name": f"rank{rank}"},
    }


def same(a: Any, b: Any) -> bool:
    """Exact equality, tensors included (dtype and every value)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


# --- the harness -------------------------------------------------------------------------------------


def _rank_main(scenario: Scenario, rank: int, world: int, port: int, root: str, out: str) -> None:
    os.environ.update(rank_environment(rank, world, port), TEST_OUT=out)
    torch.set_num_threads(1)  # 4 ranks on 2 cores: intra-op threads would only oversubscribe
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=dt.timedelta(seconds=60))
    result: dict[str, Any] = {"rank": rank}
    try:
        result.update(scenario(rank, world, root))
    except Exception as exc:
        result["error"] = {"type": type(exc).__name__, "message": str(exc)}
        Path(out, f"result_rank{rank}.json").write_text(json.dumps(result))
        sys.stdout.flush()
        os._exit(EXIT_FAILED)  # a peer may be dead: skip the collectives of a clean exit
    Path(out, f"result_rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def run_ranks(scenario: Scenario, world: int, root: str, out: Path, timeout_s: float = 60.0) -> list[Any]:
    """Fork ``world`` ranks running ``scenario``; returns [exit codes, per-rank results]."""
    out.mkdir(parents=True, exist_ok=True)
    ctx = multiprocessing.get_context("fork")
    port = free_port()
    procs = [
        ctx.Process(target=_rank_main, args=(scenario, rank, world, port, root, str(out)))
        for rank in range(world)
    ]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    for proc in procs:  # a hung rank must not outlive the test
        if proc.is_alive():
            proc.kill()
            proc.join()
    results = []
    for rank in range(world):
        path = out / f"result_rank{rank}.json"
        results.append(json.loads(path.read_text()) if path.exists() else None)
    return [[proc.exitcode for proc in procs], results]


# --- scenarios (run in every rank) -------------------------------------------------------------------


def save_per_rank_and_replicated(rank: int, world: int, root: str) -> dict[str, Any]:
    saved = ckptkit.save(rank_state(rank, 1), f"{root}/step-1", step=1, max_shard_size=SHARD)
    # Only rank 0's state is written; the others' differs on purpose and must be ignored.
    shared = ckptkit.save(
        rank_state(rank, 2), f"{root}/shared", step=2, replicated=True, max_shard_size=SHARD
    )
    return {
        "ids": [saved.checkpoint_id, shared.checkpoint_id],
        "own": same(ckptkit.load(f"{root}/step-1"), rank_state(rank, 1)),
        "shared": same(ckptkit.load(f"{root}/shared"), rank_state(0, 2)),
        "keys": same(ckptkit.load(f"{root}/step-1", keys=["ids"]), {"ids": rank_state(rank, 1)["ids"]}),
    }


def save_per_rank(rank: int, world: int, root: str) -> dict[str, Any]:
    ckptkit.save(rank_state(rank, 1), f"{root}/step-1", step=1)
    return {"own": same(ckptkit.load(f"{root}/step-1"), rank_state(rank, 1))}


def load_at_another_world_size(rank: int, world: int, root: str) -> dict[str, Any]:
    try:
        ckptkit.load(f"{root}/step-1")
        refused = None
    except TopologyMismatchError as exc:
        refused = str(exc)
    ckptkit.save(rank_state(rank, 3), f"{root}/step-3", step=3, max_shard_size=SHARD)
    return {
        "refused": refused,
        "shared": same(ckptkit.load(f"{root}/shared"), rank_state(0, 2)),
        "own": same(ckptkit.load(f"{root}/step-3"), rank_state(rank, 3)),
    }


def rank_1_fails_writing(rank: int, world: int, root: str) -> dict[str, Any]:
    if rank == 1:
        from ckptkit.distributed import AttemptSink

        plain_write = AttemptSink.write
        calls = []

        def write_then_fail(self: AttemptSink, path: str, data: Any) -> Any:
            calls.append(path)
            if len(calls) == 2:  # the first shard is in the store; the disk "fills up"
                raise OSError(28, "No space left on device (simulated)")
            return plain_write(self, path, data)

        AttemptSink.write = write_then_fail  # type: ignore[method-assign]
    state = rank_state(rank, 1)
    ckptkit.save(state, f"{root}/step-1", step=1, max_shard_size=SHARD, jobs=1, timeout_s=COMMIT_TIMEOUT_S)
    return {}


def rank_2_killed_writing(rank: int, world: int, root: str) -> dict[str, Any]:
    if rank == 2:
        from ckptkit.distributed import AttemptSink

        plain_write = AttemptSink.write

        def write_then_die(self: AttemptSink, path: str, data: Any) -> Any:
            plain_write(self, path, data)
            os.kill(os.getpid(), signal.SIGKILL)

        AttemptSink.write = write_then_die  # type: ignore[method-assign]
    state = rank_state(rank, 1)
    ckptkit.save(state, f"{root}/step-1", step=1, max_shard_size=SHARD, timeout_s=COMMIT_TIMEOUT_S)
    return {}


def rank_1_hangs_writing(rank: int, world: int, root: str) -> dict[str, Any]:
    if rank == 1:
        from ckptkit.distributed import AttemptSink

        def hang(self: AttemptSink, path: str, data: Any) -> Any:
            # Stuck (a wedged filesystem, a deadlock) until rank 0 has given up on it.
            gave_up = Path(os.environ["TEST_OUT"], "result_rank0.json")
            while not gave_up.exists():
                time.sleep(0.1)
            os._exit(EXIT_GAVE_UP)

        AttemptSink.write = hang  # type: ignore[method-assign]
    ckptkit.save(rank_state(rank, 1), f"{root}/step-1", step=1, timeout_s=COMMIT_TIMEOUT_S)
    return {}


def rank_0_saves_alone(rank: int, world: int, root: str) -> dict[str, Any]:
    import torch.distributed as dist

    result: dict[str, Any] = {}
    if rank == 0:
        try:
            ckptkit.save(rank_state(0, 1), f"{root}/forgot", timeout_s=2)
        except ckptkit.CkptkitError as exc:
            result["forgot"] = f"{type(exc).__name__}: {exc}"
        ckptkit.save(rank_state(0, 1), f"{root}/alone", collective=False)
    dist.barrier()
    result["alone"] = same(ckptkit.load(f"{root}/alone"), rank_state(0, 1))
    return result


# --- tests ----------------------------------------------------------------------------------------------


def _ok(codes: list[Any], results: list[Any]) -> list[dict[str, Any]]:
    assert codes == [0] * len(codes), results
    return results


def test_per_rank_round_trip_then_other_world_sizes(tmp_path: Path) -> None:
    root = str(tmp_path / "run")
    two = _ok(*run_ranks(save_per_rank_and_replicated, 2, root, tmp_path / "out2"))
    assert all(r["own"] and r["shared"] and r["keys"] for r in two), two
    assert two[0]["ids"] == two[1]["ids"]  # every rank returned the one committed manifest

    store = open_store(root)
    manifest = read_manifest(store.child("step-1"))
    assert manifest.layout == "native" and manifest.step == 1
    topology = manifest.topology
    assert topology is not None and topology["world_size"] == 2 and topology["replicated"] is False
    for rank, entry in enumerate(topology["ranks"]):
        assert entry["rank"] == rank
        assert f"rank-{rank:05d}/tree.json" in entry["files"] and len(entry["files"]) > 2
        assert all(path.startswith(f"rank-{rank:05d}/") for path in entry["files"])
    assert sorted(p for r in topology["ranks"] for p in r["files"]) == sorted(f.path for f in manifest.files)
    assert read_manifest(store.child("shared")).topology == {"world_size": 2, "replicated": True}
    assert verify_checkpoint(store.child("step-1")).status == "ok"

    # This process has world size 1: which rank's state it wants is ambiguous; a named rank is not.
    refusal = "saved by 2 ranks, each with its own state; this job has 1 "
    with pytest.raises(TopologyMismatchError, match=refusal):
        ckptkit.load(f"{root}/step-1")
    assert same(ckptkit.load(f"{root}/step-1", rank=1), rank_state(1, 1))
    with pytest.raises(TopologyMismatchError, match=r"one state per rank: there is no rank 2 \(0 to 1\)"):
        ckptkit.load(f"{root}/step-1", rank=2)
    assert same(ckptkit.load(f"{root}/shared"), rank_state(0, 2))

    four = _ok(*run_ranks(load_at_another_world_size, 4, root, tmp_path / "out4"))
    for r in four:
        assert "saved by 2 ranks" in r["refused"] and "this job has 4 rank(s)" in r["refused"]
        assert r["shared"] and r["own"]
    assert read_manifest(store.child("step-3")).topology["world_size"] == 4
    assert [c.name for c in list_checkpoints(store) if c.committed] == ["step-1", "shared", "step-3"]


def test_a_rank_failing_mid_write_commits_nothing(tmp_path: Path) -> None:
    root = tmp_path / "run"
    codes, results = run_ranks(rank_1_fails_writing, 2, str(root), tmp_path / "out")
    assert codes == [EXIT_FAILED, EXIT_FAILED]
    disk_full = "[Errno 28] No space left on device (simulated)"
    assert results[1]["error"] == {"type": "OSError", "message": disk_full}
    assert results[0]["error"]["type"] == "DistributedCommitError"
    assert results[0]["error"]["message"] == (
        f"{open_store(root).url}/step-1: not committed: rank 1: OSError: {disk_full}"
    )
    assert list_checkpoints(open_store(root)) == []
    assert sorted(os.listdir(root)) == []  # rank 0 removed the attempt, rank 1's shard included


def test_a_rank_killed_mid_write_commits_nothing_and_survivors_raise(tmp_path: Path) -> None:
    root = tmp_path / "run"
    codes, results = run_ranks(rank_2_killed_writing, 4, str(root), tmp_path / "out")
    assert codes == [EXIT_FAILED, EXIT_FAILED, -signal.SIGKILL, EXIT_FAILED]
    expected = f"{open_store(root).url}/step-1: not committed: a rank failed, died or did not reach"
    for rank in (0, 1, 3):
        error = results[rank]["error"]
        assert error["type"] == "DistributedCommitError"
        assert error["message"].startswith(f"{expected} the commit within {COMMIT_TIMEOUT_S:g} s (")
    assert [c for c in list_checkpoints(open_store(root)) if c.committed] == []


def test_a_hung_rank_costs_the_others_the_timeout_not_forever(tmp_path: Path) -> None:
    root = tmp_path / "run"
    codes, results = run_ranks(rank_1_hangs_writing, 2, str(root), tmp_path / "out")
    assert codes == [EXIT_FAILED, EXIT_GAVE_UP]
    error = results[0]["error"]
    assert error["type"] == "DistributedCommitError"
    expected = f"{open_store(root).url}/step-1: not committed: a rank failed, died or did not reach"
    assert error["message"].startswith(f"{expected} the commit within {COMMIT_TIMEOUT_S:g} s (")
    assert [c for c in list_checkpoints(open_store(root)) if c.committed] == []


def test_a_save_from_one_rank_alone(tmp_path: Path) -> None:
    root = tmp_path / "run"
    results = _ok(*run_ranks(rank_0_saves_alone, 2, str(root), tmp_path / "out"))
    forgot = results[0]["forgot"]
    assert forgot.startswith(f"DistributedCommitError: {open_store(root).url}/forgot: not all 2 ranks joined")
    assert forgot.endswith("; to save from this rank alone, pass collective=False")
    assert all(r["alone"] for r in results)
    assert read_manifest(open_store(root).child("alone")).topology is None
    assert [c.name for c in list_checkpoints(open_store(root)) if c.committed] == ["alone"]


def test_per_rank_save_on_s3(s3_bucket: str, tmp_path: Path) -> None:
    import s3fs  # noqa: F401  (imported once here rather than in every forked rank)

    root = f"{s3_bucket}/run"
    results = _ok(*run_ranks(save_per_rank, 2, root, tmp_path / "out"))
    assert all(r["own"] for r in results), results
    checkpoint = open_store(root).child("step-1")
    manifest = read_manifest(checkpoint)
    attempt = manifest.files[0].path.split("/")[0]
    assert attempt.startswith("ckptkit-")  # both ranks wrote into rank 0's attempt prefix
    for rank, entry in enumerate(manifest.topology["ranks"]):
        assert f"rank-{rank:05d}/tree.json" in entry["files"]  # as laid out, without the attempt prefix
    assert verify_checkpoint(checkpoint).status == "ok"
    assert same(ckptkit.load(f"{root}/step-1", rank=0), rank_state(0, 1))

    # Synced elsewhere (no attempt prefix on disk, another one on S3), every rank's state loads.
    from ckptkit.ops.sync import sync

    assert sync(root, tmp_path / "copy").ok
    assert sync(tmp_path / "copy", f"{s3_bucket}/copy").ok
    for where in (str(tmp_path / "copy"), f"{s3_bucket}/copy"):
        for rank in (0, 1):
            assert same(ckptkit.load(f"{where}/step-1", rank=rank), rank_state(rank, 1)), (where, rank)


def save_twice_deduplicated(rank: int, world: int, root: str) -> dict[str, Any]:
    """Each rank keeps a large frozen tensor of its own and a small changing one."""
    frozen = torch.Generator().manual_seed(rank)
    base = torch.randn(512, 512, generator=frozen)  # 1 MiB: a shard of its own
    for step in (1, 2):
        state = {"frozen": base, "moving": torch.full((4,), float(10 * rank + step))}
        ckptkit.save(state, f"{root}/step-{step}", step=step, dedup=True)
    loaded = ckptkit.load(f"{root}/step-2")
    return {"own": same(loaded, {"frozen": base, "moving": torch.full((4,), float(10 * rank + 2))})}


def test_a_collective_deduplicated_save_shares_each_ranks_blobs(tmp_path: Path) -> None:
    root = str(tmp_path / "run")
    results = _ok(*run_ranks(save_twice_deduplicated, 2, root, tmp_path / "out"))
    assert all(r["own"] for r in results), results
    store = open_store(root)
    first, second = (read_manifest(store.child(f"step-{s}")) for s in (1, 2))
    assert second.schema_version == 3 and all(e.blob is not None for e in second.files)
    large = lambda m: {e.blob for e in m.files if e.size >= 1 << 20}  # noqa: E731
    assert len(large(first)) == 2 and large(first) == large(second)  # one per rank, written once
    assert not list(store.child(".ckptkit-blobs").list("pins"))  # every rank unpinned
    assert all(verify_checkpoint(store.child(f"step-{s}")).status == "ok" for s in (1, 2))
