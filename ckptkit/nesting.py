"""How deep JSON documents and state trees may nest, checked without recursion.

``json.loads`` and every recursive walker (decoders, renderers, ``json.dumps``) die with a
``RecursionError`` somewhere below a thousand levels, depending on how deep the caller's stack
already is. A hostile or broken manifest or ``tree.json`` must instead be a clear error about that
one file, so the depth of JSON text is measured first, by a linear scan that cannot recurse, and
the limits are set far below where a walker runs out of stack. This module imports no torch: the
torch-free readers (``inspect``, manifests) use it as well as the native format.
"""

from __future__ import annotations

import json
import re
from itertools import accumulate
from typing import Any

# Containers a native state tree may nest (a dict holding a list holding a dict is 3 deep).
# Real state trees nest under 10; pickle, and so torch.save, fail near 1000.
MAX_TREE_DEPTH = 100
# tree.json levels the writer can produce: the document object, up to 3 per container (a tagged
# dict is an object holding a "v" list of [key, value] lists) and 3 for a leaf (a complex number
# is an object holding a "v" list holding a tagged float).
TREE_JSON_DEPTH = 1 + 3 * MAX_TREE_DEPTH + 3
# JSON levels a leaf value adds below its container, as the reader counts (see tree_depth).
_LEAF_LEVELS = 3

_TAG = "t"  # ckptkit.native.tree.TAG; that module imports torch
_SEQUENCE_TAGS = frozenset({"tuple", "set", "frozenset"})
_PAIR_TAGS = frozenset({"dict", "odict", "counter"})
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_BRACKET = re.compile(r"[\[\]{}]")


class NestingError(ValueError):
    """JSON or a state tree nested deeper than the limit for it."""

    def __init__(self, what: str, depth: int, limit: int) -> None:
        super().__init__(f"{what} nested {depth} levels deep; the limit is {limit}")
        self.depth = depth
        self.limit = limit


def json_depth(text: str) -> int:
    """How deep arrays and objects nest in JSON ``text`` (0 for a scalar), without parsing it.

    Strings are cut out first, so brackets inside them do not count. Text that is not JSON
    gets some number; the parser that runs next rejects it.
    """
    brackets = _BRACKET.findall(_STRING.sub("", text))
    return max(accumulate(1 if b in "[{" else -1 for b in brackets), default=0)


def loads_bounded(data: bytes | str, limit: int, what: str = "JSON", **options: Any) -> Any:
    """``json.loads`` for text that nests at most ``limit`` levels; deeper is a
    :class:`NestingError` (a ``ValueError``, as ``json.loads`` raises for bad JSON)."""
    # Bytes are decoded as json.loads would (UTF-8, -16 or -32), so the scan sees its text.
    text = data.decode(json.detect_encoding(data), "surrogatepass") if isinstance(data, bytes) else data
    depth = json_depth(text)
    if depth > limit:
        raise NestingError(what, depth, limit)
    return json.loads(text, **options)


def tree_depth(node: Any) -> int:
    """How many containers of a native state tree (``tree.json``'s ``"tree"``) nest, counted as
    the writer counts them: a list, a plain dict, and a tagged tuple, set, frozenset, dict,
    odict or counter are one level each (whatever JSON they take). Any other JSON array or object
    is a level too, so a leaf adds up to ``_LEAF_LEVELS`` and hostile nesting anywhere counts."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(node, 0)]
    while stack:
        item, depth = stack.pop()
        children = _children(item)
        if children is None:
            continue
        deepest = max(deepest, depth + 1)
        stack.extend((child, depth + 1) for child in children)
    return deepest


def _children(node: Any) -> list[Any] | None:
    """What a tree node holds, one level down; None for a scalar."""
    if isinstance(node, list):
        return node
    if not isinstance(node, dict):
        return None
    values = node.get("v")
    if node.get(_TAG) in _SEQUENCE_TAGS and isinstance(values, list):
        return values
    if node.get(_TAG) in _PAIR_TAGS and isinstance(values, list):
        # The "v" list and each [key, value] pair are that one container's own levels.
        return [part for pair in values for part in (pair if isinstance(pair, list) else [pair])]
    return list(node.values())


def check_tree_depth(node: Any, what: str = "the state tree") -> None:
    """Refuse a state tree deeper than the writer writes (plus a leaf's own levels)."""
    depth = tree_depth(node)
    if depth > MAX_TREE_DEPTH + _LEAF_LEVELS:
        raise NestingError(what, depth, MAX_TREE_DEPTH)
