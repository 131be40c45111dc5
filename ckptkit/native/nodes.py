"""The vocabulary of ``tree.json`` that the codec (:mod:`ckptkit.native.tree`) and its numpy
values (:mod:`ckptkit.native.numpy_values`) share: the tag key, tree paths and how errors show
them. Torch-free, and below both, so neither imports the other for it.
"""

from __future__ import annotations

import json
from typing import Any

TAG = "t"

Json = Any
TreePath = tuple[object, ...]


def format_path(path: TreePath) -> str:
    """``state["model"][3]`` for the path ``("model", 3)``."""
    parts = ["state"]
    for key in path:
        shown = json.dumps(key, ensure_ascii=False) if isinstance(key, str) else repr(key)
        parts.append(f"[{shown}]")
    return "".join(parts)


def describe_type(kind: type) -> str:
    """``function`` for builtins, ``package.module.Class`` for everything else."""
    if kind.__module__ == "builtins":
        return kind.__qualname__
    return f"{kind.__module__}.{kind.__qualname__}"
