"""Non-blocking saves: what the caller changes after ``save`` returns stays out of the checkpoint,
one save in flight, failures reach the caller, retention and the mirror, buffer reuse, SIGKILL."""

from __future__ import annotations

import copy
import gc
import multiprocessing as mp
import random
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptkit
from ckptkit import CheckpointManager, SaveHandle
from ckptkit.async_save import BackgroundSaver, process_saver
from ckptkit.catalog import list_checkpoints
from ckptkit.errors import PermanentStorageError, UnstorableValueError
from ckptkit.native.staging import HostStager
from ckptkit.native.writer import plan_native
from ckptkit.ops.gc import collect_garbage, find_debris
from ckptkit.ops.verify import verify_tree
from ckptkit.storage import open_store
from ckptkit.storage.local import LocalStore
from tests import async_crash_worker
from tests.test_distributed_save import rank_state, run_ranks, same


class GatedStore(LocalStore):
    """A local store whose writes wait until ``gate`` is set, and that logs each write's key
    (its children share both, so a transaction's files are gated too)."""

    def __init__(self, root: Any, gate: threading.Event, writes: list[str]) -> None:
        super().__init__(root)
        self.gate, self.writes = gate, writes

    def child(self, prefix: str) -> GatedStore:
        return GatedStore(self._path(prefix), self.gate, self.writes)

    def put(self, key: str, data: Any, mode: Any = "overwrite", **options: Any) -> Any:
        assert self.gate.wait(30), "the gate never opened"
        self.writes.append(f"{self.url}/{key}")
        return super().put(key, data, mode, **options)


class FailingStore(LocalStore):
    """A local store on which writing a shard fails, as a full or broken disk would."""

    def child(self, prefix: str) -> FailingStore:
        return FailingStore(self._path(prefix))

    def put(self, key: str, data: Any, mode: Any = "overwrite", **options: Any) -> Any:
        if key.endswith(".safetensors"):
            raise PermanentStorageError(f"{self.url}/{key}: disk on fire")
        return super().put(key, data, mode, **options)


def trained_model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A small model with a tied weight, after one AdamW step (so the optimizer has state)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(50, 16), torch.nn.Linear(16, 16), torch.nn.Linear(16, 50))
    model[2].weight = model[0].weight  # tied, as an LM's embedding and head
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    train_step(model, optimizer)
    return model, optimizer


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    loss = model(torch.arange(10)).square().mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def same_bits(a: Any, b: Any) -> bool:
    """``same``, with floating tensors compared bit for bit (NaN payloads and -0.0 included)."""
    if isinstance(a, torch.Tensor):
        return (
            isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
        )
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_bits(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same_bits, a, b))
    return same(a, b)


# --- what the caller changes after save returns ---------------------------------------------------


def test_tensors_changed_right_after_save_returns_are_not_in_the_checkpoint(tmp_path: Path) -> None:
    model, optimizer = trained_model()
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": 1}
    expected = copy.deepcopy(state)
    gate, writes = threading.Event(), []
    manager = CheckpointManager(GatedStore(tmp_path / "run", gate, writes))

    handle = manager.save(1, state, blocking=False)
    assert isinstance(handle, SaveHandle) and not handle.done() and writes == []
    train_step(model, optimizer)  # AdamW updates weights and moments in place
    with torch.no_grad():
        for tensor in model.parameters():
            tensor.add_(1000)
    state["step"] = 2
    assert not same_bits(model.state_dict(), expected["model"])  # they did change
    gate.set()  # only now may the background thread write anything
    manifest = handle.wait(timeout=60)

    assert manifest.step == 1 and handle.done()
    restored = manager.restore()
    assert same_bits(restored, expected)
    assert restored["model"]["2.weight"] is restored["model"]["0.weight"] or (
        restored["model"]["2.weight"].untyped_storage().data_ptr()
        == restored["model"]["0.weight"].untyped_storage().data_ptr()
    )  # the tied weight is still one tensor's storage
    manager.close()


def test_views_and_shared_storages_stay_shared(tmp_path: Path) -> None:
    base = torch.arange(100, dtype=torch.float32)
    state = {
        "base": base, "tail": base[60:], "t": base.view(10, 10).t(), "same": base,
        "ints": base.view(torch.int32),
    }
    expected = copy.deepcopy(state)
    handle = ckptkit.save(state, tmp_path / "ckpt", blocking=False)
    base.mul_(-1)
    handle.wait(timeout=60)

    loaded = ckptkit.load(tmp_path / "ckpt", mmap=False)
    assert same_bits(loaded, expected)
    storage = loaded["base"].untyped_storage().data_ptr()
    assert all(loaded[k].untyped_storage().data_ptr() == storage for k in ("tail", "t", "same", "ints"))
    assert loaded["t"].stride() == (1, 10)


def test_an_unstorable_value_is_raised_by_the_call_and_nothing_is_written(tmp_path: Path) -> None:
    with pytest.raises(UnstorableValueError, match=r"opaque.*is not storable"):
        ckptkit.save({"w": torch.ones(3), "opaque": object()}, tmp_path / "ckpt", blocking=False)
    assert list(tmp_path.iterdir()) == []


# --- one save in flight ---------------------------------------------------------------------------


def test_the_next_save_waits_for_the_one_in_flight(tmp_path: Path) -> None:
    gate, writes = threading.Event(), []
    manager = CheckpointManager(GatedStore(tmp_path / "run", gate, writes), max_shard_size=2000)
    first = manager.save(1, {"w": [torch.zeros(500) for _ in range(4)]}, blocking=False)
    opener = threading.Timer(0.2, gate.set)  # opens the gate while save 2 waits for save 1
    opener.start()
    second = manager.save(2, {"w": [torch.ones(500) for _ in range(4)]}, blocking=False)
    # save(2) could return only after save 1 committed: back-pressure, one save in flight.
    assert first.done() and first.wait().step == 1
    second.wait(timeout=60)
    opener.join()
    firsts = [i for i, key in enumerate(writes) if "step-00000001" in key]
    seconds = [i for i, key in enumerate(writes) if "step-00000002" in key]
    assert len(firsts) == len(seconds) == 6  # 4 shards, tree.json and the manifest each
    assert max(firsts) < min(seconds)  # nothing of save 2 was written before save 1 committed
    assert [c.step for c in manager.list()] == [1, 2]
    manager.close()


# --- failures in the background --------------------------------------------------------------------


def test_a_background_failure_is_raised_by_the_next_call_once(tmp_path: Path) -> None:
    manager = CheckpointManager(FailingStore(tmp_path / "run"))
    handle = manager.save(1, {"w": torch.ones(10)}, blocking=False)
    with pytest.raises(PermanentStorageError, match="disk on fire"):
        manager.save(2, {"w": torch.ones(10)}, blocking=False)
    assert handle.done()
    with pytest.raises(PermanentStorageError, match="disk on fire"):
        handle.wait()  # the handle always tells
    assert manager.list() == []  # told once: the manager does not raise it again
    assert find_debris(open_store(tmp_path / "run")) == []  # the failed attempt was removed
    manager.close()


@pytest.mark.parametrize("call", ["wait", "close", "list", "restore", "latest"])
def test_every_manager_call_raises_an_unreported_failure(tmp_path: Path, call: str) -> None:
    manager = CheckpointManager(FailingStore(tmp_path / "run"))
    handle = manager.save(1, {"w": torch.ones(10)}, blocking=False)
    while not handle.done():  # list/restore/latest do not wait; let the failure happen first
        time.sleep(0.01)
    with pytest.raises(PermanentStorageError, match="disk on fire"):
        getattr(manager, call)()
    manager.close()  # already told: closes cleanly


def test_a_failure_the_handle_reported_is_not_raised_again(tmp_path: Path) -> None:
    manager = CheckpointManager(FailingStore(tmp_path / "run"))
    with pytest.raises(PermanentStorageError, match="disk on fire"):
        manager.save(1, {"w": torch.ones(10)}, blocking=False).wait(timeout=60)
    manager.close()


def test_a_bare_save_failure_is_raised_by_the_next_bare_save(tmp_path: Path) -> None:
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "ckptkit-manifest.json").write_text("{}")  # already "committed"
    handle = ckptkit.save({"w": torch.ones(3)}, tmp_path / "ckpt", blocking=False)
    with pytest.raises(ckptkit.CkptkitError, match="already committed"):
        ckptkit.save({"w": torch.ones(3)}, tmp_path / "other", blocking=False)
    assert handle.done() and not (tmp_path / "other").exists()
    ckptkit.save({"w": torch.ones(3)}, tmp_path / "other", blocking=False).wait(timeout=60)
    assert torch.equal(ckptkit.load(tmp_path / "other")["w"], torch.ones(3))


def test_wait_with_a_timeout_says_the_save_is_still_running(tmp_path: Path) -> None:
    gate = threading.Event()

    def job() -> Any:
        gate.wait(30)
        raise RuntimeError("the store went away")

    saver = BackgroundSaver()
    handle = saver.submit(str(tmp_path), 3, job)
    with pytest.raises(TimeoutError, match=r"still running after 0\.05 s"):
        handle.wait(timeout=0.05)
    gate.set()
    with pytest.raises(RuntimeError, match="the store went away"):
        saver.close()  # close waits, and raises what nobody was told of
    assert handle.done()


def _save_in_child(path: str) -> None:
    ckptkit.save({"w": torch.ones(3)}, path, blocking=False).wait(timeout=30)


def test_a_forked_child_saves_without_waiting_for_the_parents_save(tmp_path: Path) -> None:
    gate = threading.Event()
    saver = process_saver()
    saver.wait()
    parents = saver.submit("parent", None, lambda: gate.wait(30))  # in flight at the fork
    child = mp.get_context("fork").Process(target=_save_in_child, args=(str(tmp_path / "child"),))
    child.start()
    child.join(30)
    if child.is_alive():
        child.kill()
    gate.set()
    parents.wait(timeout=30)
    assert child.exitcode == 0  # the child did not wait for a save its parent runs
    assert torch.equal(ckptkit.load(tmp_path / "child")["w"], torch.ones(3))


# --- retention, mirror, buffers ---------------------------------------------------------------------


def test_retention_and_mirror_follow_non_blocking_saves(tmp_path: Path) -> None:
    mirror = LocalStore(tmp_path / "remote")
    manager = CheckpointManager(tmp_path / "run", keep_last=2, mirror=mirror)
    states = {step: {"w": torch.full((1000,), float(step)), "step": step} for step in range(1, 6)}
    for step, state in states.items():
        manager.save(step, state, blocking=False)
        state["w"].add_(1000)  # must not reach the checkpoint
    manager.close()

    assert [c.step for c in CheckpointManager(tmp_path / "run").list()] == [4, 5]
    remote = [c for c in list_checkpoints(mirror) if c.committed]
    assert [c.step for c in remote] == [4, 5]
    restored = CheckpointManager(mirror).restore()
    assert torch.equal(restored["w"], torch.full((1000,), 5.0)) and restored["step"] == 5


def test_the_staging_buffer_is_reused_not_reallocated(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path / "run")
    state = {"a": torch.randn(300, 300), "b": torch.randn(1000)}
    manager.save(1, state, blocking=False).wait(timeout=60)
    buffer = manager._saver.stager.buffer
    assert buffer is not None and buffer.numel() >= (300 * 300 + 1000) * 4
    first = buffer.data_ptr()
    state["a"].add_(1)
    manager.save(2, state, blocking=False).wait(timeout=60)
    assert manager._saver.stager.buffer.data_ptr() == first
    assert torch.equal(manager.restore()["a"], state["a"])
    manager.close()


def test_staged_entries_read_from_the_buffer_and_copy_only_the_written_bytes() -> None:
    big = torch.randn(1 << 20)
    state = {"w": big, "tied": big, "slice": torch.arange(1000)[100:200], "many": [torch.ones(7)] * 3}
    stager = HostStager(copy_threads=2)
    planned = plan_native(state)
    staged = stager.stage(planned)
    buffer = stager.buffer
    assert buffer is not None
    low, high = buffer.data_ptr(), buffer.data_ptr() + buffer.numel()
    written = sum(e.nbytes for e in planned.plan.entries)
    assert buffer.numel() < 1.01 * written  # one copy of what is written, not of whole storages
    for before, after in zip(planned.plan.entries, staged.plan.entries, strict=True):
        data = after.read()
        address = torch.frombuffer(data, dtype=torch.uint8).data_ptr()
        assert low <= address < high and after.source is None
        assert bytes(data) == bytes(before.read())
    again = stager.stage(plan_native(state))
    assert stager.buffer.data_ptr() == low and bytes(again.plan.entries[0].read()) == bytes(
        staged.plan.entries[0].read()
    )
    stager.close()


def test_a_manager_dropped_without_close_frees_its_thread_and_buffer(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path / "run")
    manager.save(1, {"w": torch.ones(1 << 18)}, blocking=False).wait(timeout=60)
    thread = manager._saver._thread
    buffer = weakref.ref(manager._saver.stager.buffer)
    assert thread is not None and thread.is_alive() and buffer() is not None
    del manager
    gc.collect()
    thread.join(10)
    assert not thread.is_alive() and buffer() is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_are_staged_in_pinned_memory(tmp_path: Path) -> None:
    weight = torch.randn(256, 256, device="cuda")
    state = {"w": weight, "t": weight.t(), "m": torch.randn(1000, device="cuda").to(torch.bfloat16)}
    expected = {k: v.cpu() for k, v in state.items()}
    manager = CheckpointManager(tmp_path / "run")
    handle = manager.save(1, state, blocking=False)
    weight.add_(1000)  # on the current stream, right after the call
    state["m"].mul_(-1)
    handle.wait(timeout=60)
    buffer = manager._saver.stager.buffer
    assert buffer is not None and buffer.is_pinned()
    loaded = manager.restore(map_location="cpu")
    assert same_bits(loaded, expected)
    assert manager.restore()["w"].device.type == "cuda"  # recorded on its own device
    manager.close()


# --- several ranks ------------------------------------------------------------------------------------


def save_without_blocking_on_two_ranks(rank: int, world: int, root: str) -> dict[str, Any]:
    import torch.distributed as dist

    state = rank_state(rank, 1)
    expected = copy.deepcopy(state)
    handle = ckptkit.save(state, f"{root}/step-1", step=1, blocking=False, max_shard_size=4000)
    for tensor in state["model"].values():
        tensor.add_(1000)
    total = torch.tensor([rank + 1.0])
    dist.all_reduce(total)  # the training group works while the commit runs on ckptkit's own
    manifest = handle.wait(timeout=60)
    shared = ckptkit.save(rank_state(rank, 2), f"{root}/shared", replicated=True, blocking=False)
    shared.wait(timeout=60)
    return {
        "total": total.item(),
        "id": manifest.checkpoint_id,
        "own": same(ckptkit.load(f"{root}/step-1"), expected),
        "shared": same(ckptkit.load(f"{root}/shared"), rank_state(0, 2)),
    }


@pytest.mark.slow
def test_non_blocking_collective_save_on_two_ranks(tmp_path: Path) -> None:
    root = str(tmp_path / "run")
    codes, results = run_ranks(save_without_blocking_on_two_ranks, 2, root, tmp_path / "out")
    assert codes == [0, 0], results
    assert all(r["own"] and r["shared"] and r["total"] == 3.0 for r in results), results
    assert results[0]["id"] == results[1]["id"]  # one manifest for both ranks
    assert all(report.ok for report in verify_tree(open_store(root)))


# --- SIGKILL during background saves ------------------------------------------------------------------

KILLS = 30


def _newest_is_whole(root: str) -> int | None:
    manager = CheckpointManager(root)
    latest = manager.latest()
    if latest is None:
        return None
    restored = manager.restore()
    assert same_bits(restored, async_crash_worker.state_for_step(latest.step)), latest.name
    assert restored["tied"] is restored["model"]["layer0.weight"] or (
        restored["tied"].untyped_storage().data_ptr()
        == restored["model"]["layer0.weight"].untyped_storage().data_ptr()
    )
    assert all(report.ok for report in verify_tree(open_store(root))), latest.name
    return latest.step


@pytest.mark.slow
def test_sigkill_during_background_saves(forkserver: mp.context.BaseContext, tmp_path: Path) -> None:
    root = str(tmp_path / "run")
    store = open_store(root)
    rng = random.Random(15)
    landed_mid_save = 0
    next_step = 1
    for _ in range(KILLS):
        ready = forkserver.Event()
        child = forkserver.Process(target=async_crash_worker.save_forever, args=(root, next_step, ready))
        child.start()
        assert ready.wait(60), "worker did not start"
        time.sleep(rng.uniform(0.0, 0.3))
        child.kill()
        child.join()
        assert child.exitcode == -9
        landed_mid_save += bool(find_debris(store))
        latest = _newest_is_whole(root)
        next_step = (latest or 0) + 1
    assert landed_mid_save >= KILLS // 5, f"only {landed_mid_save} of {KILLS} kills landed mid-save"
    assert next_step > 5, "the worker never got far enough to exercise retention"
    collect_garbage(store, grace_seconds=0)
    assert find_debris(store) == []
    assert _newest_is_whole(root) == next_step - 1
