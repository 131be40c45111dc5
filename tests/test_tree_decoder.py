"""One decoder of ``tree.json`` for ``ckptkit.load`` and for ``inspect``.

``inspect`` describes a native checkpoint without torch (tensors as ``TensorRef``, numpy values
as ``NdArray``), ``ckptkit.load`` builds it; both walk the tree with
:mod:`ckptkit.native.decode`, so they read the same values and refuse the same damage with the
same message.
"""

from __future__ import annotations

import json
import math
import random
import struct
import subprocess
import sys
import tempfile
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import ckptkit
from ckptkit.errors import FormatError
from ckptkit.ops.inspect import inspect_path
from ckptkit.ops.inspect.native import read_native_tree
from ckptkit.ops.inspect.source import Source
from ckptkit.pickle import GlobalRef, NdArray, TensorRef, TorchSize, VettedObject
from ckptkit.storage import open_store
from tests.test_native_roundtrip_hypothesis import SETTINGS, hashables, leaves, tensor_pools

REPO = Path(__file__).resolve().parent.parent


def _inspected(directory: Path) -> Any:
    """The state as ``inspect`` reads it."""
    return read_native_tree(Source(open_store(directory)))


def _edit_tree(directory: Path, edit: Any) -> None:
    tree = directory / "tree.json"
    document = json.loads(tree.read_text())
    edit(document)
    tree.write_text(json.dumps(document))


def _saved(tmp_path: Path, state: Any) -> Path:
    directory = tmp_path / "ckpt"
    ckptkit.save(state, directory)
    return directory


# --- values the inspect copy got wrong ----------------------------------------------------------


def test_a_counter_is_read_as_the_same_counter(tmp_path: Path) -> None:
    """Before, inspect built the Counter from the pairs: Counter({(('a', 3), 1): 1})."""
    counts = Counter({("a", 3): 1, "b": 2})
    directory = _saved(tmp_path, {"c": counts})
    for state in (_inspected(directory), ckptkit.load(directory)):
        assert type(state["c"]) is Counter and state["c"] == counts


def test_a_bytearray_is_read_as_a_bytearray(tmp_path: Path) -> None:
    directory = _saved(tmp_path, {"b": bytearray(b"\x00\xff"), "y": b"\x01"})
    for state in (_inspected(directory), ckptkit.load(directory)):
        assert type(state["b"]) is bytearray and state["b"] == bytearray(b"\x00\xff")
        assert type(state["y"]) is bytes and state["y"] == b"\x01"


def test_numpy_rng_fingerprint_is_that_of_the_pickled_state(tmp_path: Path) -> None:
    """Before, inspect described an inline array with no bytes, so every numpy RNG key of a
    native checkpoint had the fingerprint of ``b""``."""
    rng = {"python": random.Random(1).getstate(), "numpy": np.random.RandomState(7).get_state()}
    torch.save(rng, tmp_path / "rng_state.pth")
    directory = _saved(tmp_path, rng)
    fingerprints = [
        inspect_path(path, ["rng"]).rng[0].details["numpy"]["fingerprint"]
        for path in (tmp_path / "rng_state.pth", directory)
    ]
    assert fingerprints[0] == fingerprints[1]
    assert _inspected(directory)["numpy"][1].data == rng["numpy"][1].tobytes()


def test_a_future_format_version_is_refused_by_inspect_too(tmp_path: Path) -> None:
    directory = _saved(tmp_path, {"n": 1})
    _edit_tree(directory, lambda d: d.update(version=3))
    for read in (_inspected, ckptkit.load):
        with pytest.raises(FormatError, match="format version 3"):
            read(directory)


# --- damage: refused alike, with one message -----------------------------------------------------

BAD_NODES = {
    "negative-index": ({"t": "tensor", "i": -1}, "reference to tensor -1"),
    "bool-index": ({"t": "tensor", "i": True}, "'tensor' node needs a int"),
    "index-past-table": ({"t": "tensor", "i": 7}, "reference to tensor 7"),
    "float-as-number": ({"t": "float", "v": 1.5}, "expected a float"),
    "short-nan-payload": ({"t": "float", "v": "nan:1"}, "bad float 'nan:1'"),
    "signed-nan-payload": ({"t": "float", "v": "nan:-123456789abcdef"}, "bad float"),
    "complex-of-strings": ({"t": "complex", "v": ["1", "2"]}, "expected a float"),
    "size-of-strings": ({"t": "size", "v": ["a"]}, "'size' node needs a list of ints"),
    "unknown-dtype": ({"t": "dtype", "v": "float99"}, "unknown torch dtype 'float99'"),
    "device-without-name": ({"t": "device"}, "'device' node needs a str"),
    "bytes-not-base64": ({"t": "bytes", "v": "!!"}, "malformed 'bytes' node"),
    "pair-of-one": ({"t": "dict", "v": [[1]]}, "malformed 'dict' node"),
    "unknown-tag": ({"t": "pickle"}, "unknown node type 'pickle'"),
    "scalar-too-short": ({"t": "npscalar", "dtype": "<u4", "hex": "01"}, "numpy scalar of <u4 with 1 bytes"),
    "array-negative-shape": ({"t": "ndarray", "dtype": "<f8", "shape": [-1], "b64": ""}, "bad ndarray shape"),
    "array-too-short": ({"t": "ndarray", "dtype": "<f8", "shape": [2], "b64": "AAAA"}, "need 16"),
    "array-of-objects": ({"t": "ndarray", "dtype": "|O", "shape": [], "b64": ""}, "unsupported numpy dtype"),
}


def _refusals(directory: Path) -> list[str]:
    messages = []
    for read in (_inspected, ckptkit.load):
        with pytest.raises(FormatError) as caught:
            read(directory)
        messages.append(str(caught.value))
    return messages


@pytest.mark.parametrize(("node", "message"), BAD_NODES.values(), ids=BAD_NODES.keys())
def test_a_damaged_node_is_refused_alike(tmp_path: Path, node: Any, message: str) -> None:
    directory = _saved(tmp_path, {"w": torch.ones(2), "x": 1})
    _edit_tree(directory, lambda d: d["tree"].update(x=node))
    inspected, loaded = _refusals(directory)
    assert inspected == loaded and message in loaded, (inspected, loaded)


BAD_RECORDS = {
    "unknown-dtype": (lambda r, d: r.update(dtype="float99"), "unknown torch dtype 'float99'"),
    "no-device": (lambda r, d: r.pop("device"), "malformed tensor record"),
    "negative-dim": (lambda r, d: r.update(shape=[-2]), "malformed tensor record"),
    "stride-rank": (lambda r, d: r.update(stride=[1, 1]), "malformed tensor record"),
    "misaligned": (lambda r, d: r.update(offset=2), "malformed tensor record"),
    "no-entry": (lambda r, d: d["entries"].clear(), "refers to entry 'w', which its entry table lacks"),
    "bad-shard": (lambda r, d: d["entries"]["w"].update(shard=4), "names shard 4, which does not exist"),
    "bytes-without-entry": (lambda r, d: r.update(entry=None), "has 2 elements but no stored bytes"),
}


@pytest.mark.parametrize(("edit", "message"), BAD_RECORDS.values(), ids=BAD_RECORDS.keys())
def test_a_damaged_tensor_record_is_refused_alike(tmp_path: Path, edit: Any, message: str) -> None:
    directory = _saved(tmp_path, {"w": torch.ones(2)})
    _edit_tree(directory, lambda d: edit(d["tensors"][0], d))
    inspected, loaded = _refusals(directory)
    assert inspected == loaded and message in loaded, (inspected, loaded)


# --- any saved tree: inspect describes what load builds -----------------------------------------


def _float(value: float) -> tuple[str, int]:
    return ("float", struct.unpack("<Q", struct.pack("<d", value))[0])  # NaN payloads too


def _tensor(dtype: str, shape: Any, stride: Any, offset: int, grad: bool, parameter: bool) -> tuple[Any, ...]:
    return ("tensor", dtype, tuple(shape), tuple(stride), offset, grad, parameter)


def describe(value: Any) -> Any:
    """A comparable description of a value from either reader: built (torch, numpy) or
    described (``TensorRef``, ``NdArray``...)."""
    kind = type(value)
    if kind in (torch.Tensor, torch.nn.Parameter):
        dtype = str(value.dtype).removeprefix("torch.")
        grad, parameter = value.requires_grad, kind is not torch.Tensor
        return _tensor(dtype, value.shape, value.stride(), value.storage_offset(), grad, parameter)
    if kind is TensorRef:
        grad, parameter = value.requires_grad, value.is_parameter
        return _tensor(value.dtype, value.shape, value.stride, value.storage_offset, grad, parameter)
    if kind is np.ndarray:
        order = "F" if value.ndim > 1 and value.flags.f_contiguous and not value.flags.c_contiguous else "C"
        return ("ndarray", value.dtype.str, value.shape, value.tobytes(order=order), order == "F")
    if isinstance(value, np.generic):
        return ("npscalar", value.dtype.str, value.tobytes())
    if kind is NdArray:
        if value.is_scalar:
            return ("npscalar", value.dtype, value.data)
        return ("ndarray", value.dtype, value.shape, value.data, value.fortran_order)
    return _describe_plain(value)


def _describe_plain(value: Any) -> Any:
    kind = type(value)
    if kind in (torch.Size, TorchSize):
        return ("size", tuple(value))
    if kind is torch.dtype or (kind is GlobalRef and value.module == "torch"):
        return ("dtype", str(value).removeprefix("torch.") if kind is torch.dtype else value.name)
    if kind is torch.device or kind is VettedObject:
        return ("device", str(value) if kind is torch.device else value.args[0])
    if kind is float:
        return _float(value)
    if kind is complex:
        return ("complex", _float(value.real), _float(value.imag))
    if kind in (list, tuple):
        return (kind.__name__, tuple(describe(item) for item in value))
    if kind in (set, frozenset):
        return (kind.__name__, frozenset(describe(item) for item in value))
    if kind in (dict, OrderedDict, Counter):
        return (kind.__name__, tuple((describe(k), describe(v)) for k, v in value.items()))
    assert kind in (type(None), bool, int, str, bytes, bytearray), kind
    return (kind.__name__, bytes(value) if kind is bytearray else value)


def _leaves(value: Any) -> list[Any]:
    """Tensor leaves, in walk order (sets and keys hold none)."""
    if type(value) in (torch.Tensor, torch.nn.Parameter, TensorRef):
        return [value]
    if isinstance(value, dict):
        return [leaf for item in value.values() for leaf in _leaves(item)]
    if type(value) in (list, tuple):
        return [leaf for item in value for leaf in _leaves(item)]
    return []


def _sharing(tensors: list[Any], same_storage: Any) -> list[tuple[bool, bool]]:
    """Which pairs are one object, and which pairs of non-empty tensors share storage."""
    full = [math.prod(describe(t)[2]) > 0 for t in tensors]
    return [
        (a is b, full[i] and full[j] and same_storage(a, b))
        for i, a in enumerate(tensors)
        for j, b in enumerate(tensors[i + 1 :], i + 1)
    ]


def states(pool: list[torch.Tensor]) -> st.SearchStrategy[Any]:
    """The round-trip strategy's trees, plus counters, big ints and nested tuple keys."""
    extra = (
        st.dictionaries(hashables, st.integers(), max_size=3).map(Counter)
        | st.integers(min_value=2**53 - 2, max_value=2**70)
        | st.integers(max_value=-(2**53) + 2, min_value=-(2**70))
        | st.dictionaries(st.tuples(hashables, st.tuples(hashables)), st.integers(), max_size=3)
    )
    return st.recursive(
        leaves(pool) | extra,
        lambda inner: (
            st.lists(inner, max_size=4)
            | st.lists(inner, max_size=3).map(tuple)
            | st.dictionaries(hashables, inner, max_size=4)
            | st.dictionaries(st.text(max_size=6), inner, max_size=4).map(OrderedDict)
            | st.sets(hashables, max_size=3)
            | st.frozensets(hashables, max_size=3)
        ),
        max_leaves=12,
    )


@SETTINGS
@given(data=st.data())
def test_inspect_describes_what_load_builds(data: st.DataObject) -> None:
    state = data.draw(states(data.draw(tensor_pools())), label="state")
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "ckpt"
        ckptkit.save(state, directory, max_shard_size=data.draw(st.integers(1, 4096)))
        described, loaded = _inspected(directory), ckptkit.load(directory, mmap=False)
    assert describe(described) == describe(loaded)
    # Offsets are relative to the storage each reader holds: the entry for both, unmapped.
    shared_loaded = _sharing(
        _leaves(loaded), lambda a, b: a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    )
    shared_described = _sharing(_leaves(described), lambda a, b: a.storage.key == b.storage.key)
    assert shared_described == shared_loaded


# --- torch stays out --------------------------------------------------------------------------


def test_decoding_and_inspecting_native_imports_no_torch(tmp_path: Path) -> None:
    state = {"model": {"fc.weight": torch.ones(2, 3), "fc.bias": torch.ones(2)}, "n": np.float32(1.0)}
    directory = _saved(tmp_path, state)
    code = (
        "import sys\n"
        "import ckptkit.native.decode, ckptkit.native.document\n"
        "from ckptkit.ops.inspect import inspect_path\n"
        f"report = inspect_path({str(directory)!r})\n"
        "assert report.ok and [m.num_parameters for m in report.models] == [8], report\n"
        "print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
