"""What a PATH on a command line names: one file, or a directory (an object-store prefix).

Every command that takes a file or a directory asks :func:`resolve_target` once, before it reads
anything. A local path the user typed is followed if it is itself a link (the user chose it) and
refused if it is a FIFO, socket or device (:func:`~ckptkit.storage.local.follow_named_path`). An
object-store URL costs one metadata request, a HEAD of the key: an object there makes PATH a
file; none makes it a prefix (a directory), which its command then lists. Torch-free.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import Any

from ckptkit.errors import InvalidURLError, NotFoundError
from ckptkit.storage import Store, open_store, split_parent, split_url
from ckptkit.storage.local import follow_named_path, translate_os_errors

_LOCAL_SCHEMES = (None, "file", "local")


@dataclass(frozen=True)
class Target:
    """A file (``key`` in ``store``, the directory holding it) or a directory (``store`` itself)."""

    store: Store
    key: str | None = None  # the file's key; None when PATH names a directory
    size: int | None = None  # the file's size, from the one metadata request that found it

    @property
    def is_file(self) -> bool:
        return self.key is not None

    @property
    def url(self) -> str:
        base = self.store.url.rstrip("/")
        return f"{base}/{self.key}" if self.key is not None else base


def resolve_target(path: str | os.PathLike[str] | Store, **storage_options: Any) -> Target:
    """Tell whether ``path`` (local path, URL, or an open store: a directory) names a file or a
    directory, and open the store to read it through. A missing local path is a NotFoundError; a
    missing object-store prefix cannot be told from an empty one without a listing, so that is
    left to the command."""
    if isinstance(path, Store):
        return Target(path)
    text = os.fspath(path)
    scheme, rest = split_url(text)
    if scheme in _LOCAL_SCHEMES:
        return _local(text, rest, storage_options)
    return _object(text, storage_options)


def _local(text: str, rest: str, storage_options: dict[str, Any]) -> Target:
    local = follow_named_path(rest)  # a FIFO or device is refused here, before anything opens it
    with translate_os_errors(text):
        st = os.stat(local)
    if stat.S_ISDIR(st.st_mode):
        return Target(open_store(local, **storage_options))
    parent, name = split_parent(local)
    return Target(open_store(parent, **storage_options), name, st.st_size)


def _object(text: str, storage_options: dict[str, Any]) -> Target:
    if text.endswith("/"):  # the user wrote a prefix: no request needed to know it
        return Target(open_store(text, **storage_options))
    try:
        parent, name = split_parent(text)
    except InvalidURLError:  # s3://bucket: a bucket is a directory with no parent
        return Target(open_store(text, **storage_options))
    store = open_store(parent, **storage_options)
    try:
        info = store.head(name)
    except NotFoundError:  # no object: a prefix, or nothing (the command's listing says which)
        return Target(store.child(name))
    return Target(store, name, info.size)
