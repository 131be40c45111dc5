"""Which layout a checkpoint directory has, from the names a listing gives: the one detection.

Each layout's module says what marks it (:mod:`.hf_trainer`, :mod:`.deepspeed`, :mod:`.dcp`,
:mod:`.native_layout`); this module only orders them. An HF Trainer checkpoint may hold a
DeepSpeed tag (``checkpoint-N/global_stepN/``), so the Trainer's mark wins; ``files`` is what
is left. Names are only a first guess at what to open: every file is then read by a reader that
checks its content. Torch-free, and no content is read here.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ckptkit.formats import deepspeed
from ckptkit.formats.dcp import is_dcp
from ckptkit.formats.hf_trainer import is_hf_trainer
from ckptkit.formats.native_layout import is_native


@dataclass(frozen=True)
class Layout:
    kind: str  # the manifest's layout names: hf-trainer | deepspeed | dcp | native | files
    topology: dict[str, Any] | None = None  # what the file names state about ranks


def detect_layout(names: Iterable[str]) -> Layout:
    """The layout of the directory whose keys (relative, at any depth) are ``names``."""
    names = list(names)
    if is_hf_trainer(names):
        return Layout("hf-trainer")
    if deepspeed.is_deepspeed(names):
        return Layout("deepspeed", deepspeed.topology(names))
    if is_dcp(names):
        return Layout("dcp")
    if is_native(names):
        return Layout("native")
    return Layout("files")
