"""Random operation sequences against a store, each result checked against a dict model.

Keys come from a small alphabet ("a", "ab", "b" as directories, "x", "xy" as object names) so
that overwrites, create-only collisions and string-but-not-path prefixes ("a" and "ab/x",
"a/x" and "a/xy") come up in nearly every sequence. Directory and object names never coincide:
whether "a" can be an object and a directory at once differs by backend (S3 yes, disk no) and
is not part of the contract.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ClassVar

import pytest
from hypothesis import settings as Settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, rule, run_state_machine_as_test

from ckptkit.errors import AlreadyExistsError, NotFoundError, ReadOnlyStoreError
from ckptkit.storage.base import Store
from ckptkit.testing.model import dirs_below, expected_listing, is_below, probe_prefixes
from ckptkit.testing.raw import RawReader

_DIRECTORIES = st.lists(st.sampled_from(["a", "ab", "b"]), max_size=2).map("/".join)  # "" is the root
_KEYS = st.builds(lambda d, name: f"{d}/{name}" if d else name, _DIRECTORIES, st.sampled_from(["x", "xy"]))
_PREFIXES = st.one_of(_DIRECTORIES, _KEYS)  # an object as a prefix: nothing lies below it
_OFFSETS = st.none() | st.integers(0, 80)
_BLOBS = st.binary(max_size=64)


def _chunks(data: bytes) -> Iterator[bytes]:
    third = len(data) // 3
    yield from (data[:third], b"", data[third : 2 * third], data[2 * third :])


class StoreStateMachine(RuleBasedStateMachine):
    """The machine; :func:`run_state_machine` subclasses it with the store to run on.

    A writable store runs each sequence in a fresh child (``state-machine-<hex>``) and removes it
    afterwards; a read-only one runs on the store itself, which must hold exactly ``objects``,
    and every write must be refused with :class:`ReadOnlyStoreError`.
    """

    base: ClassVar[Store]
    raw_get: ClassVar[Callable[[str], bytes | None] | None]
    objects: ClassVar[Mapping[str, bytes]]

    def __init__(self) -> None:
        super().__init__()
        self.read_only = self.base.capabilities.read_only
        self.model: dict[str, bytes] = dict(self.objects) if self.read_only else {}
        self.prefix = "" if self.read_only else f"state-machine-{uuid.uuid4().hex[:12]}"
        self.store = self.base.child(self.prefix) if self.prefix else self.base
        known = sorted(self.model)
        self.keys = st.one_of(st.sampled_from(known), _KEYS) if known else _KEYS
        self.prefixes = st.one_of(st.sampled_from(probe_prefixes(known)), _PREFIXES) if known else _PREFIXES

    def teardown(self) -> None:
        if self.prefix:
            self.base.delete_prefix(self.prefix)

    def _refused(self, write: Callable[[], Any]) -> None:
        with pytest.raises(ReadOnlyStoreError):
            write()

    @rule(data=st.data(), blob=_BLOBS, create=st.booleans(), streamed=st.booleans())
    def put(self, data: st.DataObject, blob: bytes, create: bool, streamed: bool) -> None:
        key = data.draw(self.keys, label="key")
        payload = _chunks(blob) if streamed else blob
        mode = "create" if create else "overwrite"
        if self.read_only:
            self._refused(lambda: self.store.put(key, payload, mode))
            return
        if create and key in self.model:
            with pytest.raises(AlreadyExistsError):
                self.store.put(key, payload, mode)
            return
        info = self.store.put(key, payload, mode)
        assert (info.key, info.size) == (key, len(blob))
        self.model[key] = blob

    @rule(data=st.data(), start=_OFFSETS, end=_OFFSETS)
    def get(self, data: st.DataObject, start: int | None, end: int | None) -> None:
        key = data.draw(self.keys, label="key")
        if key not in self.model:
            with pytest.raises(NotFoundError):
                self.store.get(key, start, end)
            return
        assert self.store.get(key, start, end) == self.model[key][start:end]

    @rule(data=st.data())
    def head(self, data: st.DataObject) -> None:
        key = data.draw(self.keys, label="key")
        assert self.store.exists(key) == (key in self.model)
        if key not in self.model:
            with pytest.raises(NotFoundError):
                self.store.head(key)
            return
        info = self.store.head(key)
        assert (info.key, info.size) == (key, len(self.model[key]))

    @rule(data=st.data())
    def list_prefix(self, data: st.DataObject) -> None:
        prefix = data.draw(self.prefixes, label="prefix")
        listed = [(info.key, info.size) for info in self.store.list(prefix)]
        assert len(listed) == len(set(listed))
        assert dict(listed) == expected_listing(self.model, prefix)

    @rule(data=st.data())
    def list_dirs(self, data: st.DataObject) -> None:
        prefix = data.draw(self.prefixes, label="prefix")
        assert sorted(self.store.list_dirs(prefix)) == dirs_below(self.model, prefix)

    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        key = data.draw(self.keys, label="key")
        if self.read_only:
            self._refused(lambda: self.store.delete(key))
            return
        self.store.delete(key)
        self.model.pop(key, None)

    @rule(data=st.data())
    def delete_prefix(self, data: st.DataObject) -> None:
        prefix = data.draw(self.prefixes, label="prefix")
        if self.read_only:
            self._refused(lambda: self.store.delete_prefix(prefix))
            return
        self.store.delete_prefix(prefix)
        self.model = {k: v for k, v in self.model.items() if not is_below(k, prefix)}

    @rule(data=st.data())
    def copy(self, data: st.DataObject) -> None:
        src, dst = data.draw(self.keys, label="src"), data.draw(self.keys, label="dst")
        if self.read_only:
            self._refused(lambda: self.store.copy(src, dst))
            return
        if src not in self.model:
            with pytest.raises(NotFoundError):
                self.store.copy(src, dst)
            return
        self.store.copy(src, dst)
        self.model[dst] = self.model[src]

    @rule(data=st.data())
    def read_around_the_store(self, data: st.DataObject) -> None:
        """What the store wrote (or deleted) is so in the backing storage, not only through it."""
        if self.raw_get is None:
            return
        key = data.draw(self.keys, label="key")
        assert self.raw_get(f"{self.prefix}/{key}" if self.prefix else key) == self.model.get(key)


def run_state_machine(
    store: Store,
    raw: RawReader | None = None,
    *,
    objects: Mapping[str, bytes] | None = None,
    settings: Settings | None = None,
) -> None:
    """Check random operation sequences on ``store`` against a dict model; raise on a mismatch.

    ``raw`` (reading around the store) lets the sequences also check the stored bytes there.
    A read-only store must hold exactly ``objects``. ``settings`` bounds the run
    (``max_examples``, ``stateful_step_count``).
    """
    machine = type(
        "StoreStateMachine",
        (StoreStateMachine,),
        {"base": store, "raw_get": staticmethod(raw.get) if raw else None, "objects": dict(objects or {})},
    )
    run_state_machine_as_test(machine, settings=settings)
