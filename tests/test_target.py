"""One answer to "is PATH a file or a directory?", and what it costs on S3.

``verify``, ``scan``, ``doctor``, ``inspect``, ``convert`` and ``safe_load`` all ask
:func:`ckptkit.storage.target.resolve_target`. On an object store it costs one metadata
request, counted here at a proxy in front of the moto server.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import boto3
import pytest
from click.testing import CliRunner

from ckptkit.cli.main import cli
from ckptkit.errors import NotFoundError, NotRegularFileError
from ckptkit.storage import open_store
from ckptkit.storage.target import resolve_target
from tests.faulty_proxy import FaultyProxy


def _torch_file() -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.save({"w": torch.arange(6.0).reshape(2, 3), "step": 3}, buffer)
    return buffer.getvalue()


def _data_reads(proxy: FaultyProxy, key_path: str) -> list[int]:
    """Positions in the proxy's log of GETs of the object itself (not listings)."""
    return [i for i, (method, path, _) in enumerate(proxy.log) if method == "GET" and path == key_path]


def test_verify_of_an_s3_file_makes_one_metadata_request_before_reading(
    faulty_s3: FaultyProxy, faulty_bucket: str, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = faulty_bucket.removeprefix("s3://")
    direct = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    direct.put_object(Bucket=bucket, Key="run/step-3/model.pt", Body=_torch_file())
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", faulty_s3.url)  # ckptkit's S3 client goes via the proxy
    faulty_s3.reset_counters()

    result = CliRunner().invoke(cli, ["verify", f"{faulty_bucket}/run/step-3/model.pt"])

    assert result.exit_code == 0, result.output
    assert "structural-ok" in result.output  # the file was read and checked, not just found
    key_path = f"/{bucket}/run/step-3/model.pt"
    reads = _data_reads(faulty_s3, key_path)
    assert reads, faulty_s3.log
    before = [(method, path) for method, path, _ in faulty_s3.log[: reads[0]]]
    assert before == [("HEAD", key_path)]


def test_a_local_file_a_directory_and_a_missing_path(tmp_path: Path) -> None:
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "model.pt").write_bytes(b"12345")
    found = resolve_target(tmp_path / "ckpt" / "model.pt")
    assert found.is_file and found.key == "model.pt" and found.size == 5
    assert found.store.url == open_store(tmp_path / "ckpt").url
    directory = resolve_target(tmp_path / "ckpt")
    assert not directory.is_file and directory.store.url == open_store(tmp_path / "ckpt").url
    with pytest.raises(NotFoundError, match="no such file or directory"):
        resolve_target(tmp_path / "missing")


def test_a_named_link_is_followed_and_a_fifo_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (real / "model.pt").write_bytes(b"x")
    (tmp_path / "alias.pt").symlink_to(real / "model.pt")
    found = resolve_target(tmp_path / "alias.pt")
    assert found.key == "model.pt" and found.store.url == open_store(real).url
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(NotRegularFileError, match="FIFO"):
        resolve_target(tmp_path / "pipe")


def test_s3_file_prefix_and_bucket(s3_bucket: str) -> None:
    open_store(s3_bucket).put("run/step-1/model.pt", b"abc")
    found = resolve_target(f"{s3_bucket}/run/step-1/model.pt")
    assert found.is_file and found.key == "model.pt" and found.size == 3
    assert found.url == f"{s3_bucket}/run/step-1/model.pt"
    for prefix in (f"{s3_bucket}/run/step-1", f"{s3_bucket}/run/step-1/"):
        directory = resolve_target(prefix)
        assert not directory.is_file and [o.key for o in directory.store.list("")] == ["model.pt"]
    assert not resolve_target(s3_bucket).is_file  # a bucket has no parent: a directory
