"""One inspection: the resolved target, its files read once, and those files sorted by content.

A torch file is a DeepSpeed model-states or ZeRO optimizer file because of what it holds, not
because of its name, so ``inspect`` of a single renamed rank file still reads as DeepSpeed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from ckptkit.errors import FormatError
from ckptkit.ops.inspect.native import TREE_FILE, read_native_tree
from ckptkit.ops.inspect.resolve import Target
from ckptkit.ops.inspect.source import Source

_ZERO_KEYS = frozenset({"zero_stage", "loss_scaler", "single_partition_of_fp32_groups", "fp32_flat_groups"})


@dataclass(frozen=True)
class Document:
    """A file's value tree. ``bytes_file`` holds its tensors' bytes; None: each tensor's
    storage names its own file (native shards)."""

    file: str
    value: Any
    bytes_file: str | None


def is_zero_optimizer_file(value: Any) -> bool:
    inner = value.get("optimizer_state_dict") if isinstance(value, Mapping) else None
    return isinstance(inner, Mapping) and bool(_ZERO_KEYS & inner.keys())


def is_model_states_file(value: Any) -> bool:
    return (
        isinstance(value, Mapping)
        and "module" in value
        and ("param_shapes" in value or "ds_version" in value or "global_steps" in value)
    )


class Context:
    def __init__(self, target: Target) -> None:
        self.target = target
        self.source = Source(target.native or target.store)
        self.problems: list[str] = self.source.problems

    @cached_property
    def _all(self) -> list[Document]:
        docs: list[Document] = []
        keys = list(self.target.torch_files)
        if self.target.deepspeed is not None:
            keys += self.target.deepspeed.model_states + self.target.deepspeed.optim_states
        for key in keys:
            try:
                docs.append(Document(key, self.source.value(key), key))
            except FormatError as exc:  # one unreadable file should not hide the others
                self.problems.append(f"{key}: not read: {exc}")
        if self.target.native is not None:
            docs.append(Document(TREE_FILE, read_native_tree(self.source), None))
        return docs

    @cached_property
    def documents(self) -> list[Document]:
        """Files of plain state (HF's optimizer.pt, a training script's torch.save dict...)."""
        return [
            d for d in self._all if not is_zero_optimizer_file(d.value) and not is_model_states_file(d.value)
        ]

    @cached_property
    def model_states(self) -> list[Document]:
        return [d for d in self._all if is_model_states_file(d.value)]

    @cached_property
    def zero_files(self) -> list[Document]:
        return [d for d in self._all if is_zero_optimizer_file(d.value)]

    @cached_property
    def trainer_state(self) -> Any:
        key = self.target.trainer_state
        return None if key is None else self.source.json(key)

    def scalars(self, doc: Document, values: list[Any]) -> list[Any]:
        return self.source.read_scalars(doc.bytes_file, values)


def find(value: Any, match: Callable[[Any], bool], max_depth: int = 3) -> list[tuple[str, Any]]:
    """Sub-trees of ``value`` that ``match``, with dotted paths, outermost first; a match is not
    searched further. ``""`` is the value itself."""
    found: list[tuple[str, Any]] = []
    level: list[tuple[str, Any]] = [("", value)]
    for _ in range(max_depth + 1):
        following: list[tuple[str, Any]] = []
        for path, node in level:
            if match(node):
                found.append((path, node))
            elif isinstance(node, Mapping):
                following += [(f"{path}.{k}" if path else str(k), v) for k, v in node.items()]
            elif isinstance(node, list):
                following += [(f"{path}.{i}" if path else str(i), v) for i, v in enumerate(node)]
        level = following
    return found
