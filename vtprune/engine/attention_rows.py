"""Recompute a few softmax-attention rows of a HF decoder layer without eager attention.

In-LLM pruning methods (FastV, PyramidDrop, SparseVLM) rank visual tokens by the attention that a few
query rows (the last prompt token, a set of text "rater" tokens) give to every key at decoder layer k.
Running the whole model with ``attn_implementation="eager"`` and ``output_attentions=True`` materialises
``B x H x L x L`` probabilities at every layer; :func:`attention_rows` instead recomputes only the ``Q``
wanted rows from the layer's own modules (``input_layernorm``, ``q_proj``/``k_proj``, optional
``q_norm``/``k_norm``, the family's own RoPE function), so the model keeps running on sdpa / flash.

Cost: one ``k_proj`` over all ``L`` rows, one ``q_proj`` over ``Q`` rows, and a ``[B, H, Q, L]`` score
tensor. The attention module's ``forward`` is never called.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .. import compat

__all__ = ["attention_over_keys", "attention_rows", "key_states", "last_token_index", "query_key_value",
           "rope_only_rows"]

_AUTO = "auto"


def last_token_index(attention_mask: Tensor | None, batch: int, length: int) -> Tensor:
    """Position of the last real token of each sample, as ``LongTensor[batch, 1]``.

    ``attention_mask`` is a 2-D ``[batch, length]`` mask (non-zero / True = real token), left- or
    right-padded (any layout works: the rightmost real column is returned). ``None`` means no padding,
    so every sample's last token is ``length - 1``. A sample with no real token gets 0.
    """
    if attention_mask is None:
        return torch.full((batch, 1), length - 1, dtype=torch.long)
    if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (batch, length):
        raise ValueError(
            f"attention_mask must have shape [{batch}, {length}], got {tuple(attention_mask.shape)}"
        )
    real = attention_mask.bool()
    pos = torch.arange(length, device=attention_mask.device).expand(batch, length)
    last = torch.where(real, pos, torch.zeros_like(pos)).amax(dim=-1)
    return last.long().unsqueeze(-1)


def attention_rows(
    layer: nn.Module,
    hidden_states: Tensor,
    position_embeddings: tuple[Tensor, Tensor],
    query_index: Tensor,
    key_padding_mask: Tensor | None = None,
    causal: bool = True,
    average_heads: bool = False,
    *,
    sliding_window: int | None | str = _AUTO,
) -> Tensor:
    """Softmax attention of the ``query_index`` rows over all keys at decoder ``layer``, float32.

    Args:
        layer: a HF decoder layer (``LlamaDecoderLayer``, ``Qwen2DecoderLayer``, ``Qwen2VLDecoderLayer``,
            ``Qwen2_5_VLDecoderLayer``, ``Qwen3(VL)DecoderLayer``, ``MistralDecoderLayer``, ...) with
            ``input_layernorm`` and ``self_attn.{q_proj,k_proj}``.
        hidden_states: ``[B, L, D]``, the layer's *input* (before ``input_layernorm``).
        position_embeddings: ``(cos, sin)`` exactly as the model's ``rotary_emb`` produced them for this
            forward and passed them to its layers: ``[B|1, L, dh]`` (1-D RoPE, and M-RoPE in
            transformers 5, whose rotary embedding already interleaves the t/h/w sections), or
            ``[3, B|1, L, dh]`` (M-RoPE of transformers 4.x, applied with the module's
            ``apply_multimodal_rotary_pos_emb`` and the config's ``mrope_section``).
        query_index: ``LongTensor[B, Q]`` (or ``[Q]``, shared by the batch) positions into ``L`` of the
            query rows wanted. Negative values count from the end (``-1`` = column ``L - 1``).
        key_padding_mask: ``[B, L]``, True / non-zero = real token (the 2-D ``attention_mask``
            convention). Padding keys get probability exactly 0.
        causal: a query at position ``i`` only attends to keys ``j <= i``.
        average_heads: return ``[B, Q, L]`` (mean over heads) instead of ``[B, H, Q, L]``.
        sliding_window: keyword-only. ``"auto"`` (default) uses the layer's own window (the attention
            module's ``sliding_window`` attribute; else ``config.layer_types`` / ``config.sliding_window``
            as the model's mask builder does); ``None`` disables it; an int forces one. Only applied
            when ``causal``: a query at ``i`` then sees keys ``i - window < j <= i``.

    Returns:
        float32 probabilities, ``[B, H, Q, L]`` or ``[B, Q, L]``. Each row sums to 1 over the keys it
        may see; a row that may see no key at all (a padding query under left padding) is all zeros.
    """
    attn = layer.self_attn
    if hidden_states.dim() != 3:
        raise ValueError(f"hidden_states must be [B, L, D], got {tuple(hidden_states.shape)}")
    bsz, length, _ = hidden_states.shape
    device = hidden_states.device
    query_index = _normalise_query_index(query_index, bsz, length, device)
    num_q = query_index.shape[1]
    if getattr(attn, "attn_logit_softcapping", None) is not None:
        raise NotImplementedError("attention logit soft-capping (Gemma-2 style) is not supported")

    head_dim = _head_dim(attn)
    _, q, k = _rotated_queries_keys(layer, hidden_states, position_embeddings, query_index)
    num_heads, num_kv = q.shape[1], k.shape[1]

    # GQA without repeating k: query head h reads kv head h // groups (= transformers' repeat_kv).
    groups = num_heads // num_kv
    scaling = float(getattr(attn, "scaling", head_dim**-0.5))
    qg = q.float().reshape(bsz, num_kv, groups * num_q, head_dim)
    scores = torch.matmul(qg, k.float().transpose(-1, -2)) * scaling  # [B, Hkv, G*Q, L]
    scores = scores.reshape(bsz, num_heads, num_q, length)

    allowed = _allowed(attn, query_index, length, key_padding_mask, causal, sliding_window, bsz, device)
    if allowed is not None:
        scores = scores.masked_fill(~allowed.unsqueeze(1), float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    if allowed is not None:
        probs = torch.where(allowed.any(-1)[:, None, :, None], probs, torch.zeros((), device=device))
    return probs.mean(dim=1) if average_heads else probs


def key_states(layer: nn.Module, hidden_states: Tensor, position_embeddings: tuple[Tensor, Tensor]) -> Tensor:
    """The key states a decoder ``layer`` would cache for ``hidden_states`` [B, L, D], after its k-norm and
    RoPE: ``[B, Hkv, L, dh]`` (DART's pivot criterion reads their L1 norm). Same inputs as
    :func:`attention_rows`; 1-D RoPE and transformers-5 M-RoPE position embeddings."""
    attn = layer.self_attn
    head_dim = _head_dim(attn)
    k = _project(attn.k_proj, getattr(attn, "k_norm", None), layer.input_layernorm(hidden_states), head_dim)
    first = torch.zeros(hidden_states.shape[0], 1, dtype=torch.long, device=hidden_states.device)
    return _apply_rope(attn, k[:, :1, :1], k, position_embeddings, first)[1]


def query_key_value(layer: nn.Module, hidden_states: Tensor, position_embeddings: tuple[Tensor, Tensor],
                    query_index: Tensor) -> tuple[Tensor, Tensor, Tensor, float]:
    """The attention inputs of decoder ``layer`` for ``hidden_states`` [B, L, D] (its input, before
    ``input_layernorm``), float32, every key/value head repeated to the query heads as transformers' ``repeat_kv``:
    the ``query_index`` rows [B, Q] of the queries ``[B, H, Q, dh]`` and all keys ``[B, H, L, dh]`` after the
    q/k norms and RoPE, the values ``[B, H, L, dh]``, and the layer's softmax scaling. Same position-embedding
    forms as :func:`attention_rows` (FlowCut's decoder stage reads queries, keys and values together)."""
    attn = layer.self_attn
    bsz, length, _ = hidden_states.shape
    query_index = _normalise_query_index(query_index, bsz, length, hidden_states.device)
    head_dim = _head_dim(attn)
    x, q, k = _rotated_queries_keys(layer, hidden_states, position_embeddings, query_index)
    v = _project(attn.v_proj, None, x, head_dim)  # [B, Hkv, L, dh]
    groups = q.shape[1] // k.shape[1]
    k, v = (t.float().repeat_interleave(groups, dim=1) for t in (k, v))  # [B, H, L, dh]
    return q.float(), k, v, float(getattr(attn, "scaling", head_dim**-0.5))


def rope_only_rows(
    layer: nn.Module,
    position_embeddings: tuple[Tensor, Tensor],
    query_index: Tensor,
    key_padding_mask: Tensor | None = None,
    *,
    softmax: bool = True,
) -> Tensor:
    """The attention rows the layer would produce if every query and key were the all-ones vector: only
    RoPE (the positions) shapes them — the long-range decay of RoPE made visible. ``[B, Q, L]`` float32, same masking as :func:`attention_rows`.

    ``softmax=False`` returns the raw logits (q·k scaled by the layer's scaling, no mask, no softmax): what
    SparseVLM+ (SparseVLM 2.0) divides the real attention by.
    """
    attn = layer.self_attn
    cos = position_embeddings[0]
    bsz, length = (cos.shape[-3], cos.shape[-2]) if cos.dim() >= 3 else (1, cos.shape[0])
    if key_padding_mask is not None:
        bsz = key_padding_mask.shape[0]
    head_dim = _head_dim(attn)
    query_index = _normalise_query_index(query_index, bsz, length, cos.device)
    ones_k = torch.ones(bsz, 1, length, head_dim, device=cos.device, dtype=torch.float32)
    ones_q = ones_k[:, :, : query_index.shape[1]]
    cos_sin = (position_embeddings[0].float(), position_embeddings[1].float())
    q, k = _apply_rope(attn, ones_q, ones_k, cos_sin, query_index)
    scores = torch.matmul(q, k.transpose(-1, -2))[:, 0] * float(getattr(attn, "scaling", head_dim**-0.5))
    if not softmax:
        return scores
    allowed = _allowed(attn, query_index, length, key_padding_mask, True, _AUTO, bsz, cos.device)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if allowed is not None:
        probs = torch.where(allowed.any(-1)[:, :, None], probs, torch.zeros((), device=cos.device))
    return probs


# ----------------------------------------------------------------------------------------- helpers


def _rotated_queries_keys(layer: nn.Module, hidden_states: Tensor, position_embeddings: tuple[Tensor, Tensor],
                          query_index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(the normed input [B, L, D], the ``query_index`` [B, Q] rows of the queries [B, H, Q, dh], all keys
    [B, Hkv, L, dh]) of decoder ``layer``, after its q/k norms and RoPE."""
    attn = layer.self_attn
    bsz, _, hidden = hidden_states.shape
    head_dim = _head_dim(attn)
    x = layer.input_layernorm(hidden_states)
    x_q = x.gather(1, query_index.unsqueeze(-1).expand(bsz, query_index.shape[1], hidden))
    q = _project(attn.q_proj, getattr(attn, "q_norm", None), x_q, head_dim)  # [B, H, Q, dh]
    k = _project(attn.k_proj, getattr(attn, "k_norm", None), x, head_dim)  # [B, Hkv, L, dh]
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} key/value heads")
    q, k = _apply_rope(attn, q, k, position_embeddings, query_index)
    return x, q, k


def _normalise_query_index(query_index: Tensor, bsz: int, length: int, device: torch.device) -> Tensor:
    if not isinstance(query_index, Tensor):
        query_index = torch.as_tensor(query_index)
    if query_index.dtype.is_floating_point or query_index.dtype == torch.bool:
        raise TypeError(f"query_index must be an integer tensor, got {query_index.dtype}")
    query_index = query_index.to(device=device, dtype=torch.long)
    if query_index.dim() == 1:
        query_index = query_index.unsqueeze(0).expand(bsz, -1)
    if query_index.dim() != 2 or query_index.shape[0] != bsz:
        raise ValueError(f"query_index must be [B={bsz}, Q] or [Q], got {tuple(query_index.shape)}")
    if query_index.numel() and (int(query_index.min()) < -length or int(query_index.max()) >= length):
        raise IndexError(f"query_index out of range for sequence length {length}")
    return torch.where(query_index < 0, query_index + length, query_index)


def _head_dim(attn: nn.Module) -> int:
    head_dim = getattr(attn, "head_dim", None)
    if head_dim is None:
        cfg = getattr(attn, "config", None)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return int(head_dim)


def _project(proj: nn.Module, norm: nn.Module | None, x: Tensor, head_dim: int) -> Tensor:
    """``proj(x)`` -> ``[B, heads, rows, dh]``, with the (per-head or full-width) q/k norm if present."""
    out = proj(x)
    bsz, rows, width = out.shape
    per_head = True
    if norm is not None:
        weight = getattr(norm, "weight", None)
        per_head = weight is None or weight.numel() == head_dim
        if not per_head:  # OLMo-2 style: the norm spans all heads, before the head split
            out = norm(out)
    out = out.view(bsz, rows, width // head_dim, head_dim)
    if norm is not None and per_head:  # Qwen3 style: RMSNorm over head_dim, per head
        out = norm(out)
    return out.transpose(1, 2)


def _mrope_section(attn: nn.Module) -> list[int]:
    for owner in (attn, getattr(attn, "config", None)):
        for name in ("rope_parameters", "rope_scaling"):
            params = getattr(owner, name, None)
            if isinstance(params, dict) and params.get("mrope_section") is not None:
                return list(params["mrope_section"])
    raise ValueError("M-RoPE position embeddings given but no mrope_section found on the attention module/config")


def _gather_rows(t: Tensor, index: Tensor, batch_dim: int) -> Tensor:
    """Gather sequence rows of ``t`` (``[..., B|1, L, dh]`` with B at ``batch_dim``) at ``index [B, Q]``."""
    shape = list(t.shape)
    shape[batch_dim] = index.shape[0]
    t = t.expand(shape)
    idx = index.view(*([1] * batch_dim), index.shape[0], index.shape[1], 1)
    idx = idx.expand(*shape[:batch_dim], index.shape[0], index.shape[1], shape[-1])
    return t.gather(batch_dim + 1, idx)


def _apply_rope(
    attn: nn.Module,
    q: Tensor,
    k: Tensor,
    position_embeddings: tuple[Tensor, Tensor],
    query_index: Tensor,
) -> tuple[Tensor, Tensor]:
    cos, sin = position_embeddings
    cos, sin = cos.to(q.device), sin.to(q.device)
    bsz, length = q.shape[0], k.shape[2]

    if cos.dim() == 4:  # transformers 4.x M-RoPE: [3, B|1, L, dh], recombined inside the apply function
        fn: Callable | None = compat.modeling_function(attn, "apply_multimodal_rotary_pos_emb")
        if fn is None:
            raise ValueError(
                f"4-D position embeddings {tuple(cos.shape)} but {type(attn).__module__} has no "
                "apply_multimodal_rotary_pos_emb"
            )
        section = _mrope_section(attn)
        cos = cos.expand(cos.shape[0], bsz, length, cos.shape[-1])
        sin = sin.expand(sin.shape[0], bsz, length, sin.shape[-1])
        cos_q, sin_q = _gather_rows(cos, query_index, 1), _gather_rows(sin, query_index, 1)
        q_rot = fn(q, q, cos_q, sin_q, section)[0]
        k_rot = fn(k, k, cos, sin, section)[1]
        return q_rot, k_rot

    if cos.dim() == 2:  # [L, dh], shared by the batch
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
    if cos.dim() != 3:
        raise ValueError(f"unsupported position embedding shape {tuple(cos.shape)}")
    fn = compat.modeling_function(attn, "apply_rotary_pos_emb") or _apply_rotary_pos_emb
    cos = cos.expand(bsz, length, cos.shape[-1])
    sin = sin.expand(bsz, length, sin.shape[-1])
    cos_q, sin_q = _gather_rows(cos, query_index, 0), _gather_rows(sin, query_index, 0)
    q_rot = fn(q, q, cos_q, sin_q)[0]
    k_rot = fn(k, k, cos, sin)[1]
    return q_rot, k_rot


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def _apply_rotary_pos_emb(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Fallback (Llama formula) for families whose module exposes no ``apply_rotary_pos_emb``."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _layer_sliding_window(attn: nn.Module) -> int | None:
    if hasattr(attn, "sliding_window"):
        return attn.sliding_window
    cfg = getattr(attn, "config", None)
    window = getattr(cfg, "sliding_window", None)
    if window is None:
        return None
    layer_types = getattr(cfg, "layer_types", None)
    layer_idx = getattr(attn, "layer_idx", None)
    if layer_types is not None and layer_idx is not None:
        return window if layer_types[layer_idx] == "sliding_attention" else None
    return window  # Mistral: one window for every layer


def _allowed(
    attn: nn.Module,
    query_index: Tensor,
    length: int,
    key_padding_mask: Tensor | None,
    causal: bool,
    sliding_window: int | None | str,
    bsz: int,
    device: torch.device,
) -> Tensor | None:
    """``BoolTensor[B, Q, L]`` of the keys each query row may see, or None when all are visible."""
    allowed: Tensor | None = None
    keys = torch.arange(length, device=device)
    if causal:
        qpos = query_index.unsqueeze(-1)  # [B, Q, 1]
        allowed = keys <= qpos
        window = _layer_sliding_window(attn) if sliding_window == _AUTO else sliding_window
        if window is not None:
            allowed = allowed & (keys > qpos - int(window))
    if key_padding_mask is not None:
        if tuple(key_padding_mask.shape) != (bsz, length):
            raise ValueError(
                f"key_padding_mask must be [B={bsz}, L={length}], got {tuple(key_padding_mask.shape)}"
            )
        real = key_padding_mask.to(device).bool().unsqueeze(1)  # [B, 1, L]
        allowed = real.expand(bsz, query_index.shape[1], length) if allowed is None else allowed & real
    return allowed


def attention_over_keys(
    layer: nn.Module,
    hidden_states: Tensor,
    position_embeddings: tuple[Tensor, Tensor],
    keys: Tensor,
    key_mask: Tensor | None = None,
    average_heads: bool = False,
) -> Tensor:
    """Softmax attention of query rows over key states a layer has already cached, float32.

    ``hidden_states`` [B, Q, D]: the layer's *input* at the query rows, with their ``position_embeddings``
    (``(cos, sin)`` of those rows, as the model's ``rotary_emb`` gave them: [B|1, Q, dh]); ``keys`` [B, Hkv, L, dh]:
    the layer's cached key states (after its k-norm and RoPE, as ``cache.layers[i].keys`` holds them);
    ``key_mask`` [B, L] (True / non-zero = visible). Every query sees every visible key (a decode step: the cache
    holds only the past and the current token). Returns [B, H, Q, L] or, with ``average_heads``, [B, Q, L].
    """
    attn = layer.self_attn
    head_dim = _head_dim(attn)
    bsz, num_q, _ = hidden_states.shape
    q = _project(attn.q_proj, getattr(attn, "q_norm", None), layer.input_layernorm(hidden_states), head_dim)
    rows = torch.arange(num_q, device=hidden_states.device).expand(bsz, num_q)
    q = _apply_rope(attn, q, q[:, :1], position_embeddings, rows)[0]  # [B, H, Q, dh]
    num_heads, num_kv, length = q.shape[1], keys.shape[1], keys.shape[2]
    groups = num_heads // num_kv
    scaling = float(getattr(attn, "scaling", head_dim**-0.5))
    qg = q.float().reshape(bsz, num_kv, groups * num_q, head_dim)
    scores = (torch.matmul(qg, keys.float().transpose(-1, -2)) * scaling).reshape(bsz, num_heads, num_q, length)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask.bool()[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    return probs.mean(dim=1) if average_heads else probs
