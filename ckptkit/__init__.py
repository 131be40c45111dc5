"""ckptkit: atomic, manifest-indexed, verifiable checkpoints on local disk and object stores.

``import ckptkit`` is cheap and torch-free: the public names below are imported on first use
(PEP 562), and the functions that make tensors import torch only when called.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "save": "ckptkit.api",
    "attest": "ckptkit.attestation",
    "AttestReport": "ckptkit.attest_core",
    "AttestationError": "ckptkit.errors",
    "load": "ckptkit.api",
    "SaveHandle": "ckptkit.async_save",
    "CheckpointManager": "ckptkit.manager",
    "CheckpointInfo": "ckptkit.catalog",
    "latest_checkpoint": "ckptkit.catalog",
    "list_checkpoints": "ckptkit.catalog",
    "read_manifest": "ckptkit.catalog",
    "CkptkitError": "ckptkit.errors",
    "FlatShard": "ckptkit.native.partition",
    "Manifest": "ckptkit.manifest",
    "collect_garbage": "ckptkit.ops.gc",
    "index_checkpoint": "ckptkit.ops.index",
    "inspect_path": "ckptkit.ops.inspect",
    "scan": "ckptkit.ops.scan",
    "doctor": "ckptkit.ops.doctor",
    "verify_checkpoint": "ckptkit.ops.verify",
    "verify_tree": "ckptkit.ops.verify",
    "safe_load": "ckptkit.safe",
    "safe_globals": "ckptkit.safe",
    "Store": "ckptkit.storage",
    "open_store": "ckptkit.storage",
    "convert": "ckptkit.ops.convert",
    "reshard_zero": "ckptkit.ops.reshard",
    "ReshardResult": "ckptkit.ops.reshard",
    "sync": "ckptkit.ops.sync",
    "SyncReport": "ckptkit.ops.sync",
    "thin_checkpoint": "ckptkit.ops.thin",
    "ThinReport": "ckptkit.ops.thin",
    "RetryPolicy": "ckptkit.transfer",
    "Mirror": "ckptkit.mirror",
    "MirrorError": "ckptkit.mirror",
    "RetentionPolicy": "ckptkit.retention",
    "DistributedCommitError": "ckptkit.distributed",
    "TopologyMismatchError": "ckptkit.distributed",
}

__all__ = [
    "AttestReport",
    "AttestationError",
    "CheckpointInfo",
    "CheckpointManager",
    "CkptkitError",
    "DistributedCommitError",
    "FlatShard",
    "Manifest",
    "Mirror",
    "MirrorError",
    "ReshardResult",
    "RetentionPolicy",
    "RetryPolicy",
    "SaveHandle",
    "Store",
    "SyncReport",
    "ThinReport",
    "TopologyMismatchError",
    "__version__",
    "attest",
    "collect_garbage",
    "convert",
    "doctor",
    "index_checkpoint",
    "inspect_path",
    "latest_checkpoint",
    "list_checkpoints",
    "load",
    "open_store",
    "read_manifest",
    "reshard_zero",
    "safe_globals",
    "safe_load",
    "save",
    "scan",
    "sync",
    "thin_checkpoint",
    "verify_checkpoint",
    "verify_tree",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ckptkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:
    from ckptkit.api import load, save
    from ckptkit.async_save import SaveHandle
    from ckptkit.attest_core import AttestReport
    from ckptkit.attestation import attest
    from ckptkit.catalog import CheckpointInfo, latest_checkpoint, list_checkpoints, read_manifest
    from ckptkit.distributed import DistributedCommitError, TopologyMismatchError
    from ckptkit.errors import AttestationError, CkptkitError
    from ckptkit.manager import CheckpointManager
    from ckptkit.manifest import Manifest
    from ckptkit.mirror import Mirror, MirrorError
    from ckptkit.native.partition import FlatShard
    from ckptkit.ops.convert import convert
    from ckptkit.ops.doctor import doctor
    from ckptkit.ops.gc import collect_garbage
    from ckptkit.ops.index import index_checkpoint
    from ckptkit.ops.inspect import inspect_path
    from ckptkit.ops.reshard import ReshardResult, reshard_zero
    from ckptkit.ops.scan import scan
    from ckptkit.ops.sync import SyncReport, sync
    from ckptkit.ops.thin import ThinReport, thin_checkpoint
    from ckptkit.ops.verify import verify_checkpoint, verify_tree
    from ckptkit.retention import RetentionPolicy
    from ckptkit.safe import safe_globals, safe_load
    from ckptkit.storage import Store, open_store
    from ckptkit.transfer import RetryPolicy
