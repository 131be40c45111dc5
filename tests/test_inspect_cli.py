"""``ckptkit inspect`` end to end: JSON shape, exit codes, --stats, S3 transfer, no torch import."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import click
import pytest
from click.testing import CliRunner

from ckptkit.cli.inspect_cmd import inspect_command
from ckptkit.cli.main import cli as main_cli
from ckptkit.ops.inspect import inspect_path
from ckptkit.storage import Store, open_store
from ckptkit.storage.base import ObjectInfo

REPO = Path(__file__).resolve().parents[1]


@click.group()
@click.pass_context
def cli(ctx: click.Context) -> None:
    ctx.obj = {"storage_options": {}}


cli.add_command(inspect_command)


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["inspect", *args])
    return result.exit_code, result.output


def test_json_shape(hf_trainer_checkpoint) -> None:
    code, out = run(str(hf_trainer_checkpoint.checkpoints[6]), "--json")
    assert code == 0
    data = json.loads(out)
    assert {
        "url",
        "name",
        "layout",
        "ok",
        "views",
        "models",
        "optimizers",
        "zero",
        "schedulers",
        "scalers",
        "rng",
        "trainer_state",
        "resume",
        "notes",
        "problems",
    } <= set(data)
    assert data["ok"] is True and data["layout"] == "hf-trainer"
    assert data["optimizers"][0]["groups"][0]["lr"] == 0.000375
    assert data["schedulers"][0]["last_epoch"] == 6
    check = data["resume"]["checks"][0]
    assert check["quantity"] == "step" and check["status"] == "ok" and check["reference"] == 6
    assert {"source", "value", "status", "note"} == set(check["readings"][0])


def test_view_flags_select_tables(torch_checkpoints) -> None:
    code, out = run(str(torch_checkpoints.path("adamw_onecycle.pt")), "--scaler", "--scheduler")
    assert code == 0
    assert "torch GradScaler" in out and "OneCycleLR" in out and "3072" in out
    assert "resume check" not in out and "exp_avg" not in out
    code, out = run(str(torch_checkpoints.path("adamw_onecycle.pt")), "--scaler", "--json")
    assert set(json.loads(out)["views"]) == {"scaler"}


def test_disagreement_exits_1_and_errors_exit_by_kind(hf_trainer_checkpoint, tmp_path) -> None:
    copy = shutil.copytree(hf_trainer_checkpoint.checkpoints[12], tmp_path / "checkpoint-12")
    (copy / "scheduler.pt").unlink()
    shutil.copy(hf_trainer_checkpoint.checkpoints[6] / "scheduler.pt", copy / "scheduler.pt")
    code, out = run(str(copy))
    assert code == 1 and "DISAGREEMENT" in out and "mismatch" in out
    code, out = run(str(tmp_path / "missing"), "--json")
    assert code == 4 and json.loads(out)["error"]["type"] == "NotFoundError"


def test_stats_reads_values_and_counts_nan_inf(torch_checkpoints, tmp_path) -> None:
    import torch

    path = shutil.copy(torch_checkpoints.path("adamw_onecycle.pt"), tmp_path / "nan.pt")
    state = torch.load(path, weights_only=False)
    weight = state["model"]["0.weight"]
    weight[0, :3] = float("nan")
    weight[1, 0] = float("inf")
    weight[1, 1] = float("-inf")
    torch.save(state, path)
    finite = weight[torch.isfinite(weight)].double()

    report = inspect_path(path, ["model"], stats="model.0.weight")
    [stats] = report.stats
    assert (stats.nan, stats.inf, stats.shape) == (3, 2, [16, 8])
    assert stats.min == pytest.approx(float(finite.min()))
    assert stats.max == pytest.approx(float(finite.max()))
    assert stats.mean == pytest.approx(float(finite.mean()))
    assert stats.norm == pytest.approx(float(finite.norm()))
    code, out = run(str(path), "--model", "--stats", "*exp_avg_sq")
    assert code == 0 and out.count("optimizer.state.") == 6


def test_stats_on_safetensors_and_transposed_views(tmp_path) -> None:
    import torch
    from safetensors.torch import save_file

    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    save_file({"w": base.clone()}, str(tmp_path / "model.safetensors"))
    torch.save({"model": {"t": base.t()}}, tmp_path / "view.pt")  # a strided view of one storage
    [st] = inspect_path(tmp_path / "model.safetensors", ["model"], stats="w").stats
    [view] = inspect_path(tmp_path / "view.pt", ["model"], stats="model.t").stats
    assert (st.min, st.max, st.mean) == (0.0, 11.0, 5.5) == (view.min, view.max, view.mean)
    assert view.shape == [4, 3]


def test_inspect_never_imports_torch(hf_trainer_checkpoint, deepspeed_checkpoints) -> None:
    paths = [
        str(hf_trainer_checkpoint.checkpoints[12]),
        str(deepspeed_checkpoints["z2_fp16_overflow"].save_dir),
    ]
    code = (
        "import sys\n"
        "from ckptkit.cli.main import cli\n"
        "from ckptkit.cli.inspect_cmd import inspect_command\n"
        "cli.add_command(inspect_command)\n"
        f"for path in {paths!r}:\n"
        "    try:\n"
        "        cli(['inspect', path], standalone_mode=False)\n"
        "    except SystemExit as exc:\n"
        "        assert exc.code == 0, exc.code\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', 'numpy' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("NO-TORCH False"), proc.stdout[-500:]
    assert "resume check" in proc.stdout


def test_native_checkpoint_reads_tree_and_headers_only(tmp_path) -> None:
    import torch

    import ckptkit

    model = torch.nn.Linear(1024, 256)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5)
    model(torch.randn(2, 1024)).sum().backward()
    opt.step()
    sched.step()
    ckptkit.save(
        {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict()},
        tmp_path / "run" / "step-1",
        step=1,
    )
    counting = CountingStore(open_store(tmp_path / "run"))
    report = inspect_path(counting)
    assert report.layout == "native" and report.ok
    assert report.models[0].num_parameters == 1024 * 256 + 256
    assert report.optimizers[0].kind == "AdamW" and report.optimizers[0].steps == [1]
    assert report.schedulers[0].cls == "StepLR" and report.schedulers[0].last_epoch == 1
    tensor_bytes = sum(p.numel() * 4 for p in model.parameters()) * 3
    assert counting.read < tensor_bytes / 100  # tree.json and shard headers, no weights or moments


class CountingStore(Store):
    """Counts the bytes every read returns; children share the counter."""

    def __init__(self, inner: Store, counter: list[int] | None = None) -> None:
        self.inner, self.counter = inner, counter if counter is not None else [0]
        self.capabilities = inner.capabilities

    @property
    def read(self) -> int:
        return self.counter[0]

    @property
    def url(self) -> str:
        return self.inner.url

    def child(self, prefix: str) -> Store:
        return CountingStore(self.inner.child(prefix), self.counter)

    def get(self, key: str, start: int | None = None, end: int | None = None) -> bytes:
        data = self.inner.get(key, start, end)
        self.counter[0] += len(data)
        return data

    def open_read(self, key: str) -> BinaryIO:
        raise AssertionError("inspect reads with ranged gets only")

    def head(self, key: str) -> ObjectInfo:
        return self.inner.head(key)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        return self.inner.list(prefix)

    def list_dirs(self, prefix: str = "") -> list[str]:
        return self.inner.list_dirs(prefix)

    def put(self, key, data, mode="overwrite"):
        raise AssertionError("inspect never writes")

    def delete(self, key: str) -> None:
        raise AssertionError("inspect never writes")

    def copy(self, src: str, dst: str) -> None:
        raise AssertionError("inspect never writes")


def _hf_like_checkpoint(path: Path) -> int:
    """A Trainer-style checkpoint of a ~4M-parameter model after 3 AdamW steps: ~50 MB."""
    import random

    import numpy as np
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(16)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
    for _ in range(3):
        model(torch.randn(4, 512)).sum().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    path.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    torch.save(opt.state_dict(), path / "optimizer.pt")
    torch.save(sched.state_dict(), path / "scheduler.pt")
    torch.save(
        {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.get_rng_state()},
        path / "rng_state.pth",
    )
    log = [{"step": s, "learning_rate": 1e-3 / s, "loss": 1.0} for s in (1, 2, 3)]
    (path / "trainer_state.json").write_text(json.dumps({"global_step": 3, "epoch": 0.1, "log_history": log}))
    return sum(f.stat().st_size for f in path.iterdir())


def test_s3_transfers_under_one_percent(s3_bucket, tmp_path, hf_trainer_checkpoint) -> None:
    local = tmp_path / "checkpoint-3"
    size = _hf_like_checkpoint(local)
    remote = open_store(f"{s3_bucket}/run/checkpoint-3")
    for file in local.iterdir():
        remote.put(file.name, file.read_bytes())
    counting = CountingStore(remote)
    report = inspect_path(counting)
    assert report.ok and report.trainer_state.global_step == 3
    assert report.optimizers[0].steps == [3] and report.schedulers[0].last_epoch == 3
    assert report.models[0].num_parameters == 16 * (512 * 512 + 512)
    assert counting.read < size / 100, f"read {counting.read} of {size} bytes"

    # The real Trainer checkpoint reads the same over S3 as on disk.
    real = open_store(f"{s3_bucket}/run/checkpoint-12")
    for file in hf_trainer_checkpoint.checkpoints[12].iterdir():
        real.put(file.name, file.read_bytes())
    over_s3 = inspect_path(f"{s3_bucket}/run/checkpoint-12").to_json()
    on_disk = inspect_path(hf_trainer_checkpoint.checkpoints[12]).to_json()
    assert {k: v for k, v in over_s3.items() if k != "url"} == {
        k: v for k, v in on_disk.items() if k != "url"
    }


def test_registered_in_a_group_with_storage_options(torch_checkpoints) -> None:
    group = click.Group(commands={"inspect": inspect_command})
    result = CliRunner().invoke(
        group,
        ["inspect", str(torch_checkpoints.path("sequential.pt")), "--optimizer"],
        obj={"storage_options": {}},
    )
    assert result.exit_code == 0 and "SGD" in result.output
    assert main_cli.name == "cli"  # the real group stays untouched: main.py registers the command
