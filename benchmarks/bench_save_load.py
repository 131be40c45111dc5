"""Save and load of a ~100M-parameter model plus AdamW state (≈1.27 GB), local disk.

Save contenders, each writing a fresh path on the same disk, interleaved per round:

* ``ckptkit.save``: its defaults, i.e. the default digest (BLAKE3 since issue 13; the table says
  which, read from the manifest) while streaming, fsync of files and directories;
* ``ckptkit.save(digest="sha256")``: the same with SHA-256, for users whose policy requires it
  (skipped, with a note, where ``ckptkit.save`` has no ``digest`` option);
* ``torch.save`` without fsync: what most training loops do; data may still be in page cache.
* ``torch.save`` + fsync of the file: the durable equivalent.
* ``safetensors save_file`` (model + flattened optimizer tensors) + fsync of the file.

A first, unrecorded round warms up. Between runs the output is deleted and ``sync`` is called,
untimed, so one contender's writeback does not land in the next one's time. The same saves then
run into tmpfs (/dev/shm), which leaves each writer's CPU cost without the disk. Peak RSS of
each save is measured in a child process (VmHWM reset via /proc/self/clear_refs before it).

Load contenders read those files with a warm page cache, both as returned (memory-mapped loads
are lazy) and followed by summing every tensor, so that every byte is really read.

Ratios are to ``safetensors save_file`` (+ fsync; in tmpfs fsync costs nothing) and to
``torch.save`` + fsync. Targets (issue 13): in tmpfs ckptkit ≤ 1.3× safetensors; on disk
≤ 1.1× safetensors + fsync and ≤ 0.8× torch.save + fsync. ``CKPTKIT_DIGEST`` is removed from
the environment first, so "default" is the library's default.

    .venv/bin/python benchmarks/bench_save_load.py [--rounds N (5)] [--load-rounds N (5)] [--no-rss]
                                                   [--quick]

``--quick`` (a 0.32 GB state, one round, no RSS children) is the smoke test, under a minute. The
full run (1.27 GB, 5 + 1 warm-up rounds of 5 contenders on disk and in tmpfs, 5 RSS children,
5 load rounds) takes about 5 minutes here, most of it the disk saves and the loads.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _common import GB, REPO, WORK, Result, Row, fresh_dir, loadavg, main_for, table, timed
from _model import Config, flat_tensors, parameter_count, tensor_bytes, touch_all, training_state
from safetensors.torch import load_file, save_file

import ckptkit

# --- save contenders: each writes `state` under `target` (a fresh, empty directory) ------------


def save_ckptkit(state: dict[str, Any], target: Path) -> Path:
    ckptkit.save(state, target / "step-00000001", step=1)
    return target / "step-00000001"


def save_ckptkit_sha256(state: dict[str, Any], target: Path) -> Path:
    ckptkit.save(state, target / "step-00000001", step=1, digest="sha256")
    return target / "step-00000001"


def save_torch(state: dict[str, Any], target: Path) -> Path:
    torch.save(state, target / "state.pt")
    return target / "state.pt"


def save_torch_fsync(state: dict[str, Any], target: Path) -> Path:
    with open(target / "state.pt", "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    return target / "state.pt"


def save_safetensors_fsync(state: dict[str, Any], target: Path) -> Path:
    path = target / "state.safetensors"
    save_file(flat_tensors(state), path)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


CKPTKIT = "ckptkit.save (default digest + fsync)"
CKPTKIT_SHA256 = "ckptkit.save (digest=sha256 + fsync)"
TORCH_FSYNC = "torch.save + fsync"
TORCH_PLAIN = "torch.save (no fsync)"
SAFETENSORS = "safetensors save_file + fsync"
HAS_DIGEST_OPTION = "digest" in inspect.signature(ckptkit.save).parameters
SAVES: dict[str, Callable[[dict[str, Any], Path], Path]] = {
    CKPTKIT: save_ckptkit,
    **({CKPTKIT_SHA256: save_ckptkit_sha256} if HAS_DIGEST_OPTION else {}),
    TORCH_PLAIN: save_torch,
    TORCH_FSYNC: save_torch_fsync,
    SAFETENSORS: save_safetensors_fsync,
}
TMPFS = Path("/dev/shm")
QUICK_MODEL = Config(vocab=8000, width=512, layers=6, heads=8, ffn=2048)  # ~27M parameters, 0.32 GB

# --- load contenders: path produced by the matching save -> loaded tree ------------------------

LOADS: dict[str, tuple[str, Callable[[Path], Any]]] = {
    "ckptkit.load (mmap)": (CKPTKIT, lambda p: ckptkit.load(p)),
    "ckptkit.load (mmap=False)": (CKPTKIT, lambda p: ckptkit.load(p, mmap=False)),
    "torch.load (mmap, weights_only)": (
        TORCH_FSYNC, lambda p: torch.load(p, mmap=True, weights_only=True)
    ),
    "torch.load (weights_only)": (TORCH_FSYNC, lambda p: torch.load(p, weights_only=True)),
    "safetensors load_file": (SAFETENSORS, lambda p: load_file(p)),
}
TORCH_LOAD = "torch.load (mmap, weights_only)"


def measure_saves(state: dict[str, Any], rounds: int, root: Path) -> tuple[list[Row], dict[str, Path]]:
    """Interleaved rounds; the last round's output of each contender is kept for the loads.

    Round 0 is a warm-up and not recorded: in it every contender ran 3-5× slower (first writes
    into freshly allocated page cache and file system blocks).
    """
    rows = {name: Row(name) for name in SAVES}
    kept: dict[str, Path] = {}
    for round_ in range(rounds + 1):
        for index, (name, save) in enumerate(SAVES.items()):
            target = fresh_dir(f"save/{index}", root)  # removes the previous round's output
            os.sync()
            seconds, kept[name] = timed(lambda save=save, target=target: save(state, target))
            if round_:
                rows[name].times.append(seconds)
            os.sync()  # untimed: the no-fsync contender's writeback must not hit the next one
    return list(rows.values()), kept


def save_table(rows: list[Row], nbytes: int, title: str) -> str:
    by_name = {r.name: r for r in rows}
    safetensors_med, fsync_med = by_name[SAFETENSORS].median, by_name[TORCH_FSYNC].median
    return f"{title}:\n\n" + table(
        ["contender", "median s", "GB/s", "× safetensors save_file", "× torch.save+fsync",
         "peak extra RSS MB", "all runs s"],
        [[r.name, r.median, nbytes / GB / r.median, r.median / safetensors_med, r.median / fsync_med,
          r.extra.get("peak_extra_mb", "-"), " ".join(f"{t:.2f}" for t in r.times)]
         for r in rows],
    )


def digest_algorithm(checkpoint: Path) -> str:
    """The algorithm the manifest names for the checkpoint's first file (``blake3-tree``, ...)."""
    manifest = ckptkit.read_manifest(ckptkit.open_store(checkpoint))
    return manifest.files[0].digest.partition(":")[0]


def measure_loads(files: dict[str, Path], rounds: int) -> list[Row]:
    rows = {name: Row(name) for name in LOADS}
    for source in {source for source, _ in LOADS.values()}:  # warm the page cache
        path = files[source]
        for f in [path] if path.is_file() else path.rglob("*"):
            if f.is_file():
                f.read_bytes()
    for _ in range(rounds):
        for name, (source, load) in LOADS.items():
            gc.collect()
            lazy, tree = timed(lambda load=load, source=source: load(files[source]))
            touch, total = timed(lambda tree=tree: touch_all(tree))
            rows[name].times.append(lazy)
            rows[name].extra.setdefault("with_touch", []).append(lazy + touch)
            rows[name].extra["checksum"] = total
            del tree
    return list(rows.values())


# --- peak RSS, one child process per save contender --------------------------------------------


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def child_save(name: str, target: Path) -> None:
    """Run in a child: build the state, reset the RSS high-water mark, save, report MB."""
    state = training_state()
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5\n")  # VmHWM := current RSS
    before = _status_kb("VmRSS")
    SAVES[name](state, target)
    peak = _status_kb("VmHWM")
    print(json.dumps({"rss_before_mb": before / 1024, "peak_extra_mb": (peak - before) / 1024}))


def measure_rss(rows: list[Row]) -> None:
    for row in rows:
        target = fresh_dir("rss")
        proc = subprocess.run(
            [sys.executable, __file__, "--child", row.name, str(target)],
            capture_output=True, text=True, cwd=REPO,
        )
        shutil.rmtree(target, ignore_errors=True)
        if proc.returncode == 0:
            row.extra.update(json.loads(proc.stdout.strip().splitlines()[-1]))
        else:
            row.extra["rss_error"] = proc.stderr.strip().splitlines()[-1:]


def run(rounds: int = 5, load_rounds: int = 5, rss: bool = True, quick: bool = False) -> Result:
    os.environ.pop("CKPTKIT_DIGEST", None)  # a site policy would make "default" something else
    result = Result("save and load")
    result.data["loadavg_start"] = loadavg()
    state = training_state(QUICK_MODEL if quick else None)
    nbytes = tensor_bytes(state)
    result.data.update(parameters=parameter_count(state), tensor_bytes=nbytes, rounds=rounds,
                       load_rounds=load_rounds)
    what = f"{parameter_count(state) / 1e6:.1f}M parameters + AdamW state ({nbytes / GB:.2f} GB of tensors)"

    save_rows, files = measure_saves(state, rounds, WORK)
    if rss:
        measure_rss(save_rows)
    digests = {name: digest_algorithm(files[name]) for name in (CKPTKIT, CKPTKIT_SHA256) if name in files}
    result.data["digests"] = digests
    result.tables.append(
        "Digests, as the manifests name them: " + "; ".join(f"{k}: `{v}`" for k, v in digests.items())
        + ("" if HAS_DIGEST_OPTION else f"; {CKPTKIT_SHA256}: skipped, ckptkit.save has no digest option"))
    by_name = {r.name: r for r in save_rows}
    result.tables.append(save_table(save_rows, nbytes, f"Save of {what} to local disk, median of {rounds}"))
    ck = by_name[CKPTKIT].median
    result.target("disk: ckptkit.save ÷ safetensors save_file+fsync", ck / by_name[SAFETENSORS].median, 1.1)
    result.target("disk: ckptkit.save ÷ torch.save+fsync", ck / by_name[TORCH_FSYNC].median, 0.8)
    if TMPFS.is_dir():
        # The same saves into RAM: no disk, so what remains is each writer's CPU cost.
        tmpfs_rows, _ = measure_saves(state, rounds, TMPFS / "ckptkit-bench")
        shutil.rmtree(TMPFS / "ckptkit-bench", ignore_errors=True)
        result.tables.append(save_table(tmpfs_rows, nbytes, f"The same saves to tmpfs ({TMPFS}), "
                                        f"i.e. CPU cost without the disk, median of {rounds}"))
        result.data["save_tmpfs"] = [r.__dict__ for r in tmpfs_rows]
        in_ram = {r.name: r.median for r in tmpfs_rows}
        result.target("tmpfs: ckptkit.save ÷ safetensors save_file", in_ram[CKPTKIT] / in_ram[SAFETENSORS],
                      1.3)

    load_rows = measure_loads(files, load_rounds)
    by_load = {r.name: r for r in load_rows}
    ref_lazy = by_load[TORCH_LOAD].median
    ref_touch = sorted(by_load[TORCH_LOAD].extra["with_touch"])[load_rounds // 2]
    rows = []
    for r in load_rows:
        touched = sorted(r.extra["with_touch"])[load_rounds // 2]
        rows.append([r.name, r.median, r.median / ref_lazy, touched, touched / ref_touch])
    result.tables.append(
        f"Load, warm page cache, median of {load_rounds} (\"+ sum\" also sums every tensor):\n\n"
        + table(["contender", "load s", "× torch.load mmap", "load + sum s", "× torch.load mmap + sum"],
                rows)
    )
    result.data["save"] = [r.__dict__ for r in save_rows]
    result.data["load"] = [r.__dict__ for r in load_rows]
    result.data["loadavg_end"] = loadavg()
    shutil.rmtree(WORK / "save", ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--load-rounds", type=int, default=5)
    parser.add_argument("--no-rss", action="store_true")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: a 0.32 GB state, 1 round, 1 load round, no RSS children")
    parser.add_argument("--child", nargs=2, metavar=("CONTENDER", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_save(args.child[0], Path(args.child[1]))
        return
    if args.quick:
        args.rounds, args.load_rounds, args.no_rss = 1, 1, True
    main_for(run, rounds=args.rounds, load_rounds=args.load_rounds, rss=not args.no_rss, quick=args.quick)


if __name__ == "__main__":
    main()
