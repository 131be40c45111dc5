"""ckptkit as DCP's storage layer: ``CkptkitWriter`` / ``CkptkitReader`` and ``CheckpointManager.save_dcp``.

The first half runs in this process (``no_dist``): the commit, the digests, the safe reading of
``.metadata`` and of bytes items, corruption, pickling, the CLI. The second half forks real gloo
ranks running FSDP2 ``fully_shard`` on a CPU mesh (resharding.md §2.4): a model and its AdamW
state saved on 2 ranks (local and the moto S3), loaded on 1, 2 and 4 ranks, compared bit for bit
with ``dcp_to_torch_save`` of a plain ``FileSystemWriter`` save of the same state.
"""

from __future__ import annotations

import datetime as dt
import json
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

from ckptkit import CheckpointManager
from ckptkit.catalog import read_manifest
from ckptkit.commit import CheckpointTransaction
from ckptkit.errors import ChecksumMismatchError, CommitConflictError, NotCommittedError, UnsafeContentError
from ckptkit.hashing import digest_bytes
from ckptkit.integrations.dcp import CkptkitReader, CkptkitWriter, load_metadata
from ckptkit.storage import open_store
from tests.fixtures._common import free_port
from tests.fixtures.gen_deepspeed import rank_environment

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
CLI = [sys.executable, "-c", "from ckptkit.cli.main import main; main()"]


def sample_state() -> dict[str, Any]:
    gen = torch.Generator().manual_seed(3)
    return {
        "model": {
            "w": torch.randn(33, 17, generator=gen),
            "b": torch.randn(17, generator=gen).to(torch.bfloat16),
        },
        "ids": torch.arange(40)[5:25],  # a view of a larger storage
        "t": torch.randn(6, 4, generator=gen).t(),  # not contiguous
        "step": 12,
        "groups": [{"lr": 0.5, "betas": (0.9, 0.95)}],
    }


def blank_like(state: Any) -> Any:
    if isinstance(state, torch.Tensor):
        return torch.zeros(state.shape, dtype=state.dtype)
    if isinstance(state, dict):
        return {k: blank_like(v) for k, v in state.items()}
    if isinstance(state, list):
        return [blank_like(v) for v in state]
    return state


def same(a: Any, b: Any) -> bool:
    """Exact equality, tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def load_with(reader: Any, like: dict[str, Any]) -> dict[str, Any]:
    out = blank_like(like)
    out["step"], out["groups"] = 0, [{"lr": 0.0, "betas": (0.0, 0.0)}]
    dcp.load(out, storage_reader=reader, no_dist=True)
    return out


def failure_of(exc: CheckpointException) -> BaseException:
    """The one rank's exception DCP wrapped (DCP keeps it with its traceback)."""
    (failure,) = exc.failures.values()
    return failure[0] if isinstance(failure, tuple) else failure


class _Payload:
    """Pickles as a call of os.system: what a hostile checkpoint would hold."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def commit_dcp_files(root: Any, name: str, files: dict[str, bytes]) -> None:
    with CheckpointTransaction(root, name) as txn:
        for path, data in files.items():
            txn.write(path, data)
        txn.commit(step=1, layout="dcp")


# --- one process --------------------------------------------------------------------------------


def test_save_commits_one_manifest_with_every_files_digest_and_loads_bit_exact(tmp_path: Path) -> None:
    state = sample_state()
    writer = CkptkitWriter(tmp_path / "run" / "step-7", step=7, metadata={"who": "test"}, thread_count=2)
    dcp.save(state, storage_writer=writer, no_dist=True)

    checkpoint = tmp_path / "run" / "step-7"
    manifest = read_manifest(open_store(checkpoint))
    assert manifest.layout == "dcp" and manifest.step == 7
    lineage = manifest.metadata["lineage"]
    assert manifest.metadata == {"who": "test", "lineage": {**lineage, "data": {"global_step": 7}}}
    assert writer.manifest == manifest
    assert sorted(e.path for e in manifest.files) == [".metadata", "__0_0.distcp", "__0_1.distcp"]
    for entry in manifest.files:  # hashed while written: equal to a digest of the bytes on disk
        assert entry.digest == digest_bytes((checkpoint / entry.path).read_bytes()).digest
    assert manifest.topology == {
        "world_size": 1,
        "ranks": [{"rank": 0, "files": ["__0_0.distcp", "__0_1.distcp"]}],
    }
    assert not [p.name for p in (tmp_path / "run").iterdir() if p.name != "step-7"]  # no staging left

    assert same(load_with(CkptkitReader(checkpoint), state), state)
    # The files are FileSystemWriter's: DCP's own reader loads the same values.
    assert same(load_with(dcp.FileSystemReader(str(checkpoint)), state), state)


def test_tensors_changed_after_async_save_returns_are_not_in_the_checkpoint(tmp_path: Path) -> None:
    state = {"w": torch.randn(256, 256), "b": torch.randn(256)}
    before = {k: v.clone() for k, v in state.items()}
    future = dcp.async_save(state, storage_writer=CkptkitWriter(tmp_path / "a"), no_dist=True)
    for tensor in state.values():  # the optimizer's next step, right after the call returns
        tensor.add_(1000.0)
    future.result()
    out = {k: torch.zeros_like(v) for k, v in before.items()}
    dcp.load(out, storage_reader=CkptkitReader(tmp_path / "a"), no_dist=True)
    assert same(out, before)


def test_a_flipped_bit_in_a_distcp_file_fails_the_load_naming_the_file(tmp_path: Path) -> None:
    state = sample_state()
    dcp.save(state, storage_writer=CkptkitWriter(tmp_path / "c"), no_dist=True)
    victim = tmp_path / "c" / "__0_0.distcp"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))

    with pytest.raises(CheckpointException) as caught:
        load_with(CkptkitReader(tmp_path / "c"), state)
    error = failure_of(caught.value)
    assert isinstance(error, ChecksumMismatchError)
    assert error.path.endswith("/c/__0_0.distcp")
    assert "__0_0.distcp" in str(caught.value)


def test_only_a_committed_checkpoint_loads(tmp_path: Path) -> None:
    state = sample_state()
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(tmp_path / "plain")), no_dist=True)
    with pytest.raises(NotCommittedError):
        CkptkitReader(tmp_path / "plain").read_metadata()
    # DCP turns a failed read_metadata into an AssertionError that quotes it.
    with pytest.raises(CheckpointException, match="not a committed checkpoint"):
        load_with(CkptkitReader(tmp_path / "plain"), state)
    with CheckpointManager(tmp_path) as manager, pytest.raises(NotCommittedError):
        manager.restore_dcp(blank_like(state), step=1)


def test_a_second_save_of_a_committed_checkpoint_is_refused_and_the_first_kept(tmp_path: Path) -> None:
    state = sample_state()
    dcp.save(state, storage_writer=CkptkitWriter(tmp_path / "s"), no_dist=True)
    first = read_manifest(open_store(tmp_path / "s"))
    other = {**state, "step": 13}
    with pytest.raises(CheckpointException) as caught:
        dcp.save(other, storage_writer=CkptkitWriter(tmp_path / "s"), no_dist=True)
    assert isinstance(failure_of(caught.value), CommitConflictError)
    assert read_manifest(open_store(tmp_path / "s")) == first
    assert load_with(CkptkitReader(tmp_path / "s"), state)["step"] == 12


class _FailingPlanner(DefaultSavePlanner):
    """Fails to produce the data of the first item whose name starts with ``prefix``."""

    def __init__(self, prefix: str = "model.w") -> None:
        super().__init__()
        self.prefix = prefix

    def resolve_data(self, write_item: Any) -> Any:
        if write_item.index.fqn.startswith(self.prefix):
            raise OSError("disk gone")
        return super().resolve_data(write_item)


def test_a_failed_write_commits_nothing_and_leaves_no_staging(tmp_path: Path) -> None:
    with pytest.raises(CheckpointException, match="disk gone"):
        dcp.save(
            sample_state(),
            storage_writer=CkptkitWriter(tmp_path / "run" / "f"),
            planner=_FailingPlanner(),
            no_dist=True,
        )
    assert list((tmp_path / "run").iterdir()) == []


def test_hostile_metadata_is_refused_and_nothing_runs(tmp_path: Path) -> None:
    marker = tmp_path / "metadata-ran"
    payload = pickle.dumps(_Payload(marker), protocol=4)
    # Proven live: plain pickle (what torch 2.13's FileSystemReader runs) executes it.
    live = tmp_path / "proof.pkl"
    live.write_bytes(pickle.dumps(_Payload(tmp_path / "proof-ran"), protocol=4))
    subprocess.run(
        [sys.executable, "-c", f"import pickle; pickle.loads(open({str(live)!r}, 'rb').read())"], check=True
    )
    assert (tmp_path / "proof-ran").exists()

    root = open_store(tmp_path / "run")
    commit_dcp_files(root, "evil", {".metadata": payload})
    with pytest.raises(UnsafeContentError) as caught:
        CkptkitReader(tmp_path / "run" / "evil").read_metadata()
    assert caught.value.globals == ["posix.system"]
    with pytest.raises(CheckpointException, match=r"refused.*posix\.system"):
        load_with(CkptkitReader(tmp_path / "run" / "evil"), sample_state())
    with CheckpointManager(tmp_path / "run") as manager, pytest.raises(UnsafeContentError):
        manager.restore_dcp(sample_state())  # the manager raises ckptkit's own error
    assert not marker.exists()


def test_a_real_metadata_object_carrying_a_payload_is_refused(tmp_path: Path) -> None:
    from torch.distributed.checkpoint.metadata import Metadata

    # Vetted classes all the way down, but one value inside would run os.system when unpickled.
    hostile = pickle.dumps(
        Metadata(state_dict_metadata={}, planner_data=_Payload(tmp_path / "ran")), protocol=4
    )
    with pytest.raises(UnsafeContentError) as caught:
        load_metadata(hostile, "x/.metadata")
    assert caught.value.globals == ["posix.system"]
    assert not (tmp_path / "ran").exists()


def test_a_bytes_item_that_would_run_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "bytes-ran"
    state = {"w": torch.ones(3), "extra": _Payload(marker)}
    dcp.save(state, storage_writer=CkptkitWriter(tmp_path / "b"), no_dist=True)
    assert not marker.exists()
    out = {"w": torch.zeros(3), "extra": None}
    with pytest.raises(CheckpointException) as caught:
        dcp.load(out, storage_reader=CkptkitReader(tmp_path / "b"), no_dist=True)
    error = failure_of(caught.value)
    assert isinstance(error, UnsafeContentError) and "extra" in str(error)
    assert not marker.exists()
    # Proven live: DCP's own reader of the same files runs it (in a child, to keep it contained).
    script = (
        "import torch.distributed.checkpoint as d, warnings; warnings.simplefilter('ignore'); "
        f"d.load({{'w': __import__('torch').zeros(3), 'extra': None}}, "
        f"storage_reader=d.FileSystemReader({str(tmp_path / 'b')!r}), no_dist=True)"
    )
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True)
    assert marker.exists()


def test_writer_and_reader_pickle_without_their_open_stores(tmp_path: Path) -> None:
    state = sample_state()
    writer = CkptkitWriter(tmp_path / "p1", digest="sha256")
    dcp.save(state, storage_writer=writer, no_dist=True)
    copy = pickle.loads(pickle.dumps(writer))
    copy.reset(tmp_path / "p2")
    dcp.save(state, storage_writer=copy, no_dist=True)
    manifest = read_manifest(open_store(tmp_path / "p2"))
    assert {e.algorithm for e in manifest.files} == {"sha256-tree"}

    reader = CkptkitReader(tmp_path / "p2")
    load_with(reader, state)
    assert same(load_with(pickle.loads(pickle.dumps(reader)), state), state)


def test_manager_drives_dcp_checkpoints_with_retention_and_restore(tmp_path: Path) -> None:
    states = {}
    with CheckpointManager(tmp_path / "run", keep_last=2) as manager:
        for step in (1, 2, 3):
            states[step] = {**sample_state(), "step": step}
            info = manager.save_dcp(step, states[step], metrics={"loss": 1.0 / step})
            assert info.committed and info.step == step and info.manifest.layout == "dcp"
        assert [c.step for c in manager.list()] == [2, 3]
        out = blank_like(states[3])
        out["step"], out["groups"] = 0, [{"lr": 0.0, "betas": (0.0, 0.0)}]
        restored = manager.restore_dcp(out)
        assert restored.step == 3 and same(out, states[3])
        manager.restore_dcp(out, step=2)
        assert same(out, states[2])
        assert manager.attest(model=out["model"]).compared == {"model": 2}  # against step 2, restored last
        stale = manager.attest(model=blank_like(states[2]["model"]), strict=False)
        assert [str(d) for d in stale.differences] == ["model.w: values differ", "model.b: values differ"]
        with pytest.raises(NotCommittedError):
            manager.restore_dcp(out, step=1)


def test_manager_save_dcp_that_fails_leaves_nothing(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path / "run") as manager:
        with pytest.raises(CheckpointException):
            manager.save_dcp(1, sample_state(), planner=_FailingPlanner())
        assert manager.list() == []
    assert list((tmp_path / "run").iterdir()) == []


def test_cli_ls_verify_inspect_convert_treat_a_committed_dcp_checkpoint_as_first_class(
    tmp_path: Path,
) -> None:
    state = sample_state()
    dcp.save(state, storage_writer=CkptkitWriter(tmp_path / "run" / "step-00000005", step=5), no_dist=True)
    ls = subprocess.run(
        [*CLI, "ls", "--long", "--json", str(tmp_path / "run")], capture_output=True, text=True
    )
    assert ls.returncode == 0, ls.stderr
    (listed,) = json.loads(ls.stdout)
    assert listed["status"] == "committed" and listed["step"] == 5 and listed["layout"] == "dcp"
    verify = subprocess.run([*CLI, "verify", str(tmp_path / "run")], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    inspect = subprocess.run(
        [*CLI, "inspect", str(tmp_path / "run" / "step-00000005")], capture_output=True, text=True
    )
    assert inspect.returncode == 0 and "(dcp)" in inspect.stdout, inspect.stderr
    out = tmp_path / "model.safetensors"
    convert = subprocess.run(
        [*CLI, "convert", str(tmp_path / "run" / "step-00000005"), str(out), "--to", "safetensors"],
        capture_output=True,
        text=True,
    )
    assert convert.returncode == 0, convert.stdout + convert.stderr
    from safetensors.torch import load_file

    converted = load_file(out)
    assert same(converted["model.w"], state["model"]["w"]) and same(converted["t"], state["t"].contiguous())


@pytest.mark.slow  # the moto server
def test_round_trip_on_s3_and_a_flipped_bit_there(s3_bucket: str) -> None:
    state = sample_state()
    url = f"{s3_bucket}/run/step-00000001"
    dcp.save(state, storage_writer=CkptkitWriter(url, step=1, thread_count=2), no_dist=True)
    store = open_store(url)
    manifest = read_manifest(store)
    assert manifest.layout == "dcp" and all(e.path.startswith("ckptkit-") for e in manifest.files)
    assert same(load_with(CkptkitReader(url), state), state)

    key = next(e.path for e in manifest.files if e.path.endswith("__0_1.distcp"))
    data = bytearray(store.get(key))
    data[7] ^= 0x80
    store.put(key, bytes(data))
    with pytest.raises(CheckpointException) as caught:
        load_with(CkptkitReader(url), state)
    error = failure_of(caught.value)
    assert isinstance(error, ChecksumMismatchError) and error.path.endswith("__0_1.distcp")


# --- a killed async_save ------------------------------------------------------------------------------

KILL_SCRIPT = """
import sys, warnings, time
warnings.simplefilter("ignore")
import torch, torch.distributed.checkpoint as dcp
from ckptkit.integrations.dcp import CkptkitWriter
gen = torch.Generator().manual_seed(int(sys.argv[2]))
state = {f"w{i}": torch.randn(1 << 22, generator=gen) for i in range(12)}
future = dcp.async_save(state, storage_writer=CkptkitWriter(sys.argv[1]), no_dist=True)
print("staged", flush=True)
for t in state.values():
    t.add_(1.0)
future.result()
print("committed", flush=True)
time.sleep(60)
"""


@pytest.mark.slow  # 5 children that each import torch and write 200 MB
def test_a_killed_async_save_leaves_no_commit_or_a_whole_one(tmp_path: Path) -> None:
    outcomes = []
    for trial, delay in enumerate((0.0, 0.15, 0.4, 0.8, 1.5)):
        target = tmp_path / "run" / f"step-{trial}"
        child = subprocess.Popen(
            [sys.executable, "-c", KILL_SCRIPT, str(target), str(trial)], stdout=subprocess.PIPE, text=True
        )
        assert child.stdout is not None and child.stdout.readline().strip() == "staged"
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        child.wait()
        store = open_store(target)
        try:
            read_manifest(store)
        except NotCommittedError:
            outcomes.append("none")
            with pytest.raises(NotCommittedError):
                CkptkitReader(target).read_metadata()
            assert not (tmp_path / "run" / f"step-{trial}").exists()  # only the staging sibling
            continue
        outcomes.append("whole")
        gen = torch.Generator().manual_seed(trial)
        expected = {f"w{i}": torch.randn(1 << 22, generator=gen) for i in range(12)}
        out = {k: torch.zeros_like(v) for k, v in expected.items()}
        dcp.load(out, storage_reader=CkptkitReader(target), no_dist=True)
        assert same(out, expected)
    assert "none" in outcomes  # at least one kill landed mid-write


# --- FSDP2 on gloo: save on 2 ranks, load on 1, 2 and 4 --------------------------------------------------

Scenario = Callable[[int, int, dict[str, str]], dict[str, Any]]


def _rank_main(scenario: Scenario, rank: int, world: int, port: int, paths: dict[str, str], out: str) -> None:
    os.environ.update(rank_environment(rank, world, port))
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=dt.timedelta(seconds=120))
    result: dict[str, Any] = {"rank": rank}
    try:
        result.update(scenario(rank, world, paths))
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
    Path(out, f"result_{world}_{rank}.json").write_text(json.dumps(result))
    sys.stdout.flush()
    os._exit(0)  # skip teardown collectives: a peer may have failed


def run_ranks(
    scenario: Scenario, world: int, paths: dict[str, str], out: Path, timeout_s: float = 240
) -> list[Any]:
    ctx = multiprocessing.get_context("fork")
    port = free_port()
    procs = [
        ctx.Process(target=_rank_main, args=(scenario, r, world, port, paths, str(out))) for r in range(world)
    ]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join()
    results = []
    for rank in range(world):
        path = out / f"result_{world}_{rank}.json"
        results.append(json.loads(path.read_text()) if path.exists() else {"error": "no result"})
    return results


def _fsdp_model(world: int, seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(7, 14), torch.nn.ReLU(), torch.nn.Linear(14, 3))
    mesh = init_device_mesh("cpu", (world,))
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.01)


def _state(model: torch.nn.Module, optim: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optim)
    return {"model": model_state, "optim": optim_state}


def save_on_two_ranks(rank: int, world: int, paths: dict[str, str]) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

    model, optim = _fsdp_model(world, seed=0)
    gen = torch.Generator().manual_seed(10 + rank)
    for _ in range(2):  # real Adam moments, different data per rank
        model(torch.randn(5, 7, generator=gen)).pow(2).sum().backward()
        optim.step()
        optim.zero_grad()
    state = _state(model, optim)
    dcp.save(state, storage_writer=dcp.FileSystemWriter(paths["plain"]))
    dcp.save(state, storage_writer=CkptkitWriter(paths["local"], step=2))
    dcp.save(state, storage_writer=CkptkitWriter(paths["s3"], step=2))
    future = dcp.async_save(
        state,
        storage_writer=CkptkitWriter(paths["process"]),
        async_checkpointer_type=AsyncCheckpointerType.PROCESS,
    )
    future.result()
    # A rank that fails: nothing is committed, and the manager removes what was staged.
    manager = CheckpointManager(paths["managed"])
    planner = _FailingPlanner("model.") if rank == 1 else None
    try:
        manager.save_dcp(1, state, planner=planner)
        failed = None
    except CheckpointException as exc:
        failed = str(exc)
    info = manager.save_dcp(2, state)
    manager.close()
    # Last, as it changes the model: the next step runs while the thread-mode save writes.
    future = dcp.async_save(state, storage_writer=CkptkitWriter(paths["thread"]))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1000.0)
    future.result()
    return {"failed": failed, "managed_step": info.step}


def load_everywhere(rank: int, world: int, paths: dict[str, str]) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    loaded = {}
    for variant in ("local", "s3", "thread", "process", "managed"):
        model, optim = _fsdp_model(world, seed=99)  # another init: every value must come from the load
        state = _state(model, optim)
        if variant == "managed":
            CheckpointManager(paths["managed"]).restore_dcp(state)
        else:
            dcp.load(state, storage_reader=CkptkitReader(paths[variant]))
        set_state_dict(model, optim, model_state_dict=state["model"], optim_state_dict=state["optim"])
        full = get_state_dict(model, optim, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            path = Path(paths["out"], f"loaded_{world}_{variant}.pt")
            torch.save({"model": full[0], "optim": full[1]}, path)
            loaded[variant] = str(path)
    return {"loaded": loaded}


@pytest.mark.slow  # forks 2, then 1, 2 (in the save run) and 4 gloo ranks
def test_fsdp2_state_saved_on_two_ranks_loads_bit_exact_on_one_two_and_four(
    tmp_path: Path, s3_bucket: str
) -> None:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    paths = {
        "plain": str(tmp_path / "plain"),
        "local": str(tmp_path / "run" / "step-00000002"),
        "s3": f"{s3_bucket}/run/step-00000002",
        "thread": str(tmp_path / "thread"),
        "process": str(tmp_path / "process"),
        "managed": str(tmp_path / "managed"),
        "out": str(tmp_path),
    }
    saved = run_ranks(save_on_two_ranks, 2, paths, tmp_path)
    assert all("error" not in r for r in saved), [r.get("error") for r in saved]
    assert all(r["failed"] and "disk gone" in r["failed"] for r in saved)
    assert [c.step for c in CheckpointManager(paths["managed"]).list()] == [2]
    assert sorted(os.listdir(paths["managed"])) == ["step-00000002"]  # the failed save left nothing
    manifest = read_manifest(open_store(paths["local"]))
    assert manifest.topology["world_size"] == 2 and {r["rank"] for r in manifest.topology["ranks"]} == {0, 1}

    dcp_to_torch_save(paths["plain"], tmp_path / "reference.pt")
    reference = torch.load(tmp_path / "reference.pt", weights_only=True)
    assert reference["optim"]["state"], "the reference must hold Adam moments"
    # DCP's own converter reads ckptkit's local checkpoint too, to the same values.
    dcp_to_torch_save(paths["local"], tmp_path / "ours.pt")
    assert same(torch.load(tmp_path / "ours.pt", weights_only=True), reference)

    for world in (1, 2, 4):
        results = run_ranks(load_everywhere, world, paths, tmp_path)
        assert all("error" not in r for r in results), [r.get("error") for r in results]
        for variant, path in results[0]["loaded"].items():
            loaded = torch.load(path, weights_only=True)
            assert same(loaded["model"], reference["model"]), (world, variant)
            assert same(loaded["optim"]["state"], reference["optim"]["state"]), (world, variant)
            assert same(loaded["optim"]["param_groups"], reference["optim"]["param_groups"]), (world, variant)
