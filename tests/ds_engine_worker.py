"""Ranks of a real 2-rank DeepSpeed run (ZeRO-2, fp16 with dynamic loss scale) saving through ckptkit.

:func:`run` forks the ranks from the calling process, which must have run :func:`prepare` first
(imports deepspeed once, so each fork starts training in about a second instead of re-importing;
see shared/reference/deepspeed-on-cpu.md and tests/fixtures/gen_deepspeed.py). Forked ranks inherit
``os.environ``, so the S3 endpoint and credentials set by the ``s3_endpoint`` fixture reach them.

A rank writes ``result_rank<r>.json`` (what it saved, loaded, and any commit error) and, when it
trains to the end, ``final_rank<r>.pt`` (full fp32 masters, Adam moments, its optimizer partition,
scheduler, loss scaler, step counters) so that a test can compare runs exactly.
"""

from __future__ import annotations

import datetime as dt
import json
import multiprocessing
import os
import signal
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tests.fixtures._common import free_port
from tests.fixtures.gen_deepspeed import rank_environment

VOCAB = 16
HIDDEN = 24
MICRO_BATCH = 4
SEQ = 6
COMMIT_TIMEOUT_S = 20.0
EXIT_COMMIT_ERROR = 3


@dataclass
class Scenario:
    root: str  # ckptkit root URL (local path or s3://)
    out: str  # local directory for result files
    total_steps: int  # train until engine.global_steps reaches this
    save_at: list[int] = field(default_factory=list)  # save after these global steps
    resume: bool = False  # load the latest committed checkpoint first
    kill_tag: str | None = None  # SIGKILL kill_rank inside the save of this tag, after writing its file
    kill_rank: int = 1
    zero_stage: int = 2
    blocking: bool = True  # False: save_checkpoint(blocking=False); kill_tag then kills in the background
    background_delay_s: float = 0.0  # non-blocking: each background save first sleeps this long
    dedup: bool = False  # use_ckptkit(dedup=True): files stored once in the root's blob store


def _ds_config(stage: int = 2) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "steps_per_print": 10_000,
        "zero_optimization": {"stage": stage},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.01, "torch_adam": True}},
        # Dynamic loss scale whose window is short enough that the scale changes during the test.
        "fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 8, "loss_scale_window": 2},
        "scheduler": {
            "type": "WarmupLR",
            "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 1e-2, "warmup_num_steps": 4},
        },
    }


def _make_model() -> Any:
    from torch import nn

    return nn.Sequential(
        nn.Embedding(VOCAB, HIDDEN), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, VOCAB)
    )


def prepare() -> None:
    """Import and patch DeepSpeed in the parent, once, before forking ranks."""
    os.environ["DS_ACCELERATOR"] = "cpu"
    from tests.fixtures.gen_deepspeed import _preimport

    _preimport()
    import ckptkit.integrations.deepspeed  # noqa: F401


def run(scenario: Scenario, world: int = 2, timeout_s: float = 90.0) -> list[int | None]:
    """Fork ``world`` ranks running ``scenario``; returns their exit codes (negative: killed by a signal)."""
    ctx = multiprocessing.get_context("fork")
    port = free_port()
    procs = [
        ctx.Process(target=_rank_main, args=(rank, world, port, asdict(scenario))) for rank in range(world)
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout_s)
    for proc in procs:  # a hung rank must not outlive the test
        if proc.is_alive():
            proc.kill()
            proc.join()
    return [proc.exitcode for proc in procs]


def _batch(rank: int, step: int) -> tuple[Any, Any]:
    """Data depends on (rank, global step) only, so a resumed run sees what an uninterrupted one saw."""
    import torch

    gen = torch.Generator().manual_seed(10_000 * rank + step)
    ids = torch.randint(0, VOCAB, (MICRO_BATCH, SEQ), generator=gen)
    return ids, torch.randint(0, VOCAB, (MICRO_BATCH, SEQ), generator=gen)


def _rank_main(rank: int, world: int, port: int, scenario_dict: dict[str, Any]) -> None:
    scenario = Scenario(**scenario_dict)
    os.environ.update(rank_environment(rank, world, port))
    out = Path(scenario.out)
    result: dict[str, Any] = {"rank": rank, "saved": [], "loaded": None, "commit_error": None, "log": []}
    _record_ckptkit_log(result["log"])

    def write_result() -> None:
        (out / f"result_rank{rank}.json").write_text(json.dumps(result))

    try:
        _train(rank, scenario, result)
    except Exception as exc:
        from ckptkit.integrations.deepspeed import DistributedCommitError

        if not isinstance(exc, DistributedCommitError):
            raise
        result["commit_error"] = str(exc)
        write_result()
        sys.stdout.flush()
        # The process group is broken (a peer died): leave without the collectives of a clean exit.
        os._exit(EXIT_COMMIT_ERROR)
    write_result()


def _record_ckptkit_log(lines: list[str]) -> None:
    """Keep what ckptkit logs (WARNING and up) in this rank's result: a forked rank's log
    records never reach the test's own log capture."""
    import logging

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logging.getLogger("ckptkit").addHandler(Keep(logging.WARNING))


def _train(rank: int, scenario: Scenario, result: dict[str, Any]) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist
    from torch import nn

    from ckptkit.integrations.deepspeed import load_checkpoint, save_checkpoint, use_ckptkit

    deepspeed.init_distributed(dist_backend="gloo", timeout=dt.timedelta(seconds=60))
    torch.manual_seed(1234)  # the same initial weights on every rank
    model = _make_model()
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=_ds_config(scenario.zero_stage)
    )
    # A resume attests what it loaded (ckptkit.attest): AttestationError on any difference.
    checkpoint_engine = use_ckptkit(
        engine, scenario.root, timeout_s=COMMIT_TIMEOUT_S, attest=scenario.resume, dedup=scenario.dedup
    )

    if not scenario.blocking:
        _slow_and_kill_in_background(checkpoint_engine, rank, scenario)
    elif scenario.kill_tag is not None and rank == scenario.kill_rank:
        plain_save = checkpoint_engine.save

        def save_then_die(state_dict: Any, path: str) -> None:
            plain_save(state_dict, path)  # this rank's file is in the store ...
            attempt = checkpoint_engine._save
            if attempt is not None and attempt.tag == scenario.kill_tag:
                os.kill(os.getpid(), signal.SIGKILL)  # ... and the rank dies before the commit

        checkpoint_engine.save = save_then_die  # type: ignore[method-assign]

    if scenario.resume:
        url, client_state = load_checkpoint(engine)
        result["loaded"] = {"url": url, "client_state": client_state, "global_steps": engine.global_steps}

    loss_fn = nn.CrossEntropyLoss()
    while engine.global_steps < scenario.total_steps:
        ids, labels = _batch(rank, engine.global_steps)
        logits = engine(ids)
        loss = loss_fn(logits.float().view(-1, VOCAB), labels.view(-1))
        engine.backward(loss)
        engine.step()
        if engine.global_steps in scenario.save_at:
            tag = f"global_step{engine.global_steps}"
            saved = save_checkpoint(
                engine, tag=tag, client_state={"my_step": engine.global_steps}, blocking=scenario.blocking
            )
            result["saved"].append(tag)
            if not scenario.blocking:
                result.setdefault("done_at_return", []).append(saved.done())

    checkpoint_engine.wait()  # a background save's failure is raised here (DistributedCommitError)
    result["committed"] = checkpoint_engine.last_committed
    torch.save(_final_state(engine), Path(scenario.out) / f"final_rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def _slow_and_kill_in_background(checkpoint_engine: Any, rank: int, scenario: Scenario) -> None:
    """Hook the background half of a non-blocking save: sleep ``background_delay_s`` first (so
    training mutates its tensors while the save is in flight), and SIGKILL ``kill_rank`` once it
    wrote its files of ``kill_tag``, before the commit."""
    import time

    plain_write = checkpoint_engine._write_staged

    def write(attempt: Any) -> None:
        time.sleep(scenario.background_delay_s)
        plain_write(attempt)
        if attempt.tag == scenario.kill_tag and rank == scenario.kill_rank:
            os.kill(os.getpid(), signal.SIGKILL)

    checkpoint_engine._write_staged = write


def _final_state(engine: Any) -> dict[str, Any]:
    """Everything that must match between a resumed and an uninterrupted run (collective: all ranks)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    optimizer = engine.optimizer
    # ZeRO-1/2 link each param to its optimizer-state fragments on the first step after init; a
    # state read right after a load (no step yet) needs the link made first.
    getattr(optimizer, "_lazy_init_hp_params_optimizer_state", lambda: None)()
    params = dict(engine.module.named_parameters())
    return {
        "fp32": {n: safe_get_full_fp32_param(p).clone() for n, p in params.items()},
        "fp16": {n: p.detach().clone() for n, p in params.items()},
        "exp_avg": {n: safe_get_full_optimizer_state(p, "exp_avg").clone() for n, p in params.items()},
        "exp_avg_sq": {n: safe_get_full_optimizer_state(p, "exp_avg_sq").clone() for n, p in params.items()},
        # ZeRO-3 detaches its flat partitions from the torch optimizer between steps.
        "partition_state": optimizer.optimizer.state_dict() if engine.zero_optimization_stage() < 3 else None,
        "lr_scheduler": engine.lr_scheduler.state_dict(),
        "loss_scaler": dict(vars(optimizer.loss_scaler)),
        "global_steps": engine.global_steps,
        "global_samples": engine.global_samples,
        "skipped_steps": engine.skipped_steps,
    }
