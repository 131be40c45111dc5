"""Which globals a symbolic tree may name and still be loaded: the one policy that ``safe_load``,
``convert`` and ``scan`` apply to what :mod:`ckptkit.pickle.machine` read.

A global classified ``unknown`` or ``dangerous`` is never acceptable, wherever it is used. A
vetted global is acceptable only where the vetted table turned its call into a value: a vetted
name called in a shape the table refuses stays an :class:`Opaque` node, and that node is refused
too. The one Opaque node accepted is a plain tensor or Parameter that carries Python attributes
(DeepSpeed ZeRO-3's ``ds_id``), which ``torch.load`` restores with ``setattr``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from ckptkit.errors import UnsafeContentError
from ckptkit.pickle.values import GlobalRef, GlobalUse, Opaque, TensorRef, VettedObject

UNSAFE_CLASSES = frozenset({"unknown", "dangerous"})
REBUILD_FROM_TYPE = GlobalRef("torch._tensor", "_rebuild_from_type_v2")
PARAMETER = GlobalRef("torch.nn.parameter", "Parameter")
_TENSOR_TYPES = frozenset({GlobalRef("torch", "Tensor"), PARAMETER})
SCALARS = frozenset({int, float, bool, complex, str, bytes, type(None), slice})


def unsafe_names(uses: Iterable[GlobalUse]) -> set[str]:
    """The qualified names of the globals among ``uses`` that are never acceptable."""
    return {use.ref.qualname for use in uses if use.classification in UNSAFE_CLASSES}


def refuse_unsafe(key: str, names: set[str], outcome: str, cause: Exception | None = None) -> None:
    """Raise :class:`UnsafeContentError` naming ``names`` (if any) that loading ``key`` the usual
    way would import and call; ``outcome`` says what the refusal spared ("nothing was run")."""
    if names:
        raise UnsafeContentError(
            f"{key}: refused: loading it the usual way would import and call "
            f"{', '.join(sorted(names))}, which ckptkit has not vetted; {outcome}",
            globals=names,
        ) from cause


def unvetted_globals(uses: Iterable[GlobalUse], value: Any) -> set[str]:
    """Globals that are not vetted, and vetted ones called in a shape the table does not accept:
    ``uses`` are the globals a pickle named, ``value`` the symbolic tree it built."""
    names = unsafe_names(uses)
    for node in walk(value):
        if type(node) is Opaque and not is_tensor_with_attributes(node):
            names.add(node.cls.qualname)
    return names


def is_tensor_with_attributes(node: Opaque) -> bool:
    """``_rebuild_from_type_v2`` of a plain tensor or Parameter that carries Python attributes.

    DeepSpeed ZeRO-3 tags its flat partitions with ``ds_id``; torch.save keeps such attributes as
    the rebuild's state and torch.load sets them with setattr. Only public identifier names are
    accepted (no dunder or private names that would reach torch internals); the values are
    checked like any other node of the tree.
    """
    if node.cls != REBUILD_FROM_TYPE or node.kind != "reduce" or len(node.args) != 4:
        return False
    _, new_type, inner, state = node.args
    return (
        type(inner) is TensorRef
        and new_type in _TENSOR_TYPES
        and type(state) is dict
        and all(type(k) is str and k.isidentifier() and not k.startswith("_") for k in state)
    )


def walk(root: Any) -> Iterator[Any]:
    """Every node of a symbolic tree, each shared node once."""
    seen: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if type(node) in SCALARS or id(node) in seen:
            continue
        seen.add(id(node))
        yield node
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
            stack.extend(getattr(node, "__dict__", {}).values())
        elif isinstance(node, (list, tuple, set, frozenset)):
            stack.extend(node)
        elif type(node) is VettedObject:
            stack.extend((node.args, node.state))
        elif type(node) is Opaque:
            stack.extend((node.args, node.kwargs, node.state, node.items, node.setitems))
