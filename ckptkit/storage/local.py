"""A store over a local directory, with the durability POSIX can give.

Every ``put`` writes a hidden temporary sibling, fsyncs it, then publishes it with ``rename``
(overwrite) or ``link`` (create-only, which fails atomically if the name exists), and fsyncs the
directory. Readers therefore see the old object or the whole new one, never a torn write.

Only regular files and real directories below the root are objects. A symbolic link is never
followed (it could lead out of the checkpoint: ``notes.txt -> ../../secret``), a FIFO, socket or
device is never opened (a FIFO blocks forever, ``/dev/zero`` never ends): reading one raises
:class:`NotRegularFileError`, and a listing that meets one, or a directory it cannot read, raises
:class:`IncompleteListingError` after yielding everything it could see. The root itself may be a
link: the user named it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

from ckptkit.errors import (
    PERMANENT_ERRNOS,
    AccessDeniedError,
    AlreadyExistsError,
    IncompleteListingError,
    NotFoundError,
    NotRegularFileError,
    PermanentStorageError,
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
        if exc.errno in PERMANENT_ERRNOS:  # a full or read-only disk: retrying cannot help
            raise PermanentStorageError(f"{what}: {(exc.strerror or str(exc)).lower()}") from exc
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise AlreadyExistsError(f"{what}: already exists") from exc
        if exc.errno == errno.ENOTDIR:
            raise NotFoundError(f"{what}: a path component is not a directory") from exc
        raise StorageError(f"{what}: {exc.strerror or exc}") from exc


_SPECIAL_KINDS = {
    stat.S_IFLNK: "symbolic link",
    stat.S_IFIFO: "FIFO",
    stat.S_IFSOCK: "socket",
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
}


def special_kind(mode: int) -> str | None:
    """What a non-regular, non-directory ``st_mode`` is ("symbolic link", "FIFO", ...), or None."""
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    return _SPECIAL_KINDS.get(stat.S_IFMT(mode), "special file")


def _require_regular(path: str, mode: int) -> None:
    """Refuse what is not an object: a directory (not found, as on an object store) or a link,
    FIFO, socket or device (:class:`NotRegularFileError`)."""
    if stat.S_ISDIR(mode):
        raise NotFoundError(f"{path}: is a directory, not an object")
    kind = special_kind(mode)
    if kind is not None:
        raise NotRegularFileError(path, kind)


def _reason(exc: OSError) -> str:
    return "permission denied" if isinstance(exc, PermissionError) else (exc.strerror or str(exc))


def follow_named_path(path: str) -> str:
    """A local path as the user named it, followed if it is itself a link (as ``cat`` would:
    the user chose it), and refused if it names a FIFO, socket or device. Links met *below* a
    store's root are never followed; this is only for the one path typed on a command line."""
    expanded = os.path.expanduser(path)
    target = os.path.realpath(expanded) if os.path.islink(expanded) else expanded
    try:
        mode = os.stat(target).st_mode
    except OSError:
        return target  # missing or unreadable: the caller's own open says which
    kind = special_kind(mode)
    if kind is not None:
        raise NotRegularFileError(path, kind)
    return target


def _pread_exactly(fd: int, offset: int, wanted: int) -> bytes:
    """Up to ``wanted`` bytes at ``offset``: fewer only where the file ends."""
    if wanted <= 0:
        return b""
    data = os.pread(fd, wanted, offset)
    while len(data) < wanted:  # short: the file shrank, or over 2 GiB in one call
        more = os.pread(fd, wanted - len(data), offset + len(data))
        if not more:
            break
        data += more
    return data


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
        self._root = str(self.root).rstrip("/")  # "" for the filesystem root: paths are f"{_root}/{key}"
        self.fsync = fsync
        self.capabilities = StoreCapabilities(
            atomic_rename=True, conditional_create=True, durable_writes=fsync, hard_links=True
        )

    @property
    def url(self) -> str:
        return str(self.root)

    def child(self, prefix: str) -> LocalStore:
        return LocalStore(self._path(prefix), fsync=self.fsync)

    def parent(self) -> LocalStore:
        return LocalStore(self.root.parent, fsync=self.fsync)

    def _path(self, key: str) -> Path:
        return self.root / normalize_key(key) if key else self.root

    def local_path(self, key: str) -> Path:
        return self._path(key)

    def _checked_path(self, key: str) -> str:
        """The path of ``key``, refusing one whose directories below the root include a link:
        ``a/b`` with ``a -> /elsewhere`` would read or write outside the store."""
        if not key:
            return self._root or "/"
        parts = normalize_key(key).split("/")
        directory = self._root
        for part in parts[:-1]:
            directory = f"{directory}/{part}"
            try:
                mode = os.lstat(directory).st_mode
            except (FileNotFoundError, NotADirectoryError):  # "a/x" below an object "a"
                break  # the operation itself reports what is missing
            if stat.S_ISLNK(mode):
                raise NotRegularFileError(directory, "symbolic link")
        return f"{self._root}/{key}"

    def _open_regular(self, key: str) -> tuple[int, str, int]:
        """``(fd, path, size)`` of ``key``, opened only if it is a regular file.

        O_NOFOLLOW refuses a link at the last component and O_NONBLOCK keeps a FIFO's open from
        blocking (it changes nothing for a regular file); fstat then checks what was actually
        opened, so nothing swapped in between the check and the open is read.
        """
        path = self._checked_path(key)
        with translate_os_errors(path):
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise NotRegularFileError(path, "symbolic link") from exc
                raise
            try:
                st = os.fstat(fd)
                _require_regular(path, st.st_mode)
            except BaseException:
                os.close(fd)
                raise
        return fd, path, st.st_size

    # --- reads ---------------------------------------------------------------------------

    def get(self, key: str, start: int | None = None, end: int | None = None) -> bytes:
        return self._pread(key, [(start or 0, end)])[0]

    def read_ranges(self, key: str, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        return self._pread(key, ranges)

    def _pread(self, key: str, ranges: Sequence[tuple[int, int | None]]) -> list[bytes]:
        # One open, then pread per range, no file object: ranged reads are most of what inspect
        # and verify do, and the page cache makes merging neighbours pointless here.
        fd, path, size = self._open_regular(key)
        try:
            with translate_os_errors(path):
                return [_pread_exactly(fd, lo, (size if hi is None else hi) - lo) for lo, hi in ranges]
        finally:
            os.close(fd)

    def open_read(self, key: str, *, size: int | None = None) -> BinaryIO:
        return open(self._open_regular(key)[0], "rb")  # the kernel reads ahead; size changes nothing

    def head(self, key: str) -> ObjectInfo:
        path = self._checked_path(key)
        with translate_os_errors(path):
            st = os.lstat(path)
        _require_regular(path, st.st_mode)
        return ObjectInfo(key, st.st_size, st.st_mtime)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        top = self._checked_path(prefix)
        problems: list[tuple[str, str]] = []
        if prefix:
            try:
                kind = special_kind(os.lstat(top).st_mode)
            except OSError:
                kind = None  # missing: an empty listing; unreadable: the walk reports it
            if kind is not None:
                problems.append((top, f"{kind}, not followed"))
        if not problems:
            yield from self._walk(top, problems)
        if problems:
            raise IncompleteListingError(top, problems)

    def _walk(self, top: str, problems: list[tuple[str, str]]) -> Iterator[ObjectInfo]:
        # An explicit stack rather than recursion: a hostile tree may nest thousands deep.
        pending = [top]
        while pending:
            directory = pending.pop()
            try:
                with os.scandir(directory) as entries:
                    found = list(entries)
            except (FileNotFoundError, NotADirectoryError):
                continue  # removed while we walked, or the prefix names a file: nothing below
            except OSError as exc:
                problems.append((directory, _reason(exc)))
                continue
            for entry in found:
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    problems.append((entry.path, _reason(exc)))
                    continue
                if stat.S_ISDIR(st.st_mode):
                    pending.append(entry.path)
                elif stat.S_ISREG(st.st_mode):
                    # Every path below was built from _root: the key is what follows it.
                    yield ObjectInfo(entry.path[len(self._root) + 1 :], st.st_size, st.st_mtime)
                else:
                    kind = special_kind(st.st_mode)
                    not_read = "not followed" if kind == "symbolic link" else "not read"
                    problems.append((entry.path, f"{kind}, {not_read}"))

    def list_dirs(self, prefix: str = "") -> list[str]:
        top = self._checked_path(prefix)
        with translate_os_errors(top):
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
        path = Path(self._checked_path(key))
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
        with self.open_read(src) as f, translate_os_errors(str(self._path(src))):
            self.put(dst, iter(lambda: f.read(8 << 20), b""))

    def link(self, src: str, dst: str) -> None:
        source, target = self._checked_path(src), Path(self._checked_path(dst))
        with translate_os_errors(str(target)):
            _require_regular(source, os.lstat(source).st_mode)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(source, target, follow_symlinks=False)  # EEXIST: AlreadyExistsError
            if self.fsync:
                fsync_dir(target.parent)

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
