"""Shared fixtures: a real S3 server (moto over HTTP on 127.0.0.1) and stores of every kind."""

from __future__ import annotations

import multiprocessing as mp
import os
import uuid
from collections.abc import Iterator

import pytest

from ckptkit.storage import Store, open_store

# Real checkpoints (plain torch, transformers.Trainer, multi-rank DeepSpeed), generated lazily
# once per session; the fault-injecting S3 proxy; the GCS and Azure emulators.
pytest_plugins = [
    "tests.fixtures.real_checkpoints",
    "tests.fixtures.faulty_s3",
    "tests.fixtures.object_stores",
]

S3_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server on a free loopback port, for the whole session.

    The endpoint and dummy credentials go into os.environ the way the AWS tools read them, so
    code under test and the subprocesses it starts find the server without extra options.
    """
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in [*S3_CREDENTIALS, "AWS_ENDPOINT_URL"]}
    os.environ.update(S3_CREDENTIALS, AWS_ENDPOINT_URL=endpoint)
    yield endpoint
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> str:
    """A fresh, empty bucket; returns its ``s3://`` URL."""
    import boto3

    name = f"ckptkit-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(params=["local", "memory", "s3"])
def any_store(request: pytest.FixtureRequest, tmp_path) -> Iterator[Store]:
    """An empty store of each kind the contract covers."""
    if request.param == "local":
        store = open_store(tmp_path / "store")
    elif request.param == "memory":
        store = open_store(f"memory://ckptkit-test-{uuid.uuid4().hex[:12]}/root")
    else:
        store = open_store(request.getfixturevalue("s3_bucket") + "/root")
    yield store
    if request.param == "memory":
        store.delete_prefix("")
    store.close()


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The S3 run of a test that also runs on the local and memory stores is slow (moto over
    HTTP); the quick loop keeps the local and memory runs and the tests written for S3 alone."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        on_s3 = callspec is not None and callspec.params.get("any_store") == "s3"
        if on_s3 or (item.cls is not None and item.cls.__name__ == "TestS3Store"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def forkserver(s3_endpoint: str) -> mp.context.BaseContext:
    """The crash tests' forkserver. A process has ONE forkserver, started on first use with the
    environment and preload of that moment, and every child inherits them: so it is made here,
    once, after the S3 server (its endpoint and credentials must reach every child), preloading
    what every crash test's children import (each restart then costs milliseconds)."""
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(
        ["torch", "ckptkit", "ckptkit.native", "tests.crash_worker", "tests.async_crash_worker", "s3fs"]
    )
    return context

