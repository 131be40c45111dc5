"""``inspect --stats`` computes over what is stored: declared sizes are never trusted.

Size bombs (a storage record far shorter than its declared element count, a view past its
storage, a zero-stride view of billions of elements over four stored ones) run through the CLI
in a subprocess under an address-space ceiling, with the peak RSS growth measured (VmHWM).
"""

from __future__ import annotations

import io
import json
import math
import pickle
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptkit.errors import FormatError
from ckptkit.ops.inspect import inspect_path

REPO = Path(__file__).resolve().parents[1]


# --- crafting torch.save files that torch.save would never write ------------------------------


class _Storage:
    def __init__(self, key: str, numel: int) -> None:
        self.key, self.numel = key, numel


class _Tensor:
    """Pickles as torch's own rebuild call over a storage persistent id, with any geometry."""

    def __init__(self, storage: _Storage, offset: int, shape: list[int], stride: list[int]) -> None:
        self.args = (storage, offset, tuple(shape), tuple(stride))

    def __reduce__(self) -> Any:
        storage, offset, shape, stride = self.args
        return torch._utils._rebuild_tensor_v2, (storage, offset, shape, stride, False, OrderedDict())


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, _Storage):
            return ("storage", torch.FloatStorage, obj.key, "cpu", obj.numel)
        return None


def crafted(tensors: dict[str, _Tensor], records: dict[str, bytes]) -> bytes:
    """A torch zip holding ``tensors`` (float32) over storage ``records``, CRCs correct."""
    pkl = io.BytesIO()
    _Pickler(pkl, protocol=2).dump(tensors)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr("archive/data.pkl", pkl.getvalue())
        archive.writestr("archive/byteorder", b"little")
        for key, data in records.items():
            archive.writestr(f"archive/data/{key}", data)
        archive.writestr("archive/version", b"3\n")
    return out.getvalue()


def _short_record(numel: int) -> bytes:
    # Declares ``numel`` float32 elements; the record holds four.
    return crafted({"w": _Tensor(_Storage("0", numel), 0, [numel], [1])}, {"0": bytes(16)})


# --- refusals, in process -------------------------------------------------------------------


def test_record_shorter_than_declared_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "short.pt"
    path.write_bytes(_short_record(1000))
    message = r"archive/data/0 holds 16 bytes, but it is declared as 1000 × float32"
    with pytest.raises(FormatError, match=message):
        inspect_path(path, ["model"], stats="w")


def test_view_past_its_storage_is_refused_not_read_from_the_next_record(tmp_path: Path) -> None:
    """The view reaches past storage 0 into storage 1's bytes, which lie inside the file: before,
    ``--stats`` reported values read from the neighbouring record."""
    first, second = torch.ones(4).numpy().tobytes(), torch.full((4,), 9.0).numpy().tobytes()
    tensors = {"w": _Tensor(_Storage("0", 4), 0, [8], [1]), "v": _Tensor(_Storage("1", 4), 0, [4], [1])}
    path = tmp_path / "past.pt"
    path.write_bytes(crafted(tensors, {"0": first, "1": second}))
    with pytest.raises(FormatError, match=r"reaches byte 32 of storage '0', which holds 16"):
        inspect_path(path, ["model"], stats="w")
    [ok] = inspect_path(path, ["model"], stats="v").stats  # the sound tensor of the file still reads
    assert (ok.min, ok.max) == (9.0, 9.0)


def test_overlapping_view_is_refused(tmp_path: Path) -> None:
    """Strides that revisit stored elements (not a plain expand) would make the stats cost more
    than the record; refused with the reason."""
    torch.save({"w": torch.arange(40.0).as_strided((20, 20), (1, 1))}, tmp_path / "overlap.pt")
    with pytest.raises(FormatError, match=r"overlapping strides"):
        inspect_path(tmp_path / "overlap.pt", ["model"], stats="w")


def test_expanded_view_stats_equal_torchs_over_the_expansion(tmp_path: Path) -> None:
    """A zero-stride view's stats come from the stored elements it touches, each counted as
    often as the view repeats it: the same numbers torch gives on the materialised tensor."""
    base = torch.tensor([1.5, float("nan"), -2.0, float("inf"), 5.0, 7.0])
    view = base[:4].view(2, 2).unsqueeze(0).expand(300, 2, 2).unsqueeze(-1).expand(300, 2, 2, 3)
    assert 0 in view.stride()
    torch.save({"w": view, "i": torch.arange(3, dtype=torch.int64).expand(5, 3)}, tmp_path / "x.pt")
    report = inspect_path(tmp_path / "x.pt", ["model"], stats="*")
    stats = {s.name: s for s in report.stats}
    dense = view.contiguous()
    finite = dense[torch.isfinite(dense)].double()
    w = stats["w"]
    assert (w.shape, w.numel, w.nan, w.inf) == ([300, 2, 2, 3], 3600, 900, 900)
    assert (w.min, w.max) == (float(finite.min()), float(finite.max()))
    assert w.mean == pytest.approx(float(finite.mean()))
    assert w.norm == pytest.approx(float(finite.norm()))
    i = stats["i"]
    assert (i.min, i.max, i.mean, i.nan, i.inf) == (0, 2, 1.0, 0, 0)
    assert i.norm == pytest.approx(math.sqrt(5 * (0 + 1 + 4)))


# --- size bombs through the CLI, under a memory ceiling --------------------------------------

# The ceiling (address space) stops a regression from taking the machine's memory; VmHWM gives
# the peak RSS growth the command caused. VmHWM, not ru_maxrss: see test_convert.py.
_CEILING = 3 << 30
_CLI_SCRIPT = """
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, ({ceiling}, {ceiling}))
import torch
from ckptkit.cli.main import cli

def peak():
    status = open("/proc/self/status").read()
    return int(status.split("VmHWM:")[1].split()[0]) * 1024

before = peak()
try:
    cli(["inspect", sys.argv[1], "--model", "--stats", "*", "--json"], standalone_mode=False)
    code = 0
except SystemExit as exc:
    code = exc.code
print("RESULT " + json.dumps({{"code": code, "growth": peak() - before}}))
"""


def _inspect_under_ceiling(path: Path) -> tuple[int, int, str]:
    out = subprocess.run(
        [sys.executable, "-c", _CLI_SCRIPT.format(ceiling=_CEILING), str(path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    text = out.stdout + out.stderr
    assert "Traceback" not in text, text[-3000:]
    result = json.loads(text.split("RESULT ", 1)[1].splitlines()[0])
    return result["code"], result["growth"], text


@pytest.mark.parametrize(
    ("name", "numel", "message"),
    [
        ("declares-4e8", 4 * 10**8, "holds 16 bytes"),  # was 1.8 GB peak RSS
        ("declares-1e12", 10**12, "holds 16 bytes"),  # was a MemoryError traceback
    ],
)
@pytest.mark.slow  # a child interpreter imports torch and measures its peak RSS
def test_size_bomb_refused_within_memory(tmp_path: Path, name: str, numel: int, message: str) -> None:
    path = tmp_path / f"{name}.pt"
    path.write_bytes(_short_record(numel))
    assert path.stat().st_size < 1024
    code, growth, text = _inspect_under_ceiling(path)
    assert code == 1 and message in text
    assert growth < 64 << 20, growth


@pytest.mark.slow  # a child interpreter imports torch and measures its peak RSS
def test_zero_stride_bomb_stats_within_memory(tmp_path: Path) -> None:
    """A 20000×20000 zero-stride view of a 4-element storage (was 8.5 GB peak RSS): its stats
    are those of the one stored element it repeats, computed without materialising it."""
    path = tmp_path / "expand.pt"
    torch.save({"w": torch.tensor([3.0, 1.0, 2.0, 4.0])[:1].expand(20000, 20000)}, path)
    code, growth, text = _inspect_under_ceiling(path)
    assert code == 0, text[-2000:]
    [stats] = json.loads(text.split("RESULT ", 1)[0])["stats"]
    assert (stats["numel"], stats["min"], stats["max"], stats["mean"]) == (4 * 10**8, 3.0, 3.0, 3.0)
    assert stats["norm"] == pytest.approx(3.0 * 20000)
    assert growth < 64 << 20, growth
