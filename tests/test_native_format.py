"""The native format: exact round trips, shared storage, refusals, partial loads, corruption."""

from __future__ import annotations

import json
import math
import re
import struct
import threading
import uuid
import warnings
from collections import Counter, OrderedDict, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open

from ckptkit.errors import FormatError, UnstorableValueError
from ckptkit.native import MissingKeyError, read_native, write_native
from ckptkit.storage import Store, open_store
from ckptkit.storage.base import ObjectInfo

# --- helpers --------------------------------------------------------------------------------


class StoreSink:
    """The simplest FileSink: each file straight into a store; remembers who wrote what."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.threads: set[str] = set()
        self.chunk_types: dict[str, set[type]] = {}
        self._lock = threading.Lock()

    def write(self, path: str, data: Any) -> ObjectInfo:
        with self._lock:
            self.threads.add(threading.current_thread().name)
            self.chunk_types[path] = set()
        return self.store.put(path, data if isinstance(data, bytes) else self._watch(path, data))

    def _watch(self, path: str, chunks: Any) -> Iterator[Any]:
        for chunk in chunks:
            self.chunk_types[path].add(type(chunk))
            yield chunk


def tensor_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The bytes of every element in logical order, for any dtype and any strides."""
    tensor = tensor.detach()
    itemsize = tensor.element_size()
    raw = torch.empty(0, dtype=torch.uint8, device=tensor.device).set_(tensor.untyped_storage())
    return raw.as_strided(
        (*tensor.shape, itemsize),
        (*(s * itemsize for s in tensor.stride()), 1),
        tensor.storage_offset() * itemsize,
    ).contiguous()


def float_bits(value: float) -> int:
    return struct.unpack("<Q", struct.pack("<d", value))[0]


def assert_exact(expected: Any, actual: Any, path: str = "state") -> None:
    """Type-strict, bit-exact equality; NaNs compare by their bits."""
    assert type(actual) is type(expected), f"{path}: {type(actual)} != {type(expected)}"
    if isinstance(expected, dict):  # dict, OrderedDict, Counter: same keys, same order
        assert len(actual) == len(expected), path
        for (key_e, val_e), (key_a, val_a) in zip(expected.items(), actual.items(), strict=True):
            assert_exact(key_e, key_a, f"{path} key {key_e!r}")
            assert_exact(val_e, val_a, f"{path}[{key_e!r}]")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), path
        for i, (item_e, item_a) in enumerate(zip(expected, actual, strict=True)):
            assert_exact(item_e, item_a, f"{path}[{i}]")
    elif isinstance(expected, (set, frozenset)):
        assert actual == expected, path
        for item in expected:  # equal sets may still differ in element types (1 and 1.0)
            assert_exact(item, next(other for other in actual if other == item), f"{path}{{{item!r}}}")
    elif isinstance(expected, float):
        assert float_bits(actual) == float_bits(expected), f"{path}: {actual!r} != {expected!r}"
    elif isinstance(expected, complex):
        assert_exact(expected.real, actual.real, f"{path}.real")
        assert_exact(expected.imag, actual.imag, f"{path}.imag")
    elif isinstance(expected, torch.Tensor):
        assert actual.dtype == expected.dtype, path
        assert actual.shape == expected.shape, path
        assert actual.stride() == expected.stride(), path
        assert actual.device == expected.device, path
        assert actual.requires_grad == expected.requires_grad, path
        assert torch.equal(tensor_bytes(actual), tensor_bytes(expected.resolve_conj())), path
    elif isinstance(expected, np.ndarray):
        assert actual.dtype.str == expected.dtype.str and actual.shape == expected.shape, path
        fortran = expected.flags.f_contiguous and not expected.flags.c_contiguous
        assert actual.flags.f_contiguous if fortran else actual.flags.c_contiguous, path
        assert actual.tobytes() == expected.tobytes(), path
    elif isinstance(expected, np.generic):
        assert actual.dtype.str == expected.dtype.str, path
        assert actual.tobytes() == expected.tobytes(), path
    else:
        assert actual == expected, f"{path}: {actual!r} != {expected!r}"


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """A tensor of any dtype whose bytes are random, NaN patterns and all."""
    tensor = torch.empty(shape, dtype=dtype)
    raw = torch.empty(0, dtype=torch.uint8).set_(tensor.untyped_storage())
    generator = torch.Generator().manual_seed(seed)
    raw.copy_(torch.randint(0, 256, raw.shape, dtype=torch.uint8, generator=generator))
    return tensor


def roundtrip(state: Any, store: Store, **read_options: Any) -> Any:
    write_native(state, StoreSink(store), max_shard_size=1 << 12, jobs=3)
    return read_native(store, **read_options)


@pytest.fixture(params=["local", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "local":
        yield open_store(tmp_path / "ckpt")
        return
    memory = open_store(f"memory://native-{uuid.uuid4().hex[:12]}/ckpt")
    yield memory
    memory.delete_prefix("")


@pytest.fixture
def memory_store() -> Iterator[Store]:
    memory = open_store(f"memory://native-{uuid.uuid4().hex[:12]}/ckpt")
    yield memory
    memory.delete_prefix("")


def tree_document(store: Store) -> dict[str, Any]:
    return json.loads(store.get("tree.json"))


TORCH_DTYPES = sorted(
    {
        value
        for value in vars(torch).values()
        if isinstance(value, torch.dtype) and not str(value).startswith(("torch.qint", "torch.quint"))
    },
    key=str,
)

# --- round trips ----------------------------------------------------------------------------


def test_python_values_round_trip_exactly(store: Store) -> None:
    odd_nan = struct.unpack("<d", struct.pack("<Q", 0xFFF0000000000123))[0]
    state = {
        "none": None,
        "bools": [True, False],
        "ints": [0, -1, 2**53 - 1, 2**53, -(2**64), 2**200, 10**5000],
        "floats": [0.1, -0.0, 0.0, 1e308, 5e-324, math.inf, -math.inf, math.nan, odd_nan, 1.0],
        "complex": [1 + 2j, complex(-0.0, math.nan), complex(math.inf, -1.5)],
        "bytes": [b"", b"\x00\xff", bytearray(b"abc")],
        "str": ["", "ünïcødé ✓", '"quoted" {"t": 1}'],
        "tuple": (1, (2, (3,)), ()),
        "set": {1, "a", (2, 3)},
        "frozenset": frozenset({None, 1.5}),
        "odict": OrderedDict([("b", 1), ("a", 2)]),
        "counter": Counter({"x": 3, "y": 0, "z": -2}),
        "t": {"t": "tuple", "v": [1]},  # looks like a tagged node, but is a plain dict
        7: "int key",
        None: "none key",
        1.5: "float key",
        (1, "a"): "tuple key",
        False: "bool key",
        "empty": [[], {}, (), set(), OrderedDict()],
    }
    assert_exact(state, roundtrip(state, store))


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=str)
def test_every_torch_dtype_round_trips_bit_for_bit(store: Store, dtype: torch.dtype) -> None:
    base = random_tensor((6, 4), dtype, seed=1)
    state = {
        "whole": random_tensor((3, 5), dtype, seed=2),
        "scalar": random_tensor((), dtype, seed=3),
        "empty": torch.empty((0, 3), dtype=dtype),
        "transposed": base.t(),
        "strided": base[:, ::2],
    }
    assert_exact(state, roundtrip(state, store))


def test_shards_use_safetensors_dtypes_and_raw_bytes_for_the_rest(store: Store) -> None:
    state = {
        "f32": torch.arange(4, dtype=torch.float32),
        "bf16": torch.arange(4).to(torch.bfloat16),
        "fp8": torch.arange(4).to(torch.float8_e4m3fn),
        "c128": torch.arange(4.0).to(torch.complex128),
        "e8m0": random_tensor((4,), torch.float8_e8m0fnu),
    }
    write_native(state, StoreSink(store))
    entries = tree_document(store)["entries"]
    assert {name: spec["dtype"] for name, spec in entries.items()} == {
        "f32": "F32",
        "bf16": "BF16",
        "fp8": "F8_E4M3",
        "c128": "U8",
        "e8m0": "U8",
    }
    assert entries["c128"]["shape"] == [64]
    local = store.local_path("tensors-00000-of-00001.safetensors")
    if local is not None:  # any safetensors reader opens the shard
        with safe_open(str(local), framework="pt") as f:
            assert f.metadata() == {"format": "ckptkit"}
            assert torch.equal(f.get_tensor("bf16"), state["bf16"])
            assert torch.equal(f.get_tensor("fp8").view(torch.uint8), state["fp8"].view(torch.uint8))


def test_shared_storage_is_stored_once_and_shared_again(store: Store) -> None:
    buffer = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    embedding = torch.nn.Parameter(torch.randn(5, 3))
    state = {
        "model": {"embed": embedding, "lm_head": embedding},  # tied: one object twice
        "views": [buffer, buffer.t(), buffer[1:3], buffer[:, ::2], buffer.view(torch.int32)],
        "other": torch.ones(3),
    }
    loaded = roundtrip(state, store)
    assert_exact(state, loaded)
    assert loaded["model"]["embed"] is loaded["model"]["lm_head"]
    views = loaded["views"]
    pointers = {v.untyped_storage().data_ptr() for v in views}
    assert len(pointers) == 1
    assert loaded["other"].untyped_storage().data_ptr() not in pointers
    views[0][1, 0] = 100.0  # writes through one view show in the others, as before saving
    assert views[1][0, 1] == 100.0 and views[2][0, 0] == 100.0 and views[3][1, 0] == 100.0
    # One entry per storage; the views of mixed dtypes share one raw span of the buffer.
    assert tree_document(store)["entries"] == {
        "model.embed": {"shard": 0, "dtype": "F32", "shape": [5, 3]},
        "views.0@storage": {"shard": 0, "dtype": "U8", "shape": [96]},
        "other": {"shard": 0, "dtype": "F32", "shape": [3]},
    }


def test_parameters_and_requires_grad(store: Store) -> None:
    state = {
        "param": torch.nn.Parameter(torch.randn(2, 2)),
        "frozen": torch.nn.Parameter(torch.randn(2), requires_grad=False),
        "leaf": torch.randn(3, requires_grad=True),
        "plain": torch.randn(3),
    }
    loaded = roundtrip(state, store)
    assert_exact(state, loaded)
    assert type(loaded["param"]) is torch.nn.Parameter and loaded["param"].requires_grad
    assert type(loaded["frozen"]) is torch.nn.Parameter and not loaded["frozen"].requires_grad
    assert loaded["leaf"].is_leaf and loaded["leaf"].requires_grad


def test_conjugate_and_negative_views_keep_their_values(store: Store) -> None:
    z = torch.randn(3, dtype=torch.complex64)
    loaded = roundtrip({"conj": z.conj(), "neg": z.conj().imag}, store)
    assert torch.equal(loaded["conj"], z.conj().resolve_conj())
    assert torch.equal(loaded["neg"], z.conj().imag.resolve_neg())


def test_numpy_values_and_rng_states(store: Store) -> None:
    legacy = np.random.RandomState(7)
    legacy.standard_normal()  # a cached gaussian in the state
    generator = np.random.default_rng(11)
    generator.integers(0, 10, size=3)
    state = {
        "legacy_rng": legacy.get_state(),
        "legacy_rng_dict": legacy.get_state(legacy=False),
        "rng": generator.bit_generator.state,
        "arrays": [
            np.arange(6, dtype=np.float32).reshape(2, 3),
            np.arange(6, dtype=">i4").reshape(3, 2),
            np.asfortranarray(np.arange(12.0).reshape(3, 4)),
            np.array(3.5),
            np.array(["ab", "c"]),
            np.zeros((0, 2), dtype=np.int16),
            np.arange(6.0)[::2],
        ],
        "large": np.arange(20_000, dtype=np.float64).reshape(100, 200),
        "scalars": [np.float64(1.5), np.uint32(7), np.bool_(True), np.float16(-0.0), np.int8(-3)],
    }
    loaded = roundtrip(state, store)
    assert_exact(state, loaded)
    assert loaded["large"].flags.writeable
    assert any(name.startswith("large") for name in tree_document(store)["entries"])
    restored = np.random.RandomState()
    restored.set_state(loaded["legacy_rng"])
    assert restored.standard_normal(4).tolist() == legacy.standard_normal(4).tolist()
    fresh = np.random.default_rng()
    fresh.bit_generator.state = loaded["rng"]
    assert fresh.integers(0, 1 << 40, size=4).tolist() == generator.integers(0, 1 << 40, size=4).tolist()


def test_torch_metadata_values(store: Store) -> None:
    state = [torch.Size([2, 3]), torch.Size([]), torch.bfloat16, torch.float8_e5m2, torch.device("cpu")]
    state.append(torch.device("cuda", 1))
    assert_exact(state, roundtrip(state, store))


def test_non_dict_states(store: Store) -> None:
    tensor = torch.randn(2)
    assert_exact(tensor, roundtrip(tensor, store))
    assert_exact([1, (tensor, tensor)], roundtrip([1, (tensor, tensor)], store))


# --- layout ---------------------------------------------------------------------------------


def test_shards_are_bounded_streamed_and_written_concurrently(memory_store: Store) -> None:
    state = {f"layer{i}": torch.full((256,), float(i)) for i in range(8)}  # 1 KiB each
    state["huge"] = torch.zeros(4096)  # 16 KiB, above the bound: a shard of its own
    sink = StoreSink(memory_store)
    summary = write_native(state, sink, max_shard_size=2048, jobs=4)
    assert summary.tensor_count == 9 and summary.tensor_bytes == 8 * 1024 + 16384
    assert summary.tree_path == "tree.json"
    assert summary.shard_paths == [f"tensors-{i:05d}-of-00005.safetensors" for i in range(5)]
    assert {info.key for info in memory_store.list()} == {"tree.json", *summary.shard_paths}
    for path in summary.shard_paths:
        assert sink.chunk_types[path] == {memoryview}
        data = memory_store.get(path)
        header_length = int.from_bytes(data[:8], "little")
        assert header_length % 8 == 0
        header = json.loads(data[8 : 8 + header_length])
        assert header.pop("__metadata__") == {"format": "ckptkit"}
        data_bytes = len(data) - 8 - header_length
        assert data_bytes <= 2048 or list(header) == ["huge"]
    assert len(sink.threads) > 1
    assert_exact(state, read_native(memory_store))


def test_a_state_without_tensors_writes_no_shards(memory_store: Store) -> None:
    summary = write_native({"step": 3, "lr": [0.1]}, StoreSink(memory_store))
    assert summary.shard_paths == [] and summary.tensor_count == 0
    assert [info.key for info in memory_store.list()] == ["tree.json"]
    assert read_native(memory_store) == {"step": 3, "lr": [0.1]}


def test_tree_json_is_readable_json(memory_store: Store) -> None:
    write_native({"model": {"w": torch.zeros(2)}, "step": 5, 3: (1, 2)}, StoreSink(memory_store))
    document = tree_document(memory_store)
    assert document["format"] == "ckptkit.native" and document["version"] == 1
    assert document["tensors"][0]["dtype"] == "float32" and document["tensors"][0]["shape"] == [2]
    assert document["tree"] == {
        "t": "dict",
        "v": [["model", {"w": {"t": "tensor", "i": 0}}], ["step", 5], [3, {"t": "tuple", "v": [1, 2]}]],
    }


# --- refusals -------------------------------------------------------------------------------


class Opaque:
    pass


def _quantized() -> dict[str, Any]:
    # Built at test time: creating a quantized tensor warns that they are deprecated.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return {"q": torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.qint8)}


def _cycle() -> list[Any]:
    loop: list[Any] = [1]
    loop.append({"back": loop})
    return loop


@pytest.mark.parametrize(
    ("state", "message"),
    [
        (
            {"scheduler": {"lr_lambdas": [lambda step: 0.9**step]}},
            'state["scheduler"]["lr_lambdas"][0]: function is not storable',
        ),
        ({"m": {3: {"x": math}}}, 'state["m"][3]["x"]: module is not storable'),
        ([(1, Opaque())], f"state[0][1]: {__name__}.Opaque is not storable"),
        ({(1, "a"): [None, print]}, "state[(1, 'a')][1]: builtin_function_or_method is not storable"),
        ({"loop": _cycle()}, 'state["loop"][1]["back"]: cycle: a container holds itself'),
        ({"d": defaultdict(list)}, 'state["d"]: collections.defaultdict is not storable'),
        ({"k": {Opaque(): 1}}, f'state["k"]: dict key of type {__name__}.Opaque is not storable'),
        ({"a": np.array([object()])}, 'state["a"]: numpy dtype object is not storable'),
        ({"g": np.random.default_rng()}, 'state["g"]: numpy.random._generator.Generator is not storable'),
        (_quantized, 'state["q"]: quantized tensor is not storable'),
        ({"s": torch.eye(2).to_sparse()}, 'state["s"]: tensor with layout torch.sparse_coo is not storable'),
        ({"meta": torch.empty(2, device="meta")}, 'state["meta"]: meta tensor has no data to store'),
    ],
)
def test_unstorable_values_are_refused_with_their_path(memory_store: Store, state: Any, message: str) -> None:
    with pytest.raises(UnstorableValueError) as caught:
        write_native(state() if callable(state) else state, StoreSink(memory_store))
    assert str(caught.value).startswith(message)
    assert list(memory_store.list()) == []  # refused before anything was written


# --- partial loads --------------------------------------------------------------------------


class CountingStore(Store):
    """A store that counts the bytes each key hands out through ranged reads."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.capabilities = inner.capabilities
        self.read: Counter[str] = Counter()

    @property
    def url(self) -> str:
        return self.inner.url

    def child(self, prefix: str) -> Store:
        raise NotImplementedError

    def get(self, key: str, start: int | None = None, end: int | None = None) -> bytes:
        data = self.inner.get(key, start, end)
        self.read[key] += len(data)
        return data

    def open_read(self, key: str) -> Any:
        raise AssertionError("the native reader uses ranged reads")

    def head(self, key: str) -> ObjectInfo:
        return self.inner.head(key)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        return self.inner.list(prefix)

    def list_dirs(self, prefix: str = "") -> list[str]:
        return self.inner.list_dirs(prefix)

    def put(self, key: str, data: Any, mode: Any = "overwrite") -> ObjectInfo:
        return self.inner.put(key, data, mode)

    def delete(self, key: str) -> None:
        self.inner.delete(key)

    def copy(self, src: str, dst: str) -> None:
        self.inner.copy(src, dst)


def test_keys_reads_only_the_requested_tensors(memory_store: Store) -> None:
    state = OrderedDict(
        model={"w": torch.randn(64, 64), "b": torch.randn(64)},
        optimizer={"exp_avg": torch.randn(256, 256), "step": 10},
        step=10,
    )
    counting = CountingStore(memory_store)
    write_native(state, StoreSink(counting), max_shard_size=20_000)
    loaded = read_native(counting, keys=["model", "step"])
    assert_exact(OrderedDict(model=state["model"], step=10), loaded)
    model_bytes = (64 * 64 + 64) * 4
    shard_bytes = {key: n for key, n in counting.read.items() if key != "tree.json"}
    header_bytes = sum(8 + int.from_bytes(memory_store.get(k, 0, 8), "little") for k in shard_bytes)
    assert sum(shard_bytes.values()) == model_bytes + header_bytes
    assert len(shard_bytes) == 1  # the optimizer's shard was never opened


def test_keys_errors(memory_store: Store) -> None:
    write_native({"model": {}, "step": 1}, StoreSink(memory_store))
    with pytest.raises(MissingKeyError) as caught:
        read_native(memory_store, keys=["model", "optim"])
    assert str(caught.value) == "no top-level key 'optim' in the checkpoint; available: ['model', 'step']"
    assert isinstance(caught.value, KeyError)
    write_native([1, 2], StoreSink(memory_store))
    with pytest.raises(TypeError, match="keys= needs a checkpoint whose state is a dict"):
        read_native(memory_store, keys=["model"])


# --- map_location and memory mapping --------------------------------------------------------


def _pretend_saved_on(store: Store, device: str) -> None:
    document = tree_document(store)
    for record in document["tensors"]:
        record["device"] = device
    store.put("tree.json", json.dumps(document).encode())


def test_map_location_forms(memory_store: Store) -> None:
    buffer = torch.randn(4, 4)
    state = {"a": buffer, "b": buffer.t(), "p": torch.nn.Parameter(torch.randn(2))}
    write_native(state, StoreSink(memory_store))
    _pretend_saved_on(memory_store, "cuda:3")
    for location in ("cpu", torch.device("cpu"), {"cuda:3": "cpu"}, {"cuda:3": torch.device("cpu")}):
        loaded = read_native(memory_store, map_location=location)
        assert_exact(state, loaded)
        assert loaded["a"].untyped_storage().data_ptr() == loaded["b"].untyped_storage().data_ptr()
    seen: list[str] = []

    def to_double(tensor: torch.Tensor, original: str) -> torch.Tensor:
        seen.append(original)
        return tensor.double()

    loaded = read_native(memory_store, map_location=to_double)
    assert seen == ["cuda:3"] * 3
    assert loaded["a"].dtype == torch.float64 and torch.equal(loaded["a"], buffer.double())
    assert type(loaded["p"]) is torch.nn.Parameter and loaded["p"].requires_grad
    on_meta = read_native(memory_store, map_location="meta")
    assert on_meta["a"].is_meta and on_meta["b"].stride() == (1, 4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_original_cuda_device_without_cuda_fails_loudly(memory_store: Store) -> None:
    write_native({"a": torch.ones(2)}, StoreSink(memory_store))
    _pretend_saved_on(memory_store, "cuda:0")
    with pytest.raises((RuntimeError, AssertionError)):
        read_native(memory_store)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_come_back_on_their_device_still_shared(memory_store: Store) -> None:
    buffer = torch.randn(4, 4, device="cuda").to(torch.bfloat16)
    state = {"a": buffer, "b": buffer.t(), "p": torch.nn.Parameter(torch.randn(3, device="cuda"))}
    write_native(state, StoreSink(memory_store))
    loaded = read_native(memory_store)
    assert_exact(state, loaded)
    assert loaded["a"].untyped_storage().data_ptr() == loaded["b"].untyped_storage().data_ptr()
    on_cpu = read_native(memory_store, map_location={"cuda:0": "cpu"})
    assert on_cpu["a"].device.type == "cpu" and torch.equal(on_cpu["b"], buffer.t().cpu())


def _mapped_ranges(path: Path) -> list[tuple[int, int]]:
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(str(path)):
            low, high = line.split()[0].split("-")
            ranges.append((int(low, 16), int(high, 16)))
    return ranges


def test_local_loads_are_memory_mapped_and_copy_on_write(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    write_native({"w": torch.arange(100_000, dtype=torch.float32)}, StoreSink(store))
    shard = tmp_path / "tensors-00000-of-00001.safetensors"
    before = shard.read_bytes()
    mapped = read_native(store)["w"]
    pointer = mapped.data_ptr()
    assert any(low <= pointer < high for low, high in _mapped_ranges(shard))
    mapped.add_(1)  # private mapping: the file keeps its bytes
    assert shard.read_bytes() == before
    copied = read_native(store, mmap=False)["w"]
    assert not any(low <= copied.data_ptr() < high for low, high in _mapped_ranges(shard))
    assert torch.equal(copied, torch.arange(100_000, dtype=torch.float32))


# --- corruption -----------------------------------------------------------------------------

SHARD = "tensors-00000-of-00001.safetensors"


def _write_sample(store: Store) -> bytes:
    write_native({"w": torch.arange(16, dtype=torch.float32), "v": torch.ones(4)}, StoreSink(store))
    return store.get(SHARD)


def _with_header(shard: bytes, edit: Any) -> bytes:
    length = int.from_bytes(shard[:8], "little")
    header = json.loads(shard[8 : 8 + length])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + shard[8 + length :]


def _shift_offsets(header: dict[str, Any]) -> None:
    header["w"]["data_offsets"][1] += 4


def _grow_shape(header: dict[str, Any]) -> None:
    header["w"]["shape"] = [17]


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda shard: shard[:-3], "header accounts for"),
        (lambda shard: shard[:5], "too short for a safetensors file"),
        (lambda shard: (10**9).to_bytes(8, "little") + shard[8:], "exceeds the 100000000 byte cap"),
        (lambda shard: (10**6).to_bytes(8, "little") + shard[8:], "runs past the end"),
        (lambda shard: shard[:8] + b"\xff" + shard[9:], "not valid JSON"),
        (lambda shard: _with_header(shard, _shift_offsets), "data_offsets span 68 bytes"),
        (lambda shard: _with_header(shard, _grow_shape), "needs 68"),
        (lambda shard: shard[:-4] + b"" + shard[-4:] + b"junk", "header accounts for"),
    ],
)
def test_corrupt_shards_raise_format_error(store: Store, corrupt: Any, message: str) -> None:
    store.put(SHARD, corrupt(_write_sample(store)))
    with pytest.raises(FormatError) as caught:
        read_native(store)
    assert SHARD in str(caught.value) and message in str(caught.value)


def test_duplicate_header_keys_are_refused(store: Store) -> None:
    shard = _write_sample(store)
    length = int.from_bytes(shard[:8], "little")
    raw = shard[8 : 8 + length].rstrip().decode()
    raw = raw[:-1] + ',"v":{"dtype":"F32","shape":[4],"data_offsets":[64,80]}}'
    raw_bytes = raw.encode() + b" " * (-len(raw) % 8)
    store.put(SHARD, len(raw_bytes).to_bytes(8, "little") + raw_bytes + shard[8 + length :])
    with pytest.raises(FormatError, match="duplicate key 'v'"):
        read_native(store)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda doc: doc["entries"].pop("w"), "refers to entry 'w', which its entry table lacks"),
        (lambda doc: doc["entries"]["w"].update(shard=4), "names shard 4, which does not exist"),
        (lambda doc: doc["entries"]["w"].update(shape=[8]), "is F32 [16] in the shard header"),
        (lambda doc: doc["tensors"][0].update(offset=8), "lies outside entry 'w'"),
        (lambda doc: doc["tensors"][0].update(shape=[4, 5], stride=[5, 1]), "lies outside entry 'w'"),
        (lambda doc: doc["tensors"][0].update(dtype="float99"), "unknown torch dtype 'float99'"),
        (lambda doc: doc["tree"].update(w={"t": "tensor", "i": 9}), "reference to tensor 9"),
        (lambda doc: doc["tree"].update(w={"t": "pickle"}), "unknown node type 'pickle'"),
        (lambda doc: doc.update(version=3), "format version 3"),
    ],
)
def test_inconsistent_tree_json_raises_format_error(store: Store, edit: Any, message: str) -> None:
    _write_sample(store)
    document = tree_document(store)
    edit(document)
    store.put("tree.json", json.dumps(document).encode())
    with pytest.raises(FormatError, match=re.escape(message)):
        read_native(store)


def test_a_renamed_entry_in_the_shard_is_caught(store: Store) -> None:
    shard = _write_sample(store)
    store.put(SHARD, shard.replace(b'"w":', b'"x":', 1))
    with pytest.raises(FormatError, match=f"{SHARD}: has no tensor 'w'"):
        read_native(store)
