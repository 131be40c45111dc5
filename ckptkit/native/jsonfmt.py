"""JSON that people can read: a node goes on one line when it fits, else one child per line.

``json.dumps(indent=...)`` puts every number of a shape on its own line, which makes a tensor
table of a few thousand records tens of thousands of lines long.
"""

from __future__ import annotations

import json
from typing import Any

WIDTH = 120
# Deeper nodes stay on one line: each indented level costs two stack frames, and indentation
# this deep helps no reader.
MAX_INDENT = 16


def dumps(value: Any, indent: int = 0) -> str:
    flat = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(", ", ": "))
    if indent + len(flat) <= WIDTH or indent >= MAX_INDENT:
        return flat
    if not isinstance(value, (dict, list)) or not value:
        return flat
    pad = " " * (indent + 1)
    if isinstance(value, dict):
        items = [
            f"{pad}{json.dumps(key, ensure_ascii=False)}: {dumps(item, indent + 1)}"
            for key, item in value.items()
        ]
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
    items = [pad + dumps(item, indent + 1) for item in value]
    return "[\n" + ",\n".join(items) + "\n" + " " * indent + "]"
