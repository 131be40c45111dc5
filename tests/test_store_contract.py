"""The Store contract, run against every store: local disk, fsspec memory, and S3 (moto/HTTP)."""

from __future__ import annotations

import os
import threading

import pytest

from ckptkit.errors import AlreadyExistsError, InvalidURLError, NotFoundError, StorageError
from ckptkit.storage import Store


def test_put_get_roundtrip_and_ranges(any_store: Store) -> None:
    data = bytes(range(256)) * 4
    info = any_store.put("a/b/blob.bin", data)
    assert info.size == len(data)
    assert any_store.get("a/b/blob.bin") == data
    assert any_store.get("a/b/blob.bin", 10, 20) == data[10:20]
    assert any_store.get("a/b/blob.bin", 1000) == data[1000:]
    assert any_store.get("a/b/blob.bin", 5, 5) == b""
    assert any_store.head("a/b/blob.bin").size == len(data)


def test_put_streams_chunks(any_store: Store) -> None:
    chunks = [os.urandom(1 << 20) for _ in range(3)] + [b"", b"tail"]
    info = any_store.put("big.bin", (c for c in chunks))
    assert info.size == sum(map(len, chunks))
    assert any_store.get("big.bin") == b"".join(chunks)


def test_multipart_sized_stream(any_store: Store) -> None:
    # Larger than the streaming block (16 MiB): S3 takes the multipart path.
    part = os.urandom(1 << 20)
    any_store.put("multi.bin", (part for _ in range(20)))
    assert any_store.head("multi.bin").size == 20 << 20
    assert any_store.get("multi.bin", (19 << 20) + 5, (19 << 20) + 9) == part[5:9]


def test_empty_object(any_store: Store) -> None:
    any_store.put("empty", b"")
    assert any_store.get("empty") == b""
    assert any_store.head("empty").size == 0


def test_missing_keys_raise_not_found(any_store: Store) -> None:
    calls = (
        lambda: any_store.get("nope"),
        lambda: any_store.head("nope"),
        lambda: any_store.open_read("nope"),
    )
    for call in calls:
        with pytest.raises(NotFoundError) as excinfo:
            call()
        assert isinstance(excinfo.value, FileNotFoundError)
        assert "nope" in str(excinfo.value)
    assert not any_store.exists("nope")


def test_create_mode_refuses_existing(any_store: Store) -> None:
    any_store.put("k", b"first", mode="create")
    with pytest.raises(AlreadyExistsError) as excinfo:
        any_store.put("k", b"second", mode="create")
    assert isinstance(excinfo.value, FileExistsError)
    assert any_store.get("k") == b"first"
    any_store.put("k", b"third")  # overwrite is the default
    assert any_store.get("k") == b"third"


def test_concurrent_create_has_exactly_one_winner(any_store: Store) -> None:
    assert any_store.capabilities.conditional_create
    results: list[str] = []
    barrier = threading.Barrier(6)

    def racer(i: int) -> None:
        barrier.wait()
        try:
            any_store.put("race", f"writer-{i}".encode(), mode="create")
            results.append(f"writer-{i}")
        except AlreadyExistsError:
            results.append("lost")

    threads = [threading.Thread(target=racer, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r for r in results if r != "lost"]
    assert len(winners) == 1
    assert any_store.get("race").decode() == winners[0]


def test_failed_stream_leaves_no_object(any_store: Store) -> None:
    def broken():
        yield b"x" * 1000
        raise RuntimeError("producer died")

    with pytest.raises(RuntimeError):
        any_store.put("partial", broken())
    assert not any_store.exists("partial")
    assert [i.key for i in any_store.list("")] == []


def test_list_is_recursive_relative_and_prefix_exact(any_store: Store) -> None:
    for key in ("ab/x", "a/1", "a/sub/2", "b"):
        any_store.put(key, key.encode())
    assert sorted(i.key for i in any_store.list("a")) == ["a/1", "a/sub/2"]
    assert sorted(i.key for i in any_store.list("")) == ["a/1", "a/sub/2", "ab/x", "b"]
    assert list(any_store.list("missing")) == []
    assert any_store.list_dirs("") == ["a", "ab"]
    assert any_store.list_dirs("a") == ["sub"]
    assert any_store.list_dirs("missing") == []
    sizes = {i.key: i.size for i in any_store.list("")}
    assert sizes["a/sub/2"] == len(b"a/sub/2")


def test_delete_and_delete_prefix(any_store: Store) -> None:
    any_store.put("d/1", b"1")
    any_store.put("d/e/2", b"2")
    any_store.put("keep", b"k")
    any_store.delete("d/1")
    any_store.delete("d/1")  # missing is not an error
    assert not any_store.exists("d/1")
    any_store.delete_prefix("d")
    assert [i.key for i in any_store.list("")] == ["keep"]
    assert any_store.list_dirs("") == []


def test_copy_and_streaming_read(any_store: Store) -> None:
    data = os.urandom(3 << 20)
    any_store.put("src", data)
    any_store.copy("src", "dir/dst")
    with any_store.open_read("dir/dst") as f:
        f.seek(1 << 20)
        assert f.read(10) == data[1 << 20 : (1 << 20) + 10]


def test_child_store_is_rooted(any_store: Store) -> None:
    child = any_store.child("run/step-1")
    child.put("file", b"hello")
    assert any_store.get("run/step-1/file") == b"hello"
    assert [i.key for i in child.list("")] == ["file"]
    assert child.url.endswith("run/step-1")


@pytest.mark.parametrize("key", ["/abs", "../up", "a/../b", "a//b", "a/./b", "nul\x00", "back\\slash"])
def test_invalid_keys_are_refused(any_store: Store, key: str) -> None:
    with pytest.raises(InvalidURLError):
        any_store.put(key, b"x")


def test_rename_prefix_when_declared(any_store: Store) -> None:
    if not any_store.capabilities.atomic_rename:
        with pytest.raises(TypeError):
            any_store.rename_prefix("a", "b")
        return
    any_store.put("stage/f", b"1")
    any_store.rename_prefix("stage", "final")
    assert any_store.get("final/f") == b"1"
    any_store.put("stage2/f", b"2")
    with pytest.raises(AlreadyExistsError):
        any_store.rename_prefix("stage2", "final")
    assert any_store.get("final/f") == b"1"


def test_errors_are_storage_errors(any_store: Store) -> None:
    with pytest.raises(StorageError):
        any_store.get("missing")
