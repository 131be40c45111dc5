"""Stores: one contract over local disk and object stores. Torch-free."""

from __future__ import annotations

import logging
import os
from typing import Any

from ckptkit.errors import BackendMissingError, InvalidURLError
from ckptkit.storage.base import ObjectInfo, Store, StoreCapabilities, WriteMode
from ckptkit.storage.local import LocalStore

__all__ = [
    "LocalStore",
    "ObjectInfo",
    "Store",
    "StoreCapabilities",
    "WriteMode",
    "open_store",
    "split_parent",
    "split_url",
]

# scheme -> (package that provides it, how to install it)
_BACKENDS = {
    "s3": ("s3fs", "pip install 'ckptkit[s3]'"),
    "s3a": ("s3fs", "pip install 'ckptkit[s3]'"),
    "gs": ("gcsfs", "pip install 'ckptkit[gcs]'"),
    "gcs": ("gcsfs", "pip install 'ckptkit[gcs]'"),
    "az": ("adlfs", "pip install 'ckptkit[azure]'"),
    "abfs": ("adlfs", "pip install 'ckptkit[azure]'"),
    "abfss": ("adlfs", "pip install 'ckptkit[azure]'"),
}


def split_url(url: str) -> tuple[str | None, str]:
    """``("s3", "bucket/run")`` for ``s3://bucket/run``; ``(None, path)`` for a local path."""
    if "://" not in url:
        return None, url
    scheme, rest = url.split("://", 1)
    if not scheme.isidentifier() and not scheme.replace("-", "").isalnum():
        raise InvalidURLError(f"not a URL or path: {url!r}")
    return scheme.lower(), rest


def split_parent(url: str | os.PathLike[str]) -> tuple[str, str]:
    """``("s3://b/run", "step-1")`` for ``s3://b/run/step-1``; the same for local paths."""
    text = os.fspath(url).rstrip("/")
    scheme, sep, rest = text.partition("://")
    body = rest if sep else text
    if "/" not in body.strip("/"):
        if sep:
            raise InvalidURLError(f"{text!r}: a checkpoint needs a parent (s3://bucket/name at least)")
        # "/data" lies in the filesystem root, not in the working directory.
        return ("/", body.lstrip("/")) if body.startswith("/") else (".", body)
    parent, name = body.rsplit("/", 1)
    return (f"{scheme}://{parent}" if sep else parent or "/"), name


def open_store(url: str | os.PathLike[str] | Store, **options: Any) -> Store:
    """Open the store rooted at ``url``: a local path, ``file://``, ``s3://``, ``memory://``...

    ``options`` go to the backend (for S3: ``endpoint_url``, ``key``, ``secret``, ``profile``,
    ``anon``...). Without them S3 takes credentials and endpoint the way the AWS tools do:
    environment variables (incl. ``AWS_ENDPOINT_URL``), then the shared config and profile.
    ``gs://`` (gcsfs) does as Google's tools do: ``STORAGE_EMULATOR_HOST`` names an emulator
    (then no credentials are sent), else application default credentials; ``az://`` and
    ``abfs://`` (adlfs) read ``AZURE_STORAGE_CONNECTION_STRING`` or ``AZURE_STORAGE_ACCOUNT_NAME``
    and its key. docs/storage.md has a section per store.
    """
    if isinstance(url, Store):
        return url
    url = os.fspath(url)
    if not url:
        raise InvalidURLError("empty path or URL")
    scheme, rest = split_url(url)
    if scheme in (None, "file", "local"):
        unknown = sorted(set(options) - {"fsync"})
        if unknown:
            raise InvalidURLError(f"storage options {', '.join(unknown)} do not apply to local path {rest!r}")
        return LocalStore(rest, **options)
    return _open_fsspec(scheme, url, options)


def _open_fsspec(scheme: str, url: str, options: dict[str, Any]) -> Store:
    import fsspec
    from fsspec.registry import known_implementations

    from ckptkit.storage.fsspec_store import FsspecStore, translate_backend_errors

    if scheme not in known_implementations and scheme not in fsspec.available_protocols():
        raise InvalidURLError(f"unknown URL scheme {scheme!r} in {url!r}")
    try:
        fs_class = fsspec.get_filesystem_class(scheme)
    except ImportError as exc:
        package, install = _BACKENDS.get(scheme, (scheme, str(exc)))
        raise BackendMissingError(scheme, package, install) from exc
    if scheme in ("s3", "s3a"):
        options = _s3_options(options)
    elif scheme in ("gs", "gcs"):
        fs_class, options = _gcs_class_and_options(fs_class, options)
    elif scheme in ("az", "abfs", "abfss"):
        options = _fresh_listings(options)
    with translate_backend_errors(url):
        fs = fs_class(**options)
    root = fs_class._strip_protocol(url)
    return FsspecStore(fs, scheme, root)


def _fresh_listings(options: dict[str, Any]) -> dict[str, Any]:
    options = dict(options)
    # Listings must be fresh: other processes (ranks, a sync, a crashed writer) change the bucket.
    options.setdefault("use_listings_cache", False)
    options.setdefault("skip_instance_cache", True)
    return options


def _s3_options(options: dict[str, Any]) -> dict[str, Any]:
    options = _fresh_listings(options)
    # botocore reads AWS_ENDPOINT_URL itself since 1.31; passing it explicitly also covers
    # older botocore releases and the S3-specific variable.
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint and "endpoint_url" not in options:
        options["endpoint_url"] = endpoint
    if "region" in options:
        options.setdefault("client_kwargs", {})["region_name"] = options.pop("region")
    return options


def _gcs_class_and_options(fs_class: type, options: dict[str, Any]) -> tuple[type, dict[str, Any]]:
    # gcsfs logs each failure it gives up on with a traceback, then raises it; ckptkit reports
    # the raised error once, translated. Without a handler of its own, Python's last-resort
    # handler would print that traceback on stderr; applications that configure logging still
    # see the records.
    logging.getLogger("gcsfs").addHandler(logging.NullHandler())
    options = _fresh_listings(options)
    emulator = os.environ.get("STORAGE_EMULATOR_HOST", "") not in ("", "default")
    if emulator:
        # As Google's own client libraries do: an emulator takes no credentials, and looking for
        # them (the GCE metadata server among others) only costs time.
        options.setdefault("token", "anon")
    if emulator or "endpoint_url" in options:
        # gcsfs's default class first asks the storage control API, over gRPC, whether a bucket
        # is zonal; an emulator has no such API and each bucket would wait a minute for the
        # answer. The JSON API class does everything ckptkit needs.
        from gcsfs.core import GCSFileSystem

        fs_class = GCSFileSystem
    return fs_class, options
