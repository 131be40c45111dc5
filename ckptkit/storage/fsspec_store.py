"""A store over any fsspec filesystem: ``s3://`` (s3fs), ``memory://``, and others installed.

Backend exceptions (botocore, aiohttp, fsspec's builtin-error translations) are turned into
ckptkit errors here and nowhere else.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import io
import posixpath
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, BinaryIO

from ckptkit.errors import (
    PERMANENT_ERRNOS,
    AccessDeniedError,
    AlreadyExistsError,
    CkptkitError,
    InvalidURLError,
    NotFoundError,
    PermanentStorageError,
    StorageError,
)
from ckptkit.storage import ranged
from ckptkit.storage.base import (
    Chunks,
    ObjectInfo,
    Store,
    StoreCapabilities,
    WriteMode,
    iter_chunks,
    normalize_key,
)
from ckptkit.storage.conditional import CONDITIONAL_CREATE as _CONDITIONAL_CREATE
from ckptkit.storage.conditional import put_if_absent
from ckptkit.storage.fsspec_reads import streamer, submitter
from ckptkit.storage.s3_client import release as release_data_path
from ckptkit.storage.s3_multipart import upload_stream

_STREAM_BLOCK = 16 << 20
# Object stores whose root's first segment is a bucket (GCS) or container (Azure).
_BUCKETED = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"}


# Connection failures by class name: aiohttp, botocore and the builtins share no base class.
_CONNECTION_ERRORS = {
    "ConnectionError", "ClientConnectionError", "ClientConnectorError", "ServerDisconnectedError",
    "EndpointConnectionError", "ConnectTimeoutError", "ServerTimeoutError",
}


def _connection_failure(exc: BaseException) -> BaseException | None:
    """The connection error behind ``exc``, if any. fsspec's http ``info`` turns every failure,
    a refused connection included, into FileNotFoundError: "not found" would be a wrong answer."""
    seen: BaseException | None = exc
    while seen is not None:
        if any(cls.__name__ in _CONNECTION_ERRORS for cls in type(seen).__mro__):
            return seen
        seen = seen.__cause__  # only a deliberate "raise ... from": a context may be a retry's past
    return None


def _range_refused(exc: BaseException) -> bool:
    """HTTP 416: s3fs raises it as OSError(EINVAL), gcsfs as its HttpError with ``code``, the
    Azure SDK as HttpResponseError with ``status_code``."""
    if isinstance(exc, OSError):
        return exc.errno == errno.EINVAL
    return 416 in (getattr(exc, "code", None), getattr(exc, "status_code", None))


def _credentials_hint(exc: BaseException) -> str | None:
    name = type(exc).__name__
    if name in ("NoCredentialsError", "PartialCredentialsError"):
        return (
            "no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            "AWS_PROFILE, or pass key=/secret= storage options"
        )
    if name == "DefaultCredentialsError":  # google.auth, raised by gcsfs
        return (
            "no Google Cloud credentials found: set GOOGLE_APPLICATION_CREDENTIALS, run "
            "`gcloud auth application-default login`, or pass token= (token='anon' for public data)"
        )
    if isinstance(exc, ValueError) and "connection_string or account_name" in str(exc):  # adlfs
        return (
            "no Azure credentials found: set AZURE_STORAGE_CONNECTION_STRING, or "
            "AZURE_STORAGE_ACCOUNT_NAME with AZURE_STORAGE_ACCOUNT_KEY or AZURE_STORAGE_SAS_TOKEN, "
            "or pass account_name=/account_key= storage options"
        )
    return None


class ProducerError(Exception):
    """Wraps an exception raised by the caller's data iterator, so it is not mistaken for a
    backend failure and translated."""

    def __init__(self, original: BaseException) -> None:
        super().__init__(str(original))
        self.original = original


def _guarded(chunks: Chunks) -> Iterator[memoryview]:
    iterator = iter(iter_chunks(chunks))
    while True:
        try:
            chunk = next(iterator)
        except StopIteration:
            return
        except Exception as exc:
            raise ProducerError(exc) from exc
        yield chunk


@contextlib.contextmanager
def translate_backend_errors(what: str) -> Iterator[None]:
    """Turn backend exceptions into ckptkit errors that name ``what`` failed."""
    try:
        yield
    except (CkptkitError, ProducerError):
        raise
    except Exception as exc:  # botocore, aiohttp and friends have no common base class
        raise _translated(what, exc) from exc


def _translated(what: str, exc: Exception) -> CkptkitError:
    failure = _connection_failure(exc)
    if failure is not None:
        return StorageError(f"{what}: cannot connect: {_reason(failure)}")
    if isinstance(exc, FileNotFoundError):
        return NotFoundError(f"{what}: not found ({_reason(exc)})")
    if isinstance(exc, FileExistsError):
        return AlreadyExistsError(f"{what}: already exists")
    if isinstance(exc, PermissionError):
        return AccessDeniedError(f"{what}: access denied ({_reason(exc)})")
    hint = _credentials_hint(exc)
    if hint:
        return AccessDeniedError(f"{what}: {hint}")
    if isinstance(exc, OSError) and exc.errno in PERMANENT_ERRNOS:
        return PermanentStorageError(f"{what}: {_reason(exc)}")
    return StorageError(f"{what}: {type(exc).__name__}: {_reason(exc)}")


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _find_options(fs: Any) -> dict[str, Any]:
    """fsspec's generic ``find`` walks directory by directory and drops any it cannot list (a
    refused connection lists as empty); told to raise, it fails instead. Filesystems with a find
    of their own (s3fs lists flat, memory scans its dict) take no such option."""
    from fsspec.asyn import AsyncFileSystem
    from fsspec.spec import AbstractFileSystem

    cls = type(fs)
    generic = cls._find is AsyncFileSystem._find if issubclass(cls, AsyncFileSystem) else (
        cls.find is AbstractFileSystem.find
    )
    return {"on_error": "raise"} if generic else {}


def _mtime(info: dict[str, Any]) -> float | None:
    for field in ("LastModified", "mtime", "created", "last_modified"):
        value = info.get(field)
        if isinstance(value, dt.datetime):
            return value.timestamp()
        if isinstance(value, (int, float)):
            return float(value)
    return None


class FsspecStore(Store):
    """Objects are files of an fsspec filesystem below ``root`` (a path without protocol)."""

    def __init__(self, fs: Any, protocol: str, root: str) -> None:
        self.fs = fs
        self.protocol = protocol
        self.root = root.rstrip("/")
        self.capabilities = StoreCapabilities(
            atomic_rename=False,
            conditional_create=protocol in _CONDITIONAL_CREATE,
            durable_writes=protocol != "memory",
        )

    @property
    def url(self) -> str:
        return self._url(self.root)

    def _url(self, path: str) -> str:
        # fsspec's http(s) paths are whole URLs already; every other protocol's drop the scheme.
        return path if "://" in path else f"{self.protocol}://{path}"

    def child(self, prefix: str) -> FsspecStore:
        return FsspecStore(self.fs, self.protocol, self._path(prefix))

    def parent(self) -> FsspecStore:
        parent = posixpath.dirname(self.root)
        if not parent.strip("/"):
            raise InvalidURLError(f"{self.url}: a bucket has no parent")
        return FsspecStore(self.fs, self.protocol, parent)

    def _path(self, key: str) -> str:
        if not key:
            return self.root
        return f"{self.root}/{normalize_key(key)}" if self.root else normalize_key(key)

    def _key(self, path: str) -> str:
        return path[len(self.root) :].lstrip("/")

    # --- reads ---------------------------------------------------------------------------

    def get(self, key: str, start: int | None = None, end: int | None = None) -> bytes:
        path = self._path(key)
        with translate_backend_errors(self._describe(key)):
            if end is not None and end <= (start or 0):  # s3fs reads get(k, None, 0) as the whole object
                self.head(key)  # an empty range of a missing object is still NotFoundError
                return b""
            if self._ranged_reads:
                if end is not None and end - (start or 0) > ranged.REQUEST_SIZE:
                    return ranged.read_ranges(self._submit(key), [(start or 0, end)])[0]  # concurrent parts
                # One GET, ranged or whole, and no HEAD first (a range at or past the end is b"").
                return bytes(ranged.fetch(self._submit(key), start, end).data)
            try:
                return self.fs.cat_file(path, start=start, end=end)
            except Exception as exc:
                # A range that starts at or past the end is refused by some backends (416,
                # EINVAL); the contract, like a slice, gives b"" there. The HEAD is paid only then.
                if _range_refused(exc) and (start or 0) >= self.head(key).size:
                    return b""
                raise

    def open_read(self, key: str, *, size: int | None = None) -> BinaryIO:
        with translate_backend_errors(self._describe(key)):
            if self.protocol == "memory":
                # memory:// hands out its one stored file object; readers need their own cursor.
                return io.BytesIO(self.fs.cat_file(self._path(key)))
            submit = self._submit(key)
            first = None
            if size is None and self._ranged_reads:
                # The first block's answer names the object's size (Content-Range): no HEAD.
                first = ranged.fetch(submit, 0, ranged.MIN_BLOCK)
                size = first.size if first.size is not None else self.head(key).size  # empty: 416
            elif size is None:
                size = self.head(key).size
        what = self._describe(key)
        guard = lambda: translate_backend_errors(what)  # noqa: E731 - the reader enters it per wait
        open_stream = streamer(self.fs, self.protocol, self._path(key))
        return ranged.RangedReader(submit, size, what, first=first, guard=guard, open_stream=open_stream)

    def read_ranges(self, key: str, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        if self.protocol == "memory" or not any(end > start for start, end in ranges):
            return super().read_ranges(key, ranges)  # in-process bytes; or no request to make
        with translate_backend_errors(self._describe(key)):
            return ranged.read_ranges(self._submit(key), ranges)

    @property
    def _ranged_reads(self) -> bool:
        """Whether this backend's answers carry the object's size (S3's Content-Range)."""
        return self.protocol in ("s3", "s3a")

    def _submit(self, key: str) -> ranged.Submit:
        return submitter(self.fs, self.protocol, self._path(key))

    def head(self, key: str) -> ObjectInfo:
        with translate_backend_errors(self._describe(key)):
            info = self.fs.info(self._path(key))
        if info.get("type") == "directory":
            raise NotFoundError(f"{self._describe(key)}: is a prefix, not an object")
        return ObjectInfo(key, int(info["size"]), _mtime(info))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        path = self._path(prefix)
        with translate_backend_errors(self._describe(prefix)):
            self.fs.invalidate_cache()
            try:
                found = self.fs.find(path, detail=True, withdirs=False, **_find_options(self.fs))
            except FileNotFoundError:
                self._check_bucket()
                return
            if not found:  # adlfs lists a missing container as empty instead of raising
                self._check_bucket()
            if isinstance(found, list):  # adlfs's find of an object's own path: names, detail or not
                found = {name: self.fs.info(name) for name in found}
        for name, info in sorted(found.items()):
            # fsspec's find of an object's own path returns that object, but nothing lies
            # *below* an object: listing "a/x" must not yield "a/x" (nor delete_prefix delete it).
            if info.get("type") == "directory" or name.rstrip("/") == path:
                continue
            yield ObjectInfo(self._key(name), int(info["size"]), _mtime(info))

    def list_dirs(self, prefix: str = "") -> list[str]:
        path = self._path(prefix)
        with translate_backend_errors(self._describe(prefix)):
            self.fs.invalidate_cache()
            try:
                entries = self.fs.ls(path, detail=True)
            except FileNotFoundError:
                self._check_bucket()
                return []
        names = (e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e["type"] == "directory")
        return sorted(names)

    # --- writes --------------------------------------------------------------------------

    def put(
        self,
        key: str,
        data: bytes | Chunks,
        mode: WriteMode = "overwrite",
        *,
        metadata: Mapping[str, str] | None = None,
    ) -> ObjectInfo:
        path = self._path(key)
        extra = self._metadata_kwargs(metadata)
        try:
            with translate_backend_errors(self._describe(key)):
                if isinstance(data, (bytes, bytearray, memoryview)):
                    size = self._put_bytes(path, bytes(data), mode, extra)
                else:
                    size = self._put_stream(path, data, mode, extra)
                self.fs.invalidate_cache(path)
        except ProducerError as exc:
            raise exc.original from None  # the caller's own failure, not the backend's
        return ObjectInfo(key, size)

    def _metadata_kwargs(self, metadata: Mapping[str, str] | None) -> dict[str, Any]:
        # Only S3 has user metadata; s3fs passes Metadata to PutObject/CreateMultipartUpload.
        return {"Metadata": dict(metadata)} if metadata and self.protocol in ("s3", "s3a") else {}

    def user_metadata(self, key: str) -> dict[str, str]:
        if self.protocol not in ("s3", "s3a"):
            return super().user_metadata(key)
        with translate_backend_errors(self._describe(key)):
            return dict(self.fs.metadata(self._path(key), refresh=True))

    def _put_bytes(self, path: str, data: bytes, mode: WriteMode, extra: dict[str, Any]) -> int:
        if mode == "create" and not self.capabilities.conditional_create:
            if self.fs.exists(path):
                raise FileExistsError(path)
            mode = "overwrite"
        if mode == "create":
            put_if_absent(self.fs, self.protocol, path, data, extra)
        elif self.protocol in ("s3", "s3a"):
            # The threaded data path, like a stream: no payload SHA-256 on s3fs's event loop.
            upload_stream(self.fs, path, iter([memoryview(data)]), extra)
        else:
            self.fs.pipe_file(path, data, mode=mode, **extra)
        return len(data)

    def _put_stream(self, path: str, data: Chunks, mode: WriteMode, extra: dict[str, Any]) -> int:
        if mode == "create" or self.protocol == "memory":
            # Create-only is used for small commit objects, and the memory filesystem publishes
            # a file when it is opened: buffer, then publish in one atomic call.
            return self._put_bytes(path, b"".join(bytes(c) for c in _guarded(data)), mode, extra)
        if self.protocol in ("s3", "s3a"):
            return upload_stream(self.fs, path, _guarded(data), extra)
        size = 0
        # autocommit=False: the object is published by commit(), after the last byte, and
        # discard() aborts the multipart upload, so a failure midway publishes nothing.
        f = self.fs.open(path, "wb", block_size=_STREAM_BLOCK, autocommit=False, **extra)
        try:
            for chunk in _guarded(data):
                f.write(chunk)
                size += len(chunk)
            f.close()
            f.commit()
        except BaseException:
            f.discard()
            f.closed = True  # discarded: its finaliser must not try to flush the upload
            raise
        return size

    def close(self) -> None:
        if self.protocol in ("s3", "s3a"):
            release_data_path(self.fs)  # its pool and connections; made again on the next upload

    def delete(self, key: str) -> None:
        path = self._path(key)
        with translate_backend_errors(self._describe(key)):
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(path)
            self.fs.invalidate_cache(path)

    def delete_prefix(self, prefix: str) -> None:
        keys = [self._path(info.key) for info in self.list(prefix)]
        if not keys:
            return
        with translate_backend_errors(self._describe(prefix)):
            self.fs.rm(keys)  # batched DeleteObjects on S3
            self.fs.invalidate_cache()

    def copy(self, src: str, dst: str) -> None:
        if normalize_key(src) == normalize_key(dst):
            # S3 refuses a CopyObject onto itself ("This copy request is illegal"); the local
            # and memory stores leave the object as it was, and so does this.
            self.head(src)
            return
        with translate_backend_errors(self._describe(src)):
            self.fs.copy(self._path(src), self._path(dst))
            self.fs.invalidate_cache(self._path(dst))

    def _check_bucket(self) -> None:
        """A missing prefix lists as empty; a missing bucket is an error worth saying."""
        bucket = self.root.lstrip("/").split("/", 1)[0]
        if self.protocol in _BUCKETED and bucket and not self.fs.exists(bucket):
            raise NotFoundError(f"{self.protocol}://{bucket}: bucket does not exist")

    def _describe(self, key: str) -> str:
        return self._url(self._path(key))
