"""Content sniffing: real files of every kind, impostors named like checkpoints, and read budgets."""

from __future__ import annotations

import io
import json
import pickle
import subprocess
import sys
import tarfile
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ckptkit.formats.sniff import Detected, detect
from tests.test_formats_safetensors import RecordingStore


@pytest.fixture
def store(tmp_path: Any) -> RecordingStore:
    return RecordingStore(tmp_path)


def torch_bytes(obj: Any, **kwargs: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer, **kwargs)
    return buffer.getvalue()


STATE = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "step": 3}


def put(store: RecordingStore, key: str, data: bytes) -> Detected:
    store.put(key, data)
    return detect(store, key)


def test_torch_zip(store: RecordingStore) -> None:
    found = put(store, "model.bin", torch_bytes(STATE))
    assert (found.kind, found.prefix_offset, found.bad) == ("torch-zip", 0, False)


def test_torch_zip_protocol_4(store: RecordingStore) -> None:
    assert put(store, "x", torch_bytes(STATE, pickle_protocol=4)).kind == "torch-zip"


def test_torch_legacy(store: RecordingStore) -> None:
    found = put(store, "legacy.pt", torch_bytes(STATE, _use_new_zipfile_serialization=False))
    assert found.kind == "torch-legacy"
    legacy4 = torch_bytes(STATE, _use_new_zipfile_serialization=False, pickle_protocol=4)
    assert put(store, "legacy4.pt", legacy4).kind == "torch-legacy"


def test_legacy_magic_computed_by_code_is_not_legacy(store: RecordingStore) -> None:
    # GHSA-97f8-7cmv-76j2: the "magic number" produced by a call. It is a pickle, nothing more.
    payload = b"\x80\x02cbuiltins\neval\nX\x16\x00\x00\x000x1950a86a20f9469cfc6c\x85R."
    assert put(store, "evil.pt", payload + b"rest").kind == "pickle"


def test_zip_with_prepended_bytes_reports_the_offset(store: RecordingStore) -> None:
    found = put(store, "model.pt", b"J" * 4000 + torch_bytes(STATE))
    assert (found.kind, found.prefix_offset) == ("torch-zip", 4000)
    assert "4000 bytes precede the archive" in found.detail


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5])
def test_bare_pickles_of_every_protocol(store: RecordingStore, protocol: int) -> None:
    data = pickle.dumps({"lr": 0.1, "milestones": [1, 2], "name": "x"}, protocol=protocol)
    found = put(store, "scheduler.safetensors", data)  # the extension lies
    assert found.kind == "pickle", found


def test_pickle_followed_by_junk_says_so(store: RecordingStore) -> None:
    found = put(store, "p.pkl", pickle.dumps([1, 2], protocol=2) + b"JUNK")
    assert found.kind == "pickle" and "does not end with STOP" in found.detail


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_dcp_metadata(store: RecordingStore, tmp_path: Any) -> None:
    import torch.distributed.checkpoint as dcp

    dcp.save({"w": torch.ones(2)}, checkpoint_id=str(tmp_path / "dcp"))
    assert detect(store, "dcp/.metadata").kind == "dcp-metadata"


def test_safetensors_and_its_truncation(store: RecordingStore, tmp_path: Any) -> None:
    save_file({"w": torch.ones(100)}, str(tmp_path / "model.bin"))
    assert detect(store, "model.bin").kind == "safetensors"
    data = store.get("model.bin")
    found = put(store, "cut.safetensors", data[:-10])
    assert found.kind == "truncated" and found.bad
    assert f"describes {len(data)} bytes, the file has {len(data) - 10}" in found.detail
    found = put(store, "cut2.safetensors", data[:20])
    assert found.kind == "truncated" and "the file is truncated" in found.detail


def test_json_npy_npz_tar(store: RecordingStore) -> None:
    assert put(store, "config.bin", json.dumps({"hidden_size": 8}).encode()).kind == "json"
    buffer = io.BytesIO()
    np.save(buffer, np.arange(4))
    assert put(store, "a.pt", buffer.getvalue()).kind == "npy"
    buffer = io.BytesIO()
    np.savez(buffer, a=np.arange(4))
    found = put(store, "b.pt", buffer.getvalue())
    assert found.kind == "zip" and "numpy .npz" in found.detail
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("sys_info")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    assert put(store, "old.pt", buffer.getvalue()).kind == "tar"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_archive(store: RecordingStore) -> None:
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), buffer)
    assert put(store, "model.pt", buffer.getvalue()).kind == "torchscript"


# --- impostors ---------------------------------------------------------------------------


LFS_POINTER = (
    b"version https://git-lfs.github.com/spec/v1\n"
    b"oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
    b"size 12345\n"
)


def test_git_lfs_pointer(store: RecordingStore) -> None:
    found = put(store, "pytorch_model.bin", LFS_POINTER)
    assert found.kind == "lfs-pointer" and found.bad
    assert found.detail == (
        "pytorch_model.bin: this is a Git LFS pointer, not the file: run git lfs pull "
        "(object sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393, 12345 bytes)"
    )


@pytest.mark.parametrize(
    "page",
    [
        b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head></html>",
        b"\n  <html><body>Access denied</body></html>",
        b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>NoSuchKey</Code></Error>',
    ],
)
def test_html_error_page(store: RecordingStore, page: bytes) -> None:
    found = put(store, "model.safetensors", page)
    assert found.kind == "html" and found.bad
    assert "looks like an HTML error page, not a checkpoint: the download probably failed" in found.detail


def test_json_error_body(store: RecordingStore) -> None:
    found = put(store, "model.bin", b'{"error": "Repository not found"}')
    assert found.kind == "error-json" and "download probably failed" in found.detail


def test_empty_file(store: RecordingStore) -> None:
    found = put(store, "model.pt", b"")
    assert (
        found.kind == "empty"
        and found.detail == "model.pt is empty (0 bytes): the download or save did not complete"
    )


@pytest.mark.parametrize("cut", [22, 100, 1000])
def test_zip_without_end_record_is_truncated(store: RecordingStore, cut: int) -> None:
    data = torch_bytes(STATE)
    found = put(store, "model.pt", data[: len(data) - cut])
    assert found.kind == "truncated"
    assert "zip archive without its end-of-central-directory record: the file is truncated" in found.detail


def test_unknown_bytes(store: RecordingStore) -> None:
    found = put(store, "model.pt", bytes(range(7, 200)) * 50)
    assert found.kind == "unknown" and found.bad


def test_stray_end_record_signature_in_data_is_not_a_zip(store: RecordingStore) -> None:
    # Random-looking bytes that happen to contain "PK\5\6" with plausible numbers.
    data = b"\x07" * 3000 + b"PK\x05\x06" + bytes(12) + (10).to_bytes(4, "little") + b"\x00\x00"
    assert put(store, "model.pt", data).kind == "unknown"


# --- read budget -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["zip", "legacy", "safetensors", "prefixed"])
def test_reads_only_the_ends_of_a_large_file(store: RecordingStore, tmp_path: Any, kind: str) -> None:
    big = {"w": torch.zeros(4 << 20, dtype=torch.uint8), "b": torch.ones(3)}
    if kind == "safetensors":
        save_file(big, str(tmp_path / "f"))
    else:
        data = torch_bytes(big, _use_new_zipfile_serialization=kind != "legacy")
        store.put("f", b"x" * 5000 + data if kind == "prefixed" else data)
    store.reads.clear()
    found = detect(store, "f")
    assert not found.bad
    assert store.bytes_read() <= 12 << 10, store.reads


def test_readers_do_not_import_torch() -> None:
    code = (
        "import sys\n"
        "import ckptkit.formats.sniff, ckptkit.formats.torchfile, ckptkit.formats.dcp\n"
        "import ckptkit.formats.hf_index, ckptkit.formats.safetensors, ckptkit.formats.zipfile_reader\n"
        "print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
