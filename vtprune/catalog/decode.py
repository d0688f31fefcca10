"""Decode-stage methods: prune the visual KV cache at each decode step (vtprune/engine/decode_stage.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import MethodOptionError
from ..registry import DECODE, Method, register_method
from ..selectors.video_llm import dycoke_decode_keep

__all__ = ["DecodeMethod", "DyCokeDecode"]


class DecodeMethod(Method):
    """Base of the methods with a decode stage. ``decode_layer`` is the first decoder layer that attends to the
    per-step view of the cache (the attention of layer ``decode_layer − 1`` decides it); ``decide`` returns, per
    sample, the visual cache entries to keep at this step (indices into the step's V entries) or None for all.

    Budget: ``None`` = the method's own default; a float = the fraction of each sample's visual KV entries
    attended at every decode step; an int = that many entries per sample. Prefill is untouched (the
    statistics of the prefill are those of the other stages)."""

    stage = DECODE
    default_budget = None
    default_positions = "original"

    def decode_layer(self, num_layers: int) -> int:
        raise NotImplementedError

    def keep_count(self, num_visual: int) -> int:
        if isinstance(self.budget, float):
            return min(num_visual, int(num_visual * self.budget))
        return min(num_visual, int(self.budget))

    def decide(self, step) -> list[torch.Tensor | None]:
        raise NotImplementedError


@register_method
class DyCokeDecode(DecodeMethod):
    """DyCoke's decode-time dynamic KV-cache pruning (Tao et al., CVPR 2025, arXiv 2411.15024; KD-TAO/DyCoke @
    dd74634 ``llava/model/language_model/modeling_qwen2.py`` L55-115, L1136-1158).

    At every decode step, the current token's head-mean attention at layer ``layer − 1`` over the visual cache
    entries is compared (cosine) with the previous step's; below ``threshold`` (0.9) the kept set is recomputed:
    the top int(n · (1 − ``p``)) visual entries (``p`` = 0.8 in the official lmms-eval settings: 20 % kept), and
    decoder layers from ``layer`` (3) on attend to the text, the decoded tokens and those entries only (a gathered
    view of the cache; the full cache is still stored). Works on any visual span (images, video frames, merged
    tokens). A ``budget`` (float fraction / int count of visual entries per sample) replaces ``p``.

    Deviations from the official code: (1) the official code resets the kept set at every step, so a step whose
    attention pattern did *not* change attends to the full cache; vtprune reuses the previous kept set then, as
    the paper describes (``reuse=False`` restores the official behaviour). (2) The attention is computed from
    q/k for the current token only (the official code forces ``output_attentions=True``, i.e. eager attention,
    at every layer); same values. (3) The official image span is [image_token_start_index, +length) with a
    hard-coded start (14) and length (TTM output − 1); here the visual entries are the model's visual content
    tokens from the layout (row newlines excluded). (4) The official previous-attention vector lives in the model
    config and leaks across generations; here it starts afresh with every prefill. (5) Steps that feed several
    tokens at once attend to the full cache (the official code prunes only when q_len == 1, too).
    """

    name = "dycoke_decode"
    paper = "DyCoke (CVPR'25, decode-time KV pruning)"
    options = {"layer": 3, "p": 0.8, "threshold": 0.9, "reuse": True}

    def validate_options(self) -> None:
        layer, p, threshold = self.config["layer"], self.config["p"], self.config["threshold"]
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 1:
            raise MethodOptionError(f"dycoke_decode layer={layer!r} must be an int >= 1 (layer - 1 gives the "
                                    "attention that decides the kept entries).")
        if not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
            raise MethodOptionError(f"dycoke_decode p={p!r} (the pruned fraction) must be in [0, 1).")
        if not isinstance(threshold, (int, float)) or not -1.0 <= threshold <= 1.0:
            raise MethodOptionError(f"dycoke_decode threshold={threshold!r} is a cosine similarity: use [-1, 1].")
        if not isinstance(self.config["reuse"], bool):
            raise MethodOptionError("dycoke_decode reuse= must be True or False.")

    def check_model(self, num_layers: int) -> None:
        if self.config["layer"] >= num_layers:
            raise MethodOptionError(f"dycoke_decode layer={self.config['layer']} needs a decoder deeper than "
                                    f"{num_layers} layers; use layer in [1, {num_layers - 1}].")

    def decode_layer(self, num_layers: int) -> int:
        return self.config["layer"]

    def decide(self, step) -> list[torch.Tensor | None]:
        attention, valid = step.attention, step.valid
        last = step.memory.get("attention")
        step.memory["attention"] = attention
        if self.budget is None:
            ratio = 1 - self.config["p"]
            fresh = dycoke_decode_keep(attention, valid, ratio)
        else:
            fresh = [self._top(attention[b], valid[b]) for b in range(attention.shape[0])]
        out = []
        for b in range(attention.shape[0]):
            stable = False
            if last is not None:
                real = valid[b]
                stable = float(F.cosine_similarity(attention[b, real], last[b, real], dim=0)) >= self.config["threshold"]
            if not stable:
                out.append(fresh[b])
            else:
                out.append(step.previous[b] if self.config["reuse"] else None)
        return out

    def _top(self, attention: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        real = torch.nonzero(valid).flatten()
        count = self.keep_count(real.numel())
        best = torch.sort(attention[real].float(), descending=True, stable=True).indices[:count]
        return torch.sort(real[best]).values
