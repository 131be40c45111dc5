"""Azure Blob Storage (az://, adlfs) on Azurite: the store contract, the create-only manifest
commit against racing writers, backend errors, and a checkpoint's life through the CLI."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from ckptkit.errors import NotFoundError
from ckptkit.storage import Store, StoreCapabilities, open_store
from ckptkit.testing import DEFAULT_STATE_MACHINE_SETTINGS, StoreContractTests
from tests.object_store_cases import assert_clean_failure, cli, corrupt_then_verify, end_to_end, race_create
from tests.test_store_contract import DocumentedCapabilities, FsspecRaw

# Every test talks to the emulator over HTTP, most through several CLI subprocesses.
pytestmark = pytest.mark.slow


class TestAzureStore(DocumentedCapabilities, StoreContractTests):
    documented_capabilities = StoreCapabilities(
        atomic_rename=False, conditional_create=True, durable_writes=True
    )
    # Every step is an HTTP request to the emulator: fewer, shorter sequences.
    state_machine_settings = settings(DEFAULT_STATE_MACHINE_SETTINGS, max_examples=8, stateful_step_count=20)

    @pytest.fixture
    def store(self, azure_container: str) -> Iterator[Store]:
        with open_store(f"{azure_container}/root") as store:
            yield store

    @pytest.fixture
    def raw(self, azure_container: str) -> FsspecRaw:
        from adlfs import AzureBlobFileSystem

        fs = AzureBlobFileSystem(skip_instance_cache=True, use_listings_cache=False)
        return FsspecRaw(fs, f"{azure_container.removeprefix('az://')}/root")


def test_racing_create_only_writers_one_wins(azure_container: str) -> None:
    race_create(f"{azure_container}/run/step-00000001")


def test_checkpoint_life_through_the_cli(azure_container: str, azure_endpoint: str, tmp_path: Path) -> None:
    end_to_end(f"{azure_container}/run", f"{azure_container}/mirror", tmp_path)


def test_a_corrupted_object_is_a_finding(azure_container: str) -> None:
    corrupt_then_verify(f"{azure_container}/run")


def test_missing_bucket_is_not_found(azure_endpoint: str) -> None:
    store = open_store("az://no-such-bucket-ckptkit/run")
    with pytest.raises(NotFoundError, match="no-such-bucket-ckptkit"):
        list(store.list())
    with pytest.raises(NotFoundError):
        store.get("x")
    assert_clean_failure(cli("ls", "az://no-such-bucket-ckptkit/run"), 4, "no-such-bucket-ckptkit")


def test_missing_credentials_name_what_to_set(azure_endpoint: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AZURE_")}
    assert_clean_failure(cli("ls", "az://container/run", env=env), 4,
                         "az://container/run: no Azure credentials found: "
                         "set AZURE_STORAGE_CONNECTION_STRING")
