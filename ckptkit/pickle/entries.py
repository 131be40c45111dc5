"""What an entry of the vetted table is, and the two signals its handlers give the interpreter.

A vetted global has handlers that turn a symbolic call into a structured value. Handlers check
the *shape* of their arguments (types, arity, key sets) and raise :class:`NotVetted` when it is
not the shape the real callable is known to receive; the interpreter then keeps the call as an
:class:`~ckptkit.pickle.values.Opaque` node, so nothing is lost and nothing unchecked is trusted.
:class:`Malformed` is for input no pickler writes (an unhashable set element, say): it ends the
parse with a ``FormatError``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from ckptkit.pickle.values import Classification, GlobalRef, Opaque

OpaqueKind = Literal["reduce", "newobj", "global", "inst"]


class Malformed(Exception):
    """Input that cannot be a well-formed pickle; the interpreter adds the byte offset."""


class NotVetted(Exception):
    """Arguments a vetted handler does not accept; the call stays an Opaque node."""


class Context(Protocol):
    """What handlers may ask of the interpreter running them."""

    def key(self, value: Any) -> Any:
        """``value`` itself if it may be a dict key or set element within the limits, else Malformed."""

    def call(self, callee: Any, args: tuple[Any, ...], kind: OpaqueKind) -> Any:
        """The symbolic result of ``callee(*args)`` (REDUCE semantics)."""

    def new(self, cls: Any, args: tuple[Any, ...], kind: OpaqueKind) -> Any:
        """The symbolic result of ``cls.__new__(cls, *args)`` (NEWOBJ semantics)."""


# reduce/new handlers get the interpreter, the global called and the call's arguments.
CallHandler = Callable[[Context, GlobalRef, tuple[Any, ...]], Any]
# build handlers get the Opaque that reduce/new left and the BUILD state; they return its value.
BuildHandler = Callable[[Opaque, Any], Any]


@dataclass(frozen=True)
class Entry:
    """How the interpreter treats one vetted global. Missing handlers leave the node Opaque."""

    classification: Classification = "vetted"
    reduce: CallHandler | None = None  # REDUCE, and INST/OBJ with arguments: ``ref(*args)``
    new: CallHandler | None = None  # NEWOBJ, INST/OBJ without arguments: ``ref.__new__(ref, *args)``
    build: BuildHandler | None = None  # BUILD on the Opaque a call of ``ref`` produced


def ref(qualname: str) -> GlobalRef:
    """``GlobalRef("a.b", "c")`` for ``"a.b.c"``: table keys are written as dotted names."""
    module, _, name = qualname.rpartition(".")
    return GlobalRef(module, name)


def is_count(value: Any) -> bool:
    """A non-negative int that is not a bool (bools are ints, but no size is ever True)."""
    return type(value) is int and value >= 0


def is_counts(value: Any) -> bool:
    """A tuple of non-negative ints, as sizes, strides and shapes are pickled."""
    if type(value) is not tuple:
        return False
    for x in value:  # noqa: SIM110 - a loop beats all(genexpr) 3x on the short tuples of every tensor
        if type(x) is not int or x < 0:
            return False
    return True
