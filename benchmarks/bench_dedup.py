"""What deduplication saves: a LoRA-like run on the CPU (a frozen ~100M-parameter base, rank-8
adapters trained with AdamW) checkpointed 10 times, with ``CheckpointManager(root, dedup=True)``
against ``CheckpointManager(root)`` and ``torch.save`` + fsync of the same state, and a full
fine-tune (everything trainable) to show what dedup costs when nothing repeats.

The base is a stack of ``--layers`` fp32 ``Linear(width, width)`` layers (default 24 × 2048²:
100.7M parameters, 403 MB), built once from a fixed seed; each carries LoRA A (rank × width)
and B (width × rank). Each round trains once from the same weights: ``--steps`` real steps
(forward, backward, AdamW) before each of ``--checkpoints`` checkpoints, at which every contender
saves the same ``{"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": N}``
(the base included, as a user who saves ``state_dict()`` does), blocking, into its own fresh
directory on the repo's disk. The contenders take turns, the order rotating at each checkpoint:
this VM's disk absorbs ~1 GB of writes fast and then slows several times over, so a contender
that always saved after another's gigabyte would pay for it. ``torch.save`` + fsync, a reference
rather than a target, saves only in the first ``--torch-rounds`` (default 1) rounds. Per round
and contender:

* **save s**: wall time of each blocking save (ckptkit: hash, write, fsync, commit; dedup: hash
  first, write only what is missing); the first checkpoint (dedup has nothing to share yet) is
  reported apart from the median of checkpoints 2..N;
* **bytes written**: after each save, the sizes of the inodes that appeared under the root since
  the previous save (a dedup checkpoint's hard links to its blobs count once, as the disk
  stores them once).

The full fine-tune (``--ft-layers``, default 8 layers: 33.8M parameters, AdamW over all of them,
0.41 GB of state per checkpoint, as much as the LoRA run's; ``--ft-layers 24`` for the 100M of
the LoRA base, 1.2 GB a checkpoint) runs the two managers the same way: every tensor changes
every step, so dedup can only add its cost (hashing each shard before writing it, a pin and a
lookup per blob, hard links).

The mirror: one more run of each manager (LoRA) with ``mirror="s3://..."`` to a moto server in a
child process (``_s3.MotoChild``); **bytes uploaded** are the request-body bytes that reached
moto between the first save and ``close()`` (which waits for the uploads), counted by the WSGI
meter in front of moto; the bucket's total object bytes under the run's prefix afterwards are
shown next to them. Bytes do not vary between rounds, so the mirror runs once (``--no-mirror``
skips it). After it, the newest mirrored checkpoint is verified at the mirror.

Each manager's newest checkpoint is loaded back after its first round and compared bit for bit
with the live model (base and adapters) and optimizer, so a contender that saved less than it
should fails the benchmark instead of winning it.

    .venv/bin/python benchmarks/bench_dedup.py [--rounds 3] [--checkpoints 10] [--steps 2]
        [--layers 24] [--width 2048] [--rank 8] [--batch 8] [--ft-layers 8] [--threads 2]
        [--torch-rounds 1] [--no-mirror] [--quick]

Defaults took 5.7 min on the 2-core machine of docs/performance.md (load average 2-4), 1.7 min
of it the mirror runs (4.6 GB into moto; ``--no-mirror`` skips them); ``--quick`` (6 layers of
1024², 4 checkpoints, 1 round) ~30 s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from _common import Result, fresh_dir, loadavg, main_for, table
from _s3 import CREDENTIALS, MotoChild, empty_prefix, object_sizes, s3_client
from torch import nn

from ckptkit import CheckpointManager
from ckptkit.catalog import list_checkpoints
from ckptkit.ops.verify import verify_checkpoint
from ckptkit.storage import open_store

BUCKET = "bench-dedup"
MB = 1e6

# --- the model ---------------------------------------------------------------------------------


class LoRALinear(nn.Module):
    """``base(x) + x Aᵀ Bᵀ``: B starts at zero, so the adapters start as a no-op (as in LoRA)."""

    def __init__(self, width: int, rank: int) -> None:
        super().__init__()
        self.base = nn.Linear(width, width)
        self.lora_a = nn.Parameter(torch.randn(rank, width) / width**0.5)
        self.lora_b = nn.Parameter(torch.zeros(width, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.T) @ self.lora_b.T


class Stack(nn.Module):
    def __init__(self, layers: int, width: int, rank: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(LoRALinear(width, rank) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


class Training:
    """One model and its initial weights; ``start`` resets both and makes a fresh AdamW, so each
    contender's run trains from the same point and saves the same bytes."""

    def __init__(self, layers: int, width: int, rank: int, batch: int, *, lora: bool, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.lora = lora
        self.model = Stack(layers, width, rank)
        for name, param in self.model.named_parameters():
            param.requires_grad_(not lora or "lora_" in name)
        self.initial = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.inputs, self.targets = torch.randn(batch, width), torch.randn(batch, width)
        self.optimizer: torch.optim.Optimizer | None = None

    def start(self) -> None:
        with torch.no_grad():
            for key, value in self.model.state_dict().items():
                value.copy_(self.initial[key])
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=1e-3)

    def step(self) -> None:
        assert self.optimizer is not None
        loss = nn.functional.mse_loss(self.model(self.inputs), self.targets)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def state(self, step: int) -> dict[str, Any]:
        assert self.optimizer is not None
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": step}

    def parameters(self) -> tuple[int, int]:
        """(all parameters, trainable parameters)."""
        params = list(self.model.parameters())
        return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def state_bytes(state: dict[str, Any]) -> int:
    tensors = list(state["model"].values())
    for slots in state["optimizer"]["state"].values():
        tensors += [t for t in slots.values() if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


# --- what is measured --------------------------------------------------------------------------


class NewBytes:
    """Bytes of the inodes that appeared under ``root`` since the last call: what a save added
    to the disk, each hard-linked file once."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.seen: set[tuple[int, int]] = set()

    def take(self) -> int:
        added = 0
        for dirpath, _, files in os.walk(self.root):
            for name in files:
                info = os.lstat(os.path.join(dirpath, name))
                if (info.st_dev, info.st_ino) not in self.seen:
                    self.seen.add((info.st_dev, info.st_ino))
                    added += info.st_size
        return added


Save = Callable[[int, dict[str, Any]], None]


@dataclass
class Run:
    """One contender's run: per save, its wall time and the bytes it added."""

    times: list[float] = field(default_factory=list)
    written: list[int] = field(default_factory=list)

    @property
    def first(self) -> float:
        return self.times[0]

    @property
    def later(self) -> float:
        return statistics.median(self.times[1:]) if len(self.times) > 1 else float("nan")


@dataclass
class Contender:
    """One saver into its own fresh root, and what its saves took."""

    name: str
    root: Path
    save: Save
    close: Callable[[], None]
    meter: NewBytes
    run: Run = field(default_factory=Run)


def contender(name: str, root: Path, saver: Callable[[Path], tuple[Save, Callable[[], None]]]) -> Contender:
    save, close = saver(root)
    return Contender(name, root, save, close, NewBytes(root))


def train_and_save(training: Training, contenders: list[Contender], checkpoints: int, steps: int) -> None:
    """Train once; after every ``steps`` steps each contender saves the same state. The order
    rotates by one at each checkpoint: this VM's disk takes ~1 GB of writes fast and then slows
    down several times over, so a contender that always saved right after another's gigabyte
    would pay for it."""
    training.start()
    for index in range(1, checkpoints + 1):
        for _ in range(steps):
            training.step()
        state = training.state(index * steps)
        shift = index % len(contenders)
        for each in contenders[shift:] + contenders[:shift]:
            start = time.perf_counter()
            each.save(index * steps, state)
            each.run.times.append(time.perf_counter() - start)
            each.run.written.append(each.meter.take())


def torch_saver(root: Path) -> tuple[Save, Callable[[], None]]:
    def save(step: int, state: dict[str, Any]) -> None:
        with open(root / f"step-{step}.pt", "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())

    return save, lambda: None


def manager_saver(root: Path, *, dedup: bool, mirror: str | None = None) -> tuple[Save, Callable[[], None]]:
    manager = CheckpointManager(root, dedup=dedup, mirror=mirror)

    def save(step: int, state: dict[str, Any]) -> None:
        manager.save(step, state)

    return save, manager.close


TORCH, PLAIN, DEDUP = "torch.save + fsync", "CheckpointManager", "CheckpointManager(dedup=True)"
SAVERS: dict[str, Callable[[Path], tuple[Save, Callable[[], None]]]] = {
    TORCH: torch_saver,
    PLAIN: lambda root: manager_saver(root, dedup=False),
    DEDUP: lambda root: manager_saver(root, dedup=True),
}


def hash_seconds(state: dict[str, Any], threads: int) -> float:
    """Wall time of BLAKE3 over every tensor of ``state`` on ``threads`` threads: the floor of a
    dedup save that finds every large tensor stored already (it still hashes each one)."""
    from concurrent.futures import ThreadPoolExecutor

    from ckptkit.hashing import StreamingDigest

    tensors = list(state["model"].values())
    for slots in state["optimizer"]["state"].values():
        tensors += [t for t in slots.values() if isinstance(t, torch.Tensor) and t.dim() > 0]

    def digest(tensor: torch.Tensor) -> str:
        hasher = StreamingDigest(algorithm="blake3")
        hasher.update(memoryview(tensor.contiguous().numpy()).cast("B"))
        return hasher.result().digest

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(digest, tensors))
    return time.perf_counter() - start


def check_loaded(root: Path, training: Training) -> None:
    """The newest checkpoint under ``root`` holds the live model and optimizer, bit for bit."""
    import ckptkit

    loaded = ckptkit.load(root)
    live = training.state(0)
    for key, value in live["model"].items():
        if not torch.equal(loaded["model"][key], value):
            raise AssertionError(f"{root}: model.{key} differs from the saved state")
    for pid, slots in live["optimizer"]["state"].items():
        for slot, value in slots.items():
            if not torch.equal(loaded["optimizer"]["state"][pid][slot], value):
                raise AssertionError(f"{root}: optimizer.state.{pid}.{slot} differs from the saved state")


def measure(training: Training, names: list[str], settings: Settings, label: str) -> dict[str, list[Run]]:
    runs: dict[str, list[Run]] = {name: [] for name in names}
    for round_ in range(settings.rounds):
        # torch.save is a reference, not a target: each of its rounds writes N whole states.
        playing = [n for n in names if n != TORCH or round_ < settings.torch_rounds]
        contenders = [contender(n, fresh_dir(f"dedup/{label}-{names.index(n)}"), SAVERS[n]) for n in playing]
        try:
            train_and_save(training, contenders, settings.checkpoints, settings.steps)
        finally:
            for each in contenders:
                each.close()
        for each in contenders:
            if round_ == 0 and each.name != TORCH:
                check_loaded(each.root, training)
            runs[each.name].append(each.run)
            print(f"  {label} round {round_ + 1}: {each.name}: first {each.run.first:.3f} s, later "
                  f"{each.run.later:.3f} s, {sum(each.run.written) / MB:.0f} MB", flush=True)
    fresh_dir("dedup")  # frees the disk for the next part
    return runs


@dataclass
class Mirrored:
    uploaded: int
    requests: dict[str, int]
    bucket_bytes: int
    wall_s: float
    newest_verifies: bool
    committed: int


def measure_mirror(training: Training, settings: Settings) -> dict[str, Mirrored]:
    moto = MotoChild()
    saved_env = dict(os.environ)
    os.environ.update(CREDENTIALS, AWS_ENDPOINT_URL=moto.url)
    results: dict[str, Mirrored] = {}
    try:
        client = s3_client(moto.url)
        client.create_bucket(Bucket=BUCKET)
        for index, (name, dedup) in enumerate([(PLAIN, False), (DEDUP, True)]):
            prefix, root = f"run-{index}", fresh_dir(f"dedup/mirror-{index}")
            url = f"s3://{BUCKET}/{prefix}"
            moto.take()
            start = time.perf_counter()
            mirroring = contender(name, root, partial(manager_saver, dedup=dedup, mirror=url))
            try:
                train_and_save(training, [mirroring], settings.checkpoints, settings.steps)
            finally:
                mirroring.close()  # waits for the uploads; raises if one failed
            wall = time.perf_counter() - start
            traffic = moto.take()
            target = open_store(url)
            committed = [c.name for c in list_checkpoints(target) if c.committed]
            verifies = bool(committed) and verify_checkpoint(target.child(committed[-1])).ok
            results[name] = Mirrored(traffic.bytes_in, traffic.requests,
                                     sum(object_sizes(client, BUCKET, prefix + "/").values()), wall,
                                     verifies, len(committed))
            print(f"  mirror: {name}: {traffic.bytes_in / MB:.0f} MB uploaded in {wall:.1f} s", flush=True)
            empty_prefix(client, BUCKET, prefix + "/")  # moto keeps objects in memory
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        moto.stop()
        fresh_dir("dedup")
    return results


# --- the benchmark -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    rounds: int = 3
    checkpoints: int = 10
    steps: int = 2
    layers: int = 24
    width: int = 2048
    rank: int = 8
    batch: int = 8
    ft_layers: int = 8
    torch_rounds: int = 1
    threads: int = 2
    mirror: bool = True
    quick: bool = False


QUICK = {"rounds": 1, "checkpoints": 4, "layers": 6, "width": 1024, "ft_layers": 6, "torch_rounds": 1}


@dataclass
class Part:
    """One model's measurements: its size and every contender's runs."""

    parameters: int
    trainable: int
    state_bytes: int
    runs: dict[str, list[Run]]


def measure_part(training: Training, names: list[str], settings: Settings, label: str) -> Part:
    training.start()
    training.step()  # AdamW's state exists from the first step on: size the state as saved
    parameters, trainable = training.parameters()
    size = state_bytes(training.state(0))
    return Part(parameters, trainable, size, measure(training, names, settings, label))


def run(**options: Any) -> Result:
    if options.get("quick"):
        options = {**options, **QUICK}
    settings = Settings(**options)
    result = Result("deduplicated checkpoints")
    result.data["loadavg_start"] = loadavg()
    torch.set_num_threads(settings.threads)

    lora = Training(settings.layers, settings.width, settings.rank, settings.batch, lora=True)
    lora.start()
    hashing = statistics.median(hash_seconds(lora.state(0), settings.threads) for _ in range(3))
    lora_part = measure_part(lora, [TORCH, PLAIN, DEDUP], settings, "lora")
    mirrored = measure_mirror(lora, settings) if settings.mirror else {}
    del lora
    full = Training(settings.ft_layers, settings.width, settings.rank, settings.batch, lora=False)
    full_part = measure_part(full, [PLAIN, DEDUP], settings, "full")

    report(result, settings, lora_part, mirrored, full_part, hashing)
    result.data["loadavg_end"] = loadavg()
    return result


def summary(runs: list[Run]) -> dict[str, float]:
    """Medians over rounds: first save, median of the later saves, bytes (equal in every round)."""
    return {
        "first_s": statistics.median(r.first for r in runs),
        "later_s": statistics.median(r.later for r in runs),
        "first_bytes": statistics.median(r.written[0] for r in runs),
        "later_bytes": statistics.median(sum(r.written[1:]) for r in runs),
        "total_bytes": statistics.median(sum(r.written) for r in runs),
    }


def save_table(runs: dict[str, list[Run]]) -> tuple[str, dict[str, dict[str, float]]]:
    sums = {name: summary(rs) for name, rs in runs.items()}
    ref = sums[PLAIN]
    rows = [[name, len(runs[name]), s["first_s"], s["later_s"], s["later_s"] / ref["later_s"],
             s["first_bytes"] / MB, s["later_bytes"] / MB, s["total_bytes"] / MB,
             s["total_bytes"] / ref["total_bytes"], " ".join(f"{r.later:.3f}" for r in runs[name])]
            for name, s in sums.items()]
    text = table(["contender", "rounds", "first save s", "later saves s (median)", "later s × no dedup",
                  "first save MB written", "saves 2..N MB written", "total MB written", "total MB × no dedup",
                  "later saves s per round"], rows)
    return text, sums


def report(result: Result, settings: Settings, lora: Part, mirrored: dict[str, Mirrored], full: Part,
           hashing: float) -> None:
    n = settings.checkpoints
    text, lora_sums = save_table(lora.runs)
    result.tables.append(
        f"LoRA-like run: frozen base of {settings.layers} × Linear({settings.width}, {settings.width}) fp32 "
        f"({lora.parameters / 1e6:.1f}M parameters, {lora.trainable / 1e6:.2f}M of them trainable: rank-"
        f"{settings.rank} A/B on every layer, AdamW), {lora.state_bytes / MB:.0f} MB of state per "
        f"checkpoint; {n} checkpoints, {settings.steps} training steps before each (batch {settings.batch}, "
        f"{settings.threads} torch threads); the contenders save in turn, medians over rounds. Bytes "
        f"written: the inodes each save added under the root (hard links once). {TORCH}: "
        f"{settings.torch_rounds} round(s), for reference. BLAKE3 of the whole state on {settings.threads} "
        f"threads (what a dedup save of unchanged tensors cannot avoid): {hashing:.3f} s (median of 3)."
        "\n\n" + text)
    if mirrored:
        plain = mirrored[PLAIN]
        rows = [[name, m.uploaded / MB, m.uploaded / plain.uploaded, m.bucket_bytes / MB, m.wall_s,
                 ", ".join(f"{k} {v}" for k, v in sorted(m.requests.items())), f"{m.committed} of {n}",
                 "yes" if m.newest_verifies else "**no**"]
                for name, m in mirrored.items()]
        result.tables.append(
            "The same LoRA run with `mirror=\"s3://...\"` to moto (one run each: bytes do not vary). "
            "Uploaded: request-body bytes that reached moto from the first save to `close()`; bucket: "
            "the objects' bytes under the run's prefix afterwards.\n\n"
            + table(["contender", "MB uploaded", "× no dedup", "MB in the bucket", "run + upload s",
                     "requests", "committed at the mirror", "newest verifies at the mirror"], rows))
    text, full_sums = save_table(full.runs)
    result.tables.append(
        f"Full fine-tune: {settings.ft_layers} × Linear({settings.width}, {settings.width}) fp32, all "
        f"{full.parameters / 1e6:.1f}M parameters trainable (AdamW), {full.state_bytes / MB:.0f} MB of state "
        f"per checkpoint, every tensor changing at every step; {n} checkpoints as above.\n\n" + text)

    dedup, plain_sums = lora_sums[DEDUP], lora_sums[PLAIN]
    result.target(f"LoRA: bytes written by {n} checkpoints, dedup ÷ no dedup",
                  dedup["total_bytes"] / plain_sums["total_bytes"], 0.15)
    result.target("LoRA: save time after the first checkpoint (median), dedup ÷ no dedup",
                  dedup["later_s"] / plain_sums["later_s"], 0.3)
    if mirrored:
        result.target(f"LoRA: bytes the mirror uploaded for {n} checkpoints, dedup ÷ no dedup",
                      mirrored[DEDUP].uploaded / mirrored[PLAIN].uploaded, 0.15)
    fdedup, fplain = full_sums[DEDUP], full_sums[PLAIN]
    result.target("full fine-tune: save time (median of saves 2..N), dedup ÷ no dedup",
                  fdedup["later_s"] / fplain["later_s"], 1.05)
    result.target("full fine-tune: bytes written, dedup ÷ no dedup",
                  fdedup["total_bytes"] / fplain["total_bytes"], 1.05)

    def part_json(part: Part, sums: dict[str, dict[str, float]]) -> dict[str, Any]:
        runs = {name: {"summary": sums[name], "runs": [asdict(r) for r in rs]}
                for name, rs in part.runs.items()}
        return {"parameters": part.parameters, "trainable": part.trainable, "state_bytes": part.state_bytes,
                "contenders": runs}

    result.data.update(settings=asdict(settings), hash_state_s=hashing, lora=part_json(lora, lora_sums),
                       mirror={name: asdict(m) for name, m in mirrored.items()},
                       full=part_json(full, full_sums))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--checkpoints", type=int, default=10)
    parser.add_argument("--steps", type=int, default=2, help="training steps before each save")
    parser.add_argument("--layers", type=int, default=24, help="Linear layers of the frozen LoRA base")
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--ft-layers", type=int, default=8, help="layers of the full fine-tune model")
    parser.add_argument("--torch-rounds", type=int, default=1,
                        help="rounds that include the torch.save reference (the first ones)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--no-mirror", dest="mirror", action="store_false", help="skip the S3 mirror runs")
    parser.add_argument("--quick", action="store_true", help="6 layers of 1024², 4 checkpoints, 1 round")
    main_for(run, **vars(parser.parse_args()))


if __name__ == "__main__":
    main()
