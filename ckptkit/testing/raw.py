"""A second way to a store's bytes, around the store: what the contract suite checks it against."""

from __future__ import annotations

from typing import Protocol


class RawReader(Protocol):
    """Reads the store's backing storage without the store; keys are relative to its root."""

    def get(self, key: str) -> bytes | None:
        """The bytes stored under ``key``; None where no object is."""


class RawAccess(RawReader, Protocol):
    """Reads and writes the store's backing storage without the store."""

    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key`` as the store would find it."""
