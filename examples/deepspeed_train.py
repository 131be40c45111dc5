"""Save and resume a DeepSpeed run through ckptkit: the whole recipe in one training loop.

    engine, *_ = deepspeed.initialize(...)
    use_ckptkit(engine, root)                     # every rank; root: a shared path or s3://bucket/run
    url, client_state = load_checkpoint(engine)   # the newest committed checkpoint, or (None, None)
    ...
    save_checkpoint(engine, client_state=...)     # committed for all ranks at once, or not at all

Run it twice; the second run resumes where the first one stopped:

    python examples/deepspeed_train.py --root runs/ds --steps 4
    python examples/deepspeed_train.py --root runs/ds --steps 8

Fewer (or more) GPUs tomorrow? The same loop resumes on another number of ranks: ckptkit's
checkpoint engine reshards the ZeRO state on load, optimizer included (rank 0 logs one line):

    python examples/deepspeed_train.py --root runs/ds --steps 10 --ranks 3

Started by a launcher (``deepspeed`` or ``torchrun``, which set ``RANK``) the script is one rank.
Started with plain ``python`` it forks 2 ranks on this machine's CPU (``_ds_launch.py``).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import _ds_launch

VOCAB, HIDDEN, MICRO_BATCH, SEQ = 16, 24, 4, 6

DS_CONFIG: dict[str, Any] = {
    "train_micro_batch_size_per_gpu": MICRO_BATCH,
    "zero_optimization": {"stage": 2},
    "bf16": {"enabled": True},
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": 1e-3, "warmup_num_steps": 4}},
    "steps_per_print": 10_000,
}


def train(rank: int, root: str, steps: int, save_every: int) -> None:
    import deepspeed
    import torch
    from torch import nn

    from ckptkit.integrations.deepspeed import load_checkpoint, save_checkpoint, use_ckptkit

    torch.manual_seed(0)  # the same initial weights on every rank
    model = nn.Sequential(nn.Embedding(VOCAB, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, VOCAB))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=DS_CONFIG)
    use_ckptkit(engine, root)

    # Each file is checked against the manifest's digest and read with torch.load(weights_only=True).
    url, client_state = load_checkpoint(engine)
    if rank == 0:
        print(f"resumed from {url} at step {client_state['step']}" if url else f"starting fresh in {root}")

    while engine.global_steps < steps:
        generator = torch.Generator().manual_seed(10_000 * rank + engine.global_steps)  # this rank's data
        ids, labels = torch.randint(0, VOCAB, (2, MICRO_BATCH, SEQ), generator=generator)
        loss = nn.functional.cross_entropy(engine(ids).float().view(-1, VOCAB), labels.view(-1))
        engine.backward(loss)
        engine.step()
        if engine.global_steps % save_every == 0 or engine.global_steps == steps:
            tag = save_checkpoint(engine, client_state={"step": engine.global_steps})
            if rank == 0:
                print(f"step {engine.global_steps}: loss {loss.item():.4f}, committed {tag}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--root", required=True, help="checkpoint root: a path every rank sees, or s3://...")
    parser.add_argument("--steps", type=int, default=8, help="train until this global step")
    parser.add_argument("--save-every", type=int, default=2, help="steps between checkpoints")
    parser.add_argument("--ranks", type=int, default=2, help="CPU ranks to fork (plain python only)")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    args = parser.parse_args()
    run = (args.root, args.steps, args.save_every)

    if "RANK" in os.environ:  # a launcher started this process as one rank
        import deepspeed
        import torch

        if not torch.cuda.is_available():
            _ds_launch.patch_deepspeed_for_cpu()
        deepspeed.init_distributed()
        train(int(os.environ["RANK"]), *run)
        return 0
    _ds_launch.prepare()
    codes = _ds_launch.run_ranks(train, run, world=args.ranks)
    if codes != [0] * args.ranks:
        print(f"a rank failed: exit codes {codes}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
