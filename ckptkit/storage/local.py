"""A store over a local directory, with the durability POSIX can give.

Every ``put`` writes a hidden temporary sibling, fsyncs it, then publishes it with ``rename``
(overwrite) or ``link`` (create-only, which fails atomically if the name exists), and fsyncs the
directory. Readers therefore see the old object or the whole new one, never a torn write.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import BinaryIO

from ckptkit.errors import (
    AccessDeniedError,
    AlreadyExistsError,
    NotFoundError,
    StorageError,
)
from ckptkit.storage.base import (
    Chunks,
    ObjectInfo,
    Store,
    StoreCapabilities,
    WriteMode,
    iter_chunks,
    normalize_key,
)

TEMP_MARKER = ".ckptkit-tmp-"


@contextlib.contextmanager
def translate_os_errors(what: str) -> Iterator[None]:
    """Turn OSError into the matching ckptkit error, naming ``what`` failed."""
    try:
        yield
    except StorageError:
        raise
    except FileNotFoundError as exc:
        raise NotFoundError(f"{what}: no such file or directory") from exc
    except FileExistsError as exc:
        raise AlreadyExistsError(f"{what}: already exists") from exc
    except PermissionError as exc:
        raise AccessDeniedError(f"{what}: permission denied") from exc
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise StorageError(f"{what}: no space left on device") from exc
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise AlreadyExistsError(f"{what}: already exists") from exc
        if exc.errno == errno.ENOTDIR:
            raise NotFoundError(f"{what}: a path component is not a directory") from exc
        raise StorageError(f"{what}: {exc.strerror or exc}") from exc


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalStore(Store):
    """Objects are files below ``root``; ``/`` in keys maps to directories."""

    def __init__(self, root: str | os.PathLike[str], *, fsync: bool = True) -> None:
        self.root = Path(root).expanduser().absolute()
        self.fsync = fsync
        self.capabilities = StoreCapabilities(
            atomic_rename=True, conditional_create=True, durable_writes=fsync
        )

    @property
    def url(self) -> str:
        return str(self.root)

    def child(self, prefix: str) -> LocalStore:
        return LocalStore(self._path(prefix), fsync=self.fsync)

    def _path(self, key: str) -> Path:
        return self.root / normalize_key(key) if key else self.root

    def local_path(self, key: str) -> Path:
        return self._path(key)

    # --- reads ---------------------------------------------------------------------------

    def get(self, key: str, start: int | None = None, end: int | None = None) -> bytes:
        path = self._path(key)
        with translate_os_errors(str(path)), open(path, "rb") as f:
            if start:
                f.seek(start)
            if end is None:
                return f.read()
            return f.read(max(0, end - (start or 0)))

    def open_read(self, key: str) -> BinaryIO:
        path = self._path(key)
        with translate_os_errors(str(path)):
            if path.is_dir():
                raise NotFoundError(f"{path}: is a directory, not an object")
            return open(path, "rb")

    def head(self, key: str) -> ObjectInfo:
        path = self._path(key)
        with translate_os_errors(str(path)):
            st = path.stat()
        if not path.is_file():
            raise NotFoundError(f"{path}: is a directory, not an object")
        return ObjectInfo(key, st.st_size, st.st_mtime)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        top = self._path(prefix)
        if not top.is_dir():
            return
        for dirpath, _dirnames, filenames in os.walk(top):
            for name in filenames:
                path = Path(dirpath, name)
                try:
                    st = path.stat()
                except FileNotFoundError:  # removed while we walked
                    continue
                yield ObjectInfo(path.relative_to(self.root).as_posix(), st.st_size, st.st_mtime)

    def list_dirs(self, prefix: str = "") -> list[str]:
        top = self._path(prefix)
        try:
            return sorted(e.name for e in os.scandir(top) if e.is_dir(follow_symlinks=False))
        except (FileNotFoundError, NotADirectoryError):
            return []

    # --- writes --------------------------------------------------------------------------

    def put(
        self,
        key: str,
        data: bytes | Chunks,
        mode: WriteMode = "overwrite",
        *,
        metadata: Mapping[str, str] | None = None,  # a filesystem keeps no user metadata
    ) -> ObjectInfo:
        path = self._path(key)
        with translate_os_errors(str(path)):
            path.parent.mkdir(parents=True, exist_ok=True)
            if mode == "create" and path.exists():
                raise AlreadyExistsError(f"{path}: already exists")
            tmp = path.with_name(f"{TEMP_MARKER}{uuid.uuid4().hex}-{path.name}")
            try:
                size = self._write_file(tmp, data)
                if mode == "create":
                    os.link(tmp, path)  # fails with EEXIST if another writer won the race
                    os.unlink(tmp)
                else:
                    os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            if self.fsync:
                fsync_dir(path.parent)
            return ObjectInfo(key, size, path.stat().st_mtime)

    def _write_file(self, path: Path, data: bytes | Chunks) -> int:
        size = 0
        with open(path, "xb", buffering=0) as f:
            for chunk in iter_chunks(data):
                # A raw FileIO write may be short; loop until the chunk is out.
                while chunk:
                    written = f.write(chunk)
                    size += written
                    chunk = chunk[written:]
            if self.fsync:
                os.fsync(f.fileno())
        return size

    def delete(self, key: str) -> None:
        path = self._path(key)
        with translate_os_errors(str(path)):
            try:
                path.unlink()
            except FileNotFoundError:
                return
            self._prune_empty_parents(path.parent)

    def _prune_empty_parents(self, directory: Path) -> None:
        # Objects have no directories; drop the ones a delete left empty so that listings of
        # "subdirectories" do not show ghosts.
        while directory != self.root and self.root in directory.parents:
            try:
                directory.rmdir()
            except OSError:
                return
            directory = directory.parent

    def delete_prefix(self, prefix: str) -> None:
        path = self._path(prefix)
        with translate_os_errors(str(path)):
            shutil.rmtree(path, ignore_errors=False) if path.is_dir() else None
            self._prune_empty_parents(path.parent)

    def copy(self, src: str, dst: str) -> None:
        with translate_os_errors(str(self._path(src))), open(self._path(src), "rb") as f:
            self.put(dst, iter(lambda: f.read(8 << 20), b""))

    def rename_prefix(self, src: str, dst: str) -> None:
        source, target = self._path(src), self._path(dst)
        with translate_os_errors(str(target)):
            target.parent.mkdir(parents=True, exist_ok=True)
            # rename(2) replaces an empty directory but fails on a non-empty one, which is the
            # create-only behaviour a commit needs.
            os.rename(source, target)
            if self.fsync:
                fsync_dir(target.parent)

    def sync_prefix(self, prefix: str) -> None:
        if not self.fsync:
            return
        top = self._path(prefix)
        with translate_os_errors(str(top)):
            for dirpath, _dirnames, _filenames in os.walk(top, topdown=False):
                fsync_dir(Path(dirpath))
