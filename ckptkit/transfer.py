"""Copying one object between stores: streamed, hashed on the way, retried with backoff.

``sync`` and background mirroring move every byte through :func:`copy_object`. The bytes are
hashed as they are read, and the upload is published only if the digest equals the one the
source manifest records — so neither a truncated read nor a corrupt source ever becomes an
object that looks right at the destination. Transient failures (throttling, resets, truncated
bodies, 5xx after the client's own retries) are retried here with exponential backoff and
jitter; when retries run out the error says what failed and how often.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from ckptkit.errors import (
    AccessDeniedError,
    AlreadyExistsError,
    BackendMissingError,
    ChecksumMismatchError,
    CkptkitError,
    IncompleteListingError,
    NotFoundError,
    NotRegularFileError,
    PermanentStorageError,
    SizeMismatchError,
    StorageError,
)
from ckptkit.hashing import DEFAULT_ALGORITHM, IncrementalDigest, digest_object, hashing_pool
from ckptkit.manifest import FileEntry
from ckptkit.storage.base import Store
from ckptkit.storage.fsspec_store import translate_backend_errors
from ckptkit.storage.s3_multipart import PART_SIZE

T = TypeVar("T")

# Read block of a streamed copy: on S3 each block is one part of the multipart upload, sent as
# it was read, without a copy.
COPY_BLOCK = PART_SIZE
# Files up to this size are read whole and sent in one request.
SMALL_FILE = 8 << 20
# User metadata stored with every synced object, so a re-run can tell a finished upload from a
# stale one by one HEAD, without downloading it.
DIGEST_METADATA_KEY = "ckptkit-digest"


class RetriesExhaustedError(StorageError):
    """A transfer kept failing with transient errors until its retries ran out."""


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter: attempt ``n`` waits ``U(0, min(max, base * 2**n))``."""

    attempts: int = 5
    base_delay: float = 0.5
    max_delay: float = 20.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("retry attempts must be at least 1")

    def delay(self, attempt: int) -> float:
        return random.uniform(0.0, min(self.max_delay, self.base_delay * (2**attempt)))


def is_transient(exc: BaseException) -> bool:
    """Worth another try: a failing backend or a digest mismatch (a body cut short in transit).

    Missing objects (a missing bucket included), denied access, a full or read-only disk, a
    special file where data should be, a listing that met an unreadable directory, a missing
    backend and create-only conflicts are answers,
    not accidents, and retrying them only delays the error. An invalid key is a usage error,
    never retried either.
    """
    permanent = (
        NotFoundError, AccessDeniedError, AlreadyExistsError, BackendMissingError,
        PermanentStorageError, NotRegularFileError, IncompleteListingError,
    )
    if isinstance(exc, permanent):
        return False
    return isinstance(exc, (StorageError, ChecksumMismatchError))


def with_retries(
    operation: Callable[[], T],
    policy: RetryPolicy,
    what: str,
    *,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Run ``operation``, retrying transient failures; the last one is raised with a count."""
    for attempt in range(policy.attempts):
        try:
            return operation()
        except CkptkitError as exc:
            if not is_transient(exc):
                raise
            if attempt + 1 == policy.attempts:
                if isinstance(exc, ChecksumMismatchError):
                    raise  # a finding about the file, exit 1, not a failing backend
                raise RetriesExhaustedError(
                    f"{what}: failed {policy.attempts} time(s), giving up; last error: {exc}"
                ) from exc
            sleep(policy.delay(attempt))
    raise AssertionError("unreachable: the loop returns or raises")


def copy_object(
    src: Store,
    src_key: str,
    dst: Store,
    dst_key: str,
    expected: FileEntry | None,
    *,
    on_bytes: Callable[[int], None] = lambda n: None,
) -> int:
    """Stream ``src_key`` to ``dst_key``; publish it only if it matches ``expected``.

    ``on_bytes`` is told of every block read, and of the whole amount again, negated, when the
    attempt fails, so a progress display counts a retried file once.
    """
    counted = 0

    def blocks() -> Iterator[bytes]:
        nonlocal counted
        hasher = IncrementalDigest(algorithm=DEFAULT_ALGORITHM if expected is None else expected.algorithm)
        with translate_backend_errors(f"reading {src.url}/{src_key}"), src.open_read(src_key) as reader:
            while block := reader.read(COPY_BLOCK):
                hasher.update(block)
                counted += len(block)
                on_bytes(len(block))
                yield block
        if expected is not None:
            got = hasher.result()
            if got.size != expected.size:
                raise SizeMismatchError(f"{src.url}/{src_key}", expected.size, got.size)
            if got.digest != expected.digest:
                raise ChecksumMismatchError(
                    f"{src.url}/{src_key}", expected.digest, got.digest, (0, expected.size)
                )

    metadata = {DIGEST_METADATA_KEY: expected.digest} if expected is not None else None
    # A small file is read whole and handed over as bytes: one request wherever a stream would
    # cost more (S3 streams are already one PUT up to one part, see s3_multipart).
    small = expected is not None and expected.size <= SMALL_FILE
    try:
        return dst.put(dst_key, b"".join(blocks()) if small else blocks(), metadata=metadata).size
    except BaseException:
        on_bytes(-counted)
        raise


def already_copied(dst: Store, key: str, size: int | None, expected: FileEntry) -> bool:
    """True if ``key`` at ``dst`` holds ``expected``'s bytes, decided without downloading it:
    the digest stored with the object where the store keeps user metadata, a local re-hash where
    the object is a local file, and otherwise never (it is sent again)."""
    if size != expected.size:
        return False
    if dst.local_path(key) is not None:
        found = digest_object(dst, key, size, hashing_pool(), algorithm=expected.algorithm)
        return found.digest == expected.digest
    try:
        return dst.user_metadata(key).get(DIGEST_METADATA_KEY) == expected.digest
    except NotFoundError:
        return False
