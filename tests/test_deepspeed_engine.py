"""ckptkit's DeepSpeed checkpoint engine with real 2-rank ZeRO-2 fp16 training on CPU, saving to S3 (moto).

One test runs the crash story end to end, because each DeepSpeed run costs seconds: a run whose
rank 1 is SIGKILLed inside the save of global_step5 (after writing its file), a restart that
resumes from the last committed tag, and an uninterrupted reference run it must match exactly.
Another runs the same story with non-blocking saves, rank 1 killed in the background.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ckptkit.catalog import list_checkpoints, read_manifest
from ckptkit.errors import NotCommittedError
from ckptkit.ops.verify import verify_checkpoint
from ckptkit.storage import open_store
from tests import ds_engine_worker as worker


@pytest.fixture(scope="module")
def deepspeed_parent() -> None:
    worker.prepare()


def _result(out: Path, rank: int) -> dict[str, Any]:
    return json.loads((out / f"result_rank{rank}.json").read_text())


def _assert_same(a: Any, b: Any, where: str = "") -> None:
    import torch

    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.slow  # three 2-rank DeepSpeed runs, one SIGKILLed
def test_kill_during_save_then_resume_matches_uninterrupted(
    deepspeed_parent: None, s3_bucket: str, tmp_path: Path
) -> None:
    import torch

    root_url = f"{s3_bucket}/run"
    killed, resumed, reference = (tmp_path / name for name in ("killed", "resumed", "reference"))
    for out in (killed, resumed, reference):
        out.mkdir()

    # 1. Save global_step3, train on, and lose rank 1 inside the save of global_step5.
    codes = worker.run(
        worker.Scenario(root_url, str(killed), total_steps=5, save_at=[3, 5], kill_tag="global_step5")
    )
    assert codes == [worker.EXIT_COMMIT_ERROR, -9]
    survivor = _result(killed, 0)
    assert survivor["saved"] == ["global_step3"]
    assert "global_step5: not committed" in survivor["commit_error"]

    root = open_store(root_url)
    committed = {c.name: c for c in list_checkpoints(root) if c.committed}
    assert set(committed) == {"global_step3"}
    assert root.get("latest") == b"global_step3"
    manifest = read_manifest(root.child("global_step3"))
    assert manifest.layout == "deepspeed" and manifest.step == 3
    assert manifest.topology == {"world_size": 2, "dp_world_size": 2, "mp_world_size": 1, "zero_stage": 2}
    assert sorted(f.path.split("/")[-1] for f in manifest.files) == [
        "mp_rank_00_model_states.pt",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]
    assert verify_checkpoint(root.child("global_step3")).status == "ok"
    assert verify_checkpoint(root.child("global_step5")).status == "not-committed"

    # 2. Restart: both ranks resume from the last committed tag and train to step 6.
    assert worker.run(worker.Scenario(root_url, str(resumed), total_steps=6, save_at=[6], resume=True)) == [
        0,
        0,
    ]
    for rank in (0, 1):
        loaded = _result(resumed, rank)["loaded"]
        assert loaded["url"].endswith("/run/global_step3") and loaded["global_steps"] == 3
        assert loaded["client_state"]["my_step"] == 3
    committed = {c.name for c in list_checkpoints(open_store(root_url)) if c.committed}
    assert committed == {"global_step3", "global_step6"}
    assert root.get("latest") == b"global_step6"

    # 3. The same 6 steps uninterrupted, saving nowhere: everything must be bit-identical.
    assert worker.run(worker.Scenario(str(tmp_path / "unused"), str(reference), total_steps=6)) == [0, 0]
    for rank in (0, 1):
        got = torch.load(resumed / f"final_rank{rank}.pt", weights_only=False)
        want = torch.load(reference / f"final_rank{rank}.pt", weights_only=False)
        assert got["global_steps"] == 6 and got["loss_scaler"]["dynamic"]
        assert got["loss_scaler"]["cur_scale"] != 256.0  # the dynamic scale moved since its start
        _assert_same(got, want, f"rank{rank}")


def test_resolve_tag_never_trusts_latest(tmp_path: Path) -> None:
    from ckptkit.commit import CheckpointTransaction
    from ckptkit.integrations.deepspeed import resolve_tag

    root = open_store(tmp_path / "root")
    assert resolve_tag(root) is None
    for step in (1, 2):
        with CheckpointTransaction(root, f"global_step{step}") as tx:
            tx.write("mp_rank_00_model_states.pt", b"x" * step)
            tx.commit(step=step, layout="deepspeed")
    # An interrupted save: files of global_step3 but no manifest, and a `latest` naming it.
    root.put("global_step3/mp_rank_00_model_states.pt", b"partial")
    root.put("latest", b"global_step3")
    assert resolve_tag(root) == "global_step2"  # not the uncommitted target of `latest`
    root.put("latest", b"global_step1")
    assert resolve_tag(root) == "global_step1"  # a committed target of `latest` is honoured
    with pytest.raises(NotCommittedError):
        resolve_tag(root, "global_step3")


@pytest.mark.slow  # three 2-rank DeepSpeed runs, one SIGKILLed inside a background save
def test_non_blocking_saves_snapshot_their_step_and_a_killed_one_commits_nothing(
    deepspeed_parent: None, tmp_path: Path
) -> None:
    import torch

    root_url = str(tmp_path / "ckpt")
    killed, resumed, reference = (tmp_path / name for name in ("killed", "resumed", "reference"))
    for out in (killed, resumed, reference):
        out.mkdir()

    # 1. Non-blocking saves at steps 3 and 5, each sleeping 1 s in the background before it writes:
    #    steps 4 and 5 update the weights and moments in place while global_step3 is in flight.
    #    Rank 1 is SIGKILLed in the background after writing its files of global_step5.
    codes = worker.run(
        worker.Scenario(
            root_url, str(killed), total_steps=5, save_at=[3, 5], kill_tag="global_step5",
            blocking=False, background_delay_s=1.0,
        )
    )
    assert codes == [worker.EXIT_COMMIT_ERROR, -9]
    survivor = _result(killed, 0)
    assert survivor["saved"] == ["global_step3", "global_step5"]
    assert survivor["done_at_return"] == [False, False]  # both returned before their commit
    # The background failure reached the caller, at engine.wait() after the loop.
    assert "global_step5: not committed" in survivor["commit_error"]

    root = open_store(root_url)
    assert {c.name for c in list_checkpoints(root) if c.committed} == {"global_step3"}
    assert root.get("latest") == b"global_step3"
    manifest = read_manifest(root.child("global_step3"))
    assert manifest.step == 3  # taken when the save began, not when the background committed
    assert manifest.topology == {"world_size": 2, "dp_world_size": 2, "mp_world_size": 1, "zero_stage": 2}
    assert verify_checkpoint(root.child("global_step3")).status == "ok"
    assert verify_checkpoint(root.child("global_step5")).status == "not-committed"

    # 2. global_step3 loads equal, bit for bit, to the state of a run that stopped at step 3.
    assert worker.run(worker.Scenario(root_url, str(resumed), total_steps=3, resume=True)) == [0, 0]
    assert worker.run(worker.Scenario(str(tmp_path / "unused"), str(reference), total_steps=3)) == [0, 0]
    for rank in (0, 1):
        assert _result(resumed, rank)["loaded"]["global_steps"] == 3
        got = torch.load(resumed / f"final_rank{rank}.pt", weights_only=False)
        want = torch.load(reference / f"final_rank{rank}.pt", weights_only=False)
        assert got["global_steps"] == 3
        _assert_same(got, want, f"rank{rank}")


@pytest.mark.slow  # two 2-rank DeepSpeed runs
def test_deduplicated_saves_verify_and_resume_with_attestation(
    deepspeed_parent: None, tmp_path: Path
) -> None:
    """``use_ckptkit(dedup=True)``: every rank file is a blob of the root's blob store (hard-linked
    into the tag directory on local disk), and the resume reads them through the manifest."""
    root_url, saved, resumed = str(tmp_path / "run"), tmp_path / "saved", tmp_path / "resumed"
    saved.mkdir(), resumed.mkdir()
    scenario = worker.Scenario(root_url, str(saved), total_steps=3, save_at=[2, 3], dedup=True)
    assert worker.run(scenario) == [0, 0]
    root = open_store(root_url)
    for tag in ("global_step2", "global_step3"):
        manifest = read_manifest(root.child(tag))
        assert manifest.schema_version == 3 and all(e.blob is not None for e in manifest.files)
        assert verify_checkpoint(root.child(tag)).status == "ok"
    # The resume attests (Scenario.resume): what the engine holds is what was saved.
    scenario = worker.Scenario(root_url, str(resumed), total_steps=4, save_at=[4], resume=True, dedup=True)
    assert worker.run(scenario) == [0, 0]
    for rank in (0, 1):
        loaded = _result(resumed, rank)["loaded"]
        assert loaded["url"].endswith("/run/global_step3") and loaded["global_steps"] == 3
