"""The conservation certificate of a resharded checkpoint: per-parameter digests of the fp32
master weights and every per-element optimizer state, read from the partitions.

``reshard`` computes it from the source partitions before writing and again from the written
ones; it commits only when both agree and records the source's digests in the manifest
(metadata entry :data:`CERTIFICATE_KEY`), where ``ckptkit verify`` re-checks them against the
partitions as they are now. Each digest is BLAKE3 over the parameter's float32 elements in
order, so it does not depend on how the elements are cut into ranks.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ckptkit.errors import FormatError
from ckptkit.formats.zero import RESHARD_KEY as CERTIFICATE_KEY
from ckptkit.ops.tensor_io import read_pieces
from ckptkit.ops.zero_source import ParamState, ZeroCheckpoint, read_zero
from ckptkit.storage import Store

__all__ = ["CERTIFICATE_KEY", "certify", "check_certificate"]


def certify(ckpt: ZeroCheckpoint, jobs: int) -> dict[str, dict[str, str]]:
    """Per trainable parameter, the BLAKE3 digest of each state (``fp32`` master, ``exp_avg``,
    ...) over its elements in order, read from the checkpoint's partitions on ``jobs`` threads."""
    from blake3 import blake3

    def one(param: ParamState) -> tuple[str, dict[str, str]]:
        digests = {}
        for key, pieces in param.states.items():
            hasher = blake3()
            for chunk in read_pieces(ckpt.store, pieces, 4):
                hasher.update(chunk)
            digests[key] = hasher.hexdigest()
        return param.name, digests

    with ThreadPoolExecutor(jobs) as pool:
        return dict(pool.map(one, list(ckpt.params)))


def check_certificate(files: Store, metadata: dict[str, Any], jobs: int) -> list[str]:
    """What differs between the certificate recorded in a manifest's ``metadata`` and the
    partitions of the checkpoint whose files are in ``files``; empty when conserved."""
    entry = metadata.get(CERTIFICATE_KEY)
    certificate = entry.get("certificate") if isinstance(entry, dict) else None
    params = certificate.get("params") if isinstance(certificate, dict) else None
    tag = metadata.get("tag")
    if not isinstance(params, dict) or not isinstance(tag, str):
        return ["the manifest's reshard certificate has no per-parameter digests or no tag"]
    try:
        actual = certify(read_zero(files, tag=tag), jobs)
    except FormatError as exc:
        return [f"the partitions cannot be read to re-check the certificate: {exc}"]
    problems = [f"{name}: in the certificate, not in the checkpoint" for name in params if name not in actual]
    problems += [
        f"{name}: in the checkpoint, not in the certificate" for name in actual if name not in params
    ]
    for name, digests in actual.items():
        expected = params.get(name)
        if isinstance(expected, dict) and expected != digests:
            states = sorted(k for k in set(expected) | set(digests) if expected.get(k) != digests.get(k))
            problems.append(f"{name}: {', '.join(states)} differ from the certificate")
    return problems
