"""How DeepSpeed ZeRO cuts parameters into data-parallel partitions: the arithmetic, in one place.

ZeRO-1/2 (``stage_1_and_2.py``): a param group's trainable params are flattened back to back,
the buffer is zero-padded at the tail to a multiple of ``2 × dp`` (the NCCL start alignment
factor 2 times the data-parallel size), and cut into ``dp`` equal consecutive partitions; rank
``r`` owns ``[r·p, (r+1)·p)``. Several tail ranks can own nothing but padding.

ZeRO-3 (``stage3.py``): every param is partitioned on its own into ``ceil(numel / dp)``
elements per rank, the tail rank's slice zero-padded; a rank's flat buffer is its slice of each
param, back to back, in flattening order. (shared/reference/resharding.md §1.1, §1.2.)
"""

from __future__ import annotations

NCCL_START_ALIGNMENT_FACTOR = 2
# The manifest metadata entry of a checkpoint ``ckptkit reshard`` wrote: where it came from, the
# RNG rule applied, and the conservation certificate ``verify`` re-checks.
RESHARD_KEY = "reshard"


def flat_partition_numel(numel: int, dp: int) -> int:
    """ZeRO-1/2: elements per rank of a group of ``numel`` elements at ``dp`` ranks (padding included)."""
    alignment = NCCL_START_ALIGNMENT_FACTOR * dp
    return -(-numel // alignment) * alignment // dp


def flat_partition_span(numel: int, dp: int, rank: int) -> tuple[int, int]:
    """ZeRO-1/2: the ``[start, end)`` of the group's real elements rank ``rank`` owns (empty when
    its partition is all padding)."""
    p = flat_partition_numel(numel, dp)
    return min(rank * p, numel), min((rank + 1) * p, numel)


def flat_group_padding(numel: int, dp: int, rank: int) -> int:
    """ZeRO-1/2: ``group_paddings[g]`` on ``rank``: padding elements at the end of its partition."""
    start, end = flat_partition_span(numel, dp, rank)
    return flat_partition_numel(numel, dp) - (end - start)


def param_partition_numel(numel: int, dp: int) -> int:
    """ZeRO-3: elements per rank of one param of ``numel`` elements (``ceil(numel / dp)``)."""
    return -(-numel // dp)


def param_partition_span(numel: int, dp: int, rank: int) -> tuple[int, int]:
    """ZeRO-3: the ``[start, end)`` of the param's real elements rank ``rank`` holds."""
    part = param_partition_numel(numel, dp)
    start = min(rank * part, numel)
    return start, min(start + part, numel)
