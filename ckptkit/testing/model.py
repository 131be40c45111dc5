"""What the Store contract says a store holding a given ``{key: bytes}`` dict must answer.

The contract suite and the state machine both compare a store against these, so the rules for
prefixes ("a/b" is a string prefix of "a/bc/x" but not a path prefix) are written once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping


def is_below(key: str, prefix: str) -> bool:
    """Whether ``list(prefix)`` includes ``key``: everything for ``""``, else keys under ``prefix/``."""
    return not prefix or key.startswith(prefix + "/")


def keys_below(keys: Iterable[str], prefix: str) -> list[str]:
    """The keys ``list(prefix)`` returns, sorted."""
    return sorted(key for key in keys if is_below(key, prefix))


def dirs_below(keys: Iterable[str], prefix: str) -> list[str]:
    """The names ``list_dirs(prefix)`` returns: first components of what lies deeper, sorted."""
    cut = len(prefix) + 1 if prefix else 0
    return sorted({key[cut:].split("/", 1)[0] for key in keys_below(keys, prefix) if "/" in key[cut:]})


def directories(keys: Iterable[str]) -> list[str]:
    """Every proper path prefix of every key ("a" and "a/b" for "a/b/c"): prefixes, not objects."""
    found = set()
    for key in keys:
        parts = key.split("/")
        found.update("/".join(parts[:depth]) for depth in range(1, len(parts)))
    return sorted(found)


def probe_prefixes(keys: Iterable[str]) -> list[str]:
    """Prefixes worth listing: the root, every directory, every key (nothing lies below an
    object), each of those cut by one character where that is a string prefix but not a path
    prefix ("a/b" of "a/bc"), and one that matches nothing."""
    keys = list(keys)
    found = {"", "no-such-prefix", *directories(keys), *keys}
    found.update(prefix[:-1] for prefix in list(found) if len(prefix.rsplit("/", 1)[-1]) > 1)
    return sorted(found)


def edge_ranges(size: int) -> list[tuple[int | None, int | None]]:
    """``(start, end)`` pairs for ``get`` of an object of ``size`` bytes, edges included: open
    ends, empty ranges, a range that ends past the object, and ones that start at or past its end.
    The contract gives what ``data[start:end]`` gives for each."""
    middle = size // 2
    ranges = {
        (None, None), (0, None), (None, size), (0, size), (None, middle), (middle, None),
        (0, 1), (1, max(1, size - 1)), (max(0, size - 1), size), (middle, middle + 10),
        (None, 0), (0, 0), (3, 3), (5, 2), (0, size + 10), (size, None), (size, size + 10), (size + 10, None),
        (size + 10, size + 20),
    }
    return sorted(ranges, key=lambda r: (r[0] is not None, r[0] or 0, r[1] is not None, r[1] or 0))


def expected_listing(objects: Mapping[str, bytes], prefix: str) -> dict[str, int]:
    """``{key: size}`` of what ``list(prefix)`` must yield."""
    return {key: len(objects[key]) for key in keys_below(objects, prefix)}
