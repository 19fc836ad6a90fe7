"""Counting the bytes of tensors alive: what a memory budget measures one step with.

:class:`LiveBytes` counts every tensor storage an operator creates inside the context, from its
creation until it is freed, and keeps the maximum -- what CUDA's ``max_memory_allocated`` reports,
on any device (a ``TorchDispatchMode`` sees every operator, also those autograd's backward runs).
Storages that existed before (parameters, the caller's tensors), views of them and in-place results
are not new memory and are not counted; scratch buffers a kernel allocates for itself are not
operator outputs and are not counted either.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["LiveBytes", "footprint"]

#: CUDA's caching allocator hands out blocks in multiples of 512 bytes (what max_memory_allocated counts)
CUDA_BLOCK = 512
#: on the CPU, glibc serves an allocation it cannot take from its free lists with mmap, in whole pages,
#: once it is at least MALLOC_MMAP_THRESHOLD_ (a process that returns freed memory to the system sets
#: it to 64 KiB or less), and torch asks for 64-byte alignment: measured with mallinfo2 (glibc, torch
#: 2.13), a tensor of n bytes then takes round_up(n + 136, 4096) -- 136 is the least overhead that
#: reproduces every size from 512 KiB - 200 to 3 MiB (65536 bytes take 69632: 6% more)
MMAP_MIN, PAGE, MMAP_OVERHEAD = 1 << 16, 4096, 136


def footprint(nbytes: int, device_type: str = "cpu") -> int:
    """Bytes a tensor storage of ``nbytes`` occupies as its allocator counts it: CUDA blocks of 512
    bytes; on the CPU whole pages for large allocations (smaller ones share the heap's pages and
    are counted as they are)."""
    if nbytes <= 0:
        return 0
    if device_type == "cuda":
        return -(-nbytes // CUDA_BLOCK) * CUDA_BLOCK
    if device_type == "cpu" and nbytes + MMAP_OVERHEAD >= MMAP_MIN:
        return -(-(nbytes + MMAP_OVERHEAD) // PAGE) * PAGE
    return nbytes


def _storage_ptrs(values) -> set:
    ptrs = set()
    for t in tree_flatten(values)[0]:
        if isinstance(t, torch.Tensor):
            try:
                ptrs.add(t.untyped_storage().data_ptr())
            except (RuntimeError, NotImplementedError):  # a tensor without storage (a subclass)
                pass
    return ptrs


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages created inside the context that are alive now (``current``) and at most
    (``peak``); :meth:`mark` starts a new peak from the current level."""

    def __init__(self):
        super().__init__()
        self.current = self.peak = 0
        self._live: dict[int, int] = {}

    def mark(self) -> int:
        """Restart the peak at the current level; returns that level."""
        self.peak = self.current
        return self.current

    def _freed(self, key: int) -> None:
        nbytes = self._live.pop(key, None)
        if nbytes is not None:
            self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = None
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            try:
                storage = t.untyped_storage()
            except (RuntimeError, NotImplementedError):
                continue
            key = id(storage)
            nbytes = storage.nbytes()
            if key in self._live or not nbytes:
                continue
            nbytes = footprint(nbytes, storage.device.type)
            if inputs is None:
                inputs = _storage_ptrs((args, kwargs))
            if storage.data_ptr() in inputs:  # a view of an input or an in-place result
                continue
            self._live[key] = nbytes
            self.current += nbytes
            if self.current > self.peak:
                self.peak = self.current
            weakref.finalize(storage, self._freed, key)
        return out
