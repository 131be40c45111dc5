"""Zero-copy byte views of tensor memory, without needing numpy."""

from __future__ import annotations

import ctypes

import torch


def host_memoryview(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor as a writable memoryview sharing its memory.

    torch tensors do not export the buffer protocol and ``Tensor.numpy()`` needs numpy, which
    ckptkit does not require; a ctypes array over the data pointer does the job. The array keeps
    the tensor alive, and every memoryview keeps the array alive, so a sink that holds on to a
    chunk never sees freed memory.
    """
    nbytes = tensor.numel() * tensor.element_size()
    array = (ctypes.c_ubyte * nbytes).from_address(tensor.data_ptr())
    array._owner = tensor  # type: ignore[attr-defined]
    return memoryview(array).cast("B")


def storage_bytes(storage: torch.UntypedStorage, start: int, end: int) -> memoryview:
    """Bytes ``[start, end)`` of ``storage``; an accelerator's bytes are copied to host here."""
    view = torch.empty(0, dtype=torch.uint8, device=storage.device)
    view.set_(storage, start, (end - start,))
    if view.device.type != "cpu":
        view = view.cpu()
    return host_memoryview(view)
