"""Loading pickle checkpoints without running them, and the allowlist for those who must use torch.load.

``safe_load(path)`` builds the result itself from ckptkit's symbolic reading of the file
(:mod:`ckptkit.pickle`): tensors from their storage bytes (ranged reads, one per storage, so views
of one storage stay views of one storage), numpy arrays from their raw bytes, and DeepSpeed's
vetted objects as :class:`RestoredObject` attribute bags. No code from the file runs and nothing
it names is imported, so DeepSpeed need not be installed. Anything not vetted refuses the whole
load with :class:`UnsafeContentError`: there is no partial result and no fallback.

``safe_globals()`` is for code that calls ``torch.load(weights_only=True)`` itself: it registers
the vetted classes importable here (``safe-loading.md`` §3, tiers 1 and 2), never a name on the
never-allow list. torch and numpy are imported only inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import zlib
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from types import MappingProxyType
from typing import Any

from ckptkit.errors import CrcMismatchError, FormatError, TruncatedError, UnsafeContentError
from ckptkit.formats import zipfile_reader as zr
from ckptkit.formats.torchfile import TorchFile, read_torch_file
from ckptkit.formats.tree import check_storage
from ckptkit.ops.scan import scan_file
from ckptkit.pickle import NdArray, Opaque, PickleFormatError, StorageRef, TensorRef, TorchSize, VettedObject
from ckptkit.pickle.policy import (
    PARAMETER,
    SCALARS,
    is_tensor_with_attributes,
    refuse_unsafe,
    unsafe_names,
    unvetted_globals,
)
from ckptkit.pickle.registered import DEEPSPEED_GLOBALS, NUMPY_GLOBALS
from ckptkit.pickle.registered import NUMPY_CORES as _NUMPY_CORES
from ckptkit.pickle.values import GlobalRef
from ckptkit.storage import Store
from ckptkit.storage.target import resolve_target

_ZERO_STAGE = "deepspeed.runtime.zero.config.ZeroStageEnum"
_RESTORED_CLASSES = frozenset(
    {
        "deepspeed.runtime.fp16.loss_scaler.LossScaler",
        "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
        "deepspeed.utils.tensor_fragment.fragment_address",
    }
)


# --- safe_globals --------------------------------------------------------------------------------


def vetted_globals() -> list[Any]:
    """The entries for ``torch.serialization.add_safe_globals``: vetted classes importable here.

    Each numpy ``_reconstruct`` is registered under both spellings (``numpy.core`` and
    ``numpy._core``) with torch's tuple form, so files written under numpy 1 and 2 both load.
    """
    entries: list[Any] = []
    if importlib.util.find_spec("deepspeed") is not None:
        entries.extend(_importable(DEEPSPEED_GLOBALS))
    if importlib.util.find_spec("numpy") is not None:
        entries.extend(_importable(NUMPY_GLOBALS))
        # numpy._core first: numpy 2 still has numpy.core, but only as a deprecated alias.
        reconstruct = _importable([(core, "_reconstruct") for core in _NUMPY_CORES])[:1]
        entries.extend((fn, f"{core}._reconstruct") for fn in reconstruct for core in _NUMPY_CORES)
    return entries


def _importable(names: list[tuple[str, str]] | tuple[tuple[str, str], ...]) -> list[Any]:
    found = []
    for module, name in names:
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):  # an older version without it: not registered
            continue
    return found


@contextlib.contextmanager
def safe_globals() -> Iterator[list[Any]]:
    """Within the block, ``torch.load(weights_only=True)`` accepts ckptkit's vetted classes.

    Yields the entries registered. torch's allowlist is process-wide, so loads in other threads
    see the entries too while the block runs (``safe-loading.md`` §2).
    """
    import torch

    entries = vetted_globals()
    with torch.serialization.safe_globals(entries):
        yield entries


# --- safe_load -----------------------------------------------------------------------------------


class RestoredObject:
    """A vetted object rebuilt as its class name and attributes, read-only; its class is not imported.

    ``scaler.cur_scale`` and ``scaler["cur_scale"]`` both read an attribute.
    """

    __slots__ = ("_class_name", "_state")

    def __init__(self, class_name: str, state: Mapping[str, Any]) -> None:
        object.__setattr__(self, "_class_name", class_name)
        object.__setattr__(self, "_state", MappingProxyType(dict(state)))

    @property
    def class_name(self) -> str:
        return self._class_name

    @property
    def state(self) -> Mapping[str, Any]:
        return self._state

    def __getattr__(self, name: str) -> Any:
        try:
            return object.__getattribute__(self, "_state")[name]
        except KeyError:
            raise AttributeError(f"{self._class_name} has no attribute {name!r}") from None

    def __getitem__(self, name: str) -> Any:
        return self._state[name]

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{self._class_name} restored by ckptkit is read-only")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RestoredObject):
            return NotImplemented
        return self._class_name == other._class_name and dict(self._state) == dict(other._state)

    __hash__ = None  # type: ignore[assignment]  # equal by value, and the state may be unhashable

    def __repr__(self) -> str:
        return f"RestoredObject({self._class_name!r}, {dict(self._state)!r})"


def safe_load(
    path_or_url: str | os.PathLike[str] | Store, map_location: Any = None, **storage_options: Any
) -> Any:
    """Load one ``torch.save`` file (zip, legacy or bare pickle) without running any of it.

    ``map_location`` works as in ``torch.load`` (None keeps each storage where it was saved; a
    device, a ``{saved: new}`` dict, or a callable ``(storage, location)``). Raises
    :class:`UnsafeContentError` naming every global that is not vetted, and
    :class:`FormatError` when the file is inconsistent (a CRC or a record size that does not
    match, a tensor view past its storage) rather than returning anything built from it. Each
    zip record's CRC-32 is checked as its bytes are read; the records no tensor needs
    (``version``, ...) are checked too, so a file this accepts passes ``ckptkit verify``.
    """
    target = resolve_target(path_or_url, **storage_options)
    key = target.key
    if key is None:
        raise FormatError(f"{path_or_url}: safe_load reads one file, and this is a directory")
    return safe_load_key(target.store, key, map_location)


def safe_load_key(store: Store, key: str, map_location: Any = None) -> Any:
    """:func:`safe_load` of file ``key`` of an open store (a checkpoint's files)."""
    try:
        torch_file = read_torch_file(store, key)
    except PickleFormatError as exc:
        # A broken pickle that named a payload before breaking is refused for the payload.
        _refuse(key, unsafe_names(exc.globals), exc)
        raise
    except FormatError as exc:
        # Not a torch.save file; if another loader would meet a payload in it, say so.
        _refuse(key, unsafe_names(scan_file(store, key).globals), exc)
        raise
    _refuse(key, unvetted_globals(torch_file.globals, torch_file.value))
    if torch_file.problems:
        raise FormatError(f"{key}: not loaded, the file is inconsistent: " + "; ".join(torch_file.problems))
    builder = _Builder(store, key, map_location, torch_file.archive)
    value = builder.build(torch_file.value)
    _check_unread_records(store, torch_file, builder.crc_checked)
    return value


def _check_unread_records(store: Store, torch_file: TorchFile, checked: set[str]) -> None:
    """The CRC-32 of every zip record neither the reader nor the build checked (``version``,
    a storage no tensor uses): ``verify`` checks them all, and so must a load that accepts."""
    if torch_file.archive is None:
        return
    done = checked | torch_file.crc_checked
    for entry in torch_file.archive.entries:
        # CRC 0 with data: written with CRCs off; verify warns and skips such a record too.
        if entry.name not in done and entry.crc32:
            actual = zr.record_crc(store, entry)
            if actual != entry.crc32:
                offset = zr.data_offset(store, entry)
                raise _crc_mismatch(torch_file.key, entry.name, offset, entry.crc32, actual)


def _crc_mismatch(
    key: str, record: str, offset: int | None, expected: int, actual: int | None
) -> CrcMismatchError:
    return CrcMismatchError(
        f"{key}: not loaded: record {record} fails its CRC-32 check: the bytes changed after writing",
        path=key,
        offset=offset,
        record=record,
        expected=expected,
        actual=actual,
    )


def _refuse(key: str, names: set[str], cause: Exception | None = None) -> None:
    refuse_unsafe(key, names, "nothing was run ('ckptkit scan' shows where each is used)", cause)


class _Builder:
    """Turns the symbolic tree into real objects; each shared node is built once, so sharing holds."""

    def __init__(self, store: Store, key: str, map_location: Any, archive: zr.ZipArchive | None) -> None:
        import torch

        self.torch = torch
        self.store, self.key = store, key
        self.restore = _restore_location(map_location)
        self.memo: dict[int, Any] = {}
        self.storages: dict[str, Any] = {}
        # Zip records' CRC-32s (none for legacy files); 0 means the writer turned CRCs off.
        self.crcs = {} if archive is None else {entry.name: entry.crc32 for entry in archive.entries}
        self.crc_checked: set[str] = set()

    def build(self, node: Any) -> Any:
        if type(node) in SCALARS:
            return node
        done = self.memo.get(id(node))
        if done is not None:
            return done[1]
        kind = type(node)
        if kind in (list, dict, OrderedDict, Counter):
            # Containers go into the memo before their children: a list may contain itself.
            out: Any = kind()
            self.memo[id(node)] = (node, out)
            if kind is list:
                out.extend(self.build(item) for item in node)
            else:
                for k, v in node.items():
                    out[self.build(k)] = self.build(v)
                for name, value in vars(node).items() if kind is not dict else ():
                    setattr(out, name, self.build(value))  # state_dict()'s _metadata
            return out
        out = self._value(node)
        self.memo[id(node)] = (node, out)  # the node is kept so its id is not reused
        return out

    def _value(self, node: Any) -> Any:
        kind = type(node)
        if kind is TorchSize:
            return self.torch.Size(node)
        if kind in (tuple, set, frozenset):
            return kind(self.build(item) for item in node)
        if kind is bytearray:
            return bytearray(node)
        if kind is TensorRef:
            return self._tensor(node)
        if kind is StorageRef:
            return self.torch.storage.TypedStorage(
                wrap_storage=self._storage(node), dtype=getattr(self.torch, node.dtype), _internal=True
            )
        if kind is NdArray:
            return _ndarray(node)
        if kind is GlobalRef:
            return self._global(node)
        if kind is VettedObject:
            return self._vetted(node)
        if kind is Opaque and is_tensor_with_attributes(node):
            return self._tensor_with_attributes(node)
        raise UnsafeContentError(
            f"{self.key}: refused: {kind.__name__} node has no safe value",
            globals=[node.cls.qualname] if kind is Opaque else [],
        )

    # --- tensors ---------------------------------------------------------------------------

    def _tensor(self, ref: TensorRef) -> Any:
        torch = self.torch
        storage = self._storage(ref.storage)
        tensor = torch.empty((0,), dtype=getattr(torch, ref.dtype), device=storage.device)
        # set_ checks the view against the storage size again, after ckptkit's own check.
        tensor.set_(storage, ref.storage_offset, ref.shape, ref.stride)
        if ref.is_parameter:
            return torch.nn.Parameter(tensor, requires_grad=ref.requires_grad)
        tensor.requires_grad = ref.requires_grad
        return tensor

    def _tensor_with_attributes(self, node: Opaque) -> Any:
        _, new_type, inner, state = node.args
        is_parameter = inner.is_parameter or new_type == PARAMETER
        tensor = self._tensor(replace(inner, is_parameter=is_parameter))
        for name, value in state.items():
            if hasattr(tensor, name):  # never shadow what a tensor already has (data, grad, ...)
                raise FormatError(f"{self.key}: a tensor attribute {name!r} would replace a tensor's own")
            setattr(tensor, name, self.build(value))
        return tensor

    def _storage(self, ref: StorageRef) -> Any:
        cached = self.storages.get(ref.key)
        if cached is not None:
            return cached
        problem = check_storage(ref)
        if problem is not None:
            raise FormatError(f"{self.key}: {problem}")
        buffer = self.torch.empty(ref.nbytes, dtype=self.torch.uint8)
        crc = self._read_into(ref.byte_offset, buffer.numpy()) if ref.nbytes else 0
        self._check_crc(ref.record, ref.byte_offset, crc)
        storage = self.restore(buffer.untyped_storage(), ref.location)
        self.storages[ref.key] = storage
        return storage

    def _read_into(self, offset: int, out: Any) -> int:
        """Fill ``out`` from byte ``offset`` of the file; the CRC-32 of what was read, computed
        chunk by chunk as it arrives, so checking costs no second pass."""
        view = memoryview(out).cast("B")
        crc = 0
        # The storage's end bounds the reader: no request to learn the size, none past the end.
        with self.store.open_read(self.key, size=offset + len(view)) as stream:
            stream.seek(offset)
            filled = 0
            while filled < len(view):
                n = stream.readinto(view[filled:])
                if not n:
                    raise TruncatedError(
                        f"{self.key}: file ends inside a storage at byte {offset + filled}",
                        path=self.key,
                        offset=offset + filled,
                        expected=offset + len(view),
                        actual=offset + filled,
                    )
                crc = zlib.crc32(view[filled : filled + n], crc)
                filled += n
        return crc

    def _check_crc(self, record: str | None, offset: int | None, crc: int) -> None:
        expected = self.crcs.get(record) if record is not None else None
        if expected and crc != expected:
            raise _crc_mismatch(self.key, str(record), offset, expected, crc)
        if record is not None:
            self.crc_checked.add(record)

    # --- other vetted values -----------------------------------------------------------------

    def _global(self, ref: GlobalRef) -> Any:
        from ckptkit.pickle import dtype_name

        name = dtype_name(ref)
        if name is None:
            raise FormatError(f"{self.key}: a bare reference to {ref} has no value ckptkit can build")
        return getattr(self.torch, name)

    def _vetted(self, node: VettedObject) -> Any:
        torch, name, args = self.torch, node.cls.qualname, node.args
        if name == "torch.device":
            return torch.device(*args)
        if name == "torch.serialization._get_layout":
            layout = getattr(torch, args[0].removeprefix("torch."), None)
            if not isinstance(layout, torch.layout):
                raise FormatError(f"{self.key}: unknown tensor layout {args[0]!r}")
            return layout
        if name == "torch._utils._rebuild_device_tensor_from_numpy":
            data, dtype, device, requires_grad = args
            tensor = torch.from_numpy(_ndarray(data)).to(dtype=self._global(dtype), device=device)
            tensor.requires_grad = requires_grad
            return tensor
        if name == _ZERO_STAGE:
            return args[0]  # an int enum; its value compares and hashes like the enum member
        if name in _RESTORED_CLASSES:
            return RestoredObject(name, {k: self.build(v) for k, v in node.state.items()})
        raise FormatError(f"{self.key}: no safe way to build {name}")


def _ndarray(node: NdArray) -> Any:
    import numpy as np

    flat = np.frombuffer(node.data, dtype=np.dtype(node.dtype))
    if node.is_scalar:
        return flat[0]
    # A copy: frombuffer over bytes is read-only, and pickle gives a writable array.
    return flat.reshape(node.shape, order="F" if node.fortran_order else "C").copy(order="K")


def _restore_location(map_location: Any) -> Callable[[Any, str], Any]:
    """``torch.load``'s placement of a storage saved at ``location``, for each kind of map_location."""
    from torch.serialization import default_restore_location

    if map_location is None:
        return default_restore_location
    if isinstance(map_location, dict):
        return lambda storage, location: default_restore_location(
            storage, map_location.get(location, location)
        )
    if callable(map_location):

        def call(storage: Any, location: str) -> Any:
            result = map_location(storage, location)
            return default_restore_location(storage, location) if result is None else result

        return call
    return lambda storage, location: default_restore_location(storage, str(map_location))
