"""Readers raise precise errors: the kind of fault as a FormatError subclass, with the file, the
byte offset and what is specific to it as fields; refusals name the globals; CKPTKIT_DEBUG=1
shows the traceback of an expected error."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest

from ckptkit.errors import (
    EXIT_FINDINGS,
    BadHeaderError,
    CrcMismatchError,
    DuplicateKeyError,
    FormatError,
    LimitExceededError,
    OverlapError,
    TruncatedError,
    UnsafeContentError,
)
from ckptkit.formats.safetensors import read_safetensors_header
from ckptkit.formats.zipfile_reader import read_zip
from ckptkit.pickle import PickleFormatError, load_symbolic
from ckptkit.storage import LocalStore
from tests.malicious.corpus import PAYLOADS

FILE = "model.safetensors"
CLI = [sys.executable, "-c", "from ckptkit.cli.main import main; main()"]


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path, fsync=False)


def safetensors_bytes(header: dict[str, Any] | str, body_size: int) -> bytes:
    text = header if isinstance(header, str) else json.dumps(header)
    raw = text.encode()
    return len(raw).to_bytes(8, "little") + raw + bytes(body_size)


def u8(begin: int, end: int) -> dict[str, Any]:
    return {"dtype": "U8", "shape": [end - begin], "data_offsets": [begin, end]}


# --- safetensors ----------------------------------------------------------------------------------


def test_truncated_data_section(store: LocalStore) -> None:
    data = safetensors_bytes({"a": u8(0, 16)}, 16)
    store.put(FILE, data[:-5])
    with pytest.raises(TruncatedError, match="truncated: 5 bytes missing") as info:
        read_safetensors_header(store, FILE)
    error = info.value
    assert (error.path, error.offset) == (FILE, len(data) - 5)
    assert (error.expected, error.actual) == (len(data), len(data) - 5)
    assert isinstance(error, FormatError) and isinstance(error, ValueError)
    assert error.exit_code == EXIT_FINDINGS


def test_truncated_inside_the_header(store: LocalStore) -> None:
    data = safetensors_bytes({"a": u8(0, 4)}, 4)
    length = int.from_bytes(data[:8], "little")
    store.put(FILE, data[:20])
    with pytest.raises(TruncatedError, match="runs past the end of the 20 byte file") as info:
        read_safetensors_header(store, FILE)
    assert (info.value.path, info.value.offset) == (FILE, 8)
    assert (info.value.expected, info.value.actual) == (8 + length, 20)
    store.put(FILE, data[:5])
    with pytest.raises(TruncatedError, match="too short") as info:
        read_safetensors_header(store, FILE)
    assert (info.value.offset, info.value.expected, info.value.actual) == (5, 8, 5)


def test_overlapping_offsets(store: LocalStore) -> None:
    header = {"a": u8(0, 8), "b": u8(4, 8)}
    data = safetensors_bytes(header, 8)
    store.put(FILE, data)
    with pytest.raises(OverlapError, match="it overlaps tensor 'a'") as info:
        read_safetensors_header(store, FILE)
    start = len(data) - 8  # the data section
    assert info.value.path == FILE
    assert info.value.first == (start, start + 8)
    assert info.value.second == (start + 4, start + 8)
    assert info.value.offset == start + 4


def test_duplicate_key_in_header(store: LocalStore) -> None:
    first, second = json.dumps(u8(0, 4)), json.dumps(u8(4, 8))
    text = f'{{"a":{first},"a":{second}}}'
    store.put(FILE, safetensors_bytes(text, 8))
    with pytest.raises(DuplicateKeyError, match="duplicate key 'a' in header") as info:
        read_safetensors_header(store, FILE)
    assert (info.value.path, info.value.offset, info.value.key) == (FILE, 8, "a")


def test_header_that_is_not_json(store: LocalStore) -> None:
    store.put(FILE, safetensors_bytes('{"a": nope}', 0))
    with pytest.raises(BadHeaderError, match="header is not valid JSON") as info:
        read_safetensors_header(store, FILE)
    assert info.value.path == FILE
    assert info.value.offset == 8 + '{"a": nope}'.index("n")  # where the JSON parser stopped


def test_header_length_over_the_cap(store: LocalStore) -> None:
    store.put(FILE, safetensors_bytes({"a": u8(0, 4)}, 4))
    with pytest.raises(LimitExceededError, match="exceeds the 10 byte cap") as info:
        read_safetensors_header(store, FILE, max_header_size=10)
    length = int.from_bytes(store.get(FILE, 0, 8), "little")
    assert (info.value.path, info.value.offset, info.value.limit, info.value.actual) == (FILE, 0, 10, length)


# --- zip and torch files --------------------------------------------------------------------------


def test_zip_without_end_record(store: LocalStore) -> None:
    store.put("m.pt", b"PK\x03\x04" + bytes(100))
    with pytest.raises(BadHeaderError, match="no zip end-of-central-directory record") as info:
        read_zip(store, "m.pt")
    assert (info.value.path, info.value.offset) == ("m.pt", None)


def test_legacy_header_with_a_wrong_protocol_version(store: LocalStore, tmp_path: Path) -> None:
    import torch

    from ckptkit.formats.torchfile import read_torch_file

    torch.save({"w": torch.ones(1)}, tmp_path / "src.pt", _use_new_zipfile_serialization=False)
    data = (tmp_path / "src.pt").read_bytes()
    version_at = len(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2))  # right after the magic
    store.put("old.pt", data.replace(b"M\xe9\x03", b"M\xea\x03", 1))  # protocol version 1002
    with pytest.raises(BadHeaderError, match="legacy protocol version 1002") as info:
        read_torch_file(store, "old.pt")
    assert (info.value.path, info.value.offset) == ("old.pt", version_at)


def _torch_zip(path: Path) -> None:
    import torch

    torch.save({"w": torch.arange(16, dtype=torch.float32)}, path)


def test_crc_flip_in_a_torch_zip(tmp_path: Path) -> None:
    from ckptkit.safe import safe_load

    _torch_zip(tmp_path / "ok.pt")
    with zipfile.ZipFile(tmp_path / "ok.pt") as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("/data/0"))
    data = bytearray((tmp_path / "ok.pt").read_bytes())
    local = info.header_offset  # torch pads the local header's extra field, not the central one
    start = local + 30 + int.from_bytes(data[local + 26 : local + 28], "little")
    start += int.from_bytes(data[local + 28 : local + 30], "little")
    data[start + 5] ^= 0x01
    (tmp_path / "bad.pt").write_bytes(bytes(data))
    with pytest.raises(CrcMismatchError, match="fails its CRC-32 check") as error:
        safe_load(tmp_path / "bad.pt")
    import zlib

    flipped = zlib.crc32(bytes(data[start : start + info.file_size]))
    assert (error.value.path, error.value.offset, error.value.record) == ("bad.pt", start, info.filename)
    assert (error.value.expected, error.value.actual) == (info.CRC, flipped)


def test_pickle_errors_name_their_pickle_and_offset() -> None:
    with pytest.raises(PickleFormatError) as info:
        load_symbolic(b"\x80\x02]q\x00(K\x01", pickle_name="x.pkl")
    assert isinstance(info.value, FormatError)
    assert (info.value.path, info.value.offset) == ("x.pkl", 8)  # the opcode that ends short


def test_fields_survive_pickling() -> None:
    error = OverlapError("m: overlap", path="m", first=(0, 8), second=(4, 8))
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is OverlapError and str(again) == "m: overlap"
    assert (again.path, again.offset, again.first, again.second) == ("m", 4, (0, 8), (4, 8))
    refused = pickle.loads(pickle.dumps(UnsafeContentError("no", globals=["os.system", "b.c"])))
    assert refused.globals == ["b.c", "os.system"]


# --- refusals name their globals ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["torch_zip_payload", "broken_tail_p0", "torch_legacy_payload"])
def test_safe_load_refusal_names_the_globals(tmp_path: Path, name: str) -> None:
    from ckptkit.safe import safe_load

    payload = PAYLOADS[name]
    path = tmp_path / payload.filename
    payload.build(path, tmp_path / "sentinel", None)
    with pytest.raises(UnsafeContentError) as info:
        safe_load(path)
    assert payload.names in info.value.globals
    assert info.value.globals == sorted(info.value.globals)
    assert not (tmp_path / "sentinel").exists()


def test_convert_refusal_names_the_globals(tmp_path: Path) -> None:
    from ckptkit.ops.convert import convert

    payload = PAYLOADS["torch_zip_payload"]
    path = tmp_path / payload.filename
    payload.build(path, tmp_path / "sentinel", None)
    with pytest.raises(UnsafeContentError) as info:
        convert(path, tmp_path / "out.safetensors", to="safetensors")
    assert info.value.globals == ["posix.system"]


# --- CKPTKIT_DEBUG --------------------------------------------------------------------------------


@pytest.mark.parametrize("debug", [None, "1"])
def test_debug_shows_the_traceback_of_an_expected_error(tmp_path: Path, debug: str | None) -> None:
    (tmp_path / FILE).write_bytes(safetensors_bytes('{"a": nope}', 0))
    env = {k: v for k, v in os.environ.items() if k != "CKPTKIT_DEBUG"}
    if debug:
        env["CKPTKIT_DEBUG"] = debug
    out = subprocess.run(
        [*CLI, "convert", str(tmp_path / FILE), str(tmp_path / "out.pt"), "--to", "torch"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == EXIT_FINDINGS, out.stderr
    first = out.stderr.splitlines()[0]
    assert first.startswith("ckptkit: error: ") and "header is not valid JSON" in first
    if debug:
        assert "Traceback (most recent call last)" in out.stderr
        assert "BadHeaderError" in out.stderr
    else:
        assert "Traceback" not in out.stderr and len(out.stderr.splitlines()) == 1
