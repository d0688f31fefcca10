"""Attention-score cores for [CLS]-attention pruning.

FasterVLM (Zhang et al., arXiv 2412.01818, "[CLS] Attention is All You Need for Training-Free Visual
Token Pruning") ranks patch tokens by the attention the vision encoder's [CLS] query pays them (in
the penultimate layer used as the LLaVA feature layer), averaged over heads, and keeps the top-k.
VisionZip (arXiv 2412.04467) uses the same scores for its dominant tokens (summed over heads in its official
code: the same ranking). Official FasterVLM: Theia-4869/FasterVLM @ f5d5f12, ``llava/model/llava_arch.py``
L141-157 (head mean, ``topk``, index mask = raster order). Encoders without a [CLS] token (SigLIP, Qwen2-VL
ViT) fall back to the mean attention each key receives.

All probabilities are computed in float32 regardless of the input dtype.
"""

from __future__ import annotations

import torch

__all__ = ["softmax_attention_rows", "cls_attention_scores", "mean_received_attention", "topk_select"]


def _check_qk(queries: torch.Tensor, keys: torch.Tensor) -> None:
    if queries.ndim != 3 or keys.ndim != 3:
        raise ValueError(
            f"queries and keys must be 3-D [H, Q, dh] / [H, N, dh], got {tuple(queries.shape)} and {tuple(keys.shape)}"
        )
    if queries.shape[0] != keys.shape[0] or queries.shape[2] != keys.shape[2]:
        raise ValueError(
            f"queries {tuple(queries.shape)} and keys {tuple(keys.shape)} must agree on heads (dim 0) and head dim (dim 2)"
        )
    if keys.shape[1] == 0:
        raise ValueError("keys must contain at least one key (N >= 1)")
    if queries.device != keys.device:
        raise ValueError(f"queries on {queries.device} but keys on {keys.device}")


def _check_chunk(chunk_size: int) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")


def softmax_attention_rows(
    queries: torch.Tensor,
    keys: torch.Tensor,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Softmax attention probabilities ``softmax(q @ k^T * scale)`` for the given query rows only.

    Shared by FasterVLM (2412.01818) / VisionZip (2412.04467) scoring. ``queries [H, Q, dh]``,
    ``keys [H, N, dh]`` -> ``[H, Q, N]`` float32. ``scale`` defaults to ``dh ** -0.5``.
    ``key_padding_mask [N]`` (bool) marks keys to ignore with ``True`` (PyTorch
    ``nn.MultiheadAttention`` convention); they get probability exactly 0. Rows are processed
    ``chunk_size`` queries at a time.
    """
    _check_qk(queries, keys)
    _check_chunk(chunk_size)
    num_heads, num_q, head_dim = queries.shape
    num_k = keys.shape[1]
    if scale is None:
        scale = head_dim**-0.5
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool or key_padding_mask.shape != (num_k,):
            raise ValueError(
                f"key_padding_mask must be a bool tensor of shape [{num_k}], got "
                f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}"
            )
        key_padding_mask = key_padding_mask.to(keys.device)
        if bool(key_padding_mask.all()):
            raise ValueError("key_padding_mask masks every key; at least one key must stay visible")
    q = queries.float()
    kt = keys.float().transpose(1, 2)  # [H, dh, N]
    out = torch.empty(num_heads, num_q, num_k, dtype=torch.float32, device=queries.device)
    for start in range(0, num_q, chunk_size):
        logits = torch.matmul(q[:, start : start + chunk_size], kt) * scale  # [H, c, N]
        if key_padding_mask is not None:
            logits = logits.masked_fill(key_padding_mask, float("-inf"))  # broadcast over [H, c]
        out[:, start : start + chunk_size] = torch.softmax(logits, dim=-1)
    return out


def cls_attention_scores(
    cls_query: torch.Tensor, keys: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """[CLS]-attention scores, FasterVLM (arXiv 2412.01818): head-mean of the CLS query's attention.

    ``cls_query [H, dh]``, ``keys [H, N, dh]`` (keys include the CLS key itself at index 0) ->
    ``[N]`` float32, summing to 1. The caller drops index 0 if it wants patch scores only.
    ``scale`` defaults to ``dh ** -0.5``. No other hyper-parameters (the layer choice -- penultimate
    layer for LLaVA -- belongs to the caller).
    """
    if cls_query.ndim != 2:
        raise ValueError(f"cls_query must be 2-D [H, dh], got shape {tuple(cls_query.shape)}")
    probs = softmax_attention_rows(cls_query[:, None, :], keys, scale=scale)  # [H, 1, N]
    return probs[:, 0, :].mean(dim=0)


def mean_received_attention(
    queries: torch.Tensor, keys: torch.Tensor, scale: float | None = None, chunk_size: int = 256
) -> torch.Tensor:
    """Mean attention received by each key, for encoders without a [CLS] token.

    The CLS-free fallback of [CLS]-attention scoring (FasterVLM 2412.01818 / VisionZip 2412.04467
    for SigLIP-style encoders): average over heads and over all query rows of ``softmax(q k^T
    scale)``. ``queries [H, Q, dh]`` (normally Q == N), ``keys [H, N, dh]`` -> ``[N]`` float32
    summing to 1. Processed ``chunk_size`` query rows at a time, so at most ``H x chunk x N`` is live.
    """
    _check_qk(queries, keys)
    _check_chunk(chunk_size)
    num_heads, num_q, _ = queries.shape
    if num_q == 0:
        raise ValueError("queries must contain at least one query row (Q >= 1)")
    total = torch.zeros(keys.shape[1], dtype=torch.float32, device=keys.device)
    for start in range(0, num_q, chunk_size):
        probs = softmax_attention_rows(queries[:, start : start + chunk_size], keys, scale=scale)  # [H, c, N]
        total += probs.sum(dim=(0, 1))
    return total / (num_heads * num_q)


def topk_select(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest scores, returned ascending (raster order).

    The selection step of FasterVLM (2412.01818) and of VisionZip's dominant tokens (2412.04467).
    Deterministic: among equal scores the lower index wins (stable sort). NaN scores are rejected.
    """
    if not isinstance(scores, torch.Tensor) or scores.ndim != 1:
        raise ValueError(f"scores must be a 1-D tensor [N], got shape {getattr(scores, 'shape', None)}")
    n = scores.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= n:
        raise ValueError(f"k must be an int in [0, {n}], got {k!r}")
    if scores.is_floating_point() and bool(torch.isnan(scores).any()):
        raise ValueError("scores contain NaN")
    order = torch.sort(scores, descending=True, stable=True).indices  # [N], ties keep ascending index
    keep, _ = torch.sort(order[:k])
    return keep
