"""How big a value is once every shared reference is expanded, and how deeply it nests.

The memo lets a pickle refer to one object many times, so a few hundred bytes can describe a
tree of 10**30 nodes ("billion laughs"). Sharing costs the interpreter nothing, but anything that
walks the result as a tree (a renderer, ``==``, ``hash`` of a tuple) pays for the expansion, and
deep nesting overflows recursive walkers. :func:`measure` computes both numbers in time linear in
the *shared* graph, so the interpreter can refuse such values before anyone walks them.
:class:`Limits` holds those bounds and the others the interpreter and its recovery walk enforce.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import chain
from typing import Any

from ckptkit.pickle.entries import Malformed
from ckptkit.pickle.torch_refs import TorchSize
from ckptkit.pickle.values import Opaque, VettedObject


@dataclass(frozen=True)
class Limits:
    """Bounds on what one pickle may make the interpreter hold or produce.

    The defaults admit any checkpoint pickle seen in practice (a ``data.pkl`` of a few MB uses a
    small fraction of each). Memory stays proportional to the opcodes run (tens of bytes each),
    so ``max_ops`` caps it at a few GB; a reader that caps the pickle's size caps it further.
    """

    max_memo: int = 4_000_000  # memo entries (PUT / MEMOIZE)
    max_depth: int = 256  # MARK nesting, and nesting of the result and of dict keys
    max_stack: int = 1_000_000  # values on the stack at once (checked every 4096 opcodes)
    max_output_nodes: int = 10_000_000  # result size with shared references expanded
    max_ops: int = 50_000_000  # opcodes executed


DEFAULT_LIMITS = Limits()


def _mapping(d: Any) -> Iterator[Any]:
    # Attributes count too: BUILD may have set some on an OrderedDict (torch's _metadata).
    return chain(d.keys(), d.values(), getattr(d, "__dict__", {}).values())


_CHILDREN: dict[type, Callable[[Any], Iterator[Any]]] = {
    list: iter,
    tuple: iter,
    set: iter,
    frozenset: iter,
    TorchSize: iter,
    dict: _mapping,
    OrderedDict: _mapping,
    Counter: _mapping,
    Opaque: lambda o: iter((o.args, o.kwargs, o.state, o.items, o.setitems)),
    VettedObject: lambda o: iter((o.args, o.state)),
}

# id(node) -> (expanded size, height, node); holding the node keeps its id from being reused.
Cache = dict[int, tuple[int, int, Any]]


def measure(root: Any, max_nodes: int, max_depth: int, cache: Cache) -> tuple[int, int]:
    """``(size, height)`` of ``root`` as a tree; :class:`Malformed` past either limit.

    A reference back to a node still being measured (a list that contains itself) counts as one
    node, so cycles are finite. ``cache`` may be kept across calls only for immutable values.
    """
    children = _CHILDREN.get(type(root))
    if children is None:
        return 1, 0
    done = cache.get(id(root))
    if done is not None:
        return done[0], done[1]
    on_path = {id(root)}
    # Each frame: node, its remaining children, [size so far, tallest child so far].
    frames: list[tuple[Any, Iterator[Any], list[int]]] = [(root, children(root), [1, 0])]
    while True:
        node, pending, acc = frames[-1]
        for child in pending:
            child_children = _CHILDREN.get(type(child))
            if child_children is None:
                acc[0] += 1
                continue
            done = cache.get(id(child))
            if done is not None:
                acc[0] += done[0]
                acc[1] = max(acc[1], done[1])
            elif id(child) in on_path:
                acc[0] += 1
            else:
                if len(frames) >= max_depth:
                    raise Malformed(f"values nest deeper than {max_depth} levels")
                on_path.add(id(child))
                frames.append((child, child_children(child), [1, 0]))
                break
            if acc[0] > max_nodes:
                raise Malformed(f"value expands to more than {max_nodes} nodes (shared references)")
        else:
            frames.pop()
            on_path.discard(id(node))
            size, height = acc[0], acc[1] + 1
            if size > max_nodes:
                raise Malformed(f"value expands to more than {max_nodes} nodes (shared references)")
            if height > max_depth:
                raise Malformed(f"values nest deeper than {max_depth} levels")
            cache[id(node)] = (size, height, node)
            if not frames:
                return size, height
            parent = frames[-1][2]
            parent[0] += size
            parent[1] = max(parent[1], height)
