"""``ckptkit diff``: real checkpoints of real runs compared across formats, stores and steps.

Expected values come from the live objects (which parameters a loop trained, torch's own
arithmetic for ``--stats``), never from diff's own reading.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ckptkit.api import save
from ckptkit.cli.main import cli
from ckptkit.errors import EXIT_FINDINGS, EXIT_OK, EXIT_STORAGE, EXIT_UNSAFE, UnsafeContentError
from ckptkit.ops.convert import convert
from ckptkit.ops.diff import diff_paths
from ckptkit.storage import open_store
from tests.malicious.corpus import PAYLOADS


def _run(*args: str) -> Any:
    return CliRunner().invoke(cli, ["diff", *args])


def _json(*args: str) -> tuple[int, dict[str, Any]]:
    res = _run("--json", *args)
    return res.exit_code, json.loads(res.output)


def _by_status(report: dict[str, Any]) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for t in report["tensors"]:
        found.setdefault(t["status"], set()).add(t["name"])
    return found


def _fields(report: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    return {f["path"]: (f["a"], f["b"]) for f in report["fields"]}


# --- a real training loop: consecutive checkpoints ---------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plain PyTorch loop with a frozen embedding and a trainable head, saved at steps 3 and 6
    with torch.save (whole state and weights only) and ckptkit.save."""
    out = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Flatten(), torch.nn.Linear(16, 4))
    model[0].weight.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 2, gamma=0.5)
    for step in range(1, 7):
        loss = model(torch.randint(0, 10, (32, 2))).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % 3 == 0:
            state = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "step": step,
                "rng": {"torch": torch.get_rng_state(), "cpu": torch.get_rng_state()},
            }
            torch.save(state, out / f"ckpt-{step}.pt")
            torch.save(model.state_dict(), out / f"weights-{step}.pt")
            save(state, out / "native" / f"step-{step}", step=step)
    return out


def test_consecutive_checkpoints_report_exactly_the_trained_tensors(run: Path) -> None:
    trained = {"model.2.weight", "model.2.bias"}
    moments = {f"optimizer.state.{i}.{slot}" for i in (0, 1) for slot in ("step", "exp_avg", "exp_avg_sq")}
    for a, b in [
        (run / "ckpt-3.pt", run / "ckpt-6.pt"),
        (run / "native" / "step-3", run / "native" / "step-6"),
        (run / "ckpt-3.pt", run / "native" / "step-6"),  # formats need not agree
    ]:
        code, report = _json(str(a), str(b))
        assert code == EXIT_FINDINGS
        statuses = _by_status(report)
        assert statuses["changed"] == trained | moments | {"rng.torch", "rng.cpu"}
        assert statuses["identical"] == {"model.0.weight"}  # the frozen embedding
        assert set(statuses) == {"changed", "identical"}
        fields = _fields(report)
        assert fields["optimizer.param_groups.0.step"] == (3, 6)
        assert fields["optimizer.param_groups.0.lr"] == (0.005, 0.00125)
        assert fields["scheduler.last_epoch"] == (3, 6)
        assert fields["step"] == (3, 6)
        assert {f["section"] for f in report["fields"] if f["path"].startswith("scheduler.")} == {"scheduler"}

    code, report = _json(str(run / "weights-3.pt"), str(run / "weights-6.pt"))
    assert code == EXIT_FINDINGS
    assert _by_status(report) == {"changed": {"2.weight", "2.bias"}, "identical": {"0.weight"}}
    assert report["fields"] == []


def test_text_output_lists_changed_tensors_and_counts_identical_ones(run: Path) -> None:
    res = _run(str(run / "weights-3.pt"), str(run / "weights-6.pt"))
    assert res.exit_code == EXIT_FINDINGS
    lines = res.output.splitlines()
    assert lines[0].startswith("different: ")
    assert lines[1] == "tensors: 2 changed, 1 identical; 0 non-tensor field(s) differ"
    assert "2.weight" in res.output and "0.weight" not in res.output
    res = _run("-v", str(run / "weights-3.pt"), str(run / "weights-6.pt"))
    assert "0.weight" in res.output and "identical" in res.output


def test_a_checkpoint_and_its_native_copy_are_identical_by_manifest_digest(run: Path, tmp_path: Path) -> None:
    shutil.copytree(run / "native" / "step-3", tmp_path / "copy")
    code, report = _json(str(run / "native" / "step-3"), str(tmp_path / "copy"))
    assert code == EXIT_OK and report["identical"]
    # Both manifests give the shard one digest: no tensor byte was read or hashed.
    assert {t["how"] for t in report["tensors"]} == {"manifest-digest"}
    assert all(t["digest_a"] is None for t in report["tensors"])
    code, report = _json(str(run / "native" / "step-3"), str(run / "ckpt-3.pt"))
    assert code == EXIT_OK and report["fields"] == []
    assert {t["how"] for t in report["tensors"]} == {"blake3"}


# --- a checkpoint against its converted copy -------------------------------------------------------


def _lm_state() -> dict[str, torch.Tensor]:
    """bf16 weights, a tied head, an int buffer and an fp32 norm."""
    gen = torch.Generator().manual_seed(0)
    embed = torch.randn(32, 16, generator=gen).to(torch.bfloat16)
    return {
        "embed.weight": embed,
        "layer.weight": torch.randn(24, 16, generator=gen).to(torch.bfloat16),
        "norm.weight": torch.randn(16, generator=gen),
        "position_ids": torch.arange(32),
        "lm_head.weight": embed,
    }


@pytest.mark.parametrize("to", ["safetensors", "dcp", "native"])
def test_torch_file_and_its_converted_copy_are_identical(tmp_path: Path, to: str) -> None:
    src = tmp_path / "pytorch_model.bin"
    torch.save(_lm_state(), src)
    dst = tmp_path / ("model.safetensors" if to == "safetensors" else to)
    assert convert(src, dst, to=to).ok
    res = _run(str(src), str(dst))
    assert res.exit_code == EXIT_OK, res.output
    code, report = _json(str(src), str(dst))
    assert report["counts"]["identical"] == 5  # the tied head too
    assert report["identical"] and code == EXIT_OK


def test_strided_view_compares_by_value(tmp_path: Path) -> None:
    """A transposed view (stride (1, 24)) against its contiguous copy: same values, identical."""
    weight = torch.randn(16, 24).t()
    torch.save({"w": weight}, tmp_path / "view.pt")
    torch.save({"w": weight.contiguous()}, tmp_path / "dense.pt")
    code, report = _json(str(tmp_path / "view.pt"), str(tmp_path / "dense.pt"))
    assert code == EXIT_OK, report
    torch.save({"w": torch.randn(16, 24).t()}, tmp_path / "random.pt")
    code, report = _json(str(tmp_path / "view.pt"), str(tmp_path / "random.pt"))
    assert code == EXIT_FINDINGS and _by_status(report) == {"changed": {"w"}}


def test_native_checkpoint_and_its_safetensors_copy_are_identical(tmp_path: Path) -> None:
    native = tmp_path / "native"
    save(_lm_state(), native)
    assert convert(native, tmp_path / "model.safetensors", to="safetensors").ok
    code, report = _json(str(native), str(tmp_path / "model.safetensors"))
    assert code == EXIT_OK, report
    assert report["counts"]["identical"] == 5


def test_dtype_change_and_shape_change_are_named(tmp_path: Path) -> None:
    state = _lm_state()
    torch.save(state, tmp_path / "a.pt")
    convert(tmp_path / "a.pt", tmp_path / "fp32.safetensors", to="safetensors", dtype="float32")
    code, report = _json("--stats", str(tmp_path / "a.pt"), str(tmp_path / "fp32.safetensors"))
    assert code == EXIT_FINDINGS
    dtype_changed = {t["name"]: t for t in report["tensors"] if t["status"] == "dtype-changed"}
    assert set(dtype_changed) == {"embed.weight", "layer.weight", "lm_head.weight"}
    assert dtype_changed["embed.weight"]["dtype_a"] == "bfloat16"
    assert dtype_changed["embed.weight"]["dtype_b"] == "float32"
    # bf16 -> fp32 is exact
    assert dtype_changed["embed.weight"]["stats"] == {"max_abs": 0.0, "relative": 0.0}

    other = dict(state, extra=torch.ones(3), **{"norm.weight": torch.zeros(4)})
    del other["position_ids"]
    torch.save(other, tmp_path / "b.pt")
    code, report = _json(str(tmp_path / "a.pt"), str(tmp_path / "b.pt"))
    assert code == EXIT_FINDINGS
    statuses = _by_status(report)
    assert statuses["added"] == {"extra"} and statuses["removed"] == {"position_ids"}
    assert statuses["reshaped"] == {"norm.weight"}
    reshaped = next(t for t in report["tensors"] if t["name"] == "norm.weight")
    assert (reshaped["shape_a"], reshaped["shape_b"]) == ([16], [4])


# --- --stats ----------------------------------------------------------------------------------------


def test_stats_equal_torch_computed_values(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(1)
    a = {
        "w32": torch.randn(300, 70, generator=gen),
        "w16": torch.randn(1000, generator=gen).half(),
        "wbf": torch.randn(64, 64, generator=gen).bfloat16(),
        "count": torch.arange(100),
        "zero": torch.zeros(5),
    }
    b = {
        "w32": a["w32"] + 0.01 * torch.randn(300, 70, generator=gen),
        "w16": (a["w16"].float() * 1.5).half(),
        "wbf": (a["wbf"].float() - 0.25).bfloat16(),
        "count": torch.arange(100) * 2,
        "zero": torch.ones(5),
    }
    torch.save(a, tmp_path / "a.pt")
    save(b, tmp_path / "b")  # the other side native: stats across readers
    code, report = _json("--stats", str(tmp_path / "a.pt"), str(tmp_path / "b"))
    assert code == EXIT_FINDINGS
    stats = {t["name"]: t["stats"] for t in report["tensors"]}
    assert {t["status"] for t in report["tensors"]} == {"changed"}
    for name in ("w32", "w16", "wbf", "count"):
        x, y = a[name].double(), b[name].double()
        assert stats[name]["max_abs"] == pytest.approx(float((x - y).abs().max()), rel=1e-12), name
        relative = float(torch.linalg.vector_norm(x - y) / torch.linalg.vector_norm(x))
        assert stats[name]["relative"] == pytest.approx(relative, rel=1e-9), name
    assert stats["zero"] == {"max_abs": 1.0, "relative": None}  # ||a|| = 0: no relative change
    # numpy, as a second opinion, on the fp16 one read back by torch
    x = a["w16"].numpy().astype(np.float64)
    assert stats["w16"]["max_abs"] == pytest.approx(np.abs(x - b["w16"].numpy().astype(np.float64)).max())


def test_stats_stream_large_tensors_in_chunks(tmp_path: Path) -> None:
    """A tensor larger than one statistics chunk (2**20 elements) and one read chunk."""
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(5_000_000, generator=gen)
    b = a.clone()
    b[4_999_999] += 3.0
    b[17] -= 1.0
    torch.save({"big": a}, tmp_path / "a.pt")
    torch.save({"big": b}, tmp_path / "b.pt")
    report = diff_paths(tmp_path / "a.pt", tmp_path / "b.pt", stats=True)
    (big,) = report.tensors
    assert big.status == "changed" and big.stats is not None
    assert big.stats.max_abs == pytest.approx(3.0, rel=1e-6)
    x, y = a.double(), b.double()
    relative = float(torch.linalg.vector_norm(x - y) / torch.linalg.vector_norm(x))
    assert big.stats.relative == pytest.approx(relative, rel=1e-9)


# --- refusals and errors ---------------------------------------------------------------------------


def test_hostile_pickle_is_refused_with_nothing_run(tmp_path: Path) -> None:
    evil, sentinel = tmp_path / "evil.pt", tmp_path / "ran"
    PAYLOADS["torch_zip_payload"].build(evil, sentinel, None)
    torch.save({"w": torch.ones(2)}, tmp_path / "good.pt")
    for args in [(str(tmp_path / "good.pt"), str(evil)), (str(evil), str(tmp_path / "good.pt"))]:
        res = _run(*args)
        assert res.exit_code == EXIT_UNSAFE
        assert "posix.system" in res.output and "Traceback" not in res.output
    assert not sentinel.exists()
    with pytest.raises(UnsafeContentError):
        diff_paths(tmp_path / "good.pt", evil)
    assert not sentinel.exists()


def test_hostile_pickle_in_a_checkpoint_directory_is_named(run: Path, tmp_path: Path) -> None:
    shutil.copytree(run / "native" / "step-3", tmp_path / "a")
    (tmp_path / "b").mkdir()
    torch.save({"w": torch.ones(2)}, tmp_path / "b" / "model.pt")
    PAYLOADS["torch_zip_payload"].build(tmp_path / "b" / "rng_state.pth", tmp_path / "ran", None)
    res = _run(str(tmp_path / "a"), str(tmp_path / "b"))
    assert res.exit_code == EXIT_UNSAFE
    assert f"{tmp_path / 'b'} (rng_state.pth): refused" in res.output and "posix.system" in res.output
    assert not (tmp_path / "ran").exists()


def test_missing_path_is_a_storage_error(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(2)}, tmp_path / "good.pt")
    res = _run(str(tmp_path / "good.pt"), str(tmp_path / "nope.pt"))
    assert res.exit_code == EXIT_STORAGE
    assert "nope.pt" in res.output and "Traceback" not in res.output
    code, report = _json(str(tmp_path / "nope"), str(tmp_path / "good.pt"))
    assert code == EXIT_STORAGE and report["error"]["type"] == "NotFoundError"


@pytest.mark.slow  # moto over HTTP
def test_s3_side(tmp_path: Path, s3_bucket: str) -> None:
    state = _lm_state()
    torch.save(state, tmp_path / "model.pt")
    store = open_store(s3_bucket)
    store.put("run/model.pt", (tmp_path / "model.pt").read_bytes())
    convert(tmp_path / "model.pt", f"{s3_bucket}/run/model.safetensors", to="safetensors")
    code, report = _json(str(tmp_path / "model.pt"), f"{s3_bucket}/run/model.safetensors")
    assert code == EXIT_OK, report
    changed = dict(state, **{"norm.weight": state["norm.weight"] + 1})
    torch.save(changed, tmp_path / "changed.pt")
    code, report = _json("--stats", f"{s3_bucket}/run/model.pt", str(tmp_path / "changed.pt"))
    assert code == EXIT_FINDINGS
    assert _by_status(report)["changed"] == {"norm.weight"}
    (norm,) = [t for t in report["tensors"] if t["name"] == "norm.weight"]
    assert norm["stats"]["max_abs"] == pytest.approx(1.0)


@pytest.mark.slow  # moto over HTTP
def test_s3_committed_native_checkpoint_against_a_local_one(tmp_path: Path, s3_bucket: str) -> None:
    """On S3 the files lie below the commit's attempt prefix; the manifests still settle it."""
    save(_lm_state(), f"{s3_bucket}/run/step-1", step=1)
    save(_lm_state(), tmp_path / "step-1", step=1)
    code, report = _json(f"{s3_bucket}/run/step-1", str(tmp_path / "step-1"))
    assert code == EXIT_OK, report
    assert {t["how"] for t in report["tensors"]} == {"manifest-digest"}
    save(dict(_lm_state(), **{"norm.weight": torch.zeros(16)}), tmp_path / "step-2", step=2)
    code, report = _json(f"{s3_bucket}/run/step-1", str(tmp_path / "step-2"))
    assert code == EXIT_FINDINGS
    assert _by_status(report)["changed"] == {"norm.weight"}


# --- real trainers ----------------------------------------------------------------------------------


def test_hf_trainer_consecutive_checkpoints(hf_trainer_checkpoint: Any, tmp_path: Path) -> None:
    first, second = hf_trainer_checkpoint.checkpoints[6], hf_trainer_checkpoint.checkpoints[12]
    expected = hf_trainer_checkpoint.expected
    code, report = _json(str(first), str(second))
    assert code == EXIT_FINDINGS
    statuses = _by_status(report)
    weights = set(expected["state_dict"])
    # Every trained weight changed (GPT-2 trains them all); the safetensors copy drops tied aliases.
    assert weights - set(expected["tied_weights"]) <= statuses["changed"]
    fields = _fields(report)
    assert fields["trainer_state.json:global_step"] == (6, 12)
    assert fields["optimizer.pt:param_groups.0.step"] == (6, 12)
    assert fields["scheduler.pt:last_epoch"] == (6, 12)
    assert fields["trainer_state.json:log_history.length"] == (6, 12)
    assert {"optimizer.pt:state.0.exp_avg", "rng_state.pth:cpu"} <= statuses["changed"]  # torch's RNG moved
    assert report["notes"] == [
        "A and B: not read: training_args.bin: a pickled TrainingArguments: loading it needs "
        "transformers' code, and resuming does not read it"
    ]

    shutil.copytree(first, tmp_path / "copy")
    code, report = _json(str(first), str(tmp_path / "copy"))
    assert code == EXIT_OK, report["fields"]


def test_deepspeed_tags_compare_without_their_tag_names(deepspeed_checkpoints: Any, tmp_path: Path) -> None:
    case = deepspeed_checkpoints.cases["z1_fp16_steplr"]
    copy = tmp_path / "ckpt"
    shutil.copytree(case.save_dir, copy)
    (copy / case.tag).rename(copy / "global_step999")
    (copy / "latest").write_text("global_step999")
    code, report = _json(str(case.save_dir), str(copy))
    assert code == EXIT_OK, report["fields"]
    names = {t["name"] for t in report["tensors"]}
    assert {"mp_rank_00_model_states.pt:module.fc1.weight", "fp32:fc1.weight", "exp_avg:fc1.weight"} <= names

    other = deepspeed_checkpoints.cases["z1_fp16_static"]  # 3 steps, a static loss scale
    code, report = _json(str(case.save_dir), str(other.save_dir))
    assert code == EXIT_FINDINGS
    sections = {f["section"] for f in report["fields"]}
    assert {"optimizer", "scheduler", "scaler", "config"} <= sections
    fields = _fields(report)
    assert fields["mp_rank_00_model_states.pt:global_steps"] == (4, 3)


@pytest.mark.parametrize("case_name", ["z2_fp16_overflow", "z3_bf16_warmuplr"])
def test_deepspeed_resharded_copy_holds_the_same_parameters(
    deepspeed_checkpoints: Any, tmp_path: Path, case_name: str
) -> None:
    """Per parameter, not per rank slice: the same run cut for 3 ranks instead of 2 differs only
    in the world size (the reshard certificate says the same of the masters and moments)."""
    case = deepspeed_checkpoints.cases[case_name]
    res = CliRunner().invoke(cli, ["reshard", str(case.save_dir), str(tmp_path / "ws3"), "--world-size", "3"])
    assert res.exit_code == EXIT_OK, res.output
    code, report = _json(str(case.save_dir), str(tmp_path / "ws3"))
    assert code == EXIT_FINDINGS
    trainable = set(case.expected["param_shapes"])
    statuses = _by_status(report)
    assert set(statuses) == {"identical"}
    per_parameter = {f"{state}:{name}" for name in trainable for state in ("fp32", "exp_avg", "exp_avg_sq")}
    assert per_parameter <= statuses["identical"]
    assert {(f["path"].rsplit(":", 1)[-1], f["a"], f["b"]) for f in report["fields"]} == {
        ("dp_world_size", 2, 3),
        ("optimizer_state_dict.partition_count" + (".0" if case.expected["stage"] < 3 else ""), 2, 3),
    }


def test_diff_does_not_import_torch(run: Path) -> None:
    """Values are read and compared with numpy: a diff on a machine without GPUs stays light."""
    probe = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from ckptkit.cli.main import cli\n"
        f"args = ['diff', '--stats', {str(run / 'ckpt-3.pt')!r}, {str(run / 'native' / 'step-6')!r}]\n"
        "result = CliRunner().invoke(cli, args)\n"
        "assert result.exit_code == 1, result.output\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
