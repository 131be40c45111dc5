"""``safe_load`` checks zip CRC-32s: what it accepts, ``verify`` accepts.

torch never checks the CRCs of its zip records, so a flipped bit in a storage loads as a
different number. ``safe_load`` promises a :class:`FormatError` instead; the fuzz test mutates
real ``torch.save`` files and holds it to the same verdict as structural ``verify``.
"""

from __future__ import annotations

import random
import time
import zipfile
from pathlib import Path

import pytest
import torch

from ckptkit.errors import CkptkitError, FormatError
from ckptkit.ops.structural import verify_structure
from ckptkit.safe import safe_load
from ckptkit.storage import open_store


def _record_span(path: Path, name: str) -> tuple[int, int]:
    """Where record ``name``'s bytes lie in the file."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(name)
    header = path.read_bytes()[info.header_offset : info.header_offset + 30]
    name_len, extra_len = int.from_bytes(header[26:28], "little"), int.from_bytes(header[28:30], "little")
    start = info.header_offset + 30 + name_len + extra_len
    return start, start + info.compress_size


def _flip(path: Path, out: Path, record: str, at: int = 5) -> Path:
    data = bytearray(path.read_bytes())
    start, _ = _record_span(path, record)
    data[start + at] ^= 0x01
    out.write_bytes(bytes(data))
    return out


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    path = tmp_path / "ok.pt"
    torch.save({"w": torch.arange(8.0), "b": torch.ones(3, dtype=torch.int64), "step": 7}, path)
    return path


def test_flipped_bit_in_a_storage_is_refused_naming_the_record(saved: Path, tmp_path: Path) -> None:
    flipped = _flip(saved, tmp_path / "flip.pt", "ok/data/0")
    assert not torch.equal(torch.load(flipped, weights_only=True)["w"], torch.arange(8.0))  # torch loads it
    with pytest.raises(FormatError, match=r"record ok/data/0 fails its CRC-32 check"):
        safe_load(flipped)


def test_flipped_bit_in_an_unread_record_is_refused(saved: Path, tmp_path: Path) -> None:
    """``version`` holds no tensor, but verify checks its CRC, so safe_load does too."""
    flipped = _flip(saved, tmp_path / "flip.pt", "ok/version", at=0)
    with pytest.raises(FormatError, match=r"record ok/version fails its CRC-32 check"):
        safe_load(flipped)


def test_records_written_without_crcs_still_load(tmp_path: Path) -> None:
    torch.serialization.set_crc32_options(False)
    try:
        torch.save({"w": torch.arange(8.0)}, tmp_path / "nocrc.pt")
    finally:
        torch.serialization.set_crc32_options(True)
    assert torch.equal(safe_load(tmp_path / "nocrc.pt")["w"], torch.arange(8.0))


def test_intact_files_load_unchanged(saved: Path) -> None:
    loaded = safe_load(saved)
    assert torch.equal(loaded["w"], torch.arange(8.0)) and loaded["step"] == 7


# --- fuzz: a file safe_load accepts is a file verify accepts ----------------------------------

_SECONDS = 4.0


def _originals(tmp_path: Path) -> list[Path]:
    base = torch.arange(24, dtype=torch.float32)
    states = {
        "dict.pt": {"w": torch.randn(4, 5, generator=torch.Generator().manual_seed(0)), "n": 3},
        "views.pt": {"base": base, "t": base.view(4, 6).t(), "half": base[:12].to(torch.float16)},
        "nested.pt": {"model": {"a": torch.ones(6, dtype=torch.int32)}, "opt": [torch.zeros(2), 0.5]},
    }
    paths = []
    for name, state in states.items():
        torch.save(state, tmp_path / name)
        paths.append(tmp_path / name)
    return paths


def _mutate(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        pos = rng.randrange(len(out))
        if rng.random() < 0.7:
            out[pos] ^= 1 << rng.randrange(8)
        else:
            out[pos] = rng.randrange(256)
    return bytes(out)


def _accepts(path: Path) -> bool:
    try:
        safe_load(path)
    except CkptkitError:
        return False
    return True


@pytest.mark.slow  # byte flips for a few seconds, by design
def test_fuzz_safe_load_accepts_only_what_verify_accepts(tmp_path: Path) -> None:
    """Seeded byte flips over real files for a few seconds. Before safe_load checked storage
    CRCs, most mutations of storage bytes loaded while verify failed them."""
    rng = random.Random(20250611)
    originals = [(p.name, p.read_bytes()) for p in _originals(tmp_path)]
    work = tmp_path / "mutated"
    work.mkdir()
    store = open_store(work)
    tried = accepted = 0
    deadline = time.monotonic() + _SECONDS
    while time.monotonic() < deadline:
        name, data = originals[tried % len(originals)]
        mutated = work / name
        mutated.write_bytes(_mutate(data, rng))
        tried += 1
        if not _accepts(mutated):
            continue
        accepted += 1
        report = verify_structure(store, [name])
        assert report.ok, (tried, name, [f.message for f in report.findings if f.severity == "error"])
    assert tried > 100 and accepted < tried
