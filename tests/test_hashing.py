"""Chunked digests under each algorithm: the ways of computing one agree, however the bytes are
cut into pieces, and equal what the hash primitives give when the scheme is applied by hand."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import blake3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ckptkit.hashing import (
    BLAKE3_TREE,
    CHUNK_SIZE,
    DEFAULT_ALGORITHM,
    SHA256_TREE,
    IncrementalDigest,
    StreamingDigest,
    algorithm_of,
    choose_algorithm,
    digest_bytes,
    digest_object,
    digest_objects,
    hash_range,
    root_digest,
)
from ckptkit.storage import open_store

CHUNK = 64  # a small chunk size, so that pieces cross chunk boundaries in every way
PRIMITIVES: dict[str, Callable[[bytes], bytes]] = {
    SHA256_TREE: lambda b: hashlib.sha256(b).digest(),
    BLAKE3_TREE: lambda b: blake3.blake3(b).digest(),
}


def by_hand(algorithm: str, data: bytes, chunk: int) -> tuple[tuple[str, ...], str]:
    """The chunk digests and root, computed from the primitive alone, as docs/manifest.md says."""
    h = PRIMITIVES[algorithm]
    raw = [h(data[i : i + chunk]) for i in range(0, max(len(data), 1), chunk)]
    return tuple(r.hex() for r in raw), f"{algorithm}:{h(b''.join(raw)).hex()}"


@settings(max_examples=100, deadline=None)
@given(
    algorithm=st.sampled_from([SHA256_TREE, BLAKE3_TREE]),
    data=st.binary(max_size=700),
    cuts=st.lists(st.integers(min_value=0, max_value=700), max_size=12),
)
def test_streaming_and_incremental_digests_agree(algorithm: str, data: bytes, cuts: list[int]) -> None:
    streaming = StreamingDigest(CHUNK, algorithm=algorithm)
    incremental = IncrementalDigest(CHUNK, algorithm=algorithm)
    bounds = [0, *sorted(c for c in cuts if c <= len(data)), len(data)]
    for start, end in itertools.pairwise(bounds):
        streaming.update(data[start:end])
        incremental.update(data[start:end])

    expected_chunks, expected_root = by_hand(algorithm, data, CHUNK)
    for digest in (streaming.result(), incremental.result()):
        assert digest.size == len(data)
        assert digest.chunks == expected_chunks
        assert digest.digest == expected_root == root_digest(expected_chunks, algorithm)
        assert digest.algorithm == algorithm


def test_blake3_tree_known_answers() -> None:
    """Values fixed by the BLAKE3 specification, so the scheme cannot drift with the library:
    BLAKE3("") and BLAKE3("abc") are the reference test vectors."""
    empty = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
    abc = "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85"
    assert digest_bytes(b"").chunks == (empty,)
    assert digest_bytes(b"abc").chunks == (abc,)
    root = blake3.blake3(bytes.fromhex(abc)).hexdigest()
    assert digest_bytes(b"abc").digest == f"blake3-tree:{root}"


def test_default_is_blake3_and_sha256_selectable() -> None:
    assert DEFAULT_ALGORITHM == BLAKE3_TREE
    assert digest_bytes(b"x").digest.startswith("blake3-tree:")
    sha = digest_bytes(b"x", algorithm="sha256")
    assert sha.digest.startswith("sha256-tree:")
    assert sha.chunks == (hashlib.sha256(b"x").hexdigest(),)


def test_multi_chunk_file_matches_by_hand() -> None:
    data = bytes(range(256)) * ((CHUNK_SIZE + 1000) // 256)
    for algorithm in (BLAKE3_TREE, SHA256_TREE):
        digest = digest_bytes(data, algorithm=algorithm)
        assert (digest.chunks, digest.digest) == by_hand(algorithm, data, CHUNK_SIZE)
        assert len(digest.chunks) == 2


def test_algorithm_of_names_the_recorded_algorithm() -> None:
    assert algorithm_of("blake3-tree:" + "ab" * 32) == BLAKE3_TREE
    assert algorithm_of("sha256-tree:" + "ab" * 32) == SHA256_TREE
    for bad in ("md5-tree:" + "ab" * 32, "ab" * 32, ""):
        with pytest.raises(ValueError, match="names no known algorithm"):
            algorithm_of(bad)


def test_choose_algorithm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CKPTKIT_DIGEST", raising=False)
    assert choose_algorithm() == BLAKE3_TREE
    assert choose_algorithm("sha256") == choose_algorithm("sha256-tree") == SHA256_TREE
    assert choose_algorithm("blake3") == BLAKE3_TREE
    expected_names = r"unknown digest algorithm 'md5' \(expected one of blake3, sha256\)"
    with pytest.raises(ValueError, match=expected_names):
        choose_algorithm("md5")
    with pytest.raises(ValueError, match="unknown digest algorithm"):
        StreamingDigest(algorithm="crc32")

    monkeypatch.setenv("CKPTKIT_DIGEST", "sha256")  # a site's policy, where the caller names none
    assert choose_algorithm() == SHA256_TREE
    assert choose_algorithm("blake3") == BLAKE3_TREE  # the caller's choice wins
    monkeypatch.setenv("CKPTKIT_DIGEST", "sha1")
    with pytest.raises(ValueError, match="CKPTKIT_DIGEST: unknown digest algorithm 'sha1'"):
        choose_algorithm()


@pytest.mark.parametrize("algorithm", [BLAKE3_TREE, SHA256_TREE])
def test_stored_objects_digest_as_streamed(tmp_path: Path, algorithm: str) -> None:
    store = open_store(tmp_path)
    files = {"a.bin": b"a" * 5000, "empty": b"", "b/c.bin": bytes(range(256)) * 40}
    for key, data in files.items():
        store.put(key, data)
    heard: list[int] = []
    with ThreadPoolExecutor(2) as pool:
        many = list(digest_objects(store, [(k, len(v)) for k, v in files.items()], pool,
                                   algorithm=algorithm, on_bytes=heard.append))
        one = digest_object(store, "a.bin", 5000, pool, algorithm=algorithm)
    assert many == [digest_bytes(v, algorithm=algorithm) for v in files.values()]
    assert one == many[0]
    assert sum(heard) == sum(len(v) for v in files.values())
    middle = hash_range(store, "a.bin", 100, 200, algorithm=algorithm)
    assert middle == PRIMITIVES[algorithm](b"a" * 100).hex()


def test_digest_objects_stops_queued_work_when_one_fails(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    store.put("present", b"x")
    with ThreadPoolExecutor(1) as pool:
        digests = digest_objects(store, [("missing", 10), ("present", 1)], pool)
        with pytest.raises(FileNotFoundError):
            list(digests)
