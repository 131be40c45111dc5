"""ckptkit's native layout, as a listing shows it: a typed ``tree.json`` beside safetensors shards.

What the tree and shards mean is :mod:`ckptkit.native`'s business (it needs torch to build
tensors); telling the layout from a listing needs only the tree's name. Torch-free.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable

NATIVE_TREE = "tree.json"


def is_native(names: Iterable[str]) -> bool:
    """Whether a listing holds a native tree (at any depth: per-rank checkpoints nest it)."""
    return any(posixpath.basename(n) == NATIVE_TREE for n in names)
