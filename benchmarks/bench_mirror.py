"""What checkpointing costs a training loop: ``CheckpointManager`` with and without an S3 mirror,
against ``torch.save`` + fsync at the same interval.

A small MLP (~50 MB of model + AdamW state) trains for ``--steps`` steps and saves every
``--every`` steps. Contenders, interleaved per round, each saving into a fresh directory:

* no checkpoints: the bare step time the others are compared with;
* ``torch.save`` of the same state into a file, then fsync (what a careful loop does);
* ``CheckpointManager(root)``: local commit (sha256, fsync, manifest);
* ``CheckpointManager(root, mirror="s3://...")``: the same, plus a background upload to moto.

The number is the mean wall time per step over the whole loop, saves included. The mirror's
final ``close()`` (waiting for the last upload) is timed separately: it is paid once per run,
not per step. The moto server runs in a child process, so its request handling does not hold
this process's GIL the way a remote S3 would not. torch runs with ``--threads`` intra-op
threads (default 1): on this 2-core machine a trainer using both cores would share them with the
upload thread and the S3 server, which on a GPU trainer talking to real S3 are not competing.

    .venv/bin/python benchmarks/bench_mirror.py [--steps 40] [--every 10] [--rounds 3] [--threads 1]
                                                [--batch 64]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil
import torch
from _common import Result, Row, fresh_dir, loadavg, main_for, table
from torch import nn

from ckptkit import CheckpointManager
from ckptkit.manifest import MANIFEST_NAME

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
BUCKET = "bench-mirror"
WIDTH, HIDDEN = 1024, 1408
# Prints the port once listening, then serves until its stdin closes (this process exiting).
_MOTO_CHILD = (
    "import logging, sys; from moto.server import ThreadedMotoServer; "
    "logging.getLogger('werkzeug').setLevel(logging.ERROR); "
    "s = ThreadedMotoServer(ip_address='127.0.0.1', port=0, verbose=False); s.start(); "
    "print(s.get_host_and_port()[1], flush=True); sys.stdin.read(); s.stop()"
)


# --- the training loop ---------------------------------------------------------------------------


class Trainer:
    """An MLP and AdamW; ``step()`` is one forward/backward/update on a fixed random batch."""

    def __init__(self, batch: int, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.model = nn.Sequential(nn.Linear(WIDTH, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, HIDDEN), nn.GELU(),
                                   nn.Linear(HIDDEN, WIDTH))
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.inputs, self.targets = torch.randn(batch, WIDTH), torch.randn(batch, WIDTH)

    def step(self) -> None:
        loss = nn.functional.mse_loss(self.model(self.inputs), self.targets)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def state(self, step: int) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": step}

    def state_bytes(self) -> int:
        tensors = [*self.model.state_dict().values()]
        for per_param in self.optimizer.state_dict()["state"].values():
            tensors += [t for t in per_param.values() if isinstance(t, torch.Tensor)]
        return sum(t.numel() * t.element_size() for t in tensors)


Saver = Callable[[int, dict[str, Any]], None]


@contextmanager
def no_saver(_: Path) -> Iterator[Saver | None]:
    yield None


@contextmanager
def torch_saver(root: Path) -> Iterator[Saver]:
    def save(step: int, state: dict[str, Any]) -> None:
        with open(root / f"step-{step}.pt", "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())

    yield save


@contextmanager
def manager_saver(root: Path, mirror: str | None = None) -> Iterator[Saver]:
    manager = CheckpointManager(root, mirror=mirror)

    def save(step: int, state: dict[str, Any]) -> None:
        manager.save(step, state)

    try:
        yield save
    finally:
        manager.close()  # with a mirror: waits for the uploads, raises if one failed


def train(trainer: Trainer, steps: int, every: int, save: Saver | None) -> list[float]:
    """Step times (seconds) of ``steps`` steps, each save counted in the step that made it."""
    times = []
    for step in range(1, steps + 1):
        start = time.perf_counter()
        trainer.step()
        if save is not None and step % every == 0:
            save(step, trainer.state(step))
        times.append(time.perf_counter() - start)
    return times


# --- the benchmark ---------------------------------------------------------------------------------


def start_moto_child() -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, "-c", _MOTO_CHILD], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    port = proc.stdout.readline().strip()
    if not port.isdigit():
        proc.kill()
        raise RuntimeError("the moto server child did not start")
    return proc, f"http://127.0.0.1:{port}"


@dataclass(frozen=True)
class Loop:
    steps: int = 40
    every: int = 10
    rounds: int = 3
    threads: int = 1
    batch: int = 64


def run(**settings: int) -> Result:
    loop = Loop(**settings)
    result = Result("training loop with checkpoints")
    result.data["loadavg_start"] = loadavg()
    torch.set_num_threads(loop.threads)
    moto, endpoint = start_moto_child()
    saved_env = dict(os.environ)
    os.environ.update(CREDENTIALS, AWS_ENDPOINT_URL=endpoint)
    try:
        import boto3

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
        trainer = Trainer(loop.batch)
        train(trainer, 5, loop.every, None)  # warm-up: first steps allocate and are slower
        rows = measure(trainer, loop, psutil.Process(moto.pid))
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        assert moto.stdin is not None
        moto.stdin.close()
        moto.wait(timeout=30)
    report(result, rows, trainer.state_bytes(), loop)
    result.data["loadavg_end"] = loadavg()
    return result


CONTENDERS = ["no checkpoints", "torch.save + fsync", "CheckpointManager", "CheckpointManager + S3 mirror"]


def saver_for(name: str, root: Path, mirror: str) -> AbstractContextManager[Saver | None]:
    if name == "no checkpoints":
        return no_saver(root)
    if name.startswith("torch"):
        return torch_saver(root)
    return manager_saver(root, mirror if name.endswith("mirror") else None)


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def measure(trainer: Trainer, loop: Loop, server: psutil.Process) -> dict[str, Row]:
    rows = {name: Row(name) for name in CONTENDERS}
    for round_ in range(loop.rounds):
        for index, name in enumerate(CONTENDERS):
            row, mirror = rows[name], f"round-{round_}"
            server_cpu = cpu_seconds(server)
            with saver_for(name, fresh_dir(f"mirror/{index}"), f"s3://{BUCKET}/{mirror}") as save:
                times = train(trainer, loop.steps, loop.every, save)
                closing = time.perf_counter()
            if name.endswith("mirror"):  # leaving the block closed the manager: waited for the uploads
                row.extra.setdefault("close_wait_s", []).append(time.perf_counter() - closing)
                # CPU the S3 server took on this machine: a remote S3 would not take it from training.
                row.extra.setdefault("server_cpu_s", []).append(cpu_seconds(server) - server_cpu)
                row.extra.setdefault("mirrored", []).append(mirrored_checkpoints(mirror + "/"))
            row.times.append(statistics.fmean(times))
            # Save steps show what blocks the loop; the others what background work takes from it.
            save_steps = [t for i, t in enumerate(times, 1) if i % loop.every == 0]
            other_steps = [t for i, t in enumerate(times, 1) if i % loop.every]
            row.extra.setdefault("save_step_s", []).append(statistics.fmean(save_steps))
            row.extra.setdefault("other_step_s", []).append(statistics.median(other_steps))
    return rows


def mirrored_checkpoints(prefix: str) -> list[str]:
    """Checkpoints committed at the mirror: their manifests under the round's prefix."""
    import boto3

    listing = boto3.client("s3").list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return sorted(o["Key"].split("/")[1] for o in listing.get("Contents", [])
                  if o["Key"].endswith(MANIFEST_NAME))


def report(result: Result, rows: dict[str, Row], state_bytes: int, loop: Loop) -> None:
    base = rows["no checkpoints"].median
    torch_row, manager, mirrored = (rows[n] for n in CONTENDERS[1:])
    saves = loop.steps // loop.every
    result.tables.append(
        f"MLP, {state_bytes / 1e6:.0f} MB model + AdamW state, {loop.steps} steps, a save every {loop.every} "
        f"({saves} saves), batch {loop.batch}, torch threads {loop.threads}; median over {loop.rounds} "
        f"interleaved rounds of the mean step time:\n\n"
        + table(["contender", "mean step ms", "× no checkpoints", "× torch.save+fsync", "save step ms",
                 "other steps ms (median)", "all rounds ms"],
                [[r.name, r.median * 1e3, r.median / base, r.median / torch_row.median,
                  statistics.median(r.extra["save_step_s"]) * 1e3,
                  statistics.median(r.extra["other_step_s"]) * 1e3,
                  " ".join(f"{t * 1e3:.1f}" for t in r.times)] for r in rows.values()])
        + "\n\nMirror close (waiting for the last upload): median "
        f"{statistics.median(mirrored.extra['close_wait_s']):.2f} s; committed at the mirror per round: "
        f"{[len(m) for m in mirrored.extra['mirrored']]} of {saves}; CPU seconds the local S3 server "
        f"(moto) used per round: {' '.join(f'{c:.1f}' for c in mirrored.extra['server_cpu_s'])} "
        f"(loop wall time ≈ {loop.steps * mirrored.median:.1f} s)."
    )
    result.target("mean step: manager + mirror ÷ manager", mirrored.median / manager.median, 1.10)
    result.target("mean step: manager ÷ torch.save+fsync", manager.median / torch_row.median, 1.10)
    result.data.update(state_bytes=state_bytes, loop=asdict(loop), rows=[r.__dict__ for r in rows.values()])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--batch", type=int, default=64, help="rows per step: sets the step time")
    args = parser.parse_args()
    main_for(run, **vars(args))


if __name__ == "__main__":
    main()
