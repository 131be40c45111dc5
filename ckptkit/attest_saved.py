"""The saved side of an attestation: a committed checkpoint's model, optimizer, scheduler and
scaler state as digest trees (tensors as :class:`~ckptkit.attest_core.TensorDigest`), read without
running any pickle code.

* native (``save``, ``CheckpointManager``, Lightning): ``tree.json`` and its shards; the parts
  are found under the keys trainers use (``model``/``state_dict``, ``optimizer``/
  ``optimizer_states``, ``scheduler``/``lr_schedulers``, ``scaler``/``native_amp_scaling_state``).
* one ``torch.save`` file (``ckptkit index`` of a plain ``.pt``): the same keys, through the
  safe loader; one safetensors file: the model's weights.
* HF Trainer: the weights' safetensors files hashed by byte range straight from the store
  (``pytorch_model*.bin`` through the safe loader otherwise), ``optimizer.pt``, ``scheduler.pt``
  and ``scaler.pt`` through :func:`ckptkit.safe.safe_load_key`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from typing import Any

from ckptkit.attest_core import AttestReport, TensorDigest, attest_parts, digest_tree
from ckptkit.commit import files_of, logical_path
from ckptkit.errors import FormatError
from ckptkit.formats.safetensors import read_safetensors_header
from ckptkit.formats.safetensors_writer import TORCH_DTYPE
from ckptkit.manifest import Manifest
from ckptkit.storage import Store

# Where each part lives in a native state tree, in the order looked for; a list value (Lightning
# keeps one entry per optimizer and scheduler) stands for its first entry.
SECTION_KEYS = {
    "model": ("model", "state_dict", "module", "model_state_dict", "model_state"),
    "optimizer": ("optimizer", "optim", "optimizer_state_dict", "optimizer_states"),
    "scheduler": ("scheduler", "lr_scheduler", "lr_schedulers", "scheduler_state_dict"),
    "scaler": ("scaler", "grad_scaler", "native_amp_scaling_state", "amp_scaler"),
}
HF_FILES = {"optimizer": "optimizer.pt", "scheduler": "scheduler.pt", "scaler": "scaler.pt"}
_READ = 8 << 20  # bytes per ranged read while hashing a safetensors tensor


def attest_files(checkpoint: Store, manifest: Manifest, given: dict[str, Any]) -> AttestReport:
    """:func:`~ckptkit.attest_core.attest_parts` against a checkpoint of a layout read here."""
    return attest_parts(checkpoint.url, read_saved(checkpoint, manifest, want=set(given)), given)


def read_saved(checkpoint: Store, manifest: Manifest, *, want: set[str]) -> dict[str, Any]:
    """The parts named in ``want`` that the checkpoint holds, as digest trees; a part it does not
    hold is absent, and ``"_where"`` says where it was looked for."""
    if manifest.layout == "native":
        return _native(checkpoint, manifest, want)
    if manifest.layout == "hf-trainer":
        return _hf_trainer(files_of(checkpoint, manifest), manifest, want)
    if manifest.layout == "files" and len(manifest.files) == 1:
        return _one_file(files_of(checkpoint, manifest), logical_path(manifest.files[0].path), want)
    raise FormatError(
        f"{checkpoint.url}: attest reads native, HF Trainer, DeepSpeed, DCP and single-file torch "
        f"or safetensors checkpoints, not layout '{manifest.layout}'"
    )


def _native(checkpoint: Store, manifest: Manifest, want: set[str]) -> dict[str, Any]:
    from ckptkit.distributed import world
    from ckptkit.native import read_native
    from ckptkit.native.files import native_files, rank_files

    rank = world()[0] if rank_files(checkpoint, manifest) is not None else None
    return sections(read_native(native_files(checkpoint, manifest, rank), map_location="cpu"), want)


def _one_file(files: Store, key: str, want: set[str]) -> dict[str, Any]:
    """A checkpoint of one ``torch.save`` file (through the safe loader) or safetensors file."""
    from ckptkit.formats.sniff import detect
    from ckptkit.safe import safe_load_key

    kind = detect(files, key).kind
    if kind == "safetensors":
        return {"model": _safetensors_digests(files, key), "_where": f"{key}: weights only"}
    if kind not in ("torch-zip", "torch-legacy", "pickle"):
        raise FormatError(f"{files.url}/{key}: a {kind} file; attest reads torch.save and safetensors files")
    return sections(safe_load_key(files, key, "cpu"), want)


def sections(tree: Any, want: set[str]) -> dict[str, Any]:
    """The parts of a state tree under the keys trainers use (:data:`SECTION_KEYS`)."""
    found: dict[str, Any] = {"_where": "looked for " + ", ".join(
        f"{part}: {'/'.join(SECTION_KEYS[part])}" for part in sorted(want)
    )}
    if not isinstance(tree, Mapping):
        return found
    for part in want:
        key = next((k for k in SECTION_KEYS[part] if k in tree), None)
        if key is not None:
            value = tree[key]
            found[part] = digest_tree(value[0] if isinstance(value, list) and value else value)
    if "model" in want and "model" not in found and _all_tensors(tree):
        found["model"] = digest_tree(tree)  # the state is the model's state dict itself
    return found


def _all_tensors(tree: Mapping[str, Any]) -> bool:
    return bool(tree) and all(hasattr(v, "dtype") and hasattr(v, "shape") for v in tree.values())


def _hf_trainer(files: Store, manifest: Manifest, want: set[str]) -> dict[str, Any]:
    from ckptkit.safe import safe_load_key

    names = sorted(logical_path(e.path) for e in manifest.files)
    found: dict[str, Any] = {"_where": "files " + ", ".join(
        ["model*.safetensors / pytorch_model*.bin"] + [HF_FILES[p] for p in sorted(want) if p in HF_FILES]
    )}
    if "model" in want:
        weights = [n for n in names if "/" not in n and n.endswith(".safetensors")]
        if weights:
            found["model"] = {k: v for n in weights for k, v in _safetensors_digests(files, n).items()}
        else:
            bins = [n for n in names if "/" not in n and fnmatch.fnmatch(n, "pytorch_model*.bin")]
            if bins:
                found["model"] = {
                    k: v for n in bins for k, v in digest_tree(safe_load_key(files, n, "cpu")).items()
                }
    for part, name in HF_FILES.items():
        if part in want and name in names:
            found[part] = digest_tree(safe_load_key(files, name, "cpu"))
    return found


def _safetensors_digests(files: Store, key: str) -> dict[str, TensorDigest]:
    """Each tensor of a safetensors file hashed from its byte range: no tensor is built."""
    from blake3 import blake3

    header = read_safetensors_header(files, key)
    digests = {}
    for name, entry in header.entries.items():
        dtype = TORCH_DTYPE.get(entry.dtype)
        if dtype is None:
            raise FormatError(f"{files.url}/{key}: tensor {name} has dtype {entry.dtype}, unknown to attest")
        hasher = blake3()
        start, end = entry.byte_range
        for offset in range(start, end, _READ):
            hasher.update(files.get(key, offset, min(end, offset + _READ)))
        digests[name] = TensorDigest(dtype, tuple(entry.shape), hasher.hexdigest())
    return digests
