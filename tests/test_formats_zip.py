"""The zip reader: offsets point at the real bytes, the edits an attacker makes are caught."""

from __future__ import annotations

import io
import struct
import zipfile
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckptkit.errors import CkptkitError, FormatError
from ckptkit.formats.zipfile_reader import crc_check, data_offsets, read_record, read_zip
from ckptkit.storage import open_store
from tests.test_formats_safetensors import RecordingStore

STATE = {
    "w": torch.arange(12, dtype=torch.float32).reshape(3, 4),
    "b": torch.tensor([1, 2], dtype=torch.int8),
    "step": 5,
}


@pytest.fixture
def store(tmp_path: Any) -> RecordingStore:
    return RecordingStore(tmp_path)


def torch_zip(obj: Any = STATE) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def assert_offsets_match(store: RecordingStore, key: str, reference: bytes) -> None:
    archive = read_zip(store, key)
    offsets = data_offsets(store, archive, archive.entries)
    with zipfile.ZipFile(io.BytesIO(reference)) as z:
        assert archive.names() == z.namelist()
        for entry in archive.entries:
            start = offsets[entry.name]
            assert store.get(key, start, start + entry.size) == z.read(entry.name)
            assert entry.method == 0 and entry.size == z.getinfo(entry.name).file_size
            assert crc_check(store, entry)


def test_torch_zip_offsets_and_crcs(store: RecordingStore) -> None:
    data = torch_zip()
    store.put("m.pt", data)
    assert_offsets_match(store, "m.pt", data)
    archive = read_zip(store, "m.pt")
    # miniz always writes the ZIP64 end records, whatever the archive's size
    assert archive.problems == [] and archive.prefix_offset == 0 and archive.zip64
    assert {e.name for e in archive.entries} >= {"archive/data.pkl", "archive/byteorder", "archive/data/0"}
    # torch aligns every record's data to 64 bytes
    offsets = data_offsets(store, archive, archive.entries)
    assert all(offset % 64 == 0 for offset in offsets.values())


def test_local_headers_are_fetched_in_few_reads(store: RecordingStore) -> None:
    store.put("m.pt", torch_zip({f"t{i}": torch.ones(i + 1) for i in range(50)}))
    archive = read_zip(store, "m.pt")
    store.reads.clear()
    data_offsets(store, archive, archive.entries)
    assert len(store.reads) == 1  # 50+ small records lie close together: one coalesced read


def test_prepended_bytes_shift_every_offset(store: RecordingStore) -> None:
    data = torch_zip()
    store.put("m.pt", b"\x00JUNK" * 333 + data)
    archive = read_zip(store, "m.pt")
    assert archive.prefix_offset == 1665
    assert archive.problems == ["1665 bytes precede the zip archive (torch.load refuses such a file)"]
    offsets = data_offsets(store, archive, archive.entries)
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        for entry in archive.entries:
            assert store.get("m.pt", offsets[entry.name], offsets[entry.name] + entry.size) == z.read(
                entry.name
            )


def to_zip64(data: bytes) -> bytes:
    """Rewrite a zip's tail as ZIP64: a ZIP64 end record and locator, and 0xFFFF markers."""
    eocd = data.rindex(b"PK\x05\x06")
    _, _, n_disk, n_total, cd_size, cd_offset, _ = struct.unpack_from("<4H2LH", data, eocd + 4)
    z64 = struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, n_disk, n_total, cd_size, cd_offset)
    locator = struct.pack("<4sLQL", b"PK\x06\x07", 0, eocd, 1)
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    return data[:eocd] + z64 + locator + end


def plain_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("a/data.pkl", b"pickle")
        z.writestr("a/data/0", bytes(range(256)))
    return buffer.getvalue()


def test_classic_end_record(store: RecordingStore) -> None:
    store.put("z.zip", plain_zip())
    assert not read_zip(store, "z.zip").zip64
    assert_offsets_match(store, "z.zip", plain_zip())


def test_zip64_end_records(store: RecordingStore) -> None:
    data = to_zip64(plain_zip())
    store.put("m.pt", data)
    archive = read_zip(store, "m.pt")
    assert archive.zip64 and archive.problems == []
    assert_offsets_match(store, "m.pt", data)
    store.put("p.pt", b"P" * 100 + data)  # ZIP64 and a prefix
    assert read_zip(store, "p.pt").prefix_offset == 100


def test_zip64_extra_fields(store: RecordingStore) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        for name, payload in [("a/data.pkl", b"x" * 10), ("a/data/0", b"y" * 100)]:
            with z.open(name, "w", force_zip64=True) as f:
                f.write(payload)
    store.put("z.zip", buffer.getvalue())
    assert_offsets_match(store, "z.zip", buffer.getvalue())


def test_duplicate_names_are_reported(store: RecordingStore) -> None:
    buffer = io.BytesIO()
    with pytest.warns(UserWarning), zipfile.ZipFile(buffer, "w") as z:
        z.writestr("a/data.pkl", b"first")
        z.writestr("a/data.pkl", b"second")
    store.put("d.zip", buffer.getvalue())
    archive = read_zip(store, "d.zip")
    assert archive.problems == ["duplicate zip entry 'a/data.pkl' (readers disagree on which one counts)"]
    assert read_record(store, archive, archive.get("a/data.pkl"), max_size=100) == b"first"


def test_local_name_mismatch_and_flags_are_reported(store: RecordingStore) -> None:
    data = bytearray(torch_zip())
    local = data.index(b"archive/data.pkl")  # the local header's copy comes first
    data[local : local + 16] = b"archive/evil.pkl"
    first_central = data.index(b"PK\x01\x02")
    data[first_central + 8] |= 0x01  # the encrypted flag on the first central entry
    store.put("m.pt", bytes(data))
    archive = read_zip(store, "m.pt")
    data_offsets(store, archive, archive.entries)
    assert "zip entry 'archive/data.pkl' has flag bits 0x1 set (encrypted/patched/strong)" in archive.problems
    assert "zip entry 'archive/data.pkl': local header names it 'archive/evil.pkl'" in archive.problems


def test_deflated_record_is_read_and_crc_checked(store: RecordingStore) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("a/data.pkl", b"hello " * 1000)
    store.put("z.zip", buffer.getvalue())
    archive = read_zip(store, "z.zip")
    entry = archive.get("a/data.pkl")
    assert entry.method == 8 and entry.compressed_size < entry.size
    assert read_record(store, archive, entry, max_size=10_000) == b"hello " * 1000
    assert crc_check(store, entry)
    with pytest.raises(FormatError, match="is 6000 bytes, over the 100 cap"):
        read_record(store, archive, entry, max_size=100)


def test_flipped_bit_in_data_pkl_fails_the_crc(store: RecordingStore) -> None:
    data = bytearray(torch_zip())
    # Rename tensor "w" to "v" inside data.pkl: torch.load would accept this silently.
    start = data.index(b"X\x01\x00\x00\x00w")
    data[start + 5] ^= 0x01
    store.put("m.pt", bytes(data))
    archive = read_zip(store, "m.pt")
    results = {entry.name: crc_check(store, entry) for entry in archive.entries}
    assert results.pop("archive/data.pkl") is False
    assert all(results.values())
    loaded = torch.load(io.BytesIO(bytes(data)))
    assert "v" in loaded and "w" not in loaded  # what torch does with the same file


def test_truncated_zip(store: RecordingStore) -> None:
    data = torch_zip()
    store.put("m.pt", data[:-30])
    with pytest.raises(
        FormatError, match=r"m\.pt: no zip end-of-central-directory record: the file is truncated"
    ):
        read_zip(store, "m.pt")
    store.put("m.pt", data[: len(data) // 2] + data[-22:])  # end record survives, the rest does not
    with pytest.raises(FormatError, match=r"m\.pt: central directory"):
        read_zip(store, "m.pt")


def _edit_central(data: bytes, index: int, offset: int, fmt: str, value: int) -> bytes:
    out = bytearray(data)
    pos = -1
    for _ in range(index + 1):
        pos = out.index(b"PK\x01\x02", pos + 1)
    struct.pack_into(fmt, out, pos + offset, value)
    return bytes(out)


def test_record_reaching_past_the_central_directory(store: RecordingStore) -> None:
    # Entry 4 is archive/data/0 in torch's layout; claim it is a megabyte long.
    data = _edit_central(torch_zip(), 4, 20, "<L", 1 << 20)
    store.put("m.pt", data)
    with pytest.raises(FormatError, match="runs past the start of the central directory"):
        read_zip(store, "m.pt")


def test_local_header_offset_pointing_nowhere(store: RecordingStore) -> None:
    data = _edit_central(torch_zip(), 4, 42, "<L", 3)
    store.put("m.pt", data)
    archive = read_zip(store, "m.pt")
    with pytest.raises(FormatError, match="has no local header at offset 3"):
        data_offsets(store, archive, archive.entries)


def test_entry_count_mismatch(store: RecordingStore) -> None:
    data = bytearray(torch_zip())
    eocd = data.rindex(b"PK\x05\x06")
    struct.pack_into("<2H", data, eocd + 8, 9, 9)
    store.put("m.pt", bytes(data))
    # torch writes both end records; the classic one disagreeing is a finding
    assert "end record says entry count 9, the ZIP64 end record 8" in read_zip(store, "m.pt").problems
    z64 = data.rindex(b"PK\x06\x06")
    struct.pack_into("<2Q", data, z64 + 24, 99, 99)
    store.put("m.pt", bytes(data))
    with pytest.raises(FormatError, match="central directory entry 8 of 99 is missing or corrupt"):
        read_zip(store, "m.pt")


# --- fuzzing ------------------------------------------------------------------------------

_SMALL = torch_zip({"w": torch.ones(2)})
_FUZZ_STORE = open_store("memory://ckptkit-fuzz-zip/root")


def _exercise(data: bytes) -> None:
    _FUZZ_STORE.put("f.zip", data)
    try:
        archive = read_zip(_FUZZ_STORE, "f.zip")
        data_offsets(_FUZZ_STORE, archive, archive.entries)
        for entry in archive.entries:
            crc_check(_FUZZ_STORE, entry)
            if entry.size < 10_000:
                read_record(_FUZZ_STORE, archive, entry, max_size=10_000)
    except CkptkitError:
        pass


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, len(_SMALL) - 1), st.integers(0, 255)), min_size=1, max_size=8))
def test_fuzz_mutated_torch_zip(edits: list[tuple[int, int]]) -> None:
    data = bytearray(_SMALL)
    for pos, value in edits:
        data[pos] = value
    _exercise(bytes(data))


@settings(max_examples=250, deadline=None)
@given(st.binary(max_size=300), st.binary(max_size=60))
def test_fuzz_random_bytes_with_zip_tails(body: bytes, tail: bytes) -> None:
    _exercise(body + b"PK\x05\x06" + tail)


@settings(max_examples=150, deadline=None)
@given(st.integers(0, len(_SMALL)), st.integers(0, len(_SMALL)))
def test_fuzz_cut_and_spliced(cut: int, start: int) -> None:
    _exercise(_SMALL[start:] + _SMALL[:cut])
