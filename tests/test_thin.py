"""Thinning: old checkpoints made weights-only in place, by retention or ``ckptkit thin``.

What must hold: a thinned checkpoint verifies (every file it lists, nothing else left) and loads
its kept keys bit for bit; the optimizer's bytes leave the disk (hard-linked blobs counted once);
``restore()`` resumes from the newest checkpoint that still can; a crash at any moment of a
thin leaves the old checkpoint or the thinned one, whole, and ``gc`` removes the rest.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

import ckptkit
from ckptkit import CheckpointManager
from ckptkit.catalog import THINNED, list_checkpoints, read_manifest
from ckptkit.cli.main import cli
from ckptkit.errors import NotThinnableError
from ckptkit.manifest import BLOB_DIR
from ckptkit.ops.gc import collect_garbage, find_debris
from ckptkit.ops.index import index_checkpoint
from ckptkit.ops.thin import leftovers_of_thinning, thin_checkpoint
from ckptkit.ops.verify import verify_checkpoint
from ckptkit.retention import RetentionPolicy
from ckptkit.storage import Store, open_store
from tests import thin_crash_worker

# --- a model + AdamW run ----------------------------------------------------------------------


class Run:
    """A small model trained one AdamW step per save; each save's model kept for comparison.
    The first layer's weight is 1 MiB: a shard (a blob) of its own in a deduplicated save."""

    def __init__(self, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.Linear(1024, 16))
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-2)
        self.models: dict[int, dict[str, torch.Tensor]] = {}

    def state(self, step: int) -> dict[str, Any]:
        self.optimizer.zero_grad()
        self.model(torch.randn(4, 256)).square().sum().backward()
        self.optimizer.step()
        self.models[step] = {k: v.clone() for k, v in self.model.state_dict().items()}
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": step}

    def optimizer_bytes(self) -> int:
        """The tensor bytes of one save's optimizer state (exp_avg, exp_avg_sq, step)."""
        state = self.optimizer.state_dict()["state"]
        return sum(t.nbytes for s in state.values() for t in s.values() if isinstance(t, torch.Tensor))


def disk_usage(path: Path) -> int:
    """Bytes of the regular files below ``path``, each inode once (a blob and its hard links)."""
    seen: dict[tuple[int, int], int] = {}
    for directory, _dirs, files in os.walk(path):
        for name in files:
            info = os.stat(os.path.join(directory, name))
            seen[(info.st_dev, info.st_ino)] = info.st_size
    return sum(seen.values())


def saves(root: Path, steps: int, **options: Any) -> Run:
    run = Run()
    manager = CheckpointManager(root, **options)
    for step in range(1, steps + 1):
        manager.save(step, run.state(step))
    manager.close()
    return run


def assert_whole(store: Store, name: str) -> None:
    report = verify_checkpoint(store.child(name))
    assert report.ok and report.findings == [], (name, report.findings)


def assert_model(path: Path | str, expected: dict[str, torch.Tensor], keys: list[str]) -> None:
    loaded = ckptkit.load(path)
    assert sorted(loaded) == keys
    assert loaded["model"].keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(loaded["model"][name], tensor), name


# --- retention: keep_optimizer_last ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("dedup", "keep_last", "kept", "resumable"),
    [
        pytest.param(False, None, 8, 2, id="plain"),
        # Two runs of eight saves each: a few seconds on a loaded machine.
        pytest.param(True, None, 8, 2, id="dedup", marks=pytest.mark.slow),
        pytest.param(True, 5, 5, 2, id="dedup-keep_last=5", marks=pytest.mark.slow),
    ],
)
def test_keep_optimizer_last_thins_the_older_checkpoints(
    tmp_path: Path, dedup: bool, keep_last: int | None, kept: int, resumable: int
) -> None:
    run = saves(tmp_path / "thin", 8, dedup=dedup, keep_last=keep_last, keep_optimizer_last=2)
    saves(tmp_path / "full", 8, dedup=dedup, keep_last=keep_last)
    store = open_store(tmp_path / "thin")
    listed = [c for c in list_checkpoints(store) if c.committed]
    assert [c.step for c in listed] == list(range(9 - kept, 9))
    assert [c.resumable for c in listed] == [False] * (kept - resumable) + [True] * resumable
    for info in listed:
        assert_whole(store, info.name)
        thinned = not info.resumable
        assert_model(tmp_path / "thin" / info.name, run.models[info.step],
                     ["model"] if thinned else ["model", "optimizer", "step"])
        if thinned:
            record = info.manifest.metadata[THINNED]
            assert record["kept"] == ["model"] and record["dropped"]
    # The optimizer state of every thinned checkpoint left the disk, and little else did.
    saved = disk_usage(tmp_path / "full") - disk_usage(tmp_path / "thin")
    optimizer = (kept - resumable) * run.optimizer_bytes()
    assert optimizer <= saved <= optimizer + (kept - resumable) * (64 << 10)
    if dedup:  # released by the blob sweep, not only unlinked from the checkpoint directories
        blobs = tmp_path / "thin" / BLOB_DIR
        present = {str(p.relative_to(blobs)) for p in blobs.rglob("*") if p.is_file()}
        assert present == {e.blob for c in listed for e in c.manifest.files if e.blob}


def test_restore_resumes_from_the_newest_resumable(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run = saves(tmp_path, 4, keep_optimizer_last=2)
    thin_checkpoint(open_store(tmp_path), "step-00000004")  # by hand: the newest is weights-only now
    manager = CheckpointManager(tmp_path, keep_optimizer_last=2)
    with caplog.at_level(logging.INFO, logger="ckptkit.manager"):
        state = manager.restore()
    assert state["step"] == 3 and set(state) == {"model", "optimizer", "step"}
    assert all(torch.equal(state["model"][k], v) for k, v in run.models[3].items())
    assert "step-00000003" in caplog.text and "newer ones are thinned" in caplog.text
    assert set(manager.restore(step=4)) == {"model"}  # a thinned one still loads by its step
    assert set(manager.restore(step=1, keys=["model"])) == {"model"}


def test_restore_with_nothing_resumable_says_so(tmp_path: Path) -> None:
    saves(tmp_path, 1)
    thin_checkpoint(open_store(tmp_path), "step-00000001")
    with pytest.raises(ckptkit.errors.NotCommittedError, match="1 thinned to weights only"):
        CheckpointManager(tmp_path).restore()


def test_select_thinned_never_thins_twice_nor_the_newest() -> None:
    policy = RetentionPolicy(keep_optimizer_last=2, keep_last=4)
    assert policy.thins and policy.has_rules
    assert "thinned to model" in policy.describe()
    with pytest.raises(ValueError, match="keep_optimizer_last"):
        RetentionPolicy(keep_optimizer_last=0)
    with pytest.raises(ValueError, match="thin_keep"):
        RetentionPolicy(keep_optimizer_last=1, thin_keep=())
    assert RetentionPolicy.from_kwargs(keep_optimizer_last=1, thin_keep=["model", "ema"]).thin_keep == (
        "model", "ema",
    )


# --- thinning a native checkpoint -----------------------------------------------------------------


def test_thinning_a_dedup_checkpoint_writes_only_tree_json_and_the_mixed_small_shard(tmp_path: Path) -> None:
    run = Run()
    ckptkit.save(run.state(1), tmp_path / "step-1", dedup=True)
    # A second checkpoint shares the (frozen) model's blobs: thinning the first must keep them.
    frozen = {"model": run.model.state_dict(), "step": 2}
    ckptkit.save(frozen, tmp_path / "step-2", dedup=True)
    store = open_store(tmp_path)
    before = read_manifest(store.child("step-1"))
    report = thin_checkpoint(store, "step-1")
    after = read_manifest(store.child("step-1"))
    big = {e.blob for e in before.files if e.blob and e.size >= 1 << 20}
    model_blobs = {e.blob for e in read_manifest(store.child("step-2")).files if e.blob}
    assert {e.blob for e in after.files if e.blob} <= big | model_blobs
    names = sorted(p.rsplit("/", 1)[-1] for p in report.written)
    assert len(names) == 2 and names[0].startswith("tensors-thin-") and names[1] == "tree.json"
    assert report.bytes_written < 200_000  # the 1 MiB weight was referenced, not copied
    assert report.sweep is not None and report.sweep.skipped is None
    assert after.checkpoint_id == report.checkpoint_id != before.checkpoint_id
    assert after.metadata[THINNED]["from_checkpoint_id"] == before.checkpoint_id
    for name in ("step-1", "step-2"):
        assert_whole(store, name)
    assert_model(tmp_path / "step-1", run.models[1], ["model"])
    assert_model(tmp_path / "step-2", run.models[1], ["model", "step"])


def test_thinning_a_single_shard_checkpoint_rewrites_the_kept_entries(tmp_path: Path) -> None:
    run = Run()
    ckptkit.save(run.state(1), tmp_path / "step-1")  # one shard: model and optimizer mixed
    store = open_store(tmp_path)
    report = thin_checkpoint(store, "step-1")
    assert sorted(report.dropped) == ["tensors-00000-of-00001.safetensors", "tree.json"]
    attempt = report.written[0].split("/")[0]
    assert set(os.listdir(tmp_path / "step-1")) == {"ckptkit-manifest.json", attempt}
    assert report.bytes_dropped - report.bytes_written >= run.optimizer_bytes()
    assert_whole(store, "step-1")
    assert_model(tmp_path / "step-1", run.models[1], ["model"])
    again = thin_checkpoint(store, "step-1")  # nothing left to drop: nothing changes
    assert not again.changed and again.dropped == [] and again.checkpoint_id == report.checkpoint_id


def test_thinning_keeps_any_chosen_keys_and_refuses_a_missing_one(tmp_path: Path) -> None:
    run = Run()
    ckptkit.save(run.state(1), tmp_path / "step-1", dedup=True)
    store = open_store(tmp_path)
    manifest = read_manifest(store.child("step-1")).to_bytes()
    with pytest.raises(NotThinnableError, match="no top-level key 'ema'"):
        thin_checkpoint(store, "step-1", keep=("model", "ema"))
    assert read_manifest(store.child("step-1")).to_bytes() == manifest  # nothing changed
    thin_checkpoint(store, "step-1", keep=("model", "step"))
    assert ckptkit.load(tmp_path / "step-1")["step"] == 1
    thin_checkpoint(store, "step-1", keep=("step",))  # thinned further: the model goes too
    assert ckptkit.load(tmp_path / "step-1") == {"step": 1}
    assert_whole(store, "step-1")
    assert list((tmp_path / BLOB_DIR).rglob("*.json")) == []  # no pin left behind


@pytest.mark.slow  # moto over HTTP
def test_thinning_on_s3(s3_bucket: str) -> None:
    run = Run()
    for name, dedup in (("plain", False), ("dedup", True)):
        ckptkit.save(run.state(1), f"{s3_bucket}/run/{name}", dedup=dedup)
        store = open_store(f"{s3_bucket}/run")
        report = thin_checkpoint(store, name)
        assert_whole(store, name)
        loaded = ckptkit.load(f"{s3_bucket}/run/{name}")
        assert set(loaded) == {"model"}
        assert all(torch.equal(loaded["model"][k], v) for k, v in run.models[1].items())
        keys = {i.key for i in store.child(name).list("")}
        assert not keys & set(report.dropped)
    blobs = {i.key for i in store.child(BLOB_DIR).list("") if not i.key.startswith("pins/")}
    manifest = read_manifest(store.child("dedup"))
    assert blobs == {e.blob for e in manifest.files if e.blob}  # the optimizer's blobs released


# --- ckptkit thin, ls -l, inspect -----------------------------------------------------------------


def invoke(*args: str) -> Any:
    return CliRunner().invoke(cli, list(args))


def test_thin_cli_ls_and_inspect(tmp_path: Path) -> None:
    saves(tmp_path, 2, dedup=True)
    target = str(tmp_path / "step-00000001")
    manifest = (tmp_path / "step-00000001" / "ckptkit-manifest.json").read_bytes()
    dry = invoke("thin", target, "--dry-run", "--json")
    assert dry.exit_code == 0, dry.output
    assert "tree.json" in json.loads(dry.output)["dropped"]
    assert (tmp_path / "step-00000001" / "ckptkit-manifest.json").read_bytes() == manifest
    result = invoke("thin", target, "--keep", "model")
    assert result.exit_code == 0, result.output
    assert "dropped" in result.output and "kept model" in result.output
    listing = invoke("ls", "-l", str(tmp_path))
    assert listing.exit_code == 0
    rows = {line.split()[0]: line for line in listing.output.splitlines() if line.startswith("step-")}
    assert "weights-only" in rows["step-00000001"] and "resumable" in rows["step-00000002"]
    assert "contents" in listing.output.splitlines()[0]
    as_json = json.loads(invoke("ls", "-l", "--json", str(tmp_path)).output)
    assert [c["resumable"] for c in as_json] == [False, True]
    inspected = invoke("inspect", target)
    assert inspected.exit_code in (0, 1), inspected.output
    assert "weights-only: thinned to model" in inspected.output
    refused = invoke("thin", str(tmp_path / "step-00000002"), "--keep", "weights")
    assert refused.exit_code == 2 and "no top-level key 'weights'" in refused.output
    assert "Traceback" not in refused.output


def test_thin_cli_never_imports_torch(tmp_path: Path) -> None:
    ckptkit.save(Run().state(1), tmp_path / "step-1", dedup=True)
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from ckptkit.cli.main import cli\n"
        f"result = CliRunner().invoke(cli, ['thin', {str(tmp_path / 'step-1')!r}])\n"
        "print(result.exit_code, 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["0", "False"]  # thinned, by copying bytes: no tensor was made
    assert set(ckptkit.load(tmp_path / "step-1")) == {"model"}


# --- HF Trainer and DeepSpeed checkpoints ---------------------------------------------------------


def test_thinning_hf_trainer_checkpoints(hf_trainer_checkpoint, tmp_path: Path) -> None:
    from ckptkit.integrations.hf import apply_retention, latest_committed_checkpoint

    for step, source in hf_trainer_checkpoint.checkpoints.items():
        shutil.copytree(source, tmp_path / f"checkpoint-{step}")
        index_checkpoint(open_store(tmp_path / f"checkpoint-{step}"))
    store = open_store(tmp_path)
    old, new = (f"checkpoint-{s}" for s in sorted(hf_trainer_checkpoint.checkpoints))
    before = {p.name for p in (tmp_path / old).iterdir()}
    assert apply_retention(store, RetentionPolicy(keep_optimizer_last=1)) == []  # thins, deletes nothing
    after = {p.name for p in (tmp_path / old).iterdir()}
    assert {"optimizer.pt", "scheduler.pt"} <= before - after
    assert not any(n.startswith("rng_state") for n in after)
    assert {"trainer_state.json", "config.json"} <= after and any(n.endswith(".safetensors") for n in after)
    assert {p.name for p in (tmp_path / new).iterdir()} >= {"optimizer.pt", "scheduler.pt"}
    assert_whole(store, old)
    assert latest_committed_checkpoint(tmp_path) == str(tmp_path / new)
    thin_checkpoint(store, new)
    assert latest_committed_checkpoint(tmp_path) is None  # nothing left to resume from
    result = invoke("thin", str(tmp_path / new), "--keep", "model", "--keep", "tokenizer")
    assert result.exit_code == 2 and "keeps 'model' and any of optimizer" in result.output


def test_thinning_deepspeed_tags(deepspeed_checkpoints, tmp_path: Path) -> None:
    zero1 = deepspeed_checkpoints["z1_fp32_warmuplr"]
    shutil.copytree(zero1.tag_dir, tmp_path / zero1.tag)
    index_checkpoint(open_store(tmp_path / zero1.tag))
    result = invoke("thin", str(tmp_path / zero1.tag), "--json")
    assert result.exit_code == 0, result.output
    dropped = json.loads(result.output)["dropped"]
    assert dropped and all(p.endswith("_optim_states.pt") for p in dropped)
    left = sorted(p.name for p in (tmp_path / zero1.tag).iterdir())
    assert left == ["ckptkit-manifest.json", "mp_rank_00_model_states.pt"]
    assert_whole(open_store(tmp_path), zero1.tag)

    zero3 = deepspeed_checkpoints["z3_fp32_warmupcosine"]
    shutil.copytree(zero3.tag_dir, tmp_path / "z3")
    index_checkpoint(open_store(tmp_path / "z3"))
    files = sorted(p.name for p in (tmp_path / "z3").iterdir())
    refused = invoke("thin", str(tmp_path / "z3"))
    assert refused.exit_code == 2 and "ckptkit consolidate" in refused.output
    assert sorted(p.name for p in (tmp_path / "z3").iterdir()) == files


# --- crashes ----------------------------------------------------------------------------------


def _checkpoint_for_crashes(url: str, state: dict[str, Any], dedup: bool) -> str:
    """Without dedup, a one-shard checkpoint whose thinning copies its model entries (long
    enough to be hit); with it, checkpoints that share every blob, which the sweep must keep."""
    ckptkit.save(state, url, dedup=dedup)
    return read_manifest(open_store(url)).checkpoint_id


def _assert_old_or_thinned(root: Store, name: str, old_id: str, run: Run) -> bool:
    manifest = read_manifest(root.child(name))
    thinned = manifest.checkpoint_id != old_id
    if thinned:
        assert manifest.metadata[THINNED]["from_checkpoint_id"] == old_id
    report = verify_checkpoint(root.child(name))
    assert report.ok, report.findings  # leftovers are warnings ("unlisted"), never errors
    loaded = ckptkit.load(f"{root.url}/{name}")
    assert sorted(loaded) == (["model"] if thinned else ["model", "optimizer", "step"])
    assert all(torch.equal(loaded["model"][k], v) for k, v in run.models[1].items())
    return thinned


def _kill_thins(context: Any, url: str, trials: int, seed: int, *, dedup: bool = False) -> None:
    rng = random.Random(seed)
    root = open_store(url)
    run = Run()
    names = [f"c{i}" for i in range(trials)]
    state = run.state(1)
    ids = {name: _checkpoint_for_crashes(f"{url}/{name}", state, dedup) for name in names}
    window = 0.0
    outcomes = {"old": 0, "thinned": 0}
    for trial, name in enumerate(names):
        ready = context.Event()
        child = context.Process(target=thin_crash_worker.thin, args=(url, name, ready))
        child.start()
        assert ready.wait(60), "worker did not start"
        if trial == 0:  # one uninterrupted thin, as a child does it: how long the window is
            started = time.perf_counter()
            child.join(60)
            window = 1.3 * (time.perf_counter() - started)
            continue
        time.sleep(rng.uniform(0.0, window))
        child.kill()
        child.join()
        thinned = _assert_old_or_thinned(root, name, ids[name], run)
        outcomes["thinned" if thinned else "old"] += 1
    collect_garbage(root, grace_seconds=0)
    assert find_debris(root) == []
    for name in names:
        manifest = read_manifest(root.child(name))
        assert leftovers_of_thinning(root.child(name), manifest) == []
        _assert_old_or_thinned(root, name, ids[name], run)
        assert_whole(root, name)  # no warning left either: gc removed every leftover
        thin_checkpoint(root, name)  # whichever it was, it thins (again: a no-op) cleanly
        assert_whole(root, name)
    assert outcomes["old"] and outcomes["thinned"], outcomes  # kills landed before and after the swap


@pytest.mark.slow
def test_sigkill_while_thinning_local(forkserver, tmp_path: Path) -> None:
    _kill_thins(forkserver, str(tmp_path / "run"), trials=12, seed=3)


@pytest.mark.slow
def test_sigkill_while_thinning_local_dedup(forkserver, tmp_path: Path) -> None:
    _kill_thins(forkserver, str(tmp_path / "run"), trials=12, seed=5, dedup=True)


@pytest.mark.slow
def test_sigkill_while_thinning_s3(forkserver, s3_bucket: str) -> None:
    _kill_thins(forkserver, f"{s3_bucket}/run", trials=8, seed=4)
