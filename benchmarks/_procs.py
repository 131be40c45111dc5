"""Run a contender as a subprocess, the way a user runs it: wall time, CPU time, peak RSS.

CPU time is the rise of this process's ``RUSAGE_CHILDREN`` over the run: user + system seconds
of the subprocess and every descendant it waited for (aws's and ckptkit's threads included).
Only contenders end while it is measured; the moto child lives until the benchmark ends.
Peak RSS is the sum over the subprocess's process tree, sampled every 20 ms with psutil.
"""

from __future__ import annotations

import contextlib
import resource
import subprocess
import threading
import time
from dataclasses import dataclass

import psutil
from _common import REPO


@dataclass
class ToolRun:
    seconds: float
    cpu_seconds: float
    peak_rss: int
    returncode: int
    stdout: str
    stderr: str


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):  # exited between listing and reading
            total += p.memory_info().rss
    return total


def run_tool(argv: list[str], env: dict[str, str], *, ok_codes: tuple[int, ...] = (0,),
             timeout: float = 900) -> ToolRun:
    """Run ``argv`` to completion; raise if its exit code is not in ``ok_codes``."""
    cpu_before = _children_cpu()
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    watched, peak = psutil.Process(proc.pid), 0
    output: dict[str, str] = {}
    # communicate() in a thread drains both pipes (and reaps the child) while this one samples.
    reader = threading.Thread(
        target=lambda: output.update(zip(("out", "err"), proc.communicate(), strict=True)))
    reader.start()
    while proc.poll() is None:
        if time.perf_counter() - start > timeout:
            proc.kill()  # a hung contender must not hang the whole benchmark run
        with contextlib.suppress(psutil.Error):
            peak = max(peak, _tree_rss(watched))
        time.sleep(0.02)
    reader.join()
    seconds = time.perf_counter() - start
    if seconds > timeout:
        raise TimeoutError(f"{' '.join(argv[:5])} took more than {timeout:g} s")
    run = ToolRun(seconds, _children_cpu() - cpu_before, peak, proc.returncode, output.get("out", ""),
                  output.get("err", ""))
    if proc.returncode not in ok_codes:
        raise RuntimeError(f"{' '.join(argv[:5])} failed ({proc.returncode}): {run.stderr[-2000:]}"
                           f"{run.stdout[-1000:]}")
    return run
