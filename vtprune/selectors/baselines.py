"""Method-agnostic baselines: random subset, uniform grid subset, grid average pooling, uniform frame sampling.

All functions are pure: integers / tensors in, tensors out. Index tensors are ``torch.long`` and
sorted ascending (raster order of the h x w token grid).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

__all__ = ["PooledTokens", "random_select", "uniform_grid_select", "pool_grid", "uniform_frames"]

# A layout (rows, cols) is "close to the grid's aspect ratio" when the aspect of its cells is within
# this factor of the best achievable cell aspect (see ``_grid_layout``).
_ASPECT_TOLERANCE = math.log(1.5)


def _check_grid(height: int, width: int) -> None:
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an int, got {type(value).__name__}")
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def _check_k(k: int, low: int, high: int, what: str = "k") -> None:
    if isinstance(k, bool) or not isinstance(k, int):
        raise ValueError(f"{what} must be an int, got {type(k).__name__}")
    if not low <= k <= high:
        raise ValueError(f"{what} must be in [{low}, {high}], got {k}")


@lru_cache(maxsize=4096)
def _grid_layout(height: int, width: int, k: int) -> tuple[int, int]:
    """Pick an output grid (rows, cols) with rows*cols <= k, rows <= height, cols <= width.

    Cell aspect deviation ``dev = |log((height/rows) / (width/cols))|`` (0 = square cells, i.e. the
    layout has exactly the grid's aspect ratio). Among layouts with ``dev <= min_dev + log(1.5)`` the
    one with the largest rows*cols wins; ties -> smaller dev, then fewer rows. Requires k >= 1.
    """
    candidates = []  # (rows, cols, dev)
    for rows in range(1, min(height, k) + 1):
        for cols in range(1, min(width, k // rows) + 1):
            dev = round(abs(math.log((rows * width) / (cols * height))), 12)
            candidates.append((rows, cols, dev))
    min_dev = min(c[2] for c in candidates)
    eligible = [c for c in candidates if c[2] <= min_dev + _ASPECT_TOLERANCE + 1e-12]
    rows, cols, _ = min(eligible, key=lambda c: (-c[0] * c[1], c[2], c[0]))
    return rows, cols


def _centres(length: int, parts: int) -> list[int]:
    """Index of the cell containing the centre of each of ``parts`` equal bands of ``[0, length)``."""
    # centre of band i is (i + 0.5) * length / parts  ->  floor((2i + 1) * length / (2 parts))
    return [((2 * i + 1) * length) // (2 * parts) for i in range(parts)]


def _band_starts(length: int, parts: int) -> list[int]:
    """Start of each of ``parts`` contiguous bands partitioning ``[0, length)`` (sizes differ by <= 1)."""
    return [(i * length) // parts for i in range(parts)]


def random_select(
    num_tokens: int, k: int, seed: int, *, device: torch.device | str | None = None
) -> torch.Tensor:
    """Uniformly random subset of ``k`` of ``num_tokens`` token indices (sorted ascending).

    Baseline used throughout the token-pruning literature (e.g. the "random" rows in FastV, SparseVLM,
    VisionZip, DivPrune). No hyper-parameters besides ``seed``. Uses a local CPU ``torch.Generator``
    so the global RNG state is never touched; the result is moved to ``device`` (default CPU).
    """
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 0:
        raise ValueError(f"num_tokens must be an int >= 0, got {num_tokens!r}")
    _check_k(k, 0, num_tokens)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {type(seed).__name__}")
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    perm = torch.randperm(num_tokens, generator=gen, dtype=torch.long)
    keep, _ = torch.sort(perm[:k])
    return keep.to(device) if device is not None else keep


def uniform_grid_select(
    height: int, width: int, k: int, *, device: torch.device | str | None = None
) -> torch.Tensor:
    """Raster indices of exactly ``k`` tokens spread evenly over a ``height x width`` grid.

    Spatially uniform subsampling baseline (the "uniform"/"grid" rows of VisionZip / DivPrune style
    comparisons); no hyper-parameters. A sub-lattice of ``rows x cols <= k`` tokens is chosen with a
    layout close to the grid aspect ratio (same rule as :func:`pool_grid`); its rows/cols are the cells
    holding the centres of equal bands. The remaining ``k - rows*cols`` tokens are evenly spaced picks
    (band centres again) in the ascending list of not-yet-selected tokens. ``k == height*width``
    returns every index.
    """
    _check_grid(height, width)
    n = height * width
    _check_k(k, 0, n)
    if k == 0:
        return torch.empty(0, dtype=torch.long, device=device)
    if k == n:
        return torch.arange(n, dtype=torch.long, device=device)
    rows, cols = _grid_layout(height, width, k)
    row_idx = torch.tensor(_centres(height, rows), dtype=torch.long)  # [rows]
    col_idx = torch.tensor(_centres(width, cols), dtype=torch.long)  # [cols]
    lattice = (row_idx[:, None] * width + col_idx[None, :]).reshape(-1)  # [rows*cols], ascending
    extra = k - rows * cols
    if extra > 0:
        taken = torch.zeros(n, dtype=torch.bool)
        taken[lattice] = True
        free = torch.nonzero(~taken).squeeze(1)  # [n - rows*cols], ascending
        picks = torch.tensor(_centres(free.numel(), extra), dtype=torch.long)  # [extra], distinct
        lattice = torch.cat([lattice, free[picks]])
    keep, _ = torch.sort(lattice)
    return keep.to(device) if device is not None else keep


@dataclass(frozen=True)
class PooledTokens:
    """Result of :func:`pool_grid`.

    tokens: ``[m, D]`` pooled tokens in raster order of the output grid (input dtype).
    anchors: ``[m]`` long, raster index of the top-left input token of each window (ascending).
    assignment: ``[h*w]`` long, output index that every input token was pooled into.
    grid: ``(ph, pw)`` output grid shape, ``m == ph * pw``.
    """

    tokens: torch.Tensor
    anchors: torch.Tensor
    assignment: torch.Tensor
    grid: tuple[int, int]


def pool_grid(features: torch.Tensor, height: int, width: int, k: int) -> PooledTokens:
    """Average-pool an ``h x w`` token grid down to a ``ph x pw`` grid with ``ph*pw <= k``.

    Spatial pooling baseline (as in LLaVA-style 2x2 / adaptive pooling of visual tokens); no
    hyper-parameters besides the budget ``k``. ``(ph, pw)`` maximises ``ph*pw`` among layouts whose
    cell aspect is within 1.5x of the best achievable for the grid aspect ratio. Windows partition
    the grid into contiguous bands ``[floor(i*h/ph), floor((i+1)*h/ph))`` (sizes differ by at most 1,
    every token in exactly one window -- unlike ``adaptive_avg_pool2d``, windows never overlap).
    Means are accumulated in float32 and cast back to the input dtype.
    """
    _check_grid(height, width)
    n = height * width
    if not isinstance(features, torch.Tensor) or features.ndim != 2:
        raise ValueError(
            f"features must be a 2-D tensor [h*w, D], got shape {getattr(features, 'shape', None)}"
        )
    if features.shape[0] != n:
        raise ValueError(f"features has {features.shape[0]} rows but height*width = {height}*{width} = {n}")
    _check_k(k, 1, n)
    device = features.device
    ph, pw = _grid_layout(height, width, k)
    row_starts = torch.tensor(_band_starts(height, ph), dtype=torch.long, device=device)  # [ph]
    col_starts = torch.tensor(_band_starts(width, pw), dtype=torch.long, device=device)  # [pw]
    # band of every input row / column: last start <= position
    row_band = torch.searchsorted(row_starts, torch.arange(height, device=device), right=True) - 1  # [h]
    col_band = torch.searchsorted(col_starts, torch.arange(width, device=device), right=True) - 1  # [w]
    assignment = (row_band[:, None] * pw + col_band[None, :]).reshape(n)  # [h, w] -> [h*w]
    anchors = (row_starts[:, None] * width + col_starts[None, :]).reshape(ph * pw)  # [ph, pw] -> [m]
    m = ph * pw
    sums = torch.zeros(m, features.shape[1], dtype=torch.float32, device=device)
    sums.index_add_(0, assignment, features.float())  # [m, D]
    counts = torch.bincount(assignment, minlength=m).to(torch.float32)  # [m], all >= 1
    tokens = (sums / counts[:, None]).to(features.dtype)
    return PooledTokens(tokens=tokens, anchors=anchors, assignment=assignment, grid=(ph, pw))


def uniform_frames(frames: int, count: int) -> torch.Tensor:
    """``count`` evenly spaced frame indices of ``frames`` (ascending, first and last included when count > 1):
    ``linspace(0, frames - 1, count)`` truncated to ints, the uniform sampling of LLaVA-Video / lmms-eval."""
    _check_k(frames, 1, 1 << 30, "frames")
    _check_k(count, 1, frames, "count")
    return torch.linspace(0, frames - 1, count, dtype=torch.float64).long()
