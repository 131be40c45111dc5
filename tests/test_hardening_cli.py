"""Issue 11, item 11: the CLI's smaller faults, each fixed where it starts.

Missing paths are "not found" (exit 4) for every command; an unreachable http(s) server is a
storage error with its URL printed once; ``gc`` skips and reports object keys no store path can
name; ``sync`` does not retry permanent errors (no space, read-only filesystem, denied access),
names a size mismatch as one, and refuses a destination that overlaps its source or lies inside
a committed checkpoint before writing anything.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ckptkit.errors import ChecksumMismatchError
from ckptkit.manifest import MANIFEST_NAME
from ckptkit.ops.sync import sync
from ckptkit.storage import open_store
from ckptkit.transfer import RetryPolicy, copy_object
from tests.helpers import commit_files, sample_files

CLI = [sys.executable, "-c", "from ckptkit.cli.main import main; main()"]


def run(*args: str, user: str | None = None) -> subprocess.CompletedProcess[str]:
    prefix = ["setpriv", f"--reuid={user}", "--regid=nogroup", "--clear-groups"] if user else []
    return subprocess.run([*prefix, *CLI, *args], capture_output=True, text=True, timeout=120)


def make_root(path: Path, steps: tuple[int, ...] = (1, 2), size: int = 400_000) -> Path:
    store = open_store(path)
    for step in steps:
        files = {"a.bin": os.urandom(size), "b.bin": os.urandom(size)}
        commit_files(store, f"step-{step:08d}", files, step=step)
    return path


def tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


# --- a path that does not exist ------------------------------------------------------------------

COMMANDS = {
    "verify": ["verify", "{p}"],
    "inspect": ["inspect", "{p}"],
    "scan": ["scan", "{p}"],
    "doctor": ["doctor", "{p}"],
    "index": ["index", "{p}"],
    "gc": ["gc", "{p}"],
    "sync": ["sync", "{p}", "{out}"],
    "convert": ["convert", "--to", "safetensors", "{p}", "{out}"],
    "consolidate": ["consolidate", "{p}", "{out}"],
}


@pytest.mark.parametrize("where", ["top-level", "nested"])
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_missing_path_is_not_found_for_every_command(tmp_path: Path, command: str, where: str) -> None:
    # "/name" has the filesystem root as its parent: it was split into (".", "/name") and
    # then refused as an invalid store key (exit 2).
    top_level = f"/ckptkit-missing-{uuid.uuid4().hex[:8]}"
    missing = top_level if where == "top-level" else str(tmp_path / "no" / "x")
    args = [a.format(p=missing, out=tmp_path / "out") for a in COMMANDS[command]]
    out = run(*args)
    assert out.returncode == 4, out.stdout + out.stderr
    assert "invalid store key" not in out.stderr
    assert "no such" in out.stderr and missing in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "out").exists()


def test_split_parent_of_a_top_level_path() -> None:
    from ckptkit.api import split_parent

    assert split_parent("/data") == ("/", "data")
    assert split_parent("/data/run") == ("/data", "run")
    assert split_parent("run") == (".", "run")


# --- an http(s) server that cannot be reached ----------------------------------------------------

UNREACHABLE = "http://127.0.0.1:1/x"


@pytest.mark.parametrize(
    "args",
    [
        ["verify", UNREACHABLE],
        ["ls", UNREACHABLE],
        ["gc", UNREACHABLE],
        ["inspect", UNREACHABLE],
        ["inspect", UNREACHABLE + "/model.pt"],
        ["scan", UNREACHABLE],
        ["doctor", UNREACHABLE],
        ["index", UNREACHABLE],
        ["sync", UNREACHABLE, "{out}"],
        ["convert", "--to", "safetensors", UNREACHABLE + "/model.pt", "{out}"],
        ["consolidate", UNREACHABLE, "{out}"],
    ],
    ids=lambda a: "-".join(a[:2]).replace(UNREACHABLE, "url"),
)
def test_an_unreachable_http_server_is_a_storage_error(tmp_path: Path, args: list[str]) -> None:
    out = run(*[a.format(out=tmp_path / "out") for a in args], "--json")
    assert out.returncode == 4, out.stdout + out.stderr
    error = json.loads(out.stdout)["error"]
    assert "cannot connect" in error["message"], error
    assert "http://127.0.0.1:1/x" in error["message"] and "http://http://" not in error["message"]
    assert error["message"].count("http://") == 1, error


def test_an_http_store_names_its_url_once() -> None:
    store = open_store("https://example.invalid/models")
    assert store.url == "https://example.invalid/models"
    assert store.child("run").url == "https://example.invalid/models/run"


# --- gc and object keys no path can name ---------------------------------------------------------

ODD_KEYS = [
    "step-00000003/ckptkit-aaaaaaaaaaaa//double-slash",
    "step-00000003/ckptkit-aaaaaaaaaaaa/./dot",
    "step-00000004/ckptkit-bbbbbbbbbbbb/../dotdot",
    "step-00000005/ckptkit-cccccccccccc/trailing/",
    ".step-00000006.ckptkit-staging-dddddddddddd//x",
    "step-00000007//.ckptkit-tmp-eeee",
]


@pytest.fixture
def bucket_with_odd_keys(s3_bucket: str, s3_endpoint: str) -> tuple[str, object]:
    import boto3

    root = s3_bucket + "/run"
    commit_files(open_store(root), "step-00000001", sample_files(1), step=1)
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    bucket = s3_bucket.removeprefix("s3://")
    for key in ODD_KEYS:
        client.put_object(Bucket=bucket, Key=f"run/{key}", Body=b"odd")
    client.put_object(Bucket=bucket, Key="run/step-00000008/ckptkit-ffffffffffff/orphan.bin", Body=b"x" * 10)
    return root, (client, bucket)


def _keys(client, bucket: str) -> set[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="run/")
    return {o["Key"].removeprefix("run/") for page in pages for o in page.get("Contents", [])}


def test_gc_skips_and_reports_keys_no_path_can_name(bucket_with_odd_keys) -> None:
    root, (client, bucket) = bucket_with_odd_keys
    out = run("gc", "--grace", "0", root, "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(out.stdout)
    assert [d["prefix"] for d in report["removed"]] == ["step-00000008/ckptkit-ffffffffffff"]
    skipped = {s["key"]: s["reason"] for s in report["skipped"]}
    assert set(skipped) == set(ODD_KEYS)
    assert all(skipped.values())
    left = _keys(client, bucket)
    assert "step-00000008/ckptkit-ffffffffffff/orphan.bin" not in left
    assert set(ODD_KEYS) <= left  # nothing it could not name was touched
    assert run("verify", root + "/step-00000001").returncode == 0


def test_gc_text_report_names_what_it_skipped(bucket_with_odd_keys) -> None:
    root, _ = bucket_with_odd_keys
    out = run("gc", "--grace", "0", "--dry-run", root)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "would remove 1 item(s)" in out.stdout
    assert "skipped" in out.stdout and "step-00000003/ckptkit-aaaaaaaaaaaa//double-slash" in out.stdout


# --- sync: permanent errors are not retried ------------------------------------------------------


class CountingPolicy(RetryPolicy):
    """Backoff without waiting, counting every retry it was asked to wait for."""

    def delay(self, attempt: int) -> float:
        RETRIES.append(attempt)
        return 0.0


RETRIES: list[int] = []


@pytest.fixture
def mounted(tmp_path: Path) -> Iterator[callable]:
    """Mount small tmpfs filesystems (root only); unmounted afterwards."""
    mounts: list[Path] = []

    def mount(name: str, options: str) -> Path:
        path = tmp_path / name
        path.mkdir()
        command = ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)]
        done = subprocess.run(command, capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        mounts.append(path)
        return path

    yield mount
    for path in mounts:
        subprocess.run(["umount", str(path)], check=False)


@pytest.mark.parametrize(
    ("options", "message"),
    [("size=1m", "no space left on device"), ("ro,size=1m", "read-only file system")],
    ids=["full-disk", "read-only"],
)
def test_sync_to_a_full_or_read_only_disk_fails_at_once(
    tmp_path: Path, mounted, options: str, message: str
) -> None:
    src = make_root(tmp_path / "src", size=700_000)  # each checkpoint alone outgrows the 1 MiB disk
    dst = mounted("dst", options)
    RETRIES.clear()
    report = sync(src, dst / "run", retry=CountingPolicy(attempts=5))
    assert RETRIES == []
    assert report.exit_code == 4
    assert [o.status for o in report.outcomes] == ["failed", "failed"]
    assert all(message in o.detail.lower() for o in report.outcomes), [o.detail for o in report.outcomes]
    assert not list(dst.rglob(MANIFEST_NAME))
    out = run("sync", str(src), str(dst / "run2"))
    assert out.returncode == 4
    assert message in out.stdout.lower() and "failed 5 time(s)" not in out.stdout
    assert not list(dst.rglob(MANIFEST_NAME))


@pytest.fixture
def public_tmp() -> Iterator[Path]:
    """A directory other users can reach (pytest's own tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="ckptkit-public-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_sync_into_a_directory_without_write_permission(public_tmp: Path) -> None:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root to run the command as the unprivileged user 'nobody' (setpriv)")
    src = make_root(public_tmp / "src", steps=(1,))
    locked = public_tmp / "locked"
    locked.mkdir()
    for path in (src, *src.rglob("*")):
        path.chmod(path.stat().st_mode | 0o555)
    locked.chmod(0o555)
    out = run("sync", str(src), str(locked / "run"), user="nobody")
    assert out.returncode == 4, out.stdout + out.stderr
    assert "permission denied" in out.stdout and "failed 5 time(s)" not in out.stdout
    assert tree(locked) == []


def test_transient_errors_are_still_retried(tmp_path: Path) -> None:
    from ckptkit.errors import PermanentStorageError, StorageError
    from ckptkit.transfer import is_transient

    assert is_transient(StorageError("connection reset"))
    assert not is_transient(PermanentStorageError("no space left on device"))


# --- sync: a size mismatch says so ---------------------------------------------------------------


def _misstate_size(checkpoint: Path, name: str, size: int) -> None:
    manifest_path = checkpoint / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    (entry,) = [f for f in manifest["files"] if f["path"] == name]
    entry["size"] = size
    manifest_path.write_text(json.dumps(manifest))


def test_a_size_mismatch_is_reported_as_one(tmp_path: Path) -> None:
    src = tmp_path / "src"
    commit_files(open_store(src), "step-00000001", {"a.bin": b"x" * 1000}, step=1)
    _misstate_size(src / "step-00000001", "a.bin", 1200)
    report = sync(src, tmp_path / "dst", retry=RetryPolicy(1))
    (outcome,) = report.outcomes
    assert outcome.status == "failed" and outcome.exit_code == 1
    assert "size mismatch" in outcome.detail and "expected 1200 bytes, got 1000" in outcome.detail
    assert "digest mismatch" not in outcome.detail


def test_copy_object_tells_size_from_content(tmp_path: Path) -> None:
    from ckptkit.errors import SizeMismatchError

    store = open_store(tmp_path / "s")
    manifest = commit_files(store, "c", {"a.bin": b"y" * 100, "b.bin": b"z" * 100})
    a, b = sorted(manifest.files, key=lambda f: f.path)
    files = store.child("c")
    with pytest.raises(SizeMismatchError) as size:
        copy_object(files, a.path, store, "copy1", dataclasses.replace(a, size=99))
    assert (size.value.expected_size, size.value.actual_size) == (99, 100)
    with pytest.raises(ChecksumMismatchError) as digest:
        copy_object(files, a.path, store, "copy2", dataclasses.replace(a, digest=b.digest, chunks=b.chunks))
    assert not isinstance(digest.value, SizeMismatchError)
    assert digest.value.expected == b.digest and digest.value.actual == a.digest
    assert not store.exists("copy1") and not store.exists("copy2")


# --- sync: source and destination must not overlap -----------------------------------------------


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        ("run", "run/step-00000002"),  # destination inside the source (and a committed checkpoint)
        ("run", "run/mirror"),  # destination inside the source
        ("run", "run"),  # the same place
        ("run/step-00000001", "run/step-00000001/copy"),  # inside the checkpoint being copied
        ("run/step-00000001", "run/"),  # one checkpoint onto itself
        ("run/inner", "run"),  # source inside the destination
        ("other", "run/step-00000002/nested"),  # inside a committed checkpoint
    ],
)
def test_sync_refuses_overlapping_places_locally(tmp_path: Path, src: str, dst: str) -> None:
    make_root(tmp_path / "run", size=1000)
    make_root(tmp_path / "run" / "inner", steps=(7,), size=1000)
    make_root(tmp_path / "other", steps=(9,), size=1000)
    before = tree(tmp_path)
    dst_arg = str(tmp_path / dst) + ("/" if dst.endswith("/") else "")
    out = run("sync", str(tmp_path / src), dst_arg)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "ckptkit: error:" in out.stderr and "Traceback" not in out.stderr
    assert tree(tmp_path) == before


def test_sync_refuses_overlap_through_a_symlinked_path(tmp_path: Path) -> None:
    make_root(tmp_path / "run", size=1000)
    (tmp_path / "alias").symlink_to(tmp_path / "run")
    out = run("sync", str(tmp_path / "run"), str(tmp_path / "alias" / "mirror"))
    assert out.returncode == 2, out.stdout + out.stderr
    assert not (tmp_path / "run" / "mirror").exists()


def test_sync_allows_siblings_whose_names_share_a_prefix(tmp_path: Path) -> None:
    make_root(tmp_path / "run", size=1000)
    out = run("sync", str(tmp_path / "run"), str(tmp_path / "run-mirror"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert (tmp_path / "run-mirror" / "step-00000002" / MANIFEST_NAME).exists()


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        ("run", "run/mirror"),
        ("run/mirror", "run"),
        ("run", "run/step-00000001/x"),
        ("run/step-00000001", "run/step-00000001/copy"),
    ],
)
@pytest.mark.slow  # a CLI sync per case on moto S3; the local cases stay quick
def test_sync_refuses_overlapping_places_on_s3(s3_bucket: str, src: str, dst: str) -> None:
    root = open_store(s3_bucket + "/run")
    commit_files(root, "step-00000001", {"a.bin": b"a" * 100}, step=1)
    commit_files(open_store(s3_bucket + "/run/mirror"), "step-00000005", {"b.bin": b"b" * 100}, step=5)
    before = sorted(o.key for o in open_store(s3_bucket).list(""))
    out = run("sync", f"{s3_bucket}/{src}", f"{s3_bucket}/{dst}")
    assert out.returncode == 2, out.stdout + out.stderr
    assert sorted(o.key for o in open_store(s3_bucket).list("")) == before


def test_sync_between_s3_prefixes_that_share_a_name_prefix(s3_bucket: str) -> None:
    commit_files(open_store(s3_bucket + "/run"), "step-00000001", {"a.bin": b"a" * 100}, step=1)
    out = run("sync", f"{s3_bucket}/run", f"{s3_bucket}/run2")
    assert out.returncode == 0, out.stdout + out.stderr
    assert open_store(s3_bucket + "/run2").exists(f"step-00000001/{MANIFEST_NAME}")


# --- the base install -----------------------------------------------------------------------------


def _imported_packages(paths: list[Path]) -> set[str]:
    import ast

    found: set[str] = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - {"ckptkit"}


def test_the_base_install_declares_what_ckptkit_imports() -> None:
    """`pip install ckptkit` must bring every package the core and the CLI import, even lazily:
    without numpy, `convert --dtype` failed with a traceback and torch warned at every import
    ("Failed to initialize NumPy"), the first thing `make demo` printed."""
    tomllib = pytest.importorskip("tomllib")
    repo = Path(__file__).resolve().parents[1]
    project = tomllib.loads((repo / "pyproject.toml").read_text())["project"]
    declared = _names(project["dependencies"])
    # Integrations run inside the framework they integrate with, which brings its own package;
    # ckptkit.testing runs inside pytest, and the `testing` extra declares what it needs.
    package = repo / "ckptkit"
    core = [p for p in package.rglob("*.py") if not {"integrations", "testing"} & set(p.parts)]
    # An object store's own packages are imported only once open_store has found its backend
    # installed (else BackendMissingError names the extra): s3fs, gcsfs, adlfs and botocore,
    # which s3fs brings through aiobotocore.
    extras = project["optional-dependencies"]
    backends = _names(extras["s3"]) | _names(extras["gcs"]) | _names(extras["azure"]) | {"botocore"}
    assert _imported_packages(core) <= declared | backends
    testing_extra = declared | _names(project["optional-dependencies"]["testing"])
    assert _imported_packages(list((package / "testing").rglob("*.py"))) <= testing_extra


def _names(requirements: list[str]) -> set[str]:
    """Import names of requirement strings ("hypothesis>=6.100" -> "hypothesis")."""
    return {
        dep.split(";")[0].split("[")[0].split("<")[0].split(">")[0].split("=")[0].strip().replace("-", "_")
        for dep in requirements
    }
