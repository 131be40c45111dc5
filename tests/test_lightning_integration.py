"""CkptkitCheckpointIO under real ``pytorch_lightning.Trainer`` fits on CPU, on local disk and moto S3."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from lightning_fabric.utilities.data import AttributeDict
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from ckptkit.catalog import list_checkpoints, read_manifest
from ckptkit.commit import CheckpointTransaction
from ckptkit.errors import ChecksumMismatchError, NotCommittedError, NotFoundError, UnstorableValueError
from ckptkit.integrations.lightning import (
    EXTRA_FILE,
    CkptkitCheckpointIO,
    latest_committed_checkpoint,
    load_lightning_checkpoint,
    save_lightning_checkpoint,
)
from ckptkit.storage import open_store

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec"),
    pytest.mark.filterwarnings("ignore:.*exists and is not empty"),
    # The resumed runs keep checkpoints differently from the run they resume, on purpose.
    pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`"),
    pytest.mark.filterwarnings("ignore:The dirpath has changed"),
]

STEPS_PER_EPOCH = 4
# The monitored "score" of each epoch (lower is better). With save_top_k=2 the survivors are
# epochs 0 (1.0) and 3 (0.5): epoch 1 is evicted at epoch 2, epoch 2 at epoch 3.
SCORES = [1.0, 3.0, 2.0, 0.5]
EPOCHS = len(SCORES)


class TinyModule(pl.LightningModule):
    def __init__(self, lr: float = 0.05, hidden: int = 8) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(4, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1)
        )

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("score", SCORES[self.current_epoch])
        return loss

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.9)]


def make_data() -> DataLoader:
    gen = torch.Generator().manual_seed(1234)
    x = torch.randn(STEPS_PER_EPOCH * 4, 4, generator=gen)
    y = x.sum(dim=1, keepdim=True) + 0.1 * torch.randn(STEPS_PER_EPOCH * 4, 1, generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=4, shuffle=False)


def fit(
    dirpath: str,
    *,
    max_epochs: int,
    ckpt_path: str | None = None,
    io: CkptkitCheckpointIO | None = None,
    extra_callbacks: tuple[pl.Callback, ...] = (),
    **checkpoint_options: Any,
) -> tuple[pl.Trainer, TinyModule, ModelCheckpoint]:
    torch.manual_seed(0)  # identical initial weights in every run
    model = TinyModule()
    callback = ModelCheckpoint(dirpath=dirpath, **checkpoint_options)
    trainer = pl.Trainer(
        max_epochs=max_epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, plugins=[io or CkptkitCheckpointIO()],
        callbacks=[callback, *extra_callbacks],
    )
    trainer.fit(model, make_data(), ckpt_path=ckpt_path)
    return trainer, model, callback


@dataclass
class Run:
    dirpath: Path
    state_dict: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    global_step: int


def snapshot(trainer: pl.Trainer, model: TinyModule, dirpath: Path) -> Run:
    return Run(
        dirpath,
        OrderedDict((k, v.clone()) for k, v in model.state_dict().items()),
        trainer.optimizers[0].state_dict(),
        trainer.global_step,
    )


def assert_identical(a: Any, b: Any, where: str = "state") -> None:
    """Equal values, tensors bit for bit (same dtype, shape and bytes)."""
    assert type(a) is type(b), f"{where}: {type(a)} != {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        if a.is_sparse:
            a, b = a.to_dense(), b.to_dense()
        as_bytes = [t.contiguous().reshape(-1).view(torch.uint8) for t in (a, b)]
        assert torch.equal(*as_bytes), f"{where}: tensors differ"
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{where}: keys {list(a)} != {list(b)}"
        for key in a:
            assert_identical(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def verify_cli(url: str) -> dict[str, Any]:
    """``ckptkit verify --json`` on a root, as a user runs it; must exit 0."""
    result = subprocess.run(
        [sys.executable, "-m", "ckptkit", "verify", "--json", url],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def committed_names(url: str) -> set[str]:
    return {c.name for c in list_checkpoints(open_store(url)) if c.committed}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """An uninterrupted run, checkpointing each epoch, keeping the best 2 by "score" and last."""
    dirpath = tmp_path_factory.mktemp("lightning") / "ref"
    trainer, model, _ = fit(
        str(dirpath), max_epochs=EPOCHS, monitor="score", mode="min", save_top_k=2, save_last=True
    )
    return snapshot(trainer, model, dirpath)


# --- real fits --------------------------------------------------------------------------------


def test_every_saved_checkpoint_is_committed_and_verifies(reference: Run) -> None:
    report = verify_cli(str(reference.dirpath))
    names = {c["url"].rsplit("/", 1)[-1] for c in report["checkpoints"]}
    assert names == {"epoch=0-step=4.ckpt", "epoch=3-step=16.ckpt", "last.ckpt"}
    assert all(c["status"] == "ok" and c["layout"] == "native" for c in report["checkpoints"])
    # Nothing but committed checkpoints is left in the directory: no staging, no trash.
    assert sorted(p.name for p in reference.dirpath.iterdir()) == sorted(names)
    manifest = read_manifest(open_store(reference.dirpath / "epoch=3-step=16.ckpt"))
    assert manifest.step == 16 and manifest.metadata["epoch"] == 3


def test_save_top_k_keeps_exactly_the_best(reference: Run) -> None:
    # SCORES make epochs 1 and 2 the evicted ones; last.ckpt was rewritten each epoch in place.
    assert committed_names(str(reference.dirpath)) == {
        "epoch=0-step=4.ckpt", "epoch=3-step=16.ckpt", "last.ckpt"
    }
    last = load_lightning_checkpoint(reference.dirpath / "last.ckpt")
    assert last["global_step"] == reference.global_step == EPOCHS * STEPS_PER_EPOCH
    assert_identical(last["state_dict"], reference.state_dict)
    best = last["callbacks"][next(k for k in last["callbacks"] if k.startswith("ModelCheckpoint"))]
    assert Path(best["best_model_path"]).name == "epoch=3-step=16.ckpt"


class AttestOnTrainStart(pl.Callback):
    """Attests what Lightning restored, before the first step after the resume."""

    def __init__(self, checkpoint: str) -> None:
        self.checkpoint = checkpoint
        self.report: Any = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from ckptkit.attestation import attest

        self.report = attest(
            self.checkpoint, model=pl_module, optimizer=trainer.optimizers[0],
            scheduler=trainer.lr_scheduler_configs[0].scheduler,
        )


def test_resume_matches_uninterrupted_run_bit_for_bit(reference: Run, tmp_path: Path) -> None:
    start = str(reference.dirpath / "epoch=0-step=4.ckpt")
    attested = AttestOnTrainStart(start)
    trainer, model, _ = fit(
        str(tmp_path / "resumed"), max_epochs=EPOCHS, ckpt_path=start, save_top_k=-1,
        extra_callbacks=(attested,),
    )
    assert attested.report.ok and set(attested.report.compared) == {"model", "optimizer", "scheduler"}
    # Each checkpoint of the resumed run names the one it resumed from, and carries the hparams.
    parent = read_manifest(open_store(start))
    child = read_manifest(open_store(tmp_path / "resumed" / "epoch=1-step=8.ckpt")).metadata["lineage"]
    assert child["parent"]["checkpoint_id"] == parent.checkpoint_id
    assert child["data"] == {"epoch": 1, "global_step": 8}
    assert child["config_digest"] == parent.metadata["lineage"]["config_digest"] is not None
    assert trainer.global_step == reference.global_step
    assert_identical(model.state_dict(), reference.state_dict, "weights")
    assert_identical(trainer.optimizers[0].state_dict(), reference.optimizer, "optimizer")
    # The resumed run's own checkpoints continue the step numbering of the original.
    assert committed_names(str(tmp_path / "resumed")) == {
        f"epoch={e}-step={(e + 1) * STEPS_PER_EPOCH}.ckpt" for e in range(1, EPOCHS)
    }


@pytest.mark.slow  # Lightning fits against moto S3
def test_s3_fit_retention_and_resume(reference: Run, s3_bucket: str) -> None:
    run = f"{s3_bucket}/runs/tiny"
    fit(run, max_epochs=2, save_top_k=1)  # no monitor: keeps only the newest
    assert committed_names(run) == {"epoch=1-step=8.ckpt"}
    report = verify_cli(run)
    assert [c["status"] for c in report["checkpoints"]] == ["ok"]

    latest = latest_committed_checkpoint(run)
    assert latest == f"{run}/epoch=1-step=8.ckpt"
    trainer, model, _ = fit(f"{s3_bucket}/runs/resumed", max_epochs=EPOCHS, ckpt_path=latest, save_top_k=1)
    assert trainer.global_step == reference.global_step
    assert_identical(model.state_dict(), reference.state_dict, "weights")
    assert_identical(trainer.optimizers[0].state_dict(), reference.optimizer, "optimizer")
    assert committed_names(f"{s3_bucket}/runs/resumed") == {"epoch=3-step=16.ckpt"}


# --- uncommitted checkpoints ------------------------------------------------------------------


def half_write(root_url: str, name: str) -> None:
    """Leave ``name`` as a crashed save leaves it: data written, manifest never committed."""
    txn = CheckpointTransaction(open_store(root_url), name)
    txn.write("tree.json", b'{"format": "ckptkit.native"}')
    txn.write("tensors-00001-of-00001.safetensors", b"\x00" * 64)


def test_uncommitted_checkpoint_is_never_picked_local(tmp_path: Path) -> None:
    root = tmp_path / "run"
    io = CkptkitCheckpointIO()
    save_lightning_checkpoint(open_store(root), "epoch=0-step=4.ckpt", {"global_step": 4, "state_dict": {}})
    half_write(str(root), "epoch=9-step=99.ckpt")  # a hidden staging dir on local disk
    (root / "epoch=8-step=98.ckpt").mkdir()  # a visible directory without a manifest
    (root / "epoch=8-step=98.ckpt" / "tree.json").write_text("{}")

    assert latest_committed_checkpoint(root) == str(root / "epoch=0-step=4.ckpt")
    with pytest.raises(NotCommittedError, match="not a committed checkpoint"):
        io.load_checkpoint(root / "epoch=8-step=98.ckpt")
    with pytest.raises(NotCommittedError):
        fit(str(tmp_path / "out"), max_epochs=1, ckpt_path=str(root / "epoch=8-step=98.ckpt"))


@pytest.mark.slow  # Lightning fits against moto S3
def test_uncommitted_checkpoint_is_never_picked_s3(s3_bucket: str) -> None:
    run = f"{s3_bucket}/run"
    save_lightning_checkpoint(open_store(run), "epoch=0-step=4.ckpt", {"global_step": 4, "state_dict": {}})
    half_write(run, "epoch=9-step=99.ckpt")  # on S3 the data objects are visible, the manifest is not

    assert latest_committed_checkpoint(run) == f"{run}/epoch=0-step=4.ckpt"
    with pytest.raises(NotCommittedError, match="latest_committed_checkpoint"):
        CkptkitCheckpointIO().load_checkpoint(f"{run}/epoch=9-step=99.ckpt")


def test_a_committed_checkpoint_that_fails_verification_is_skipped(tmp_path: Path) -> None:
    root = open_store(tmp_path)
    for step in (4, 8):
        save_lightning_checkpoint(root, f"step={step}.ckpt", {"global_step": step, "w": torch.ones(64)})
    shard = next((tmp_path / "step=8.ckpt").glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-16])  # truncated after the commit
    assert latest_committed_checkpoint(tmp_path) == str(tmp_path / "step=4.ckpt")


def test_latest_of_an_empty_or_missing_dir_is_none(tmp_path: Path) -> None:
    assert latest_committed_checkpoint(tmp_path / "nothing-here") is None


# --- what the format keeps --------------------------------------------------------------------


def test_values_outside_the_native_format_round_trip(tmp_path: Path) -> None:
    checkpoint = {
        "global_step": 3,
        "state_dict": {"w": torch.arange(6.0).reshape(2, 3)},
        "hyper_parameters": AttributeDict(lr=0.1, layers=[AttributeDict(width=4)]),
        "extra": {"sparse": torch.eye(3).to_sparse(), "plain": (1, "two", 3.0)},
        "optimizer_states": [{"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": []}],
    }
    root = open_store(tmp_path)
    manifest = save_lightning_checkpoint(root, "x.ckpt", checkpoint)
    assert manifest.metadata["extra"] == EXTRA_FILE and manifest.step == 3

    loaded = load_lightning_checkpoint(tmp_path / "x.ckpt")
    assert_identical(loaded, checkpoint)
    assert loaded["hyper_parameters"].layers[0].width == 4  # AttributeDicts come back as such


def test_a_value_no_safe_load_could_read_is_refused_before_writing(tmp_path: Path) -> None:
    checkpoint = {"global_step": 1, "hyper_parameters": {"args": argparse.Namespace(lr=0.1)}}
    refused = r'state\["hyper_parameters"\]\["args"\].*add_safe_globals'
    with pytest.raises(UnstorableValueError, match=refused):
        save_lightning_checkpoint(open_store(tmp_path), "x.ckpt", checkpoint)
    assert list(tmp_path.iterdir()) == []


def test_allowlisted_class_is_stored_in_the_extra_blob(tmp_path: Path) -> None:
    checkpoint = {"global_step": 1, "args": argparse.Namespace(lr=0.1)}
    with torch.serialization.safe_globals([argparse.Namespace]):
        save_lightning_checkpoint(open_store(tmp_path), "x.ckpt", checkpoint)
        assert load_lightning_checkpoint(tmp_path / "x.ckpt")["args"] == argparse.Namespace(lr=0.1)


def test_corrupt_extra_blob_is_detected(tmp_path: Path) -> None:
    checkpoint = {"global_step": 1, "s": torch.eye(2).to_sparse()}
    save_lightning_checkpoint(open_store(tmp_path), "x.ckpt", checkpoint)
    blob = tmp_path / "x.ckpt" / EXTRA_FILE
    data = bytearray(blob.read_bytes())
    data[-30] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatchError, match=EXTRA_FILE):
        load_lightning_checkpoint(tmp_path / "x.ckpt")


def test_saving_a_name_again_replaces_it_and_remove_is_idempotent(tmp_path: Path) -> None:
    io = CkptkitCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.zeros(2)}, path)
    io.save_checkpoint({"global_step": 2, "w": torch.ones(2)}, path)
    assert_identical(io.load_checkpoint(path), {"global_step": 2, "w": torch.ones(2)})
    io.remove_checkpoint(path)
    io.remove_checkpoint(path)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(TypeError, match="storage_options"):
        io.save_checkpoint({"global_step": 3}, path, storage_options={"fsync": False})


# --- non-blocking saves -----------------------------------------------------------------------


@pytest.fixture
def slow_background(monkeypatch: pytest.MonkeyPatch) -> float:
    """Each non-blocking save sleeps this long in the background before it writes, so training
    (and the test) runs on while it is in flight."""
    import time

    from ckptkit.integrations import lightning

    delay = 0.2
    prepare = lightning.prepare_lightning_save

    def prepare_slow(*args: Any, **kwargs: Any) -> Any:
        job = prepare(*args, **kwargs)

        def slow_job() -> Any:
            time.sleep(delay)
            return job()

        return slow_job

    monkeypatch.setattr(lightning, "prepare_lightning_save", prepare_slow)
    return delay


class SnapshotAtSave(pl.Callback):
    """The weights and optimizer state as they are when Lightning hands a checkpoint to the IO."""

    def __init__(self) -> None:
        self.by_step: dict[int, dict[str, Any]] = {}

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        import copy

        self.by_step[checkpoint["global_step"]] = copy.deepcopy(
            {k: checkpoint[k] for k in ("state_dict", "optimizer_states", "lr_schedulers", "epoch")}
        )


class RecordingIO(CkptkitCheckpointIO):
    """Records, for each save, whether it was already committed when ``save_checkpoint`` returned."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.done_at_return: list[bool] = []

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        super().save_checkpoint(checkpoint, path, storage_options)
        assert self.last_handle is not None
        self.done_at_return.append(self.last_handle.done())


@pytest.mark.slow  # a Lightning fit whose saves each take 0.2 s more in the background
def test_non_blocking_fit_commits_each_epoch_as_it_was_at_the_save(
    slow_background: float, tmp_path: Path
) -> None:
    dirpath = tmp_path / "run"
    io = RecordingIO(blocking=False)
    snapshots = SnapshotAtSave()
    torch.manual_seed(0)
    model = TinyModule()
    trainer = pl.Trainer(
        max_epochs=EPOCHS, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, plugins=[io],
        callbacks=[ModelCheckpoint(dirpath=dirpath, save_top_k=-1), snapshots],
    )
    trainer.fit(model, make_data())

    assert io.done_at_return == [False] * EPOCHS  # fit went on while each save was in flight
    # fit's teardown waited for the last one: all committed, no staging debris left.
    names = {f"epoch={e}-step={(e + 1) * STEPS_PER_EPOCH}.ckpt" for e in range(EPOCHS)}
    assert committed_names(str(dirpath)) == names
    assert {p.name for p in dirpath.iterdir()} == names
    for name in names:
        saved = load_lightning_checkpoint(dirpath / name)
        # The optimizer stepped on after each save but the last: none of that leaked in.
        assert_identical({k: saved[k] for k in snapshots.by_step[saved["global_step"]]},
                         snapshots.by_step[saved["global_step"]], name)
    final = load_lightning_checkpoint(dirpath / "epoch=3-step=16.ckpt")
    assert_identical(final["state_dict"], model.state_dict())


def test_non_blocking_failure_is_raised_by_the_next_call_once(tmp_path: Path) -> None:
    (tmp_path / "blocked.ckpt").write_text("a file where the checkpoint directory must go")
    io = CkptkitCheckpointIO(blocking=False)
    io.save_checkpoint({"global_step": 1, "w": torch.ones(4)}, tmp_path / "blocked.ckpt")  # returns
    with pytest.raises(NotFoundError, match=r"blocked\.ckpt"):
        io.save_checkpoint({"global_step": 2, "w": torch.ones(4)}, tmp_path / "good.ckpt")
    # Raised once: the next save goes through, and teardown waits for it.
    io.save_checkpoint({"global_step": 3, "w": torch.full((4,), 3.0)}, tmp_path / "good.ckpt")
    io.teardown()
    assert committed_names(str(tmp_path)) == {"good.ckpt"}
    expected = {"global_step": 3, "w": torch.full((4,), 3.0)}
    assert_identical(io.load_checkpoint(tmp_path / "good.ckpt"), expected)

    io.save_checkpoint({"global_step": 4}, tmp_path / "blocked.ckpt")
    with pytest.raises(NotFoundError, match=r"blocked\.ckpt"):
        io.teardown()  # the end of fit: nothing is lost


def test_removing_the_checkpoint_in_flight_waits_for_it(slow_background: float, tmp_path: Path) -> None:
    io = CkptkitCheckpointIO(blocking=False)
    io.save_checkpoint({"global_step": 1, "w": torch.ones(4)}, tmp_path / "a.ckpt")
    io.remove_checkpoint(tmp_path / "a.ckpt")  # without waiting, the commit would bring it back
    io.teardown()
    assert list(tmp_path.iterdir()) == []
