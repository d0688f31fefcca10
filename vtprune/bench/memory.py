"""Peak memory of a code region: the CUDA caching allocator on GPU, the process's peak RSS on CPU.

* CUDA: ``torch.cuda.reset_peak_memory_stats`` before, ``torch.cuda.max_memory_allocated`` after; the
  result is the allocator's peak (``peak_bytes``) and the peak above what was allocated when the region
  started (``delta_bytes``: activations, KV cache and temporaries of the region).
* CPU (Linux): the kernel's high-water mark of the resident set (``VmHWM``) is reset by writing ``5`` to
  ``/proc/self/clear_refs`` before the region and read from ``/proc/self/status`` after; freed heap pages
  are first returned to the OS (glibc ``malloc_trim``) so that the resident set at the start is the memory
  in use. ``tracemalloc`` would not see tensor memory (PyTorch allocates outside Python's allocator).
  ``delta_bytes`` is the peak above the RSS at the start of the region (activations, KV cache,
  temporaries). Without ``/proc`` the lifetime peak (``ru_maxrss``) is reported and ``kind`` says so.
  The same run also counts the peak of the tensors it creates at the dispatcher (``tensor_peak_bytes``,
  :class:`~vtprune.bench.live_tensors.LiveTensorPeak`), which no allocator caching can blur.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["MemoryResult", "measure_peak_memory", "current_rss_bytes"]


@dataclass
class MemoryResult:
    peak_bytes: int        # CUDA: allocator peak; CPU: peak resident set of the process
    delta_bytes: int       # peak minus the level at the start of the region
    kind: str              # "cuda-allocator" | "cpu-peak-rss" | "cpu-ru-maxrss (lifetime peak)"
    #: CPU: peak bytes of the tensors the region created, counted at the dispatcher
    #: (:class:`vtprune.bench.live_tensors.LiveTensorPeak`); None on CUDA
    tensor_peak_bytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"peak_bytes": self.peak_bytes, "delta_bytes": self.delta_bytes, "kind": self.kind,
                "tensor_peak_bytes": self.tensor_peak_bytes}


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            match = re.search(rf"^{field}:\s+(\d+)\s+kB", handle.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def current_rss_bytes() -> int | None:
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def _release_free_heap() -> None:
    """Give freed heap pages back to the OS (glibc ``malloc_trim``), so that the resident set is the memory in
    use and a region's high-water mark measures what it allocates (not pages a previous region freed)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> bool:
    _release_free_heap()
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return False
    return True


def measure_peak_memory(fn: Callable[[], Any], device: torch.device | str = "cpu") -> tuple[Any, MemoryResult]:
    """Run ``fn()`` once and return ``(its result, MemoryResult)``."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return out, MemoryResult(peak_bytes=peak, delta_bytes=peak - start, kind="cuda-allocator")
    from .live_tensors import LiveTensorPeak

    meter = LiveTensorPeak()
    if _reset_peak_rss():
        start = current_rss_bytes() or 0
        with meter:
            out = fn()
        peak_kib = _status_kib("VmHWM")
        peak = peak_kib * 1024 if peak_kib is not None else 0
        return out, MemoryResult(peak_bytes=peak, delta_bytes=max(peak - start, 0), kind="cpu-peak-rss",
                                 tensor_peak_bytes=meter.peak_bytes)
    import resource

    start = current_rss_bytes() or 0
    with meter:
        out = fn()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out, MemoryResult(peak_bytes=peak, delta_bytes=max(peak - start, 0),
                             kind="cpu-ru-maxrss (lifetime peak)", tensor_peak_bytes=meter.peak_bytes)
