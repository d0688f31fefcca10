"""Peak memory of the tensors an operation creates, on any device, counted at the dispatcher.

CPU memory has no allocator statistics (``torch.cuda.max_memory_allocated`` has no CPU twin) and process
RSS is blurred by the C allocator's caching, so :class:`LiveTensorPeak` counts tensor storages directly:
every storage produced inside the block is added when it appears and subtracted when its last tensor is
garbage-collected. Tensors that existed before the block (weights, inputs) are not counted; the result is
the peak of activations, caches and temporaries.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensorPeak(TorchDispatchMode):
    """``with LiveTensorPeak() as meter: ...`` then ``meter.peak_bytes``, ``meter.live_bytes`` and
    ``meter.largest_bytes`` (the largest single storage created)."""

    def __init__(self) -> None:
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self.largest_bytes = 0
        self._refs: dict[tuple[int, int], int] = {}      # storage key -> tensors alive on it
        self._sizes: dict[tuple[int, int], int] = {}

    def _release(self, key: tuple[int, int]) -> None:
        self._refs[key] -= 1
        if self._refs[key] == 0:
            self.live_bytes -= self._sizes.pop(key)
            del self._refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = (storage.data_ptr(), storage.nbytes())
            if key[0] == 0:
                continue
            if key not in self._refs:
                self._refs[key] = 0
                self._sizes[key] = key[1]
                self.live_bytes += key[1]
                self.peak_bytes = max(self.peak_bytes, self.live_bytes)
                self.largest_bytes = max(self.largest_bytes, key[1])
            self._refs[key] += 1
            weakref.finalize(tensor, self._release, key)
        return out
