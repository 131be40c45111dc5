"""The symbolic pickle machine: every opcode of protocols 0-5, nothing imported or called.

It follows CPython's unpickler (``Modules/_pickle.c``, the one ``pickle.load`` and ``torch.load``
run) opcode for opcode, on a stack of plain values and nodes: one flat stack with a *fence* at
the last MARK (values below it are out of reach until POP_MARK or a collection opcode pops the
mark), and a memo dict. Globals become :class:`GlobalRef` names; calls go through the vetted
table or become :class:`Opaque`. Literal opcodes live in :mod:`ckptkit.pickle.literals`.

Hostile input is bounded: declared lengths are checked against the input before anything is
allocated; :class:`Limits` bound the memo, the stack, MARK nesting and the size of the result
with shared references expanded (:mod:`ckptkit.pickle.bounds`); dict keys and set elements are
measured before they are hashed and may not flood one hash value. A fault does not end the search
for globals: :mod:`ckptkit.pickle.recovery` walks on to where CPython's unpickler would stop too.

Speed: one dispatch through a 256-entry table of bound methods per opcode; handlers return the
next read position; STOP ends the loop by exception, and the stack size is checked once per
4096 opcodes, so the loop does no other per-opcode work.
"""

from __future__ import annotations

import pickletools
import struct
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Any

from ckptkit.errors import CkptkitError, FormatError
from ckptkit.pickle.bounds import DEFAULT_LIMITS, Cache, Limits, measure
from ckptkit.pickle.entries import Entry, Malformed, NotVetted, OpaqueKind
from ckptkit.pickle.literals import Literals
from ckptkit.pickle.names import classify, global_ref
from ckptkit.pickle.recovery import recover_globals
from ckptkit.pickle.torch_refs import TorchSize
from ckptkit.pickle.values import (
    Classification,
    GlobalRef,
    GlobalUse,
    NodeKey,
    Opaque,
    PickleResult,
    VettedObject,
)
from ckptkit.pickle.vetted import lookup


class PickleFormatError(FormatError):
    """A pickle that does not parse. It still lists the globals read before the fault.

    A scanner must treat a partial parse as a failure *with* findings (``safe-loading.md`` §4
    item 9): a payload followed by garbage still names its payload. ``path`` is the pickle's name
    (a file, or a record inside one: ``archive/data.pkl``) and ``offset`` the byte in the data
    handed to the interpreter where it stopped.
    """

    def __init__(self, message: str, *, offset: int, pickle_name: str, globals: list[GlobalUse]) -> None:
        super().__init__(message, path=pickle_name or None, offset=offset)
        self.pickle_name = pickle_name
        self.globals = globals


class _Stop(Exception):
    """STOP reached: ends the dispatch loop without a per-opcode test."""


class _Passthrough(Exception):
    """An exception from the caller's persistent_load: re-raised as it was, not as bad input."""

    def __init__(self, error: Exception) -> None:
        self.error = error


# Synthetic callees for nodes whose callable is not a global (a call of a call's result) and for
# persistent ids nobody resolved. The "<pickle>" module cannot be a real module name.
CALL = GlobalRef("<pickle>", "call")
NEW = GlobalRef("<pickle>", "new")
PERSISTENT_ID = GlobalRef("<pickle>", "persistent_id")

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_OPCODE_NAMES = {op.code.encode("latin-1")[0]: op.name for op in pickletools.opcodes}
_UNDERFLOW = "stack underflow"
_CHUNK = 4096
_REFUSED_EXT = "extension registry codes (EXT1/2/4) name process state; not supported"
_REFUSED_BUFFER = "out-of-band buffers (protocol 5 NEXT_BUFFER/READONLY_BUFFER) are not supported"

# Keys whose hash is salted per process (PYTHONHASHSEED), so a pickle cannot choose collisions.
_SALTED_KEYS = frozenset({str, bytes, GlobalRef})
# Keys that hash by walking their items: measured (size, depth) before they are hashed.
_COMPOSITE_KEYS = frozenset({tuple, frozenset, TorchSize})
# Distinct keys one hash value may have. Python's int, float and tuple hashes are predictable, so
# a pickle can make thousands of keys collide and each dict insertion scan them all (quadratic:
# 280 kB of pickle took 4 s in CPython's own unpickler). Real data has next to no full collisions
# (-1 and -2 are the classic pair).
_MAX_SAME_HASH = 8
# OrderedDict and Counter carry a __dict__; BUILD may set plain attributes there (torch's
# state_dict() pickles its `_metadata` this way), never ones that shadow a method.
_ATTRIBUTE_TARGETS = {t: frozenset(dir(t)) for t in (OrderedDict, Counter)}


def load_symbolic(
    data: bytes | bytearray | memoryview,
    *,
    persistent_load: Callable[[Any], Any] | None = None,
    limits: Limits = DEFAULT_LIMITS,
    pickle_name: str = "",
    start: int = 0,
) -> PickleResult:
    """Interpret the one pickle that starts at ``data[start]``, executing nothing.

    ``persistent_load(pid)`` resolves persistent ids (``torch_refs.storage_ref_from_pid`` for
    torch files); without it each becomes ``Opaque(PERSISTENT_ID, "reduce", (pid,))``.
    ``PickleResult.size`` is the bytes consumed, so stacked pickles (torch's legacy format) are
    read by calling again at ``start + size``. Offsets in globals and errors are offsets into
    ``data``. Malformed input raises :class:`PickleFormatError`; exceptions from
    ``persistent_load`` other than ckptkit errors propagate unchanged.
    """
    return _Machine(data, persistent_load, limits, pickle_name, start).run()


class _Machine(Literals):
    def __init__(
        self,
        data: bytes | bytearray | memoryview,
        persistent_load: Callable[[Any], Any] | None,
        limits: Limits,
        pickle_name: str,
        start: int,
    ) -> None:
        self.buf = data if isinstance(data, (bytes, bytearray)) else memoryview(data).cast("B")
        self.size = len(self.buf)
        self.start = start
        self.persistent_load = persistent_load
        self.limits = limits
        self.max_memo = limits.max_memo
        self.pickle_name = pickle_name
        self.stack: list[Any] = []
        self.fence = 0  # stack index of the innermost MARK; nothing below it may be popped
        self.marks: list[int] = []  # fences of the enclosing MARKs
        self.memo: dict[int, Any] = {}
        self.globals: list[GlobalUse] = []
        self.proto = 0  # as CPython: 0 until a PROTO opcode says otherwise
        self.declared_proto: int | None = None
        self.stop = start
        self.value: Any = None
        self.key_work = 0  # nodes hashed as dict keys / set elements, within max_output_nodes
        self.key_cache: Cache = {}
        self.hashes: dict[int, list[Any]] = {}  # hash -> the distinct keys seen with it
        self.classes: dict[GlobalRef, Classification] = {}
        self.entries: dict[int, tuple[GlobalRef, Entry | None]] = {}
        # Opaque nodes a vetted BUILD will replace, by id: the memo keys holding them.
        self.pending: dict[int, list[int]] = {}
        self.dispatch: list[Callable[[int], int]] = [self._op_unknown] * 256
        for op in pickletools.opcodes:
            self.dispatch[op.code.encode("latin-1")[0]] = getattr(self, "_op_" + op.name.lower())

    # --- the loop ---------------------------------------------------------------------------

    def run(self) -> PickleResult:
        if not 0 <= self.start < self.size:
            raise self._error(self.start, f"no pickle at offset {self.start} of {self.size} bytes")
        buf, dispatch, stack = self.buf, self.dispatch, self.stack
        max_stack = self.limits.max_stack
        pos = op_pos = self.start
        try:
            # The stack grows by at most one value per opcode, so checking its size once per
            # _CHUNK opcodes bounds it within max_stack + _CHUNK at no per-opcode cost.
            for _ in range(0, self.limits.max_ops, _CHUNK):
                for _ in range(_CHUNK):
                    op_pos = pos
                    pos = dispatch[buf[pos]](pos + 1)
                if len(stack) > max_stack:
                    raise Malformed(f"more than {max_stack} values on the stack")
            raise Malformed(f"more than {self.limits.max_ops} opcodes")
        except _Stop:
            pass
        except _Passthrough as passthrough:
            raise passthrough.error from None
        except Malformed as exc:
            raise self._fault(op_pos, str(exc)) from None
        except (IndexError, struct.error):
            raise self._fault(op_pos, "data ends inside an opcode (truncated pickle)") from None
        except (ValueError, OverflowError) as exc:  # int(), float(), decoding: bad literals
            raise self._fault(op_pos, f"bad literal: {exc}") from None
        value = self.value
        try:
            measure(value, self.limits.max_output_nodes, self.limits.max_depth, {})
        except Malformed as exc:
            raise self._error(op_pos, str(exc)) from None
        return PickleResult(value, self.globals, self.declared_proto, self.stop - self.start)

    def _fault(self, offset: int, message: str) -> PickleFormatError:
        """The error for a parse stopped mid-stream, naming the globals the rest of it holds.

        CPython's unpickler has none of our limits and is laxer in places, so it would go on
        past ``offset`` and import whatever comes next: the stream is walked on for those globals
        (:mod:`ckptkit.pickle.recovery`), and a payload behind a limit is still a payload.
        """
        self.stack.clear()  # the values are no longer needed; the walk may need the memory
        self.memo.clear()
        recovery = recover_globals(self.buf, self.start, self.limits, self.pickle_name)
        seen = {use.offset for use in self.globals}
        later = [use for use in recovery.globals if use.offset not in seen]
        self.globals.extend(later)
        if later:
            names = ", ".join(sorted({use.ref.qualname for use in later}))
            message += f"; read on without building values, the stream names {names}"
        if not recovery.complete:
            message += f"; it was not searched for globals past byte {recovery.stopped_at}"
        return self._error(offset, message)

    def _error(self, offset: int, message: str) -> PickleFormatError:
        op = _OPCODE_NAMES.get(self.buf[offset]) if offset < self.size else None
        where = f"{self.pickle_name or 'pickle'} at byte {offset}" + (f" ({op})" if op else "")
        return PickleFormatError(
            f"{where}: {message}", offset=offset, pickle_name=self.pickle_name, globals=self.globals
        )

    # --- helpers ----------------------------------------------------------------------------

    def _pop(self) -> Any:
        if len(self.stack) <= self.fence:
            raise Malformed(_UNDERFLOW)
        return self.stack.pop()

    def _top(self) -> Any:
        if len(self.stack) <= self.fence:
            raise Malformed(_UNDERFLOW)
        return self.stack[-1]

    def _pop_mark(self) -> list[Any]:
        if not self.marks:
            raise Malformed("no MARK to pop")
        items = self.stack[self.fence :]
        del self.stack[self.fence :]
        self.fence = self.marks.pop()
        return items

    def _check_keys(self, items: list[Any]) -> list[Any]:
        """``items`` as usable keys: checked for hash floods, object nodes wrapped."""
        return [k if type(k) in _SALTED_KEYS else self.key(k) for k in items]

    def _pairs(self, items: list[Any]) -> zip[tuple[Any, Any]]:
        if len(items) % 2:
            raise Malformed("odd number of items for a dict")
        keys = self._check_keys(items[::2])
        return zip(keys, items[1::2], strict=True)

    # --- Context (what vetted handlers may ask) ---------------------------------------------

    def key(self, value: Any) -> Any:
        t = type(value)
        if t in _SALTED_KEYS:
            return value
        if t is Opaque or t is VettedObject:
            return NodeKey(value)
        if t in _COMPOSITE_KEYS:
            # Hashing a tuple walks it in C without a recursion guard, once per use: bound both.
            size, _ = measure(value, self.limits.max_output_nodes, self.limits.max_depth, self.key_cache)
            self.key_work += size
            if self.key_work > self.limits.max_output_nodes:
                raise Malformed(f"keys hash more than {self.limits.max_output_nodes} nodes in all")
        try:
            digest = hash(value)
        except TypeError:
            raise Malformed(f"unhashable dict key or set element ({t.__name__})") from None
        same_hash = self.hashes.setdefault(digest, [])
        if value not in same_hash:
            if len(same_hash) >= _MAX_SAME_HASH:
                raise Malformed(
                    f"more than {_MAX_SAME_HASH} distinct keys share one hash (a collision flood)"
                )
            same_hash.append(value)
        return value

    def _entry(self, ref: GlobalRef) -> Entry | None:
        # Pickles reuse one GlobalRef object through the memo for every call of a global, so an
        # identity cache skips hashing the (Python-level) dataclass on each REDUCE.
        cached = self.entries.get(id(ref))
        if cached is not None and cached[0] is ref:
            return cached[1]
        entry = lookup(ref)
        self.entries[id(ref)] = (ref, entry)
        return entry

    def call(self, callee: Any, args: tuple[Any, ...], kind: OpaqueKind) -> Any:
        if type(callee) is GlobalRef:
            entry = self._entry(callee)
            if entry is not None and entry.reduce is not None:
                try:
                    return entry.reduce(self, callee, args)
                except NotVetted:
                    pass
            return Opaque(callee, kind, args)
        if type(callee) is Opaque:  # e.g. the result of getattr(obj, "name"): kept, not resolved
            return Opaque(CALL, kind, (callee, args))
        raise Malformed(f"{type(callee).__name__} is not callable")

    def new(
        self, cls: Any, args: tuple[Any, ...], kind: OpaqueKind, kwargs: dict[str, Any] | None = None
    ) -> Any:
        if type(cls) is GlobalRef:
            entry = self._entry(cls)
            if entry is not None and entry.new is not None and not kwargs:
                try:
                    return entry.new(self, cls, args)
                except NotVetted:
                    pass
            return Opaque(cls, kind, args, kwargs or {})
        if type(cls) is Opaque:
            return Opaque(NEW, kind, (cls, args), kwargs or {})
        raise Malformed(f"{type(cls).__name__} is not a class")

    def _instantiate(self, cls: Any, args: tuple[Any, ...]) -> Any:
        # INST/OBJ: pickle calls cls(*args), or only cls.__new__(cls) when there are no args.
        return self.call(cls, args, "inst") if args else self.new(cls, args, "inst")

    def _global(self, module: str, name: str, offset: int) -> GlobalRef:
        ref = global_ref(module, name, self.proto)
        classification = self.classes.get(ref)
        if classification is None:
            classification = self.classes[ref] = classify(ref)
        self.globals.append(GlobalUse(ref, offset, classification, self.pickle_name))
        return ref

    def _persistent(self, pid: Any) -> Any:
        if self.persistent_load is None:
            return Opaque(PERSISTENT_ID, "reduce", (pid,))
        try:
            return self.persistent_load(pid)
        except CkptkitError as exc:
            raise Malformed(str(exc)) from exc
        except Exception as exc:
            raise _Passthrough(exc) from exc

    def _memo_put(self, key: int) -> None:
        # The binary PUT opcodes inline this (a quarter of a torch pickle's opcodes are PUTs).
        stack = self.stack
        if len(stack) <= self.fence:
            raise Malformed(_UNDERFLOW)
        value = stack[-1]
        if len(self.memo) >= self.max_memo:
            self._memo_full(key)
        self.memo[key] = value
        if type(value) is Opaque:
            self._track_pending(key, value)

    def _memo_full(self, key: int) -> None:
        if key not in self.memo:
            raise Malformed(f"more than {self.max_memo} memo entries")

    def _track_pending(self, key: int, value: Opaque) -> None:
        if value.state is not None:
            return
        entry = lookup(value.cls)
        if entry is not None and entry.build is not None:
            self.pending.setdefault(id(value), []).append(key)

    def _memo_get(self, key: int) -> None:
        try:
            self.stack.append(self.memo[key])
        except KeyError:
            raise Malformed(f"memo key {key} was never stored") from None

    # --- opcodes: framing and control ------------------------------------------------------

    def _op_unknown(self, pos: int) -> int:
        raise Malformed(f"unknown opcode 0x{self.buf[pos - 1]:02x}")

    def _op_proto(self, pos: int) -> int:
        proto = self.buf[pos]
        if proto > 5:
            raise Malformed(f"unsupported protocol {proto}")
        self.proto = proto
        if self.declared_proto is None:
            self.declared_proto = proto
        return pos + 1

    def _op_frame(self, pos: int) -> int:
        # Frames only group opcodes for buffered reading; the length must still be honest.
        (length,) = _U64.unpack_from(self.buf, pos)
        self._end(pos + 8, length)
        return pos + 8

    def _op_stop(self, pos: int) -> int:
        self.value = self._pop()
        self.stop = pos
        raise _Stop

    def _op_mark(self, pos: int) -> int:
        marks = self.marks
        if len(marks) >= self.limits.max_depth:
            raise Malformed(f"MARKs nest deeper than {self.limits.max_depth} levels")
        marks.append(self.fence)
        self.fence = len(self.stack)
        return pos

    def _op_pop(self, pos: int) -> int:
        # As CPython: POP with nothing above the innermost MARK discards that MARK.
        if len(self.stack) > self.fence:
            self.stack.pop()
        else:
            self._pop_mark()
        return pos

    def _op_pop_mark(self, pos: int) -> int:
        self._pop_mark()
        return pos

    def _op_dup(self, pos: int) -> int:
        self.stack.append(self._top())
        return pos

    def _op_ext1(self, pos: int) -> int:
        raise Malformed(_REFUSED_EXT)

    _op_ext2 = _op_ext4 = _op_ext1

    def _op_next_buffer(self, pos: int) -> int:
        raise Malformed(_REFUSED_BUFFER)

    _op_readonly_buffer = _op_next_buffer

    # --- opcodes: memo ----------------------------------------------------------------------

    def _op_put(self, pos: int) -> int:
        line, pos = self._line(pos)
        key = self._int(line)
        if key < 0:
            raise Malformed("negative PUT key")
        self._memo_put(key)
        return pos

    def _op_binput(self, pos: int) -> int:
        stack = self.stack
        if len(stack) <= self.fence:
            raise Malformed(_UNDERFLOW)
        value = stack[-1]
        key = self.buf[pos]
        if len(self.memo) >= self.max_memo:
            self._memo_full(key)
        self.memo[key] = value
        if type(value) is Opaque:
            self._track_pending(key, value)
        return pos + 1

    def _op_long_binput(self, pos: int) -> int:
        stack = self.stack
        if len(stack) <= self.fence:
            raise Malformed(_UNDERFLOW)
        value = stack[-1]
        (key,) = _U32.unpack_from(self.buf, pos)
        if len(self.memo) >= self.max_memo:
            self._memo_full(key)
        self.memo[key] = value
        if type(value) is Opaque:
            self._track_pending(key, value)
        return pos + 4

    def _op_memoize(self, pos: int) -> int:
        self._memo_put(len(self.memo))
        return pos

    def _op_get(self, pos: int) -> int:
        line, pos = self._line(pos)
        self._memo_get(self._int(line))
        return pos

    def _op_binget(self, pos: int) -> int:
        try:
            self.stack.append(self.memo[self.buf[pos]])
        except KeyError:
            raise Malformed(f"memo key {self.buf[pos]} was never stored") from None
        return pos + 1

    def _op_long_binget(self, pos: int) -> int:
        self._memo_get(_U32.unpack_from(self.buf, pos)[0])
        return pos + 4

    # --- opcodes: containers ----------------------------------------------------------------

    def _op_empty_list(self, pos: int) -> int:
        self.stack.append([])
        return pos

    def _op_empty_tuple(self, pos: int) -> int:
        self.stack.append(())
        return pos

    def _op_empty_dict(self, pos: int) -> int:
        self.stack.append({})
        return pos

    def _op_empty_set(self, pos: int) -> int:
        self.stack.append(set())
        return pos

    def _op_list(self, pos: int) -> int:
        self.stack.append(self._pop_mark())
        return pos

    def _op_tuple(self, pos: int) -> int:
        if not self.marks:
            raise Malformed("no MARK to pop")
        stack, fence = self.stack, self.fence
        items = tuple(stack[fence:])
        del stack[fence:]
        self.fence = self.marks.pop()
        stack.append(items)
        return pos

    def _tuple_n(self, pos: int, n: int) -> int:
        stack = self.stack
        if len(stack) - n < self.fence:
            raise Malformed(_UNDERFLOW)
        items = tuple(stack[-n:])
        del stack[-n:]
        stack.append(items)
        return pos

    def _op_tuple1(self, pos: int) -> int:
        return self._tuple_n(pos, 1)

    def _op_tuple2(self, pos: int) -> int:
        return self._tuple_n(pos, 2)

    def _op_tuple3(self, pos: int) -> int:
        return self._tuple_n(pos, 3)

    def _op_dict(self, pos: int) -> int:
        self.stack.append(dict(self._pairs(self._pop_mark())))
        return pos

    def _op_frozenset(self, pos: int) -> int:
        items = self._check_keys(self._pop_mark())
        self.stack.append(frozenset(items))
        return pos

    def _op_append(self, pos: int) -> int:
        item = self._pop()
        self._extend(self._top(), [item])
        return pos

    def _op_appends(self, pos: int) -> int:
        items = self._pop_mark()
        self._extend(self._top(), items)
        return pos

    def _extend(self, target: Any, items: list[Any]) -> None:
        if type(target) is list:
            target.extend(items)
        elif type(target) is Opaque:  # list subclass or anything with append(): recorded
            target.items.extend(items)
        else:
            raise Malformed(f"APPEND onto {type(target).__name__}")

    def _op_setitem(self, pos: int) -> int:
        value = self._pop()
        key = self._pop()
        self._update(self._top(), [key, value])
        return pos

    def _op_setitems(self, pos: int) -> int:
        items = self._pop_mark()
        self._update(self._top(), items)
        return pos

    def _update(self, target: Any, items: list[Any]) -> None:
        # Only real mappings take items (the check torch added for CVE-2026-24747); an Opaque
        # records them, so an object that is a mapping at runtime still shows its contents.
        t = type(target)
        if t is OrderedDict:
            target.update(self._pairs(items))
        elif t is dict or t is Counter:  # dict.update: Counter.update would add counts
            dict.update(target, self._pairs(items))
        elif t is Opaque:
            if len(items) % 2:
                raise Malformed("odd number of items for SETITEMS")
            target.setitems.extend(zip(items[::2], items[1::2], strict=True))
        else:
            raise Malformed(f"SETITEM onto {t.__name__}")

    def _op_additems(self, pos: int) -> int:
        items = self._pop_mark()
        target = self._top()
        if type(target) is set:
            target.update(self._check_keys(items))
        elif type(target) is Opaque:
            target.items.extend(items)
        else:
            raise Malformed(f"ADDITEMS onto {type(target).__name__}")
        return pos

    # --- opcodes: globals, calls, objects ---------------------------------------------------

    def _op_global(self, pos: int) -> int:
        offset = pos - 1
        module, pos = self._line(pos)
        name, pos = self._line(pos)
        self.stack.append(self._global(module.decode("utf-8"), name.decode("utf-8"), offset))
        return pos

    def _op_stack_global(self, pos: int) -> int:
        name = self._pop()
        module = self._pop()
        if type(module) is not str or type(name) is not str:
            kinds = f"{type(module).__name__} and {type(name).__name__}"
            raise Malformed(f"STACK_GLOBAL needs two str, got {kinds}")
        self.stack.append(self._global(module, name, pos - 1))
        return pos

    def _op_inst(self, pos: int) -> int:
        offset = pos - 1
        module, pos = self._line(pos)
        name, pos = self._line(pos)
        cls = self._global(module.decode("utf-8"), name.decode("utf-8"), offset)
        self.stack.append(self._instantiate(cls, tuple(self._pop_mark())))
        return pos

    def _op_obj(self, pos: int) -> int:
        items = self._pop_mark()
        if not items:
            raise Malformed("OBJ without a class")
        self.stack.append(self._instantiate(items[0], tuple(items[1:])))
        return pos

    def _op_reduce(self, pos: int) -> int:
        stack = self.stack
        if len(stack) - 2 < self.fence:
            raise Malformed(_UNDERFLOW)
        args = stack.pop()
        if type(args) is not tuple:
            raise Malformed(f"REDUCE arguments must be a tuple, not {type(args).__name__}")
        stack[-1] = self.call(stack[-1], args, "reduce")
        return pos

    def _op_newobj(self, pos: int) -> int:
        args = self._pop()
        cls = self._top()
        if type(args) is not tuple:
            raise Malformed(f"NEWOBJ arguments must be a tuple, not {type(args).__name__}")
        self.stack[-1] = self.new(cls, args, "newobj")
        return pos

    def _op_newobj_ex(self, pos: int) -> int:
        kwargs = self._pop()
        args = self._pop()
        cls = self._top()
        if type(args) is not tuple or type(kwargs) is not dict:
            raise Malformed("NEWOBJ_EX needs an argument tuple and a keyword dict")
        self.stack[-1] = self.new(cls, args, "newobj", kwargs)
        return pos

    def _op_build(self, pos: int) -> int:
        state = self._pop()
        inst = self._top()
        t = type(inst)
        if t is Opaque:
            result = self._build_opaque(inst, state)
        elif t in _ATTRIBUTE_TARGETS:
            self._set_attributes(inst, state)
            result = inst
        elif t is GlobalRef:  # state set on a class or function: shown, never applied
            result = Opaque(inst, "global", state=state)
        else:
            raise Malformed(f"BUILD on {t.__name__}")
        self.stack[-1] = result
        return pos

    def _build_opaque(self, inst: Opaque, state: Any) -> Any:
        if inst.state is not None:
            raise Malformed("BUILD applied twice to one object")
        entry = lookup(inst.cls)
        if entry is not None and entry.build is not None:
            try:
                result = entry.build(inst, state)
            except NotVetted:
                pass
            else:
                # The memo still holds the Opaque (pickle memoizes before BUILD): point it at
                # the finished value.
                for key in self.pending.pop(id(inst), ()):
                    if self.memo.get(key) is inst:
                        self.memo[key] = result
                return result
        inst.state = state
        return inst

    def _set_attributes(self, inst: Any, state: Any) -> None:
        if type(state) is not dict:
            raise Malformed(f"BUILD state for {type(inst).__name__} must be a dict")
        reserved = _ATTRIBUTE_TARGETS[type(inst)]
        for name in state:
            if type(name) is not str or not name.isidentifier() or name.startswith("__") or name in reserved:
                label = repr(name[:60]) if type(name) is str else type(name).__name__
                raise Malformed(f"BUILD may not set attribute {label} on {type(inst).__name__}")
        inst.__dict__.update(state)

    def _op_persid(self, pos: int) -> int:
        line, pos = self._line(pos)
        self.stack.append(self._persistent(line.decode("ascii")))
        return pos

    def _op_binpersid(self, pos: int) -> int:
        self.stack.append(self._persistent(self._pop()))
        return pos
