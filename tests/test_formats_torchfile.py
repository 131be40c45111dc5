"""torch.save files read without torch: exact tensor metadata, byte offsets, and every lie caught."""

from __future__ import annotations

import io
import pickle
import struct
import zipfile
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckptkit.errors import CkptkitError, FormatError
from ckptkit.formats.torchfile import read_torch_file, top_level_tensors
from ckptkit.formats.zipfile_reader import crc_check, read_zip
from ckptkit.pickle import GlobalRef, TensorRef
from ckptkit.storage import open_store
from tests.test_formats_safetensors import RecordingStore


@pytest.fixture
def store(tmp_path: Any) -> RecordingStore:
    return RecordingStore(tmp_path)


def real_state() -> dict[str, Any]:
    torch.manual_seed(0)
    base = torch.randn(4, 6)
    linear = torch.nn.Linear(3, 2)
    return {
        "model": {
            "w": base,
            "view": base[1:, 2:5],  # offset 8, stride (6, 1): shares storage with w
            "t": base.t(),  # stride (1, 6)
            "linear": linear.state_dict(),
            "param": torch.nn.Parameter(torch.ones(3, dtype=torch.float64)),
        },
        "dtypes": [
            torch.arange(5, dtype=torch.int64),
            torch.tensor([1.5, -2.25], dtype=torch.bfloat16),
            torch.tensor([0.5, 1.0], dtype=torch.float16),
            torch.tensor([True, False, True]),
            torch.tensor([1 + 2j], dtype=torch.complex64),
            torch.tensor([1.0, 2.0]).to(torch.float8_e4m3fn),
            torch.tensor([1, 2, 60000], dtype=torch.int32).to(torch.uint16),
            torch.tensor(3.0),  # 0-dim
            torch.zeros(0, 4),  # empty
        ],
        "step": 10,
        "name": "run",
    }


def expected_tensors(value: Any, path: str = "state") -> dict[str, torch.Tensor]:
    """Every tensor of a real object by the path syntax the reader uses."""
    if isinstance(value, torch.Tensor):
        return {path: value}
    found: dict[str, torch.Tensor] = {}
    if isinstance(value, dict):
        for key, item in value.items():
            found.update(
                expected_tensors(item, f'{path}["{key}"]' if isinstance(key, str) else f"{path}[{key}]")
            )
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            found.update(expected_tensors(item, f"{path}[{index}]"))
    return found


def torch_bytes(obj: Any, **kwargs: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer, **kwargs)
    return buffer.getvalue()


def assert_matches_real(store: RecordingStore, key: str, state: dict[str, Any]) -> None:
    torch_file = read_torch_file(store, key)
    assert torch_file.problems == []
    expected = expected_tensors(state)
    assert [path for path, _ in torch_file.tensors] == list(expected)
    for path, ref in torch_file.tensors:
        real = expected[path]
        assert ref.dtype == str(real.dtype).removeprefix("torch."), path
        assert ref.shape == tuple(real.shape) and ref.stride == real.stride(), path
        assert ref.storage_offset == real.storage_offset(), path
        assert ref.is_parameter == isinstance(real, torch.nn.Parameter), path
        storage = ref.storage
        real_bytes = bytes(real.untyped_storage())
        assert storage.nbytes == len(real_bytes)
        # The resolved offset points at this storage's bytes in the file.
        assert store.get(key, storage.byte_offset, storage.byte_offset + storage.nbytes) == real_bytes, path
    assert torch_file.value["step"] == 10 and torch_file.value["name"] == "run"
    shared = {ref.storage.key for _, ref in torch_file.tensors[:3]}  # w, its slice and its transpose
    assert len(shared) == 1


def test_zip_file(store: RecordingStore) -> None:
    state = real_state()
    store.put("ckpt.pt", torch_bytes(state))
    assert_matches_real(store, "ckpt.pt", state)
    torch_file = read_torch_file(store, "ckpt.pt")
    assert torch_file.kind == "zip" and torch_file.record_prefix == "archive" and torch_file.protocol == 2
    assert torch_file.tensors[0][1].storage.record == "archive/data/0"
    assert {use.pickle_name for use in torch_file.globals} == {"archive/data.pkl"}
    assert GlobalRef("torch._utils", "_rebuild_tensor_v2") in {use.ref for use in torch_file.globals}


def test_zip_file_saved_to_a_path_uses_its_name_as_prefix(store: RecordingStore, tmp_path: Any) -> None:
    state = {"w": torch.ones(3)}
    torch.save(state, tmp_path / "my_model.bin")
    torch_file = read_torch_file(store, "my_model.bin")
    assert torch_file.record_prefix == "my_model" and torch_file.tensors[0][0] == 'state["w"]'


def test_protocol_4_zip_file(store: RecordingStore) -> None:
    state = real_state()
    store.put("ckpt.pt", torch_bytes(state, pickle_protocol=4))
    assert_matches_real(store, "ckpt.pt", state)
    assert read_torch_file(store, "ckpt.pt").protocol == 4


@pytest.mark.parametrize("protocol", [2, 4])
def test_legacy_file(store: RecordingStore, protocol: int) -> None:
    state = real_state()
    store.put("old.pt", torch_bytes(state, _use_new_zipfile_serialization=False, pickle_protocol=protocol))
    assert_matches_real(store, "old.pt", state)
    torch_file = read_torch_file(store, "old.pt")
    assert torch_file.kind == "legacy"
    # storage keys are the saving process's storage addresses; records name them
    assert all(ref.storage.record == ref.storage.key for _, ref in torch_file.tensors)


def test_legacy_reads_headers_not_data(store: RecordingStore) -> None:
    state = {f"t{i}": torch.zeros(1 << 18) for i in range(4)}  # 4 MiB of storages
    store.put("old.pt", torch_bytes(state, _use_new_zipfile_serialization=False))
    store.reads.clear()
    torch_file = read_torch_file(store, "old.pt")
    assert len(torch_file.tensors) == 4 and torch_file.problems == []
    assert store.bytes_read() < 1_200_000 + 4 * (64 << 10)  # the first window and the header windows


def test_zip_reads_no_tensor_data(store: RecordingStore) -> None:
    store.put("big.pt", torch_bytes({"w": torch.zeros(1 << 20), "b": torch.ones(4)}))
    store.reads.clear()
    read_torch_file(store, "big.pt")
    assert store.bytes_read() < 64 << 10


def test_bare_pickle(store: RecordingStore) -> None:
    store.put("state.pkl", pickle.dumps({"lr": 0.1, "milestones": [3, 6]}, protocol=4))
    torch_file = read_torch_file(store, "state.pkl")
    assert (torch_file.kind, torch_file.value, torch_file.tensors) == (
        "pickle",
        {"lr": 0.1, "milestones": [3, 6]},
        [],
    )


def test_top_level_tensors(store: RecordingStore) -> None:
    store.put("shard.bin", torch_bytes({"a": torch.ones(2), "b": torch.zeros(3), "n": 1}))
    assert {k: v.shape for k, v in top_level_tensors(read_torch_file(store, "shard.bin")).items()} == {
        "a": (2,),
        "b": (3,),
    }


# --- crafted damage ----------------------------------------------------------------------


def rewrite_zip(data: bytes, edits: dict[str, bytes | None]) -> bytes:
    """The same archive with some records replaced (bytes) or dropped (None), written stored."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w") as dst:
        for name in src.namelist():
            content = edits.get(name, src.read(name))
            if content is not None:
                dst.writestr(name, content)
    return out.getvalue()


def data_pkl(data: bytes) -> bytes:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return z.read("archive/data.pkl")


def test_record_size_mismatch(store: RecordingStore) -> None:
    data = torch_bytes({"w": torch.arange(12.0)})
    store.put("m.pt", rewrite_zip(data, {"archive/data/0": bytes(40)}))
    assert read_torch_file(store, "m.pt").problems == [
        "storage '0': record archive/data/0 holds 40 bytes, but the pickle declares 12 × float32 = 48 bytes"
    ]


def test_view_outside_its_storage(store: RecordingStore) -> None:
    data = torch_bytes({"w": torch.arange(12.0)})
    pkl = data_pkl(data)
    assert pkl.count(b"K\x0c\x85") == 1  # the size tuple (12,)
    store.put("m.pt", rewrite_zip(data, {"archive/data.pkl": pkl.replace(b"K\x0c\x85", b"K\x0d\x85")}))
    assert read_torch_file(store, "m.pt").problems == [
        "state[\"w\"]: float32 view (offset 0, shape [13], stride [1]) reaches byte 52 of storage '0', "
        "which holds 48"
    ]


def test_missing_storage_record(store: RecordingStore) -> None:
    data = torch_bytes({"w": torch.arange(12.0)})
    store.put("m.pt", rewrite_zip(data, {"archive/data/0": None}))
    torch_file = read_torch_file(store, "m.pt")
    assert torch_file.problems == ["storage '0': record archive/data/0 is missing"]
    assert torch_file.tensors[0][1].storage.byte_offset is None


def test_storage_key_that_is_a_path(store: RecordingStore) -> None:
    data = torch_bytes({"w": torch.arange(12.0)})
    pkl = data_pkl(data).replace(b"X\x01\x00\x00\x000", b"X\x04\x00\x00\x00../x")
    store.put("m.pt", rewrite_zip(data, {"archive/data.pkl": pkl}))
    assert "storage key '../x' is not a plain record name" in read_torch_file(store, "m.pt").problems


def test_storage_used_with_two_dtypes(store: RecordingStore) -> None:
    data = torch_bytes({"a": torch.ones(2), "b": torch.ones(2, dtype=torch.int32)})
    pkl = data_pkl(data).replace(b"X\x01\x00\x00\x001", b"X\x01\x00\x00\x000")
    store.put("m.pt", rewrite_zip(data, {"archive/data.pkl": pkl}))
    assert "storage '0' is used as float32 and as int32" in read_torch_file(store, "m.pt").problems


def test_big_endian_byteorder(store: RecordingStore) -> None:
    data = torch_bytes({"w": torch.ones(2)})
    store.put("m.pt", rewrite_zip(data, {"archive/byteorder": b"big"}))
    problems = read_torch_file(store, "m.pt").problems
    assert problems == [
        "byteorder is 'big': storages are not little-endian, and ckptkit reads little-endian data"
    ]
    assert read_torch_file(store, "m.pt").byteorder == "big"


def test_flipped_bit_in_data_pkl(store: RecordingStore) -> None:
    data = bytearray(torch_bytes({"w": torch.ones(2)}))
    data[data.index(b"X\x01\x00\x00\x00w") + 5] ^= 0x01  # "w" -> "v"
    store.put("m.pt", bytes(data))
    torch_file = read_torch_file(store, "m.pt")
    assert torch_file.problems == [
        "archive/data.pkl fails its CRC-32 check: it was altered after it was written"
    ]
    assert torch_file.tensors[0][0] == 'state["v"]'
    assert not crc_check(store, read_zip(store, "m.pt").get("archive/data.pkl"))


def test_prepended_bytes(store: RecordingStore) -> None:
    state = {"w": torch.arange(4.0)}
    store.put("m.pt", b"MZ" * 100 + torch_bytes(state))
    torch_file = read_torch_file(store, "m.pt")
    assert torch_file.prefix_offset == 200
    assert torch_file.problems == ["200 bytes precede the zip archive (torch.load refuses such a file)"]
    ref = torch_file.tensors[0][1]
    assert store.get("m.pt", ref.storage.byte_offset, ref.storage.byte_offset + 16) == bytes(
        state["w"].untyped_storage()
    )


def test_truncated_and_impostor_files(store: RecordingStore) -> None:
    data = torch_bytes({"w": torch.ones(2)})
    store.put("m.pt", data[:-100])
    with pytest.raises(FormatError, match="truncated"):
        read_torch_file(store, "m.pt")
    store.put("m.pt", b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 9\n")
    with pytest.raises(FormatError, match="run git lfs pull"):
        read_torch_file(store, "m.pt")
    store.put("m.pt", b"<html>502 Bad Gateway</html>")
    with pytest.raises(FormatError, match="looks like an HTML error page"):
        read_torch_file(store, "m.pt")
    store.put("m.pt", b"")
    with pytest.raises(FormatError, match="is empty"):
        read_torch_file(store, "m.pt")


def test_garbage_pickle_in_zip_is_a_format_error(store: RecordingStore) -> None:
    data = torch_bytes({"w": torch.ones(2)})
    store.put("m.pt", rewrite_zip(data, {"archive/data.pkl": b"\x80\x02}q\x00(X"}))
    with pytest.raises(FormatError):
        read_torch_file(store, "m.pt")


def test_legacy_count_mismatch_and_truncation(store: RecordingStore) -> None:
    data = bytearray(torch_bytes({"w": torch.arange(12.0)}, _use_new_zipfile_serialization=False))
    header = len(data) - 48 - 8
    assert struct.unpack_from("<q", data, header)[0] == 12
    struct.pack_into("<q", data, header, 11)
    store.put("old.pt", bytes(data))
    problems = read_torch_file(store, "old.pt").problems
    assert problems[0].endswith("the file holds 11 elements, the pickle declares 12")
    assert problems[1] == "4 bytes follow the last storage"
    struct.pack_into("<q", data, header, 12)
    store.put("old.pt", bytes(data[:-10]))
    assert (
        read_torch_file(store, "old.pt")
        .problems[0]
        .endswith(f"48 bytes at offset {header + 8} run past the end of the file")
    )
    store.put("old.pt", bytes(data) + b"extra")
    assert read_torch_file(store, "old.pt").problems == ["5 bytes follow the last storage"]


def test_legacy_bad_magic_and_version(store: RecordingStore) -> None:
    data = torch_bytes({"w": torch.ones(1)}, _use_new_zipfile_serialization=False)
    store.put("old.pt", data.replace(b"M\xe9\x03", b"M\xea\x03", 1))  # protocol version 1002
    with pytest.raises(FormatError, match="legacy protocol version 1002, expected 1001"):
        read_torch_file(store, "old.pt")


def test_tensor_refs_are_plain_values(store: RecordingStore) -> None:
    store.put("m.pt", torch_bytes({"w": torch.ones(2)}))
    ref = read_torch_file(store, "m.pt").value["w"]
    assert isinstance(ref, TensorRef) and ref.storage.byte_offset is not None


def test_reads_through_every_store(any_store: Any) -> None:
    state = real_state()
    for key, data in [
        ("z.pt", torch_bytes(state)),
        ("l.pt", torch_bytes(state, _use_new_zipfile_serialization=False)),
    ]:
        any_store.put(key, data)
        torch_file = read_torch_file(any_store, key)
        assert torch_file.problems == []
        for path, ref in torch_file.tensors:
            storage = ref.storage
            got = any_store.get(key, storage.byte_offset, storage.byte_offset + storage.nbytes)
            assert got == bytes(expected_tensors(state)[path].untyped_storage()), path


# --- fuzzing: the container readers and the interpreter together ------------------------

_FUZZ_STORE = open_store("memory://ckptkit-fuzz-torchfile/root")
_ZIP = torch_bytes({"w": torch.arange(4.0), "s": 3})
_LEGACY = torch_bytes({"w": torch.arange(4.0), "s": 3}, _use_new_zipfile_serialization=False)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from([_ZIP, _LEGACY]),
    st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=6),
    st.integers(0, 40),
)
def test_fuzz_mutated_torch_files(data: bytes, edits: list[tuple[int, int]], cut: int) -> None:
    mutated = bytearray(data[: len(data) - cut])
    for pos, value in edits:
        mutated[pos % len(mutated)] = value
    _FUZZ_STORE.put("f.pt", bytes(mutated))
    try:
        torch_file = read_torch_file(_FUZZ_STORE, "f.pt")
    except CkptkitError:
        return
    for _, ref in torch_file.tensors:
        if ref.storage.byte_offset is not None:
            assert (
                0 <= ref.storage.byte_offset <= ref.storage.byte_offset + ref.storage.nbytes <= len(mutated)
            )
