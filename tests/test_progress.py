"""One progress display for every long command: on a terminal's stderr only, never under --json
or into a pipe; and the library callbacks count exactly the bytes the ops handle."""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from ckptkit.commit import CheckpointTransaction
from ckptkit.ops.convert import convert
from ckptkit.ops.gc import collect_garbage
from ckptkit.ops.index import index_checkpoint
from ckptkit.ops.verify import verify_checkpoint, verify_tree
from ckptkit.storage import Store, open_store
from tests.helpers import commit_files

REPO = Path(__file__).resolve().parents[1]
# One state of the display, redrawn in place (carriage return, clear line): bytes done / total,
# percent, rate, ETA: "verify: 1.5 MiB / 6.0 MiB  25.0%  3.0 MiB/s  ETA 0:01".
_SIZE = r"[\d.]+ [KMGT]?i?B"
LINE = re.compile(rf"\r\x1b\[K(\w+): ({_SIZE}) / ({_SIZE}) +([\d.]+)%  {_SIZE}/s  ETA [-\d:]+")
MiB = 1 << 20


def _files(seed: int) -> dict[str, bytes]:
    """Three files, 6 MiB in all: a few blocks to hash, and quick to write."""
    return {
        "model.bin": bytes((i * 7 + seed) % 251 for i in range(256)) * (16 * 1024),  # 4 MiB
        "optim/state.bin": bytes(range(256)) * (8 * 1024),  # 2 MiB
        "meta.json": b'{"step": %d}' % seed,
    }


def _size(seed: int = 1) -> int:
    return sum(map(len, _files(seed).values()))


def _root(path: Path, steps: tuple[int, ...] = (1,)) -> Path:
    store = open_store(path)
    for step in steps:
        commit_files(store, f"step-{step:08d}", _files(step), step=step)
    return path


def _cli_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}


def _run_in_pty(*args: str, timeout: float = 120) -> tuple[int, str]:
    """``ckptkit ARGS`` with stdin, stdout and stderr on a pseudo-terminal, as a user runs it."""
    master, slave = os.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ckptkit", *args],
        stdin=slave, stdout=slave, stderr=slave, env=_cli_env(), cwd=REPO, close_fds=True,
    )
    os.close(slave)
    chunks: list[bytes] = []
    try:
        while select.select([master], [], [], timeout)[0]:
            try:
                data = os.read(master, 1 << 16)
            except OSError:  # EIO: the child closed its end
                break
            if not data:
                break
            chunks.append(data)
        return proc.wait(timeout=timeout), b"".join(chunks).decode()
    finally:
        proc.kill()
        os.close(master)


def _run_piped(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ckptkit", *args],
        capture_output=True, text=True, env=_cli_env(), cwd=REPO, timeout=120, check=False,
    )


def _display(output: str, label: str) -> list[re.Match[str]]:
    """Every state the display drew for ``label``, in order (each redraw starts with \\r)."""
    return [m for m in LINE.finditer(output) if m.group(1) == label]


def _assert_complete_display(output: str, label: str, total: str) -> None:
    drawn = _display(output, label)
    assert drawn, output
    assert all(m.group(3) == total for m in drawn), output
    last = drawn[-1]
    assert last.group(2) == total and last.group(4) == "100.0", output


def _no_progress_text(text: str) -> None:
    assert "\r" not in text.replace("\r\n", "\n") and "ETA" not in text and "\x1b[K" not in text


# --- each command on a terminal, under --json, into a pipe ----------------------------------


def test_verify_shows_progress_on_a_terminal(tmp_path: Path) -> None:
    root = _root(tmp_path / "root", steps=(1, 2))
    code, output = _run_in_pty("verify", str(root))
    assert code == 0, output
    # One display for the whole root: the grand total of both checkpoints, not one per checkpoint.
    _assert_complete_display(output, "verify", "12.0 MiB")
    assert "OK: 2 checkpoint(s) checked" in output


def test_verify_of_a_checkpoint_without_manifest_counts_its_files(tmp_path: Path) -> None:
    directory = tmp_path / "foreign"
    directory.mkdir()
    (directory / "a.bin").write_bytes(bytes(3 * MiB))
    (directory / "b.bin").write_bytes(bytes(MiB))
    code, output = _run_in_pty("verify", str(directory))
    assert code == 1, output  # zeros behind .bin are no checkpoint format: a finding
    _assert_complete_display(output, "verify", "4.0 MiB")
    assert "files 2/2" in output


def test_index_shows_progress_on_a_terminal(tmp_path: Path) -> None:
    directory = tmp_path / "checkpoint-7"
    for name, data in _files(7).items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_bytes(data)
    code, output = _run_in_pty("index", str(directory))
    assert code == 0, output
    _assert_complete_display(output, "index", "6.0 MiB")
    assert "files 3/3" in output and "indexed " in output


def test_gc_shows_progress_on_a_terminal(tmp_path: Path) -> None:
    store = open_store(tmp_path / "root")
    with_debris = CheckpointTransaction(store, "step-00000002")
    with_debris.write("a.bin", bytes(2 * MiB))
    with_debris.write("b.bin", bytes(MiB))
    code, output = _run_in_pty("gc", str(tmp_path / "root"), "--grace", "0")
    assert code == 0, output
    _assert_complete_display(output, "gc", "3.0 MiB")
    assert "files 2/2" in output and "removed 1 item(s), 3.0 MiB" in output


def _torch_file(path: Path) -> Path:
    """A torch state dict of 8 MiB of float32 tensors, with a tied alias (stored once)."""
    import torch

    weight = torch.arange(MiB, dtype=torch.float32)
    torch.save({"embed.weight": weight, "lm_head.weight": weight, "proj": torch.ones(MiB)}, path)
    return path


def test_convert_shows_progress_on_a_terminal(tmp_path: Path) -> None:
    src = _torch_file(tmp_path / "pytorch_model.bin")
    code, output = _run_in_pty("convert", str(src), str(tmp_path / "out"), "--to", "safetensors")
    assert code == 0, output
    _assert_complete_display(output, "convert", "8.0 MiB")  # the tie is written once
    assert "OK: " in output


@pytest.mark.slow  # needs the real multi-rank DeepSpeed fixture
def test_consolidate_shows_progress_on_a_terminal(deepspeed_checkpoints: Any, tmp_path: Path) -> None:
    case = deepspeed_checkpoints["z2_bf16_warmupcosine"]
    code, output = _run_in_pty("consolidate", str(case.save_dir), str(tmp_path / "out"))
    assert code == 0, output
    piped = _run_piped("consolidate", str(case.save_dir), str(tmp_path / "again"), "--json")
    total = json.loads(piped.stdout)["total_size"]
    from ckptkit.cli.render import format_bytes

    _assert_complete_display(output, "consolidate", format_bytes(total))
    _no_progress_text(piped.stdout + piped.stderr)


def test_sync_shows_progress_on_a_terminal(tmp_path: Path) -> None:
    root = _root(tmp_path / "src", steps=(1, 2))
    code, output = _run_in_pty("sync", str(root), str(tmp_path / "dst"))
    assert code == 0, output
    _assert_complete_display(output, "sync", "12.0 MiB")
    assert "files 6/6" in output


@pytest.mark.parametrize("command", ["verify", "index", "gc", "sync", "convert"])
def test_json_on_a_terminal_is_only_json(tmp_path: Path, command: str) -> None:
    args = _args(tmp_path, command)
    code, output = _run_in_pty(*args, "--json")
    assert code == 0, output
    json.loads(output)  # the whole output is one JSON document: no progress text in it
    _no_progress_text(output)


@pytest.mark.parametrize("command", ["verify", "index", "gc", "sync", "convert"])
def test_no_progress_into_a_pipe(tmp_path: Path, command: str) -> None:
    result = _run_piped(*_args(tmp_path, command))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    _no_progress_text(result.stdout)
    assert result.stdout.strip()  # the normal report is still there


def _args(tmp_path: Path, command: str) -> list[str]:
    """A command with real work to do: megabytes to hash, index, remove, copy or convert."""
    if command == "convert":
        src = _torch_file(tmp_path / "pytorch_model.bin")
        return ["convert", str(src), str(tmp_path / "out"), "--to", "safetensors"]
    if command == "index":
        directory = tmp_path / "checkpoint-7"
        for name, data in _files(7).items():
            (directory / name).parent.mkdir(parents=True, exist_ok=True)
            (directory / name).write_bytes(data)
        return ["index", str(directory)]
    if command == "gc":
        CheckpointTransaction(open_store(tmp_path / "root"), "step-00000002").write("a.bin", bytes(MiB))
        return ["gc", str(tmp_path / "root"), "--grace", "0"]
    root = _root(tmp_path / "root")
    return ["verify", str(root)] if command == "verify" else ["sync", str(root), str(tmp_path / "dst")]


# --- the library side: what the callbacks receive -------------------------------------------


class Recorder:
    """A :class:`ckptkit.progress.Progress` that keeps every call, as a test double with teeth:
    it checks the protocol's order (start, counts, finish) as it goes."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.starts: list[tuple[int, int]] = []
        self.running: list[int] = []  # the bytes done after each advance
        self.files = 0
        self.finished = 0

    def start(self, total_bytes: int, total_files: int = 0) -> None:
        assert not self.starts, "one start per op"
        self.starts.append((total_bytes, total_files))

    def advance(self, nbytes: int) -> None:
        with self.lock:
            assert self.starts and not self.finished
            self.running.append((self.running[-1] if self.running else 0) + nbytes)

    def file_done(self, count: int = 1) -> None:
        with self.lock:
            self.files += count

    def finish(self) -> None:
        self.finished += 1


def _assert_counted(recorder: Recorder, total: int) -> None:
    assert recorder.starts[0][0] == total
    assert recorder.running == sorted(recorder.running) and recorder.running[-1] == total
    assert len(recorder.running) > 1  # bytes as they are hashed, not once at the end
    assert recorder.finished == 1


def test_verify_callback_counts_every_byte_hashed(any_store: Store) -> None:
    commit_files(any_store, "step-00000001", _files(1), step=1)
    recorder = Recorder()
    assert verify_checkpoint(any_store.child("step-00000001"), progress=recorder).ok
    _assert_counted(recorder, _size(1))


def test_verify_tree_is_one_count_over_all_checkpoints(tmp_path: Path) -> None:
    store = open_store(_root(tmp_path / "root", steps=(1, 2, 3)))
    recorder = Recorder()
    assert all(r.ok for r in verify_tree(store, progress=recorder))
    _assert_counted(recorder, 3 * _size())


def test_quick_verify_counts_nothing(tmp_path: Path) -> None:
    store = open_store(_root(tmp_path / "root"))
    recorder = Recorder()
    assert verify_tree(store, quick=True, progress=recorder)[0].ok
    assert recorder.starts == [(0, 0)] and recorder.running == []


def test_index_callback_counts_every_byte_and_file(any_store: Store) -> None:
    for name, data in _files(4).items():
        any_store.put(f"checkpoint-4/{name}", data)
    recorder = Recorder()
    result = index_checkpoint(any_store.child("checkpoint-4"), progress=recorder)
    _assert_counted(recorder, result.manifest.total_size)
    assert result.manifest.total_size == _size(4)
    assert recorder.starts[0][1] == recorder.files == 3


def test_convert_callback_counts_the_tensor_bytes_written(tmp_path: Path) -> None:
    recorder = Recorder()
    src = _torch_file(tmp_path / "pytorch_model.bin")
    result = convert(src, tmp_path / "model.safetensors", to="safetensors", progress=recorder)
    assert result.ok and result.total_size == 8 * MiB
    _assert_counted(recorder, result.total_size)


def test_gc_callback_counts_what_it_removes(any_store: Store) -> None:
    debris = CheckpointTransaction(any_store, "step-00000002")
    debris.write("a.bin", bytes(1000))
    debris.write("b.bin", bytes(24))
    recorder = Recorder()
    report = collect_garbage(any_store, grace_seconds=0, progress=recorder)
    assert report.bytes_removed == 1024
    assert recorder.starts == [(1024, 2)] and recorder.running == [1024] and recorder.files == 2
    dry = Recorder()
    collect_garbage(any_store, grace_seconds=0, dry_run=True, progress=dry)
    assert dry.starts == []  # a dry run removes nothing, so it counts nothing
