"""Hand-built references for the invariant tests, shared by test_invariants.py and test_in_llm.py.

Everything here runs the *unwrapped* language model on sequences built by hand from an unwrapped run (the
embeddings, position ids and deepstack rows its language model received); no engine code is involved, so the
engine's output is only ever compared with these. Positions are ``[n]`` (1-D RoPE) or ``[3, n]`` (M-RoPE rows
t, h, w) for one sequence.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

import vtprune
import vtprune.engine.layer_stage as layer_stage
import vtprune.engine.session as session_module
from vtprune import compat
from vtprune.registry import method_class
from vtprune.testing import FAMILIES

ALL_FAMILIES = tuple(FAMILIES)
MROPE_FAMILIES = tuple(f for f in ALL_FAMILIES if f.startswith("qwen"))
DEEPSTACK_FAMILIES = ("qwen3_vl",)
#: registered methods by stage: tests parametrised over these cover new methods automatically
#: (pre-LLM methods that refuse images, e.g. DyCoke's temporal merging, are in VIDEO_ONLY instead)
PRE_LLM = tuple(name for name, info in vtprune.methods().items()
                if info.stage == "pre-llm" and not method_class(name).image_unsupported)
VIDEO_ONLY = tuple(name for name, info in vtprune.methods().items()
                   if info.stage == "pre-llm" and method_class(name).image_unsupported)
IN_LLM = tuple(name for name, info in vtprune.methods().items() if info.stage == "in-llm")
NEW_TOKENS = 3


@dataclass
class SideRows:
    """Deepstack input of one sequence: visual positions and, per injection point, their rows."""

    mask: torch.Tensor          # BoolTensor[n]
    rows: list[torch.Tensor]    # per injection point [n_visual, D]


@contextmanager
def capture_lm_calls(model) -> Iterator[list[dict]]:
    """Record the keyword arguments every call of the language model receives (after any earlier hook)."""
    calls: list[dict] = []

    def hook(module, args, kwargs):
        assert not args, "the language model is expected to be called with keyword arguments only"
        calls.append({k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in kwargs.items()})

    handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


def call_positions(call: dict, sample: int = 0) -> torch.Tensor:
    """Rotary position ids of one sample in a captured language-model call: [n] or [3, n] (text row dropped)."""
    positions = call.get("position_ids")
    if positions is None:
        return torch.arange(call["inputs_embeds"].shape[1])
    if positions.dim() == 2:
        return positions[sample]
    return positions[-3:, sample]


def call_side_rows(call: dict, sample: int = 0) -> SideRows | None:
    """Deepstack rows of one sample of a captured call (rows follow the mask in row-major order)."""
    mask = call.get("visual_pos_masks")
    if mask is None or call.get("deepstack_visual_embeds") is None:
        return None
    before = int(mask[:sample].sum())
    count = int(mask[sample].sum())
    return SideRows(mask[sample].clone(), [r[before:before + count] for r in call["deepstack_visual_embeds"]])


def _batched(position_ids: torch.Tensor) -> torch.Tensor:
    return position_ids[None] if position_ids.dim() == 1 else position_ids[:, None]


def _side_kwargs(side: SideRows | None) -> dict:
    if side is None:
        return {}
    return {"visual_pos_masks": side.mask[None], "deepstack_visual_embeds": side.rows}


def lm_logits(model, embeds: torch.Tensor, position_ids: torch.Tensor, side: SideRows | None = None) -> torch.Tensor:
    """The bare language model + LM head on one sequence [n, D]; logits [n, V]."""
    out = model.model.language_model(inputs_embeds=embeds[None], position_ids=_batched(position_ids),
                                     **_side_kwargs(side))
    return model.lm_head(out.last_hidden_state)[0]


def reference_greedy(model, embeds, position_ids, side: SideRows | None = None, steps: int = NEW_TOKENS):
    """Greedy decoding of the bare language model with a DynamicCache: prefill ``embeds`` at ``position_ids``,
    then feed each argmax token's embedding one position after the last one (every M-RoPE row + 1).
    Returns (tokens, logits [steps, V])."""

    lm = model.model.language_model
    cache = compat.new_dynamic_cache(lm.config)
    out = lm(inputs_embeds=embeds[None], position_ids=_batched(position_ids), **compat.cache_kwargs(cache), use_cache=True,
             **_side_kwargs(side))
    following = position_ids[..., -1] + 1  # scalar or [3]
    tokens, logits = [], []
    for t in range(steps):
        logits.append(model.lm_head(out.last_hidden_state[:, -1])[0])
        token = logits[-1].argmax(-1)[None]  # [1]
        tokens.append(int(token))
        if t + 1 == steps:
            break
        step_positions = (following + t).reshape(-1, 1, 1) if following.dim() else (following + t).view(1, 1)
        out = lm(inputs_embeds=model.get_input_embeddings()(token[:, None]), position_ids=step_positions,
                 **compat.cache_kwargs(cache), use_cache=True)
    return tokens, torch.stack(logits)


def assert_same_greedy(generated: tuple, reference: tuple, eos: int, atol: float = 1e-5) -> None:
    """Same tokens (``generate`` stops at EOS, the reference loop does not) and same logits at every step."""
    (tokens, logits), (ref_tokens, ref_logits) = generated, reference
    n = len(tokens)
    assert tokens == ref_tokens[:n]
    if n < len(ref_tokens):
        assert tokens and tokens[-1] == eos
    torch.testing.assert_close(logits, ref_logits[:n], rtol=0, atol=atol)


def reference_compact(first: torch.Tensor, cells: list[tuple[int, int, int] | None]) -> torch.Tensor:
    """Compact position ids of a pruned sequence, from the definition (docs of vtprune.engine.positions).

    ``first``  the first token's unpruned position id (scalar or [3])
    ``cells``  per token None for text, else (image id, row, column) of the token (a merged token: its
               anchor's) in its image's merged-token grid
    1-D: consecutive. M-RoPE: text counts up by one; an image starts at the current position, its kept rows
    and columns are renumbered 0, 1, ... in order, and the next token comes max(#rows, #columns) later.
    """
    n = len(cells)
    if first.dim() == 0:
        return first + torch.arange(n)
    out = torch.zeros(3, n, dtype=torch.long)
    current = int(first.min())
    i = 0
    while i < n:
        if cells[i] is None:
            out[:, i] = current
            current += 1
            i += 1
            continue
        j = i
        while j < n and cells[j] is not None and cells[j][0] == cells[i][0]:
            j += 1
        rows = sorted({c[1] for c in cells[i:j]})
        cols = sorted({c[2] for c in cells[i:j]})
        for k in range(i, j):
            out[:, k] = torch.tensor([current, current + rows.index(cells[k][1]), current + cols.index(cells[k][2])])
        current += max(len(rows), len(cols))
        i = j
    return out


def image_cells(model, inputs, sample: int = 0) -> dict[int, tuple[int, int, int]]:
    """Qwen-VL families: sequence position -> (image id, row, column) of every image token of one sample, from the
    processor's image_grid_thw (images fill the placeholders in order)."""
    merge = model.config.vision_config.spatial_merge_size
    ids = inputs["input_ids"]
    grids = inputs["image_grid_thw"].tolist()
    image_token = model.config.image_token_id
    cells, image = {}, 0
    for b in range(ids.shape[0]):
        positions = torch.nonzero(ids[b] == image_token).flatten().tolist()
        while positions:
            _, h, w = grids[image]
            count = h * w // merge**2
            if b == sample:
                for i, p in enumerate(positions[:count]):
                    cells[p] = (image, i // (w // merge), i % (w // merge))
            positions = positions[count:]
            image += 1
    return cells


# ---------------------------------------------------------------------------------------------------------
# One unwrapped run and the pruned sequences built from it
# ---------------------------------------------------------------------------------------------------------


def new_tokens(model, inputs) -> torch.Tensor:
    """Greedy ``generate`` continuation tokens, [B, <= NEW_TOKENS]."""
    return generate(model, inputs)[0]


def generate(model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy ``generate``: (continuation tokens [B, n], raw logits of each step [B, n, V]), n <= NEW_TOKENS."""
    out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    return out.sequences[:, inputs["input_ids"].shape[1]:], torch.stack(out.logits, dim=1)


@dataclass
class Case:
    family: str
    model: torch.nn.Module
    processor: object
    inputs: dict            # processor output for one image + PROMPT, batch of 1, no padding
    logits: torch.Tensor    # [L, V] unwrapped logits
    tokens: list[int]       # unwrapped greedy tokens
    step_logits: torch.Tensor  # [len(tokens), V] unwrapped logits of each generation step
    embeds: torch.Tensor    # [L, D] inputs_embeds the language model receives, unwrapped
    position_ids: torch.Tensor  # [L] (1-D) or [3, L] (M-RoPE) position ids the language model uses, unwrapped
    image_positions: torch.Tensor  # LongTensor: positions of the image placeholder tokens
    text_positions: torch.Tensor   # LongTensor: every other position
    side: SideRows | None          # Qwen3-VL: deepstack rows of the image tokens
    cells: dict                    # M-RoPE families: position -> (image, row, column) of each image token

    @property
    def length(self) -> int:
        return self.embeds.shape[0]

    @property
    def eos(self) -> int:
        return self.model.generation_config.eos_token_id


def make_case(family: str, model, processor, inputs) -> Case:
    """The unwrapped run of ``inputs`` (batch of 1, no padding): logits, greedy tokens and what the language
    model receives."""
    with torch.no_grad(), capture_lm_calls(model) as calls:
        logits = model(**inputs).logits[0]
    (call,) = calls
    with torch.no_grad():
        tokens, step_logits = generate(model, inputs)
    is_image = inputs["input_ids"][0] == model.config.image_token_id
    return Case(
        family, model, processor, inputs, logits, tokens[0].tolist(), step_logits[0], call["inputs_embeds"][0],
        call_positions(call), torch.nonzero(is_image).flatten(), torch.nonzero(~is_image).flatten(),
        call_side_rows(call), image_cells(model, inputs) if family in MROPE_FAMILIES else {},
    )


@contextmanager
def spy_selections(monkeypatch, method: str) -> Iterator[list]:
    """Record what the method's ``select`` returned: (group, Selection)."""
    records: list = []
    cls = method_class(method)
    original = cls.select

    def select(self, group, k):
        selection = original(self, group, k)
        records.append((group, selection))
        return selection

    with monkeypatch.context() as patch:
        patch.setattr(cls, "select", select)
        yield records


def rows_to_positions(rows: torch.Tensor, embeds: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Sequence position (among ``candidates``) of each row of ``rows``, by exact equality with ``embeds``."""
    equal = (rows[:, None, :] == embeds[candidates][None, :, :]).all(-1)  # [g, n]
    assert bool((equal.sum(-1) == 1).all()), "a group token does not match exactly one image position"
    return candidates[equal.float().argmax(-1)]


def merged_tokens(case: Case, records):
    """(merged rows [m, D], anchor sequence positions [m], deepstack rows of the merged tokens per point or None)
    from the recorded selections. The merge weights are checked against the merged tokens themselves."""
    rows, anchors, side = [], [], []
    for group, selection in records:
        if not selection.num_merged:
            continue
        rows.append(selection.merged)
        group_positions = rows_to_positions(group.features, case.embeds, case.image_positions)
        group_anchors = group_positions[selection.anchors.cpu()]
        if selection.at_end is not None:  # placed after the image's last placeholder
            group_anchors[selection.at_end.cpu()] = int(case.image_positions[-1])
        anchors.append(group_anchors)
        weights = selection.weights
        if weights is None and "vit_cls_hidden" in group.signals:  # VisionZip's [CLS] token leads the merged rows
            torch.testing.assert_close(group.project(group.signals["vit_cls_hidden"][:1]), selection.merged[:1],
                                       rtol=0, atol=1e-6)
            continue  # the contextual rows' values are checked against the official code in test_fidelity_pre_llm
        assert weights is not None and weights.shape == (selection.num_merged, group.num_tokens)
        if "vit_hidden" in group.signals:  # merged in vision space, then projected
            rebuilt = group.project(weights @ group.signals["vit_hidden"].float())
        else:  # merged in embedding space
            rebuilt = weights @ group.features.float()
        torch.testing.assert_close(rebuilt, selection.merged.float(), rtol=0, atol=1e-5)
        if case.side is not None:
            visual = torch.nonzero(case.side.mask).flatten()
            index = torch.searchsorted(visual, group_positions)
            side.append([weights @ r[index] for r in case.side.rows])
    if not rows:
        return case.embeds.new_zeros(0, case.embeds.shape[1]), torch.empty(0, dtype=torch.long), None
    merged_side = [torch.cat([s[i] for s in side]) for i in range(len(side[0]))] if side else None
    return torch.cat(rows), torch.cat(anchors), merged_side


def merged_order(records) -> torch.Tensor:
    """Placement of every recorded merged token at its anchor (Selection.order; 1 = right after it)."""
    orders = [selection.order.cpu() if selection.order is not None else torch.ones(selection.num_merged)
              for _, selection in records if selection.num_merged]
    return torch.cat(orders).long() if orders else torch.empty(0, dtype=torch.long)


def reference_sequence(case: Case, kept_visual: torch.Tensor, positions: str,
                       merged: torch.Tensor | None = None, anchors: torch.Tensor | None = None,
                       merged_side: list[torch.Tensor] | None = None, order: torch.Tensor | None = None):
    """The pruned sequence built by hand: text + kept visual tokens in original order, each merged token right
    after its anchor position (or where ``order`` places it: < 0 before the token at the anchor, > 0 after it,
    by value). Returns (embeds [n, D], position ids [n] or [3, n], is_merged [n], deepstack rows).
    """
    kept = torch.sort(torch.cat([case.text_positions, kept_visual])).values
    entries = [(int(p), 0, case.embeds[p], case.position_ids[..., p], None) for p in kept.tolist()]
    if merged is not None:
        ranks = order.tolist() if order is not None else [1] * merged.shape[0]
        entries += [(int(a), r, row, case.position_ids[..., a], j)
                    for j, (a, r, row) in enumerate(zip(anchors.tolist(), ranks, merged, strict=True))]
    entries.sort(key=lambda e: (e[0], e[1]))
    embeds = torch.stack([e[2] for e in entries])
    is_merged = torch.tensor([e[4] is not None for e in entries])
    if positions == "original":  # each token keeps its (anchor's) original position ids
        position_ids = torch.stack([e[3] for e in entries], dim=-1)
    else:  # recomputed as if the pruned sequence had been the input
        position_ids = reference_compact(case.position_ids[..., 0], [case.cells.get(e[0]) for e in entries])
    side = None
    if case.side is not None:
        visual = torch.nonzero(case.side.mask).flatten().tolist()
        mask = torch.tensor([e[0] in visual for e in entries])
        rows = []
        for point, point_rows in enumerate(case.side.rows):
            picked = [merged_side[point][e[4]] if e[4] is not None else point_rows[visual.index(e[0])]
                      for e in entries if e[0] in visual]
            rows.append(torch.stack(picked))
        side = SideRows(mask, rows)
    return embeds, position_ids, is_merged, side


# ---------------------------------------------------------------------------------------------------------
# In-LLM pruning: the decoder layers run by hand
# ---------------------------------------------------------------------------------------------------------


def record_kept_columns(monkeypatch) -> dict[int, torch.Tensor]:
    """layer -> columns (into the sequence entering that layer) the engine kept at an in-LLM pruning point."""
    kept: dict[int, torch.Tensor] = {}
    current = {}
    prune, assemble = session_module.prune_at_layer, layer_stage.assemble

    def prune_spy(run, lm, layer_idx, *args, **kwargs):
        current["layer"] = layer_idx
        return prune(run, lm, layer_idx, *args, **kwargs)

    def assemble_spy(hidden, position_ids, plans, *args, **kwargs):
        (plan,) = plans
        if plan.merged is None:
            kept[current["layer"]] = plan.keep.clone()
        else:  # merged tokens that replace their anchor column (HoliTom's inner merge): (columns, anchors, states)
            anchors = plan.merged_anchors.to(plan.keep.device)
            assert not bool(torch.isin(anchors, plan.keep).any()), "merged in-LLM tokens need their own reference"
            columns = torch.sort(torch.cat([plan.keep, anchors])).values
            kept[current["layer"]] = (columns, anchors.clone(), plan.merged.detach().clone())
        return assemble(hidden, position_ids, plans, *args, **kwargs)

    monkeypatch.setattr(session_module, "prune_at_layer", prune_spy)
    monkeypatch.setattr(layer_stage, "assemble", assemble_spy)
    return kept


def rotary(lm, hidden, positions):
    return lm.rotary_emb(hidden, position_ids=positions[None] if positions.dim() == 1 else positions[:, None])


def cache_cut_from(model, method: str, options: dict) -> int | None:
    """The first decoder layer whose KV cache ``method`` (with ``options``, budget included) cuts to the last
    pruning layer's tokens after the prefill (MustDrop's decoding stage), or None."""
    from vtprune.registry import build_method

    built = build_method(method, **options)
    hook = getattr(built, "cache_cut_from", None)
    return hook(len(model.model.language_model.layers)) if hook is not None else None


def cut_cache_lengths(lengths: list[int], cut_from: int | None) -> list[int]:
    """The per-layer cache lengths after a prefill whose layers ``cut_from`` .. (last pruning layer − 1) were cut to
    the last pruning layer's tokens (``lengths``: the sequence length entering each layer)."""
    if cut_from is None:
        return list(lengths)
    last = max(i for i in range(1, len(lengths)) if lengths[i] != lengths[i - 1]) if len(set(lengths)) > 1 else 0
    return [lengths[last] if cut_from <= i < last else n for i, n in enumerate(lengths)]


def reference_decoder(model, embeds, positions, side: SideRows | None, kept: dict[int, torch.Tensor],
                      convention: str, cells: dict, placeholders: torch.Tensor, steps: int = NEW_TOKENS,
                      cut_from: int | None = None):
    """Run the decoder layers by hand on one unpadded sequence, dropping the recorded columns before each
    pruning layer, with a per-layer DynamicCache; then decode greedily (each layer continues one position after
    its own last position). ``placeholders``: positions of the image tokens (all others are text). ``cut_from``
    (MustDrop's decoding stage): after the prefill, the caches of layers ``cut_from`` .. (last pruning layer − 1)
    keep only the entries of the tokens the last pruning layer kept, and those layers decode one position after
    the last pruning layer's last position.
    Returns (prefill logits [n, V], per-layer lengths, tokens, step logits [steps, V])."""

    lm = model.model.language_model
    cache = compat.new_dynamic_cache(lm.config)
    hidden = embeds[None]
    source = torch.arange(embeds.shape[0])  # original position of each current column
    visual = torch.nonzero(side.mask).flatten().tolist() if side is not None else []
    lengths, last_positions, sources = [], [], []
    for index, layer in enumerate(lm.layers):
        if index in kept:
            cols = kept[index]
            if isinstance(cols, tuple):  # the merged states replace their anchors' hidden states first
                cols, anchors, states = cols
                hidden = hidden.clone()
                hidden[0, anchors] = states.to(hidden.dtype)
            # invariant 3: columns stay in order and every text (non-placeholder) token survives
            assert bool((cols[1:] > cols[:-1]).all())
            assert set(source[~torch.isin(source, placeholders)].tolist()) <= set(source[cols].tolist())
            hidden, source = hidden[:, cols], source[cols]
            if convention == "original":
                positions = positions[..., cols]
            else:
                positions = reference_compact(positions[..., 0], [cells.get(int(p)) for p in source])
        lengths.append(hidden.shape[1])
        last_positions.append(positions[..., -1])
        sources.append(source)
        hidden = layer(hidden, attention_mask=None, position_embeddings=rotary(lm, hidden, positions),
                       **compat.cache_kwargs(cache), use_cache=True)
        if side is not None and index < len(side.rows):  # deepstack: add the rows of the visual tokens present
            columns = [c for c, p in enumerate(source.tolist()) if p in visual]
            rows = side.rows[index][[visual.index(int(source[c])) for c in columns]]
            hidden = hidden.clone()
            hidden[0, columns] += rows
    logits = model.lm_head(lm.norm(hidden))[0]
    if cut_from is not None and kept:
        last = max(kept)
        for index in range(cut_from, last):
            cols = torch.nonzero(torch.isin(sources[index], sources[last])).flatten()
            entry = cache.layers[index]
            entry.keys, entry.values = entry.keys[:, :, cols], entry.values[:, :, cols]
            last_positions[index] = last_positions[last]
    tokens, step_logits = [], []
    out = logits[-1:]
    for t in range(steps):
        step_logits.append(out[-1])
        token = out[-1].argmax(-1)
        tokens.append(int(token))
        if t + 1 == steps:
            break
        x = model.get_input_embeddings()(token.view(1, 1))
        for index, layer in enumerate(lm.layers):
            position = last_positions[index] + 1 + t  # scalar or [3]
            position = position.reshape(1) if position.dim() == 0 else position.reshape(3, 1)
            x = layer(x, attention_mask=None, position_embeddings=rotary(lm, x, position),
                      **compat.cache_kwargs(cache), use_cache=True)
        out = model.lm_head(lm.norm(x))[0]
    return logits, lengths, tokens, torch.stack(step_logits)
