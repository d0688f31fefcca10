"""Assemble the pruned sequence of a padded batch: gather, merge, re-pad, positions, mask.

Pure tensor code; the session decides *what* to keep, this module builds the tensors the decoder sees.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .positions import ImageRule, pruned_positions


@dataclass
class SamplePlan:
    """What one sample keeps, in original coordinates.

    ``keep``            LongTensor[k], ascending: original positions of the real tokens kept (text + visual)
    ``merged``          Tensor[m, D] or None: merged tokens to insert
    ``merged_anchors``  LongTensor[m]: original position each merged token stands at
    ``merged_order``    LongTensor[m] or None: placement at the anchor (< 0 before the token there, > 0 after it,
                        sorted by value; None: all 1), see :class:`vtprune.registry.Selection`
    ``last``            original position of the sample's last real token (decoding continues after it)
    ``image_of``        LongTensor[L] or None: image index of every input column (-1 = text); compact M-RoPE
                        positions need it (see :mod:`vtprune.engine.positions`)
    ``frame_of``        LongTensor[L] or None: frame of every input column within its video (0 elsewhere)
    """

    keep: torch.Tensor
    merged: torch.Tensor | None = None
    merged_anchors: torch.Tensor | None = None
    merged_order: torch.Tensor | None = None
    last: int = -1
    image_of: torch.Tensor | None = None
    frame_of: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return int(self.keep.numel()) + (0 if self.merged is None else int(self.merged.shape[0]))


@dataclass
class PrunedBatch:
    inputs_embeds: torch.Tensor    # [B, Lp, D]
    attention_mask: torch.Tensor   # [B, Lp] long, 1 = real token
    position_ids: torch.Tensor     # [..., B, Lp]
    source: list[torch.Tensor]     # per sample LongTensor[n_b]: original position (anchor for merged tokens)
    merged: list[torch.Tensor]     # per sample BoolTensor[n_b]: True for merged tokens
    slots: list[torch.Tensor]      # per sample LongTensor[n_b]: column of each token in the padded batch
    position_shift: torch.Tensor   # [..., B]: decode position = unwrapped decode position - shift


def assemble(
    inputs_embeds: torch.Tensor,
    position_ids: torch.Tensor,
    plans: list[SamplePlan],
    positions: str,
    pad_left: bool,
    image_rule: ImageRule | None = None,
) -> PrunedBatch:
    """Build the pruned, re-padded batch.

    ``inputs_embeds``  [B, L, D] the unpruned input embeddings
    ``position_ids``   [..., B, L] the position ids the unwrapped model would use (1-D RoPE: [B, L]; M-RoPE:
                       [3|4, B, L])
    ``positions``      "original": each token keeps its position id (merged tokens: their anchor's);
                       "compact": positions recomputed as if the pruned sequence had been the input
                       (rules in :mod:`vtprune.engine.positions`)
    ``pad_left``       pad on the left (generation) or on the right
    ``image_rule``     M-RoPE families: the compact rope index of one image (the adapter's
                       ``compact_image_positions``)
    """
    batch, _, hidden = inputs_embeds.shape
    lengths = [p.length for p in plans]
    width = max(lengths) if lengths else 0
    lead = position_ids.shape[:-2]
    out_embeds = inputs_embeds.new_zeros(batch, width, hidden)
    out_mask = torch.zeros(batch, width, dtype=torch.long, device=inputs_embeds.device)
    out_pos = position_ids.new_zeros(*lead, batch, width)
    shift = position_ids.new_zeros(*lead, batch)
    sources, merged_flags, slots = [], [], []
    for b, plan in enumerate(plans):
        keep = plan.keep.to(inputs_embeds.device)
        rows = [inputs_embeds[b, keep]]
        src = [keep]
        is_merged = [torch.zeros_like(keep, dtype=torch.bool)]
        rank = [torch.zeros_like(keep)]  # kept tokens 0; merged tokens their placement (default 1: after)
        if plan.merged is not None and plan.merged.shape[0]:
            anchors = plan.merged_anchors.to(inputs_embeds.device)
            rows.append(plan.merged.to(inputs_embeds.dtype))
            src.append(anchors)
            is_merged.append(torch.ones_like(anchors, dtype=torch.bool))
            rank.append(torch.ones_like(anchors) if plan.merged_order is None
                        else plan.merged_order.to(anchors.device, torch.long))
        src_all, merged_all, rank_all = torch.cat(src), torch.cat(is_merged), torch.cat(rank)
        # order by (position, placement): a merged token sits right after its anchor unless placed otherwise
        order = torch.argsort(rank_all, stable=True)
        order = order[torch.argsort(src_all[order], stable=True)]
        src_all, merged_all = src_all[order], merged_all[order]
        embeds = torch.cat(rows)[order]
        n = embeds.shape[0]
        start = width - n if pad_left else 0
        slot = torch.arange(start, start + n, device=inputs_embeds.device)
        out_embeds[b, slot] = embeds
        out_mask[b, slot] = 1
        original = position_ids[..., b, :][..., src_all]  # [..., n]
        image_of = plan.image_of[src_all.to(plan.image_of.device)] if plan.image_of is not None else None
        frame_of = plan.frame_of[src_all.to(plan.frame_of.device)] if plan.frame_of is not None else None
        new = pruned_positions(original, positions, image_of, image_rule, frame_of)
        if n:  # decoding continues after the last token (0 for unchanged rows, e.g. "original" rope rows)
            shift[..., b] = position_ids[..., b, plan.last] - new[..., -1]
        out_pos[..., b, slot] = new
        sources.append(src_all)
        merged_flags.append(merged_all)
        slots.append(slot)
    return PrunedBatch(out_embeds, out_mask, out_pos, sources, merged_flags, slots, shift)
