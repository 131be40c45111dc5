"""How long a checkpoint stops training: a ~106M-parameter model + AdamW (1.27 GB of state)
trains on the CPU and saves every ``--every`` steps, once per contender, side by side.

Contenders, each in its own subprocess (so its peak RSS is its own), interleaved per round:

* no checkpoints: the bare loop the others are compared with;
* ``torch.save`` + fsync of one file;
* ``ckptkit.save`` (blocking: hash, write, fsync, commit before it returns);
* ``CheckpointManager.save(blocking=False)``: returns once the state is staged; the rest runs in
  the background (printed as "not available" where ckptkit has no ``blocking=`` yet);
* DCP ``save`` with ``FileSystemWriter`` (blocking);
* DCP ``async_save``, thread executor, staged by the writer itself (``BlockingAsyncStager``: a
  fresh CPU copy per save; its ``cache_staged_state_dict=True`` pins memory, which fails on CPU);
* DCP ``async_save``, thread executor, ``DefaultStager(StagingOptions(False, False, True,
  False))``: reused buffers filled by a background copy; the loop waits for that copy before the
  next optimizer step, the earliest point at which training may mutate the tensors;
* DCP ``async_save``, process executor (its daemon is started by an untimed save before the loop:
  a once-per-job cost);
* DCP ``async_save`` (thread) with ckptkit's ``CkptkitWriter``, where it exists.

DCP contenders run in a 1-rank gloo group (async_save needs a CPU backend) and save the same
tree as the others (``{"model": ..., "optimizer": ..., "step": N}``).

Per contender and round: the **stall** of each save (the call's wall time until it hands
control back to training, plus any wait the next save or the next optimizer step imposes on it:
back-pressure, or DCP's documented ``future.result()`` before the next ``async_save``); the
**mean step time** of the loop with saves against the loop without; the **drain** (waiting for
the last background save after the loop, paid once per run); and **extra peak RSS** (peak RSS of
the contender's process tree, sampled every 20 ms, minus that of the no-checkpoint loop in the
same round) against the state's size. After the loop each contender reads one parameter back
from its newest checkpoint and checks it bit for bit against the value at save time, so a
contender whose background work lost or mixed up data fails the benchmark instead of winning.

A save happens after steps 1, 1 + every, 1 + 2·every, ...: every save, the last one included,
is followed by ``every - 1`` training steps its background work can overlap. The defaults (12
steps of 4×128 tokens, ~2.7 s each here, a save every 4) give each save ~8 s of training to hide
behind: a background save of 1.27 GB to this disk took 7–10 s in the loop (every async
contender alike). Shorter steps measure back-pressure instead of overlap; a much longer
interval would hide any stall in the mean step time. Checkpoints go to
``benchmarks/out/work`` (disk, not tmpfs); before each contender's run the page cache is written
back and dropped (root only; the table says whether it was), so no run pays for the previous
one's writeback. torch runs with ``--threads`` intra-op threads (default 1): on this 2-core
machine one core trains and one is left to the background work, as a GPU trainer would leave
its host cores.

    .venv/bin/python benchmarks/bench_stall.py [--rounds 3] [--steps 12] [--every 4] [--batch 4]
        [--seq 128] [--threads 1] [--device cpu|cuda] [--only NAME,...] [--quick]

``--only`` takes none, torch, ckptkit, ckptkit-nb, dcp, dcp-thread, dcp-stager, dcp-process,
dcp-ckptkit (the no-checkpoint loop always runs). The default 3 rounds take ~23 min on the 2-core
machine; ``--quick`` (a 0.33 GB state, 6 steps, one round) ~2 min. ``--device cuda`` trains on a
GPU (untested here: no GPU on this machine).
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from _common import GB, Result, Row, drop_caches, fresh_dir, loadavg, main_for, table
from _model import Config, TinyLM
from _procs import run_tool

# --- contenders: each runs in a child process --------------------------------------------------------


class Saver:
    """What the loop calls: ``save`` returns when training may go on; ``finish`` drains."""

    needs_process_group = False

    def __init__(self, root: Path) -> None:
        self.root = root
        self.background: list[float] = []  # per save: seconds from the call to its commit
        self._watchers: list[threading.Thread] = []

    def start(self) -> None:
        """Untimed setup before the loop."""

    def save(self, step: int, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def before_update(self) -> None:
        """Called before each optimizer step: where a saver whose staging is still running waits."""

    def finish(self) -> None:
        """Wait for everything in flight (timed separately: paid once per run, not per save)."""

    def read_back(self, key: str) -> Any:
        """The tensor ``model.<key>`` of the newest checkpoint."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what ``start`` made, after the read-back."""

    def watch(self, done: Callable[[], bool], called: float) -> None:
        """Note when a background save is done. Polled every 10 ms, not waited on: a ckptkit
        handle's ``wait()`` would take the failure report away from the manager."""

        def poll() -> None:
            while not done():
                time.sleep(0.01)
            self.background.append(time.perf_counter() - called)

        self._watchers.append(threading.Thread(target=poll, daemon=True))
        self._watchers[-1].start()

    def background_times(self) -> list[float]:
        for thread in self._watchers:
            thread.join()
        return self.background


class TorchSaver(Saver):
    def save(self, step: int, state: dict[str, Any]) -> None:
        import torch

        with open(self.root / f"step-{step}.pt", "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        self.last = self.root / f"step-{step}.pt"

    def read_back(self, key: str) -> Any:
        import torch

        return torch.load(self.last, mmap=True, weights_only=True)["model"][key]


class CkptkitSaver(Saver):
    def save(self, step: int, state: dict[str, Any]) -> None:
        import ckptkit

        ckptkit.save(state, self.root / f"step-{step}", step=step)

    def read_back(self, key: str) -> Any:
        import ckptkit

        return ckptkit.load(self.root, keys=["model"])["model"][key]  # the root: its latest commit


class ManagerNonBlockingSaver(CkptkitSaver):
    def start(self) -> None:
        from ckptkit import CheckpointManager

        self.manager = CheckpointManager(self.root)

    def save(self, step: int, state: dict[str, Any]) -> None:
        called = time.perf_counter()
        handle = self.manager.save(step, state, blocking=False)  # waits for the previous one: back-pressure
        self.watch(handle.done, called)

    def finish(self) -> None:
        self.manager.close()  # waits for the last save; raises a background failure


def non_blocking_missing() -> str | None:
    from ckptkit import CheckpointManager

    if "blocking" not in inspect.signature(CheckpointManager.save).parameters:
        return "CheckpointManager.save has no blocking= yet"
    return None


class DcpSaver(Saver):
    """``dcp.save`` with ``FileSystemWriter``; subclasses save asynchronously."""

    needs_process_group = True

    def writer(self, path: Path) -> Any:
        from torch.distributed.checkpoint import FileSystemWriter

        return FileSystemWriter(path)

    def save(self, step: int, state: dict[str, Any]) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.save(state, storage_writer=self.writer(self.root / f"step-{step}"))
        self.last = self.root / f"step-{step}"

    def reader(self) -> Any:
        from torch.distributed.checkpoint import FileSystemReader

        return FileSystemReader(self.last)

    def read_back(self, key: str) -> Any:
        import torch
        import torch.distributed.checkpoint as dcp

        size = self.reader().read_metadata().state_dict_metadata[f"model.{key}"].size
        wanted = {"model": {key: torch.empty(size)}}
        dcp.load(wanted, storage_reader=self.reader())
        return wanted["model"][key]


class DcpAsyncSaver(DcpSaver):
    """``dcp.async_save``; the documented pattern waits for the previous save's future first."""

    process = False

    def start(self) -> None:
        self.pending: Any = None
        if self.process:  # spawns the daemon and its gloo world: once per job, so not timed
            import torch

            self.save(0, {"warm": torch.zeros(1)})
            self.finish()
            self.background_times().clear()

    def stager(self) -> Any:
        return None  # the writer stages (FileSystemWriter is a BlockingAsyncStager)

    def save(self, step: int, state: dict[str, Any]) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

        self.finish()
        kind = AsyncCheckpointerType.PROCESS if self.process else AsyncCheckpointerType.THREAD
        path, called = self.root / f"step-{step}", time.perf_counter()
        self.pending = dcp.async_save(state, storage_writer=self.writer(path), async_checkpointer_type=kind,
                                      async_stager=self.stager())
        self.watch(getattr(self.pending, "upload_completion", self.pending).done, called)
        self.last = path

    def finish(self) -> None:
        if self.pending is not None:
            upload = getattr(self.pending, "upload_completion", self.pending)
            upload.result()
            self.pending = None


class DcpAsyncStagingSaver(DcpAsyncSaver):
    """Staging itself in the background, into buffers the stager keeps between saves."""

    def start(self) -> None:
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        self._stager = DefaultStager(StagingOptions(use_pinned_memory=False, use_shared_memory=False,
                                                    use_async_staging=True, use_non_blocking_copy=False))
        super().start()

    def stager(self) -> Any:
        return self._stager

    def before_update(self) -> None:
        if self.pending is not None:
            self.pending.staging_completion.result()

    def close(self) -> None:
        self._stager.close()


class DcpProcessSaver(DcpAsyncSaver):
    process = True


class CkptkitWriterAsyncSaver(DcpAsyncSaver):
    def writer(self, path: Path) -> Any:
        from ckptkit.integrations.dcp import CkptkitWriter

        return CkptkitWriter(path)

    def reader(self) -> Any:
        from ckptkit.integrations.dcp import CkptkitReader

        return CkptkitReader(self.last)


def ckptkit_writer_missing() -> str | None:
    try:
        from ckptkit.integrations.dcp import CkptkitWriter  # noqa: F401
    except ImportError as exc:
        return f"ckptkit.integrations.dcp.CkptkitWriter not importable ({exc})"
    return None


# Short names (for --only) of the contenders, in table order.
NONE, TORCH, CKPTKIT, NON_BLOCKING = "none", "torch", "ckptkit", "ckptkit-nb"
DCP, DCP_THREAD, DCP_STAGER = "dcp", "dcp-thread", "dcp-stager"
DCP_PROCESS, DCP_CKPTKIT = "dcp-process", "dcp-ckptkit"
CONTENDERS: dict[str, tuple[str, type[Saver] | None]] = {
    NONE: ("no checkpoints", None),
    TORCH: ("torch.save + fsync", TorchSaver),
    CKPTKIT: ("ckptkit.save (blocking)", CkptkitSaver),
    NON_BLOCKING: ("ckptkit non-blocking (CheckpointManager.save(blocking=False))", ManagerNonBlockingSaver),
    DCP: ("DCP save (FileSystemWriter)", DcpSaver),
    DCP_THREAD: ("DCP async_save (thread, writer stages)", DcpAsyncSaver),
    DCP_STAGER: ("DCP async_save (thread, async DefaultStager)", DcpAsyncStagingSaver),
    DCP_PROCESS: ("DCP async_save (process, writer stages)", DcpProcessSaver),
    DCP_CKPTKIT: ("DCP async_save (thread) + CkptkitWriter", CkptkitWriterAsyncSaver),
}
DCP_ASYNC = [DCP_THREAD, DCP_STAGER, DCP_PROCESS]
MISSING = {NON_BLOCKING: non_blocking_missing, DCP_CKPTKIT: ckptkit_writer_missing}
QUICK_MODEL = Config(vocab=8000, width=512, layers=6, heads=8, ffn=2048)  # ~27M parameters, 0.32 GB
CHECKED = "norm.weight"  # the parameter read back after the loop (changes every optimizer step)

# --- the training loop, in the child ----------------------------------------------------------------


@dataclass(frozen=True)
class Loop:
    rounds: int = 3
    steps: int = 12
    every: int = 4
    batch: int = 4
    seq: int = 128
    threads: int = 1
    device: str = "cpu"
    only: str = ""
    quick: bool = False


class Trainer:
    """The ~106M-parameter model of ``_model`` with AdamW, on a fixed random batch of tokens."""

    def __init__(self, loop: Loop) -> None:
        import torch

        cfg = QUICK_MODEL if loop.quick else Config()
        torch.manual_seed(0)
        self.model = TinyLM(cfg).to(loop.device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.tokens = torch.randint(0, cfg.vocab, (loop.batch, loop.seq), device=loop.device)

    def forward_backward(self) -> None:
        from torch import nn

        logits = self.model(self.tokens)
        nn.functional.cross_entropy(logits.flatten(0, 1), self.tokens.flatten()).backward()

    def update(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def state(self, step: int) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": step}


def state_bytes(state: dict[str, Any]) -> int:
    import torch

    total = sum(t.numel() * t.element_size() for t in state["model"].values())
    for slots in state["optimizer"]["state"].values():
        total += sum(t.numel() * t.element_size() for t in slots.values() if isinstance(t, torch.Tensor))
    return total


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def train(trainer: Trainer, loop: Loop, saver: Saver | None) -> dict[str, Any]:
    """Step times and per-save stalls; each stall counted in the step that paid it."""
    step_times, stalls, expected = [], [], None
    for step in range(1, loop.steps + 1):
        start = time.perf_counter()
        trainer.forward_backward()
        if saver is not None:
            waited = time.perf_counter()
            saver.before_update()
            if stalls:
                stalls[-1] += time.perf_counter() - waited
        trainer.update()
        if saver is not None and (step - 1) % loop.every == 0:
            called = time.perf_counter()
            saver.save(step, trainer.state(step))
            stalls.append(time.perf_counter() - called)
            # Untimed: the value this save must hold, whatever the optimizer does to it afterwards.
            expected = trainer.model.state_dict()[CHECKED].detach().to("cpu", copy=True)
        step_times.append(time.perf_counter() - start)
    return {"step_times": step_times, "stalls": stalls, "expected": expected}


def child(name: str, loop: Loop, root: Path) -> None:
    """Run one contender's loop; print its numbers as one JSON line."""
    import torch

    torch.set_num_threads(loop.threads)
    saver_type = CONTENDERS[name][1]
    saver = saver_type(root) if saver_type is not None else None
    if saver is not None and saver.needs_process_group:
        import torch.distributed as dist

        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    trainer = Trainer(loop)
    for _ in range(2):  # warm-up: the first steps allocate AdamW's state and are slower
        trainer.forward_backward()
        trainer.update()
    nbytes = state_bytes(trainer.state(0))
    if saver is not None:
        saver.start()
    gc.collect()
    rss_before = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5\n")  # VmHWM := current RSS
    loop_start = time.perf_counter()
    run = train(trainer, loop, saver)
    drain_start = time.perf_counter()
    if saver is not None:
        saver.finish()
    drain = time.perf_counter() - drain_start
    total = time.perf_counter() - loop_start
    own_peak = _status_kb("VmHWM")
    if saver is not None:
        got = saver.read_back(CHECKED)
        if not torch.equal(got.cpu(), run["expected"]):
            raise SystemExit(f"{name}: {CHECKED} of the newest checkpoint is not its value at save time")
        saver.close()
    print(json.dumps({"step_times": run["step_times"], "stalls": run["stalls"], "drain_s": drain,
                      "background_s": saver.background_times() if saver is not None else [],
                      "loop_s": total, "state_bytes": nbytes, "rss_before_mb": rss_before / 1024,
                      "own_extra_mb": (own_peak - rss_before) / 1024}))
    if saver is not None and saver.needs_process_group:
        import torch.distributed as dist

        dist.destroy_process_group()


# --- the parent: rounds, subprocesses, table ---------------------------------------------------------


def run_child(name: str, loop: Loop, root: Path) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k != "CKPTKIT_DIGEST"}
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--root", str(root),
            "--settings", json.dumps(asdict(loop))]
    tool = run_tool(argv, env, timeout=1200)
    line = tool.stdout.strip().splitlines()[-1]
    data: dict[str, Any] = json.loads(line)
    data.update(peak_rss_mb=tool.peak_rss / 2**20, wall_s=tool.seconds, cpu_s=tool.cpu_seconds)
    return data


def selected(loop: Loop) -> tuple[list[str], dict[str, str]]:
    wanted = [n.strip() for n in loop.only.split(",") if n.strip()] or list(CONTENDERS)
    unknown = sorted(set(wanted) - set(CONTENDERS))
    if unknown:
        raise SystemExit(f"unknown contender(s): {', '.join(unknown)}; known: {', '.join(CONTENDERS)}")
    names = [NONE] + [n for n in CONTENDERS if n in wanted and n != NONE]
    skipped = {}
    for name in list(names):
        reason = MISSING[name]() if name in MISSING else None
        if reason:
            skipped[CONTENDERS[name][0]] = reason
            names.remove(name)
    return names, skipped


def run(**settings: Any) -> Result:
    loop = Loop(**settings)
    if loop.quick:
        loop = replace(loop, steps=min(loop.steps, 6), every=min(loop.every, 3))
    result = Result("save stall in a training loop")
    result.data["loadavg_start"] = loadavg()
    names, skipped = selected(loop)
    rows = {name: Row(CONTENDERS[name][0]) for name in names}
    dropped = []
    for _ in range(loop.rounds):
        for index, name in enumerate(names):
            root = fresh_dir(f"stall/{index}")
            dropped.append(drop_caches())  # untimed: the previous run's writeback is not the next one's
            data = run_child(name, loop, root)
            fresh_dir(f"stall/{index}")  # frees the disk before the next contender runs
            rows[name].times.append(statistics.fmean(data["step_times"]))
            for key, value in data.items():
                rows[name].extra.setdefault(key, []).append(value)
    report(result, rows, skipped, loop, all(dropped))
    result.data["loadavg_end"] = loadavg()
    return result


def _median_or_dash(values: list[float], scale: float = 1.0) -> float | str:
    return statistics.median(values) * scale if values else "-"


def report(result: Result, rows: dict[str, Row], skipped: dict[str, str], loop: Loop, dropped: bool) -> None:
    base = rows[NONE]
    nbytes = base.extra["state_bytes"][0]
    saves = len(range(1, loop.steps + 1, loop.every))

    def stall(row: Row) -> float:
        return statistics.median(s for run in row.extra["stalls"] for s in run) if row is not base else 0.0

    def against_base(row: Row, key: str) -> float:  # the no-checkpoint loop of the same round
        return statistics.median(c - b for c, b in zip(row.extra[key], base.extra[key], strict=True))

    def unstalled(row: Row) -> float:
        """Mean step time with the stalls taken out: what the background work costs training."""
        runs = zip(row.extra["step_times"], row.extra["stalls"], strict=True)
        return statistics.median((sum(times) - sum(stalls)) / len(times) for times, stalls in runs)

    torch_stall = stall(rows[TORCH]) if TORCH in rows else float("nan")
    body = []
    for row in rows.values():
        first = [run[0] for run in row.extra["stalls"] if run]
        later = [s for run in row.extra["stalls"] for s in run[1:]]
        body.append([
            row.name, stall(row) * 1e3, _median_or_dash(first, 1e3), _median_or_dash(later, 1e3),
            stall(row) / torch_stall if row is not base else "-",
            _median_or_dash([b for run in row.extra["background_s"] for b in run]),
            row.median * 1e3, row.median / base.median, unstalled(row) / unstalled(base),
            statistics.median(row.extra["drain_s"]) * 1e3 if any(row.extra["background_s"]) else "-",
            against_base(row, "cpu_s"), against_base(row, "peak_rss_mb"),
            against_base(row, "peak_rss_mb") * 2**20 / nbytes,
            " ".join(f"{t * 1e3:.0f}" for t in row.times),
        ])
    result.tables.append(
        f"TinyLM ({loop.device}), {nbytes / GB:.2f} GB of model + AdamW state, batch {loop.batch}×{loop.seq} "
        f"tokens, {loop.steps} steps, a save after steps 1, 1+{loop.every}, … ({saves} saves), torch threads "
        f"{loop.threads}; {loop.rounds} interleaved rounds, each contender in its own process; page cache "
        f"dropped before each run: {'yes' if dropped else 'no (not root)'}. Stall: median over every save "
        "of every round (first save: buffers allocated; later saves: reused). Background: save call to "
        "commit. Without stalls: the mean step time less the stalls, what background work costs the "
        "steps it overlaps. Mean step time, drain (the wait for the last save after the loop), extra CPU "
        "seconds and extra peak RSS (process tree) against the no-checkpoint loop of the same round: "
        "medians over rounds.\n\n"
        + table(["contender", "stall ms", "first save ms", "later saves ms", "stall × torch.save+fsync",
                 "background s", "mean step ms", "× no checkpoints", "without stalls × no checkpoints",
                 "drain ms", "extra CPU s", "extra peak RSS MB", "× state size", "mean step per round ms"],
                body)
        + "".join(f"\n\n{name}: not available ({why})" for name, why in skipped.items())
    )
    if NON_BLOCKING in rows:
        nb = rows[NON_BLOCKING]
        result.target("stall: ckptkit non-blocking ÷ torch.save+fsync", stall(nb) / torch_stall, 0.2)
        if DCP_THREAD in rows:  # what async_save does with its defaults and FileSystemWriter
            result.target("stall: ckptkit non-blocking ÷ DCP async_save (thread, writer stages)",
                          stall(nb) / stall(rows[DCP_THREAD]), 1.0)
        dcp_async = [rows[n] for n in DCP_ASYNC if n in rows]
        if dcp_async:
            best = min(dcp_async, key=stall)
            result.target(f"stall: ckptkit non-blocking ÷ the best DCP async_save ({best.name})",
                          stall(nb) / stall(best), 1.0)
        result.target("mean step: ckptkit non-blocking ÷ no checkpoints", nb.median / base.median, 1.05)
        result.target("extra peak RSS: ckptkit non-blocking ÷ state size",
                      against_base(nb, "peak_rss_mb") * 2**20 / nbytes, 1.1)
    result.data.update(state_bytes=nbytes, loop=asdict(loop), skipped=skipped, caches_dropped=dropped,
                       rows=[r.__dict__ for r in rows.values()])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--every", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4, help="sequences per step: sets the step time")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads of the training loop")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda where a GPU is lent")
    parser.add_argument("--only", default="", help=f"comma-separated contenders of: {', '.join(CONTENDERS)}")
    parser.add_argument("--quick", action="store_true", help="a ~27M-parameter model, 6 steps, 1 round")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, Loop(**json.loads(args.settings)), Path(args.root))
        return
    settings = {k: v for k, v in vars(args).items() if k not in ("child", "root", "settings")}
    if args.quick:
        settings["rounds"] = 1
    main_for(run, **settings)


if __name__ == "__main__":
    main()
