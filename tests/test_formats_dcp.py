"""DCP checkpoints written by torch.distributed.checkpoint.save, listed without unpickling."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptkit.errors import FormatError
from ckptkit.formats.dcp import read_dcp
from ckptkit.pickle import GlobalRef
from ckptkit.storage import LocalStore

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")

def state_dict() -> dict[str, Any]:
    torch.manual_seed(0)
    return {
        "model": {"w": torch.randn(4, 3), "b": torch.zeros(3, dtype=torch.bfloat16)},
        "step": 7,
        "extra": {"note": "hello"},
    }


@pytest.fixture
def store(tmp_path: Any) -> LocalStore:
    import torch.distributed.checkpoint as dcp

    # A single process needs no process group in torch 2.13: save() warns and proceeds.
    assert not torch.distributed.is_initialized()
    dcp.save(state_dict(), checkpoint_id=str(tmp_path / "ckpt"))
    return LocalStore(tmp_path, fsync=False)


def test_lists_entries_from_real_metadata(store: LocalStore) -> None:
    checkpoint = read_dcp(store, "ckpt")
    assert checkpoint.problems == []
    assert checkpoint.files == ["__0_0.distcp"] and checkpoint.missing_files == []
    entries = checkpoint.entries
    assert set(entries) == {"model.w", "model.b", "step", "extra.note"}
    w, b = entries["model.w"], entries["model.b"]
    assert (w.kind, w.dtype, w.size) == ("tensor", "float32", (4, 3))
    assert (b.kind, b.dtype, b.size) == ("tensor", "bfloat16", (3,))
    assert [(c.offsets, c.sizes) for c in w.chunks] == [((0, 0), (4, 3))]
    assert entries["step"].kind == "bytes" and entries["extra.note"].kind == "bytes"
    assert checkpoint.planner_data["model.w"] == ("model", "w")
    # Every class in .metadata is named, none is imported.
    assert GlobalRef("torch.distributed.checkpoint.metadata", "Metadata") in {
        g.ref for g in checkpoint.globals
    }


def test_items_point_at_torch_save_archives(store: LocalStore) -> None:
    checkpoint = read_dcp(store, "ckpt")
    for entry in checkpoint.entries.values():
        assert len(entry.items) == 1
        item = entry.items[0]
        data = store.get(f"ckpt/{item.relative_path}", item.offset, item.offset + item.length)
        assert data[:4] == b"PK\x03\x04"  # each item is a complete torch.save zip
        if entry.kind == "tensor":
            import io

            tensor = torch.load(io.BytesIO(data))  # test-side check only: the bytes are that tensor
            assert tuple(tensor.shape) == entry.size


@pytest.mark.slow  # a child interpreter imports torch.distributed.checkpoint
def test_agrees_with_torchs_own_reader(store: LocalStore, tmp_path: Path) -> None:
    # torch's reader, in a subprocess (it unpickles .metadata; ckptkit never does).
    script = (
        "import sys, torch.distributed.checkpoint as dcp\n"
        "m = dcp.FileSystemReader(sys.argv[1]).read_metadata()\n"
        "for k, v in sorted(m.state_dict_metadata.items()):\n"
        "    size = getattr(v, 'size', None)\n"
        "    print(k, size and tuple(size), getattr(getattr(v, 'properties', None), 'dtype', None))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "ckpt")], capture_output=True, text=True, check=True
    ).stdout
    ours = read_dcp(store, "ckpt").entries
    expected = []
    for fqn in sorted(ours):
        entry = ours[fqn]
        dtype = f"torch.{entry.dtype}" if entry.dtype else None
        expected.append(f"{fqn} {entry.size} {dtype}")
    assert out.splitlines() == expected


def test_missing_data_file(store: LocalStore) -> None:
    store.delete("ckpt/__0_0.distcp")
    checkpoint = read_dcp(store, "ckpt")
    assert checkpoint.missing_files == ["__0_0.distcp"]
    assert checkpoint.problems == ["data file '__0_0.distcp' is missing"]


def test_truncated_data_file(store: LocalStore) -> None:
    data = store.get("ckpt/__0_0.distcp")
    store.put("ckpt/__0_0.distcp", data[:-100])
    problems = read_dcp(store, "ckpt").problems
    assert problems and all("lie past the end of __0_0.distcp" in p for p in problems)


def test_unreferenced_file_is_listed(store: LocalStore) -> None:
    store.put("ckpt/__1_0.distcp", b"stale")
    checkpoint = read_dcp(store, "ckpt")
    assert checkpoint.unreferenced_files == ["__1_0.distcp"] and checkpoint.problems == []


def test_uncommitted_checkpoint(store: LocalStore) -> None:
    store.delete("ckpt/.metadata")
    with pytest.raises(FormatError, match=r"ckpt/\.metadata is missing: the DCP checkpoint is not committed"):
        read_dcp(store, "ckpt")


def test_not_a_dcp_metadata(store: LocalStore) -> None:
    store.put("ckpt/.metadata", pickle.dumps({"state_dict_metadata": {}}, protocol=4))
    with pytest.raises(FormatError, match=r"not a torch\.distributed\.checkpoint Metadata object"):
        read_dcp(store, "ckpt")


def test_hostile_metadata_is_not_run(store: LocalStore, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = b"\x80\x04cposix\nsystem\n" + pickle.dumps(f"touch {marker}", protocol=4)[2:-1] + b"\x85R."
    store.put("ckpt/.metadata", payload)
    with pytest.raises(FormatError):
        read_dcp(store, "ckpt")
    assert not marker.exists()
