"""The DeepSpeed examples, run as a user runs them: real 2-rank ZeRO-2 training on CPU, in subprocesses.

``deepspeed_story.py`` kills a run inside a save, checks the survivor with the CLI and resumes it;
``deepspeed_train.py`` is the plain save-and-resume loop, run twice. Each run costs seconds (process
start and ``import deepspeed``), so each test runs its example as few times as its claims need.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from ckptkit.catalog import list_checkpoints, read_manifest
from ckptkit.commit import STAGING_MARKER
from ckptkit.manifest import MANIFEST_NAME
from ckptkit.ops.verify import verify_tree
from ckptkit.storage import open_store

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
ZERO2_TOPOLOGY = {"world_size": 2, "dp_world_size": 2, "mp_world_size": 1, "zero_stage": 2}

# Every test runs an example in a fresh interpreter. No skip when deepspeed is missing: `make test`
# installs it (`.[deepspeed]`), as the DeepSpeed engine and fixture tests need too, so a skip could
# only hide a broken install.
pytestmark = pytest.mark.slow


def _run(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True, timeout=300
    )


def _section(output: str, start: str, end: str) -> str:
    return output[output.index(start) : output.index(end)]


def _committed(root: Path) -> dict[str, int | None]:
    """Committed checkpoints under ``root``: name -> manifest step, every one a 2-rank ZeRO-2 layout."""
    found = {}
    for checkpoint in list_checkpoints(open_store(root)):
        if checkpoint.committed:
            manifest = read_manifest(open_store(root).child(checkpoint.name))
            assert manifest.layout == "deepspeed" and manifest.topology == ZERO2_TOPOLOGY
            found[checkpoint.name] = manifest.step
    return found


def test_story_kill_in_save_then_exact_resume(tmp_path: Path) -> None:
    root = tmp_path / "root"
    result = _run("deepspeed_story.py", "--root", str(root))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output

    # The crash: both ranks SIGKILLed inside the save of global_step9, which stays uncommitted.
    crash = _section(output, "[2/5]", "[3/5]")
    assert "killed at step 9 (rank exit codes [-9, -9])" in crash
    assert re.search(r"\.global_step9\.ckptkit-staging-\w+/ +3 rank files, NOT committed: no manifest", crash)
    assert re.search(r"global_step6/ +3 rank files, committed", crash)
    assert re.search(r"latest +-> global_step6", crash)
    assert "global_step9/" not in crash.replace(".global_step9.", "")

    # The checks on the last committed checkpoint, by the CLI and against the reference run.
    check = _section(output, "[3/5]", "[4/5]")
    assert "last committed checkpoint: global_step6" in check
    assert "OK: 1 checkpoint(s) checked, sizes and content digests" in check
    assert "WarmupDecayLR  mp_rank_00_model_states.pt:lr_scheduler" in check
    assert "DeepSpeed DynamicLossScaler" in check
    assert "OK: every component agrees" in check
    assert "inspect read: LR 0.00916666667, loss scale 1024, resume check OK" in check
    assert "used LR 0.00916666667 and loss scale 1024 at step 7" in check
    assert "refused: WeightsUnpickler error: Unsupported global: GLOBAL deepspeed.runtime.fp16" in check
    loaded = f"rank 0 loaded {root / 'global_step6'}: global_steps=6, client_state['step']=6"
    assert loaded in output

    # The comparison table: steps 7-12, equal columns, and values that really change step to step.
    rows = [line.split() for line in _section(output, "[5/5]", "OK: steps 7-12").splitlines()]
    rows = [row for row in rows if row and row[0].isdigit()]
    assert [int(row[0]) for row in rows] == list(range(7, 13))
    for _, lr, lr_resumed, scale, scale_resumed, loss, loss_resumed, equal in rows:
        assert (lr, scale, loss, equal) == (lr_resumed, scale_resumed, loss_resumed, "True")
    assert len({row[1] for row in rows}) == 6  # WarmupDecayLR: a new LR every step
    assert len({row[3] for row in rows}) > 1  # the dynamic loss scale grew during the resumed steps
    assert "LR, loss scale and loss equal the uninterrupted run bit for bit" in output

    # On disk: the resumed run committed 9 and 12; the killed attempt is still uncommitted debris.
    assert _committed(root) == {f"global_step{s}": s for s in (3, 6, 9, 12)}
    assert (root / "latest").read_text() == "global_step12"
    (staging,) = [p for p in root.iterdir() if STAGING_MARKER in p.name]
    assert staging.name.startswith(".global_step9.")
    assert not (staging / MANIFEST_NAME).exists()
    assert sorted(p.name for p in staging.iterdir()) == [
        "mp_rank_00_model_states.pt",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]
    assert all(report.status == "ok" for report in verify_tree(open_store(root)))


def test_story_refuses_a_root_that_is_not_empty(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    result = _run("deepspeed_story.py", "--root", str(tmp_path))
    assert result.returncode == 2
    assert "must be a new or empty directory" in result.stderr
    assert "Traceback" not in result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["precious.txt"]


def test_train_saves_then_resumes_from_newest_committed(tmp_path: Path) -> None:
    root = tmp_path / "run"
    first = _run("deepspeed_train.py", "--root", str(root), "--steps", "4", "--save-every", "2")
    assert first.returncode == 0, first.stdout + first.stderr
    assert f"starting fresh in {root}" in first.stdout
    assert re.findall(r"committed (global_step\d+)", first.stdout) == ["global_step2", "global_step4"]
    assert _committed(root) == {"global_step2": 2, "global_step4": 4}

    second = _run("deepspeed_train.py", "--root", str(root), "--steps", "5", "--save-every", "2")
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"resumed from {root / 'global_step4'} at step 4" in second.stdout
    assert re.findall(r"committed (global_step\d+)", second.stdout) == ["global_step5"]  # the last step
    assert _committed(root) == {"global_step2": 2, "global_step4": 4, "global_step5": 5}
    assert (root / "latest").read_text() == "global_step5"
    assert all(report.status == "ok" for report in verify_tree(open_store(root)))

    # Tomorrow on 3 ranks: the same loop resumes, ckptkit resharding the ZeRO state on load.
    third = _run("deepspeed_train.py", "--root", str(root), "--steps", "6", "--ranks", "3")
    assert third.returncode == 0, third.stdout + third.stderr
    assert f"resumed from {root / 'global_step5'} at step 5" in third.stdout
    assert (
        f"{root / 'global_step5'} was saved by 2 data-parallel ranks; resharding its ZeRO-2 state on load "
        "for 3 ranks" in third.stderr
    )
    manifest = read_manifest(open_store(root).child("global_step6"))
    assert manifest.topology == {**ZERO2_TOPOLOGY, "world_size": 3, "dp_world_size": 3}
