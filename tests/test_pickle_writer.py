"""formats.pickle_writer and torch_writer.torch_tree_chunks: symbolic trees written back as torch.save.

Each test writes a tree and reads the result three ways: with CPython's pickle (plain values, byte
for byte against its own protocol-2 output), with ckptkit's symbolic reader (the same tree back),
and with ``torch.load`` (the live objects torch.save would have given: OrderedDicts, Sizes,
dtypes, numpy arrays, tensors and the storages they share). Real DeepSpeed rank files are read
symbolically, their tensors swapped for StoredTensors streaming the same bytes, written, and
loaded against the original, with and without ``weights_only``.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import pickletools
import subprocess
import sys
from collections import Counter, OrderedDict
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from blake3 import blake3

from ckptkit.errors import FormatError
from ckptkit.formats.dtypes import torch_itemsize
from ckptkit.formats.pickle_writer import StoredTensor, dumps
from ckptkit.formats.torch_writer import torch_tree_chunks
from ckptkit.formats.torchfile import read_torch_file
from ckptkit.pickle import (
    GlobalRef,
    NdArray,
    Opaque,
    StorageRef,
    TensorRef,
    TorchSize,
    VettedObject,
    load_symbolic,
)
from ckptkit.safe import safe_globals
from ckptkit.storage.local import LocalStore

REPO_ROOT = Path(__file__).resolve().parents[1]
LOSS_SCALER = GlobalRef("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler")
ZERO_STAGE = GlobalRef("deepspeed.runtime.zero.config", "ZeroStageEnum")
FROM_TYPE = GlobalRef("torch._tensor", "_rebuild_from_type_v2")


def _no_tensors(tensor: StoredTensor) -> str:
    raise AssertionError("no tensor expected")


def _stored(tensor: torch.Tensor, requires_grad: bool = False) -> StoredTensor:
    """A StoredTensor streaming ``tensor``'s bytes in two chunks (the writer must join them)."""
    raw = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    half = len(raw) // 2
    return StoredTensor(
        str(tensor.dtype).removeprefix("torch."),
        tuple(tensor.shape),
        lambda: [raw[:half], raw[half:]],
        requires_grad,
    )


def _written(value: Any, on_written: Any = None) -> bytes:
    return b"".join(bytes(chunk) for chunk in torch_tree_chunks(value, on_written))


def _ndarray(array: np.ndarray, scalar: bool = False) -> NdArray:
    order = "F" if array.flags.f_contiguous and not array.flags.c_contiguous else "C"
    return NdArray(array.dtype.str, array.shape, array.tobytes(order=order), order == "F", scalar)


# --- plain values -------------------------------------------------------------------------------


def _plain() -> dict[str, Any]:
    """Every builtin kind once, each global and string once (pickle memoizes repeats)."""
    return {
        "ints": [0, 1, 255, 256, 65535, 65536, -1, -(2**31), 2**31 - 1, 2**31, 2**63, -(2**63) - 1, 2**2100],
        "floats": (1.5, -0.0, float("inf"), 1e-300),
        "sizes": ((), (None,), (True, False), ("x", "y", "z"), (1, 2, 3, 4)),
        "text": "naïve ☃ 𝄞",
        "bytes": bytes(range(256)),
        "empty": b"",
        "od": OrderedDict([("later", 1), *((i, None) for i in range(10_000, 11_000))]),  # 1000 + a lone 1
        "counter": Counter({"k": 3}),
        "set": {7, 8},
        "frozen": frozenset({9}),
        "complex": 1 + 2j,
        "slice": slice(1, None, 2),
        "long_list": list(range(2500)),  # APPENDS in batches of 1000
        "long_dict": {i: -i for i in range(1001)},  # two SETITEMS batches, the second of one
        "one": [None],  # a single APPEND
    }


def test_plain_values_are_the_bytes_pickle_writes() -> None:
    value = _plain()
    # optimize() drops the PUTs pickle writes for objects it never fetches again.
    assert dumps(value, _no_tensors) == pickletools.optimize(pickle.dumps(value, protocol=2))


def test_every_kind_reads_back_symbolically() -> None:
    value = {
        **_plain(),
        "bytearray": bytearray(b"\x00q"),
        "dtype": GlobalRef("torch", "bfloat16"),
        "size": TorchSize((2, 3)),
        "device": VettedObject(GlobalRef("torch", "device"), args=("cpu",)),
        "stage": VettedObject(ZERO_STAGE, args=(2,)),
        "scaler": VettedObject(
            LOSS_SCALER,
            {"cur_scale": 65536.0, "dynamic": True, "cur_iter": 5, "dtype": GlobalRef("torch", "float16")},
        ),
        "call": Opaque(
            GlobalRef("mypkg.mod", "Thing"),
            "reduce",
            (1, "a"),
            state={"s": [1]},
            items=[4, 5],
            setitems=[("k", "v")],
        ),
        "new": Opaque(GlobalRef("mypkg.mod", "Other"), "newobj", (), state={"x": 1}),
        "on_class": Opaque(GlobalRef("mypkg.mod", "Klass"), "global", state={"attr": 1}),
        "arrays": [
            _ndarray(np.arange(624, dtype="<u4")),
            _ndarray(np.asfortranarray(np.arange(6, dtype="<f4").reshape(2, 3))),
            _ndarray(np.array([True, False])),
            _ndarray(np.array(["ab", "cde"], dtype="<U3")),
            _ndarray(np.array([1, 2], dtype="<M8[ns]")),
            _ndarray(np.array([3], dtype=">i4")),
            _ndarray(np.array([b"xy"], dtype="|S2")),
            _ndarray(np.float64(0.25).reshape(()), scalar=True),
        ],
    }
    assert load_symbolic(dumps(value, _no_tensors)).value == value


def test_torch_load_gives_live_objects(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    embed = torch.randn(4, 3, generator=gen).to(torch.bfloat16)
    tied = _stored(embed)
    master = torch.randn(5, generator=gen)
    half = torch.randn(2, 2, generator=gen).to(torch.float16)
    mask = torch.tensor([True, False, True])
    rng_state = np.random.RandomState(3).get_state()
    value = {
        "module": OrderedDict([("embed.weight", tied), ("head.weight", tied), ("half", _stored(half))]),
        "master": _stored(master, requires_grad=True),
        "copy": _stored(master),  # equal bytes but its own object: its own storage
        "steps": _stored(torch.tensor(7, dtype=torch.int64)),
        "mask": _stored(mask),
        "none": _stored(torch.empty(0, 3)),
        "size": TorchSize((4, 3)),
        "dtype": GlobalRef("torch", "float16"),
        "raw": b"\x00\xff",
        "np_rng": (rng_state[0], _ndarray(rng_state[1]), rng_state[2], rng_state[3], rng_state[4]),
        "np_scalar": _ndarray(np.float32(2.5).reshape(()), scalar=True),
        "fortran": _ndarray(np.asfortranarray(np.arange(6, dtype="<i8").reshape(2, 3))),
    }
    path = tmp_path / "tree.pt"
    path.write_bytes(_written(value))
    for mmap in (False, True):
        got = torch.load(path, weights_only=False, mmap=mmap)
        assert type(got["module"]) is OrderedDict and list(got["module"]) == [
            "embed.weight",
            "head.weight",
            "half",
        ]
        for name, want in (("embed.weight", embed), ("half", half)):
            assert got["module"][name].dtype == want.dtype and torch.equal(got["module"][name], want)
        head, embed_back = got["module"]["head.weight"], got["module"]["embed.weight"]
        assert head is not embed_back  # two tensors over one storage, as state_dict() gives ties
        assert head.untyped_storage().data_ptr() == embed_back.untyped_storage().data_ptr()
        assert got["copy"].untyped_storage().data_ptr() != got["master"].untyped_storage().data_ptr()
        assert torch.equal(got["master"], master) and got["master"].requires_grad
        assert not got["copy"].requires_grad
        assert got["steps"].shape == () and got["steps"].item() == 7 and got["steps"].dtype == torch.int64
        assert torch.equal(got["mask"], mask) and got["none"].shape == (0, 3)
        assert type(got["size"]) is torch.Size and got["size"] == (4, 3)
        assert got["dtype"] is torch.float16 and got["raw"] == b"\x00\xff"
        np_rng = got["np_rng"]
        assert np_rng[0] == "MT19937" and np_rng[2:] == rng_state[2:]
        assert np_rng[1].dtype == np.uint32 and np.array_equal(np_rng[1], rng_state[1])
        restored = np.random.RandomState()
        restored.set_state(np_rng)
        assert (
            restored.randint(0, 2**31, 4).tolist() == np.random.RandomState(3).randint(0, 2**31, 4).tolist()
        )
        assert type(got["np_scalar"]) is np.float32 and got["np_scalar"] == 2.5
        assert got["fortran"].flags.f_contiguous and got["fortran"].tolist() == [[0, 1, 2], [3, 4, 5]]


def test_weights_only_loads_tensors_and_numpy_arrays(tmp_path: Path) -> None:
    rng_state = np.random.RandomState(5).get_state()
    value = {
        "w": _stored(torch.arange(6, dtype=torch.float32).reshape(2, 3)),
        "od": OrderedDict(a=1),
        "size": TorchSize((1,)),
        "set": {1},
        "raw": b"ab",
        "rng": (rng_state[0], _ndarray(rng_state[1]), rng_state[2], rng_state[3], rng_state[4]),
    }
    path = tmp_path / "strict.pt"
    path.write_bytes(_written(value))
    with safe_globals():
        got = torch.load(path, weights_only=True)
    assert torch.equal(got["w"], torch.arange(6, dtype=torch.float32).reshape(2, 3))
    assert type(got["od"]) is OrderedDict and got["set"] == {1} and got["raw"] == b"ab"
    assert np.array_equal(got["rng"][1], rng_state[1])


def test_shared_and_cyclic_objects_keep_their_identity() -> None:
    shared = [1, 2]
    cycle: list[Any] = []
    cycle.append(cycle)
    many = [{"i": i} for i in range(300)]  # past 256 memo entries: LONG_BINPUT / LONG_BINGET
    od = OrderedDict()
    od["self"] = od
    inner: list[Any] = []
    outer = (inner, 5)  # a tuple reached again while its own elements are being written
    inner.append(outer)
    value = {
        "a": shared,
        "b": shared,
        "cycle": cycle,
        "many": many,
        "again": list(many),
        "od": od,
        "t": outer,
    }
    data = dumps(value, _no_tensors)
    for got in (pickle.loads(data), load_symbolic(data).value):
        assert got["a"] is got["b"] and got["a"] == [1, 2]
        assert got["cycle"][0] is got["cycle"]
        pairs = zip(got["many"], got["again"], strict=True)
        assert all(d is e and d["i"] == i for i, (d, e) in enumerate(pairs))
        assert got["od"]["self"] is got["od"] and type(got["od"]) is OrderedDict
        assert got["t"][0][0] is got["t"] and got["t"][1] == 5
    assert "LONG_BINGET" in {op.name for op, _, _ in pickletools.genops(data)}


def test_tree_files_read_back_through_ckptkit(tmp_path: Path) -> None:
    weight = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    tied = _stored(weight)
    written: list[tuple[StoredTensor, int, str]] = []
    value = {"a": tied, "b": tied, "c": _stored(weight.to(torch.bfloat16)), "n": 3}
    (tmp_path / "f.pt").write_bytes(_written(value, lambda t, n, digest: written.append((t, n, digest))))
    read = read_torch_file(LocalStore(tmp_path), "f.pt")
    assert read.problems == []
    a, b, c = (read.value[k] for k in "abc")
    assert (a.storage.key, b.storage.key, c.storage.key) == ("0", "0", "1")
    assert (a.dtype, a.shape, a.stride, c.dtype, c.shape) == ("float32", (3, 4), (4, 1), "bfloat16", (3, 4))
    raw = weight.numpy().tobytes()
    assert [(t is tied, n, digest) for t, n, digest in written[:1]] == [(True, 48, blake3(raw).hexdigest())]
    assert [n for _, n, _ in written] == [48, 24]
    assert LocalStore(tmp_path).get("f.pt", a.storage.byte_offset, a.storage.byte_offset + 48) == raw


def test_tensor_with_python_attributes(tmp_path: Path) -> None:
    # ZeRO-3 writes its flat fp32 groups as _rebuild_from_type_v2(..., {"ds_id": ...}); the reader
    # keeps the rebuilt tensor in the call's argument slot, and the writer must put the rebuild's
    # arguments back there.
    master = torch.linspace(-1, 1, 7)
    rebuild = GlobalRef("torch._utils", "_rebuild_tensor_v2")
    node = Opaque(
        FROM_TYPE, "reduce", (rebuild, GlobalRef("torch", "Tensor"), _stored(master, True), {"ds_id": "7_11"})
    )
    (tmp_path / "z3.pt").write_bytes(_written({"groups": [node]}))
    got = torch.load(tmp_path / "z3.pt", weights_only=True)["groups"][0]
    assert (
        type(got) is torch.Tensor and torch.equal(got, master) and got.requires_grad and got.ds_id == "7_11"
    )
    back = read_torch_file(LocalStore(tmp_path), "z3.pt").value["groups"][0]
    assert back.cls == FROM_TYPE and back.args[3] == {"ds_id": "7_11"}
    assert type(back.args[2]) is TensorRef and back.args[2].shape == (7,)


# --- bad input ----------------------------------------------------------------------------------


def _source_tensor() -> TensorRef:
    return TensorRef(StorageRef("0", "float32", 2, "cpu"), "float32", (2,), (1,), 0)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (lambda: {"t": _source_tensor()}, "replace source tensors by StoredTensor first"),
        (lambda: Opaque(GlobalRef("m", "C"), "newobj", (), kwargs={"k": 1}), "keyword arguments"),
        (
            lambda: StoredTensor("float8_e4m3fn", (2,), lambda: [b"\x00\x00"]),
            "cannot hold dtype float8_e4m3fn",
        ),
        (lambda: {"x": object()}, "cannot write a object"),
        (lambda: NdArray("|O8", (1,), b"\x00" * 8), "cannot write numpy dtype '|O8'"),
        (lambda: _counter_cycle(), "Counter contains itself through the arguments that make it"),
    ],
)
def test_unwritable_trees_are_refused(value: Any, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        _written(value())


def _counter_cycle() -> Counter[Any]:
    # Counter(dict) makes it from its own contents: no pickle can hold one that counts itself.
    counter: Counter[Any] = Counter()
    counter["me"] = counter
    return counter


def test_short_and_long_sources_are_refused() -> None:
    short = StoredTensor("float32", (3,), lambda: [b"\x00" * 8])
    with pytest.raises(
        FormatError, match=r"storage data/0 \(float32 \[3\]\): source gave 8 bytes, expected 12"
    ):
        _written({"t": short})
    long = StoredTensor("float16", (2,), lambda: [b"\x00" * 4, b"\x00"])
    with pytest.raises(FormatError, match="source gave 5 bytes, expected 4"):
        _written({"t": long})


# --- real DeepSpeed rank files ------------------------------------------------------------------

DEEPSPEED_FILES = [
    # (case, file, what it exercises)
    ("z2_fp16_overflow", "zero_pp_rank_0_mp_rank_00_optim_states.pt"),  # DynamicLossScaler, ZeRO-2
    ("z1_fp16_static", "zero_pp_rank_1_mp_rank_00_optim_states.pt"),  # static LossScaler, ZeRO-1
    ("z3_bf16_warmuplr", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"),  # ZeRO-3: ds_id tensors
    ("z3_fp16_overflow", "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
    ("z2_bf16_warmupcosine", "mp_rank_00_model_states.pt"),  # module with tied weights, scheduler
    ("z3_bf16_warmuplr", "zero_pp_rank_0_mp_rank_00_model_states.pt"),
]


def _streamed(store: LocalStore, key: str, tree: Any) -> Any:
    """``tree`` with each TensorRef replaced by a StoredTensor reading its bytes through the store;
    tensors over one storage region share one StoredTensor, as the reshard planner does."""
    copies: dict[tuple[Any, ...], StoredTensor] = {}

    def tensor(ref: TensorRef) -> StoredTensor:
        itemsize = torch_itemsize(ref.dtype) or 1
        contiguous = ref.stride == tuple(torch.empty(ref.shape).stride())
        assert contiguous or ref.numel <= 1, ref  # DeepSpeed saves contiguous tensors
        start = ref.storage.byte_offset + ref.storage_offset * itemsize
        end = start + ref.numel * itemsize
        found = (ref.storage.key, ref.storage_offset, ref.shape, ref.requires_grad)
        if found not in copies:
            copies[found] = StoredTensor(
                ref.dtype, ref.shape, lambda: [store.get(key, start, end)], ref.requires_grad
            )
        return copies[found]

    def walk(value: Any) -> Any:
        kind = type(value)
        if kind is TensorRef:
            return tensor(value)
        if kind in (dict, OrderedDict):
            return kind((k, walk(v)) for k, v in value.items())
        if kind in (list, tuple):
            return kind(walk(v) for v in value)
        if kind is VettedObject:
            return replace(value, state=walk(value.state))
        if kind is Opaque:
            return replace(value, args=tuple(walk(a) for a in value.args), state=walk(value.state))
        return value

    return walk(tree)


def assert_same_loaded(want: Any, got: Any, path: str = "$", regions: dict[Any, Any] | None = None) -> None:
    """Equal live objects: same types (DeepSpeed's included) and attributes, tensors bit for bit,
    and the same tensors aliasing one region of memory (a tie) in both. Where the original's
    tensors are views into one larger storage, ours own theirs: a StoredTensor starts at 0."""
    regions = {} if regions is None else regions
    assert type(want) is type(got), f"{path}: {type(want)} != {type(got)}"
    if isinstance(want, torch.Tensor):
        assert (want.dtype, want.shape, want.requires_grad) == (got.dtype, got.shape, got.requires_grad), path
        bits = [t.detach().contiguous().reshape(-1).view(torch.uint8) for t in (want, got)]
        assert torch.equal(*bits), path
        if want.numel():
            mine, theirs = (("region", t.data_ptr(), t.shape, t.stride()) for t in (want, got))
            assert regions.setdefault(mine, theirs) == theirs, f"{path}: a tie is lost"
            assert regions.setdefault(("ours", theirs), mine) == mine, f"{path}: a tie is made"
        assert_same_loaded(dict(vars(want)), dict(vars(got)), f"{path}.__dict__", regions)
    elif isinstance(want, dict):
        assert list(want) == list(got), path
        for k in want:
            assert_same_loaded(want[k], got[k], f"{path}[{k!r}]", regions)
    elif isinstance(want, (list, tuple)):
        assert len(want) == len(got), path
        for i, (a, b) in enumerate(zip(want, got, strict=True)):
            assert_same_loaded(a, b, f"{path}[{i}]", regions)
    elif isinstance(want, float) and math.isnan(want):
        assert math.isnan(got), path
    elif hasattr(want, "__dict__") and not isinstance(want, type) and not hasattr(want, "_value_"):
        assert_same_loaded(dict(vars(want)), dict(vars(got)), f"{path}.__dict__", regions)
    else:
        assert want == got, f"{path}: {want!r} != {got!r}"


def _compare_in_subprocess(pairs: list[tuple[Path, Path]]) -> list[str]:
    # torch.load(weights_only=False) runs a file's pickle: only ever in a subprocess.
    code = (
        "import json, sys, torch\n"
        "from ckptkit.safe import safe_globals\n"
        "from tests.test_pickle_writer import assert_same_loaded\n"
        "pairs = json.loads(sys.argv[1])\n"
        "classes = []\n"
        "for original, ours in pairs:\n"
        "    want = torch.load(original, weights_only=False)\n"
        "    assert_same_loaded(want, torch.load(ours, weights_only=False))\n"
        "    with safe_globals():\n"
        "        assert_same_loaded(want, torch.load(ours, weights_only=True))\n"
        "    scaler = want.get('optimizer_state_dict', {}).get('loss_scaler')\n"
        "    classes.append(type(scaler).__name__)\n"
        "print(json.dumps(classes))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "DS_ACCELERATOR": "cpu"}
    arg = json.dumps([[str(a), str(b)] for a, b in pairs])
    proc = subprocess.run(
        [sys.executable, "-c", code, arg], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.splitlines()[-1])


def test_deepspeed_rank_files_rewritten_load_as_the_originals(
    deepspeed_checkpoints: Any, tmp_path: Path
) -> None:
    pytest.importorskip("deepspeed")
    pairs = []
    for i, (case, name) in enumerate(DEEPSPEED_FILES):
        tag_dir = deepspeed_checkpoints[case].tag_dir
        store = LocalStore(tag_dir)
        original = read_torch_file(store, name)
        assert original.problems == []
        ours = tmp_path / f"{i}_{name}"
        ours.write_bytes(_written(_streamed(store, name, original.value)))
        # Read back symbolically: the same globals, nothing new for a scanner to flag.
        again = read_torch_file(LocalStore(tmp_path), ours.name)
        assert again.problems == []
        assert {g.ref for g in again.globals} == {g.ref for g in original.globals}, name
        pairs.append((tag_dir / name, ours))
    classes = _compare_in_subprocess(pairs)
    assert classes == [
        "DynamicLossScaler",
        "LossScaler",
        "LossScaler",
        "DynamicLossScaler",
        "NoneType",
        "NoneType",
    ]
