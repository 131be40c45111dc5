"""``ckptkit plan`` against reality: every prediction equals what the resume does when run for real.

Checkpoints (DeepSpeed ZeRO-2/3 × fp16/bf16 trained at 2 ranks, an HF Trainer run, a plain
``torch.save`` with a GradScaler and numpy RNG) × settings (the saved world size, another world
size, ``weights_only`` on with and without ckptkit's safe globals, ``weights_only`` off). Each case
is planned, then resumed for real on CPU:

- world size: DeepSpeed ``engine.load_checkpoint`` at M ranks (tests/fixtures/gen_reshard.py's
  ``--load`` harness, gloo), ``Trainer.train(resume_from_checkpoint=...)`` for one step at M ranks;
- ``weights_only``: plain ``torch.load`` of every file the trainer loads
  (tests/plan_resume_worker.py), inside ``ckptkit.safe_globals()`` for the "+ckptkit" setting.

No case may be predicted to work and fail, nor predicted to fail and work. The real runs go in two
processes started side by side (the DeepSpeed loads, everything else), once for the module.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ckptkit.ops.resume_plan import plan_resume
from tests.fixtures._common import GENERATOR_ENV, REPO_ROOT, read_json, write_json
from tests.fixtures.real_checkpoints import HFTrainerCheckpoint, ReshardSources, TorchCheckpoints

pytestmark = pytest.mark.slow

DS_CASES = ("z2_fp16", "z2_bf16", "z3_fp16", "z3_bf16")
SAVED_WORLD = 2
OTHER_WORLD = 3
TIMEOUT_S = 600
# (setting, plan keyword arguments, how the real run loads); world sizes are filled in per case.
WEIGHTS_SETTINGS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("weights-only", {"weights_only": True, "safe_globals": False}),
    ("weights-only+ckptkit", {"weights_only": True, "safe_globals": True}),
    ("no-weights-only", {"weights_only": False, "safe_globals": False}),
)


@dataclass
class Case:
    id: str
    path: Path  # what `ckptkit plan` is pointed at
    plan_kwargs: dict[str, Any]
    real: tuple[str, str]  # ("ds" | "worker", trial id)


def _env() -> dict[str, str]:
    env = {**os.environ, **GENERATOR_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


def _start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, *args], cwd=REPO_ROOT, env=_env(), stdout=out, stderr=out)


def _torch_files(directory: Path) -> list[str]:
    """The pickle files a trainer's resume hands to torch.load (not weights in safetensors, not
    HF's training_args.bin, which resuming never reads)."""
    return sorted(
        str(p) for p in directory.iterdir()
        if p.suffix in (".pt", ".pth", ".bin") and p.name != "training_args.bin"
    )


@dataclass
class Matrix:
    cases: list[Case]
    ds_results: dict[str, bool]
    worker_results: dict[str, dict[str, Any]]
    ds_errors: dict[str, str | None]

    def real_ok(self, case: Case) -> bool:
        kind, trial = case.real
        return self.ds_results[trial] if kind == "ds" else bool(self.worker_results[trial]["ok"])

    def real_error(self, case: Case) -> str | None:
        kind, trial = case.real
        return self.ds_errors[trial] if kind == "ds" else self.worker_results[trial]["error"]


@pytest.fixture(scope="module")
def matrix(
    reshard_sources: ReshardSources,
    hf_trainer_checkpoint: HFTrainerCheckpoint,
    torch_checkpoints: TorchCheckpoints,
    tmp_path_factory: pytest.TempPathFactory,
) -> Matrix:
    work = tmp_path_factory.mktemp("plan-matrix")
    cases: list[Case] = []
    jobs: list[dict[str, Any]] = []
    trials: list[dict[str, Any]] = []

    for name in DS_CASES:
        save_dir = reshard_sources.save_dir(name, SAVED_WORLD)
        for world in (SAVED_WORLD, OTHER_WORLD):
            job_id = f"{name}_m{world}"
            jobs.append({"id": job_id, "world": world, "case": name, "mode": "plain",
                         "load_dir": str(save_dir), "out": str(work / f"{job_id}.pt")})
            setting = "same-world" if world == SAVED_WORLD else "other-world"
            cases.append(Case(f"{name}/{setting}", save_dir, {"world_size": world}, ("ds", job_id)))
        tag_dir = save_dir / (save_dir / "latest").read_text().strip()
        _weights_cases(cases, trials, name, save_dir, _torch_files(tag_dir))

    hf_run = hf_trainer_checkpoint.output_dir
    newest = max(hf_trainer_checkpoint.checkpoints)
    for world in (1, 2):
        trial_id = f"hf_m{world}"
        trials.append({"id": trial_id, "kind": "hf-resume", "run_dir": str(hf_run),
                       "checkpoint": f"checkpoint-{newest}", "world": world})
        setting = "same-world" if world == 1 else "other-world"
        cases.append(Case(f"hf/{setting}", hf_run, {"world_size": world}, ("worker", trial_id)))
    _weights_cases(cases, trials, "hf", hf_run, _torch_files(hf_trainer_checkpoint.checkpoints[newest]))

    scaler_file = torch_checkpoints.path("adamw_onecycle.pt")  # GradScaler, numpy RNG, OneCycleLR
    assert "scaler" in torch_checkpoints.expected["adamw_onecycle.pt"]
    _weights_cases(cases, trials, "torch-gradscaler", scaler_file, [str(scaler_file)])

    write_json(work / "jobs.json", jobs)
    write_json(work / "trials.json", trials)
    ds = _start(["-m", "tests.fixtures.gen_reshard", "--load", str(work / "jobs.json")], work / "ds.log")
    worker = _start(
        ["-m", "tests.plan_resume_worker", str(work / "trials.json"), str(work / "results.json")],
        work / "worker.log",
    )
    for proc, log in ((ds, "ds.log"), (worker, "worker.log")):
        if proc.wait(TIMEOUT_S) != 0:
            raise RuntimeError(f"{log} exited {proc.returncode}:\n{(work / log).read_text()[-6000:]}")

    ds_results, ds_errors = {}, {}
    for job in jobs:
        statuses = [Path(f"{job['out']}.rank{r}.json") for r in range(job["world"])]
        read = [read_json(p) for p in statuses if p.exists()]
        ds_results[job["id"]] = len(read) == job["world"] and all(s["ok"] for s in read)
        ds_errors[job["id"]] = next((s["error"] for s in read if s["error"]), None)
    return Matrix(cases, ds_results, read_json(work / "results.json"), ds_errors)


def _weights_cases(
    cases: list[Case], trials: list[dict[str, Any]], name: str, path: Path, files: list[str]
) -> None:
    assert files, f"{name}: no torch files to load"
    for setting, kwargs in WEIGHTS_SETTINGS:
        trial_id = f"{name}_{setting}"
        trials.append({"id": trial_id, "kind": "torch-load", "files": files, **kwargs})
        cases.append(Case(f"{name}/{setting}", path, dict(kwargs), ("worker", trial_id)))


def test_every_prediction_equals_the_real_resume(matrix: Matrix) -> None:
    wrong = []
    for case in matrix.cases:
        plan = plan_resume(case.path, **case.plan_kwargs)
        real = matrix.real_ok(case)
        if plan.ok != real:
            predicted = "ok" if plan.ok else "; ".join(f"{f.kind}: {f.message}" for f in plan.findings)
            actual = "ok" if real else matrix.real_error(case)
            wrong.append(f"{case.id}: predicted {predicted!r}, real {actual!r}")
    assert not wrong, "\n".join(wrong)


def test_the_matrix_holds_both_outcomes(matrix: Matrix) -> None:
    """Resumes that work and resumes that fail, for each checkpoint kind: a matrix in which
    everything loads (or nothing does) would prove nothing about the predictions."""
    by_checkpoint: dict[str, set[bool]] = {}
    for case in matrix.cases:
        by_checkpoint.setdefault(case.id.split("/")[0], set()).add(matrix.real_ok(case))
    assert all(outcomes == {True, False} for outcomes in by_checkpoint.values()), by_checkpoint
    assert len(matrix.cases) == len(DS_CASES) * 5 + 5 + 3


def test_failures_name_their_cause_and_fix(matrix: Matrix) -> None:
    """Each failed real resume is predicted with the finding that explains it."""
    expected_kind = {"other-world": "world-size", "weights-only": "weights-only"}
    for case in matrix.cases:
        setting = case.id.split("/")[1]
        if matrix.real_ok(case) or setting not in expected_kind:
            continue
        plan = plan_resume(case.path, **case.plan_kwargs)
        kinds = {f.kind for f in plan.findings if f.severity == "error"}
        assert expected_kind[setting] in kinds, (case.id, plan.findings)
        assert all(f.fix for f in plan.findings), case.id
