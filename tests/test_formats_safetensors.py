"""The safetensors header reader: real files agree with safetensors itself, every lie is caught."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from ckptkit.errors import CkptkitError, FormatError
from ckptkit.formats.safetensors import parse_safetensors_header, read_safetensors_header
from ckptkit.storage import LocalStore, Store, open_store

FILE = "model.safetensors"


class RecordingStore(LocalStore):
    """A local store that remembers every ranged read, to prove what a reader fetched."""

    def __init__(self, root: Any) -> None:
        super().__init__(root, fsync=False)
        self.reads: list[tuple[str, int | None, int | None]] = []

    def get(self, key: str, start: int | None = None, end: int | None = None) -> bytes:
        self.reads.append((key, start, end))
        return super().get(key, start, end)

    def bytes_read(self) -> int:
        total = 0
        for key, start, end in self.reads:
            stop = self.head(key).size if end is None else end
            total += max(0, stop - (start or 0))
        return total


@pytest.fixture
def store(tmp_path: Any) -> RecordingStore:
    return RecordingStore(tmp_path)


def sample_tensors() -> dict[str, torch.Tensor]:
    return {
        "w": torch.arange(12, dtype=torch.float32).reshape(3, 4),
        "b": torch.tensor([1.5, -2.0], dtype=torch.bfloat16),
        "i": torch.arange(5, dtype=torch.int64),
        "scalar": torch.tensor(7, dtype=torch.int16),
        "empty": torch.zeros(0, 3, dtype=torch.float16),
        "mask": torch.tensor([True, False, True]),
    }


def write_sample(store: Store, tmp_path: Any) -> bytes:
    path = tmp_path / FILE
    save_file(sample_tensors(), str(path), metadata={"format": "pt", "step": "7"})
    return path.read_bytes()


def split(data: bytes) -> tuple[dict[str, Any], bytes]:
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def join(header: dict[str, Any] | str, body: bytes) -> bytes:
    raw = (header if isinstance(header, str) else json.dumps(header)).encode()
    return len(raw).to_bytes(8, "little") + raw + body


def test_real_file_matches_safetensors_and_torch(store: RecordingStore, tmp_path: Any) -> None:
    write_sample(store, tmp_path)
    header = read_safetensors_header(store, FILE)
    tensors = sample_tensors()
    assert header.problems == []
    assert header.metadata == {"format": "pt", "step": "7"}
    assert set(header.entries) == set(tensors)
    dtypes = {
        torch.float32: "F32",
        torch.bfloat16: "BF16",
        torch.int64: "I64",
        torch.int16: "I16",
        torch.float16: "F16",
        torch.bool: "BOOL",
    }
    with safe_open(str(tmp_path / FILE), framework="pt") as reference:
        for name, tensor in tensors.items():
            entry = header.entries[name]
            assert entry.dtype == dtypes[tensor.dtype]
            assert entry.shape == tuple(tensor.shape) == tuple(reference.get_slice(name).get_shape())
            assert entry.nbytes == tensor.numel() * tensor.element_size()
            # The absolute offset points at this tensor's bytes, and nothing else.
            raw = store.get(FILE, entry.offset, entry.offset + entry.nbytes)
            assert raw == tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
    assert header.tensor_bytes == sum(t.numel() * t.element_size() for t in tensors.values())
    assert header.data_start + header.tensor_bytes == header.file_size


def test_header_read_fetches_only_the_header(store: RecordingStore, tmp_path: Any) -> None:
    save_file({"big": torch.zeros(1 << 20)}, str(tmp_path / FILE))  # 4 MiB of data
    store.reads.clear()
    header = read_safetensors_header(store, FILE)
    assert header.entries["big"].shape == (1 << 20,)
    assert store.reads == [(FILE, 0, 8), (FILE, 8, 8 + header.header_size)]


def _set(name: str, field: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda header: header[name].__setitem__(field, value)


def _offsets(name: str, begin: int, end: int) -> Callable[[dict[str, Any]], None]:
    return _set(name, "data_offsets", [begin, end])


# Problems: the entries describe themselves, but not the file consistently.
PROBLEMS = [
    (_set("w", "shape", [3, 5]), "tensor 'w': data_offsets span 48 bytes, F32 [3, 5] needs 60"),
    (lambda h: h["b"].update(dtype="F16"), None),  # same width: a silent retype is not a layout error
    (lambda h: h["__metadata__"].update(step=7), "__metadata__ must map strings to strings"),
    (lambda h: h.update(__metadata__=["x"]), "__metadata__ must map strings to strings"),
]


@pytest.mark.parametrize(("edit", "message"), PROBLEMS)
def test_header_lies_are_problems(
    store: RecordingStore, tmp_path: Any, edit: Any, message: str | None
) -> None:
    header, body = split(write_sample(store, tmp_path))
    edit(header)
    store.put(FILE, join(header, body))
    if message is None:
        assert read_safetensors_header(store, FILE).problems == []
        return
    with pytest.raises(FormatError, match=f"^{FILE}: .*{_re(message)}"):
        read_safetensors_header(store, FILE)
    assert any(message in p for p in read_safetensors_header(store, FILE, strict=False).problems)


def _re(text: str) -> str:
    import re

    return re.escape(text)


def layout_file(entries: list[tuple[str, str, list[int], int, int]], body_size: int) -> bytes:
    header = {
        name: {"dtype": dtype, "shape": shape, "data_offsets": [b, e]} for name, dtype, shape, b, e in entries
    }
    return join(header, bytes(body_size))


LAYOUTS = [
    # name, entries, body size, expected problem
    (
        "gap",
        [("a", "U8", [4], 0, 4), ("b", "U8", [4], 8, 12)],
        12,
        "tensor 'b' starts at 8, expected 4 (a gap of 4",
    ),
    (
        "overlap",
        [("a", "U8", [8], 0, 8), ("b", "U8", [4], 4, 8)],
        8,
        "tensor 'b' starts at 4, expected 8 (it overlaps",
    ),
    ("not from zero", [("a", "U8", [4], 4, 8)], 8, "tensor 'a' starts at 4, expected 0"),
    ("trailing bytes", [("a", "U8", [4], 0, 4)], 9, "(5 trailing bytes)"),
    ("past the end", [("a", "U8", [16], 0, 16)], 4, "(truncated: 12 bytes missing)"),
    ("sub-byte", [("a", "F4", [3], 0, 2)], 2, "F4 [3] is 12 bits, not a whole number of bytes"),
    ("overflow", [("a", "F64", [2**40, 2**40], 0, 8)], 8, "overflows 64-bit sizes"),
]


@pytest.mark.parametrize(("label", "entries", "body", "message"), LAYOUTS, ids=[x[0] for x in LAYOUTS])
def test_layout_problems(store: RecordingStore, label: str, entries: Any, body: int, message: str) -> None:
    data = layout_file(entries, body)
    store.put(FILE, data)
    with pytest.raises(FormatError, match=_re(message)):
        read_safetensors_header(store, FILE)
    header = read_safetensors_header(store, FILE, strict=False)
    assert [p for p in header.problems if message in p], header.problems
    assert set(header.entries) == {e[0] for e in entries}


def test_duplicate_keys_are_flagged_not_collapsed_silently(store: RecordingStore) -> None:
    text = (
        '{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},'
        '"a":{"dtype":"U8","shape":[4],"data_offsets":[4,8]}}'
    )
    store.put(FILE, join(text, bytes(8)))
    with pytest.raises(FormatError, match="duplicate key 'a' in header"):
        read_safetensors_header(store, FILE)
    problems = read_safetensors_header(store, FILE, strict=False).problems
    # serde keeps the last entry, which leaves a hole at 0..4: both facts are reported.
    assert problems[0] == "duplicate key 'a' in header"
    assert any("starts at 4, expected 0" in p for p in problems)


def test_leading_whitespace_is_a_reported_differential(store: RecordingStore) -> None:
    store.put(FILE, join(' {"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}', b"xy"))
    header = read_safetensors_header(store, FILE, strict=False)
    assert header.entries["a"].offset == len(store.get(FILE)) - 2
    assert header.problems == [
        "header starts with whitespace, not '{' (the format says it must; newer reference readers "
        "accept it, older ones refuse it)"
    ]


FATAL = [
    (b"\x01\x00\x00", "3 bytes, too short for a safetensors file"),
    ((10**9).to_bytes(8, "little") + b"{}", "header length 1000000000 exceeds the 100000000 byte cap"),
    ((2**64 - 1).to_bytes(8, "little") + b"{}", "exceeds the 100000000 byte cap"),
    ((100).to_bytes(8, "little") + b"{}", "header of 100 bytes runs past the end of the 10 byte file"),
    ((1).to_bytes(8, "little") + b"\xff", "header is not valid JSON"),
    (join("[1, 2]", b""), "header is not a JSON object"),
    (join("[" * 100_000, b""), "header is not valid JSON"),
    (join('{"a": 5}', b""), "tensor 'a': entry is not an object"),
    (join('{"a": {"dtype": "F99", "shape": [1], "data_offsets": [0, 1]}}', b"x"), "unsupported dtype 'F99'"),
    (join('{"a": {"dtype": "U8", "shape": [-1], "data_offsets": [0, 1]}}', b"x"), "bad shape [-1]"),
    (join('{"a": {"dtype": "U8", "shape": [1.0], "data_offsets": [0, 1]}}', b"x"), "bad shape [1.0]"),
    (join('{"a": {"dtype": "U8", "shape": [1], "data_offsets": [1, 0]}}', b"x"), "bad data_offsets [1, 0]"),
    (join('{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0]}}', b"x"), "bad data_offsets [0]"),
    (join('{"a": {"dtype": "U8", "shape": [1]}}', b"x"), "bad data_offsets None"),
]


@pytest.mark.parametrize(("data", "message"), FATAL)
def test_malformed_headers_raise_even_when_lenient(store: RecordingStore, data: bytes, message: str) -> None:
    store.put(FILE, data)
    for strict in (True, False):
        with pytest.raises(FormatError, match=f"^{FILE}: .*{_re(message)}"):
            read_safetensors_header(store, FILE, strict=strict)


def test_zero_size_and_zero_rank_tensors_are_valid(store: RecordingStore) -> None:
    header = {
        "e": {"dtype": "F32", "shape": [0, 5], "data_offsets": [0, 0]},
        "s": {"dtype": "I32", "shape": [], "data_offsets": [0, 4]},
    }
    store.put(FILE, join(header, b"\x07\x00\x00\x00"))
    parsed = read_safetensors_header(store, FILE)
    assert parsed.entries["e"].nbytes == 0 and parsed.entries["s"].shape == ()
    assert store.get(FILE, parsed.entries["s"].offset, parsed.entries["s"].offset + 4) == b"\x07\x00\x00\x00"


# --- fuzzing: hostile bytes only ever raise ckptkit errors ----------------------------------

_VALID = join(
    {
        "a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
        "b": {"dtype": "U8", "shape": [3], "data_offsets": [16, 19]},
        "__metadata__": {"k": "v"},
    },
    bytes(19),
)


def _fuzz_one(raw: bytes, file_size: int) -> None:
    try:
        header = parse_safetensors_header("fuzz", raw, file_size, strict=False)
    except CkptkitError:
        return
    for entry in header.entries.values():
        assert entry.end >= entry.begin >= 0


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200), st.integers(min_value=0, max_value=1 << 20))
def test_fuzz_random_headers(raw: bytes, file_size: int) -> None:
    _fuzz_one(raw, file_size)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["a", "b", "__metadata__"]),
        st.fixed_dictionaries(
            {
                "dtype": st.sampled_from(["F32", "U8", "F4", "X", 1]),
                "shape": json_values,
                "data_offsets": json_values,
            }
        )
        | json_values,
        max_size=3,
    ),
    st.integers(min_value=0, max_value=100),
)
def test_fuzz_structured_headers(document: dict[str, Any], body: int) -> None:
    raw = json.dumps(document, allow_nan=True).encode()
    _fuzz_one(raw, 8 + len(raw) + body)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.integers(min_value=0, max_value=len(_VALID) - 1), st.integers(0, 255)), max_size=6)
)
def test_fuzz_mutated_files(edits: list[tuple[int, int]]) -> None:
    data = bytearray(_VALID)
    for pos, value in edits:
        data[pos] = value
    store = open_store("memory://ckptkit-fuzz-safetensors/root")
    store.put(FILE, bytes(data))
    with contextlib.suppress(CkptkitError):
        read_safetensors_header(store, FILE, strict=False)
