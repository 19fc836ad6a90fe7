"""Per-step bookkeeping whose Python overhead does not grow with the number of steps.

A tensor object costs a few hundred bytes of Python and TensorImpl besides its data: one per step
(a stored state, a 0-d time, a view into a table) made 20 000 steps of a 4x4 state cost 20 MiB for
1.2 MiB of states, and 10^6 steps without any storage 535 MiB.  These containers keep per-step data in
preallocated chunks of about 1 MiB, so the overhead is one tensor per chunk.
"""

from __future__ import annotations

import torch

__all__ = ["ChunkedStore"]

_CHUNK_BYTES = 1 << 20
_MAX_CHUNK = 1024


class ChunkedStore:
    """Append-only sequence of equally shaped tensors, stored in preallocated chunks.

    ``store[n]`` is a view of entry ``n`` (valid while the store lives); ``len(store)`` the count.
    """

    __slots__ = ("_chunks", "_n", "_chunk")

    def __init__(self) -> None:
        self._chunks: list[torch.Tensor] = []
        self._n = 0
        self._chunk = 0

    def append(self, x: torch.Tensor) -> None:
        if self._n == 0:
            # about 1 MiB per chunk; a large state gets a chunk of 1 (its data dwarfs the overhead)
            self._chunk = max(1, min(_MAX_CHUNK, _CHUNK_BYTES // max(1, x.numel() * x.element_size())))
        i = self._n % self._chunk
        if i == 0:
            self._chunks.append(torch.empty((self._chunk, *x.shape), dtype=x.dtype, device=x.device))
        self._chunks[-1][i].copy_(x.detach())  # a plain copy: no graph, whatever the grad mode
        self._n += 1

    def __len__(self) -> int:
        return self._n

    def __bool__(self) -> bool:
        return self._n > 0

    def __getitem__(self, n: int) -> torch.Tensor:
        if n < 0:
            n += self._n
        if not 0 <= n < self._n:
            raise IndexError(n)
        return self._chunks[n // self._chunk][n % self._chunk]

    def chunks(self):
        """The filled parts of the chunks, in order."""
        for k, c in enumerate(self._chunks):
            yield c[: min(self._chunk, self._n - k * self._chunk)]

    def stack(self) -> torch.Tensor:
        """All entries as one tensor ``(len, *shape)`` (a copy)."""
        return torch.cat(list(self.chunks())) if self._n else torch.empty(0)

    def nbytes(self) -> int:
        """Bytes of the entries themselves (what the solve keeps for its backward)."""
        if not self._n:
            return 0
        c = self._chunks[0]
        return self._n * c[0].numel() * c.element_size()
