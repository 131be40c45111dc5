"""Property tests: any tree of the supported kinds survives write_native/read_native exactly."""

from __future__ import annotations

import tempfile
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ckptkit.native import read_native, write_native
from ckptkit.storage import Store, open_store
from tests.test_native_format import StoreSink, assert_exact, random_tensor

# Property tests: each saves and loads fifty random trees; test_native_format stays quick.
pytestmark = pytest.mark.slow

DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.float8_e4m3fn,
    torch.complex64,
    torch.complex128,
    torch.int8,
    torch.uint8,
    torch.int64,
    torch.uint16,
    torch.bool,
]

# Views that share the base's storage; the identity keeps the very same object.
VIEWS: list[Callable[[torch.Tensor], torch.Tensor]] = [
    lambda t: t,
    lambda t: t.t(),
    lambda t: t[:, ::2],
    lambda t: t[1:],
    lambda t: t.reshape(-1),
    lambda t: t.view(torch.uint8),
    lambda t: t.detach(),
]

SETTINGS = settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

hashables = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: st.tuples(inner, inner) | st.frozensets(inner, max_size=3),
    max_leaves=4,
)


@st.composite
def tensor_pools(draw: st.DrawFn) -> list[torch.Tensor]:
    pool = []
    for seed in range(draw(st.integers(1, 3))):
        shape = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
        pool.append(random_tensor(shape, draw(st.sampled_from(DTYPES)), seed))
    return pool


def leaves(pool: list[torch.Tensor]) -> st.SearchStrategy[Any]:
    views = st.builds(lambda base, view: view(base), st.sampled_from(pool), st.sampled_from(VIEWS))
    loners = st.sampled_from(DTYPES).flatmap(
        lambda dtype: st.sampled_from([(), (0,), (2, 0), (3,)]).map(
            lambda shape: random_tensor(shape, dtype, seed=len(shape))
        )
    )
    parameters = st.booleans().map(
        lambda grad: torch.nn.Parameter(random_tensor((2, 3), torch.float32), requires_grad=grad)
    )
    arrays = hnp.arrays(
        st.sampled_from([np.dtype(d) for d in ("<f8", ">i4", "<u2", "|b1", "<c8", "<M8[s]")]),
        hnp.array_shapes(min_dims=0, max_dims=2, max_side=3),
    )
    numpy_scalars = st.sampled_from([np.float64(1.5), np.uint32(7), np.float32("nan"), np.int8(-1)])
    rng_states = st.integers(0, 2**32 - 1).flatmap(
        lambda seed: st.sampled_from(
            [
                np.random.RandomState(seed).get_state(),
                np.random.default_rng(seed).bit_generator.state,
            ]
        )
    )
    return (
        hashables
        | st.floats()
        | st.complex_numbers(allow_nan=True, allow_infinity=True)
        | st.binary(max_size=8).map(bytearray)
        | views
        | loners
        | parameters
        | arrays
        | numpy_scalars
        | rng_states
        | st.sampled_from([torch.Size([2, 0]), torch.bfloat16, torch.device("cpu")])
    )


def trees(pool: list[torch.Tensor]) -> st.SearchStrategy[Any]:
    return st.recursive(
        leaves(pool),
        lambda inner: (
            st.lists(inner, max_size=4)
            | st.lists(inner, max_size=3).map(tuple)
            | st.dictionaries(hashables, inner, max_size=4)
            | st.dictionaries(st.text(max_size=6), inner, max_size=4).map(OrderedDict)
            | st.sets(hashables, max_size=3)
        ),
        max_leaves=12,
    )


def tensors_in(tree: Any) -> Iterator[torch.Tensor]:
    """Every tensor in the tree, in a fixed walk order (sets hold no tensors)."""
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, dict):
        for value in tree.values():
            yield from tensors_in(value)
    elif isinstance(tree, (list, tuple)):
        for item in tree:
            yield from tensors_in(item)


def assert_same_sharing(expected: Any, actual: Any) -> None:
    """Loaded tensors are the same objects, and share storage, exactly where the saved ones did."""
    originals, loaded = list(tensors_in(expected)), list(tensors_in(actual))
    assert len(originals) == len(loaded)
    pairs = list(zip(originals, loaded, strict=True))
    for i, (orig_a, load_a) in enumerate(pairs):
        for orig_b, load_b in pairs[i + 1 :]:
            assert (orig_a is orig_b) == (load_a is load_b)
            if orig_a.numel() and orig_b.numel():
                shared = orig_a.untyped_storage().data_ptr() == orig_b.untyped_storage().data_ptr()
                loaded_shared = load_a.untyped_storage().data_ptr() == load_b.untyped_storage().data_ptr()
                assert shared == loaded_shared


def memory_store() -> Store:
    return open_store(f"memory://native-prop-{uuid.uuid4().hex[:12]}/ckpt")


@SETTINGS
@given(data=st.data(), max_shard_size=st.integers(1, 4096), jobs=st.integers(1, 4), mmap=st.booleans())
def test_any_tree_round_trips_exactly(
    data: st.DataObject, max_shard_size: int, jobs: int, mmap: bool
) -> None:
    state = data.draw(trees(data.draw(tensor_pools())), label="state")
    with tempfile.TemporaryDirectory() as directory:
        for store in (open_store(directory), memory_store()):
            write_native(state, StoreSink(store), max_shard_size=max_shard_size, jobs=jobs)
            loaded = read_native(store, mmap=mmap)
            assert_exact(state, loaded)
            assert_same_sharing(state, loaded)
            store.delete_prefix("")


@SETTINGS
@given(data=st.data())
def test_keys_load_exactly_the_chosen_subtrees(data: st.DataObject) -> None:
    pool = data.draw(tensor_pools())
    state = data.draw(st.dictionaries(st.text(max_size=6), trees(pool), min_size=1, max_size=5))
    chosen = data.draw(st.lists(st.sampled_from(list(state)), unique=True))
    store = memory_store()
    write_native(state, StoreSink(store), max_shard_size=256)
    loaded = read_native(store, keys=chosen)
    expected = {key: value for key, value in state.items() if key in chosen}
    assert_exact(expected, loaded)
    assert_same_sharing(expected, loaded)
    store.delete_prefix("")
