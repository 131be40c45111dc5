"""safetensors headers: parsed through two ranged reads and checked the way the reference reader does.

The checks follow ``safetensors/src/tensor.rs`` (formats.md §6.2), plus the two things it lets
through that a scanner must see: duplicate keys (serde keeps the last one silently) and leading
whitespace before the ``{`` (a spec/implementation differential). Anything that stops us from
describing the entries at all (not JSON, an unknown dtype, a malformed entry) raises
:class:`FormatError`. Inconsistencies between entries and the file (gaps, overlaps, size
mismatches, trailing bytes, bad ``__metadata__``) are collected as ``problems``; ``strict=True``
(the default) raises them, ``strict=False`` returns them for reports. Errors are the precise
subclasses (``TruncatedError``, ``OverlapError``, ``DuplicateKeyError``, ``BadHeaderError``, ...)
with the file and byte offset as fields. Torch-free: ckptkit's native reader builds on this
module too.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from ckptkit.errors import (
    BadHeaderError,
    DuplicateKeyError,
    FormatError,
    LimitExceededError,
    OverlapError,
    TruncatedError,
)
from ckptkit.storage.base import Store

MAX_HEADER_SIZE = 100_000_000  # the reference implementation's cap

# Bits per element of every dtype the reference implementation knows (formats.md §6.3).
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
}


@dataclass(frozen=True)
class SafetensorsEntry:
    """One tensor of the header. ``begin``/``end`` are relative to the data section, end exclusive."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int
    data_start: int  # absolute offset of the data section in the file (8 + header length)

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def offset(self) -> int:
        """Absolute offset of this tensor's first byte in the file."""
        return self.data_start + self.begin

    @property
    def byte_range(self) -> tuple[int, int]:
        """Absolute ``(start, end)`` of this tensor's bytes in the file, end exclusive."""
        return self.offset, self.data_start + self.end


@dataclass
class SafetensorsHeader:
    key: str
    file_size: int
    header_size: int  # N, the length of the JSON text
    entries: dict[str, SafetensorsEntry]  # in data order
    metadata: dict[str, Any] | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def data_start(self) -> int:
        return 8 + self.header_size

    @property
    def tensor_bytes(self) -> int:
        return sum(entry.nbytes for entry in self.entries.values())


@dataclass(frozen=True)
class _Problem:
    """One inconsistency: its text for reports, and the error ``strict`` raises for it."""

    text: str
    kind: type[FormatError] = FormatError
    fields: dict[str, Any] = field(default_factory=dict)  # the kind's fields, ``path`` aside


def read_safetensors_header(
    store: Store, key: str, *, strict: bool = True, max_header_size: int = MAX_HEADER_SIZE
) -> SafetensorsHeader:
    """Read and check the header of ``key``: one ``head`` and two small ranged reads, no tensor bytes."""
    size = store.head(key).size
    if size < 8:
        raise TruncatedError(
            f"{key}: {size} bytes, too short for a safetensors file",
            path=key,
            offset=size,
            expected=8,
            actual=size,
        )
    length = int.from_bytes(store.get(key, 0, 8), "little")
    check_header_length(key, length, size, max_header_size)
    raw = store.get(key, 8, 8 + length)
    if len(raw) != length:  # the object changed or shrank between head() and get()
        raise _header_past_end(key, length, 8 + len(raw))
    return parse_safetensors_header(key, raw, size, strict=strict)


def check_header_length(key: str, length: int, file_size: int, cap: int = MAX_HEADER_SIZE) -> None:
    # The length prefix is checked before anything is allocated for it (openasr#73).
    if length > cap:
        raise LimitExceededError(
            f"{key}: header length {length} exceeds the {cap} byte cap",
            path=key,
            offset=0,
            limit=cap,
            actual=length,
        )
    if 8 + length > file_size:
        raise _header_past_end(key, length, file_size)


def _header_past_end(key: str, length: int, file_size: int) -> TruncatedError:
    return TruncatedError(
        f"{key}: header of {length} bytes runs past the end of the {file_size} byte file",
        path=key,
        offset=8,
        expected=8 + length,
        actual=file_size,
    )


def parse_safetensors_header(
    key: str, raw: bytes, file_size: int, *, strict: bool = True
) -> SafetensorsHeader:
    """Check the JSON header ``raw`` of a file of ``file_size`` bytes."""
    problems: list[_Problem] = []
    document = _decode(key, raw, problems)
    if not isinstance(document, dict):
        raise BadHeaderError(f"{key}: header is not a JSON object", path=key, offset=8)
    data_start = 8 + len(raw)
    metadata = document.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        problems.append(_Problem(f"__metadata__ must map strings to strings, got {_short(metadata)}"))
    entries = [_entry(key, name, spec, data_start, problems) for name, spec in document.items()]
    entries.sort(key=lambda entry: (entry.begin, entry.end))
    problems.extend(_layout_problems(entries, data_start, file_size))
    header = SafetensorsHeader(
        key=key,
        file_size=file_size,
        header_size=len(raw),
        entries={entry.name: entry for entry in entries},
        metadata=metadata if isinstance(metadata, dict) else None,
        problems=[problem.text for problem in problems],
    )
    if strict and problems:
        raise _strict_error(key, problems)
    return header


def _strict_error(key: str, problems: list[_Problem]) -> FormatError:
    """One error for all the problems: the message lists them all; the class and fields are those
    of the first one that has a precise class, so a caller can tell an overlap from a gap."""
    first = next((p for p in problems if p.kind is not FormatError), problems[0])
    message = f"{key}: " + "; ".join(problem.text for problem in problems)
    return first.kind(message, path=key, **first.fields)


def _decode(key: str, raw: bytes, problems: list[_Problem]) -> Any:
    duplicates: list[str] = []

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result = dict(pairs)  # the last value wins, as in serde
        if len(result) != len(pairs):
            seen: set[str] = set()
            for name, _ in pairs:
                if name in seen:
                    duplicates.append(name)
                seen.add(name)
        return result

    try:
        document = json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        # RecursionError: deeply nested arrays in a hostile header.
        raise BadHeaderError(
            f"{key}: header is not valid JSON: {exc}", path=key, offset=8 + _json_error_position(raw, exc)
        ) from None
    problems.extend(
        _Problem(f"duplicate key {name!r} in header", DuplicateKeyError, {"offset": 8, "key": name})
        for name in dict.fromkeys(duplicates)
    )
    if raw[:1] in (b" ", b"\t", b"\r", b"\n"):
        problems.append(
            _Problem(
                "header starts with whitespace, not '{' (the format says it must; newer reference "
                "readers accept it, older ones refuse it)"
            )
        )
    return document


def _json_error_position(raw: bytes, exc: Exception) -> int:
    """The byte of the header where decoding failed; 0 (its start) when the decoder cannot say."""
    if isinstance(exc, UnicodeDecodeError):
        return exc.start
    if isinstance(exc, json.JSONDecodeError):
        return len(raw.decode("utf-8")[: exc.pos].encode("utf-8"))  # pos counts characters
    return 0


def _entry(key: str, name: str, spec: Any, data_start: int, problems: list[_Problem]) -> SafetensorsEntry:
    if not isinstance(spec, dict):
        raise _bad_entry(key, name, "entry is not an object")
    dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
    bits = DTYPE_BITS.get(dtype) if isinstance(dtype, str) else None
    if bits is None:
        # Without an element size no offset can be checked (kekzl/imp#1603 skipped them).
        raise _bad_entry(key, name, f"unsupported dtype {_short(dtype)}")
    if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
        raise _bad_entry(key, name, f"bad shape {_short(shape)}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(n) is int and n >= 0 for n in offsets)
        or offsets[1] < offsets[0]
    ):
        raise _bad_entry(key, name, f"bad data_offsets {_short(offsets)}")
    nbits = math.prod(shape) * bits
    span = offsets[1] - offsets[0]
    if nbits >= 1 << 64:
        problems.append(_Problem(f"tensor {name!r}: shape {shape} of {dtype} overflows 64-bit sizes"))
    elif nbits % 8:
        problems.append(
            _Problem(f"tensor {name!r}: {dtype} {shape} is {nbits} bits, not a whole number of bytes")
        )
    elif span != nbits // 8:
        problems.append(
            _Problem(f"tensor {name!r}: data_offsets span {span} bytes, {dtype} {shape} needs {nbits // 8}")
        )
    return SafetensorsEntry(name, dtype, tuple(shape), offsets[0], offsets[1], data_start)


def _bad_entry(key: str, name: str, what: str) -> BadHeaderError:
    # An entry is not located in the header text; the header as a whole is what is bad.
    return BadHeaderError(f"{key}: tensor {name!r}: {what}", path=key, offset=8)


def _layout_problems(entries: list[SafetensorsEntry], data_start: int, file_size: int) -> list[_Problem]:
    """The buffer must be covered exactly: from 0, no gap, no overlap, nothing after the last end."""
    problems = []
    expected, previous = 0, None
    for entry in entries:
        if entry.begin > expected:
            problems.append(
                _Problem(
                    f"tensor {entry.name!r} starts at {entry.begin}, expected {expected} "
                    f"(a gap of {entry.begin - expected} bytes)"
                )
            )
        elif entry.begin < expected:
            problems.append(_overlap(previous, entry, expected))
        if entry.end >= expected:
            expected, previous = entry.end, entry
    accounted = data_start + expected
    if accounted < file_size:
        problems.append(
            _Problem(
                f"header accounts for {accounted} bytes, the file has {file_size} "
                f"({file_size - accounted} trailing bytes)"
            )
        )
    elif accounted > file_size:
        problems.append(
            _Problem(
                f"header accounts for {accounted} bytes, the file has {file_size} "
                f"(truncated: {accounted - file_size} bytes missing)",
                TruncatedError,
                {"offset": file_size, "expected": accounted, "actual": file_size},
            )
        )
    return problems


def _overlap(previous: SafetensorsEntry, entry: SafetensorsEntry, expected: int) -> _Problem:
    return _Problem(
        f"tensor {entry.name!r} starts at {entry.begin}, expected {expected} "
        f"(it overlaps tensor {previous.name!r})",
        OverlapError,
        {"first": previous.byte_range, "second": entry.byte_range},
    )


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
