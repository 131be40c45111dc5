"""The two ways of computing a file digest agree, however the bytes are cut into pieces."""

from __future__ import annotations

import hashlib
import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from ckptkit.hashing import IncrementalDigest, StreamingDigest, root_digest

CHUNK = 64  # a small chunk size, so that pieces cross chunk boundaries in every way


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=700), cuts=st.lists(st.integers(min_value=0, max_value=700), max_size=12))
def test_streaming_and_incremental_digests_agree(data: bytes, cuts: list[int]) -> None:
    streaming, incremental = StreamingDigest(CHUNK), IncrementalDigest(CHUNK)
    bounds = [0, *sorted(c for c in cuts if c <= len(data)), len(data)]
    for start, end in itertools.pairwise(bounds):
        streaming.update(data[start:end])
        incremental.update(data[start:end])

    expected_chunks = tuple(
        hashlib.sha256(data[i : i + CHUNK]).hexdigest() for i in range(0, max(len(data), 1), CHUNK)
    )
    for digest in (streaming.result(), incremental.result()):
        assert digest.size == len(data)
        assert digest.chunks == expected_chunks
        assert digest.digest == root_digest(expected_chunks)
