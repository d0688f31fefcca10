"""Position ids of a pruned sequence: 1-D RoPE and Qwen's 3-D multimodal RoPE (M-RoPE).

Shapes follow what transformers 5 passes to a language model:

* 1-D RoPE (LLaMA, Qwen2, ...): ``[B, L]``;
* M-RoPE (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): ``[3, B, L]`` rows (temporal, height, width) from the model's rope
  index, or ``[4, B, L]`` where row 0 holds *text positions* (the index of each token among the sample's
  real tokens: ``generate`` builds it from the attention mask) and rows 1-3 the rope index. The text row is
  not a rotary position: the Qwen text models use it only to build masks (and hand it to the decoder layers
  as ``position_ids``); the rotary embedding sees rows 1-3.

Conventions for the kept tokens (design.md, invariant 4):

``"original"``
    every kept token keeps its position ids (a merged token those of its anchor); decoding continues with
    the unpruned positions (for M-RoPE: the model's ``rope_deltas``).
``"compact"``
    positions are recomputed as if the pruned sequence had been the input. 1-D: consecutive from the first
    token. M-RoPE: the rope index is re-run on the pruned layout: text tokens count up by one; each image
    starts at the current position and its kept tokens get the offsets the *family's image rule* gives them
    (the adapter's ``compact_image_positions``: for Qwen-VL, the smallest grid that keeps their row and
    column order — see :func:`vtprune.adapters.qwen_vl.qwen_compact_image`), after which the next token
    comes the rule's advance later. Decoding continues after the last compact position.

In both conventions a text row (``[4, B, L]``) is re-indexed consecutively: it is a sequence index.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["pruned_positions", "compact_mrope", "rope_rows", "layer_rows", "is_mrope", "ImageRule"]

#: the family's compact rope index of one pruned image or video: (t, h, w) ids of its kept tokens [3, m] (in
#: order), and for a video the frame (temporal group) of each token [m] (None for images) -> (offsets from the
#: image's start position [3, m], positions the image occupies before the next token)
ImageRule = Callable[..., tuple[torch.Tensor, int]]


def is_mrope(position_ids: torch.Tensor) -> bool:
    """True for ``[3|4, B, L]`` M-RoPE position ids (or ``[3|4, n]`` for one sample)."""
    return position_ids.dim() == 3


def rope_rows(position_ids: torch.Tensor) -> torch.Tensor:
    """The rows the rotary embedding takes: drops the text row of a ``[4, B, L]`` tensor."""
    if position_ids.dim() == 3 and position_ids.shape[0] == 4:
        return position_ids[1:]
    return position_ids


def layer_rows(position_ids: torch.Tensor) -> torch.Tensor | None:
    """The ``position_ids`` a decoder layer (and the causal-mask builder) receives for these LM-level ids.

    1-D: the same tensor. M-RoPE: the text row of a ``[4, B, L]`` tensor, None for ``[3, B, L]`` (as the Qwen
    text models do).
    """
    if position_ids.dim() == 2:
        return position_ids
    return position_ids[0] if position_ids.shape[0] == 4 else None


def compact_mrope(rope: torch.Tensor, image_of: torch.Tensor, image_rule: ImageRule,
                  frame_of: torch.Tensor | None = None) -> torch.Tensor:
    """Compact M-RoPE positions of one pruned sample (rule in the module docstring).

    ``rope``        LongTensor[3, n]: (t, h, w) positions of the kept tokens, in sequence order (merged tokens
                    carry their anchor's positions)
    ``image_of``    LongTensor[n]: image index of each token, -1 for text
    ``image_rule``  the family's compact rope index of one image (:data:`ImageRule`)
    ``frame_of``    LongTensor[n] or None: frame of each token within its video (0 for images and text); a
                    run of several frames is handed to the rule with them
    Returns LongTensor[3, n].
    """
    n = rope.shape[1]
    out = torch.empty_like(rope)
    if n == 0:
        return out
    image_of = image_of.to(rope.device)
    current = rope[:, 0].min()
    # runs of equal image index: [start, end)
    change = torch.nonzero(image_of[1:] != image_of[:-1]).flatten() + 1
    bounds = [0, *change.tolist(), n]
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        if int(image_of[start]) < 0:  # text: one position per token
            out[:, start:end] = current + torch.arange(end - start, device=rope.device, dtype=rope.dtype)
            current = current + (end - start)
            continue
        frames = None if frame_of is None else frame_of[start:end].to(rope.device)
        if frames is not None and bool((frames == frames[0]).all()):
            frames = None  # one frame (or an image): the image rule as is
        offsets, advance = image_rule(rope[:, start:end]) if frames is None else image_rule(rope[:, start:end], frames)
        out[:, start:end] = current + offsets
        current = current + advance
    return out


def pruned_positions(original: torch.Tensor, convention: str, image_of: torch.Tensor | None = None,
                     image_rule: ImageRule | None = None, frame_of: torch.Tensor | None = None) -> torch.Tensor:
    """Position ids of one sample's pruned sequence.

    ``original``    [n] (1-D) or [3|4, n] (M-RoPE): the unpruned position ids of the kept tokens, in order
                    (merged tokens: their anchor's)
    ``convention``  "original" or "compact"
    ``image_of``    LongTensor[n]: image index of each token (-1 = text)     } needed for compact M-RoPE
    ``image_rule``  the family's compact rope index of one image             }
    ``frame_of``    LongTensor[n]: frame of each token within its video (videos) }
    Returns a tensor shaped like ``original``.
    """
    n = original.shape[-1]
    steps = torch.arange(n, device=original.device, dtype=original.dtype)
    if original.dim() == 1:
        return original if convention == "original" else original[:1] + steps
    rope = original[-3:]
    if convention == "compact":
        if image_of is None or image_rule is None:
            raise ValueError("compact M-RoPE positions need the image index of every token and the family's "
                             "image rule (the adapter's compact_image_positions)")
        rope = compact_mrope(rope, image_of, image_rule, frame_of)
    if original.shape[0] == 4:  # text row: a sequence index among the kept tokens
        return torch.cat([(original[0, :1] + steps)[None], rope])
    return rope
