"""Hostile bytes never escape as anything but a CkptkitError, and never take unbounded memory.

Inputs: random bytes, and valid pickles of every protocol with bytes flipped, inserted, deleted
or cut off. Each run is measured with tracemalloc: the interpreter must stay far below the
memory a declared length or a memo fan-out could otherwise claim.
"""

from __future__ import annotations

import pickle
import tracemalloc
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckptkit.errors import CkptkitError
from ckptkit.pickle import Limits, load_symbolic, storage_ref_from_pid

MEMORY_CEILING = 64 * 2**20
# Small enough that each example runs in milliseconds, large enough that nothing real trips them.
LIMITS = Limits(max_memo=10_000, max_depth=100, max_stack=10_000, max_output_nodes=200_000, max_ops=200_000)
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

SAMPLES: list[Any] = [
    {"a": [1, 2.5, None, True], "b": (b"xy", "é", 2**70), "c": {1, 2}, "d": frozenset({"z"})},
    OrderedDict(weight=[0.5] * 20, bias=(1, 2)),
    Counter("abracadabra"),
    [bytearray(b"buf"), complex(1, 2), -7, 2**3000, {"nested": {"deeper": [[[]]]}}],
    ("state", {"step": 10, "lr": 1e-3, "betas": (0.9, 0.999)}),
]
# A torch-shaped pickle (protocol 2, persistent ids, rebuild calls) without torch.
TORCH_LIKE = (
    b"\x80\x02}q\x00X\x01\x00\x00\x00wq\x01ctorch._utils\n_rebuild_tensor_v2\nq\x02((X\x07\x00\x00\x00"
    b"storageq\x03ctorch\nFloatStorage\nq\x04X\x01\x00\x00\x000q\x05X\x03\x00\x00\x00cpuq\x06K\x06"
    b"tq\x07QK\x00K\x02K\x03\x86q\x08K\x03K\x01\x86q\t\x89ccollections\nOrderedDict\nq\n)Rq\x0btq\x0c"
    b"Rq\rs."
)
VALID = [pickle.dumps(v, protocol=p) for v in SAMPLES for p in range(6)] + [TORCH_LIKE]


def interpret(data: bytes, persistent_load: Callable[[Any], Any] | None) -> None:
    """Run the interpreter on ``data``; only a result or a CkptkitError may come out."""
    tracemalloc.start()
    try:
        load_symbolic(data, persistent_load=persistent_load, limits=LIMITS)
    except CkptkitError:
        pass
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < MEMORY_CEILING, peak


mutation = st.tuples(
    st.sampled_from(["flip", "insert", "delete", "truncate"]),
    st.integers(0, 2**16),
    st.binary(min_size=1, max_size=9),
)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(VALID)))
    for kind, where, payload in draw(st.lists(mutation, min_size=1, max_size=4)):
        at = where % (len(data) + 1)
        if kind == "flip" and data:
            data[at % len(data)] ^= payload[0] or 1
        elif kind == "insert":
            data[at:at] = payload
        elif kind == "delete":
            del data[at : at + len(payload)]
        else:
            del data[at:]
    return bytes(data)


persistent_loads = st.sampled_from([None, storage_ref_from_pid])


@FUZZ
@given(st.binary(max_size=512), persistent_loads)
def test_random_bytes(data: bytes, persistent_load: Callable[[Any], Any] | None) -> None:
    interpret(data, persistent_load)


@FUZZ
@given(mutated(), persistent_loads)
def test_mutated_pickles(data: bytes, persistent_load: Callable[[Any], Any] | None) -> None:
    interpret(data, persistent_load)


@FUZZ
@given(st.binary(max_size=64), st.sampled_from(VALID))
def test_valid_prefix_then_garbage(garbage: bytes, valid: bytes) -> None:
    # A well-formed pickle followed by anything: the pickle still parses, and stops at its STOP.
    result = load_symbolic(valid + garbage, persistent_load=storage_ref_from_pid, limits=LIMITS)
    assert result.size == len(valid)
