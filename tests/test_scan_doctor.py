"""``scan`` and ``doctor`` on real checkpoints (torch, HF Trainer, DeepSpeed), compared with torch itself."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from ckptkit.cli.safety_cmds import doctor_command, scan_command
from ckptkit.errors import EXIT_FINDINGS, EXIT_OK, EXIT_UNSAFE
from ckptkit.ops.doctor import TORCH_DEFAULT_GLOBALS, doctor
from ckptkit.ops.scan import scan
from ckptkit.storage import open_store

REPO_ROOT = Path(__file__).resolve().parents[1]


def _invoke(command, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(command, list(args))
    return result.exit_code, result.output


def test_scan_real_torch_files_are_clean(torch_checkpoints) -> None:
    code, output = _invoke(scan_command, "--all", str(torch_checkpoints.root))
    assert code == EXIT_OK, output
    assert "torch._utils._rebuild_tensor_v2" in output and "CLEAN" in output
    report = scan(torch_checkpoints.root)
    protocols = {f.path: f.protocol for f in report.files}
    assert protocols["protocol4.pt"] == 4 and protocols["legacy.pt"] == 2


def test_scan_json_offsets_point_at_global_opcodes(torch_checkpoints) -> None:
    code, output = _invoke(scan_command, "--json", str(torch_checkpoints.path("adamw_onecycle.pt")))
    assert code == EXIT_OK
    document = json.loads(output)
    (scanned,) = document["files"]
    data = zipfile.ZipFile(torch_checkpoints.path("adamw_onecycle.pt")).read(scanned["globals"][0]["pickle"])
    for use in scanned["globals"]:
        assert data[use["offset"] : use["offset"] + 1] == b"c"  # GLOBAL, protocol 2
        module, name = data[use["offset"] + 1 :].split(b"\n")[:2]
        assert f"{module.decode()}.{name.decode()}" == use["global"]
    assert document["verdict"] == "clean"


def test_scan_hf_checkpoint_flags_training_args(hf_trainer_checkpoint) -> None:
    directory = next(iter(hf_trainer_checkpoint.checkpoints.values()))
    code, output = _invoke(scan_command, str(directory))
    assert code == EXIT_UNSAFE
    assert "training_args.bin" in output and "transformers.training_args.TrainingArguments" in output
    clean = [f.path for f in scan(directory).files if not f.unsafe]
    assert {"optimizer.pt", "scheduler.pt", "rng_state.pth", "model.safetensors"} <= set(clean)


def test_scan_and_doctor_match_torch_on_deepspeed(deepspeed_checkpoints) -> None:
    # torch's own get_unsafe_globals_in_checkpoint list, recorded at generation time, is exactly
    # what doctor says each file needs beyond torch's defaults.
    for case in deepspeed_checkpoints.cases.values():
        code, output = _invoke(scan_command, str(case.save_dir))
        assert code == EXIT_OK, output
        report = doctor(case.save_dir)
        needed = {f.path: sorted(e.qualname for e in f.needed) for f in report.files}
        for path, unsafe in case.expected["unsafe_globals"].items():
            if path.endswith(".pt"):
                assert needed[path] == sorted(unsafe), (case.name, path)
        assert report.exit_code == EXIT_OK and not report.entries("never-allow")


def _run_snippet_then_load(snippet: str, path: Path) -> subprocess.CompletedProcess[str]:
    code = f"{snippet}\nimport torch\nprint(type(torch.load({str(path)!r}, weights_only=True)).__name__)"
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_doctor_snippet_makes_weights_only_load_work(deepspeed_checkpoints, hf_trainer_checkpoint) -> None:
    directory = next(iter(hf_trainer_checkpoint.checkpoints.values()))
    optim = next(deepspeed_checkpoints["z1_fp16_steplr"].tag_dir.glob("*optim_states.pt"))
    for path, expected_import in (
        (optim, "from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler"),
        (directory / "rng_state.pth", "from numpy.dtypes import UInt32DType"),
    ):
        code, output = _invoke(doctor_command, str(path))
        assert code == EXIT_OK, output
        assert expected_import in output
        snippet = doctor(path).snippet()
        assert "torch.serialization.add_safe_globals([" in snippet
        assert _run_snippet_then_load("", path).returncode != 0  # refused without the allowlist
        proc = _run_snippet_then_load(snippet, path)
        assert proc.returncode == 0 and proc.stdout.strip() == "dict", proc.stderr[-2000:]


def test_doctor_flags_never_allow_and_unvetted(hf_trainer_checkpoint, tmp_path: Path) -> None:
    directory = next(iter(hf_trainer_checkpoint.checkpoints.values()))
    code, output = _invoke(doctor_command, str(directory / "training_args.bin"))
    assert code == EXIT_UNSAFE
    assert "never allow: transformers.training_args.TrainingArguments" in output
    # A class nobody vetted (and nobody must never allow) asks for a decision: exit 1.
    (tmp_path / "x.pkl").write_bytes(b"\x80\x02cmylib.things\nWidget\n)\x81}b.")
    report = doctor(tmp_path / "x.pkl")
    assert [e.status for e in report.entries("unvetted")] == ["unvetted"]
    assert report.exit_code == EXIT_FINDINGS


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 4")
def test_doctor_protocol4_frame_matches_torch(torch_checkpoints) -> None:
    import torch

    path = torch_checkpoints.path("protocol4.pt")
    code, output = _invoke(doctor_command, str(path))
    assert code == EXIT_FINDINGS
    assert "Unsupported operand 149" in output and "FRAME" in output and "safe_load" in output
    with pytest.raises(Exception, match="Unsupported operand 149"):
        torch.load(path, weights_only=True)  # torch 2.13 confirms what doctor predicted


def test_torch_default_table_matches_installed_torch() -> None:
    from torch._weights_only_unpickler import _get_allowed_globals

    assert set(_get_allowed_globals()) == TORCH_DEFAULT_GLOBALS


def test_scan_reads_every_concatenated_pickle(tmp_path: Path) -> None:
    # pickle.load reads the first; a loader that loops reads the second, and so does scan.
    payload = b"\x80\x02cposix\nsystem\nX\x04\x00\x00\x00true\x85R."
    (tmp_path / "two.pkl").write_bytes(pickle.dumps({"a": 1}, protocol=2) + payload)
    (scanned,) = scan(tmp_path / "two.pkl").files
    assert [g.ref.qualname for g in scanned.unsafe_globals] == ["posix.system"]


def test_scan_object_store_file_and_prefix(s3_bucket: str, torch_checkpoints) -> None:
    store = open_store(s3_bucket + "/run")
    store.put("ckpt/model.pt", torch_checkpoints.path("sequential.pt").read_bytes())
    store.put("ckpt/evil.pkl", b"cos\nsystem\n(S'true'\ntR.")
    assert scan(s3_bucket + "/run/ckpt/model.pt").verdict == "clean"
    report = scan(s3_bucket + "/run/ckpt")
    assert [f.path for f in report.files] == ["evil.pkl", "model.pt"] and report.verdict == "unsafe"


def test_safety_commands_do_not_import_torch(torch_checkpoints, deepspeed_checkpoints) -> None:
    optim = next(deepspeed_checkpoints["z2_fp16_overflow"].tag_dir.glob("*optim_states.pt"))
    code = (
        "import sys\nfrom click.testing import CliRunner\n"
        "import ckptkit.ops.scan, ckptkit.ops.doctor, ckptkit.ops.structural, ckptkit.safe\n"
        "from ckptkit.cli.safety_cmds import scan_command, doctor_command\n"
        "from ckptkit.ops.structural import verify_structure\nfrom ckptkit.storage import open_store\n"
        f"for cmd in (scan_command, doctor_command):\n"
        f"    for p in ({str(torch_checkpoints.root)!r}, {str(optim)!r}):\n"
        "        assert CliRunner().invoke(cmd, [p]).exit_code in (0, 1)\n"
        f"verify_structure(open_store({str(optim.parent)!r}))\n"
        "assert 'torch' not in sys.modules and 'numpy' not in sys.modules, 'torch imported'\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
