"""FlowCut core: information-flow scores of a ViT block and the entropy-adaptive prune count.

FlowCut (Tong et al., NeurIPS 2025, arXiv 2505.19536); official code TungChintao/FlowCut @ a2ecd24,
``flowcut/utils_flowcut.py`` (``compute_score``, ``adaptive_prune_ratio``) and
``flowcut/modeling_clip_flowcut.py`` L14-97 (CLS attention, CLS-value "semantic" attention, value metric) and
L100-172 (per-layer pruning); the decoder stage of AnyRes inputs: ``flowcut/modeling_llama_flowcut.py`` L246-290
(``LlamaSdpaAttention_forward``). Pure functions of tensors.
"""

from __future__ import annotations

import math

import torch

__all__ = ["flowcut_layer_signals", "flowcut_score", "adaptive_prune_count", "flowcut_keep", "flowcut_llm_scores"]


def flowcut_layer_signals(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """The three per-patch signals of one block from its q, k, v [B, H, t, dh] (token 0 = CLS):

    * ``cls_attention`` [B, t-1]: softmax(q_CLS · k / sqrt(dh)) over all t keys, mean over heads, patch columns;
    * ``semantic`` [B, t-1]: softmax(v_CLS · v) over all t values (no scaling), mean over heads, patch columns;
    * ``value`` [B, t-1, dh]: the value vectors averaged over heads.

    Only the CLS row is computed (the block itself runs on SDPA)."""
    q0 = q[:, :, :1].float()  # [B, H, 1, dh]
    cls_attention = torch.softmax((q0 * scale) @ k.float().transpose(-1, -2), dim=-1)[:, :, 0].mean(1)
    v32 = v.float()
    semantic = torch.softmax(v32[:, :, :1] @ v32.transpose(-1, -2), dim=-1)[:, :, 0].mean(1)
    value = v32.mean(1)
    return cls_attention[:, 1:], semantic[:, 1:], value[:, 1:]


def flowcut_score(cls_attention: torch.Tensor, semantic: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``compute_score``: (relation share + semantic share) × ‖value‖₁, [B, n] from [B, n], [B, n], [B, n, dh]."""
    relation = cls_attention / cls_attention.sum(dim=-1, keepdim=True)
    sem = semantic / semantic.sum(dim=-1, keepdim=True)
    return (relation + sem) * torch.norm(value, p=1, dim=-1)


def adaptive_prune_count(cls_attention: torch.Tensor, remaining_layers: int, target_patches: int) -> int:
    """``adaptive_prune_ratio``: r = (n - target) / sqrt(remaining layers) × (1 - H²), H the entropy of the CLS
    attention over the n patches divided by log n; the maximum over the rows given (the official code takes the
    maximum over its batch: here the rows of one image). Rounded to the nearest int (ties to even)."""
    n = cls_attention.shape[-1]
    prob = cls_attention / cls_attention.sum(dim=-1, keepdim=True)
    entropy = -torch.sum(prob * torch.log(prob), dim=-1)
    ratio = entropy / math.log(n)
    r = (n - target_patches) / remaining_layers ** 0.5 * (1 - ratio ** 2)
    return int(r.max().round())


def flowcut_keep(cumulative: torch.Tensor, keep_patches: int) -> torch.Tensor:
    """Indices [B, keep_patches] of the patches with the highest cumulative score, ascending."""
    return torch.topk(cumulative, keep_patches, dim=-1).indices.sort(dim=-1).values


def flowcut_llm_scores(query: torch.Tensor, keys: torch.Tensor, query_value: torch.Tensor, values: torch.Tensor,
                       scale: float) -> torch.Tensor:
    """FlowCut's decoder-stage score of V visual tokens [V] for one sample, from one decoder layer's last-token
    query ``query`` [H, 1, dh], the visual keys ``keys`` [H, V, dh] (both after RoPE), the last token's value
    ``query_value`` [H, 1, dh] and the visual values ``values`` [H, V, dh]: relation = softmax(q · k × scale)
    and semantic = softmax(v_last · v × scale), each over the visual tokens only and averaged over heads, then
    :func:`flowcut_score` with the head-mean values. float32."""
    relation = torch.softmax(query.float() @ keys.float().transpose(-1, -2) * scale, dim=-1).mean(0)  # [1, V]
    semantic = torch.softmax(query_value.float() @ values.float().transpose(-1, -2) * scale, dim=-1).mean(0)
    return flowcut_score(relation, semantic, values.float().mean(0)[None])[0]
