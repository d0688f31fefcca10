"""Analytic FLOPs of vision-language model forwards, from a config and sequence lengths.

Everything here is a pure function of a HuggingFace config and integers: no model instance, no weights.

Conventions
-----------
* **FLOPs = 2 x multiply-adds.** A ``(m, k) @ (k, n)`` product costs ``2*m*k*n`` FLOPs.
* **Only matrix products are counted**: linear layers (``mm``/``addmm``/``bmm``), convolutions (patch
  embeddings) and the two products inside attention (``Q @ K^T`` and ``P @ V``). Bias adds, norms,
  activations, softmax, rotary embeddings, residual adds, embedding lookups, interpolation and
  indexing are not counted. This is exactly the convention of
  :class:`torch.utils.flop_counter.FlopCounterMode`, against which ``tests/test_flops.py`` checks every
  formula here on tiny models built from configs (the leftover is below 0.01% for real model sizes).
* **Attention is counted dense**: ``num_queries x num_keys`` score and weighted-sum products per head,
  whether or not a causal mask is applied, because that is what SDPA / FlashAttention kernels are
  charged for by ``FlopCounterMode`` (and what the math backend actually computes). A causal prefill
  therefore costs ``4 * n * n * num_heads * head_dim`` attention FLOPs per layer, not half of it.
* **GQA**: q/o projections have width ``num_attention_heads * head_dim``, k/v projections
  ``num_key_value_heads * head_dim``; the attention products run over all ``num_attention_heads``
  query heads (kv heads are broadcast).
* The k/v projections run on the *new* tokens only; cached keys/values are re-used, not re-projected.

Layer lengths
-------------
Pruning methods shorten the sequence at some decoder layers. ``layer_lengths[i]`` is the sequence
length entering decoder layer ``i`` during prefill (e.g. ``[600, 600, 300, ..., 300]``); it must have
exactly ``text_config.num_hidden_layers`` entries.

Supported families (dispatch on ``config.model_type``)
------------------------------------------------------
* ``llava`` (LLaVA-1.5), ``llava_next`` (LLaVA-NeXT / 1.6) with a CLIP (``clip_vision_model``) or
  SigLIP (``siglip_vision_model``) tower, MLP projector ``linear -> act -> linear``.
  HF's vision towers run **all** encoder layers even when ``vision_feature_layer == -2`` (the
  second-to-last hidden state is only *captured*), so all ``num_hidden_layers`` layers are counted.
  ``num_images`` = number of tower inputs: images for LLaVA-1.5, base image + anyres crops (summed over
  images) for LLaVA-NeXT / OneVision. The projector runs on every selected feature of every tower
  input, *before* LLaVA-NeXT's unpadding / newline packing (so ``num_projected_tokens`` is
  ``num_vision_inputs * vision_tokens_per_input(config)``, not the number of image tokens the LLM sees).
* ``llava_onevision``: SigLIP tower without the pooling head (``vision_use_head=False``),
  ``vision_feature_layer=-1`` and ``"full"`` strategy (no CLS token to drop, 729 tokens per 384px crop).
  The released checkpoints already ship a 26-layer SigLIP (the original's last layer dropped), so the
  config's ``num_hidden_layers`` is what runs. Video bilinear pooling has no matmuls.
* ``qwen2_vl`` / ``qwen2_5_vl`` / ``qwen3_vl``: the Qwen ViT runs on all patches of an image at once, so its
  cost depends on ``image_grid_thw`` rather than on an image count: pass ``grid_thw=[(t, h, w), ...]`` (in
  patches, as returned by the processor). Attention is per frame (``t`` segments of ``h*w`` patches);
  Qwen2.5-VL uses window attention (``window_size`` px windows) except in ``fullatt_block_indexes``
  layers. The 2x2 ``PatchMerger`` is reported as the *projector*; it runs on ``sum(t*h*w) / merge**2``
  tokens, which is also the number of image tokens the LLM sees. Qwen3-VL: a 2-matrix ViT MLP, a learned
  position table that is interpolated (no matmul), and one extra merger per ``deepstack_visual_indexes``
  entry (counted in the projector; the decoder adds their outputs to its hidden states, an addition).

Decoders: ``llama``, ``mistral``, ``qwen2``, ``qwen3``, ``qwen2_vl_text``, ``qwen2_5_vl_text``,
``qwen3_vl_text`` (gated 3-matrix FFN) and ``phi``, ``starcoder2`` (2-matrix FFN). Text-level functions accept either a text
config or a composite config (its ``text_config`` is used).

The literature formula
----------------------
:func:`literature_prefill_flops` implements the estimate used by FastV (Chen et al., 2024, "An Image is
Worth 1/2 Tokens After Layer 2") and copied by many follow-ups, ``4nd^2 + 2n^2d + 2ndm`` per layer, with
``d`` the hidden size and ``m`` the FFN intermediate size. It counts multiply-adds (not 2x), assumes MHA
(no GQA) and a 2-matrix FFN, and ignores the vision tower, projector and LM head. Use it only to compare
with published "FLOPs" numbers; use :func:`llm_prefill_flops` / :func:`model_prefill_flops` otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

__all__ = [
    "FlopsBreakdown",
    "decoder_layer_flops",
    "llm_prefill_flops",
    "llm_decode_flops",
    "lm_head_flops",
    "vision_flops",
    "projector_flops",
    "model_prefill_flops",
    "literature_prefill_flops",
    "vision_tokens_per_input",
    "SUPPORTED_MODEL_TYPES",
    "SUPPORTED_TEXT_MODEL_TYPES",
    "SUPPORTED_VISION_MODEL_TYPES",
]


@dataclass(frozen=True)
class FlopsBreakdown:
    """FLOPs (2 x multiply-adds, matmuls/convs/attention only) of one forward, split by component."""

    # vision encoder: patch embedding + all encoder layers that run (+ SigLIP pooling head if used)
    vision: int
    projector: int  # multimodal projector (Qwen-VL: the PatchMerger)
    llm: int  # decoder layers
    lm_head: int  # output projection over the positions whose logits are computed

    @property
    def total(self) -> int:
        return self.vision + self.projector + self.llm + self.lm_head

    def __add__(self, other: FlopsBreakdown) -> FlopsBreakdown:
        if not isinstance(other, FlopsBreakdown):
            return NotImplemented
        return FlopsBreakdown(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def __radd__(self, other: Any) -> FlopsBreakdown:
        # lets builtin sum() start from 0
        if isinstance(other, int) and other == 0:
            return self
        return NotImplemented


# --------------------------------------------------------------------------------------------- registry

_GATED_FFN_TEXT = frozenset(
    {"llama", "mistral", "qwen2", "qwen3", "qwen2_vl_text", "qwen2_5_vl_text", "qwen3_vl_text"}
)
_PLAIN_FFN_TEXT = frozenset({"phi", "starcoder2"})
SUPPORTED_TEXT_MODEL_TYPES = tuple(sorted(_GATED_FFN_TEXT | _PLAIN_FFN_TEXT))

_LLAVA_TYPES = frozenset({"llava", "llava_next", "llava_onevision"})
_QWEN_VL_TYPES = frozenset({"qwen2_vl", "qwen2_5_vl", "qwen3_vl"})
SUPPORTED_MODEL_TYPES = tuple(sorted(_LLAVA_TYPES | _QWEN_VL_TYPES))

_VIT_TYPES = frozenset({"clip_vision_model", "siglip_vision_model"})
_QWEN_VIT_TYPES = frozenset({"qwen2_vl_vision", "qwen2_5_vl_vision", "qwen3_vl_vision"})
SUPPORTED_VISION_MODEL_TYPES = tuple(sorted(_VIT_TYPES | _QWEN_VIT_TYPES))


def _model_type(config: Any) -> str:
    return getattr(config, "model_type", None) or type(config).__name__


def _text_config(config: Any) -> Any:
    mt = _model_type(config)
    if mt in _GATED_FFN_TEXT or mt in _PLAIN_FFN_TEXT:
        return config
    sub = getattr(config, "text_config", None)
    if sub is not None and sub is not config:
        return _text_config(sub)
    raise ValueError(
        f"unsupported text model_type {mt!r}; supported: {', '.join(SUPPORTED_TEXT_MODEL_TYPES)} "
        f"(or a composite config of type {', '.join(SUPPORTED_MODEL_TYPES)})"
    )


def _composite_type(model_config: Any) -> str:
    mt = _model_type(model_config)
    if mt not in _LLAVA_TYPES and mt not in _QWEN_VL_TYPES:
        raise ValueError(f"unsupported model_type {mt!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    return mt


def _vision_config(model_config: Any) -> Any:
    """The vision sub-config of a composite config, or the config itself if it is a vision config."""
    mt = _model_type(model_config)
    if mt in _VIT_TYPES or mt in _QWEN_VIT_TYPES:
        return model_config
    _composite_type(model_config)
    vc = model_config.vision_config
    vmt = _model_type(vc)
    if vmt not in _VIT_TYPES and vmt not in _QWEN_VIT_TYPES:
        raise ValueError(
            f"unsupported vision model_type {vmt!r}; supported: {', '.join(SUPPORTED_VISION_MODEL_TYPES)}"
        )
    return vc


def _pair(x: Any) -> tuple[int, int]:
    if isinstance(x, (list, tuple)):
        if len(x) != 2:
            raise ValueError(f"expected an int or a pair, got {x!r}")
        return int(x[0]), int(x[1])
    return int(x), int(x)


def _check_nonneg(**values: int) -> None:
    for name, v in values.items():
        if v < 0:
            raise ValueError(f"{name} must be >= 0, got {v}")


# ------------------------------------------------------------------------------------------- primitives


def _linear(tokens: int, fan_in: int, fan_out: int) -> int:
    return 2 * tokens * fan_in * fan_out


def _attention(num_queries: int, num_keys: int, num_heads: int, head_dim: int) -> int:
    # Q @ K^T and P @ V, each num_queries x num_keys x head_dim multiply-adds per head
    return 4 * num_queries * num_keys * num_heads * head_dim


def _vit_layer(seq: int, dim: int, mlp_hidden: int, ffn_mats: int = 2) -> int:
    """One bidirectional ViT encoder layer (q, k, v, o of width ``dim``; FFN) on one sequence of ``seq``."""
    return (
        _linear(seq, dim, 4 * dim) + _attention(seq, seq, 1, dim) + ffn_mats * _linear(seq, dim, mlp_hidden)
    )


# --------------------------------------------------------------------------------------------- decoder


@dataclass(frozen=True)
class _TextDims:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    ffn_mats: int
    vocab: int
    layers: int


def _text_dims(text_config: Any) -> _TextDims:
    tc = _text_config(text_config)
    heads = int(tc.num_attention_heads)
    kv_heads = int(getattr(tc, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(tc, "head_dim", None) or tc.hidden_size // heads)
    return _TextDims(
        hidden=int(tc.hidden_size),
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate=int(tc.intermediate_size),
        ffn_mats=3 if _model_type(tc) in _GATED_FFN_TEXT else 2,
        vocab=int(tc.vocab_size),
        layers=int(tc.num_hidden_layers),
    )


def _decoder_layer(d: _TextDims, nq: int, nk: int) -> int:
    q_width, kv_width = d.heads * d.head_dim, d.kv_heads * d.head_dim
    proj = (
        _linear(nq, d.hidden, q_width) + 2 * _linear(nq, d.hidden, kv_width) + _linear(nq, q_width, d.hidden)
    )
    attn = _attention(nq, nk, d.heads, d.head_dim)
    ffn = d.ffn_mats * _linear(nq, d.hidden, d.intermediate)
    return proj + attn + ffn


def decoder_layer_flops(text_config: Any, num_queries: int, num_keys: int | None = None) -> int:
    """FLOPs of one decoder layer processing ``num_queries`` new tokens attending to ``num_keys`` keys.

    q/k/v/o projections (GQA-aware) and the FFN run on the ``num_queries`` tokens; attention is the full
    ``num_queries x num_keys`` product for every query head. ``num_keys`` defaults to ``num_queries``
    (prefill without cache); for a cached step it is ``cache_length + num_queries``.
    """
    if num_keys is None:
        num_keys = num_queries
    _check_nonneg(num_queries=num_queries, num_keys=num_keys)
    return _decoder_layer(_text_dims(text_config), int(num_queries), int(num_keys))


def _check_layers(d: _TextDims, lengths: Sequence[int], name: str) -> None:
    if len(lengths) != d.layers:
        raise ValueError(f"{name} has {len(lengths)} entries but the decoder has {d.layers} layers")
    for n in lengths:
        _check_nonneg(**{name: int(n)})


def llm_prefill_flops(text_config: Any, layer_lengths: Sequence[int]) -> int:
    """Decoder-layer FLOPs of a prefill where layer ``i`` processes ``layer_lengths[i]`` tokens (no cache)."""
    d = _text_dims(text_config)
    _check_layers(d, layer_lengths, "layer_lengths")
    return sum(_decoder_layer(d, int(n), int(n)) for n in layer_lengths)


def llm_decode_flops(text_config: Any, cache_lengths: Sequence[int], new_tokens: int) -> int:
    """Decoder-layer FLOPs of decoding ``new_tokens`` tokens one at a time (one forward per token).

    Layer ``i`` starts with ``cache_lengths[i]`` cached tokens (after pruning, typically the layer's
    prefill length), so the ``j``-th generated token (0-based) attends to ``cache_lengths[i] + j + 1``
    keys there. The LM head of those steps is not included: add ``lm_head_flops(cfg, new_tokens)``.
    """
    d = _text_dims(text_config)
    _check_layers(d, cache_lengths, "cache_lengths")
    _check_nonneg(new_tokens=new_tokens)
    t = int(new_tokens)
    total = 0
    for c in cache_lengths:
        c = int(c)
        # per-token cost is affine in the number of keys: sum over keys c+1 .. c+t
        keys_sum = t * c + t * (t + 1) // 2
        total += t * _decoder_layer(d, 1, 0) + _attention(1, 1, d.heads, d.head_dim) * keys_sum
    return total


def lm_head_flops(text_config: Any, num_positions: int) -> int:
    """FLOPs of the output projection (hidden -> vocab) on ``num_positions`` positions.

    A plain ``model(**inputs)`` forward computes logits at every position; ``generate`` prefill computes
    them at the last position only (``logits_to_keep=1``) and each decode step at one position.
    """
    _check_nonneg(num_positions=num_positions)
    d = _text_dims(text_config)
    return _linear(int(num_positions), d.hidden, d.vocab)


def literature_prefill_flops(text_config: Any, layer_lengths: Sequence[int]) -> int:
    """FastV's estimate ``sum_i 4 n_i d^2 + 2 n_i^2 d + 2 n_i d m`` (multiply-adds, as published).

    ``d`` = hidden size, ``m`` = FFN intermediate size, ``n_i`` = ``layer_lengths[i]``. It is the
    per-layer cost of an MHA layer (4 d x d projections, ``n^2 d`` for scores and for the weighted sum) with
    a 2-matrix FFN, in multiply-adds: for a gated-FFN/GQA decoder it is neither half nor equal to
    :func:`llm_prefill_flops`. Provided only for comparison with published FLOPs-reduction ratios.
    """
    d = _text_dims(text_config)
    _check_layers(d, layer_lengths, "layer_lengths")
    h, m = d.hidden, d.intermediate
    return sum(4 * n * h * h + 2 * n * n * h + 2 * n * h * m for n in map(int, layer_lengths))


# ---------------------------------------------------------------------------------------------- vision


def _vit_seq_len(vc: Any) -> tuple[int, int]:
    """(number of patches, encoder sequence length) of one CLIP/SigLIP input."""
    ih, iw = _pair(vc.image_size)
    ph, pw = _pair(vc.patch_size)
    patches = (ih // ph) * (iw // pw)
    cls = 1 if _model_type(vc) == "clip_vision_model" else 0
    return patches, patches + cls


def _vit_flops(vc: Any, num_images: int, layer_lengths: Sequence[Sequence[int]] | None = None) -> int:
    """``layer_lengths``: per input, the tokens entering each encoder layer (in-ViT pruning); None: all."""
    patches, seq = _vit_seq_len(vc)
    dim, mlp = int(vc.hidden_size), int(vc.intermediate_size)
    ph, pw = _pair(vc.patch_size)
    num_layers = int(vc.num_hidden_layers)
    if layer_lengths is None:
        layer_lengths = [[seq] * num_layers] * num_images
    if len(layer_lengths) != num_images or any(len(row) != num_layers for row in layer_lengths):
        raise ValueError(f"vit_layer_lengths needs {num_images} rows of {num_layers} per-layer token counts")
    total = 0
    for row in layer_lengths:
        total += _linear(patches, int(vc.num_channels) * ph * pw, dim)  # patch-embedding conv
        for n in row:  # an int, or (tokens through attention, tokens through the MLP) when a block merged
            a, m = (int(n), int(n)) if isinstance(n, int) else (int(n[0]), int(n[1]))
            total += _linear(a, dim, 4 * dim) + _attention(a, a, 1, dim) + 2 * _linear(m, dim, mlp)
        if _model_type(vc) == "siglip_vision_model" and getattr(vc, "vision_use_head", False):
            # SiglipMultiheadAttentionPoolingHead: one probe query; nn.MultiheadAttention projects q (1 token)
            # and k, v (the last layer's tokens), attends, out-projects, then an MLP on the probe token
            last = (row[-1] if isinstance(row[-1], int) else row[-1][1]) if row else seq
            total += _linear(1, dim, dim) + _linear(last, dim, 2 * dim) + _attention(1, last, 1, dim)
            total += _linear(1, dim, dim) + 2 * _linear(1, dim, mlp)
    return total


def _qwen_window_lengths(h: int, w: int, vc: Any) -> list[int]:
    """Lengths (in patches) of Qwen2.5-VL's attention windows for one h x w frame (get_vision_window_index)."""
    merge = int(vc.spatial_merge_size)
    patch = _pair(vc.patch_size)[0]
    ws = int(vc.window_size) // merge // patch  # window side in merged units
    if ws <= 0:
        raise ValueError(f"window_size {vc.window_size} is smaller than one merged patch")

    def sides(n: int) -> list[int]:
        return [ws] * (n // ws) + ([n % ws] if n % ws else [])

    return [a * b * merge * merge for a in sides(h // merge) for b in sides(w // merge)]


def _normalize_grid(grid_thw: Sequence[Sequence[int]]) -> list[tuple[int, int, int]]:
    if hasattr(grid_thw, "tolist"):  # torch tensor / numpy array
        grid_thw = grid_thw.tolist()
    out = []
    for row in grid_thw:
        t, h, w = (int(x) for x in row)
        _check_nonneg(t=t, h=h, w=w)
        out.append((t, h, w))
    return out


def _qwen_vit_flops(vc: Any, grid: list[tuple[int, int, int]]) -> int:
    mt = _model_type(vc)
    patches = sum(t * h * w for t, h, w in grid)
    ph, pw = _pair(vc.patch_size)
    in_ch, tps = int(vc.in_channels), int(vc.temporal_patch_size)
    if mt == "qwen2_vl_vision":
        dim = int(vc.embed_dim)
        mlp, ffn_mats = int(dim * vc.mlp_ratio), 2
        full_layers = set(range(int(vc.depth)))
    elif mt == "qwen3_vl_vision":
        dim = int(vc.hidden_size)
        mlp, ffn_mats = int(vc.intermediate_size), 2  # linear_fc1 -> act -> linear_fc2
        full_layers = set(range(int(vc.depth)))
    else:
        dim = int(vc.hidden_size)
        mlp, ffn_mats = int(vc.intermediate_size), 3
        full_layers = {int(i) for i in vc.fullatt_block_indexes}
    total = _linear(patches, in_ch * tps * ph * pw, dim)  # Conv3d patch embedding
    # token-wise parts of every block: fused qkv + proj, FFN
    per_token_layer = _linear(1, dim, 4 * dim) + ffn_mats * _linear(1, dim, mlp)
    total += int(vc.depth) * patches * per_token_layer
    # attention: per frame over h*w patches (full layers) or per window (Qwen2.5-VL window layers)
    full = sum(t * _attention(h * w, h * w, 1, dim) for t, h, w in grid)
    windowed = full
    if mt == "qwen2_5_vl_vision":
        windowed = sum(
            t * sum(_attention(n, n, 1, dim) for n in _qwen_window_lengths(h, w, vc)) for t, h, w in grid
        )
    for layer in range(int(vc.depth)):
        total += full if layer in full_layers else windowed
    return total


def vision_flops(
    model_config: Any,
    num_images: int | None = None,
    *,
    grid_thw: Sequence[Sequence[int]] | None = None,
    vit_layer_lengths: Sequence[Sequence[int]] | None = None,
) -> int:
    """FLOPs of the vision encoder (patch embedding + every encoder layer that runs), without projector.

    ``vit_layer_lengths`` (CLIP / SigLIP towers): per vision input, the number of tokens entering each encoder
    layer when an in-ViT method reduced them, or ``(attention tokens, MLP tokens)`` for a block that merged
    between its attention and its MLP (ToMe) (merging and pruning cost nothing here: they are O(t·c)
    comparisons and gathers next to the blocks' matrix products); None = every layer on all tokens.

    * LLaVA families (``llava``, ``llava_next``, ``llava_onevision``): ``num_images`` is the number of
      vision-tower inputs (LLaVA-1.5: images; LLaVA-NeXT/OneVision: base + crops of all images).
    * Qwen-VL families (``qwen2_vl``, ``qwen2_5_vl``, ``qwen3_vl``): pass ``grid_thw`` (the processor's
      ``image_grid_thw``/``video_grid_thw`` rows ``(t, h, w)`` in patches); ``num_images``, if given, must
      equal ``len(grid_thw)``. The PatchMerger is *not* included (see :func:`projector_flops`).

    ``model_config`` may also be a bare vision config (``CLIPVisionConfig``, ``SiglipVisionConfig``,
    ``Qwen2VLVisionConfig``, ``Qwen2_5_VLVisionConfig``, ``Qwen3VLVisionConfig``).
    """
    vc = _vision_config(model_config)
    if _model_type(vc) in _QWEN_VIT_TYPES:
        if grid_thw is None:
            raise ValueError(
                f"{_model_type(model_config)}: the Qwen ViT's cost depends on grid_thw; pass grid_thw="
            )
        grid = _normalize_grid(grid_thw)
        if num_images is not None and num_images != len(grid):
            raise ValueError(f"num_images={num_images} but grid_thw has {len(grid)} rows")
        return _qwen_vit_flops(vc, grid)
    if grid_thw is not None:
        raise ValueError(f"grid_thw is only meaningful for {', '.join(sorted(_QWEN_VL_TYPES))}")
    if num_images is None:
        raise ValueError("num_images is required")
    _check_nonneg(num_images=num_images)
    return _vit_flops(vc, int(num_images), vit_layer_lengths)


def vision_tokens_per_input(model_config: Any) -> int:
    """LLaVA families: number of feature tokens per vision-tower input fed to the projector.

    ``num_patches`` minus the first token under the ``"default"`` feature strategy (CLIP's CLS; for a
    CLS-less SigLIP tower "default" drops a patch, as HF does). LLaVA-1.5 (336px, 14px): 576;
    OneVision (384px, 14px, "full"): 729.
    """
    mt = _composite_type(model_config)
    if mt not in _LLAVA_TYPES:
        raise ValueError(
            f"vision_tokens_per_input is defined for {', '.join(sorted(_LLAVA_TYPES))}, not {mt!r}"
        )
    _, seq = _vit_seq_len(_vision_config(model_config))
    return seq - (1 if model_config.vision_feature_select_strategy == "default" else 0)


def projector_flops(model_config: Any, num_tokens: int) -> int:
    """FLOPs of the multimodal projector on ``num_tokens`` vision features.

    * LLaVA families: ``linear(vision_hidden * num_feature_layers -> text_hidden)``, activation,
      ``linear(text_hidden -> text_hidden)``; ``num_tokens`` = tower inputs x
      :func:`vision_tokens_per_input` (the projector runs before LLaVA-NeXT's unpadding).
    * Qwen-VL families: the PatchMerger MLP ``linear(c*m^2 -> c*m^2)``, GELU, ``linear(c*m^2 -> out)``
      with ``c`` the ViT width and ``m`` the spatial merge size; ``num_tokens`` = merged tokens =
      ``sum(t*h*w) // m**2`` (= the number of image tokens in the prompt). Qwen3-VL runs one more merger
      of the same shape per deepstack layer.
    """
    _check_nonneg(num_tokens=num_tokens)
    n = int(num_tokens)
    mt = _composite_type(model_config)
    vc = model_config.vision_config
    if mt in _LLAVA_TYPES:
        layers = model_config.vision_feature_layer
        n_layers = 1 if isinstance(layers, int) else len(layers)
        text_hidden = int(_text_config(model_config).hidden_size)
        return _linear(n, int(vc.hidden_size) * n_layers, text_hidden) + _linear(n, text_hidden, text_hidden)
    merge = int(vc.spatial_merge_size)
    if _model_type(vc) == "qwen2_vl_vision":
        width, out = int(vc.embed_dim), int(vc.hidden_size)
    else:
        width, out = int(vc.hidden_size), int(vc.out_hidden_size)
    merged_width = width * merge * merge
    mergers = 1 + len(getattr(vc, "deepstack_visual_indexes", None) or [])
    return mergers * (_linear(n, merged_width, merged_width) + _linear(n, merged_width, out))


def model_prefill_flops(
    model_config: Any,
    layer_lengths: Sequence[int],
    num_vision_inputs: int,
    num_projected_tokens: int,
    logits_positions: int,
    *,
    grid_thw: Sequence[Sequence[int]] | None = None,
    vit_layer_lengths: Sequence[Sequence[int]] | None = None,
) -> FlopsBreakdown:
    """FLOPs of one (possibly pruned) prefill forward of a VLM, split by component.

    ``layer_lengths``: sequence length entering each decoder layer; ``num_vision_inputs``: vision-tower
    inputs (see :func:`vision_flops`); ``num_projected_tokens``: vision features through the projector
    (see :func:`projector_flops`); ``logits_positions``: positions the LM head is applied to (all
    positions for ``model(**inputs)``, 1 for ``generate``'s prefill). Qwen-VL families also need
    ``grid_thw`` (``num_vision_inputs`` must then equal ``len(grid_thw)``); an in-ViT stage passes
    ``vit_layer_lengths`` (see :func:`vision_flops`). Pass ``num_vision_inputs=0``,
    ``num_projected_tokens=0`` (and no/empty ``grid_thw``) for a text-only forward.
    """
    mt = _composite_type(model_config)
    if mt in _QWEN_VL_TYPES:
        vision = vision_flops(
            model_config, num_vision_inputs, grid_thw=grid_thw if grid_thw is not None else []
        )
    else:
        vision = vision_flops(model_config, num_vision_inputs, grid_thw=grid_thw,
                              vit_layer_lengths=vit_layer_lengths)
    return FlopsBreakdown(
        vision=vision,
        projector=projector_flops(model_config, num_projected_tokens),
        llm=llm_prefill_flops(model_config, layer_lengths),
        lm_head=lm_head_flops(model_config, logits_positions),
    )
