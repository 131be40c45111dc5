"""Google Cloud Storage (gs://, gcsfs) on fake-gcs-server: the store contract, the create-only
manifest commit against racing writers, backend errors, and a checkpoint's life through the CLI."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from ckptkit.errors import AccessDeniedError, NotFoundError
from ckptkit.storage import Store, StoreCapabilities, open_store
from ckptkit.testing import DEFAULT_STATE_MACHINE_SETTINGS, StoreContractTests
from tests.object_store_cases import assert_clean_failure, cli, corrupt_then_verify, end_to_end, race_create
from tests.test_store_contract import DocumentedCapabilities, FsspecRaw

# Every test talks to the emulator over HTTP, most through several CLI subprocesses.
pytestmark = pytest.mark.slow


class TestGCSStore(DocumentedCapabilities, StoreContractTests):
    documented_capabilities = StoreCapabilities(
        atomic_rename=False, conditional_create=True, durable_writes=True
    )
    # Every step is an HTTP request to the emulator: fewer, shorter sequences.
    state_machine_settings = settings(DEFAULT_STATE_MACHINE_SETTINGS, max_examples=20, stateful_step_count=25)

    @pytest.fixture
    def store(self, gcs_bucket: str) -> Iterator[Store]:
        with open_store(f"{gcs_bucket}/root") as store:
            yield store

    @pytest.fixture
    def raw(self, gcs_bucket: str) -> FsspecRaw:
        from gcsfs.core import GCSFileSystem

        fs = GCSFileSystem(token="anon", skip_instance_cache=True, use_listings_cache=False)
        return FsspecRaw(fs, f"{gcs_bucket.removeprefix('gs://')}/root")


def test_racing_create_only_writers_one_wins(gcs_bucket: str) -> None:
    race_create(f"{gcs_bucket}/run/step-00000001")


def test_create_only_of_a_large_object_is_refused_when_it_exists(gcs_bucket: str) -> None:
    """Past gcsfs's 50 MiB resumable-upload threshold the precondition still holds."""
    store = open_store(f"{gcs_bucket}/run")
    big = os.urandom(51 << 20)
    store.put("big.bin", big, mode="create")
    with pytest.raises(FileExistsError):
        store.put("big.bin", b"other", mode="create")
    assert store.get("big.bin", 0, 16) == big[:16] and store.head("big.bin").size == len(big)


def test_checkpoint_life_through_the_cli(gcs_bucket: str, gcs_endpoint: str, tmp_path: Path) -> None:
    end_to_end(f"{gcs_bucket}/run", f"{gcs_bucket}/mirror", tmp_path)


def test_a_corrupted_object_is_a_finding(gcs_bucket: str) -> None:
    corrupt_then_verify(f"{gcs_bucket}/run")


def test_missing_bucket_is_not_found(gcs_endpoint: str) -> None:
    store = open_store("gs://no-such-bucket-ckptkit/run")
    with pytest.raises(NotFoundError, match="no-such-bucket-ckptkit"):
        list(store.list())
    with pytest.raises(NotFoundError):
        store.get("x")
    assert_clean_failure(cli("ls", "gs://no-such-bucket-ckptkit/run"), 4, "no-such-bucket-ckptkit")


def test_refused_connection_is_a_storage_error(monkeypatch: pytest.MonkeyPatch, gcs_endpoint: str) -> None:
    import socket

    with socket.socket() as sock:  # a port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
    # gcsfs retries a refused connection six times over some 30 s before giving up: once here.
    out = cli("ls", "gs://bucket/run", env=dict(os.environ))
    assert_clean_failure(out, 4, "gs://bucket/run: cannot connect")


def test_missing_credentials_name_what_to_set(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "none.json"))
    with pytest.raises(AccessDeniedError, match="no Google Cloud credentials found: set GOOGLE_APPLICATION"):
        open_store("gs://bucket/run", token="google_default")
