"""Per-visual-token decoder inputs besides the embeddings (Qwen3-VL's deepstack features), kept aligned with a
pruned sequence.

Such an input is a boolean mask ``[B, L]`` of the visual positions plus, per injection point, a tensor
``[n_visual, D]`` whose rows follow the mask in row-major order (what ``hidden[mask] += rows`` expects).
After pruning, the mask must mark the visual tokens of the *current* sequence and the rows must be those of
the kept tokens (and of the merged tokens, built with the method's merge weights).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import UnsupportedModelError


@dataclass
class MergedRows:
    """Side rows of one sample's merged tokens, per injection point, found by the merged token's anchor."""

    anchors: torch.Tensor  # LongTensor[m], ascending: anchor (original) position of each merged token
    rows: list[torch.Tensor] = field(default_factory=list)  # per injection point [m, D], in anchor order


def visual_row_index(mask: torch.Tensor) -> torch.Tensor:
    """LongTensor[B, L]: row of each visual position in the side tensor (row-major order), -1 elsewhere."""
    flat = mask.reshape(-1).long()
    index = torch.cumsum(flat, 0) - 1
    return torch.where(flat.bool(), index, torch.full_like(index, -1)).view(mask.shape)


def merged_side_rows(rows: torch.Tensor, row_index: torch.Tensor, group_positions: torch.Tensor,
                     weights: torch.Tensor) -> torch.Tensor:
    """[m, D] side rows of merged tokens: ``weights [m, N]`` applied to the rows of the group's tokens.

    ``row_index`` [L] is the sample's :func:`visual_row_index`, ``group_positions`` [N] the (original)
    sequence positions of the group's tokens.
    """
    source = row_index[group_positions.to(row_index.device)]
    if bool((source < 0).any()):
        raise UnsupportedModelError("a merged group covers positions without side inputs (deepstack features).")
    return (weights.to(rows.device, torch.float32) @ rows[source.to(rows.device)].float()).to(rows.dtype)


def gather_side_rows(mask: torch.Tensor, rows: torch.Tensor, point: int,
                     columns: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                     merged: list[MergedRows | None], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask [B, width] and rows of the tokens now in the sequence.

    ``mask``/``rows``  the unpruned side input (``rows`` of injection point ``point``)
    ``columns``        per sample (slots, source, is_merged): column in the current padded sequence, original
                       position (anchor for merged tokens) and merged flag of every token now present
    ``merged``         per sample the side rows of its merged tokens (None if it has none)
    """
    row_index = visual_row_index(mask)
    batch = mask.shape[0]
    new_mask = torch.zeros(batch, width, dtype=torch.bool, device=mask.device)
    parts = []
    for b, (slots, source, is_merged) in enumerate(columns):
        slots, source, is_merged = slots.to(mask.device), source.to(mask.device), is_merged.to(mask.device)
        plain = ~is_merged
        visual = torch.zeros_like(plain)
        visual[plain] = row_index[b, source[plain]] >= 0
        visual |= is_merged
        new_mask[b, slots[visual]] = True
        is_plain_row = plain[visual]  # [n_visual now]: which of the sample's visual tokens are not merged
        sample_rows = rows.new_zeros(int(visual.sum()), rows.shape[-1])
        sample_rows[is_plain_row] = rows[row_index[b, source[visual & plain]]]
        if bool(is_merged.any()):
            extra = merged[b]
            anchors = source[is_merged]
            if extra is None or not bool(torch.isin(anchors, extra.anchors.to(mask.device)).all()):
                raise UnsupportedModelError(
                    "merged tokens created inside the decoder have no deepstack features; this method cannot "
                    "merge tokens before the last deepstack layer of this model. Use a method that only drops "
                    "tokens, or prune after the deepstack layers."
                )
            lookup = torch.searchsorted(extra.anchors.to(mask.device), anchors)  # anchors are sorted
            sample_rows[~is_plain_row] = extra.rows[point].to(rows.device)[lookup]
        parts.append(sample_rows)
    return new_mask, torch.cat(parts) if parts else rows[:0]
