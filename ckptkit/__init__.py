"""ckptkit: atomic, manifest-indexed, verifiable checkpoints on local disk and object stores.

``import ckptkit`` does not import torch; the functions that make tensors import it when called.
"""

from ckptkit.api import load, save
from ckptkit.catalog import CheckpointInfo, latest_checkpoint, list_checkpoints, read_manifest
from ckptkit.errors import CkptkitError
from ckptkit.manager import CheckpointManager
from ckptkit.manifest import Manifest
from ckptkit.ops.gc import collect_garbage
from ckptkit.ops.index import index_checkpoint
from ckptkit.ops.verify import verify_checkpoint, verify_tree
from ckptkit.storage import Store, open_store

__version__ = "0.1.0"

__all__ = [
    "CheckpointInfo",
    "CheckpointManager",
    "CkptkitError",
    "Manifest",
    "Store",
    "__version__",
    "collect_garbage",
    "index_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "load",
    "open_store",
    "read_manifest",
    "save",
    "verify_checkpoint",
    "verify_tree",
]
