"""The globals a pickle names past the point where the interpreter had to stop.

The interpreter refuses input past its limits (MARK nesting, memo and stack size, opcode count,
colliding dict keys...) and input it is stricter about than CPython (a SETITEM on a list, a second
BUILD). CPython's unpickler has none of those limits: it goes on, and may import and call a global
that comes later in the stream. So after a fault, :func:`recover_globals` walks the stream again
from its start without building anything: it models only what ``STACK_GLOBAL`` needs (which stack
slots and memo entries hold a literal ``str``) and what makes CPython itself fail (a pop below the
innermost MARK, a memo key never stored, a malformed literal, an unknown opcode). It names every
``GLOBAL``, ``INST`` and ``STACK_GLOBAL`` up to STOP or to the first point where CPython fails too.

A ``STACK_GLOBAL`` whose operands are not literal strings at that point (a call's result, say)
is reported with ``<unresolved>`` in place of the unknown part: still a global, never silence.
The walk has bounds of its own, :data:`RECOVERY_FACTOR` times the interpreter's; a stream that
exhausts them is reported as not searched to its end, which keeps the verdict from being clean.
"""

from __future__ import annotations

import pickle
import pickletools
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ckptkit.pickle.bounds import Limits
from ckptkit.pickle.entries import Malformed
from ckptkit.pickle.literals import Literals
from ckptkit.pickle.names import classify, global_ref
from ckptkit.pickle.values import GlobalRef, GlobalUse

UNRESOLVED = "<unresolved>"
# Extension codes (EXT1/2/4) name whatever copyreg's registry maps them to in the loading process.
EXTENSION_MODULE = "<extension registry>"
# The walk may go this many times further than the interpreter (opcodes, stack, memo): far enough
# past any of the interpreter's limits to reach what follows, bounded so it cannot exhaust memory.
RECOVERY_FACTOR = 2
_CHUNK = 4096
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_I32 = struct.Struct("<i")
_U64 = struct.Struct("<Q")


class _Any:
    """A stack slot whose value is not known (a call's result, a global): it may be a str."""


class _Container:
    """A stack slot known to hold no str (a list, tuple, dict, set): STACK_GLOBAL fails on it."""


ANY = _Any()
CONTAINER = _Container()


@dataclass(frozen=True)
class Recovery:
    """What a walk found: every global it met, and whether it reached the stream's end."""

    globals: list[GlobalUse]
    complete: bool  # reached STOP, or a point where CPython's unpickler fails too
    stopped_at: int  # offset of the last opcode walked


class _Halt(Exception):
    """CPython's unpickler fails here too: nothing after this point runs."""


class _Exhausted(Exception):
    """The walk's own bounds ran out before the stream did."""


def recover_globals(
    data: bytes | bytearray | memoryview, start: int, limits: Limits, pickle_name: str = ""
) -> Recovery:
    """Every global the pickle at ``data[start]`` names, walked without building values."""
    return _Walker(data, start, limits, pickle_name).run()


class _Walker(Literals):
    def __init__(
        self, data: bytes | bytearray | memoryview, start: int, limits: Limits, pickle_name: str
    ) -> None:
        self.buf = data
        self.size = len(data)
        self.start = start
        self.pickle_name = pickle_name
        self.max_ops = limits.max_ops * RECOVERY_FACTOR
        self.max_stack = limits.max_stack * RECOVERY_FACTOR
        self.max_memo = limits.max_memo * RECOVERY_FACTOR
        self.stack: list[Any] = []
        self.fence = 0
        self.marks: list[int] = []
        self.memo: dict[int, Any] = {}
        self.proto = 0
        self.globals: list[GlobalUse] = []
        self.dispatch: list[Callable[[int], int]] = [self._op_unknown] * 256
        for op in pickletools.opcodes:
            self.dispatch[op.code.encode("latin-1")[0]] = getattr(self, "_op_" + op.name.lower())

    def run(self) -> Recovery:
        buf, dispatch, stack, memo = self.buf, self.dispatch, self.stack, self.memo
        pos = op_pos = self.start
        complete = True
        try:
            for _ in range(0, self.max_ops, _CHUNK):
                for _ in range(_CHUNK):
                    op_pos = pos
                    pos = dispatch[buf[pos]](pos + 1)
                if len(stack) + len(self.marks) > self.max_stack or len(memo) > self.max_memo:
                    raise _Exhausted
            raise _Exhausted
        except _Exhausted:
            complete = False
        except (_Halt, Malformed, IndexError, struct.error, ValueError, OverflowError):
            pass  # STOP, or input CPython refuses as well (UnicodeDecodeError is a ValueError)
        return Recovery(self.globals, complete, op_pos)

    # --- the model: literal str, a container, or anything -------------------------------------

    def _pop(self) -> Any:
        if len(self.stack) <= self.fence:
            raise _Halt
        return self.stack.pop()

    def _pop_mark(self) -> None:
        if not self.marks:
            raise _Halt
        del self.stack[self.fence :]
        self.fence = self.marks.pop()

    def _require_top(self) -> Any:
        if len(self.stack) <= self.fence:
            raise _Halt
        return self.stack[-1]

    def _record(self, module: str, name: str, offset: int) -> None:
        resolved = UNRESOLVED not in (module, name)
        ref = global_ref(module, name, self.proto) if resolved else GlobalRef(module, name)
        self.globals.append(GlobalUse(ref, offset, classify(ref), self.pickle_name))

    def _lines(self, pos: int) -> tuple[str, str, int]:
        module, pos = self._line(pos)
        name, pos = self._line(pos)
        return module.decode("utf-8"), name.decode("utf-8"), pos

    # --- framing and control ------------------------------------------------------------------

    def _op_unknown(self, pos: int) -> int:
        raise _Halt

    def _op_proto(self, pos: int) -> int:
        if self.buf[pos] > pickle.HIGHEST_PROTOCOL:
            raise _Halt
        self.proto = self.buf[pos]
        return pos + 1

    def _op_frame(self, pos: int) -> int:
        return pos + 8

    def _op_stop(self, pos: int) -> int:
        self._pop()
        raise _Halt

    def _op_mark(self, pos: int) -> int:
        self.marks.append(self.fence)
        self.fence = len(self.stack)
        return pos

    def _op_pop(self, pos: int) -> int:
        if len(self.stack) > self.fence:
            self.stack.pop()
        else:
            self._pop_mark()
        return pos

    def _op_pop_mark(self, pos: int) -> int:
        self._pop_mark()
        return pos

    def _op_dup(self, pos: int) -> int:
        self.stack.append(self._require_top())
        return pos

    def _op_next_buffer(self, pos: int) -> int:
        raise _Halt  # torch.load and pickle.load pass no out-of-band buffers

    def _op_readonly_buffer(self, pos: int) -> int:
        return self._replace(pos, 1)

    def _extension(self, code: int, offset: int) -> None:
        # Unknown to us: an import of whatever the loading process registered under that code.
        ref = GlobalRef(EXTENSION_MODULE, str(code))
        self.globals.append(GlobalUse(ref, offset, "unknown", self.pickle_name))
        self.stack.append(ANY)

    def _op_ext1(self, pos: int) -> int:
        self._extension(self.buf[pos], pos - 1)
        return pos + 1

    def _op_ext2(self, pos: int) -> int:
        self._extension(_U16.unpack_from(self.buf, pos)[0], pos - 1)
        return pos + 2

    def _op_ext4(self, pos: int) -> int:
        self._extension(_I32.unpack_from(self.buf, pos)[0], pos - 1)
        return pos + 4

    # --- memo ---------------------------------------------------------------------------------

    def _get(self, key: int) -> None:
        if key not in self.memo:
            raise _Halt
        self.stack.append(self.memo[key])

    def _op_get(self, pos: int) -> int:
        line, pos = self._line(pos)
        self._get(self._int(line))
        return pos

    def _op_binget(self, pos: int) -> int:
        self._get(self.buf[pos])
        return pos + 1

    def _op_long_binget(self, pos: int) -> int:
        self._get(_U32.unpack_from(self.buf, pos)[0])
        return pos + 4

    def _op_put(self, pos: int) -> int:
        line, pos = self._line(pos)
        key = self._int(line)
        if key < 0:
            raise _Halt
        self.memo[key] = self._require_top()
        return pos

    def _op_binput(self, pos: int) -> int:
        self.memo[self.buf[pos]] = self._require_top()
        return pos + 1

    def _op_long_binput(self, pos: int) -> int:
        self.memo[_U32.unpack_from(self.buf, pos)[0]] = self._require_top()
        return pos + 4

    def _op_memoize(self, pos: int) -> int:
        self.memo[len(self.memo)] = self._require_top()
        return pos

    # --- containers: their contents do not matter, only how many slots they take --------------

    def _push_container(self, pos: int) -> int:
        self.stack.append(CONTAINER)
        return pos

    _op_empty_list = _op_empty_tuple = _op_empty_dict = _op_empty_set = _push_container

    def _collect(self, pos: int) -> int:
        self._pop_mark()
        self.stack.append(CONTAINER)
        return pos

    _op_list = _op_tuple = _op_dict = _op_frozenset = _collect

    def _tuple_n(self, pos: int, n: int) -> int:
        for _ in range(n):
            self._pop()
        self.stack.append(CONTAINER)
        return pos

    def _op_tuple1(self, pos: int) -> int:
        return self._tuple_n(pos, 1)

    def _op_tuple2(self, pos: int) -> int:
        return self._tuple_n(pos, 2)

    def _op_tuple3(self, pos: int) -> int:
        return self._tuple_n(pos, 3)

    def _op_append(self, pos: int) -> int:
        self._pop()
        self._require_top()
        return pos

    def _op_setitem(self, pos: int) -> int:
        self._pop()
        self._pop()
        self._require_top()
        return pos

    def _fill(self, pos: int) -> int:  # APPENDS, SETITEMS, ADDITEMS: items above a MARK
        self._pop_mark()
        self._require_top()
        return pos

    _op_appends = _op_setitems = _op_additems = _fill

    # --- globals, calls, objects --------------------------------------------------------------

    def _op_global(self, pos: int) -> int:
        module, name, end = self._lines(pos)
        self._record(module, name, pos - 1)
        self.stack.append(ANY)
        return end

    def _op_inst(self, pos: int) -> int:
        module, name, end = self._lines(pos)
        self._record(module, name, pos - 1)
        self._collect_any(pos)
        return end

    def _op_stack_global(self, pos: int) -> int:
        name = self._pop()
        module = self._pop()
        if not all(part is ANY or type(part) in (str, bytes) for part in (module, name)):
            raise _Halt  # CPython: "STACK_GLOBAL requires str"
        self._record(_text(module), _text(name), pos - 1)
        self.stack.append(ANY)
        return pos

    def _op_obj(self, pos: int) -> int:
        if len(self.stack) <= self.fence:
            raise _Halt  # OBJ needs its class above the MARK
        return self._collect_any(pos)

    def _collect_any(self, pos: int) -> int:  # INST's and OBJ's arguments sit above a MARK
        self._pop_mark()
        self.stack.append(ANY)
        return pos

    def _replace(self, pos: int, pops: int) -> int:
        # A call or BUILD: its operands leave the stack, a result nobody can know takes their place.
        for _ in range(pops):
            self._pop()
        self.stack.append(ANY)
        return pos

    def _op_reduce(self, pos: int) -> int:
        return self._replace(pos, 2)

    _op_newobj = _op_build = _op_reduce

    def _op_newobj_ex(self, pos: int) -> int:
        return self._replace(pos, 3)

    def _op_binpersid(self, pos: int) -> int:
        return self._replace(pos, 1)

    def _op_persid(self, pos: int) -> int:
        _, pos = self._line(pos)
        self.stack.append(ANY)
        return pos


def _text(part: Any) -> str:
    """A STACK_GLOBAL operand as a name; bytes from a protocol 0-2 STRING are text under
    torch.load's ``encoding="utf-8"``."""
    if type(part) is str:
        return part
    if type(part) is bytes:
        try:
            return part.decode("utf-8")
        except UnicodeDecodeError:
            return UNRESOLVED
    return UNRESOLVED
