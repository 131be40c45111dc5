"""The Store contract (ckptkit.testing), run against every store: local disk, fsspec memory, S3
(moto over HTTP) and the read-only byte-range store that convert reads DCP items through.

Each store's ``raw`` fixture reaches the same bytes without the store: plain files, the fsspec
memory filesystem, boto3.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from hypothesis import settings

from ckptkit.errors import AlreadyExistsError
from ckptkit.ops.convert_source import _RangeStore
from ckptkit.storage import LocalStore, Store, StoreCapabilities, open_store
from ckptkit.storage.mapped import Located, MappedStore
from ckptkit.storage.read_cache import ReadCache
from ckptkit.testing import DEFAULT_STATE_MACHINE_SETTINGS, ReadOnlyStoreContractTests, StoreContractTests


class DirectoryRaw:
    """Objects as plain files below a directory."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def get(self, key: str) -> bytes | None:
        path = self.root / key
        return path.read_bytes() if path.is_file() else None

    def put(self, key: str, data: bytes) -> None:
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


class FsspecRaw:
    """Objects as files of an fsspec filesystem below ``root`` (a path without protocol)."""

    def __init__(self, fs: Any, root: str) -> None:
        self.fs, self.root = fs, root

    def get(self, key: str) -> bytes | None:
        path = f"{self.root}/{key}"
        return self.fs.cat_file(path) if self.fs.isfile(path) else None

    def put(self, key: str, data: bytes) -> None:
        self.fs.pipe_file(f"{self.root}/{key}", data)


class S3Raw:
    """Objects of a bucket below ``root``, through boto3."""

    def __init__(self, client: Any, bucket: str, root: str) -> None:
        self.client, self.bucket, self.root = client, bucket, root

    def get(self, key: str) -> bytes | None:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=f"{self.root}/{key}")["Body"].read()
        except self.client.exceptions.NoSuchKey:
            return None

    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=f"{self.root}/{key}", Body=data)


class DocumentedCapabilities:
    """The capabilities table of docs/storage.md, per store (the suites check them against behaviour)."""

    documented_capabilities: ClassVar[StoreCapabilities]

    def test_declares_the_documented_capabilities(self, store: Store) -> None:
        assert store.capabilities == self.documented_capabilities


class TestLocalStore(DocumentedCapabilities, StoreContractTests):
    documented_capabilities = StoreCapabilities(
        atomic_rename=True, conditional_create=True, durable_writes=True, hard_links=True
    )

    @pytest.fixture
    def store(self, tmp_path: Path) -> Iterator[Store]:
        with open_store(tmp_path / "store") as store:
            yield store

    def test_link_names_the_same_bytes_twice(self, store: Store, tmp_path: Path) -> None:
        store.put("a/x.bin", b"payload")
        store.link("a/x.bin", "b/c/y.bin")
        assert store.get("b/c/y.bin") == b"payload"
        assert (tmp_path / "store/a/x.bin").stat().st_ino == (tmp_path / "store/b/c/y.bin").stat().st_ino
        with pytest.raises(AlreadyExistsError):
            store.link("a/x.bin", "b/c/y.bin")
        store.delete("a/x.bin")  # the other name keeps the bytes
        assert store.get("b/c/y.bin") == b"payload"

    def test_parent_is_one_level_up(self, store: Store, tmp_path: Path) -> None:
        store.child("run/step-1").parent().put("f", b"1")
        assert (tmp_path / "store/run/f").read_bytes() == b"1"

    @pytest.fixture
    def raw(self, tmp_path: Path) -> DirectoryRaw:
        return DirectoryRaw(tmp_path / "store")


class TestMemoryStore(DocumentedCapabilities, StoreContractTests):
    documented_capabilities = StoreCapabilities(
        atomic_rename=False, conditional_create=True, durable_writes=False
    )

    @pytest.fixture
    def root(self) -> Iterator[str]:
        import fsspec

        root = f"/ckptkit-test-{uuid.uuid4().hex[:12]}/root"
        yield root
        fs = fsspec.filesystem("memory")
        if fs.exists(root):
            fs.rm(root, recursive=True)

    @pytest.fixture
    def store(self, root: str) -> Iterator[Store]:
        with open_store(f"memory://{root}") as store:
            yield store

    @pytest.fixture
    def raw(self, root: str) -> FsspecRaw:
        import fsspec

        return FsspecRaw(fsspec.filesystem("memory"), root)


class TestS3Store(DocumentedCapabilities, StoreContractTests):
    documented_capabilities = StoreCapabilities(
        atomic_rename=False, conditional_create=True, durable_writes=True
    )
    keeps_user_metadata = True
    # Every step is an HTTP request to moto: fewer, shorter sequences.
    state_machine_settings = settings(DEFAULT_STATE_MACHINE_SETTINGS, max_examples=20, stateful_step_count=25)

    @pytest.fixture
    def store(self, s3_bucket: str) -> Iterator[Store]:
        with open_store(f"{s3_bucket}/root") as store:
            yield store

    @pytest.fixture
    def raw(self, s3_bucket: str, s3_endpoint: str) -> S3Raw:
        import boto3

        client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
        return S3Raw(client, s3_bucket.removeprefix("s3://"), "root")


# Bytes around the range, which the range store must neither show nor change.
_PADDING = b"<outside the range>"


class RangeRaw:
    """The range's bytes read from the file that holds them, padding cut off."""

    def __init__(self, root: Path, key: str, length: int) -> None:
        self.root, self.key, self.length = root, key, length

    def get(self, key: str) -> bytes | None:
        path = self.root / key
        if not path.is_file():
            return None
        data = path.read_bytes()
        if key != self.key:
            return data
        assert data[: len(_PADDING)] == data[len(_PADDING) + self.length :] == _PADDING
        return data[len(_PADDING) : len(_PADDING) + self.length]


class TestRangeStore(DocumentedCapabilities, ReadOnlyStoreContractTests):
    """convert reads each DCP item (a torch.save file inside a larger file) through this view."""

    documented_capabilities = StoreCapabilities(
        atomic_rename=False, conditional_create=False, durable_writes=False, read_only=True
    )

    objects: ClassVar[dict[str, bytes]] = {"a/bc/item.distcp": bytes(range(256)) * 4}

    @pytest.fixture
    def store(self, tmp_path: Path) -> Store:
        ((key, data),) = self.objects.items()
        DirectoryRaw(tmp_path).put(key, _PADDING + data + _PADDING)
        return _RangeStore(LocalStore(tmp_path), key, len(_PADDING), len(data))

    @pytest.fixture
    def raw(self, tmp_path: Path) -> RangeRaw:
        ((key, data),) = self.objects.items()
        return RangeRaw(tmp_path, key, len(data))



class TestReadCache(DocumentedCapabilities, ReadOnlyStoreContractTests):
    """Structural verify reads each file through this view: small reads kept, listed sizes known."""

    documented_capabilities = StoreCapabilities(
        atomic_rename=False, conditional_create=False, durable_writes=False, read_only=True
    )

    @pytest.fixture
    def store(self, tmp_path: Path) -> Store:
        raw = DirectoryRaw(tmp_path)
        for key, data in self.objects.items():
            raw.put(key, data)
        inner = LocalStore(tmp_path)
        return ReadCache(inner, {info.key: info.size for info in inner.list("")})

    @pytest.fixture
    def raw(self, tmp_path: Path) -> DirectoryRaw:
        return DirectoryRaw(tmp_path)


class MappedRaw:
    """A mapped store's objects, read where they lie."""

    def __init__(self, root: Path, where: dict[str, str]) -> None:
        self.directory = DirectoryRaw(root)
        self.where = where

    def get(self, key: str) -> bytes | None:
        return self.directory.get(self.where[key]) if key in self.where else None


class TestMappedStore(DocumentedCapabilities, ReadOnlyStoreContractTests):
    """A deduplicated checkpoint's files are read through this view: each name maps to an
    object elsewhere (the root's blob store), under another key."""

    documented_capabilities = StoreCapabilities(
        atomic_rename=False, conditional_create=False, durable_writes=False, read_only=True
    )

    def _where(self) -> dict[str, str]:
        names = {key: uuid.uuid5(uuid.NAMESPACE_URL, key).hex for key in self.objects}
        return {key: f".blobs/{name[:2]}/{name}" for key, name in names.items()}

    @pytest.fixture
    def store(self, tmp_path: Path) -> Store:
        raw, inner = DirectoryRaw(tmp_path), LocalStore(tmp_path)
        located = {}
        for key, target in self._where().items():
            raw.put(target, self.objects[key])
            located[key] = Located(inner, target, len(self.objects[key]))
        return MappedStore(str(tmp_path / "ckpt"), located)

    @pytest.fixture
    def raw(self, tmp_path: Path) -> MappedRaw:
        return MappedRaw(tmp_path, self._where())
