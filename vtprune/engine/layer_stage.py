"""In-LLM pruning: drop visual tokens before decoder layer k, per sample, with padding and a KV cache.

The language model runs its layer loop unchanged; forward pre-hooks on the decoder layers swap in, from
the pruning layer on, the shorter hidden states and the matching position embeddings, position ids and
attention mask. Layers from k on therefore cache only the kept tokens; during decoding the same hooks give
those layers a mask sized to their own (shorter) cache.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .. import compat
from ..catalog.in_llm import LayerContext, LayerMethod, LayerSelection
from ..stats import StageStats, merged_positions
from .attention_rows import last_token_index
from .positions import layer_rows, rope_rows
from .sequence import SamplePlan, assemble
from .side_inputs import MergedRows, visual_row_index
from .timing import section


@dataclass
class Segment:
    """Layers from ``layer`` on (until the next segment) see this sequence."""

    layer: int
    prompt_mask: torch.Tensor        # [B, Lk] 2-D mask of the pruned prompt at this segment
    position_shift: torch.Tensor     # [..., B] language-model-level position - this segment's position
    position_ids: torch.Tensor | None = None   # language-model-level ids ([B, L] or M-RoPE [3|4, B, L])
    position_embeddings: Any = None             # prefill, or the current decode step
    attention_mask: Any = None                  # 4-D / None, prefill or the current decode step
    hidden: torch.Tensor | None = None          # prefill: the pruned hidden states entering ``layer``
    #: per sample: for each real column, the index of the real column of the stage's input (before any in-LLM
    #: segment) it comes from; identifies the cached entries across segments (:func:`cut_cache_to_final`)
    column_id: list[torch.Tensor] | None = None


@dataclass
class LayerRun:
    """Per-forward state of the in-LLM stage: the columns of the current sequence and what they are."""

    method: LayerMethod
    schedules: list[list[tuple[int, int]]]   # per sample [(layer, visual kept), ...]
    source: list[torch.Tensor]                # per sample: original position of each real column (in order)
    visual: list[torch.Tensor]                # per sample: BoolTensor, candidate visual columns
    merged: list[torch.Tensor]                # per sample: BoolTensor, merged (pre-LLM) columns
    pad_left: bool
    structural: list[int]                     # per sample: structural visual tokens (newlines), never dropped here
    text: list[torch.Tensor] = field(default_factory=list)   # per sample: BoolTensor, text columns
    prepared: Any = None                      # what the method's prepare() returned for this forward
    #: per sample, one StageStats per stage that ran on it
    stages: list[list[StageStats]] = field(default_factory=list)
    position_ids: torch.Tensor | None = None  # language-model-level position ids entering layer 0
    image_of: list[torch.Tensor] | None = None  # per sample [L]: image index of each original position, -1 text
    image_rule: Any = None                      # M-RoPE: the adapter's compact_image_positions
    frame_of: list[torch.Tensor] | None = None  # per sample [L]: frame of each original position in its video
    patch_of: list[torch.Tensor] | None = None  # per sample [L]: place inside its frame (SampleLayout.patch_index)
    side: Any = None                            # the prefill's per-visual-token side inputs (deepstack), or None
    segments: list[Segment] = field(default_factory=list)
    previous: tuple[torch.Tensor, Any, Any] | None = None   # input (hidden, pos emb, pos ids) of the previous layer
    #: one entry per decoder layer run so far: per sample (sequence length, visual tokens) entering it
    history: list[list[tuple[int, int]]] = field(default_factory=list)
    timer: Any = None                         # the session's timer (engine/timing.py), None when not timing
    #: the sequence entering layer 0 (set when the first segment is built): its 2-D mask (None: no padding), its
    #: length, and per sample the ids of its real columns (0..n_b-1); later segments carry ``column_id``
    base_mask: torch.Tensor | None = None
    base_length: int = 0
    column_id: list[torch.Tensor] = field(default_factory=list)


def real_columns(mask2d: torch.Tensor | None, batch: int, length: int, device) -> list[torch.Tensor]:
    if mask2d is None:
        return [torch.arange(length, device=device) for _ in range(batch)]
    return [torch.nonzero(mask2d[b]).flatten() for b in range(batch)]


def prune_at_layer(run: LayerRun, lm: nn.Module, layer_idx: int, hidden: torch.Tensor,
                   position_ids: torch.Tensor, position_embeddings, mask2d: torch.Tensor | None,
                   cache) -> Segment | None:
    """Run the method's selection at ``layer_idx`` (prefill) and build the segment the later layers use.

    ``hidden`` [B, L, D] enters the layer with the language-model-level ``position_ids`` ([B, L] or M-RoPE
    [3|4, B, L]) / ``position_embeddings`` of the current segment and the 2-D ``mask2d`` [B, L]. Returns None
    when no sample drops anything here.
    """
    batch, length, _ = hidden.shape
    adaptive = run.method.adaptive
    if adaptive and not run.method.active(run.prepared):
        return None  # the method is done with every sample of this forward
    wanted: list[int | None] = []
    for b in range(batch):
        counts = [keep for layer, keep in run.schedules[b] if layer == layer_idx]
        count = counts[0] if counts else None
        present = int(run.visual[b].sum())
        if adaptive:  # the method decides; the current visual count is the upper bound
            wanted.append(present if count is not None and present else None)
        else:
            wanted.append(count if count is not None and count < present else None)
    if all(w is None for w in wanted):
        for b in range(batch):
            if not adaptive and any(layer == layer_idx for layer, _ in run.schedules[b]):
                _record_stage(run, b, layer_idx, added=0)
        return None
    columns = real_columns(mask2d, batch, length, hidden.device)
    real, visual, text = (torch.zeros(batch, length, dtype=torch.bool, device=hidden.device) for _ in range(3))
    for b in range(batch):
        real[b, columns[b]] = True
        visual[b, columns[b][run.visual[b].to(hidden.device)]] = True
        text[b, columns[b][run.text[b].to(hidden.device)]] = True
    patch = torch.full((batch, length), -1, dtype=torch.long, device=hidden.device)
    if run.patch_of is not None:
        for b in range(batch):
            patch[b, columns[b]] = run.patch_of[b][run.source[b]].to(hidden.device)
        patch[~visual] = -1
    images = [int(run.image_of[b].max()) + 1 if run.image_of[b].numel() else 0 for b in range(batch)] \
        if run.image_of is not None else None
    prev_hidden, prev_pe, prev_ids = run.previous if run.previous is not None else (None, None, None)
    ctx = LayerContext(
        layer=layer_idx, layers=lm.layers, hidden=hidden, position_embeddings=position_embeddings,
        previous_hidden=prev_hidden, previous_position_embeddings=prev_pe, previous_position_ids=prev_ids,
        rotary=getattr(lm, "rotary_emb", None), real=real, visual=visual,
        last=last_token_index(mask2d, batch, length).to(hidden.device), text=text, source=run.source,
        prepared=run.prepared, norm=getattr(lm, "norm", None), patch=patch, images=images, merged=run.merged,
    )
    with section(run.timer, "select"):
        selections = run.method.select(ctx, wanted)
    if adaptive and all(selection is None for selection in selections):
        return None  # the method left every sample unchanged at this layer
    plans = []
    for b in range(batch):
        cols = columns[b]
        image_of = frame_of = None
        if run.image_of is not None:  # image index of every current column (compact M-RoPE needs it)
            image_of = torch.full((length,), -1, dtype=torch.long, device=hidden.device)
            image_of[cols] = run.image_of[b][run.source[b]].to(hidden.device)
        if run.frame_of is not None:  # ... and the frame of every video column
            frame_of = torch.zeros(length, dtype=torch.long, device=hidden.device)
            frame_of[cols] = run.frame_of[b][run.source[b]].to(hidden.device)
        selection = selections[b]
        if selection is None:
            plans.append(SamplePlan(keep=cols, last=int(cols[-1]) if cols.numel() else -1, image_of=image_of,
                                    frame_of=frame_of))
            continue
        _check_layer_selection(run.method.name, selection, visual[b], wanted[b], adaptive)
        if run.side is not None and selection.merged is not None and selection.weights is not None:
            _merge_side_rows(run, b, cols, selection)
        keep = torch.sort(torch.cat([cols[~run.visual[b].to(cols.device)], selection.keep.to(cols.device)])).values
        plans.append(SamplePlan(keep=keep, merged=selection.merged, merged_anchors=selection.anchors,
                                last=int(cols[-1]) if cols.numel() else -1, image_of=image_of, frame_of=frame_of))
    pruned = assemble(hidden, position_ids, plans, run.method.positions, run.pad_left, run.image_rule)
    if not run.segments:  # the sequence entering layer 0
        run.base_mask, run.base_length = mask2d, length
        run.column_id = [torch.arange(src.numel()) for src in run.source]
    for b in range(batch):
        # each column of the new sequence comes from a column of the old one (merged tokens: their anchor)
        local = torch.searchsorted(columns[b], pruned.source[b]).cpu()
        run.column_id[b] = run.column_id[b][local]
        added = pruned.merged[b].cpu()
        run.source[b] = run.source[b][local]
        run.visual[b] = run.visual[b][local] | added
        run.text[b] = run.text[b][local] & ~added
        run.merged[b] = run.merged[b][local] | added
        recorded = selections[b] is not None if adaptive else \
            wanted[b] is not None or any(layer == layer_idx for layer, _ in run.schedules[b])
        if recorded:
            _record_stage(run, b, layer_idx, added=int(added.sum()))
    base_shift = run.segments[-1].position_shift if run.segments else torch.zeros_like(pruned.position_shift)
    new_pos = pruned.position_ids
    segment = Segment(
        layer=layer_idx, prompt_mask=pruned.attention_mask, position_shift=base_shift + pruned.position_shift,
        position_ids=new_pos,
        position_embeddings=lm.rotary_emb(pruned.inputs_embeds, position_ids=rope_rows(new_pos)),
        hidden=pruned.inputs_embeds, column_id=[ids.clone() for ids in run.column_id],
    )
    segment.attention_mask = compat.create_causal_mask(
        lm.config, pruned.inputs_embeds, pruned.attention_mask, cache, layer_rows(new_pos), layer_idx=layer_idx,
    )
    run.segments.append(segment)
    return segment


def cut_cache_to_final(run: LayerRun, cache, start: int) -> list[Segment] | None:
    """After a prefill: cut the cached keys / values of decoder layers ``start`` .. (the last segment's layer − 1)
    to the tokens of the last segment (MustDrop's decoding stage), and return the segments the decode steps then
    use (the last segment, from ``start`` on). None, with nothing changed, when there is nothing to cut or it
    cannot be done exactly: no segment, a cache that is not a per-layer dynamic cache, a cache that held tokens
    before this prefill, or tokens merged inside the decoder (their entries are new, not a subset)."""
    if cache is None or not run.segments:
        return None
    final = run.segments[-1]
    if start >= final.layer:
        return None
    layers = compat.cache_layer_tensors(cache)
    batch, width = final.prompt_mask.shape
    if len(layers) < final.layer or any(ids.unique().numel() != ids.numel() for ids in run.column_id):
        return None
    plans = []
    for index in range(start, final.layer):
        earlier = [seg for seg in run.segments if seg.layer <= index]
        mask = earlier[-1].prompt_mask if earlier else run.base_mask
        length = mask.shape[1] if mask is not None else run.base_length
        ids = earlier[-1].column_id if earlier else [torch.arange(n) for n in (
            [int(m.sum()) for m in mask] if mask is not None else [length] * batch)]
        keys, values = layers[index]
        if not compat.is_dynamic_cache_layer(cache, index) or keys is None or keys.shape[-2] != length:
            return None
        plans.append((index, mask, length, ids))
    final_slots = real_columns(final.prompt_mask, batch, width, final.prompt_mask.device)
    for index, mask, length, ids in plans:
        keys, values = layers[index]
        slots = real_columns(mask, batch, length, keys.device)
        gather = torch.zeros(batch, width, dtype=torch.long, device=keys.device)  # padding entries: masked out
        for b in range(batch):
            where = torch.searchsorted(ids[b], run.column_id[b])
            gather[b, final_slots[b].to(keys.device)] = slots[b][where.to(keys.device)]
        heads, dim = keys.shape[1], keys.shape[-1]
        index_kv = gather[:, None, :, None].expand(batch, heads, width, dim)
        compat.set_cache_layer_tensors(cache, index, keys.gather(2, index_kv), values.gather(2, index_kv))
    return [*[seg for seg in run.segments if seg.layer < start], dataclasses.replace(final, layer=start)]


def _record_stage(run: LayerRun, b: int, layer_idx: int, added: int) -> None:
    kept = run.source[b][run.visual[b] & ~run.merged[b]]
    merged = run.source[b][run.visual[b] & run.merged[b]]  # a merged token carries its anchor's position
    run.stages[b].append(StageStats(
        name=run.method.name, layer=layer_idx, kept_positions=torch.sort(kept).values, merged=added,
        visual_out=int(run.visual[b].sum()),
        merged_positions=merged_positions([merged]),
    ))


def _merge_side_rows(run: LayerRun, b: int, cols: torch.Tensor, selection: LayerSelection) -> None:
    """Side rows (Qwen3-VL deepstack) of the tokens sample ``b`` merges at this layer: the selection's weights
    [m, V] applied to the rows of its V current visual tokens (plain tokens: their own rows; merged ones: the rows
    recorded for them), recorded under the merged tokens' anchors (replacing a merged anchor's earlier rows)."""
    side = run.side
    index = visual_row_index(side.mask)[b]
    sources = run.source[b][run.visual[b]]  # [V] original position (anchor) of each visual column, ascending
    is_merged = run.merged[b][run.visual[b]]
    extra = side.merged[b]
    plain_rows = index[sources.to(index.device)]
    if bool((plain_rows[~is_merged.to(index.device)] < 0).any()):
        raise RuntimeError("a visual token without side inputs was merged inside the decoder")
    if bool(is_merged.any()):
        if extra is None or not bool(torch.isin(sources[is_merged], extra.anchors.cpu()).all()):
            raise RuntimeError("a merged token without side rows was merged again inside the decoder")
        lookup = torch.searchsorted(extra.anchors.cpu(), sources[is_merged])
    anchors = run.source[b][torch.searchsorted(cols.cpu(), selection.anchors.cpu())]  # columns -> positions
    weights = selection.weights.float()
    new_rows = []
    for point, rows in enumerate(side.rows):
        current = rows.new_zeros(sources.numel(), rows.shape[-1]).float()
        plain = ~is_merged
        current[plain.to(current.device)] = rows[plain_rows[plain.to(index.device)]].float()
        if bool(is_merged.any()):
            current[is_merged.to(current.device)] = extra.rows[point][lookup.to(rows.device)].float()
        new_rows.append((weights.to(current.device) @ current).to(rows.dtype))
    if extra is not None:  # keep the rows of the other merged tokens
        stay = ~torch.isin(extra.anchors.cpu(), anchors)
        anchors_all = torch.cat([extra.anchors.cpu()[stay], anchors])
        rows_all = [torch.cat([old[stay.to(old.device)], new.to(old.device)]) for old, new in zip(
            extra.rows, new_rows, strict=True)]
    else:
        anchors_all, rows_all = anchors, new_rows
    order = torch.argsort(anchors_all)
    side.merged[b] = MergedRows(anchors=anchors_all[order], rows=[r[order.to(r.device)] for r in rows_all])


def _check_layer_selection(name: str, selection: LayerSelection, visual: torch.Tensor, wanted: int,
                           adaptive: bool = False) -> None:
    keep = selection.keep
    # merged tokens that replace their anchor column (HoliTom's merge into kept tokens) count towards the schedule
    standing = selection.merged.shape[0] if selection.replaces and selection.merged is not None else 0
    count_ok = keep.numel() + standing <= wanted if adaptive else keep.numel() + standing == wanted
    ok = count_ok and bool(visual[keep].all()) and keep.unique().numel() == keep.numel()
    if selection.merged is not None:
        anchors = selection.anchors
        ok = ok and anchors is not None and anchors.numel() == selection.merged.shape[0] and bool(visual[anchors].all())
    if not ok:
        raise RuntimeError(
            f"in-LLM method {name!r} returned {keep.numel()} kept columns for a schedule of {wanted} visual "
            "tokens (or columns that are not visual candidates); this is a bug in the method."
        )


def decode_segment_inputs(segment: Segment, lm: nn.Module, hidden: torch.Tensor, tail_mask: torch.Tensor | None,
                          decoded: int, position_ids: torch.Tensor, position_embeddings, cache) -> None:
    """Mask and positions of one decode step for the layers of ``segment`` (their cache is shorter)."""
    batch, steps, _ = hidden.shape
    if tail_mask is None:
        tail_mask = segment.prompt_mask.new_ones(batch, decoded + steps)
    mask2d = torch.cat([segment.prompt_mask, tail_mask.to(segment.prompt_mask)], dim=1)
    positions = position_ids - segment.position_shift.unsqueeze(-1)
    shift = segment.position_shift  # [B] or M-RoPE [3|4, B]; a text row (4 rows) is not a rotary position
    if bool(((shift[1:] if shift.dim() == 2 and shift.shape[0] == 4 else shift) != 0).any()):
        position_embeddings = lm.rotary_emb(hidden, position_ids=rope_rows(positions))
    segment.position_ids = positions
    segment.position_embeddings = position_embeddings
    segment.attention_mask = compat.create_causal_mask(
        lm.config, hidden, mask2d, cache, layer_rows(positions), layer_idx=segment.layer,
    )
