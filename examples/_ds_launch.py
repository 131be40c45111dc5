"""Run several DeepSpeed ranks on one CPU-only machine, for the DeepSpeed examples.

On a GPU cluster you would start ranks with ``deepspeed`` or ``torchrun`` and need none of this.
Here every rank is a process forked from the example itself, after :func:`prepare` imported
DeepSpeed once (forking then costs about a second per rank instead of a fresh ``import deepspeed``
each). Two DeepSpeed settings are patched so that nothing is compiled and fp16 is allowed on CPU
(see ``shared/reference/deepspeed-on-cpu.md`` §5-§6 in the ckptkit repository).
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import sys
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from typing import Any

# Ranks share two cores: intra-op threads would only oversubscribe them.
THREADS_PER_RANK = 1


def patch_deepspeed_for_cpu() -> None:
    """No JIT-compiled shared-memory op (about 50 s of g++), and fp16 accepted by the CPU accelerator."""
    import deepspeed  # noqa: F401  (puts deepspeed.comm.torch in sys.modules)
    import torch
    from deepspeed.accelerator import get_accelerator

    # `import deepspeed.comm.torch` would give back the torch package (name shadowing).
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    accelerator = type(get_accelerator())
    accelerator.is_fp16_supported = lambda self: True
    accelerator.supported_dtypes = lambda self: [torch.float, torch.bfloat16, torch.float16]


def prepare() -> None:
    """Import and patch DeepSpeed in this (parent) process, once, before any rank is forked."""
    os.environ["DS_ACCELERATOR"] = "cpu"  # also stops deepspeed printing its accelerator notice
    import torch

    torch.set_num_threads(THREADS_PER_RANK)
    patch_deepspeed_for_cpu()
    # deepspeed.initialize imports these lazily; forked ranks would each pay for them (seconds).
    import deepspeed.runtime.zero.muon.muon_optimizer
    import deepspeed.runtime.zero.stage_1_and_2  # noqa: F401

    import ckptkit.integrations.deepspeed  # noqa: F401


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _rank_main(rank: int, world: int, port: int, target: Callable[..., None], args: tuple[Any, ...]) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend="gloo")
    target(rank, *args)
    dist.barrier()
    dist.destroy_process_group()


def start_ranks(target: Callable[..., None], args: tuple[Any, ...], world: int = 2) -> list[BaseProcess]:
    """Fork ``world`` ranks, each running ``target(rank, *args)`` inside a gloo process group."""
    port = _free_port()
    context = multiprocessing.get_context("fork")
    # Daemonic: if the example itself is interrupted, its ranks go with it instead of being waited for.
    ranks = [
        context.Process(target=_rank_main, args=(r, world, port, target, args), daemon=True)
        for r in range(world)
    ]
    for process in ranks:
        process.start()
    return ranks


def join_ranks(ranks: list[BaseProcess], timeout_s: float = 120.0) -> list[int | None]:
    """Wait for the ranks; returns their exit codes (-9: killed by SIGKILL). A hung rank is killed."""
    for process in ranks:
        process.join(timeout_s)
    for process in ranks:
        if process.is_alive():
            process.kill()
            process.join()
    return [process.exitcode for process in ranks]


def run_ranks(target: Callable[..., None], args: tuple[Any, ...], world: int = 2) -> list[int | None]:
    """:func:`start_ranks` then :func:`join_ranks`."""
    return join_ranks(start_ranks(target, args, world))
