"""The one exception hierarchy of ckptkit.

Every error ckptkit raises on purpose derives from :class:`CkptkitError`. Errors that have an
obvious builtin counterpart also subclass it (``NotFoundError`` is a ``FileNotFoundError``), so
callers that already catch builtins keep working. Each class carries the CLI exit code it maps to
(see ``docs/cli.md``). This module imports nothing from ckptkit.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable
from typing import Any

EXIT_OK = 0
EXIT_FINDINGS = 1
EXIT_USAGE = 2
EXIT_UNSAFE = 3
EXIT_STORAGE = 4


class CkptkitError(Exception):
    """Root of every error ckptkit raises on purpose."""

    exit_code = EXIT_USAGE


# --- storage -------------------------------------------------------------------------------


class StorageError(CkptkitError, OSError):
    """A store or its backend failed."""

    exit_code = EXIT_STORAGE


class PermanentStorageError(StorageError):
    """A backend answer that trying again cannot change: no space left, a read-only filesystem,
    a quota, a name or an object too large. Transfers fail at once instead of retrying it."""


# The OSError numbers that adapters translate into PermanentStorageError.
PERMANENT_ERRNOS = frozenset(
    getattr(errno, name)
    for name in ("ENOSPC", "EROFS", "EDQUOT", "EFBIG", "ENAMETOOLONG", "EMSGSIZE")
    if hasattr(errno, name)
)


class NotFoundError(StorageError, FileNotFoundError):
    """A key, checkpoint, bucket or path does not exist."""


class AlreadyExistsError(StorageError, FileExistsError):
    """A create-only write found the key already present."""


class AccessDeniedError(StorageError, PermissionError):
    """The backend refused the request: missing or wrong credentials, or no permission."""


class NotRegularFileError(StorageError):
    """A symbolic link, FIFO, socket or device where checkpoint data should be.

    Only regular files are checkpoint data: a link could lead out of the checkpoint, and
    opening a FIFO or a device blocks forever or reads without end.
    """

    def __init__(self, path: str, kind: str) -> None:
        super().__init__(f"{path}: is a {kind}, not a regular file; only regular files are checkpoint data")
        self.path = path
        self.kind = kind


class IncompleteListingError(StorageError):
    """A listing that could not see everything below its prefix.

    Raised after every readable object was yielded, so a reader can report what it saw; nothing
    destructive (retention, ``gc``, ``sync --delete``, mirror deletes) may act on such a listing,
    since what it could not see would count as gone. ``problems`` holds ``(path, reason)`` pairs.
    """

    def __init__(self, url: str, problems: list[tuple[str, str]]) -> None:
        shown = "; ".join(f"{path}: {reason}" for path, reason in problems[:5])
        more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        super().__init__(f"{url}: could not list everything: {shown}{more}")
        self.url = url
        self.problems = problems


class ReadOnlyStoreError(PermanentStorageError):
    """A write (``put``, ``delete``, ``copy``, ...) to a store that declares ``read_only``.

    Permanent: like ``EROFS`` from a filesystem, no retry can make the store writable.
    """

    def __init__(self, url: str, operation: str) -> None:
        super().__init__(f"{url}: read-only store, {operation} refused")
        self.url = url
        self.operation = operation


class BackendMissingError(CkptkitError, ImportError):
    """The package needed for a URL scheme is not installed."""

    exit_code = EXIT_STORAGE

    def __init__(self, scheme: str, package: str, install: str) -> None:
        super().__init__(f"{scheme}:// needs the '{package}' package: {install}")
        self.scheme = scheme
        self.install = install


class InvalidURLError(CkptkitError, ValueError):
    """A URL or path that no store can open."""


# --- manifests and commits -----------------------------------------------------------------


class ManifestError(CkptkitError, ValueError):
    """A manifest is missing a field, has a wrong type, or cannot be parsed."""

    exit_code = EXIT_FINDINGS


class UnsafePathError(ManifestError):
    """A path that could escape the checkpoint: absolute, ``..``, a drive letter, NUL, ..."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"unsafe path {path!r}: {reason}")
        self.path = path
        self.reason = reason


class UnsupportedSchemaError(ManifestError):
    """A manifest written by a newer ckptkit than this one."""


class NotCommittedError(CkptkitError, FileNotFoundError):
    """A checkpoint without a committed manifest: incomplete, or not a ckptkit checkpoint."""

    exit_code = EXIT_FINDINGS


class CommitConflictError(AlreadyExistsError):
    """Another writer committed this checkpoint first; this writer's commit did not happen."""

    exit_code = EXIT_USAGE  # a refusal to overwrite, not a failing backend


class ChecksumMismatchError(CkptkitError):
    """File content does not match the digest recorded in the manifest."""

    exit_code = EXIT_FINDINGS

    def __init__(self, path: str, expected: str, actual: str, byte_range: tuple[int, int]) -> None:
        start, end = byte_range
        super().__init__(
            f"{path}: digest mismatch in bytes [{start}, {end}): expected {expected}, got {actual}"
        )
        self.path = path
        self.expected = expected
        self.actual = actual
        self.byte_range = byte_range


class SizeMismatchError(ChecksumMismatchError):
    """File content is longer or shorter than the manifest records.

    The manifest records size and digest apart; when the size is what differs, a message naming
    two digests (equal ones, if the recorded size alone is wrong) would hide it.
    """

    def __init__(self, path: str, expected_size: int, actual_size: int) -> None:
        CkptkitError.__init__(
            self, f"{path}: size mismatch: expected {expected_size} bytes, got {actual_size}"
        )
        self.path = path
        self.expected = f"{expected_size} bytes"
        self.actual = f"{actual_size} bytes"
        self.byte_range = (0, expected_size)
        self.expected_size = expected_size
        self.actual_size = actual_size


class VerificationError(CkptkitError):
    """A checkpoint failed verification; ``findings`` lists every problem found."""

    exit_code = EXIT_FINDINGS

    def __init__(self, message: str, findings: list[str]) -> None:
        super().__init__(message)
        self.findings = findings


class AttestationError(CkptkitError):
    """The loaded, live state is not the saved state (``ckptkit.attest``); ``differences`` names
    every tensor or field that differs."""

    exit_code = EXIT_FINDINGS

    def __init__(self, message: str, *, checkpoint: str, differences: list[str]) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint
        self.differences = differences

    def __reduce__(self) -> tuple[Any, ...]:  # keyword-only fields: pickled for multiprocessing
        return (_rebuild_attestation_error, (str(self), self.checkpoint, self.differences))


def _rebuild_attestation_error(message: str, checkpoint: str, differences: list[str]) -> AttestationError:
    return AttestationError(message, checkpoint=checkpoint, differences=differences)


class NotThinnableError(CkptkitError, ValueError):
    """A checkpoint that thinning cannot make smaller as asked (``ckptkit thin``): a kept key it
    lacks, a layout whose weights live in the optimizer's files (ZeRO-3), a layout with no
    separable state. Nothing was changed."""


# --- the native format ---------------------------------------------------------------------


class UnstorableValueError(CkptkitError, TypeError):
    """A value in a state tree that the pickle-free native format cannot represent."""

    def __init__(self, tree_path: str, reason: str) -> None:
        super().__init__(f"{tree_path}: {reason}")
        self.tree_path = tree_path
        self.reason = reason


class TopologyMismatchError(CkptkitError, ValueError):
    """A per-rank checkpoint loaded by a different number of ranks than saved it."""


class FormatError(CkptkitError, ValueError):
    """A file that does not parse as the format it claims (truncated, corrupt, inconsistent).

    ``path`` is the file (its store key) and ``offset`` the byte in it where the fault lies;
    either is None where the reader cannot name one. The subclasses below name the kind of fault
    and carry its own fields, so a program can act on it without parsing the message.
    """

    exit_code = EXIT_FINDINGS

    def __init__(self, message: str, *, path: str | None = None, offset: int | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.offset = offset

    def __reduce__(self) -> tuple[Any, ...]:
        # Exceptions unpickle by calling the class with ``args`` alone, which would drop the
        # keyword fields (or fail on required ones) when an error crosses a process boundary.
        return _restore, (type(self), self.args, self.__dict__)


def _restore(cls: type[BaseException], args: tuple[Any, ...], fields: dict[str, Any]) -> BaseException:
    error = cls.__new__(cls, *args)
    error.args = args
    error.__dict__.update(fields)
    return error


class TruncatedError(FormatError):
    """The file ends before what its own headers or records say it holds.

    ``offset`` is where the data ran out; ``expected`` is the size in bytes the file would need,
    ``actual`` the size it has.
    """

    def __init__(self, message: str, *, path: str, offset: int, expected: int, actual: int) -> None:
        super().__init__(message, path=path, offset=offset)
        self.expected = expected
        self.actual = actual


class BadHeaderError(FormatError):
    """A header, magic number or directory record that does not parse as the format's.

    ``offset`` is where the bad structure starts, or where parsing it failed when that is known.
    """

    def __init__(self, message: str, *, path: str, offset: int | None) -> None:
        super().__init__(message, path=path, offset=offset)


class OverlapError(FormatError):
    """Two byte ranges of one file that may not share a byte do.

    ``first`` and ``second`` are ``(start, end)`` offsets in the file, end exclusive, ``first``
    the one that starts first; ``offset`` is where they start to overlap.
    """

    def __init__(self, message: str, *, path: str, first: tuple[int, int], second: tuple[int, int]) -> None:
        super().__init__(message, path=path, offset=max(first[0], second[0]))
        self.first = first
        self.second = second


class DuplicateKeyError(FormatError):
    """A name that a header or directory holds twice, where readers disagree on which counts.

    ``key`` is the name; ``offset`` is where the header or directory that holds it starts.
    """

    def __init__(self, message: str, *, path: str, offset: int | None, key: str) -> None:
        super().__init__(message, path=path, offset=offset)
        self.key = key


class CrcMismatchError(FormatError):
    """A zip record whose bytes do not match the CRC-32 its directory records.

    ``record`` is the record's name, ``offset`` where its data starts in the file, ``expected``
    the recorded CRC-32 and ``actual`` the one of the bytes read (None if they do not inflate).
    """

    def __init__(
        self, message: str, *, path: str, offset: int | None, record: str, expected: int, actual: int | None
    ) -> None:
        super().__init__(message, path=path, offset=offset)
        self.record = record
        self.expected = expected
        self.actual = actual


class LimitExceededError(FormatError):
    """A declared size or count over one of the caps that keep hostile input from exhausting
    memory: ``actual`` is what the file declares, ``limit`` the cap."""

    def __init__(self, message: str, *, path: str, offset: int | None, limit: int, actual: int) -> None:
        super().__init__(message, path=path, offset=offset)
        self.limit = limit
        self.actual = actual


class UnsafeContentError(CkptkitError):
    """Content that would run code if loaded the usual way; ckptkit refuses it.

    ``globals`` names what loading it would import and call (sorted qualified names).
    """

    exit_code = EXIT_UNSAFE

    def __init__(self, message: str, *, globals: Iterable[str]) -> None:
        super().__init__(message)
        self.globals = sorted(set(globals))

    def __reduce__(self) -> tuple[Any, ...]:
        return _restore, (type(self), self.args, self.__dict__)
