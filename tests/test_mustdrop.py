"""MustDrop (``mustdrop``): its pure core (known answers), fidelity to LightCompress's computation on identical
inputs, the tiny-model end-to-end sequence, and its option / budget refusals. The registry-driven invariant
files (test_invariants.py, test_mrope.py, test_video.py, ...) cover it with ``-k mustdrop``."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from reference_runs import capture_lm_calls

import vtprune
from vtprune.errors import BudgetError, MethodOptionError
from vtprune.selectors.mustdrop import mustdrop_merge, threshold_windows, window_scores, windows_for_budget
from vtprune.testing import tiny_image, tiny_inputs

PROMPT = "Describe the image."


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


# ---------------------------------------------------------------------------------------------------------
# Known answers of the core
# ---------------------------------------------------------------------------------------------------------


def test_identical_window_merges_first_into_its_mean():
    torch.manual_seed(0)
    features = torch.randn(36, 16)  # a 6 x 6 grid, four 3x3 windows
    block = [r * 6 + c for r in range(3, 6) for c in range(3)]  # the bottom-left window
    features[block] = torch.randn(16) + 0.01 * torch.randn(9, 16)
    windows, scores = window_scores(features, 6, 6, (3, 3))
    assert windows.tolist()[2] == block and windows.shape == (4, 9)
    assert int(scores.argmax()) == 2 and scores[2] > 0.99
    result = mustdrop_merge(features, windows, scores, windows_for_budget(36, 28, (3, 3)))
    assert result.windows.tolist() == [block] and result.dst.tolist() == [block[-1]]
    assert result.keep.tolist() == [i for i in range(36) if i not in block]
    torch.testing.assert_close(result.merged[0], features[block].mean(0))
    torch.testing.assert_close(result.weights @ features, result.merged)


def test_window_score_is_the_mean_off_diagonal_cosine():
    v = torch.tensor([1.0, 0.0])
    features = torch.stack([v, -v, v, -v])  # one 2x2 window: pairs (0,1) (0,3) (1,2) (2,3) at -1, (0,2) (1,3) at +1
    _, scores = window_scores(features, 2, 2, (2, 2))
    assert scores.tolist() == pytest.approx([(2 * 1 - 4 * 1) * 2 / 12])


def test_budget_rounds_up_and_matches_lightcompress_at_the_paper_budgets():
    for k in (64, 128, 192):  # LightCompress: (577 - k) // 8 (vtoken_length counts [CLS])
        assert windows_for_budget(576, k, (3, 3)) == (577 - k) // 8
    assert windows_for_budget(576, 100, (3, 3)) == 60  # 96 kept, never more than the budget
    assert windows_for_budget(576, 576, (3, 3)) == 0 and windows_for_budget(576, 1000, (3, 3)) == 0


def test_partial_windows_stay_unmerged():
    features = torch.ones(8 * 8, 4)  # every window scores 1
    windows, scores = window_scores(features, 8, 8, (3, 3))
    assert windows.shape == (4, 9) and threshold_windows(scores, 0.6) == 4
    result = mustdrop_merge(features, windows, scores, 4)
    assert result.keep.numel() == 64 - 36 and all(i % 8 >= 6 or i // 8 >= 6 for i in result.keep.tolist())


# ---------------------------------------------------------------------------------------------------------
# Fidelity: a literal transcription of LightCompress's computation
# ---------------------------------------------------------------------------------------------------------


def official_mustdrop(x: torch.Tensor, threshold: float, window: tuple[int, int], retained: int | None):
    """ModelTC/LightCompress @ 9701d035 ``llmc/compression/token_reduction/mustdrop.py`` L28-227:
    ``spatial_merge_hook`` (``fix_r = (vtoken_length - retained_tokens) // (w - 1)`` with ``vtoken_length``
    counting [CLS]), ``conditional_pooling`` (window cosine similarity, top-r windows, src = the first w - 1
    tokens of a window, dst = its last, ``unm`` sorted) and ``merge_wavg`` (size-weighted sums, divided by the
    summed sizes), batch of one. ``x`` [1, 1 + N, C]. Returns (the merged sequence [1, 1 + N', C] as LLaVA-1.5
    receives it, the LLaVA-NeXT ``index_masks`` [1, N])."""
    ws_h, ws_w = window
    nw = ws_h * ws_w
    fix_r = 0 if retained is None else (x.shape[1] - retained) // (nw - 1)
    feat = x[:, 1:, :]
    b, n, c = feat.shape
    side = int(math.sqrt(n))
    grid = feat.reshape(b, side, side, c).permute(0, 3, 1, 2)  # b c h w
    gh, gw = side // ws_h, side // ws_w
    tiles = grid.reshape(b, c, gh, ws_h, gw, ws_w).permute(0, 2, 4, 1, 3, 5).reshape(b, gh, gw, c, nw)
    sims = F.cosine_similarity(tiles.unsqueeze(-1), tiles.unsqueeze(-2), dim=3)
    sims = sims * (1 - torch.eye(nw))
    similarity_map = (sims.sum(-1).sum(-1) / (nw * (nw - 1))).reshape(b, gh * gw)
    r = int(torch.ge(similarity_map, torch.tensor(threshold).repeat(1, gh * gw)).sum(dim=1).min())
    if fix_r != 0:
        r = fix_r
    _, idx = similarity_map.topk(r, dim=-1)
    index = torch.arange(n).reshape(side, side).unsqueeze(0)
    windowed = index.unfold(1, ws_h, ws_h).unfold(2, ws_w, ws_w).reshape(b, -1, nw)
    gathered = torch.gather(windowed, 1, idx.unsqueeze(-1).expand(-1, -1, nw))
    mask = torch.ones(b, windowed.shape[1], dtype=torch.bool)
    mask.scatter_(1, idx, torch.zeros_like(idx, dtype=torch.bool))
    unm_idx = windowed[mask.unsqueeze(-1).expand(-1, -1, nw)].reshape(b, -1).sort(dim=-1).values.unsqueeze(-1)
    src_idx = gathered[:, :, : nw - 1].reshape(b, -1).unsqueeze(-1)
    dst_idx = gathered[:, :, nw - 1].reshape(b, -1).unsqueeze(-1)
    merge_idx = torch.arange(r).repeat_interleave(nw - 1).repeat(b, 1).unsqueeze(-1)

    def merge(t):
        cls, body = t[:, :1], t[:, 1:]
        d = body.shape[-1]
        src = body.gather(1, src_idx.expand(b, r * (nw - 1), d))
        dst = body.gather(1, dst_idx.expand(b, r, d))
        unm = body.gather(1, unm_idx.expand(b, n - r * nw, d))
        dst = dst.scatter_reduce(1, merge_idx.expand(b, r * (nw - 1), d), src, reduce="sum")
        return torch.cat([cls, dst, unm], dim=1)

    size = torch.ones_like(x[..., 0, None])
    merged = merge(x * size) / merge(size)
    masks = torch.zeros(b, n, dtype=torch.bool)
    masks.scatter_(1, dst_idx.view(b, -1), True)
    masks.scatter_(1, unm_idx.view(b, -1), True)
    return merged, masks


def _structured(seed: int, side: int, c: int = 32) -> torch.Tensor:
    """[1, 1 + side², C]: smooth regions (similar neighbours, varied per window) plus noise, and a [CLS] row."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(4, c, generator=g)
    rows = torch.linspace(0, 1, side).view(side, 1, 1)
    cols = torch.linspace(0, 1, side).view(1, side, 1)
    field = (1 - rows) * (1 - cols) * base[0] + rows * base[1] + cols * base[2] + rows * cols * base[3]
    noise = torch.rand(side, side, 1, generator=g) * torch.randn(side, side, c, generator=g)
    patches = (field + noise).reshape(1, side * side, c)
    return torch.cat([torch.randn(1, 1, c, generator=g), patches], dim=1)


def _vtprune(x: torch.Tensor, side: int, window, retained, threshold):
    feats = x[0, 1:]
    windows, scores = window_scores(feats, side, side, window)
    r = threshold_windows(scores, threshold) if retained is None else windows_for_budget(side * side, retained, window)
    return mustdrop_merge(feats, windows, scores, r)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("retained", [64, 128, 192, None])
def test_fidelity_clip_l_grid(seed, retained):
    """24 x 24 CLIP-L grid, 3x3 windows, the paper's budgets and the adaptive threshold count."""
    x = _structured(seed, 24)
    official, masks = official_mustdrop(x, 0.6, (3, 3), retained)
    ours = _vtprune(x, 24, (3, 3), retained, 0.6)
    sequence = torch.cat([ours.merged, x[0, 1:][ours.keep]])  # LLaVA-1.5: merged tokens first, then the rest
    assert sequence.shape == official[0, 1:].shape
    torch.testing.assert_close(sequence, official[0, 1:], rtol=1e-5, atol=1e-6)
    kept = torch.zeros(576, dtype=torch.bool)
    kept[torch.cat([ours.keep, ours.dst])] = True
    assert torch.equal(kept, masks[0])  # LLaVA-NeXT: the same tokens dropped


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("retained", [16, 30, 40])
def test_fidelity_small_grid_2x2_windows(seed, retained):
    x = _structured(100 + seed, 8, 8)
    official, masks = official_mustdrop(x, 0.6, (2, 2), retained)
    ours = _vtprune(x, 8, (2, 2), retained, 0.6)
    if (64 - retained) % 3 == 0:  # where the official (N + 1 - k) // 3 and ceil((N - k) / 3) agree
        torch.testing.assert_close(torch.cat([ours.merged, x[0, 1:][ours.keep]]), official[0, 1:],
                                   rtol=1e-5, atol=1e-6)
    else:  # official keeps one more window unmerged (more than the budget); vtprune stays within it
        assert ours.keep.numel() + ours.merged.shape[0] <= retained < official.shape[1] - 1


# ---------------------------------------------------------------------------------------------------------
# End to end on the tiny LLaVA (8 x 8 grid: 2x2 windows divide it, as the official code requires)
# ---------------------------------------------------------------------------------------------------------


def _llava(tiny_models, image_seed):
    model, processor = tiny_models["llava"]
    inputs = tiny_inputs(processor, [tiny_image(image_seed)], [PROMPT])
    positions = torch.nonzero(inputs["input_ids"][0] == model.config.image_token_id).flatten()
    out = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True)
    return model, inputs, positions, out.hidden_states[model.config.vision_feature_layer]  # [1, 1 + 64, C]


@pytest.mark.parametrize("image_seed", [0, 3])
@pytest.mark.parametrize("budget", [16, 40])
def test_tiny_llava_sequence_is_the_official_one(tiny_models, image_seed, budget):
    model, inputs, positions, hidden = _llava(tiny_models, image_seed)
    official, _ = official_mustdrop(hidden, 0.6, (2, 2), budget)
    with capture_lm_calls(model) as calls:
        model(**inputs)
    unpruned = calls[-1]["inputs_embeds"][0]
    with vtprune.pruned(model, "mustdrop", budget, window_size=(2, 2)), capture_lm_calls(model) as calls:
        model(**inputs)
        stage = vtprune.stats(model).samples[0].stages[0]
    first, last = int(positions[0]), int(positions[-1])
    expected = torch.cat([unpruned[:first], model.model.multi_modal_projector(official[:, 1:])[0],
                          unpruned[last + 1:]])
    embeds = calls[-1]["inputs_embeds"][0]
    assert stage.merged == (64 - budget) // 3 and embeds.shape == expected.shape
    torch.testing.assert_close(embeds, expected, rtol=1e-4, atol=1e-5)


def test_tiny_llava_drop_mode_keeps_the_official_index_mask(tiny_models):
    model, inputs, positions, hidden = _llava(tiny_models, 1)
    _, masks = official_mustdrop(hidden, 0.6, (2, 2), 28)
    with vtprune.pruned(model, "mustdrop", 28, window_size=(2, 2), merge=False):
        model(**inputs)
        stage = vtprune.stats(model).samples[0].stages[0]
    assert stage.merged == 0 and torch.equal(stage.kept_positions, positions[masks[0]])


def test_original_positions_put_each_window_at_its_destination(tiny_models):
    model, inputs, positions, hidden = _llava(tiny_models, 0)
    ours = _vtprune(hidden, 8, (2, 2), 40, 0.6)
    with vtprune.pruned(model, "mustdrop", 40, window_size=(2, 2), positions="original"):
        model(**inputs)
        stage = vtprune.stats(model).samples[0].stages[0]
    assert stage.merged == 8
    assert torch.equal(stage.kept_positions, positions[ours.keep])


# ---------------------------------------------------------------------------------------------------------
# Options, budgets, refusals
# ---------------------------------------------------------------------------------------------------------


def test_options_and_unreachable_budgets_are_refused(tiny_models):
    model, processor = tiny_models["llava"]
    for bad in ({"window_size": (1, 1)}, {"window_size": 3}, {"spatial_threshold": 2.0}, {"merge": "yes"}):
        with pytest.raises(MethodOptionError):
            vtprune.apply(model, "mustdrop", 40, **bad)
        assert not vtprune.is_pruned(model)
    with pytest.raises(BudgetError, match="leaves 32; raise the budget to at least 32"):
        vtprune.apply(model, "mustdrop", 16)  # 8 x 8 grid: four full 3x3 windows
    assert not vtprune.is_pruned(model)
    info = vtprune.methods()["mustdrop"]
    assert info.defaults == {"spatial_threshold": 0.6, "window_size": (3, 3), "merge": None, "prefill": True,
                             "prefill_layers": None, "global_thr": 0.001, "individual_thr": 0.001, "key_ratio": 0.08,
                             "cut_cache": True}
    assert info.stage == "pre-llm" and info.positions == "compact" and info.default_budget is None


def test_adaptive_default_merges_the_windows_above_the_threshold(tiny_models):
    model, inputs, positions, hidden = _llava(tiny_models, 2)
    windows, scores = window_scores(hidden[0, 1:], 8, 8, (2, 2))
    threshold = float(scores.sort().values[8])  # 8 of the 16 windows at or above it
    with vtprune.pruned(model, "mustdrop", window_size=(2, 2), spatial_threshold=threshold):
        model(**inputs)
        stage = vtprune.stats(model).samples[0].stages[0]
    assert stage.merged == threshold_windows(scores, threshold) == 8
    assert stage.kept_positions.numel() == 64 - 8 * 4
