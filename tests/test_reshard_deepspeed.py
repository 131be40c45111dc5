"""Proof with real DeepSpeed (CPU, gloo) that ``ckptkit.reshard_zero`` makes a ZeRO run resume exactly
on another number of ranks, and where DeepSpeed's own universal route does not.

Every stage × dtype case of tests/fixtures/gen_reshard.py is trained at N ranks, saved, resharded
to M ranks, loaded by DeepSpeed's plain ``engine.load_checkpoint`` at M ranks, read back from the
live engine and trained k more steps. Masters, moments and all other state must equal what the
source engine held right after its save, bit for bit; the continuation (lr, loss scale, skipped
steps per step) must equal the source's own continuation at N ranks.

All loads share a few spawns (one per M: process start and ``deepspeed.initialize`` dominate on
2 cores), run once for the module in :func:`resumed`.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures import gen_reshard
from tests.fixtures._common import GENERATOR_ENV, REPO_ROOT, read_json, write_json
from tests.fixtures.real_checkpoints import ReshardSources

pytestmark = pytest.mark.slow

PAIRS = ((2, 1), (2, 3), (4, 2), (2, 4), (3, 2))  # (N saved, M loaded)
CASES = [c.name for c in gen_reshard.CASES]
GROUP0 = ("embed.weight", "fc1.weight", "fc2.weight")  # the weights group, the first param group
# DeepSpeed's universal route, each job named by what it shows (shared/reference/resharding.md §1.5).
UNIVERSAL = {
    "z2_m1": ("z2_bf16", 2, 1),  # loads: group 0 right, frozen params and buffers not restored (F1)
    "z2_m3": ("z2_bf16", 2, 3),  # the gate group's slice is all padding on ranks 1, 2: IndexError (F2)
    "z3_m3": ("z3_bf16", 2, 3),  # loads: group 0 right, F1, one shared step and group-0 hyperparameters (F3)
}
LOAD_TIMEOUT_S = 900


@dataclass
class Outcome:
    """One resharded case: its round-trip dir (N → M → N) and the load job at M ranks."""

    back: Path
    reshard_error: str | None = None
    back_error: str | None = None
    job: dict[str, Any] = field(default_factory=dict)

    def dump(self) -> dict[str, Any]:
        if self.reshard_error is not None:
            pytest.fail(f"reshard_zero failed: {self.reshard_error}")
        return _job_dump(self.job)


@dataclass
class ReshardRun:
    sources: ReshardSources
    outcomes: dict[tuple[str, int, int], Outcome]
    universal: dict[str, dict[str, Any]]


def _job_statuses(job: dict[str, Any]) -> list[dict[str, Any]]:
    paths = [Path(f"{job['out']}.rank{r}.json") for r in range(job["world"])]
    return [json.loads(p.read_text()) for p in paths if p.exists()]


def _job_dump(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    errors = [s["error"] for s in _job_statuses(job) if not s["ok"]]
    if errors or not Path(job["out"]).exists():
        pytest.fail(f"load at {job['world']} ranks failed: {errors or 'no dump written'}")
    return torch.load(job["out"], weights_only=True)


def _reshard(src: Path, dst: Path, world_size: int) -> str | None:
    import ckptkit

    try:
        ckptkit.reshard_zero(str(src), str(dst), world_size=world_size)
    except Exception as exc:  # reported by the tests of this case, not fatal to the others
        return f"{type(exc).__name__}: {exc}"
    return None


def _run_load_jobs(jobs: list[dict[str, Any]], work: Path) -> dict[str, Any]:
    jobs_file, timings_file = work / "jobs.json", work / "timings.json"
    write_json(jobs_file, jobs)
    env = {**os.environ, **GENERATOR_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    cmd = [sys.executable, "-m", "tests.fixtures.gen_reshard", "--load", str(jobs_file)]
    proc = subprocess.run(
        [*cmd, "--timings", str(timings_file)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=LOAD_TIMEOUT_S,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"gen_reshard --load failed ({proc.returncode}):\n{proc.stderr[-8000:]}")
    return read_json(timings_file)


@pytest.fixture(scope="module")
def resumed(reshard_sources: ReshardSources, tmp_path_factory: pytest.TempPathFactory) -> ReshardRun:
    """Reshard every case N → M (and back to N), then load all of them at M ranks in shared spawns."""
    work = tmp_path_factory.mktemp("reshard")
    outcomes: dict[tuple[str, int, int], Outcome] = {}
    jobs: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for case in CASES:
        for n, m in PAIRS:
            dst, back = work / case / f"n{n}_m{m}", work / case / f"n{n}_m{m}_n{n}"
            outcome = Outcome(back=back)
            outcome.reshard_error = _reshard(reshard_sources.save_dir(case, n), dst, m)
            if outcome.reshard_error is None:
                outcome.back_error = _reshard(dst, back, n)
                outcome.job = {"id": f"{case}_n{n}_m{m}", "world": m, "case": case, "mode": "plain"}
                outcome.job.update(load_dir=str(dst), out=str(work / f"{outcome.job['id']}.pt"))
                jobs.append(outcome.job)
            outcomes[case, n, m] = outcome
    timings: dict[str, Any] = {"reshard_all_s": time.perf_counter() - t0}

    universal: dict[str, dict[str, Any]] = {}
    for name, (case, n, m) in UNIVERSAL.items():
        # The converter writes beside the tag dir: work on a copy, the sources are shared.
        save_dir = work / "universal" / name
        shutil.copytree(reshard_sources.save_dir(case, n), save_dir)
        tag = (save_dir / "latest").read_text().strip()
        job = {"id": f"universal_{name}", "world": m, "case": case, "mode": "universal"}
        job.update(load_dir=str(save_dir), out=str(work / f"universal_{name}.pt"))
        job.update(convert_input=str(save_dir / tag), convert_output=str(save_dir / f"{tag}_universal"))
        if name == "z2_m3":
            job["spawn"] = "crash"  # expected to fail: its own spawn, so the ckptkit loads are unharmed
        universal[name] = job
        jobs.append(job)
    timings.update(_run_load_jobs(jobs, work))
    write_json(work / "timings.json", timings)  # wall times of every spawn, for performance notes
    return ReshardRun(sources=reshard_sources, outcomes=outcomes, universal=universal)


# ---------------------------------------------------------------------------------------------
# comparison helpers: bit-level, so -0.0 vs 0.0 or a NaN payload counts as a difference
# ---------------------------------------------------------------------------------------------


def _bits(t: Any) -> Any:
    import torch

    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def _same_bits(a: Any, b: Any) -> bool:
    import torch

    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def _tensor_diffs(expected: dict[str, Any], got: dict[str, Any], what: str) -> list[str]:
    diffs = [f"{what}: {sorted(set(expected) ^ set(got))} not in both"] if set(expected) != set(got) else []
    for name in sorted(set(expected) & set(got)):
        e, g = expected[name], got[name]
        if not _same_bits(e, g):
            delta = (e.double() - g.double()).abs().max().item() if e.shape == g.shape else "shape"
            diffs.append(
                f"{what}[{name}]: {e.dtype}{list(e.shape)} vs {g.dtype}{list(g.shape)}, max |Δ| {delta}"
            )
    return diffs


def _plain(value: Any) -> Any:
    """Hyperparameters as data: tuples and lists alike (a rewritten pickle may store either)."""
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _case_ids(case: str, n: int, m: int) -> str:
    return f"{case}-{n}to{m}"


CASE_PARAMS = [pytest.param(c, n, m, id=_case_ids(c, n, m)) for c in CASES for n, m in PAIRS]


# ---------------------------------------------------------------------------------------------
# ckptkit reshard → plain DeepSpeed load at M ranks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("case", "n", "m"), CASE_PARAMS)
def test_masters_and_moments_bit_exact(resumed: ReshardRun, case: str, n: int, m: int) -> None:
    """Full fp32 masters, exp_avg and exp_avg_sq of every parameter, read from the live engine at M
    ranks, equal the source engine's at N ranks bit for bit; so do the module's own weights."""
    src = resumed.sources.reference(case, n)
    got = resumed.outcomes[case, n, m].dump()
    assert got["dp_world_size"] == m and src["dp_world_size"] == n
    diffs = []
    for key in ("masters", "exp_avg", "exp_avg_sq", "weights"):
        diffs += _tensor_diffs(src[key], got[key], key)
    assert not diffs, "\n".join(diffs)
    # Nothing matches by accident: the loading model started from another seed.
    assert set(src["masters"]) == {*GROUP0, "fc1.bias", "fc2.bias", "gate"}


@pytest.mark.parametrize(("case", "n", "m"), CASE_PARAMS)
def test_training_state_carried(resumed: ReshardRun, case: str, n: int, m: int) -> None:
    """Per-group step and hyperparameters, every loss-scaler field, the scheduler, the counters,
    client state, frozen parameters, buffers and the weight tie survive N → M."""
    src = resumed.sources.reference(case, n)
    got = resumed.outcomes[case, n, m].dump()
    assert got["group_steps"] == src["group_steps"]  # per group, per flat tensor (ZeRO-3: sub-group)
    assert got["step_shared"] is False
    assert _plain(got["hyperparameters"]) == _plain(src["hyperparameters"])
    assert [g["weight_decay"] for g in got["hyperparameters"]] == list(gen_reshard.WEIGHT_DECAY)
    assert got["loss_scaler"]["class"] == src["loss_scaler"]["class"]
    assert got["loss_scaler"]["state"] == src["loss_scaler"]["state"]  # every field
    assert got["lr_scheduler"] == src["lr_scheduler"]
    assert got["lr"] == src["lr"]
    for counter in ("global_steps", "global_samples", "skipped_steps"):
        assert got[counter] == src[counter], counter
    if gen_reshard.CASES_BY_NAME[case].fp16:
        assert src["skipped_steps"] > 0  # the overflow before the save really happened
    assert got["client_state"]["marker"] == f"{case}-n{n}"
    assert got["client_state"]["my_step"] == src["global_steps"]
    assert not _tensor_diffs(src["frozen"], got["frozen"], "frozen")
    assert not _tensor_diffs(src["buffers"], got["buffers"], "buffers")
    assert got["tied"] and got["shared_params"] == src["shared_params"] == {"head.weight": "embed.weight"}


@pytest.mark.parametrize(("case", "n", "m"), CASE_PARAMS)
def test_continuation_matches_source(resumed: ReshardRun, case: str, n: int, m: int) -> None:
    """k more steps at M follow the source's own k steps at N: lr, loss scale and skipped steps per
    step (at fp16 the first overflows, so the scaler's hysteresis state decides the scale)."""
    reference = resumed.sources.reference(case, n)
    src = reference["continuation"]
    got = resumed.outcomes[case, n, m].dump()["continuation"]
    keys = ("lr", "cur_scale", "skipped_steps", "global_steps", "group_steps")
    assert [{k: s[k] for k in keys} for s in got] == [{k: s[k] for k in keys} for s in src]
    overflowed = gen_reshard.CASES_BY_NAME[case].fp16  # the first step's loss was scaled by 1e6
    if overflowed:  # the source really skipped it, so the skip path is what is compared
        assert src[0]["skipped_steps"] == reference["skipped_steps"] + 1
    assert all(math.isfinite(s["loss"]) for s in got[1 if overflowed else 0 :]), got


# ---------------------------------------------------------------------------------------------
# round trip N → M → N
# ---------------------------------------------------------------------------------------------


def _tree_diffs(a: Any, b: Any, path: str) -> list[str]:
    """Differences between two unpickled DeepSpeed files: tensors by bits, objects by fields."""
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        ok = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and _same_bits(a, b)
        return [] if ok else [f"{path}: tensor differs"]
    if isinstance(a, dict) and isinstance(b, dict):
        if list(a) != list(b):
            return [f"{path}: keys {list(a)} vs {list(b)}"]
        return [d for k in a for d in _tree_diffs(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, list | tuple) and type(a) is type(b):
        if len(a) != len(b):
            return [f"{path}: length {len(a)} vs {len(b)}"]
        return [
            d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in _tree_diffs(x, y, f"{path}[{i}]")
        ]
    if hasattr(a, "__dict__") and not isinstance(a, type):  # LossScaler, fragment_address, ...
        if type(a) is not type(b):
            return [f"{path}: {type(a).__qualname__} vs {type(b).__qualname__}"]
        return _tree_diffs(vars(a), vars(b), path)
    return [] if a == b and type(a) is type(b) else [f"{path}: {a!r} vs {b!r}"]


def _clear_zero3_padding(tree: dict[str, Any], file_name: str, shapes: dict[str, Any], world: int) -> None:
    """Zero the tail padding of a ZeRO-3 rank file's per-parameter slices, in place.

    DeepSpeed leaves that padding uninitialised (seen: 636.457 in a frozen fragment, -1.1e-13 in a
    master), so it carries no state and no rewrite can reproduce it. ``shapes``: the model-states
    file's ``param_shapes`` (one OrderedDict per sub-group) and ``frozen_param_shapes``.
    """
    import torch

    rank = int(re.search(r"zero_pp_rank_(\d+)_", file_name).group(1))

    def clear(flat: Any, names_shapes: dict[str, Any]) -> None:
        offset = 0
        for shape in names_shapes.values():
            numel = math.prod(shape)
            per_rank = -(-numel // world)
            real = min(max(numel - rank * per_rank, 0), per_rank)
            with torch.no_grad():  # masters are saved as Parameters
                flat.view(-1)[offset + real : offset + per_rank] = 0
            offset += per_rank
        assert offset == flat.numel(), (
            f"{file_name}: slices of {list(names_shapes)} do not fill the flat tensor"
        )

    if "optimizer_state_dict" in tree:  # optimizer states: masters and moments per sub-group
        osd = tree["optimizer_state_dict"]
        for i, sub_group in enumerate(shapes["param_shapes"]):
            clear(osd["fp32_flat_groups"][i], sub_group)
            for key in ("exp_avg", "exp_avg_sq"):
                clear(osd["optimizer_state_dict"]["state"][i][key], sub_group)
    for name, fragment in tree.get("frozen_param_fragments", {}).items():
        clear(fragment, {name: shapes["frozen_param_shapes"][name]})


@pytest.mark.parametrize(("case", "n", "m"), CASE_PARAMS)
def test_round_trip_reproduces_rank_files(resumed: ReshardRun, case: str, n: int, m: int) -> None:
    """N → M → N gives back every DeepSpeed rank file of the tag with the same content: each file
    unpickled (torch.load) and compared tensor by tensor at the bit level, every other value by
    equality. The file bytes themselves may differ (zip padding, pickle memo and storage ids), and
    at ZeRO-3 the uninitialised tail padding of each parameter's slice is not compared."""
    import torch

    outcome = resumed.outcomes[case, n, m]
    if outcome.reshard_error is not None or outcome.back_error is not None:
        pytest.fail(f"reshard failed: {outcome.reshard_error or outcome.back_error}")
    src_dir = resumed.sources.save_dir(case, n)
    tag = (src_dir / "latest").read_text().strip()
    assert (outcome.back / "latest").read_text().strip() == tag
    original = sorted(p.name for p in (src_dir / tag).iterdir())
    assert sorted(p.name for p in (outcome.back / tag).iterdir()) == original
    zero3 = gen_reshard.CASES_BY_NAME[case].stage == 3
    shapes = (
        torch.load(src_dir / tag / "zero_pp_rank_0_mp_rank_00_model_states.pt", weights_only=False)
        if zero3
        else {}
    )
    diffs = []
    for name in original:
        a = torch.load(src_dir / tag / name, weights_only=False)
        b = torch.load(outcome.back / tag / name, weights_only=False)
        if zero3:
            _clear_zero3_padding(a, name, shapes, n)
            _clear_zero3_padding(b, name, shapes, n)
        diffs += _tree_diffs(a, b, name)
    assert not diffs, "\n".join(diffs[:20])


# ---------------------------------------------------------------------------------------------
# DeepSpeed's universal route on the same checkpoints: right where it is right, and its defects
# ---------------------------------------------------------------------------------------------


def _universal_dump(resumed: ReshardRun, name: str) -> dict[str, Any]:
    return _job_dump(resumed.universal[name])


@pytest.mark.parametrize("name", ["z2_m1", "z3_m3"])
def test_universal_group0_equals_ckptkit(resumed: ReshardRun, name: str) -> None:
    """Where the universal route is right (group 0's masters and moments), it equals ckptkit's load."""
    case, n, m = UNIVERSAL[name]
    uni = _universal_dump(resumed, name)
    ours = resumed.outcomes[case, n, m].dump()
    src = resumed.sources.reference(case, n)
    for key in ("masters", "exp_avg", "exp_avg_sq"):
        group0 = {p: src[key][p] for p in GROUP0}
        assert not _tensor_diffs(group0, {p: uni[key][p] for p in GROUP0}, f"universal {key}")
        assert not _tensor_diffs(group0, {p: ours[key][p] for p in GROUP0}, f"ckptkit {key}")


@pytest.mark.parametrize("name", ["z2_m1", "z3_m3"])
def test_universal_f1_frozen_and_buffers_lost(resumed: ReshardRun, name: str) -> None:
    """F1: after a universal load the frozen parameter and the buffer keep the new model's values;
    after ckptkit's they hold the saved ones."""
    case, n, m = UNIVERSAL[name]
    uni = _universal_dump(resumed, name)
    ours = resumed.outcomes[case, n, m].dump()
    src = resumed.sources.reference(case, n)
    for key in ("frozen", "buffers"):
        assert _tensor_diffs(src[key], uni[key], key), f"F1 did not reproduce for {key}"
        assert not _tensor_diffs(src[key], ours[key], key)


def test_universal_f2_index_error_on_padding_rank(resumed: ReshardRun) -> None:
    """F2: ZeRO-2 universal load at 3 ranks crashes with IndexError on the ranks whose slice of the
    2-element gate group is all padding; ckptkit's 2 → 3 of the same checkpoint loads and matches."""
    statuses = _job_statuses(resumed.universal["z2_m3"])
    errors = [s["error"] for s in statuses if not s["ok"]]
    assert any(e.startswith("IndexError") for e in errors), f"F2 did not reproduce: {statuses}"
    case, n, m = UNIVERSAL["z2_m3"]
    ours = resumed.outcomes[case, n, m].dump()
    src = resumed.sources.reference(case, n)
    assert not _tensor_diffs({"gate": src["masters"]["gate"]}, {"gate": ours["masters"]["gate"]}, "masters")
    assert not _tensor_diffs({"gate": src["exp_avg"]["gate"]}, {"gate": ours["exp_avg"]["gate"]}, "exp_avg")


def test_universal_f3_shared_step_and_group0_hyperparameters(resumed: ReshardRun) -> None:
    """F3: ZeRO-3 universal load gives every sub-group one shared ``step`` tensor (so it advances
    once per sub-group per step) and group 0's hyperparameters; ckptkit's load keeps each."""
    case, n, m = UNIVERSAL["z3_m3"]
    uni = _universal_dump(resumed, "z3_m3")
    ours = resumed.outcomes[case, n, m].dump()
    src = resumed.sources.reference(case, n)
    assert uni["step_shared"] is True and ours["step_shared"] is False
    src_steps = [s["group_steps"] for s in src["continuation"]]
    assert [s["group_steps"] for s in uni["continuation"]] != src_steps
    assert [s["group_steps"] for s in ours["continuation"]] == src_steps
    wd = [g["weight_decay"] for g in uni["hyperparameters"]]
    assert wd == [gen_reshard.WEIGHT_DECAY[0]] * 3, wd
    assert [g["weight_decay"] for g in ours["hyperparameters"]] == list(gen_reshard.WEIGHT_DECAY)
