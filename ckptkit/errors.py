"""The one exception hierarchy of ckptkit.

Every error ckptkit raises on purpose derives from :class:`CkptkitError`. Errors that have an
obvious builtin counterpart also subclass it (``NotFoundError`` is a ``FileNotFoundError``), so
callers that already catch builtins keep working. Each class carries the CLI exit code it maps to
(see ``docs/cli.md``). This module imports nothing from ckptkit.
"""

from __future__ import annotations

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


class NotFoundError(StorageError, FileNotFoundError):
    """A key, checkpoint, bucket or path does not exist."""


class AlreadyExistsError(StorageError, FileExistsError):
    """A create-only write found the key already present."""


class AccessDeniedError(StorageError, PermissionError):
    """The backend refused the request: missing or wrong credentials, or no permission."""


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


class VerificationError(CkptkitError):
    """A checkpoint failed verification; ``findings`` lists every problem found."""

    exit_code = EXIT_FINDINGS

    def __init__(self, message: str, findings: list[str]) -> None:
        super().__init__(message)
        self.findings = findings


# --- the native format ---------------------------------------------------------------------


class UnstorableValueError(CkptkitError, TypeError):
    """A value in a state tree that the pickle-free native format cannot represent."""

    def __init__(self, tree_path: str, reason: str) -> None:
        super().__init__(f"{tree_path}: {reason}")
        self.tree_path = tree_path
        self.reason = reason


class FormatError(CkptkitError, ValueError):
    """A file that does not parse as the format it claims (truncated, corrupt, inconsistent)."""

    exit_code = EXIT_FINDINGS


class UnsafeContentError(CkptkitError):
    """Content that would run code if loaded the usual way; ckptkit refuses it."""

    exit_code = EXIT_UNSAFE
