"""The symbolic pickle interpreter: plain values, every opcode, torch/numpy/DeepSpeed, limits."""

from __future__ import annotations

import dataclasses
import enum
import io
import math
import pickle
import pickletools
import random
import struct
import subprocess
import sys
import types
import zipfile
from collections import Counter, OrderedDict, defaultdict
from typing import Any

import numpy as np
import pytest
import torch

from ckptkit.errors import FormatError
from ckptkit.pickle import (
    CALL,
    PERSISTENT_ID,
    GlobalRef,
    Limits,
    NdArray,
    Opaque,
    PickleFormatError,
    TensorRef,
    TorchSize,
    VettedObject,
    classify,
    load_symbolic,
    storage_ref_from_pid,
)
from ckptkit.pickle.torch_refs import STORAGE_DTYPES, TORCH_DTYPES
from ckptkit.pickle.values import NodeKey

REFUSED_OPCODES = {"EXT1", "EXT2", "EXT4", "NEXT_BUFFER", "READONLY_BUFFER"}


def same(a: Any, b: Any) -> bool:
    """Equality that also demands equal types all the way down, and treats NaN as equal to NaN."""
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    return a == b


def values() -> list[Any]:
    shared = [1, "shared"]
    return [
        None,
        True,
        False,
        *[0, 1, -1, 255, 256, 65535, 65536, 2**31 - 1, -(2**31), 2**31, 2**63, -(2**64)],
        2**3000,  # LONG4 in protocol >= 2
        -(2**3000),
        *[0.0, -0.0, 1.5, 1e308, 5e-324, float("inf"), float("-inf"), float("nan")],
        *["", "a", "é", "\U0001f600", "x" * 300, "line\nbreak\\", "\udcff"],
        *[b"", b"\x00\xff", b"x" * 300, bytearray(), bytearray(b"ab\xff")],
        *[(), (1,), (1, 2), (1, 2, 3), (1, 2, 3, 4)],
        *[[], [1, [2, [3, [4]]]], list(range(2500))],  # > 1000 items: APPENDS batches
        {},
        {"a": 1, 2: "b", (1, 2): [3], None: None, 1.5: b"x", frozenset({1}): 0},
        {i: str(i) for i in range(1500)},
        *[set(), {1, "a", (2, 3)}, set(range(1200)), frozenset(), frozenset({1, frozenset({2})})],
        OrderedDict([("a", 1), ("b", [2])]),
        Counter("hello world"),
        complex(1, -2),
        slice(1, 10, 2),
        {"nested": {"deep": [{"x": (1, [2, {3: 4}])}]}},
        [shared, shared, (shared,)],
        [*[f"s{i}" for i in range(300)], shared, shared],  # memo keys > 255: LONG_BINGET
        [float("nan"), {"k": float("nan")}],
    ]


@pytest.mark.parametrize("protocol", range(6))
def test_plain_values_round_trip(protocol: int) -> None:
    for value in values():
        data = pickle.dumps(value, protocol=protocol)
        result = load_symbolic(data)
        assert same(result.value, value), (protocol, value)
        assert result.size == len(data)
        assert result.protocol == (protocol if protocol >= 2 else None)
        assert all(use.classification == "vetted" for use in result.globals), result.globals


@pytest.mark.parametrize("protocol", range(6))
def test_defaultdict_reads_as_plain_dict(protocol: int) -> None:
    result = load_symbolic(pickle.dumps(defaultdict(list, a=[1]), protocol=protocol))
    assert same(result.value, {"a": [1]})


@pytest.mark.parametrize("protocol", range(6))
def test_shared_and_recursive_structures_keep_identity(protocol: int) -> None:
    shared = [1]
    got = load_symbolic(pickle.dumps([shared, shared], protocol=protocol)).value
    assert got[0] is got[1]

    loop: list[Any] = []
    loop.append(loop)
    got = load_symbolic(pickle.dumps(loop, protocol=protocol)).value
    assert got[0] is got

    d: dict[str, Any] = {}
    d["self"] = d
    got = load_symbolic(pickle.dumps(d, protocol=protocol)).value
    assert got["self"] is got

    inner: list[Any] = []
    outer = (inner,)
    inner.append(outer)  # a tuple inside its own item: protocols 0/1 emit POP / POP_MARK here
    got = load_symbolic(pickle.dumps(outer, protocol=protocol)).value
    assert type(got) is tuple and got[0][0] is got


# Pickles stdlib's pickler never writes, crafted for the opcodes only they use.
CRAFTED: list[tuple[str, bytes, Any]] = [
    ("STRING", b"S'abc'\np0\n.", "abc"),
    ("STRING escapes", b"S'a\\x00\\n'\n.", "a\x00\n"),
    ("BINSTRING", b"T\x03\x00\x00\x00abc.", "abc"),
    ("SHORT_BINSTRING", b"U\x02\xc3\xa9.", b"\xc3\xa9"),
    ("UNICODE", b"Vcaf\\u00e9\n.", "café"),
    ("INT bools", b"(I01\nI00\nI-7\nt.", (True, False, -7)),
    ("LONG", b"L123456789012345678901234567890L\n.", 123456789012345678901234567890),
    ("FLOAT", b"F-2.5\n.", -2.5),
    ("PUT GET", b"(lp3\nI1\nag3\n\x86.", ([1], [1])),
    ("DUP", b"]2a.", "recursive-list"),
    ("POP", b"K\x01K\x020.", 1),
    ("POP_MARK", b"K\x05(K\x01K\x021.", 5),
    ("POP of an empty mark", b"K\x05(0.", 5),
    ("LONG4", b"\x80\x02\x8b\x02\x00\x00\x00\xff\x7f.", 0x7FFF),
    ("BINUNICODE8", b"\x8d\x02\x00\x00\x00\x00\x00\x00\x00hi.", "hi"),
    ("BINBYTES8", b"\x8e\x02\x00\x00\x00\x00\x00\x00\x00hi.", b"hi"),
    ("BYTEARRAY8", b"\x96\x02\x00\x00\x00\x00\x00\x00\x00hi.", bytearray(b"hi")),
    ("LIST DICT", b"(I1\nI2\nl(S'k'\nI3\nd\x86.", ([1, 2], {"k": 3})),
    ("FRAME", b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00K\x07\x94h\x00\x86.", (7, 7)),
    ("PERSID without persistent_load", b"Pkey0\n.", Opaque(PERSISTENT_ID, "reduce", ("key0",))),
    ("BINPERSID without persistent_load", b"K\x05Q.", Opaque(PERSISTENT_ID, "reduce", (5,))),
    (
        "INST with arguments",
        b"(I1\nimymod\nThing\n.",
        Opaque(GlobalRef("mymod", "Thing"), "inst", (1,)),
    ),
    (
        "OBJ then BUILD",
        b"(cmymod\nThing\nI1\no}S'a'\nI2\nsb.",
        Opaque(GlobalRef("mymod", "Thing"), "inst", (1,), state={"a": 2}),
    ),
    (
        "NEWOBJ_EX",
        b"\x80\x04\x8c\x05mymod\x8c\x05Thing\x93K\x01\x85}\x8c\x01k\x94K\x02s\x92.",
        Opaque(GlobalRef("mymod", "Thing"), "newobj", (1,), {"k": 2}),
    ),
    (
        "copyreg.__newobj__",
        b"\x80\x02ccopyreg\n__newobj__\ncmymod\nThing\nK\x01\x86R.",
        Opaque(GlobalRef("mymod", "Thing"), "newobj", (1,)),
    ),
    (
        "APPEND onto an unknown list subclass",
        b"\x80\x02cmymod\nL\n)\x81K\x01a.",
        Opaque(GlobalRef("mymod", "L"), "newobj", items=[1]),
    ),
    (
        "SETITEMS and ADDITEMS onto unknown objects",
        b"\x80\x04\x8c\x05mymod\x8c\x01D\x93)\x81(]K\x01u\x8c\x05mymod\x8c\x01S\x93)\x81(K\x02\x90\x86.",
        "unknown-mappings",
    ),
    (
        "BUILD on a bare global",
        b"cmymod\nf\n}b.",
        Opaque(GlobalRef("mymod", "f"), "global", state={}),
    ),
    (
        "a call of a call's result",
        b"cmymod\nf\n)R)R.",
        Opaque(CALL, "reduce", (Opaque(GlobalRef("mymod", "f"), "reduce"), ())),
    ),
]


@pytest.mark.parametrize(("name", "data", "expected"), CRAFTED, ids=[c[0] for c in CRAFTED])
def test_crafted_opcodes(name: str, data: bytes, expected: Any) -> None:
    value = load_symbolic(data).value
    if expected == "recursive-list":
        assert type(value) is list and value[0] is value
    elif expected == "unknown-mappings":
        mapping, setlike = value
        assert mapping.setitems == [([], 1)]  # an Opaque records items without hashing them
        assert setlike.items == [2]
    else:
        assert same(value, expected)


def test_persistent_ids_go_to_persistent_load() -> None:
    seen: list[Any] = []

    def persistent_load(pid: Any) -> Any:
        seen.append(pid)
        return ("resolved", pid)

    assert load_symbolic(b"(Pkey0\nK\x05Qt.", persistent_load=persistent_load).value == (
        ("resolved", "key0"),
        ("resolved", 5),
    )
    assert seen == ["key0", 5]


def test_errors_from_persistent_load() -> None:
    with pytest.raises(PickleFormatError, match="not a torch storage id") as info:
        load_symbolic(b"K\x05Q.", persistent_load=storage_ref_from_pid)
    assert info.value.offset == 2

    def broken(pid: Any) -> Any:
        raise KeyError(pid)

    with pytest.raises(KeyError):  # a caller's bug is not reported as bad input
        load_symbolic(b"K\x05Q.", persistent_load=broken)


def corpus() -> list[bytes]:
    """Every pickle these tests interpret (minus torch files), for the opcode coverage check."""
    dumps = [pickle.dumps(v, protocol=p) for p in range(6) for v in values()]
    loop: list[Any] = []
    loop.append((loop,))
    dumps += [pickle.dumps(loop, protocol=p) for p in range(6)]
    dumps += [pickle.dumps(defaultdict(list, a=[1]), protocol=p) for p in range(6)]
    return dumps + [data for _, data, _ in CRAFTED]


def test_every_opcode_is_exercised() -> None:
    seen = {op.name for data in corpus() for op, _, _ in pickletools.genops(data)}
    missing = {op.name for op in pickletools.opcodes} - REFUSED_OPCODES - seen
    assert not missing


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x82\x01.", "extension registry"),
        (b"\x83\x01\x00.", "extension registry"),
        (b"\x84\x01\x00\x00\x00.", "extension registry"),
        (b"\x80\x05\x97.", "out-of-band buffers"),
        (b"\x80\x05\x98.", "out-of-band buffers"),
    ],
)
def test_refused_opcodes(data: bytes, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        load_symbolic(data)


@pytest.mark.parametrize(
    ("data", "offset", "message"),
    [
        (b"", 0, "no pickle"),
        (b"\x80\x02", 2, "truncated"),
        (b"X\x05\x00\x00\x00ab", 0, "runs past the end"),
        (b"\xff.", 0, "unknown opcode 0xff"),
        (b"\x80\x06.", 0, "unsupported protocol"),
        (b".", 0, "underflow"),
        (b"(.", 1, "underflow"),  # STOP may not reach below a MARK
        (b"K\x01(a.", 3, "underflow"),
        (b"t.", 0, "no MARK"),
        (b"h\x07.", 0, "memo key 7"),
        (b"p1\n.", 0, "underflow"),
        (b"N\x85p-1\n.", 2, "negative PUT"),
        (b"]K\x01K\x02s.", 5, "SETITEM onto list"),
        (b"](K\x01K\x02u.", 6, "SETITEM onto list"),
        (b"}(K\x01u.", 4, "odd number"),
        (b"K\x01K\x02a.", 4, "APPEND onto int"),
        (b"K\x01(K\x02\x90.", 5, "ADDITEMS onto int"),
        (b"}]\x85K\x01s.", 5, "unhashable"),  # a tuple holding a list
        (b"}(]K\x01u.", 5, "unhashable"),
        (b"\x8f(]\x90.", 3, "unhashable"),
        (b"(]\x91.", 2, "unhashable"),
        (b"K\x01K\x02\x93.", 4, "STACK_GLOBAL needs two str"),
        (b"C\x01mC\x01n\x93.", 6, "STACK_GLOBAL needs two str"),
        (b"K\x01)R.", 3, "int is not callable"),
        (b"cm\nf\nK\x01R.", 7, "must be a tuple"),
        (b"K\x01)\x81.", 3, "not a class"),
        (b"K\x01}b.", 3, "BUILD on int"),
        (b"cm\nf\n)R}b}b.", 10, "BUILD applied twice"),
        (b"S'abc\n.", 0, "quoted"),
        (b"Iabc\n.", 0, "bad literal"),
        (b"X\x02\x00\x00\x00\xff\xfe.", 0, "bad literal"),
        (b"\x8b\xff\xff\xff\xff.", 0, "negative LONG4"),
        (b"T\xff\xff\xff\xff.", 0, "negative BINSTRING"),
        (b"(o.", 1, "OBJ without a class"),
        (b"Vabc", 0, "no newline"),
        (b"L" + b"9" * 5000 + b"\n.", 0, "integer literal of 5000 characters"),
    ],
)
def test_malformed_input_is_a_format_error_with_offset(data: bytes, offset: int, message: str) -> None:
    with pytest.raises(PickleFormatError, match=message) as info:
        load_symbolic(data, pickle_name="archive/data.pkl")
    assert info.value.offset == offset
    assert str(info.value).startswith(f"archive/data.pkl at byte {offset}")


def test_a_failed_parse_still_lists_its_globals() -> None:
    with pytest.raises(PickleFormatError) as info:
        load_symbolic(b"cos\nsystem\n(S'echo'\ntR\xff")  # payload, then deliberate corruption
    assert [(str(u.ref), u.classification) for u in info.value.globals] == [("os.system", "dangerous")]


def test_state_dict_metadata_becomes_attributes_and_nothing_else_may() -> None:
    result = load_symbolic(b"\x80\x02ccollections\nOrderedDict\n)R}X\t\x00\x00\x00_metadata}sb.")
    assert type(result.value) is OrderedDict and result.value._metadata == {}
    for name in (b"items", b"__class__", b"not an identifier"):
        data = b"\x80\x02ccollections\nOrderedDict\n)R}X%s%sNsb." % (struct.pack("<I", len(name)), name)
        with pytest.raises(FormatError, match="may not set attribute"):
            load_symbolic(data)


def test_stacked_pickles_and_offsets() -> None:
    first, second = pickle.dumps({"a": 1}, 2), pickle.dumps([cm_global := 2], 4)
    data = memoryview(b"junk" + first + second + b"trailing")
    one = load_symbolic(data, start=4)
    two = load_symbolic(data, start=4 + one.size)
    assert (one.value, two.value, one.size, two.size) == ({"a": 1}, [cm_global], len(first), len(second))
    gadget = load_symbolic(memoryview(b"xx" + b"cmymod\nf\n."), start=2)
    assert gadget.globals[0].offset == 2  # offsets are positions in the data passed in


# --- globals: names, remapping, classification ----------------------------------------------


def test_python2_names_are_remapped_like_fix_imports() -> None:
    protocol0 = load_symbolic(b"c__builtin__\neval\n(S'1+1'\ntR.")
    assert protocol0.value == Opaque(GlobalRef("builtins", "eval"), "reduce", ("1+1",))
    assert [(str(u.ref), u.classification, u.offset) for u in protocol0.globals] == [
        ("builtins.eval", "dangerous", 0)
    ]
    protocol2 = load_symbolic(b"\x80\x02ccommands\ngetoutput\nX\x02\x00\x00\x00id\x85R.")
    assert protocol2.globals[0].ref == GlobalRef("subprocess", "getoutput")
    assert protocol2.globals[0].classification == "dangerous"
    # Protocol 3+ is not remapped (CPython would fail to import __builtin__), still dangerous.
    protocol3 = load_symbolic(b"\x80\x03c__builtin__\neval\n.")
    assert protocol3.value == GlobalRef("__builtin__", "eval")
    assert protocol3.globals[0].classification == "dangerous"


def test_python3_pickler_output_for_a_reducer_is_recognised() -> None:
    class Payload:
        def __reduce__(self) -> tuple[Any, ...]:
            return (eval, ("__import__('os').system('false')",))

    for protocol in range(6):
        result = load_symbolic(pickle.dumps(Payload(), protocol=protocol))
        assert result.value.cls == GlobalRef("builtins", "eval")
        assert [u.classification for u in result.globals] == ["dangerous"]


def test_nothing_named_in_a_pickle_is_imported_or_run(tmp_path: Any) -> None:
    marker = tmp_path / "pwned"
    payloads = [
        b"cos\nsystem\n(S'touch %s'\ntR." % str(marker).encode(),
        b"\x80\x04\x8c\x02os\x94\x8c\x06system\x94\x93X\x05\x00\x00\x00touch\x85R.",
        b"(S'touch %s'\nios\nsystem\n." % str(marker).encode(),
        b"cckptkit_never_imported\nthing\n)R.",
    ]
    for data in payloads:
        load_symbolic(data)
    assert not marker.exists()
    assert "ckptkit_never_imported" not in sys.modules


def test_stack_global_operands_resolve_by_real_stack_semantics() -> None:
    from_memo = b"\x80\x04\x8c\x02os\x94\x8c\x06system\x94h\x00h\x01\x93."
    from_strings = b"\x80\x04S'os'\nU\x06system\x93."
    dup = b"\x80\x04\x8c\x04evil2\x93."
    assert load_symbolic(from_memo).value == GlobalRef("os", "system")
    assert load_symbolic(from_strings).value == GlobalRef("os", "system")
    assert load_symbolic(dup).value == GlobalRef("evil", "evil")
    with pytest.raises(FormatError, match="STACK_GLOBAL"):
        load_symbolic(b"\x80\x04K\x07\x94h\x00h\x00\x93.")  # an int laundered through the memo
    with pytest.raises(FormatError, match="memo key 9"):
        load_symbolic(b"\x80\x04h\x09\x8c\x01x\x93.")


@pytest.mark.parametrize(
    ("qualname", "expected"),
    [
        ("torch._utils._rebuild_tensor_v2", "tensor-rebuild"),
        ("torch._utils._rebuild_qtensor", "tensor-rebuild"),
        ("torch.nn.parameter.Parameter", "tensor-rebuild"),
        ("torch.FloatStorage", "vetted"),
        ("torch.storage.UntypedStorage", "vetted"),
        ("torch.bfloat16", "vetted"),
        ("collections.OrderedDict", "vetted"),
        ("_codecs.encode", "vetted"),
        ("numpy.dtypes.UInt32DType", "vetted"),
        ("numpy._core.multiarray._reconstruct", "vetted"),
        ("deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler", "vetted"),
        ("builtins.eval", "dangerous"),
        ("builtins.getattr", "dangerous"),
        ("os.system", "dangerous"),
        ("posix.system", "dangerous"),
        ("os.path.join", "dangerous"),
        ("subprocess.Popen", "dangerous"),
        ("importlib.import_module", "dangerous"),
        ("functools.partial", "dangerous"),
        ("operator.attrgetter", "dangerous"),
        ("torch.load", "dangerous"),
        ("torch.storage._load_from_bytes", "dangerous"),
        ("torch.jit._script.RecursiveScriptModule", "dangerous"),
        ("torch.utils.collect_env.run", "dangerous"),
        ("numpy.testing._private.utils.runstring", "dangerous"),
        ("asyncio.unix_events._UnixSubprocessTransport", "dangerous"),
        ("types.CodeType", "dangerous"),
        ("_io.FileIO", "dangerous"),
        ("uuid._get_command_stdout", "dangerous"),
        ("pathlib.os.system", "dangerous"),  # module "pathlib", dotted name "os.system"
        ("numpy.__builtins__", "dangerous"),
        ("torch.nn.modules.linear.Linear", "unknown"),
        ("transformers.training_args.TrainingArguments", "unknown"),
        ("uuid.UUID", "unknown"),
        ("io.BytesIO", "unknown"),
    ],
)
def test_classify(qualname: str, expected: str) -> None:
    module, name = qualname.rsplit(".", 1)
    if qualname == "pathlib.os.system":
        module, name = "pathlib", "os.system"
    assert classify(GlobalRef(module, name)) == expected


def test_line_terminator_tricks_are_still_dangerous() -> None:
    assert classify(GlobalRef("os\r", "system\r")) == "dangerous"


def test_the_package_imports_neither_torch_nor_numpy() -> None:
    code = "import sys, ckptkit.pickle; print('torch' in sys.modules, 'numpy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


# --- torch files ------------------------------------------------------------------------------


def data_pkl(obj: Any, **kwargs: Any) -> bytes:
    """The data.pkl of ``torch.save(obj)``, read with stdlib zipfile (test-side only)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer, **kwargs)
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        return archive.read(name)


def check_tensor(ref: Any, real: torch.Tensor) -> None:
    assert type(ref) is TensorRef
    assert ref.dtype == str(real.dtype).removeprefix("torch.")
    assert ref.shape == tuple(real.shape)
    assert ref.stride == real.stride()
    assert ref.storage_offset == real.storage_offset()
    assert ref.requires_grad == real.requires_grad
    assert ref.is_parameter == isinstance(real, torch.nn.Parameter)
    itemsize = torch.empty((), dtype=real.dtype).element_size()
    storage_bytes = ref.storage.numel * (1 if ref.storage.dtype == "uint8" else itemsize)
    assert storage_bytes == real.untyped_storage().nbytes()


def test_torch_tensors_become_tensor_refs() -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tensors = {
        "plain": base,
        "view": base[1:, 2:],  # storage offset
        "transposed": base.t(),  # non-contiguous
        "bf16": base.to(torch.bfloat16),
        "half": torch.ones(3, dtype=torch.float16),
        "int64": torch.arange(5),
        "bool": torch.tensor([True, False]),
        "uint16": torch.zeros(7, dtype=torch.uint16),  # untyped storage: _rebuild_tensor_v3
        "fp8": torch.zeros(4, dtype=torch.float8_e4m3fn),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 3),
        "param": torch.nn.Parameter(torch.ones(2, 2)),
        "frozen": torch.nn.Parameter(torch.ones(2), requires_grad=False),
        "grad": torch.ones(3, requires_grad=True),
    }
    result = load_symbolic(data_pkl(tensors), persistent_load=storage_ref_from_pid, pickle_name="a/data.pkl")
    assert set(result.value) == set(tensors)
    for name, real in tensors.items():
        check_tensor(result.value[name], real)
    view, plain = result.value["view"], result.value["plain"]
    assert view.storage == plain.storage  # one storage record, shared
    assert {u.classification for u in result.globals} <= {"vetted", "tensor-rebuild"}
    assert {u.pickle_name for u in result.globals} == {"a/data.pkl"}


def test_module_state_dict_torch_size_device_dtype() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    obj = {
        "sd": model.state_dict(),
        "shape": torch.Size([2, 3]),
        "device": torch.device("cuda", 1),
        "cpu": torch.device("cpu"),
        "dtype": torch.bfloat16,
        "layout": torch.sparse_coo,
    }
    value = load_symbolic(data_pkl(obj), persistent_load=storage_ref_from_pid).value
    sd = value["sd"]
    assert type(sd) is OrderedDict and list(sd) == list(model.state_dict())
    assert sd._metadata == model.state_dict()._metadata
    for name, real in model.state_dict().items():
        check_tensor(sd[name], real)
    assert value["shape"] == (2, 3) and type(value["shape"]) is TorchSize
    assert value["device"] == VettedObject(GlobalRef("torch", "device"), args=("cuda", 1))
    assert value["cpu"].args == ("cpu",)
    assert value["dtype"] == GlobalRef("torch", "bfloat16")
    assert value["layout"].args == ("torch.sparse_coo",)


def test_tensor_subclass_and_python_attributes_stay_visible() -> None:
    tensor = torch.ones(2)
    tensor.note = "kept"  # python state: _rebuild_from_type_v2 with a state dict
    plain_v2 = torch.ones(3)
    result = load_symbolic(data_pkl({"t": tensor, "p": plain_v2}), persistent_load=storage_ref_from_pid)
    node = result.value["t"]
    assert type(node) is Opaque and node.cls == GlobalRef("torch._tensor", "_rebuild_from_type_v2")
    check_tensor(node.args[2], torch.ones(2))
    assert node.args[3] == {"note": "kept"}
    check_tensor(result.value["p"], plain_v2)


def test_without_persistent_load_tensors_stay_opaque() -> None:
    value = load_symbolic(data_pkl(torch.ones(2))).value
    assert type(value) is Opaque and value.cls.name == "_rebuild_tensor_v2"
    assert value.args[0].cls == PERSISTENT_ID


def test_storage_ref_from_pid() -> None:
    pid = ("storage", GlobalRef("torch", "BFloat16Storage"), "3", "cuda:0", 10)
    ref = storage_ref_from_pid(pid)
    assert (ref.key, ref.dtype, ref.location, ref.numel) == ("3", "bfloat16", "cuda:0", 10)
    assert storage_ref_from_pid((*pid, None)).dtype == "bfloat16"  # legacy 6-tuple
    bad = [
        ("module", GlobalRef("torch", "FloatStorage"), "0", "cpu", 1),
        ("storage", GlobalRef("os", "system"), "0", "cpu", 1),
        ("storage", GlobalRef("torch", "NoSuchStorage"), "0", "cpu", 1),
        ("storage", GlobalRef("torch", "FloatStorage"), 0, "cpu", 1),
        ("storage", GlobalRef("torch", "FloatStorage"), "0", "cpu", -1),
        ("storage", GlobalRef("torch", "FloatStorage"), "0", "cpu", 1, ("view", 0, 1)),
        ["storage"],
        ("storage", GlobalRef("torch", "FloatStorage"), "0", "cpu", -(10**5000)),  # no str() of it
    ]
    for pid in bad:
        with pytest.raises(FormatError):
            storage_ref_from_pid(pid)


@pytest.mark.filterwarnings("ignore:TypedStorage is deprecated")
def test_storage_and_dtype_tables_match_torch() -> None:
    dtypes = {str(v).removeprefix("torch.") for v in vars(torch).values() if isinstance(v, torch.dtype)}
    assert dtypes == TORCH_DTYPES
    for name, dtype in STORAGE_DTYPES.items():
        if name != "UntypedStorage":
            assert str(getattr(torch, name).dtype) == f"torch.{dtype}"


def test_legacy_stacked_pickle_format() -> None:
    tensors = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2, dtype=torch.int32)}
    buffer = io.BytesIO()
    torch.save(tensors, buffer, _use_new_zipfile_serialization=False)
    data = buffer.getvalue()
    pickles, pos = [], 0
    for _ in range(5):  # magic, protocol version, sys_info, the object, storage keys
        result = load_symbolic(data, persistent_load=storage_ref_from_pid, start=pos)
        pickles.append(result.value)
        pos += result.size
    magic, version, sys_info, obj, keys = pickles
    assert (magic, version) == (0x1950A86A20F9469CFC6C, 1001)
    assert sys_info["little_endian"] is True
    for name, real in tensors.items():
        check_tensor(obj[name], real)
    assert sorted(keys) == sorted(t.storage.key for t in obj.values())


def test_hf_rng_state() -> None:
    random.seed(7)
    np.random.seed(7)
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.get_rng_state()}
    result = load_symbolic(data_pkl(state), persistent_load=storage_ref_from_pid)
    value = result.value
    assert value["python"] == random.getstate()
    name, keys, pos, has_gauss, cached = value["numpy"]
    real = np.random.get_state()
    assert (name, pos, has_gauss, cached) == (real[0], real[2], real[3], real[4])
    assert keys == NdArray("<u4", (624,), real[1].tobytes())
    check_tensor(value["cpu"], torch.get_rng_state())
    assert {str(u.ref) for u in result.globals if u.ref.module.startswith("numpy")} == {
        "numpy._core.multiarray._reconstruct",
        "numpy.ndarray",
        "numpy.dtype",
    }


@pytest.mark.parametrize("protocol", range(6))
def test_numpy_arrays_scalars_and_dtypes(protocol: int) -> None:
    arrays = {
        "u4": np.arange(5, dtype="<u4"),
        "f8 fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
        "big-endian": np.arange(3, dtype=">i2"),
        "bool": np.array([True, False]),
        "unicode": np.array(["ab", "c"]),
        "datetime": np.array(["2024-01-01"], dtype="M8[ns]"),
        "empty": np.zeros((0, 4), dtype=np.float32),
    }
    value = load_symbolic(pickle.dumps(arrays, protocol=protocol)).value
    for name, real in arrays.items():
        got = value[name]
        assert type(got) is NdArray, name
        assert (got.dtype, got.shape, got.fortran_order) == (real.dtype.str, real.shape, np.isfortran(real))
        assert got.data == real.tobytes(order="F" if np.isfortran(real) else "C")
    scalar = load_symbolic(pickle.dumps(np.float64(2.5), protocol=protocol)).value
    assert scalar == NdArray("<f8", (), np.float64(2.5).tobytes(), is_scalar=True)
    assert load_symbolic(pickle.dumps(np.dtype("<u4"), protocol=protocol)).value == "<u4"


def test_object_arrays_stay_opaque() -> None:
    value = load_symbolic(pickle.dumps(np.array([{"a": 1}], dtype=object), protocol=2)).value
    assert type(value) is Opaque and value.cls.name == "_reconstruct"


# --- DeepSpeed -----------------------------------------------------------------------------


@pytest.fixture
def deepspeed_standins(monkeypatch: pytest.MonkeyPatch) -> types.SimpleNamespace:
    """Local classes that pickle under DeepSpeed's qualified names (DeepSpeed itself not needed)."""

    class LossScaler:
        def __init__(self, scale: float) -> None:
            self.cur_scale = scale
            self.dynamic = False

    class DynamicLossScaler:
        def __init__(self) -> None:  # the attributes DeepSpeed 0.19 sets
            self.cur_scale, self.cur_iter, self.last_overflow_iter = 65536.0, 10, -1
            self.scale_factor, self.scale_window, self.min_scale = 2.0, 1000, 1
            self.delayed_shift, self.cur_hysteresis, self.consecutive_hysteresis = 2, 2, False
            self.raise_error_at_min_scale, self.dynamic, self.dtype = True, True, torch.float16

    @dataclasses.dataclass
    class fragment_address:  # DeepSpeed spells it in lower case
        numel: int
        start: int

    class ZeroStageEnum(int, enum.Enum):
        disabled = 0
        optimizer_states = 1
        gradients = 2
        weights = 3

    classes = {
        "deepspeed.runtime.fp16.loss_scaler": [LossScaler, DynamicLossScaler],
        "deepspeed.utils.tensor_fragment": [fragment_address],
        "deepspeed.runtime.zero.config": [ZeroStageEnum],
    }
    for module_name, members in classes.items():
        parts = module_name.split(".")
        for i in range(1, len(parts) + 1):
            monkeypatch.setitem(sys.modules, ".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
        for cls in members:
            cls.__module__, cls.__qualname__ = module_name, cls.__name__
            setattr(sys.modules[module_name], cls.__name__, cls)
    return types.SimpleNamespace(**{cls.__name__: cls for members in classes.values() for cls in members})


def test_deepspeed_optimizer_state(deepspeed_standins: types.SimpleNamespace) -> None:
    ds = deepspeed_standins
    state = {
        "optimizer_state_dict": {
            "loss_scaler": ds.LossScaler(1.0),
            "dynamic": ds.DynamicLossScaler(),
            "dynamic_loss_scale": False,
            "zero_stage": ds.ZeroStageEnum.gradients,
            "single_partition_of_fp32_groups": [torch.zeros(338)],
            "param_slice_mappings": [OrderedDict(w=ds.fragment_address(numel=6, start=0))],
        },
        "ds_version": "0.19.8",
    }
    result = load_symbolic(data_pkl(state), persistent_load=storage_ref_from_pid)
    osd = result.value["optimizer_state_dict"]
    scaler = GlobalRef("deepspeed.runtime.fp16.loss_scaler", "LossScaler")
    assert osd["loss_scaler"] == VettedObject(scaler, {"cur_scale": 1.0, "dynamic": False})
    dynamic = osd["dynamic"]
    assert dynamic.cls.name == "DynamicLossScaler" and dynamic.state == {
        **vars(ds.DynamicLossScaler()),
        "dtype": GlobalRef("torch", "float16"),
    }
    assert osd["zero_stage"] == VettedObject(
        GlobalRef("deepspeed.runtime.zero.config", "ZeroStageEnum"), args=(2,)
    )
    fragment = osd["param_slice_mappings"][0]["w"]
    assert fragment.state == {"numel": 6, "start": 0}
    check_tensor(osd["single_partition_of_fp32_groups"][0], torch.zeros(338))
    assert {u.classification for u in result.globals} <= {"vetted", "tensor-rebuild"}


@pytest.mark.parametrize("protocol", range(6))
def test_deepspeed_instances_in_every_protocol(
    deepspeed_standins: types.SimpleNamespace, protocol: int
) -> None:
    value = load_symbolic(pickle.dumps(deepspeed_standins.fragment_address(3, 4), protocol=protocol)).value
    assert value == VettedObject(
        GlobalRef("deepspeed.utils.tensor_fragment", "fragment_address"), {"numel": 3, "start": 4}
    )


def test_deepspeed_classes_with_unexpected_state_stay_opaque(
    deepspeed_standins: types.SimpleNamespace,
) -> None:
    scaler = deepspeed_standins.LossScaler(1.0)
    scaler.evil = "extra key"
    fragment = deepspeed_standins.fragment_address(-1, 0)
    stage = deepspeed_standins.ZeroStageEnum.weights
    value = load_symbolic(pickle.dumps([scaler, fragment], protocol=2)).value
    assert [type(v) for v in value] == [Opaque, Opaque]
    assert value[0].state["evil"] == "extra key"
    bad_stage = pickle.dumps(stage, protocol=2).replace(b"K\x03", b"K\x07")
    assert type(load_symbolic(bad_stage).value) is Opaque


# --- limits ----------------------------------------------------------------------------------


def memo_bomb(levels: int, fanout: int, container: str) -> bytes:
    """Level i holds ``fanout`` references to level i-1: fanout**levels nodes, 25 bytes a level."""
    data = b"Nq\x000"  # memo[0] = None
    for level in range(levels):
        items = b"h%c" % level * fanout
        data += (b"](" + items + b"e" if container == "list" else b"(" + items + b"t") + b"q%c0" % (level + 1)
    return data + b"h%c" % levels  # push the last level


def test_memo_bomb_is_refused() -> None:
    with pytest.raises(FormatError, match="expands to more than"):
        load_symbolic(memo_bomb(30, 10, "list") + b".")
    with pytest.raises(FormatError, match="expands to more than"):  # a bomb as a dict key
        load_symbolic(b"}" + memo_bomb(30, 10, "tuple") + b"Ns.")
    tame = load_symbolic(memo_bomb(3, 10, "list") + b".").value  # shared and small: fine
    assert len(tame) == 10 and tame[0] is tame[1]


def test_hash_collision_floods_are_refused() -> None:
    mersenne = 2**61 - 1  # CPython hashes ints modulo this prime: all these keys hash to 0
    for flood in ({k * mersenne: 0 for k in range(1, 100)}, {(k * mersenne,) for k in range(1, 100)}):
        with pytest.raises(FormatError, match="collision flood"):
            load_symbolic(pickle.dumps(flood, protocol=2))
    # The natural collision (-1 and -2), repeated in many dicts, is fine.
    many = [{-1: "a", -2: "b", 0: "c"} for _ in range(500)]
    assert load_symbolic(pickle.dumps(many, protocol=2)).value == many


def test_deep_nesting_is_refused() -> None:
    with pytest.raises(FormatError, match="MARKs nest deeper"):
        load_symbolic(b"(" * 10_000 + b"t" * 10_000 + b".")
    with pytest.raises(FormatError, match="nest deeper"):
        load_symbolic(b")" + b"\x85" * 100_000 + b".")
    with pytest.raises(FormatError, match="nest deeper"):  # a deep tuple as a key, before hashing it
        load_symbolic(b"}" + b")" + b"\x85" * 100_000 + b"Ns.")
    nested_list = b"]q\x00" + b"]h\x00aq\x00" * 1000 + b"."  # one list a level, through the memo
    with pytest.raises(FormatError, match="nest deeper"):
        load_symbolic(nested_list)
    assert load_symbolic(b")" + b"\x85" * 200 + b".", limits=Limits(max_depth=256)).value is not None


@pytest.mark.parametrize(
    "data",
    [
        b"\x8d" + struct.pack("<Q", 2**62) + b"x.",  # BINUNICODE8
        b"\x8e" + struct.pack("<Q", 2**62) + b"x.",  # BINBYTES8
        b"\x96" + struct.pack("<Q", 2**62) + b"x.",  # BYTEARRAY8
        b"\x95" + struct.pack("<Q", 2**62) + b"N.",  # FRAME
        b"X\xff\xff\xff\xffx.",  # BINUNICODE
        b"B\xff\xff\xff\xffx.",  # BINBYTES
        b"T\xff\xff\xff\x7fx.",  # BINSTRING
        b"\x8b\xff\xff\xff\x7fx.",  # LONG4
        b"\x8a\xffx.",  # LONG1
    ],
)
def test_declared_lengths_are_checked_before_allocating(data: bytes) -> None:
    with pytest.raises(FormatError, match="runs past the end"):
        load_symbolic(data)


def test_limits_on_memo_stack_and_opcodes() -> None:
    puts = b"".join(b"Nq%c0" % i for i in range(20)) + b"N."
    with pytest.raises(FormatError, match="memo entries"):
        load_symbolic(puts, limits=Limits(max_memo=10))
    assert load_symbolic(puts).value is None
    with pytest.raises(FormatError, match="values on the stack"):
        load_symbolic(b"N" * 10_000 + b".", limits=Limits(max_stack=1000))
    with pytest.raises(FormatError, match="opcodes"):
        load_symbolic(b"N0" * 10_000 + b"N.", limits=Limits(max_ops=1000))
    with pytest.raises(FormatError, match="expands to more than"):
        load_symbolic(pickle.dumps(list(range(100)), 2), limits=Limits(max_output_nodes=50))


def test_object_nodes_as_dict_keys_hash_by_identity() -> None:
    # DCP's .metadata keys a dict by MetadataIndex objects: each occurrence is its own key.
    value = load_symbolic(b"}(cm\nf\n)RK\x01cm\nf\n)RK\x02u.").value
    assert sorted(value.values()) == [1, 2]
    keys = list(value)
    assert all(type(k) is NodeKey and k.node == Opaque(GlobalRef("m", "f"), "reduce") for k in keys)
    assert keys[0] != keys[1]
