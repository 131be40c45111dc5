"""What a command does with a filesystem it cannot fully read or trust.

Only regular files are checkpoint data: symbolic links below a root are never followed, FIFOs and
devices are never opened, and a directory that cannot be read makes the listing incomplete. An
incomplete listing is an error (exit 4) for every command, never a clean verdict, and nothing
destructive acts on it. Permission cases run as ``nobody`` (root reads everything).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import ckptkit
from ckptkit.errors import IncompleteListingError, NotRegularFileError
from ckptkit.storage import LocalStore

CLI = [sys.executable, "-m", "ckptkit"]


def _nobody() -> tuple[int, int] | None:
    if shutil.which("setpriv") is None:
        return None
    try:
        entry = pwd.getpwnam("nobody")
    except KeyError:
        return None
    return entry.pw_uid, entry.pw_gid


NOBODY = _nobody()
needs_nobody = pytest.mark.skipif(
    NOBODY is None or os.geteuid() != 0,
    reason="permission cases need root to drop to an unprivileged 'nobody' through setpriv",
)


def run_cli(*args: str, as_nobody: bool = False, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    prefix: list[str] = []
    if as_nobody:
        assert NOBODY is not None
        uid, gid = NOBODY
        prefix = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups"]
    env = {**os.environ, "HOME": "/tmp", "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run(
        [*prefix, *CLI, *args], capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.fixture
def world_dir() -> Iterator[Path]:
    """A directory ``nobody`` can traverse (pytest's tmp_path lives under a 0700 parent)."""
    path = Path(tempfile.mkdtemp(prefix="ckptkit-perm-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    for dirpath, dirnames, _ in os.walk(path):
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), 0o755)
    shutil.rmtree(path)


def _native_root(root: Path, steps: tuple[int, ...] = (1, 2, 3)) -> None:
    with ckptkit.CheckpointManager(root) as manager:
        for step in steps:
            manager.save(step, {"w": torch.full((4,), float(step))})


def _world_readable(path: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(path):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o644)
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), 0o755)


# --- item 1: sync --delete never deletes what it could not see ------------------------------


@needs_nobody
def test_sync_delete_keeps_a_destination_checkpoint_whose_source_could_not_be_read(world_dir):
    src, dst = world_dir / "src", world_dir / "dst"
    _native_root(src)
    assert run_cli("sync", str(src), str(dst)).returncode == 0
    _world_readable(world_dir)
    os.chown(dst, *NOBODY)  # nobody may write the destination...
    for dirpath, dirnames, filenames in os.walk(dst):
        for name in dirnames + filenames:
            os.chown(os.path.join(dirpath, name), *NOBODY)
    (src / "step-00000002").chmod(0o700)  # ...but not read this source checkpoint

    result = run_cli("sync", str(src), str(dst), "--delete", as_nobody=True)

    assert result.returncode == 4, result.stdout + result.stderr
    assert "step-00000002: permission denied" in result.stderr
    assert sorted(p.name for p in dst.iterdir()) == ["step-00000001", "step-00000002", "step-00000003"]
    assert run_cli("verify", str(dst / "step-00000002")).returncode == 0


# --- item 4 and the property: a partial read is never a clean verdict -----------------------

_COMMANDS = {
    "ls": ["ls", "{root}"],
    "ls -l": ["ls", "-l", "{root}"],
    "verify": ["verify", "{root}"],
    "scan": ["scan", "{root}"],
    "doctor": ["doctor", "{root}"],
    "inspect": ["inspect", "{root}"],
    "index": ["index", "{root}"],
    "gc": ["gc", "--grace", "0", "{root}"],
    "gc --dry-run": ["gc", "--grace", "0", "--dry-run", "{root}"],
    "sync": ["sync", "{root}", "{out}/synced"],
    "convert": ["convert", "{root}", "{out}/converted", "--to", "safetensors"],
}


def _committed_root(world_dir: Path) -> Path:
    root = world_dir / "root"
    _native_root(root)
    return root


def _foreign_root(world_dir: Path) -> Path:
    """An HF-style checkpoint another tool wrote: torch files, no manifest."""
    root = world_dir / "checkpoint-5"
    root.mkdir()
    torch.save({"w": torch.ones(3)}, root / "pytorch_model.bin")
    (root / "extra").mkdir()
    torch.save({"v": torch.ones(2)}, root / "extra" / "more.pt")
    return root


def _hide_checkpoint_dir(root: Path) -> str:
    victim = next(p for p in sorted(root.iterdir()) if p.is_dir())
    victim.chmod(0o700)
    return victim.name


def _hide_root(root: Path) -> str:
    root.chmod(0o700)
    return root.name


@needs_nobody
@pytest.mark.parametrize("layout", ["committed", "foreign"])
@pytest.mark.parametrize("hide", ["a directory inside", "the root itself"])
@pytest.mark.parametrize("command", sorted(_COMMANDS))
def test_no_command_gives_a_clean_verdict_on_what_it_could_not_read(world_dir, layout, hide, command):
    root = _committed_root(world_dir) if layout == "committed" else _foreign_root(world_dir)
    out = world_dir / "out"
    out.mkdir()
    _world_readable(world_dir)
    os.chown(out, *NOBODY)
    hidden = (_hide_checkpoint_dir if hide == "a directory inside" else _hide_root)(root)
    before = sorted(str(p) for p in world_dir.rglob("*"))

    args = [a.format(root=root, out=out) for a in _COMMANDS[command]]
    result = run_cli(*args, as_nobody=True)

    assert result.returncode == 4, (args, result.returncode, result.stdout, result.stderr)
    assert hidden in result.stderr and "permission denied" in result.stderr
    assert "Traceback" not in result.stderr
    for clean in ("CLEAN", "OK:", "removed 0", "no checkpoints under"):
        assert clean not in result.stdout, (args, result.stdout)
    assert sorted(str(p) for p in world_dir.rglob("*")) == before  # nothing written or deleted


@needs_nobody
def test_ls_shows_what_it_could_read_and_names_what_it_could_not(world_dir):
    root = _committed_root(world_dir)
    _world_readable(world_dir)
    (root / "step-00000002").chmod(0o700)

    result = run_cli("ls", str(root), as_nobody=True)
    listed = run_cli("ls", "--json", str(root), as_nobody=True)

    assert result.returncode == 4
    assert "step-00000001" in result.stdout and "step-00000003" in result.stdout
    assert "could not list" in result.stderr and "step-00000002: permission denied" in result.stderr
    assert listed.returncode == 4
    assert [c["name"] for c in json.loads(listed.stdout)] == ["step-00000001", "step-00000003"]


def test_retention_deletes_nothing_while_the_root_cannot_be_listed_whole(tmp_path, caplog):
    root = tmp_path / "run"
    with ckptkit.CheckpointManager(root, keep_last=1) as manager:
        manager.save(1, {"w": torch.ones(2)})
        os.mkfifo(root / "step-00000001" / "stray")  # not data: the listing is incomplete
        manager.save(2, {"w": torch.ones(2)})
        manager.save(3, {"w": torch.ones(2)})
    assert (root / "step-00000001").is_dir() and (root / "step-00000002").is_dir()
    assert "retention skipped" in caplog.text and "FIFO" in caplog.text


# --- item 5: symbolic links never lead out of the checkpoint --------------------------------


@pytest.fixture
def escaping_checkpoint(tmp_path) -> Path:
    """``checkpoint-5/notes.txt -> ../outside/secret.txt`` next to a real model file."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("SECRET-OUTSIDE-THE-CHECKPOINT")
    checkpoint = tmp_path / "run" / "checkpoint-5"
    checkpoint.mkdir(parents=True)
    torch.save({"w": torch.ones(3)}, checkpoint / "pytorch_model.bin")
    (checkpoint / "notes.txt").symlink_to("../../outside/secret.txt")
    return checkpoint


@pytest.mark.parametrize("command", ["index", "verify", "scan", "doctor", "inspect"])
def test_a_link_out_of_the_checkpoint_is_refused_by_every_reader(escaping_checkpoint, command):
    result = run_cli(command, str(escaping_checkpoint))
    assert result.returncode == 4, result.stdout + result.stderr
    assert "notes.txt: symbolic link, not followed" in result.stderr
    assert not (escaping_checkpoint / "ckptkit-manifest.json").exists()


def test_sync_never_copies_what_a_link_points_at(escaping_checkpoint, tmp_path, s3_bucket):
    local = run_cli("sync", str(escaping_checkpoint), str(tmp_path / "dst") + "/", "--index")
    remote = run_cli("sync", str(escaping_checkpoint), f"{s3_bucket}/dst/", "--index")
    for result in (local, remote):
        assert result.returncode == 4, result.stdout + result.stderr
        assert "symbolic link" in result.stderr
    copied = [p.read_bytes() for p in (tmp_path / "dst").rglob("*") if p.is_file()]
    assert not any(b"SECRET" in data for data in copied)
    assert not list(ckptkit.open_store(f"{s3_bucket}/dst").list(""))


def test_a_store_refuses_a_key_below_a_link_for_reads_and_writes(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "file").write_bytes(b"outside")
    root = tmp_path / "root"
    root.mkdir()
    (root / "linked").symlink_to(outside)
    (root / "direct").symlink_to(outside / "file")
    store = LocalStore(root)

    for read in (store.get, store.head, store.open_read):
        with pytest.raises(NotRegularFileError, match="symbolic link"):
            read("linked/file")
        with pytest.raises(NotRegularFileError, match="symbolic link"):
            read("direct")
    with pytest.raises(NotRegularFileError):
        store.put("linked/new", b"x")
    assert sorted(p.name for p in outside.iterdir()) == ["file"]
    with pytest.raises(IncompleteListingError) as listing:
        list(store.list(""))
    assert {Path(p).name for p, _ in listing.value.problems} == {"linked", "direct"}


def test_a_path_the_user_names_is_followed_even_if_it_is_a_link(tmp_path):
    """``last.ckpt -> epoch=3.ckpt`` (Lightning's save_last="link"): the user chose it."""
    torch.save({"w": torch.ones(3)}, tmp_path / "epoch=3.ckpt")
    (tmp_path / "last.ckpt").symlink_to("epoch=3.ckpt")
    for command in ("verify", "scan", "inspect"):
        result = run_cli(command, str(tmp_path / "last.ckpt"))
        assert result.returncode == 0, (command, result.stdout, result.stderr)


# --- item 6: FIFOs and devices are errors, never hangs --------------------------------------


@pytest.fixture
def fifo_checkpoint(tmp_path) -> Path:
    checkpoint = tmp_path / "checkpoint-6"
    checkpoint.mkdir()
    torch.save({"w": torch.ones(3)}, checkpoint / "pytorch_model.bin")
    os.mkfifo(checkpoint / "pipe")  # nobody ever writes it: an open without O_NONBLOCK blocks
    return checkpoint


@pytest.mark.parametrize(
    "args",
    [
        ["index", "{c}"],
        ["verify", "{c}"],
        ["scan", "{c}"],
        ["doctor", "{c}"],
        ["inspect", "{c}"],
        ["sync", "{c}", "{t}/dst/"],
        ["sync", "{c}", "{t}/dst/", "--index"],
        ["convert", "{c}", "{t}/out", "--to", "safetensors"],
    ],
    ids=lambda a: " ".join(a[:1] + [x for x in a if x.startswith("--")]),
)
def test_a_fifo_in_a_checkpoint_is_a_precise_error_not_a_hang(fifo_checkpoint, tmp_path, args):
    result = run_cli(*[a.format(c=fifo_checkpoint, t=tmp_path) for a in args], timeout=60)
    assert result.returncode == 4, result.stdout + result.stderr
    assert "pipe: FIFO, not read" in result.stderr


@pytest.mark.parametrize("command", ["verify", "scan", "doctor", "inspect"])
def test_a_fifo_named_directly_is_a_precise_error(tmp_path, command):
    os.mkfifo(tmp_path / "model.pt")
    result = run_cli(command, str(tmp_path / "model.pt"), timeout=60)
    assert result.returncode == 4
    assert "is a FIFO, not a regular file" in result.stderr


def test_restore_of_a_shard_replaced_by_a_fifo_fails_at_once(tmp_path):
    ckptkit.save({"w": torch.ones(8)}, tmp_path / "step-1", step=1)
    shard = next(p for p in (tmp_path / "step-1").rglob("*.safetensors"))
    shard.unlink()
    os.mkfifo(shard)
    with pytest.raises(NotRegularFileError, match="FIFO"):
        ckptkit.load(tmp_path / "step-1")


def test_a_link_to_a_device_is_not_indexed_as_an_empty_file(tmp_path):
    checkpoint = tmp_path / "checkpoint-7"
    checkpoint.mkdir()
    torch.save({"w": torch.ones(3)}, checkpoint / "pytorch_model.bin")
    (checkpoint / "zeros.bin").symlink_to("/dev/zero")
    result = run_cli("index", str(checkpoint))
    assert result.returncode == 4
    assert "zeros.bin: symbolic link, not followed" in result.stderr
    assert not (checkpoint / "ckptkit-manifest.json").exists()


def test_a_device_named_directly_is_refused():
    result = run_cli("verify", "/dev/zero", timeout=60)
    assert result.returncode == 4
    assert "is a character device, not a regular file" in result.stderr


@needs_nobody
@pytest.mark.parametrize("layout", ["committed", "foreign"])
@pytest.mark.parametrize("command", ["verify", "scan", "doctor", "inspect", "index"])
def test_a_file_that_cannot_be_read_is_never_a_clean_verdict(world_dir, layout, command):
    root = _committed_root(world_dir) if layout == "committed" else _foreign_root(world_dir)
    _world_readable(world_dir)
    victim = max((p for p in root.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".bin")),
                 key=lambda p: str(p))
    victim.chmod(0o600)

    result = run_cli(command, str(root), as_nobody=True)

    assert result.returncode == 4, (command, result.stdout, result.stderr)
    assert f"{victim.name}: permission denied" in result.stderr
