"""Part of a ``tree.json``: the top-level keys of a dict state, chosen by name. Torch-free.

``ckptkit.load(keys=...)`` decodes only the chosen keys (:func:`select_keys`); thinning a
checkpoint (:mod:`ckptkit.ops.thin`) writes a smaller ``tree.json`` that holds only them
(:func:`cut_document`): their tensor records, renumbered, and the entries and shards those
records use, so that nothing in it refers to bytes that are about to go.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ckptkit.errors import FormatError
from ckptkit.native.decode import TreeDecoder
from ckptkit.native.document import entry_ref
from ckptkit.native.files import TREE_FILE
from ckptkit.native.nodes import TAG, Json

_KEYED = ("dict", "odict", "counter")
_INDEXED = ("tensor", "flatshard")  # the tagged nodes that name a row of the tensor table


class MissingKeyError(KeyError):
    """``keys=`` named a top-level key the checkpoint does not have."""

    def __str__(self) -> str:  # KeyError would show the message in quotes
        return str(self.args[0])


def top_level_keys(document: dict[str, Any]) -> list[Any]:
    """The top-level keys of a dict state, in its own order; TypeError for any other state."""
    return [key for key, _ in _keyed_nodes(document)]


def select_keys(document: dict[str, Any], keys: Sequence[str]) -> Any:
    """The tree node of a dict state, cut down to ``keys`` (kept in the state's own order)."""
    tree = document["tree"]
    wanted = [keys] if isinstance(keys, str) else list(keys)
    keyed = _keyed_nodes(document)
    missing = [key for key in wanted if key not in [k for k, _ in keyed]]
    if missing:
        raise MissingKeyError(
            f"no top-level key {missing[0]!r} in the checkpoint; available: {[k for k, _ in keyed]!r}"
        )
    if TAG not in tree:
        return {key: node for key, node in keyed if key in wanted}
    return {**tree, "v": [pair for key, pair in keyed if key in wanted]}


def _keyed_nodes(document: dict[str, Any]) -> list[tuple[Any, Any]]:
    """(key, node) of a plain dict tree, or (key, [key node, value node]) of a tagged one."""
    tree = document["tree"]
    if isinstance(tree, dict) and TAG not in tree:
        return list(tree.items())
    if isinstance(tree, dict) and tree.get(TAG) in _KEYED:
        pairs = tree.get("v")
        if not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 for p in pairs):
            raise FormatError(f"{TREE_FILE}: malformed {tree[TAG]!r} node at the top")
        decode_key = TreeDecoder(document, _KeyLeaves()).decode
        return [(decode_key(pair[0]), pair) for pair in pairs]
    raise TypeError("keys= needs a checkpoint whose state is a dict")


class _KeyLeaves:
    """Leaves of top-level keys, which the writer writes as plain values only."""

    def _refuse(self, _: Any) -> Any:
        raise FormatError(f"{TREE_FILE}: a dict key holds a torch or numpy value")

    tensor = size = dtype = device = array = scalar = _refuse


@dataclass(frozen=True)
class CutDocument:
    """A ``tree.json`` document holding only some keys. ``shards`` are the old document's shard
    indices it still uses, in its own order; ``entries[i]`` the entry names it uses of shard i."""

    document: dict[str, Any]
    shards: list[int]
    entries: dict[int, set[str]]


def cut_document(document: dict[str, Any], keys: Sequence[str]) -> CutDocument:
    """``document`` (as :func:`~ckptkit.native.document.load_document` gives it) cut down to the
    top-level ``keys``: tensor rows renumbered in order of first use, and the entry and shard
    tables cut to what those rows and the tree's arrays use. The shard paths stay the old ones;
    a caller that rewrites a shard puts its new path in ``document["shards"]``."""
    renumber: dict[int, int] = {}
    arrays: list[str] = []
    tree = _renumbered(select_keys(document, keys), renumber, arrays, len(document["tensors"]))
    rows = [dict(document["tensors"][old]) for old in renumber]
    names = [row["entry"] for row in rows if row.get("entry") is not None] + arrays
    old_entries = document["entries"]
    for name in names:
        entry_ref(document, name)  # the entry exists and names a shard that does
    used: dict[int, set[str]] = {}
    for name in names:
        used.setdefault(old_entries[name]["shard"], set()).add(name)
    shards = sorted(used)
    position = {old: new for new, old in enumerate(shards)}
    entries = {
        name: {**old_entries[name], "shard": position[old_entries[name]["shard"]]}
        for name in sorted(set(names))
    }
    cut = {
        **document,
        "shards": [document["shards"][i] for i in shards],
        "entries": entries,
        "tensors": rows,
        "tree": tree,
    }
    return CutDocument(cut, shards, used)


def _renumbered(node: Json, renumber: dict[int, int], arrays: list[str], rows: int) -> Json:
    """A copy of ``node`` whose tensor references follow ``renumber`` (filled on first use)."""
    if isinstance(node, list):
        return [_renumbered(item, renumber, arrays, rows) for item in node]
    if not isinstance(node, dict):
        return node
    if node.get(TAG) in _INDEXED:
        index = node.get("i")
        if type(index) is not int or not 0 <= index < rows:
            raise FormatError(f"{TREE_FILE}: reference to tensor {index!r}, which the table lacks")
        return {**node, "i": renumber.setdefault(index, len(renumber))}
    if node.get(TAG) == "ndarray" and "entry" in node:
        arrays.append(node["entry"])
    return {key: _renumbered(value, renumber, arrays, rows) for key, value in node.items()}
