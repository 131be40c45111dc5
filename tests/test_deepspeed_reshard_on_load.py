"""Reshard on load: ``use_ckptkit`` + ``engine.load_checkpoint`` at another data-parallel world size.

Real DeepSpeed (fp16, dynamic loss scale, WarmupLR) on CPU ranks: a run saves through ckptkit at
N ranks; a second run at M ranks loads it through the same checkpoint engine. DeepSpeed alone
raises at a changed world size; here every rank is served the rank files DeepSpeed would have
written at M, read from the byte ranges of the saved partitions. The fp32 masters and Adam
moments the live M-rank engine holds must equal the N-rank engine's bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests import ds_engine_worker as worker

# Everything but the per-rank partition (its layout is what changed) must survive exactly.
_CARRIED = (
    "fp32", "fp16", "exp_avg", "exp_avg_sq", "lr_scheduler", "loss_scaler", "global_steps", "global_samples",
    "skipped_steps",
)


@pytest.fixture(scope="module")
def deepspeed_parent() -> None:
    worker.prepare()


def _result(out: Path, rank: int) -> dict[str, Any]:
    return json.loads((out / f"result_rank{rank}.json").read_text())


def _final(out: Path, rank: int) -> dict[str, Any]:
    import torch

    return torch.load(out / f"final_rank{rank}.pt", weights_only=False)


def _assert_equal(a: Any, b: Any, where: str) -> None:
    import torch

    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for key in a:
            _assert_equal(a[key], b[key], f"{where}/{key}")
    else:
        assert a == b, where


@pytest.mark.slow  # two multi-rank DeepSpeed runs per case
@pytest.mark.parametrize(
    ("stage", "saved_world", "load_world", "on_s3"),
    [(2, 2, 3, True), (3, 3, 2, False), (1, 2, 1, False)],
    ids=["zero2-2to3-s3", "zero3-3to2-local", "zero1-2to1-local"],
)
def test_load_at_another_world_size_restores_exactly(
    deepspeed_parent: None,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    stage: int,
    saved_world: int,
    load_world: int,
    on_s3: bool,
) -> None:
    root = f"{request.getfixturevalue('s3_bucket')}/run" if on_s3 else str(tmp_path / "run")
    saved, loaded = tmp_path / "saved", tmp_path / "loaded"
    saved.mkdir()
    loaded.mkdir()

    save_run = worker.Scenario(root, str(saved), total_steps=3, save_at=[3], zero_stage=stage)
    assert worker.run(save_run, world=saved_world) == [0] * saved_world
    # total_steps 5: load global_step3, then train two more steps at the new world size.
    load_run = worker.Scenario(root, str(loaded), total_steps=5, resume=True, zero_stage=stage)
    load_only = worker.Scenario(root, str(tmp_path / "at-load"), total_steps=3, resume=True, zero_stage=stage)
    (tmp_path / "at-load").mkdir()
    assert worker.run(load_only, world=load_world) == [0] * load_world
    logs = [_result(tmp_path / "at-load", rank)["log"] for rank in range(load_world)]
    expected = (
        f"was saved by {saved_world} data-parallel ranks; resharding its ZeRO-{stage} state on load "
        f"for {load_world} ranks (each rank reads only its own partitions)"
    )
    assert len(logs[0]) == 1 and logs[0][0].endswith(expected)  # one line, from rank 0 only
    assert all(not lines for lines in logs[1:])

    want = _final(saved, 0)
    for rank in range(load_world):
        got = _final(tmp_path / "at-load", rank)
        for key in _CARRIED:
            _assert_equal(got[key], want[key], f"rank{rank}/{key}")

    # Training goes on at the new size: the scheduler and loss scale continue from the save.
    assert worker.run(load_run, world=load_world) == [0] * load_world
    after = _final(loaded, 0)
    assert after["global_steps"] == 5
    assert after["lr_scheduler"]["last_batch_iteration"] == want["lr_scheduler"]["last_batch_iteration"] + 2


# --- the rank files served on load, without an engine -------------------------------------------------


def _committed_tag(deepspeed_checkpoints: Any, name: str, tmp_path: Path) -> tuple[Any, Any]:
    """A copy of a fixture's tag directory, committed in place by ``ckptkit index``."""
    import shutil

    from ckptkit.catalog import read_manifest
    from ckptkit.ops.index import index_checkpoint
    from ckptkit.storage import open_store

    case = deepspeed_checkpoints[name]
    shutil.copytree(case.tag_dir, tmp_path / case.tag)
    store = open_store(str(tmp_path / case.tag))
    index_checkpoint(store)
    return store, read_manifest(store)


@pytest.mark.slow  # the DeepSpeed fixtures
def test_served_rank_file_is_what_reshard_writes(deepspeed_checkpoints: Any, tmp_path: Path) -> None:
    """Each served file loads to the same objects as the file ``ckptkit reshard`` commits."""
    import torch

    from ckptkit.integrations.zero_reshard import ReshardedRankFiles
    from ckptkit.ops.reshard import reshard_zero

    store, manifest = _committed_tag(deepspeed_checkpoints, "z2_fp16_overflow", tmp_path)
    served = ReshardedRankFiles(store, manifest, world=3, stage=2)
    reshard_zero(str(tmp_path / "global_step5"), str(tmp_path / "out"), world_size=3)
    assert sorted(served.names) == sorted(p.name for p in (tmp_path / "out" / "global_step5").iterdir())
    for name in served.names:
        written = torch.load(tmp_path / "out" / "global_step5" / name, weights_only=False)
        _assert_equal_tree(served.load(name), written, name)


def _assert_equal_tree(a: Any, b: Any, where: str) -> None:
    import torch

    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for key in a:
            _assert_equal_tree(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_equal_tree(x, y, f"{where}[{i}]")
    elif hasattr(a, "__dict__") and not isinstance(a, type):
        assert type(a) is type(b), where
        _assert_equal_tree(vars(a), vars(b), where)
    else:
        assert a == b, where


@pytest.mark.slow  # the DeepSpeed fixtures
def test_a_stage_change_is_refused(deepspeed_checkpoints: Any, tmp_path: Path) -> None:
    from ckptkit.errors import FormatError
    from ckptkit.integrations.zero_reshard import ReshardedRankFiles

    store, manifest = _committed_tag(deepspeed_checkpoints, "z2_fp16_overflow", tmp_path)
    with pytest.raises(FormatError, match="saved with ZeRO stage 2, this engine runs stage 3"):
        ReshardedRankFiles(store, manifest, world=3, stage=3)


@pytest.mark.slow  # the DeepSpeed fixtures
def test_corrupt_partition_bytes_fail_the_chunk_digest(deepspeed_checkpoints: Any, tmp_path: Path) -> None:
    """A flipped byte inside a partition a new rank reads is caught by the manifest's chunk
    digest before anything is loaded (these files are one 64 MiB chunk each, so already when
    the source is opened)."""
    from ckptkit.errors import ChecksumMismatchError
    from ckptkit.integrations.zero_reshard import ReshardedRankFiles
    from ckptkit.ops.zero_source import read_zero

    store, manifest = _committed_tag(deepspeed_checkpoints, "z2_fp16_overflow", tmp_path)
    source = read_zero(store)
    piece = source.groups[0].params[-1].states["exp_avg"][0]  # on the last source rank
    path = tmp_path / "global_step5" / piece.key
    data = bytearray(path.read_bytes())
    data[piece.offset] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatchError, match=piece.key):
        served = ReshardedRankFiles(store, manifest, world=3, stage=2)
        served.load("zero_pp_rank_2_mp_rank_00_optim_states.pt")


@pytest.mark.slow  # three multi-rank DeepSpeed runs
def test_a_reshard_output_loads_through_use_ckptkit(deepspeed_parent: None, tmp_path: Path) -> None:
    """``ckptkit reshard`` commits the save dir whole (``latest`` included); ckptkit's engine loads
    it at the world size it was written for, and at another one by resharding again on load."""
    from ckptkit.ops.reshard import reshard_zero

    root, saved = tmp_path / "run", tmp_path / "saved"
    saved.mkdir()
    assert worker.run(worker.Scenario(str(root), str(saved), total_steps=3, save_at=[3]), world=2) == [0, 0]
    reshard_zero(root, tmp_path / "run-3", world_size=3)
    want = _final(saved, 0)
    for world in (3, 1):
        out = tmp_path / f"at-{world}"
        out.mkdir()
        scenario = worker.Scenario(str(tmp_path / "run-3"), str(out), total_steps=3, resume=True)
        assert worker.run(scenario, world=world) == [0] * world
        assert _result(out, 0)["loaded"]["url"] == f"{tmp_path}/run-3/global_step3"
        assert bool(_result(out, 0)["log"]) == (world != 3)  # resharded on load only at 1 rank
        for key in _CARRIED:
            _assert_equal(_final(out, 0)[key], want[key], f"ws{world}/{key}")
