"""The files of one checkpoint, each read once: pickles symbolically, headers, small scalars.

Every view asks this object for what it needs, so ``--all`` reads each pickle and header once,
and the only tensor bytes read without ``--stats`` are the few bytes of 0-dim tensors that hold
counters (an optimizer's ``step``, a tensor ``lr``), fetched in coalesced ranged reads.
"""

from __future__ import annotations

import json
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ckptkit.errors import FormatError
from ckptkit.formats.safetensors import SafetensorsHeader, read_safetensors_header
from ckptkit.formats.torchfile import TorchFile, read_torch_file
from ckptkit.ops.inspect.values import as_tensor, integral
from ckptkit.pickle import PickleFormatError, TensorRef
from ckptkit.pickle.policy import UNSAFE_CLASSES
from ckptkit.pickle.values import GlobalUse
from ckptkit.storage.base import Store

MAX_JSON_BYTES = 64 << 20  # trainer_state.json of a long run is a few MB of log history
_COALESCE_GAP = 64 << 10  # scalars closer than this are fetched in one read
_READ_THREADS = 16  # object stores answer ranged GETs in parallel; local disk does not mind

# struct codes of the dtypes a counter or hyper-parameter tensor can have.
_SCALAR_FORMATS = {
    "float64": "<d",
    "float32": "<f",
    "float16": "<e",
    "int64": "<q",
    "int32": "<i",
    "int16": "<h",
    "int8": "<b",
    "uint8": "<B",
    "bool": "<?",
}
_ITEMSIZE = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
}


@dataclass(frozen=True)
class NamedTensor:
    """A tensor of the checkpoint: the file holding it, a dotted name, and where its bytes are."""

    file: str
    name: str
    tensor: TensorRef

    @property
    def label(self) -> str:
        return f"{self.file}:{self.name}"


@dataclass(frozen=True)
class UnsafeGlobal:
    """A global that loading ``file`` with ``torch.load(weights_only=False)`` would import unvetted."""

    file: str
    name: str  # module.name
    classification: str  # "unknown" or "dangerous", as scan says
    pickle: str
    offset: int


class Source:
    """Reads files of ``store`` on demand and keeps what it read."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._torch: dict[str, TorchFile] = {}
        self._headers: dict[str, SafetensorsHeader] = {}
        self._json: dict[str, Any] = {}
        self.problems: list[str] = []
        self.unsafe: list[UnsafeGlobal] = []

    def torch(self, key: str) -> TorchFile:
        if key not in self._torch:
            try:
                found = read_torch_file(self.store, key)
            except PickleFormatError as exc:  # a payload before or behind the fault is still one
                self.note_globals(key, exc.globals)
                raise
            self.note_globals(key, found.globals)
            self.problems.extend(f"{key}: {p}" for p in found.problems)
            self._torch[key] = found
        return self._torch[key]

    def value(self, key: str) -> Any:
        return self.torch(key).value

    def note_globals(self, key: str, uses: list[GlobalUse]) -> None:
        """Keep the globals of ``key`` that scan calls unsafe: describing the file is no reason
        to stay silent about what loading it the usual way would import and call."""
        for use in uses:
            if use.classification in UNSAFE_CLASSES:
                found = UnsafeGlobal(key, use.ref.qualname, use.classification, use.pickle_name, use.offset)
                if found not in self.unsafe:
                    self.unsafe.append(found)

    def safetensors(self, key: str) -> SafetensorsHeader:
        if key not in self._headers:
            header = read_safetensors_header(self.store, key, strict=False)
            self.problems.extend(f"{key}: {p}" for p in header.problems)
            self._headers[key] = header
        return self._headers[key]

    def json(self, key: str) -> Any:
        if key not in self._json:
            size = self.store.head(key).size
            if size > MAX_JSON_BYTES:
                raise FormatError(f"{key}: {size} bytes, over the {MAX_JSON_BYTES} byte cap for JSON")
            try:
                self._json[key] = json.loads(self.store.get(key).decode("utf-8"))
            except (UnicodeDecodeError, ValueError, RecursionError) as exc:
                raise FormatError(f"{key}: not valid JSON: {exc}") from None
        return self._json[key]

    def read_scalars(self, file: str | None, values: list[Any]) -> list[Any]:
        """Numbers for ``values``: ints and floats as they are, 1-element tensors read from
        ``file`` (or, for None, from the file their storage names: a native shard); anything
        else (a big tensor, a string, None) stays None."""
        result: list[Any] = [v if type(v) in (int, float) else None for v in values]
        wanted: dict[str, list[tuple[int, int, str]]] = {}  # file -> (index, offset, dtype)
        for index, value in enumerate(values):
            tensor = as_tensor(value)
            if tensor is None or tensor.numel != 1 or tensor.storage.byte_offset is None:
                continue
            itemsize = _ITEMSIZE.get(tensor.dtype)
            where = file or tensor.storage.record
            if itemsize is not None and where is not None:
                offset = tensor.storage.byte_offset + tensor.storage_offset * itemsize
                wanted.setdefault(where, []).append((index, offset, tensor.dtype))
        for where, items in wanted.items():
            for index, data, dtype in self._fetch(where, items):
                result[index] = integral(_decode(data, dtype))
        return result

    def _fetch(self, file: str, wanted: list[tuple[int, int, str]]) -> list[tuple[int, bytes, str]]:
        wanted.sort(key=lambda w: w[1])
        groups: list[list[tuple[int, int, str]]] = []
        for item in wanted:
            if groups and item[1] - groups[-1][-1][1] <= _COALESCE_GAP:
                groups[-1].append(item)
            else:
                groups.append([item])

        def read(group: list[tuple[int, int, str]]) -> list[tuple[int, bytes, str]]:
            start = group[0][1]
            end = group[-1][1] + _ITEMSIZE[group[-1][2]]
            window = self.store.get(file, start, end)
            return [(i, window[off - start : off - start + _ITEMSIZE[d]], d) for i, off, d in group]

        if len(groups) <= 1:
            return [item for group in groups for item in read(group)]
        with ThreadPoolExecutor(max_workers=min(_READ_THREADS, len(groups))) as pool:
            return [item for chunk in pool.map(read, groups) for item in chunk]


def _decode(data: bytes, dtype: str) -> float | int | bool | None:
    if len(data) != _ITEMSIZE[dtype]:
        return None  # the record is shorter than its pickle claims; the reader reported it
    if dtype == "bfloat16":  # the top half of a float32
        return struct.unpack("<f", b"\0\0" + data)[0]
    return struct.unpack(_SCALAR_FORMATS[dtype], data)[0]
