"""The Store contract (``ckptkit/storage/base.py``, ``docs/storage.md``) as a pytest suite.

Modelled on zarr-python's ``zarr.testing.store.StoreTests``: subclass :class:`StoreContractTests`
(or :class:`ReadOnlyStoreContractTests`) in a ``test_*.py`` file with a name starting with
``Test``, provide two fixtures, and pytest runs every contract test on your store:

- ``store``: the store under test, empty (a read-only store: holding exactly ``objects``);
- ``raw``: a second way to the same bytes that does not go through the store (plain ``open``
  for files, the fsspec filesystem, boto3 for S3). The suite places objects and checks writes
  through it, so a broken ``put`` cannot hide behind a broken ``get`` that agrees with it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, settings

from ckptkit.errors import (
    AlreadyExistsError,
    InvalidURLError,
    NotFoundError,
    ReadOnlyStoreError,
    StorageError,
)
from ckptkit.storage.base import Store, StoreCapabilities
from ckptkit.testing.model import (
    directories,
    dirs_below,
    edge_ranges,
    expected_listing,
    probe_prefixes,
)
from ckptkit.testing.raw import RawAccess, RawReader
from ckptkit.testing.state_machine import run_state_machine

# Objects whose keys trip a store that treats prefixes as strings: "a/b" is a string prefix of
# "a/bc/x" but not a path prefix of it, and "ab" is an object beside the directory "a".
SAMPLE_OBJECTS: dict[str, bytes] = {
    "a/b/blob.bin": bytes(range(256)) * 4,
    "a/bc/x": b"under a/bc, not under a/b",
    "ab": b"an object whose name starts like the directory a",
    "empty": b"",
    "z/deep/er/leaf": b"three directories down",
}

INVALID_KEYS = ["/abs", "../up", "a/../b", "a//b", "a/./b", "nul\x00", "back\\slash"]

# Bounded so the state machine takes seconds per store; a slow backend (S3 over HTTP) overrides
# ``state_machine_settings`` with fewer examples. One bug at a time: shrinking several distinct
# failures together can take minutes.
DEFAULT_STATE_MACHINE_SETTINGS = settings(
    max_examples=100,
    stateful_step_count=40,
    deadline=None,
    report_multiple_bugs=False,
    suppress_health_check=[HealthCheck.too_slow],
)


class _ReadContract:
    """Contract tests that only read; they run on every store, read-only ones included."""

    objects: ClassVar[dict[str, bytes]] = SAMPLE_OBJECTS
    state_machine_settings: ClassVar[settings] = DEFAULT_STATE_MACHINE_SETTINGS

    @pytest.fixture
    def store(self) -> Store:
        raise NotImplementedError(f"{type(self).__name__} must provide a `store` fixture")

    @pytest.fixture
    def raw(self) -> RawReader:
        raise NotImplementedError(f"{type(self).__name__} must provide a `raw` fixture")

    @pytest.fixture
    def filled_store(self, store: Store) -> Store:
        """The store under test holding exactly ``objects``."""
        return store

    def test_get_returns_each_object(self, filled_store: Store) -> None:
        for key, data in self.objects.items():
            assert filled_store.get(key) == data, key

    def test_ranged_get_slices_like_python(self, filled_store: Store) -> None:
        for key, data in self.objects.items():
            for start, end in edge_ranges(len(data)):
                assert filled_store.get(key, start, end) == data[start:end], (key, start, end)

    def test_head_and_exists(self, filled_store: Store) -> None:
        for key, data in self.objects.items():
            info = filled_store.head(key)
            assert (info.key, info.size) == (key, len(data))
            assert filled_store.exists(key)
        for prefix in directories(self.objects):  # a "directory" is not an object
            with pytest.raises(NotFoundError):
                filled_store.head(prefix)
            assert not filled_store.exists(prefix)

    def test_missing_keys_raise_not_found(self, filled_store: Store) -> None:
        calls: list[Callable[[], object]] = [
            lambda: filled_store.get("nope"),
            lambda: filled_store.get("nope", 0, 1),
            lambda: filled_store.get("nope", 3, 3),  # an empty range of nothing is still nothing
            lambda: filled_store.head("nope"),
            lambda: filled_store.open_read("nope"),
            lambda: filled_store.user_metadata("nope"),
        ]
        for call in calls:
            with pytest.raises(NotFoundError) as excinfo:
                call()
            assert isinstance(excinfo.value, FileNotFoundError)
            assert "nope" in str(excinfo.value)
        assert not filled_store.exists("nope")

    def test_open_read_seeks_and_reads(self, filled_store: Store) -> None:
        key, data = max(self.objects.items(), key=lambda item: len(item[1]))
        middle = len(data) // 2
        with filled_store.open_read(key) as f:
            assert f.read() == data
            assert f.read() == b""
            f.seek(middle)
            assert f.tell() == middle
            assert f.read(10) == data[middle : middle + 10]
            f.seek(0)
            assert f.read(3) == data[:3]
            assert f.read() == data[3:]

    def test_open_read_with_a_known_size(self, filled_store: Store) -> None:
        for key, data in self.objects.items():
            with filled_store.open_read(key, size=len(data)) as f:
                assert f.read() == data, key
                f.seek(len(data) // 3)
                assert f.read(7) == data[len(data) // 3 : len(data) // 3 + 7], key
        key, data = max(self.objects.items(), key=lambda item: len(item[1]))
        end = len(data) // 2  # the end of what a caller will read: reads stop there
        with filled_store.open_read(key, size=end) as f:
            f.seek(end - 5)
            assert f.read(5) == data[end - 5 : end]

    def test_read_ranges_matches_get(self, filled_store: Store) -> None:
        for key, data in self.objects.items():
            ranges = [(s, e) for s, e in edge_ranges(len(data)) if s is not None and e is not None]
            ranges += [(0, 3), (1, 2), (0, len(data)), (2, 1), (len(data) + 5, len(data) + 9)]
            got = filled_store.read_ranges(key, ranges)
            assert got == [data[s:e] for s, e in ranges], key
            assert filled_store.read_ranges(key, []) == []
        with pytest.raises(NotFoundError):
            filled_store.read_ranges("nope", [(0, 10)])

    def test_list_is_recursive_and_prefix_exact(self, filled_store: Store) -> None:
        for prefix in probe_prefixes(self.objects):
            listed = [(info.key, info.size) for info in filled_store.list(prefix)]
            assert len(listed) == len(set(listed)), prefix
            assert dict(listed) == expected_listing(self.objects, prefix), prefix

    def test_list_dirs_names_immediate_prefixes(self, filled_store: Store) -> None:
        for prefix in probe_prefixes(self.objects):
            assert sorted(filled_store.list_dirs(prefix)) == dirs_below(self.objects, prefix), prefix

    def test_child_reads_below_its_prefix(self, filled_store: Store) -> None:
        for prefix in directories(self.objects):
            child = filled_store.child(prefix)
            below = {k[len(prefix) + 1 :]: v for k, v in self.objects.items() if k.startswith(prefix + "/")}
            assert child.url.rstrip("/").endswith(prefix)
            assert {info.key: info.size for info in child.list("")} == expected_listing(below, "")
            for key, data in below.items():
                assert child.get(key) == data

    @pytest.mark.parametrize("key", INVALID_KEYS)
    def test_invalid_keys_are_refused_by_reads(self, filled_store: Store, key: str) -> None:
        for call in (filled_store.get, filled_store.head):
            with pytest.raises(InvalidURLError) as excinfo:
                call(key)
            assert isinstance(excinfo.value, ValueError)

    def test_errors_subclass_builtins(self, filled_store: Store) -> None:
        with pytest.raises(StorageError) as excinfo:
            filled_store.get("missing")
        assert isinstance(excinfo.value, FileNotFoundError)
        assert isinstance(excinfo.value, OSError)

    def test_capabilities_are_declared(self, filled_store: Store) -> None:
        capabilities = filled_store.capabilities
        assert isinstance(capabilities, StoreCapabilities)
        if capabilities.read_only:  # nothing to rename or create in a store that refuses writes
            assert not capabilities.atomic_rename
            assert not capabilities.conditional_create


class StoreContractTests(_ReadContract):
    """The whole Store contract. Fixtures: ``store`` (empty, writable) and ``raw`` (:class:`RawAccess`).

    Set ``keeps_user_metadata = True`` where ``put(metadata=...)`` is stored (S3), and
    ``state_machine_settings`` to bound the random sequences on a slow backend.
    """

    keeps_user_metadata: ClassVar[bool] = False

    @pytest.fixture
    def filled_store(self, store: Store, raw: RawAccess) -> Store:
        for key, data in self.objects.items():
            raw.put(key, data)
        return store

    def test_declares_writable(self, store: Store) -> None:
        assert not store.capabilities.read_only

    def test_put_get_roundtrip_and_ranges(self, store: Store, raw: RawAccess) -> None:
        data = bytes(range(256)) * 4
        info = store.put("a/b/blob.bin", data)
        assert (info.key, info.size) == ("a/b/blob.bin", len(data))
        assert raw.get("a/b/blob.bin") == data
        assert store.get("a/b/blob.bin") == data
        assert store.get("a/b/blob.bin", 10, 20) == data[10:20]
        assert store.get("a/b/blob.bin", 1000) == data[1000:]
        assert store.get("a/b/blob.bin", 5, 5) == b""
        assert store.head("a/b/blob.bin").size == len(data)

    def test_put_overwrites_by_default(self, store: Store, raw: RawAccess) -> None:
        raw.put("k", b"old and longer")
        store.put("k", b"new")
        assert raw.get("k") == b"new"
        assert store.head("k").size == 3

    def test_put_streams_chunks(self, store: Store, raw: RawAccess) -> None:
        chunks = [os.urandom(1 << 20) for _ in range(3)] + [b"", bytearray(b"tail"), memoryview(b"!")]
        info = store.put("big.bin", (c for c in chunks))
        assert info.size == sum(map(len, chunks))
        assert raw.get("big.bin") == b"".join(chunks)
        assert store.get("big.bin") == b"".join(chunks)

    def test_multipart_sized_stream(self, store: Store, raw: RawAccess) -> None:
        # Larger than the streaming block (16 MiB): S3 takes the multipart path.
        part = os.urandom(1 << 20)
        store.put("multi.bin", (part for _ in range(20)))
        assert store.head("multi.bin").size == 20 << 20
        assert store.get("multi.bin", (19 << 20) + 5, (19 << 20) + 9) == part[5:9]
        assert raw.get("multi.bin") == part * 20

    def test_empty_object(self, store: Store, raw: RawAccess) -> None:
        store.put("empty", b"")
        assert raw.get("empty") == b""
        assert store.get("empty") == b""
        assert store.head("empty").size == 0

    def test_create_mode_refuses_existing(self, store: Store, raw: RawAccess) -> None:
        store.put("k", b"first", mode="create")
        assert raw.get("k") == b"first"
        with pytest.raises(AlreadyExistsError) as excinfo:
            store.put("k", b"second", mode="create")
        assert isinstance(excinfo.value, FileExistsError)
        with pytest.raises(AlreadyExistsError):
            store.put("k", iter([b"streamed ", b"second"]), mode="create")
        assert store.get("k") == b"first"
        assert raw.get("k") == b"first"
        store.put("k", b"third")  # overwrite is the default
        assert store.get("k") == b"third"

    def test_create_mode_refuses_an_object_placed_directly(self, store: Store, raw: RawAccess) -> None:
        raw.put("placed", b"by someone else")
        with pytest.raises(AlreadyExistsError):
            store.put("placed", b"mine", mode="create")
        assert raw.get("placed") == b"by someone else"

    def test_concurrent_create_has_exactly_one_winner(self, store: Store) -> None:
        if not store.capabilities.conditional_create:
            pytest.skip("the store declares no conditional_create: concurrent creators may both win")
        results: list[str] = []
        barrier = threading.Barrier(6)

        def racer(i: int) -> None:
            barrier.wait()
            try:
                store.put("race", f"writer-{i}".encode(), mode="create")
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
        assert store.get("race").decode() == winners[0]

    def test_failed_stream_leaves_no_object(self, store: Store, raw: RawAccess) -> None:
        def broken() -> Iterator[bytes]:
            yield b"x" * 1000
            raise RuntimeError("producer died")

        with pytest.raises(RuntimeError, match="producer died"):  # the caller's own error, unchanged
            store.put("partial", broken())
        assert not store.exists("partial")
        assert raw.get("partial") is None
        assert [i.key for i in store.list("")] == []

    def test_list_what_put_wrote(self, store: Store) -> None:
        for key in ("ab/x", "a/1", "a/sub/2", "b"):
            store.put(key, key.encode())
        assert sorted(i.key for i in store.list("a")) == ["a/1", "a/sub/2"]
        assert sorted(i.key for i in store.list("")) == ["a/1", "a/sub/2", "ab/x", "b"]
        assert list(store.list("missing")) == []
        assert store.list_dirs("") == ["a", "ab"]
        assert store.list_dirs("a") == ["sub"]
        assert store.list_dirs("missing") == []
        sizes = {i.key: i.size for i in store.list("")}
        assert sizes["a/sub/2"] == len(b"a/sub/2")

    def test_user_metadata(self, store: Store) -> None:
        store.put("with-meta", b"x", metadata={"digest": "sha256:00ff"})
        store.put("streamed-meta", iter([b"a", b"b"]), metadata={"k": "v"})
        expected = {"digest": "sha256:00ff"} if self.keeps_user_metadata else {}
        assert store.user_metadata("with-meta") == expected
        assert store.user_metadata("streamed-meta") == ({"k": "v"} if self.keeps_user_metadata else {})
        store.put("no-meta", b"x")
        assert store.user_metadata("no-meta") == {}

    def test_delete_and_delete_prefix(self, store: Store, raw: RawAccess) -> None:
        store.put("d/1", b"1")
        store.put("d/e/2", b"2")
        store.put("keep", b"k")
        store.delete("d/1")
        store.delete("d/1")  # missing is not an error
        assert not store.exists("d/1")
        assert raw.get("d/1") is None
        store.delete_prefix("d")
        assert [i.key for i in store.list("")] == ["keep"]
        assert store.list_dirs("") == []
        assert raw.get("d/e/2") is None
        assert raw.get("keep") == b"k"

    def test_delete_prefix_is_a_path_prefix(self, store: Store, raw: RawAccess) -> None:
        for key in ("a/b/1", "a/bc/2", "ab"):
            raw.put(key, key.encode())
        store.delete_prefix("a/b")
        assert raw.get("a/b/1") is None
        assert raw.get("a/bc/2") == b"a/bc/2"
        assert raw.get("ab") == b"ab"
        store.delete_prefix("a/bc/2")  # an object is not a prefix: nothing lies below it
        assert raw.get("a/bc/2") == b"a/bc/2"
        store.delete_prefix("no-such-prefix")
        assert sorted(i.key for i in store.list("")) == ["a/bc/2", "ab"]

    def test_copy_and_streaming_read(self, store: Store, raw: RawAccess) -> None:
        data = os.urandom(3 << 20)
        store.put("src", data)
        store.copy("src", "dir/dst")
        assert raw.get("dir/dst") == data
        assert raw.get("src") == data
        with store.open_read("dir/dst") as f:
            f.seek(1 << 20)
            assert f.read(10) == data[1 << 20 : (1 << 20) + 10]

    def test_copy_overwrites_and_needs_a_source(self, store: Store, raw: RawAccess) -> None:
        raw.put("src", b"source")
        raw.put("dst", b"older, longer destination")
        store.copy("src", "dst")
        assert raw.get("dst") == b"source"
        with pytest.raises(NotFoundError):
            store.copy("missing", "elsewhere")
        assert raw.get("elsewhere") is None

    def test_copy_onto_itself_leaves_the_object(self, store: Store, raw: RawAccess) -> None:
        raw.put("same", b"unchanged")
        store.copy("same", "same")  # S3's CopyObject refuses this; the contract does not
        assert raw.get("same") == b"unchanged"
        with pytest.raises(NotFoundError):
            store.copy("missing", "missing")

    def test_child_store_is_rooted(self, store: Store, raw: RawAccess) -> None:
        child = store.child("run/step-1")
        child.put("file", b"hello")
        assert raw.get("run/step-1/file") == b"hello"
        assert store.get("run/step-1/file") == b"hello"
        assert [i.key for i in child.list("")] == ["file"]
        assert child.url.endswith("run/step-1")
        assert child.child("inner").url.endswith("run/step-1/inner")
        child.delete("file")
        assert raw.get("run/step-1/file") is None

    @pytest.mark.parametrize("key", INVALID_KEYS)
    def test_invalid_keys_are_refused(self, store: Store, raw: RawAccess, key: str) -> None:
        with pytest.raises(InvalidURLError):
            store.put(key, b"x")
        assert [i.key for i in store.list("")] == []

    def test_rename_prefix_when_declared(self, store: Store, raw: RawAccess) -> None:
        if not store.capabilities.atomic_rename:
            with pytest.raises(TypeError):
                store.rename_prefix("a", "b")
            return
        store.put("stage/f", b"1")
        store.rename_prefix("stage", "final")
        assert store.get("final/f") == b"1"
        assert raw.get("stage/f") is None
        assert raw.get("final/f") == b"1"
        store.put("stage2/f", b"2")
        with pytest.raises(AlreadyExistsError):
            store.rename_prefix("stage2", "final")
        assert store.get("final/f") == b"1"
        assert raw.get("stage2/f") == b"2"

    def test_sync_prefix_keeps_what_was_written(self, store: Store, raw: RawAccess) -> None:
        store.put("run/a/1", b"1")
        store.sync_prefix("run")
        store.sync_prefix("")
        store.sync_prefix("no-such-prefix")  # nothing to make durable is not an error
        assert raw.get("run/a/1") == b"1"

    def test_errors_are_storage_errors(self, store: Store) -> None:
        with pytest.raises(StorageError):
            store.get("missing")

    def test_random_operations_match_a_dict_model(self, store: Store, raw: RawAccess) -> None:
        run_state_machine(store, raw, settings=self.state_machine_settings)


# Every write of the contract, aimed at an object ``key`` below ``directory`` or at nothing.
_WRITES: dict[str, Callable[[Store, str, str], Any]] = {
    "put": lambda s, key, directory: s.put(key, b"x"),
    "put new key": lambda s, key, directory: s.put("new-key", b"x"),
    "put create": lambda s, key, directory: s.put("new-key", b"x", mode="create"),
    "put streamed": lambda s, key, directory: s.put("new-key", iter([b"a", b"b"])),
    "delete": lambda s, key, directory: s.delete(key),
    "delete missing": lambda s, key, directory: s.delete("new-key"),
    "delete_prefix": lambda s, key, directory: s.delete_prefix(directory),
    "delete_prefix root": lambda s, key, directory: s.delete_prefix(""),
    "copy": lambda s, key, directory: s.copy(key, "new-key"),
    "rename_prefix": lambda s, key, directory: s.rename_prefix(directory or key, "new-key"),
}


class ReadOnlyStoreContractTests(_ReadContract):
    """The contract of a store that declares ``read_only``: every read as for any store, and
    every write refused with :class:`ReadOnlyStoreError`, changing nothing.

    Fixtures: ``store`` (holding exactly ``objects``, placed without the store) and ``raw``
    (:class:`RawReader`). Override ``objects`` where the store holds fewer or other objects.
    """

    def test_declares_read_only(self, store: Store) -> None:
        assert store.capabilities.read_only

    @pytest.mark.parametrize("write", sorted(_WRITES))
    def test_writes_are_refused_and_change_nothing(self, store: Store, raw: RawReader, write: str) -> None:
        key = max(self.objects, key=lambda k: k.count("/"))
        with pytest.raises(ReadOnlyStoreError) as excinfo:
            _WRITES[write](store, key, key.rpartition("/")[0])
        assert isinstance(excinfo.value, StorageError)
        for name, data in self.objects.items():
            assert raw.get(name) == data
            assert store.get(name) == data
        assert raw.get("new-key") is None
        assert not store.exists("new-key")

    def test_random_reads_and_refused_writes_match_a_dict_model(self, store: Store, raw: RawReader) -> None:
        run_state_machine(store, raw, objects=self.objects, settings=self.state_machine_settings)
