"""FrameFusion (``vtprune.catalog.video_llm.FrameFusion``): fidelity to the official merge / prune steps, known
answers on the tiny video models, batches with merges, budgets, images, and the deepstack rows of merged tokens.

Fidelity: :class:`OfficialFrameFusion` is this project's own transcription of ``FrameFusion.forward`` and its helpers
(thu-nics/FrameFusion @ fbec1d2 ``framefusion/main.py`` L40-140 forward, L180-241 similarity by patch, L243-319
merge, L321-343 pruning ratio, L351-380 runs), batch of one, written from reading the official code. The official
module is called once per merge/prune point with the sequence's hidden states; vtprune's method is called through
its ``select`` with the same hidden states, and after every point both must hold the same tokens (by original
position) with the same hidden states (float32, within 1e-5), the same recorded sparsities and the same end.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from reference_runs import NEW_TOKENS

import vtprune
from vtprune.catalog import video_llm
from vtprune.catalog.in_llm import LayerContext, LayerSelection
from vtprune.errors import BudgetError
from vtprune.registry import build_method
from vtprune.selectors.video_llm import framefusion_pruning_ratio
from vtprune.testing import tiny_image, tiny_inputs, tiny_video

RANDOM_CASES = 24
FAMILIES = ("llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl")


needs_video = pytest.mark.skipif(
    importlib.util.find_spec("torchvision") is None,
    reason="video inputs go through the HF video processors, which need torchvision (the video extra)")

@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


# ---------------------------------------------------------------------------------------------------------
# The official computation, transcribed
# ---------------------------------------------------------------------------------------------------------

OFFICIAL_TEXT, OFFICIAL_IGNORE = -1, -2


def official_runs(flags: torch.Tensor) -> torch.Tensor:
    """``find_contigious_latter_index`` (L351-380): [1, n] 0/1 -> the length of every run of ones at its last
    element, 0 elsewhere."""
    before = torch.cat([torch.zeros(1, 1, dtype=flags.dtype), flags[:, :-1]], dim=1)
    after = torch.cat([flags[:, 1:], torch.zeros(1, 1, dtype=flags.dtype)], dim=1)
    starts = torch.nonzero((flags == 1) & (before == 0), as_tuple=True)
    ends = torch.nonzero((flags == 1) & (after == 0), as_tuple=True)
    out = torch.zeros_like(flags)
    out[ends[0], ends[1]] = (ends[1] - starts[1] + 1).to(flags.dtype)
    return out


def official_similarity(hidden: torch.Tensor, patch_type: torch.Tensor, patch_num: int):
    """``compute_similarity_and_token_index_by_patch`` (L180-241): tokens ordered by (patch type, index); cosine
    of each with the previous one, -2 across patch types and for the first."""
    types, index = torch.where(patch_type == torch.arange(patch_num)[:, None])
    types, index = types[None], index[None]
    a, b = hidden[0, index[0, :-1]], hidden[0, index[0, 1:]]
    sim = ((a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)))[None]
    sim[types[:, :-1] != types[:, 1:]] = -2
    sim = torch.cat([torch.full((1, 1), OFFICIAL_IGNORE, dtype=hidden.dtype), sim], dim=1)
    return sim, index


def official_merge(hidden: torch.Tensor, sim: torch.Tensor, index: torch.Tensor, merge_index: torch.Tensor):
    """``merge_tokens_and_get_mask`` (L243-319): every run of merged tokens (in patch order) is added into the
    token before it, which is divided by run length + 1; returns (hidden, keep mask [1, q_len])."""
    if merge_index.shape[0] == 0:
        return hidden, torch.ones(hidden.shape[:-1], dtype=torch.bool)
    flags = torch.zeros(1, sim.shape[1], dtype=hidden.dtype)
    flags[0, merge_index] = 1
    last = official_runs(flags)
    keep = torch.ones(hidden.shape[:-1], dtype=torch.bool)
    keep[0, index[0, merge_index]] = False
    nums = torch.sort(torch.unique(last.long())).values
    nums = nums[1:] if nums[0] == 0 else nums
    which, end_in_patch = torch.where(last == nums[:, None])
    lengths = nums[which]
    start_in_patch = end_in_patch - lengths
    member_start = torch.repeat_interleave(start_in_patch, lengths)
    offsets = torch.arange(1, int(lengths.sum()) + 1) - torch.repeat_interleave(
        torch.cat([torch.tensor([0]), torch.cumsum(lengths, 0)[:-1]]), lengths)
    members = member_start + offsets
    hidden.index_add_(1, index[0, member_start], hidden[0, index[0, members]][None])
    hidden[0, index[0, start_in_patch]] /= (lengths[:, None] + 1)
    return hidden, keep


def official_pruning_ratio(sparsities: list[float], cost: float, num_layers: int) -> float:
    """``_compute_pruning_ratio`` (L321-343), with the depth as a parameter (officially 28)."""
    s, total = 1.0, 0.0
    for value in sparsities:
        s *= 1 - value
        total += s
    remain = num_layers * cost - total
    if remain < 0:
        raise ValueError("The cost is too small")
    if remain / ((num_layers - len(sparsities)) * s) > 1:
        return 0
    return 1 - remain / ((num_layers - len(sparsities)) * s)


class OfficialFrameFusion:
    """``FrameFusion.prepare`` + ``forward`` (L15-140) for one sample; ``tracker`` follows the original position of
    every token as the official code follows its position embeddings."""

    def __init__(self, patch_type, patch_num, start, length, q_len, num_layers, cost=0.3,
                 similarity_lower_bound=0.6, ratio_lower_bound=0.1):
        self.patch_type, self.patch_num = patch_type[None].clone(), patch_num
        self.start, self.length, self.original_length = start, length, q_len
        self.num_layers, self.cost = num_layers, cost
        self.lower, self.ratio_lower = similarity_lower_bound, ratio_lower_bound
        self.finish_merging = self.finish_pruning = False
        self.sparsity_list: list[float] = []

    def forward(self, hidden, tracker, attention):
        """``attention`` [1, H, 1, q_len]: the last query's attention in the layer that just ran."""
        q_len = hidden.shape[1]
        if q_len > 1 and self.finish_merging and not self.finish_pruning:
            length = self.length - (self.original_length - q_len)
            mean = attention.mean(dim=(1, 2))[0][self.start:self.start + length]
            ratio = official_pruning_ratio(self.sparsity_list, self.cost, self.num_layers)
            top = mean.topk(round(length * (1 - ratio))).indices + self.start
            keep = torch.cat([torch.arange(self.start), top, torch.arange(self.start + length, q_len)]).sort().values
            hidden, tracker = hidden[:, keep], tracker[keep]
            self.finish_pruning = True
        if q_len > 1 and not self.finish_merging:
            bound = official_pruning_ratio(self.sparsity_list, self.cost, self.num_layers)
            sim, index = official_similarity(hidden, self.patch_type, self.patch_num)
            count = int((self.patch_type != OFFICIAL_TEXT).sum())
            merge_index = torch.where(sim >= self.lower)[1]
            above = merge_index.shape[0] / count
            if above < bound:
                self.sparsity_list.append(above)
                if above < self.ratio_lower:
                    self.finish_merging = True
            else:
                _, top = torch.topk(sim, int(bound * count))
                merge_index = torch.sort(top).values[0]
                self.finish_merging = self.finish_pruning = True
            hidden, mask = official_merge(hidden, sim, index, merge_index)
            self.patch_type = self.patch_type[mask].reshape(1, -1)
            hidden, tracker = hidden[mask][None], tracker[mask[0]]
        return hidden, tracker


# ---------------------------------------------------------------------------------------------------------
# vtprune's method on the same inputs
# ---------------------------------------------------------------------------------------------------------


class _Layers(list):
    """Stand-in for the decoder's layer list (the method reads its length and indexes it for the scores)."""


def vtprune_point(method, state, layer: int, hidden, source, patch_of, visual_of, attention, monkeypatch, depth):
    """One point of vtprune's FrameFusion on a sequence (batch of one): returns the new (hidden, source)."""
    length = hidden.shape[1]
    visual = visual_of[source][None]
    patch = torch.where(visual, patch_of[source][None], torch.full_like(source, -1)[None])
    ctx = LayerContext(layer=layer, layers=_Layers([None] * depth), hidden=hidden, position_embeddings=None,
                       previous_hidden=hidden, previous_position_embeddings=None,
                       real=torch.ones(1, length, dtype=torch.bool), visual=visual,
                       last=torch.tensor([[length - 1]]), prepared=[state], patch=patch, images=[1])
    monkeypatch.setattr(video_llm, "_last_query_scores", lambda *args: attention.mean(dim=(1, 2)))
    (selection,) = method.select(ctx, [int(visual.sum())])
    if selection is None:
        return hidden, source
    assert isinstance(selection, LayerSelection)
    hidden = hidden.clone()
    columns = selection.keep
    if selection.merged is not None:
        hidden[0, selection.anchors] = selection.merged
        columns = torch.cat([columns, selection.anchors])
    text = torch.nonzero(~visual[0]).flatten()
    columns = torch.sort(torch.cat([text, columns])).values
    return hidden[:, columns], source[columns]


def _random_case(case: int):
    """A sequence [text, T frames of N tokens, text], hidden states whose same-place similarity across frames is
    spread around the 0.6 bound (varying by case), a cost and a depth."""
    g = torch.Generator().manual_seed(1000 + case)
    frames, n, d = 3 + case % 4, 6 + case % 5, 16
    prefix, suffix = 3, 4
    base = torch.randn(1, n, d, generator=g)
    noise = [0.2, 0.5, 0.9, 1.4][case % 4]
    video = base + noise * torch.randn(frames, n, d, generator=g)
    if case % 6 == 5:  # a nearly static clip: the first point ends everything (f >= s*)
        video = base + 0.05 * torch.randn(frames, n, d, generator=g)
    hidden = torch.cat([torch.randn(prefix, d, generator=g), video.reshape(-1, d),
                        torch.randn(suffix, d, generator=g)])[None]
    patch = torch.cat([torch.full((prefix,), -1), torch.arange(n).repeat(frames), torch.full((suffix,), -1)])
    depth = [28, 28, 12, 8][case % 4]
    cost = [0.3, 0.5, 0.45, 0.6, 0.7, 0.35][case % 6]
    return hidden, patch, prefix, frames * n, n, depth, cost, g


def _layer(hidden: torch.Tensor, point: int) -> torch.Tensor:
    """A deterministic row-wise update between two points (as a decoder layer would change the states)."""
    g = torch.Generator().manual_seed(point)
    weight = torch.randn(hidden.shape[-1], hidden.shape[-1], generator=g) / hidden.shape[-1] ** 0.5
    return hidden + 0.3 * torch.tanh(hidden @ weight)


def test_framefusion_matches_official_steps(monkeypatch):
    """24 random clips: at every merge/prune point the official module and vtprune keep the same tokens at the
    same original positions with the same states, record the same sparsities and stop at the same point; the
    cases cover every branch (merging over several points, the f >= s* top-k end, the attention pruning)."""
    branches = {"multi": 0, "topk": 0, "prune": 0}
    for case in range(RANDOM_CASES):
        hidden, patch, start, count, n, depth, cost, g = _random_case(case)
        q_len = hidden.shape[1]
        official = OfficialFrameFusion(patch, n, start, count, q_len, depth, cost=cost)
        method = build_method("framefusion", cost=cost)
        state = video_llm._FrameFusionState()
        source = torch.arange(q_len)
        visual_of = patch >= 0
        theirs, ours, tracker = hidden.clone(), hidden.clone(), torch.arange(q_len)
        pruned = False
        for point in range(depth):
            attention = torch.softmax(torch.randn(1, 4, 1, theirs.shape[1], generator=g), dim=-1)
            pruning_now = official.finish_merging and not official.finish_pruning
            theirs, tracker = official.forward(theirs, tracker, attention)
            ours, source = vtprune_point(method, state, point, ours, source, patch, visual_of, attention,
                                         monkeypatch, depth)
            pruned |= pruning_now
            assert torch.equal(source, tracker), (case, point)
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
            assert state.sparsities == pytest.approx(official.sparsity_list)
            assert (state.merging, state.pruning) == (not official.finish_merging, not official.finish_pruning)
            if official.finish_merging and official.finish_pruning:
                break
            theirs, ours = _layer(theirs, point), _layer(ours, point)
        branches["multi"] += len(official.sparsity_list) > 1
        branches["topk"] += official.finish_merging and not pruned
        branches["prune"] += pruned
    assert all(branches.values()), branches


def test_pruning_ratio_matches_official():
    for sparsities, cost, depth in [([], 0.3, 28), ([0.2], 0.3, 28), ([0.4, 0.15, 0.05], 0.25, 24), ([0.0], 0.6, 4),
                                    ([0.5], 0.9, 4)]:
        want = official_pruning_ratio(sparsities, cost, depth)
        assert framefusion_pruning_ratio(sparsities, cost, depth) == pytest.approx(want)


# ---------------------------------------------------------------------------------------------------------
# Known answers on the tiny video models
# ---------------------------------------------------------------------------------------------------------


def _static_clip(frames: int = 8) -> np.ndarray:
    """Every frame the same: every token has an identical predecessor at its place (cosine 1)."""
    return np.repeat(tiny_video(0, 1), frames, axis=0)


def _video_inputs(processor, clips, padding_side="left"):
    prompts = ["What is in this video?", "Describe the clip in detail please"][:len(clips)]
    return tiny_inputs(processor, [None] * len(clips), prompts, padding_side=padding_side, videos=list(clips))


@needs_video
@pytest.mark.parametrize("family", FAMILIES)
def test_static_clip_merges_every_place_into_its_first_frame(family, tiny_models):
    """A static clip of T frames (temporal groups) of 16 tokens at cost c: at layer 0 the (T−1)/T of the tokens
    that have an identical predecessor (< s* = 1 − c) all merge into frame 0's token of their place (16 merged
    tokens, nothing else left); layer 1 finds no predecessor (f = 0) and ends merging; layer 2 prunes
    p = 1 − (4c − 2/T) / (2/T) = 0.4 (T = 4, c = 0.2; T = 2 (Qwen3-VL samples 2 groups), c = 0.4): round(16 · 0.6)
    = 10 tokens of frame 0 stay."""
    model, processor = tiny_models[family]
    inputs = _video_inputs(processor, [_static_clip(4 if family == "llava_onevision" else 8)])
    frames = _layout(model, inputs).num_frames
    with vtprune.pruned(model, "framefusion", cost={4: 0.2, 2: 0.4}[frames]):
        model(**inputs)
        sample = vtprune.stats(model).samples[0]
    structural = 1 if family == "llava_onevision" else 0
    assert sample.visual_in == 16 * frames + structural
    assert [(s.layer, s.merged, s.visual_out) for s in sample.stages] == [(0, 16, 16), (2, 0, 10)]
    assert sample.stages[0].kept_positions.numel() == 0  # every remaining token is a merged one
    assert sample.visual_lengths == [16 + structural, 16 + structural, 10 + structural, 10 + structural]
    assert sample.frame_kept == [10] + [0] * (frames - 1)


def _layout(model, inputs):
    from vtprune.adapters.base import adapter_for

    return adapter_for(model).build_layouts(dict(inputs))[0].images[0]


@needs_video
def test_static_clip_merged_tokens_are_the_first_frame(tiny_models):
    """The merged tokens of a static clip are the means of identical states: the sequence entering layer 0 is
    the unpruned one with frames 1-3 removed (frame 0's tokens at their original positions)."""
    from reference_runs import capture_lm_calls

    model, processor = tiny_models["llava_onevision"]
    inputs = _video_inputs(processor, [_static_clip(4)])
    seen = []  # what layer 0's attention block receives (after every pre-hook of the layer)
    hook = model.model.language_model.layers[0].input_layernorm.register_forward_pre_hook(
        lambda module, args: seen.append(args[0].clone()))
    try:
        with capture_lm_calls(model) as calls:
            model(**inputs)
        with vtprune.pruned(model, "framefusion", cost=0.2):
            model(**inputs)
    finally:
        hook.remove()
    full, merged = seen[0][0], seen[1][0]  # [L, D] unpruned, [L - 48, D] merged
    video = torch.nonzero(inputs["input_ids"][0] == model.config.video_token_id).flatten()
    dropped = video[16:64]  # frames 1-3 (the trailing newline, video[64], stays)
    keep = torch.ones(full.shape[0], dtype=torch.bool)
    keep[dropped] = False
    torch.testing.assert_close(merged, full[keep], atol=1e-6, rtol=1e-6)
    assert calls and calls[0]["inputs_embeds"].shape[1] == full.shape[0]


# ---------------------------------------------------------------------------------------------------------
# Batches with merges, generation
# ---------------------------------------------------------------------------------------------------------


@needs_video
@pytest.mark.parametrize("positions", ["original", "compact"])
@pytest.mark.parametrize("family", FAMILIES)
def test_batch_with_merges_equals_alone(family, positions, tiny_models):
    """A padded batch of a static clip and a noisy one at cost 0.45: the static clip merges at layer 0 (4 frames:
    f = 0.75 >= s* = 0.55, the int(0.55 · 64) most similar tokens merge, ties by position, and everything ends;
    Qwen3-VL's 2 groups: f = 0.5 < s*, all merge, pruning at layer 2), the noisy one follows its own schedule
    (on Qwen nothing merges and layer 1 prunes; on OneVision some tokens merge at layer 0). The batch equals each clip alone: logits, stages and greedy tokens (Qwen3-VL: the
    merged tokens take their members' deepstack rows)."""
    model, processor = tiny_models[family]
    frames = 4 if family == "llava_onevision" else 8
    clips = [_static_clip(frames), tiny_video(1, frames)]
    prompts = ["What is in this video?", "Describe the clip in detail please"]
    alone = []
    with vtprune.pruned(model, "framefusion", positions=positions, cost=0.45):
        for b in range(2):
            single = tiny_inputs(processor, [None], [prompts[b]], videos=[clips[b]])
            logits = model(**single).logits[0]
            stages = vtprune.stats(model).samples[0].stages
            tokens = model.generate(**single, max_new_tokens=NEW_TOKENS, do_sample=False)
            alone.append((logits, tokens[0, single["input_ids"].shape[1]:].tolist(), stages))
        batch = _video_inputs(processor, clips)
        logits = model(**batch).logits
        stats = vtprune.stats(model)
        tokens = model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False)
    static, noisy = stats.samples[0].stages, stats.samples[1].stages
    assert static[0].layer == 0 and static[0].merged > 0 and noisy
    mask = batch["attention_mask"]
    for b, (ref, ref_tokens, ref_stages) in enumerate(alone):
        n = stats.samples[b].layer_lengths[-1]
        torch.testing.assert_close(logits[b, -n:], ref, atol=1e-4, rtol=0)
        first = int(torch.nonzero(mask[b]).min())
        got = [(s.layer, s.merged, (s.kept_positions - first).tolist()) for s in stats.samples[b].stages]
        assert got == [(s.layer, s.merged, s.kept_positions.tolist()) for s in ref_stages]
        new = tokens[b, batch["input_ids"].shape[1]:].tolist()
        assert new[:len(ref_tokens)] == ref_tokens


# ---------------------------------------------------------------------------------------------------------
# Budgets, options, images
# ---------------------------------------------------------------------------------------------------------


def _framefusion_stats(model, inputs, **kwargs):
    with vtprune.pruned(model, "framefusion", **kwargs):
        model(**inputs)
        return vtprune.stats(model).samples[0]


@needs_video
def test_budget_is_the_cost_and_an_int_budget_the_clips_equivalent_tokens(tiny_models):
    """A float budget is the cost (the layer average of the visual tokens, as a fraction); an int budget is the
    clip's equivalent tokens (cost = budget / visual tokens); ``cost`` overrides a budget with a warning. On a noisy
    Qwen2-VL clip nothing merges, so the only stage is layer 1's pruning to round(V·(1 − p))."""
    model, processor = tiny_models["qwen2_vl"]
    inputs = _video_inputs(processor, [tiny_video(0, 4)])
    visual = _framefusion_stats(model, inputs, budget=1.0).visual_in
    by_float = _framefusion_stats(model, inputs, budget=0.6)
    by_int = _framefusion_stats(model, inputs, budget=round(0.6 * visual))
    by_cost = _framefusion_stats(model, inputs, cost=0.6)
    p = framefusion_pruning_ratio([0.0], 0.6, 4)
    expected = [(1, round(visual * (1 - p)))]
    for sample in (by_float, by_int, by_cost):
        assert [(s.layer, s.visual_out) for s in sample.stages] == expected
    assert by_float.equivalent_tokens == pytest.approx((visual + 3 * expected[0][1]) / 4)
    with pytest.warns(vtprune.DegeneratePruningWarning, match="cost=0.6 overrides budget=0.3"):
        build_method("framefusion", budget=0.3, cost=0.6)


@needs_video
def test_unreachable_cost_is_a_budget_error(tiny_models):
    """Budget 0.2 on a 4-layer decoder with a clip where nothing merges: layer 0 already processes every visual
    token (one layer's worth of the 0.8 allowed is fine), merging ends, and the pruning step at layer 1 cannot meet
    the cost: the official code raises ValueError("The cost is too small"), vtprune a BudgetError naming the cost
    and the fix."""
    model, processor = tiny_models["qwen2_vl"]
    inputs = _video_inputs(processor, [tiny_video(0, 4)])
    reference = model(**inputs).logits
    with vtprune.pruned(model, "framefusion", budget=0.2):
        with pytest.raises(BudgetError, match=r"framefusion cost=0.2 cannot be met.*Raise the budget"):
            model(**inputs)
        with pytest.raises(BudgetError, match="cost=0.2"):  # the same again: the failed prefill left nothing behind
            model(**inputs)
    torch.testing.assert_close(model(**inputs).logits, reference, atol=0, rtol=0)  # removed: the plain model


@pytest.mark.parametrize("value", [0, 1.5, -0.1, "0.3", True])
def test_bad_cost_is_refused(value):
    with pytest.raises(vtprune.MethodOptionError, match="framefusion cost"):
        build_method("framefusion", cost=value)


def test_an_image_is_fastv_at_layer_1(tiny_models):
    """An image is a one-frame clip: nothing merges (no predecessor), merging ends at layer 0 with f = 0 and
    layer 1 prunes by the last token's attention in layer 0 — what FastV keeps with layer=1 and the same ratio."""
    model, processor = tiny_models["llava"]
    inputs = tiny_inputs(processor, [tiny_image(0)], ["describe the image please"])
    sample = _framefusion_stats(model, inputs, budget=0.6)
    p = framefusion_pruning_ratio([0.0], 0.6, len(model.model.language_model.layers))
    with vtprune.pruned(model, "fastv", layer=1, ratio=p):
        model(**inputs)
        fastv = vtprune.stats(model).samples[0]
    assert [s.layer for s in sample.stages] == [1] and sample.stages[0].merged == 0
    assert torch.equal(sample.stages[0].kept_positions, fastv.stages[0].kept_positions)


# ---------------------------------------------------------------------------------------------------------
# Side inputs (Qwen3-VL deepstack rows) of tokens merged inside the decoder
# ---------------------------------------------------------------------------------------------------------


def test_merged_tokens_take_the_weighted_side_rows_of_their_members():
    """The engine gives a token merged inside the decoder the selection's weights applied to the side rows of the
    tokens it merges; a merged token merged again composes (its recorded rows are the member's rows)."""
    from vtprune.engine.layer_stage import LayerRun, _merge_side_rows
    from vtprune.engine.session import _SideInputs

    g = torch.Generator().manual_seed(7)
    length, d = 10, 5
    mask = torch.zeros(1, length, dtype=torch.bool)
    mask[0, 2:8] = True  # six visual positions 2..7
    rows = [torch.randn(6, d, generator=g), torch.randn(6, d, generator=g)]
    side = _SideInputs(mask=mask, rows=rows, merged=[None])
    run = LayerRun(method=build_method("framefusion"), schedules=[[]], source=[torch.arange(length)],
                   visual=[mask[0].clone()], merged=[torch.zeros(length, dtype=torch.bool)], pad_left=True,
                   structural=[0], side=side)
    cols = torch.arange(length)
    # merge visual tokens 1 and 4 (positions 3, 6) into token 1 (position 3)
    weights = torch.zeros(1, 6)
    weights[0, [1, 4]] = 0.5
    _merge_side_rows(run, 0, cols, LayerSelection(keep=torch.tensor([2, 4, 5, 7]), merged=torch.zeros(1, d),
                                                   anchors=torch.tensor([3]), replaces=True, weights=weights))
    first = [(r[1] + r[4]) / 2 for r in rows]
    assert side.merged[0].anchors.tolist() == [3]
    for point in range(2):
        torch.testing.assert_close(side.merged[0].rows[point][0], first[point])
    # the engine's bookkeeping after that merge: position 6 gone, position 3 a merged token
    keep = torch.tensor([0, 1, 2, 3, 4, 5, 7, 8, 9])
    run.source[0], run.visual[0] = run.source[0][keep], mask[0][keep]
    run.merged[0] = torch.isin(run.source[0], torch.tensor([3]))
    cols = torch.arange(keep.numel())
    # merge visual tokens 0 and 1 (positions 2 and the merged 3) into position 2
    weights = torch.zeros(1, 5)
    weights[0, [0, 1]] = 0.5
    _merge_side_rows(run, 0, cols, LayerSelection(keep=torch.tensor([4, 5, 6]), merged=torch.zeros(1, d),
                                                   anchors=torch.tensor([2]), replaces=True, weights=weights))
    assert side.merged[0].anchors.tolist() == [2, 3]
    for point in range(2):
        torch.testing.assert_close(side.merged[0].rows[point][0], (rows[point][0] + first[point]) / 2)
