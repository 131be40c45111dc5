"""Ranks of a real 2-rank DeepSpeed ZeRO-3 fp16 run on CPU for attestation and lineage.

Saves ``global_step2`` and ``global_step4`` through ckptkit (``latest`` names global_step4), then
loads global_step2 into fresh engines three ways and attests each load against global_step2:

* ``wrong_tag``: plain ``engine.load_checkpoint(root, tag="global_step2",
  load_optimizer_states=False)``: DeepSpeed issue 8499, the fp32 weights come from the tag
  ``latest`` names, silently;
* ``ckptkit``: ckptkit's ``load_checkpoint(tag="global_step2")`` with ``use_ckptkit(attest=True)``,
  which must pass, then one more save (whose lineage names global_step2 as its parent);
* ``no_optimizer_via_ckptkit``: 8499's call through ckptkit's ``load_checkpoint``.

Each rank writes ``attest_rank<r>.json``: per case, the attestation's differences, plus how far
the wrong-tag engine's fp32 masters are from each tag's (the bug reproduced).
"""

from __future__ import annotations

import datetime as dt
import json
import multiprocessing
import os
from pathlib import Path
from typing import Any

from ckptkit import lineage
from tests import ds_engine_worker as base
from tests.fixtures._common import free_port
from tests.fixtures.gen_deepspeed import rank_environment

RUN_ID = "attest-run"


def run(root: str, out: str, world: int = 2, timeout_s: float = 180.0) -> list[int | None]:
    ctx = multiprocessing.get_context("fork")
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(rank, world, port, root, out)) for rank in range(world)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout_s)
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join()
    return [proc.exitcode for proc in procs]


def _rank_main(rank: int, world: int, port: int, root: str, out: str) -> None:
    os.environ.update(rank_environment(rank, world, port))
    os.environ["CKPTKIT_RUN_ID"] = RUN_ID
    lineage.forget_parent()  # a forked rank starts as a new run, whatever the test process loaded
    result = _scenario(rank, root)
    (Path(out) / f"attest_rank{rank}.json").write_text(json.dumps(result))


def _engine(deepspeed: Any) -> Any:
    import torch

    torch.manual_seed(1234)
    model = base._make_model()
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=base._ds_config(3)
    )
    return engine


def _train_to(engine: Any, rank: int, steps: int) -> None:
    from torch import nn

    loss_fn = nn.CrossEntropyLoss()
    while engine.global_steps < steps:
        ids, labels = base._batch(rank, engine.global_steps)
        loss = loss_fn(engine(ids).float().view(-1, base.VOCAB), labels.view(-1))
        engine.backward(loss)
        engine.step()


def _fp32(engine: Any) -> dict[str, Any]:
    from deepspeed.utils import safe_get_full_fp32_param

    return {n: safe_get_full_fp32_param(p).clone() for n, p in engine.module.named_parameters()}


def _scenario(rank: int, root: str) -> dict[str, Any]:
    import deepspeed
    import torch.distributed as dist

    from ckptkit.attestation import attest
    from ckptkit.errors import AttestationError
    from ckptkit.integrations.deepspeed import load_checkpoint, save_checkpoint, use_ckptkit

    deepspeed.init_distributed(dist_backend="gloo", timeout=dt.timedelta(seconds=60))
    result: dict[str, Any] = {}
    engine = _engine(deepspeed)
    use_ckptkit(engine, root)
    _train_to(engine, rank, 2)
    save_checkpoint(engine, tag="global_step2")
    earlier = _fp32(engine)
    _train_to(engine, rank, 4)
    save_checkpoint(engine, tag="global_step4")
    later = _fp32(engine)
    # Right after a save the live state is the saved one.
    after_save = attest(f"{root}/global_step4", model=engine, strict=False)
    result["after_save"] = [str(d) for d in after_save.differences]

    # DeepSpeed 8499: an explicit tag, load_optimizer_states=False, `latest` naming another tag.
    wrong = _engine(deepspeed)
    wrong.load_checkpoint(root, tag="global_step2", load_optimizer_states=False)
    loaded = _fp32(wrong)
    result["wrong_tag_distance"] = {
        tag: max(float((v - saved[n]).abs().max()) for n, v in loaded.items())
        for tag, saved in (("global_step2", earlier), ("global_step4", later))
    }
    report = attest(f"{root}/global_step2", model=wrong, strict=False)
    result["wrong_tag"] = [str(d) for d in report.differences]

    resumed = _engine(deepspeed)
    use_ckptkit(resumed, root, attest=True)
    try:
        load_checkpoint(resumed, tag="global_step2")
        result["ckptkit"] = []
    except AttestationError as exc:
        result["ckptkit"] = exc.differences
    _train_to(resumed, rank, 3)
    save_checkpoint(resumed, tag="global_step3")

    # The same load as 8499's through ckptkit: the shadow directory DeepSpeed reads holds the
    # requested tag alone and no `latest`, so DeepSpeed's reconstruction fails loudly instead.
    again = _engine(deepspeed)
    use_ckptkit(again, root, attest=True)
    try:
        load_checkpoint(again, tag="global_step2", load_optimizer_states=False)
        result["no_optimizer_via_ckptkit"] = "loaded"
    except Exception as exc:
        result["no_optimizer_via_ckptkit"] = f"{type(exc).__name__}: {exc}"
    dist.barrier()
    dist.destroy_process_group()
    return result
