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
from vtprune.testing import FAMILIES

ALL_FAMILIES = tuple(FAMILIES)
MROPE_FAMILIES = tuple(f for f in ALL_FAMILIES if f.startswith("qwen"))
DEEPSTACK_FAMILIES = ("qwen3_vl",)
#: registered methods by stage: tests parametrised over these cover new methods automatically
PRE_LLM = tuple(name for name, info in vtprune.methods().items() if info.stage == "pre-llm")
IN_LLM = tuple(name for name, info in vtprune.methods().items() if info.stage == "in-llm")
NEW_TOKENS = 4


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
    from transformers import DynamicCache

    lm = model.model.language_model
    cache = DynamicCache(config=lm.config)
    out = lm(inputs_embeds=embeds[None], position_ids=_batched(position_ids), past_key_values=cache, use_cache=True,
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
                 past_key_values=cache, use_cache=True)
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
