"""The CLI as a user meets it: tables, --json, exit codes, one-line errors, no torch."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from ckptkit.storage import open_store
from tests.helpers import commit_files, sample_files

CLI = [sys.executable, "-c", "from ckptkit.cli.main import main; main()"]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=env, timeout=120)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    store = open_store(tmp_path / "run")
    commit_files(store, "step-00000001", sample_files(1), step=1)
    commit_files(store, "step-00000002", sample_files(2), step=2)
    return tmp_path / "run"


def test_ls_table_and_json(root: Path) -> None:
    out = run("ls", str(root))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[:3] == ["checkpoint", "step", "status"]
    assert "step-00000001" in lines[2] and "step-00000002" in lines[3]  # newest last
    data = json.loads(run("ls", str(root), "--json").stdout)
    assert [(c["name"], c["step"], c["status"], c["files"]) for c in data] == [
        ("step-00000001", 1, "committed", 3), ("step-00000002", 2, "committed", 3)]


def test_verify_ok_then_corrupt(root: Path) -> None:
    ok = run("verify", str(root))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "OK: 2 checkpoint(s) checked" in ok.stdout
    target = root / "step-00000002" / "model.bin"
    data = bytearray(target.read_bytes())
    data[12345] ^= 0x10
    target.write_bytes(bytes(data))
    bad = run("verify", str(root / "step-00000002"))
    assert bad.returncode == 1
    assert "model.bin: content differs from the manifest in bytes [0, 300000)" in bad.stdout
    report = json.loads(run("verify", str(root), "--json").stdout)
    assert report["ok"] is False
    findings = [f for c in report["checkpoints"] for f in c["findings"]]
    assert findings[0]["path"] == "model.bin" and findings[0]["byte_range"] == [0, 300000]


def test_index_then_verify_a_foreign_directory(tmp_path: Path) -> None:
    ckpt = tmp_path / "checkpoint-40"
    ckpt.mkdir()
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 40}))
    (ckpt / "model.safetensors").write_bytes(b"\x00" * 1000)
    plain = run("verify", str(ckpt))
    # Without a manifest only structural checks run; the zero-filled "safetensors" fails them.
    assert plain.returncode == 1 and "model.safetensors: unknown content" in plain.stdout
    assert "'ckptkit index' records them" in plain.stdout
    out = run("index", str(ckpt))
    assert out.returncode == 0, out.stderr
    assert "layout hf-trainer, step 40, 2 files" in out.stdout
    assert run("verify", str(ckpt)).returncode == 0
    again = run("index", str(ckpt))
    assert again.returncode == 2 and "already committed" in again.stderr
    assert run("index", str(ckpt), "--force", "--json").returncode == 0


def test_gc_removes_an_empty_staging_directory(root: Path) -> None:
    # A kill right after the staging directory was made leaves it empty.
    staging = root / ".step-00000009.ckptkit-staging-ba9876543210"
    staging.mkdir()
    noted = run("ls", str(root))
    assert "1 leftover staging or trash director(ies) of interrupted saves" in noted.stderr
    assert run("gc", str(root), "--grace", "0").returncode == 0
    assert not staging.exists()


def test_gc_dry_run_and_removal(root: Path) -> None:
    staging = root / ".step-00000003.ckptkit-staging-0123456789ab"
    staging.mkdir()
    (staging / "model.bin").write_bytes(b"x" * 10)
    dry = run("gc", str(root), "--grace", "0", "--dry-run")
    assert dry.returncode == 0 and "would remove 1 item(s)" in dry.stdout and staging.exists()
    kept = run("gc", str(root))
    assert "kept 1 item(s) younger than the grace period" in kept.stdout and staging.exists()
    done = json.loads(run("gc", str(root), "--grace", "0", "--json").stdout)
    assert done["bytes_removed"] == 10 and not staging.exists()
    assert run("gc", str(root), "--grace", "soon").returncode == 2


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["verify", "/nonexistent/ckpt"], 4, "no such file or directory"),
        (["-o", "endpoint_url=http://x", "ls", "/tmp"], 2, "do not apply to local path"),
        (["ls", "/nonexistent/ckpt"], 0, "no checkpoints under"),
        (["index", "/nonexistent/ckpt"], 4, "no files to index"),
        (["verify", "nosuchscheme://x/y"], 2, "unknown URL scheme"),
        (["frobnicate"], 2, "No such command"),
    ],
)
def test_bad_input_gets_one_clear_line(args: list[str], code: int, message: str) -> None:
    out = run(*args)
    assert out.returncode == code, out.stdout + out.stderr
    assert message in out.stdout + out.stderr
    assert "Traceback" not in out.stderr


def test_a_missing_backend_package_is_named_with_its_install_command() -> None:
    # gcsfs is installed for the GCS tests; a None entry in sys.modules makes its import fail
    # as on a machine without it.
    blocked = "import sys; sys.modules['gcsfs'] = None; from ckptkit.cli.main import main; main()"
    command = [sys.executable, "-c", blocked, "verify", "gs://bucket/x"]
    out = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert out.returncode == 4, out.stdout + out.stderr
    assert "needs the 'gcsfs' package" in out.stderr and "pip install 'ckptkit[gcs]'" in out.stderr
    assert "Traceback" not in out.stderr


def test_not_a_checkpoint_directory(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    out = run("verify", str(tmp_path))
    assert out.returncode == 1 and "no committed checkpoint" in out.stderr
    as_json = json.loads(run("verify", str(tmp_path), "--json").stdout)
    assert as_json["error"]["type"] == "NotCommittedError"


def test_s3_bucket_that_does_not_exist(s3_endpoint: str) -> None:
    out = run("verify", "s3://no-such-bucket-ckptkit/run")
    assert out.returncode in (1, 4), out.stderr
    assert "Traceback" not in out.stderr
    listing = run("ls", "s3://no-such-bucket-ckptkit/run")
    assert listing.returncode == 4 and "no-such-bucket-ckptkit" in listing.stderr


def test_s3_missing_credentials(s3_endpoint: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ENDPOINT_URL=s3_endpoint, AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_EC2_METADATA_DISABLED="true")
    out = run("ls", "s3://some-bucket/run", env=env)
    assert out.returncode == 4
    assert "no AWS credentials found" in out.stderr and "Traceback" not in out.stderr


def test_s3_roundtrip_through_cli(s3_bucket: str) -> None:
    store = open_store(s3_bucket + "/run")
    commit_files(store, "step-00000005", sample_files(5), step=5)
    listing = json.loads(run("ls", s3_bucket + "/run", "--json").stdout)
    assert [(c["name"], c["status"]) for c in listing] == [("step-00000005", "committed")]
    assert run("verify", s3_bucket + "/run").returncode == 0


def test_commands_do_not_import_torch(root: Path) -> None:
    probe = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from ckptkit.cli.main import cli\n"
        f"root = {str(root)!r}\n"
        "for args in (['ls', root], ['verify', root], ['gc', root, '--dry-run'], ['--help']):\n"
        "    result = CliRunner().invoke(cli, args)\n"
        "    assert result.exit_code == 0, (args, result.output)\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_verify_a_single_file_structurally(tmp_path: Path) -> None:
    import torch

    path = tmp_path / "weights.pt"
    torch.save({"w": torch.arange(1000.0)}, path)
    ok = run("verify", str(path))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "structure only (no manifest, so no digests)" in ok.stdout
    data = bytearray(path.read_bytes())
    data[data.index(struct.pack("<f", 500.0))] ^= 0x01  # a bit of the tensor record
    path.write_bytes(bytes(data))
    bad = run("verify", str(path))
    assert bad.returncode == 1 and "weights.pt" in bad.stdout


def test_verify_a_single_object_on_s3(s3_bucket: str, tmp_path: Path) -> None:
    import torch

    torch.save({"w": torch.arange(10.0)}, tmp_path / "w.pt")
    open_store(s3_bucket).put("models/w.pt", (tmp_path / "w.pt").read_bytes())
    out = run("verify", f"{s3_bucket}/models/w.pt")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "structure only (no manifest, so no digests)" in out.stdout
