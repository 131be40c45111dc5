"""What reading a ``torch.save`` file gives: one result type for the zip, legacy and bare-pickle
readers, kept apart from them so that :mod:`ckptkit.formats.legacy` and
:mod:`ckptkit.formats.torchfile` both build it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ckptkit.formats import zipfile_reader as zr
from ckptkit.pickle.values import GlobalUse, StorageRef, TensorRef


@dataclass
class TorchFile:
    key: str
    kind: Literal["zip", "legacy", "pickle"]
    value: Any  # the symbolic tree (ckptkit.pickle.values)
    globals: list[GlobalUse]
    tensors: list[tuple[str, TensorRef]]  # (tree path, tensor), storages resolved
    storages: dict[str, StorageRef]  # storage key -> resolved storage
    problems: list[str] = field(default_factory=list)
    protocol: int | None = None
    record_prefix: str | None = None  # zip: the "<prefix>/" directory of every record
    prefix_offset: int = 0  # zip: bytes before the archive
    byteorder: str = "little"
    archive: zr.ZipArchive | None = None  # zip: its directory, whose records carry CRC-32s
    crc_checked: frozenset[str] = frozenset()  # zip records whose CRC-32 this reader checked
