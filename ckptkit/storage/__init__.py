"""Stores: one contract over local disk and object stores. Torch-free."""

from __future__ import annotations

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
    "gs": ("gcsfs", "pip install gcsfs"),
    "gcs": ("gcsfs", "pip install gcsfs"),
    "az": ("adlfs", "pip install adlfs"),
    "abfs": ("adlfs", "pip install adlfs"),
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
    with translate_backend_errors(url):
        fs = fs_class(**options)
    root = fs_class._strip_protocol(url)
    return FsspecStore(fs, scheme, root)


def _s3_options(options: dict[str, Any]) -> dict[str, Any]:
    options = dict(options)
    # Listings must be fresh: other processes (ranks, a sync, a crashed writer) change the bucket.
    options.setdefault("use_listings_cache", False)
    options.setdefault("skip_instance_cache", True)
    # botocore reads AWS_ENDPOINT_URL itself since 1.31; passing it explicitly also covers
    # older botocore releases and the S3-specific variable.
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint and "endpoint_url" not in options:
        options["endpoint_url"] = endpoint
    if "region" in options:
        options.setdefault("client_kwargs", {})["region_name"] = options.pop("region")
    return options
