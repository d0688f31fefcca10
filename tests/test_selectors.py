"""Known-answer tests for the pure selector cores (vtprune.selectors)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from vtprune.selectors import (
    DROPPED,
    cls_attention_scores,
    cluster_means,
    dart_select,
    divprune_select,
    dpc_knn,
    mean_received_attention,
    pairwise_cosine_distance,
    pick_pivots,
    pool_grid,
    random_select,
    select_raters,
    softmax_attention_rows,
    split_visionzip_budget,
    topk_select,
    uniform_grid_select,
    visionzip_select,
)


def _assert_index_tensor(idx: torch.Tensor, k: int, n: int) -> None:
    assert idx.dtype == torch.long
    assert idx.shape == (k,)
    assert torch.unique(idx).numel() == k
    assert torch.equal(idx, torch.sort(idx).values)
    if k:
        assert int(idx.min()) >= 0 and int(idx.max()) < n


# --------------------------------------------------------------------------------------------- random


def test_random_select_deterministic_and_seed_dependent():
    a = random_select(576, 64, seed=0)
    b = random_select(576, 64, seed=0)
    c = random_select(576, 64, seed=1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    _assert_index_tensor(a, 64, 576)
    _assert_index_tensor(c, 64, 576)


def test_random_select_does_not_touch_global_rng():
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    random_select(100, 10, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    random_select(100, 10, seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_random_select_edges_and_errors():
    assert torch.equal(random_select(5, 5, seed=3), torch.arange(5))
    assert random_select(5, 0, seed=3).shape == (0,)
    with pytest.raises(ValueError, match=r"\[0, 5\]"):
        random_select(5, 6, seed=0)
    with pytest.raises(ValueError, match=r"\[0, 5\]"):
        random_select(5, -1, seed=0)
    with pytest.raises(ValueError):
        random_select(-1, 0, seed=0)


# -------------------------------------------------------------------------------------------- uniform


def test_uniform_full_grid_returns_all():
    assert torch.equal(uniform_grid_select(3, 5, 15), torch.arange(15))


def test_uniform_4x4_k4_is_evenly_spaced_lattice():
    # rows/cols holding the centres of two equal bands of [0, 4): 1 and 3 -> {5, 7, 13, 15}
    assert uniform_grid_select(4, 4, 4).tolist() == [5, 7, 13, 15]
    # 24x24 with 64 tokens: an 8x8 lattice at rows/cols 1, 4, 7, ..., 22
    keep = uniform_grid_select(24, 24, 64)
    coords = sorted({int(i) // 24 for i in keep})
    assert coords == [1 + 3 * i for i in range(8)]
    assert sorted({int(i) % 24 for i in keep}) == coords


def test_uniform_exact_count_and_uniqueness_many_shapes():
    for h, w in itertools.product(range(1, 8), repeat=2):
        for k in range(h * w + 1):
            keep = uniform_grid_select(h, w, k)
            _assert_index_tensor(keep, k, h * w)
    for h, w, k in [(24, 24, 192), (24, 24, 128), (34, 46, 300), (27, 27, 100), (1, 50, 7), (50, 1, 7)]:
        _assert_index_tensor(uniform_grid_select(h, w, k), k, h * w)


def test_uniform_spread_over_quadrants():
    keep = uniform_grid_select(8, 8, 16)
    rows, cols = keep // 8, keep % 8
    for top, left in itertools.product((True, False), repeat=2):
        in_quadrant = ((rows < 4) == top) & ((cols < 4) == left)
        assert int(in_quadrant.sum()) == 4
    # a non-square budget still reaches every 4x4 quadrant of a 16x16 grid
    keep = uniform_grid_select(16, 16, 30)
    quadrants = {(int(i) // 16 // 8, int(i) % 16 // 8) for i in keep}
    assert quadrants == {(0, 0), (0, 1), (1, 0), (1, 1)}


def test_uniform_errors():
    with pytest.raises(ValueError, match=r"\[0, 16\]"):
        uniform_grid_select(4, 4, 17)
    with pytest.raises(ValueError):
        uniform_grid_select(0, 4, 0)


# ----------------------------------------------------------------------------------------------- pool


def test_pool_4x4_to_2x2_block_means():
    feats = torch.stack([torch.arange(16.0), 10 * torch.arange(16.0)], dim=1)  # [16, 2]
    out = pool_grid(feats, 4, 4, 4)
    assert out.grid == (2, 2)
    expected_first = torch.tensor([2.5, 4.5, 10.5, 12.5])  # means of {0,1,4,5}, {2,3,6,7}, ...
    assert torch.equal(out.tokens, torch.stack([expected_first, 10 * expected_first], dim=1))
    assert out.anchors.tolist() == [0, 2, 8, 10]
    assert out.assignment.tolist() == [0, 0, 1, 1, 0, 0, 1, 1, 2, 2, 3, 3, 2, 2, 3, 3]
    assert out.anchors.dtype == torch.long and out.assignment.dtype == torch.long


def test_pool_non_divisible_windows_cover_once():
    h, w = 5, 7
    feats = torch.randn(h * w, 3, generator=torch.Generator().manual_seed(0))
    out = pool_grid(feats, h, w, 6)
    ph, pw = out.grid
    assert ph * pw <= 6 and ph <= h and pw <= w
    assert out.grid == (2, 3)  # closest to the 5:7 aspect with 6 cells
    m = ph * pw
    counts = torch.bincount(out.assignment, minlength=m)
    assert int(counts.sum()) == h * w and int(counts.min()) >= 1  # every token in exactly one window
    assert set(counts.tolist()) <= {2 * 2, 2 * 3, 3 * 2, 3 * 3}  # band sizes 2|3 rows x 2|3 cols
    for j in range(m):
        members = torch.nonzero(out.assignment == j).squeeze(1)
        assert int(members[0]) == int(out.anchors[j])  # anchor = top-left = first in raster order
        torch.testing.assert_close(out.tokens[j], feats[members].mean(0))
        r, c = members // w, members % w  # window is a full rectangle
        assert members.numel() == (int(r.max() - r.min()) + 1) * (int(c.max() - c.min()) + 1)
    assert torch.equal(out.anchors, torch.sort(out.anchors).values)
    # raster order of the output grid: window rows/cols increase with the output index
    rows_of = out.anchors // w
    cols_of = out.anchors % w
    assert torch.equal(rows_of.view(ph, pw)[:, 0], torch.sort(rows_of.view(ph, pw)[:, 0]).values)
    assert torch.equal(cols_of.view(ph, pw)[0], torch.sort(cols_of.view(ph, pw)[0]).values)


def test_pool_dtype_full_and_errors():
    feats = torch.randn(12, 4).to(torch.bfloat16)
    out = pool_grid(feats, 3, 4, 12)
    assert out.tokens.dtype == torch.bfloat16
    assert torch.equal(out.tokens, feats)
    assert torch.equal(out.assignment, torch.arange(12))
    assert pool_grid(feats, 3, 4, 1).tokens.shape == (1, 4)
    with pytest.raises(ValueError, match=r"\[1, 12\]"):
        pool_grid(feats, 3, 4, 0)
    with pytest.raises(ValueError):
        pool_grid(feats, 4, 4, 4)


# ---------------------------------------------------------------------------------------- attention


def _naive_probs(q, k, scale, mask=None):
    logits = q.float() @ k.float().transpose(-1, -2) * scale
    if mask is not None:
        logits = logits.masked_fill(mask, float("-inf"))
    return torch.softmax(logits, dim=-1)


def test_cls_attention_aligned_keys_win():
    # one head, dh = 2: CLS query points along +x; keys 2 and 4 are aligned, the rest orthogonal/opposed
    cls_q = torch.tensor([[4.0, 0.0]])
    keys = torch.tensor([[[0.0, 1.0], [-1.0, 0.0], [1.0, 0.0], [0.0, -1.0], [1.0, 0.0], [0.0, 1.0]]])
    scores = cls_attention_scores(cls_q, keys)
    assert scores.dtype == torch.float32 and scores.shape == (6,)
    torch.testing.assert_close(scores.sum(), torch.tensor(1.0))
    assert topk_select(scores, 2).tolist() == [2, 4]
    # exact value: logits 4/sqrt(2)*x  ->  aligned keys get e^a / (2 e^a + 3 + e^-a)
    a = 4.0 / math.sqrt(2.0)
    expected = math.exp(a) / (2 * math.exp(a) + 3 + math.exp(-a))
    assert abs(float(scores[2]) - expected) < 1e-6
    # mean over heads: a second head looking along -x gives key 1 e^a / (e^a + 3 + 2 e^-a)
    cls_q2 = torch.tensor([[4.0, 0.0], [-4.0, 0.0]])
    scores2 = cls_attention_scores(cls_q2, keys.expand(2, -1, -1))
    head1_key1 = math.exp(-a) / (2 * math.exp(a) + 3 + math.exp(-a))
    head2_key1 = math.exp(a) / (math.exp(a) + 3 + 2 * math.exp(-a))
    assert abs(float(scores2[1]) - 0.5 * (head1_key1 + head2_key1)) < 1e-6
    assert topk_select(scores2, 1).tolist() == [1]


def test_softmax_attention_rows_matches_direct():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(4, 7, 16, generator=g)
    k = torch.randn(4, 50, 16, generator=g)
    ref = _naive_probs(q, k, 16**-0.5)
    for chunk in (1, 3, 1024):
        out = softmax_attention_rows(q, k, chunk_size=chunk)
        assert out.shape == (4, 7, 50) and out.dtype == torch.float32
        assert (out - ref).abs().max() <= 1e-6
    out = softmax_attention_rows(q, k, scale=0.3)
    assert (out - _naive_probs(q, k, 0.3)).abs().max() <= 1e-6
    mask = torch.zeros(50, dtype=torch.bool)
    mask[[0, 5, 49]] = True
    out = softmax_attention_rows(q, k, key_padding_mask=mask, chunk_size=2)
    assert (out - _naive_probs(q, k, 16**-0.5, mask)).abs().max() <= 1e-6
    assert torch.all(out[..., mask] == 0)
    torch.testing.assert_close(out.sum(-1), torch.ones(4, 7))


def test_softmax_attention_rows_low_precision_and_errors():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 3, 8, generator=g).to(torch.bfloat16)
    k = torch.randn(2, 9, 8, generator=g).to(torch.float16)
    out = softmax_attention_rows(q, k)
    assert out.dtype == torch.float32
    assert (out - _naive_probs(q, k, 8**-0.5)).abs().max() <= 1e-6
    with pytest.raises(ValueError):
        softmax_attention_rows(q, k[:, :, :4])
    with pytest.raises(ValueError):
        softmax_attention_rows(q, k, key_padding_mask=torch.zeros(8, dtype=torch.bool))
    with pytest.raises(ValueError):
        softmax_attention_rows(q, k, key_padding_mask=torch.ones(9, dtype=torch.bool))


def test_mean_received_attention_matches_full_matrix():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(3, 37, 8, generator=g)
    k = torch.randn(3, 37, 8, generator=g)
    ref = _naive_probs(q, k, 8**-0.5).mean(dim=(0, 1))
    for chunk in (1, 5, 36, 37, 256):
        out = mean_received_attention(q, k, chunk_size=chunk)
        assert out.shape == (37,) and out.dtype == torch.float32
        assert (out - ref).abs().max() <= 1e-6
    torch.testing.assert_close(out.sum(), torch.tensor(1.0))
    with pytest.raises(ValueError):
        mean_received_attention(q, k, chunk_size=0)


def test_topk_select_order_and_ties():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.9, 0.2, 0.5, 0.9])
    assert topk_select(scores, 2).tolist() == [1, 3]  # three-way tie at 0.9: lowest indices win
    assert topk_select(scores, 3).tolist() == [1, 3, 6]
    assert topk_select(scores, 4).tolist() == [1, 2, 3, 6]  # tie at 0.5: index 2 before 5
    assert topk_select(torch.zeros(5), 3).tolist() == [0, 1, 2]
    keep = topk_select(torch.tensor([3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0]).to(torch.bfloat16), 3)
    assert keep.tolist() == [4, 5, 7] and keep.dtype == torch.long
    assert topk_select(scores, 0).shape == (0,)
    with pytest.raises(ValueError, match=r"\[0, 7\]"):
        topk_select(scores, 8)
    with pytest.raises(ValueError):
        topk_select(torch.tensor([1.0, float("nan")]), 1)


# ---------------------------------------------------------------------------------------- visionzip


def _visionzip_grid():
    # 4x4 grid, token i has hidden [i, 1]. Dominant by score: 0, 5, 10, 15.
    n = 16
    hidden = torch.stack([torch.arange(n, dtype=torch.float32), torch.ones(n)], dim=1)
    scores = torch.zeros(n)
    scores[[0, 5, 10, 15]] = torch.tensor([4.0, 3.0, 2.0, 1.0])
    # keys: group A ~ +x (tokens 1,2,3,4,6), group B ~ +y (tokens 7,8,9,11,12,13,14)
    keys = torch.zeros(n, 3)
    for i in (1, 2, 3, 4, 6):
        keys[i] = torch.tensor([2.0 + i, 0.1 * i, 0.0])
    for i in (7, 8, 9, 11, 12, 13, 14):
        keys[i] = torch.tensor([0.1 * i, 1.0 + i, 0.0])
    keys[[0, 5, 10, 15]] = torch.tensor([0.0, 0.0, 1.0])  # dominant keys irrelevant to the merge
    return hidden, keys, scores


def test_visionzip_known_answer():
    hidden, keys, scores = _visionzip_grid()
    res = visionzip_select(hidden, keys, scores, dominant=4, contextual=2)
    assert res.keep.tolist() == [0, 5, 10, 15]
    # remaining = [1,2,3,4,6,7,8,9,11,12,13,14], R = 12, step = 6 -> positions 0, 6 -> tokens 1 and 8
    assert res.anchors.tolist() == [1, 8]
    assert res.assignment.tolist() == [-1, 0, 0, 0, 0, -1, 0, 1, 1, 1, -1, 1, 1, 1, 1, -1]
    # target 1 absorbs {2,3,4,6}: [1 + 15/4, 1 + 1]; target 8 absorbs {7,9,11,12,13,14}: [8 + 66/6, 2]
    assert torch.equal(res.merged, torch.tensor([[4.75, 2.0], [19.0, 2.0]]))


def test_visionzip_empty_target_and_dtype():
    hidden, keys, scores = _visionzip_grid()
    # three targets: step = 12 // 3 = 4 -> positions 0, 4, 8 -> tokens 1, 6, 11. Token 6's key points
    # along z, so nothing is merged into it; +x tokens {2,3,4} go to 1, +y tokens to 11.
    keys[6] = torch.tensor([0.0, 0.0, 1.0])
    res = visionzip_select(hidden.to(torch.bfloat16), keys.half(), scores, dominant=4, contextual=3)
    assert res.keep.tolist() == [0, 5, 10, 15]
    assert res.anchors.tolist() == [1, 6, 11]
    assert res.assignment.tolist() == [-1, 0, 0, 0, 0, -1, 1, 2, 2, 2, -1, 2, 2, 2, 2, -1]
    assert res.merged.dtype == torch.bfloat16
    expected = torch.tensor([[1 + 9 / 3, 2.0], [6.0, 1.0], [11 + 63 / 6, 2.0]])  # target 6 unchanged
    assert torch.equal(res.merged.float(), expected)


def test_visionzip_degenerate_budgets():
    hidden, keys, scores = _visionzip_grid()
    res = visionzip_select(hidden, keys, scores, dominant=10, contextual=6)  # covers all 16
    assert torch.equal(res.keep, torch.arange(16))
    assert res.merged.shape == (0, 2) and res.anchors.shape == (0,)
    assert torch.all(res.assignment == -1)
    res = visionzip_select(hidden, keys, scores, dominant=2, contextual=0)
    assert res.keep.tolist() == [0, 5] and res.merged.shape == (0, 2)
    assert int((res.assignment == -1).sum()) == 2 and int((res.assignment == DROPPED).sum()) == 14
    res = visionzip_select(hidden, keys, scores, dominant=0, contextual=2)
    assert res.keep.shape == (0,)
    # remaining = all 16, step = 8 -> targets 0 and 8
    assert res.anchors.tolist() == [0, 8]
    assert bool((res.assignment >= 0).all())
    with pytest.raises(ValueError):
        visionzip_select(hidden, keys, scores, dominant=-1, contextual=2)
    with pytest.raises(ValueError):
        visionzip_select(hidden, keys[:5], scores, dominant=1, contextual=2)


def test_split_visionzip_budget():
    assert split_visionzip_budget(64) == (54, 10)
    assert split_visionzip_budget(128) == (108, 20)
    assert split_visionzip_budget(192) == (162, 30)
    assert split_visionzip_budget(0) == (0, 0)
    assert split_visionzip_budget(1) == (1, 0)
    assert split_visionzip_budget(2) == (1, 1)
    for b in range(2, 600):
        d, c = split_visionzip_budget(b)
        assert d + c == b and c >= 1 and d >= 0
    assert split_visionzip_budget(10, dominant_ratio=0.25) == (3, 7)  # 2.5 rounds half up
    with pytest.raises(ValueError):
        split_visionzip_budget(-1)
    with pytest.raises(ValueError):
        split_visionzip_budget(64, dominant_ratio=1.5)


# ----------------------------------------------------------------------------------------- divprune


def _naive_greedy(dist: torch.Tensor, k: int) -> list[int]:
    """Reference O(k^2 N) greedy: recompute the min over the selected set every step."""
    n = dist.shape[0]
    off_diag = dist + torch.diag(torch.full((n,), float("inf")))
    selected = [int(torch.argmax(off_diag.min(dim=1).values))]
    while len(selected) < k:
        scores = dist[selected].min(dim=0).values.clone()
        scores[selected] = float("-inf")
        selected.append(int(torch.argmax(scores)))
    return sorted(selected)


def _min_pairwise(dist: torch.Tensor, subset) -> float:
    return min(float(dist[i, j]) for i, j in itertools.combinations(subset, 2))


def _unit2(deg: float) -> list[float]:
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def test_pairwise_cosine_distance():
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0], [1.0, 1.0]])
    d = pairwise_cosine_distance(x)
    s = 1 - 1 / math.sqrt(2)
    expected = torch.tensor(
        [[0, 1, 2, s], [1, 0, 1, s], [2, 1, 0, 1 + 1 / math.sqrt(2)], [s, s, 1 + 1 / math.sqrt(2), 0]]
    )
    torch.testing.assert_close(d, expected.float())
    assert d.dtype == torch.float32 and torch.equal(torch.diagonal(d), torch.zeros(4))


def test_divprune_2d_known_answer():
    # angles 0, 10, 20, 180 degrees: 180 is the most isolated, 0 is farthest from it, then 20
    x = torch.tensor([_unit2(0), _unit2(10), _unit2(20), _unit2(180)])
    assert divprune_select(x, 1).tolist() == [3]
    assert divprune_select(x, 2).tolist() == [0, 3]
    assert divprune_select(x, 3).tolist() == [0, 2, 3]
    assert divprune_select(x, 4).tolist() == [0, 1, 2, 3]
    assert divprune_select(x, 0).shape == (0,)
    with pytest.raises(ValueError, match=r"\[0, 4\]"):
        divprune_select(x, 5)


def test_divprune_never_picks_near_duplicates():
    # three clusters of near-duplicates around the 3-D axes (plus the -x axis); scale varies
    base = torch.eye(3)
    clusters = [base[0], base[1], base[2], -base[0]]
    g = torch.Generator().manual_seed(0)
    pts, label = [], []
    for c, centre in enumerate(clusters):
        for _ in range(3):
            pts.append((centre + 0.01 * torch.randn(3, generator=g)) * (1 + 5 * torch.rand(1, generator=g)))
            label.append(c)
    perm = torch.randperm(len(pts), generator=g)
    x = torch.stack(pts)[perm]
    label = torch.tensor(label)[perm]
    keep = divprune_select(x, 4)
    assert sorted(label[keep].tolist()) == [0, 1, 2, 3]
    keep3 = divprune_select(x, 3)
    assert torch.unique(label[keep3]).numel() == 3


def test_divprune_vs_bruteforce_small():
    for seed in range(30):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(8, 4, generator=g)
        dist = pairwise_cosine_distance(x)
        keep = divprune_select(x, 3).tolist()
        assert keep == _naive_greedy(dist, 3)
        best = max(_min_pairwise(dist, s) for s in itertools.combinations(range(8), 3))
        # 1 - cos is not a metric, but sqrt(1 - cos) (chord length / sqrt 2) is, and the greedy's picks
        # are invariant under that monotone map: the classic 1/2 bound holds on sqrt(1 - cos).
        assert math.sqrt(_min_pairwise(dist, keep)) >= 0.5 * math.sqrt(best) - 1e-6


def test_divprune_running_min_equals_naive_greedy():
    for seed in range(3):
        g = torch.Generator().manual_seed(100 + seed)
        x = torch.randn(100, 16, generator=g)
        keep = divprune_select(x, 20)
        _assert_index_tensor(keep, 20, 100)
        assert keep.tolist() == _naive_greedy(pairwise_cosine_distance(x), 20)


def test_divprune_exact_duplicates_never_repicked():
    x = torch.tensor([[1.0, 0.0]] * 5 + [[0.0, 1.0]] * 3)
    keep = divprune_select(x, 6)
    _assert_index_tensor(keep, 6, 8)
    assert keep.tolist() == _naive_greedy(pairwise_cosine_distance(x), 6)
    # both directions are represented once the first two picks are made
    assert set(divprune_select(x, 2).tolist()) == {0, 5}


def test_divprune_low_precision_inputs():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(64, 32, generator=g)
    for dtype in (torch.bfloat16, torch.float16):
        xl = x.to(dtype)
        keep = divprune_select(xl, 10)
        _assert_index_tensor(keep, 10, 64)
        assert keep.tolist() == _naive_greedy(pairwise_cosine_distance(xl.float()), 10)
    with pytest.raises(ValueError):
        divprune_select(torch.arange(6).view(3, 2), 1)


# ---------------------------------------------------------------------------------------------- DART


def test_dart_keeps_pivots_and_least_duplicated_tokens():
    # tokens 0..3 are near-copies of direction e0, tokens 4..7 of e1, token 8 is e2 (unique)
    e = torch.eye(3)
    features = torch.stack([e[0] + 0.01 * i for i in range(4)] + [e[1] + 0.01 * i for i in range(4)] + [e[2]])
    key_norms = torch.tensor([9.0, 1, 1, 1, 1, 1, 1, 1, 1])  # token 0 is the visual pivot
    kept = dart_select(features, key_norms, torch.empty(0, 3), k=3, visual_pivots=1)
    assert kept.tolist()[0] == 0 and len(kept) == 3
    # the pivot (direction e0) adds the two tokens least similar to it: one from e1 and... e2 or e1 —
    # never another copy of e0
    assert not set(kept.tolist()[1:]) & {1, 2, 3}


def test_dart_exact_count_and_text_pivots():
    torch.manual_seed(0)
    features = torch.randn(50, 16)
    norms = torch.rand(50)
    text = torch.randn(4, 16)
    for k in (1, 4, 5, 13, 50):
        kept = dart_select(features, norms, text, k=k, visual_pivots=4)
        assert kept.numel() == k and kept.unique().numel() == k and torch.equal(kept, torch.sort(kept).values)
    assert set(pick_pivots(norms, 4).tolist()) <= set(dart_select(features, norms, text, 20).tolist())
    # a text pivot pulls in the visual token least similar to it
    target = torch.zeros(1, 16)
    target[0, 0] = 1.0
    features2 = features.clone()
    features2[7] = -target[0] * 5
    kept = dart_select(features2, torch.zeros(50), target, k=1, visual_pivots=0)
    assert kept.tolist() == [7]


# ------------------------------------------------------------------------------------------ SparseVLM


def test_select_raters_prefers_text_aligned_with_the_image():
    visual = torch.tensor([[5.0, 0.0], [4.0, 0.5]])
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.9, 0.1]])
    raters = select_raters(visual, text)
    assert raters.tolist() == [True, False, False, True]
    assert select_raters(visual, torch.empty(0, 2)).numel() == 0


def test_dpc_knn_separates_blobs_and_merges_means():
    torch.manual_seed(0)
    blob_a = torch.randn(20, 4) * 0.05
    blob_b = torch.randn(15, 4) * 0.05 + 3.0
    features = torch.cat([blob_a, blob_b])
    centres, assignment = dpc_knn(features, 2)
    assert centres.numel() == 2
    assert assignment[:20].unique().numel() == 1 and assignment[20:].unique().numel() == 1
    assert assignment[0] != assignment[20]
    means = cluster_means(features, assignment, 2)
    torch.testing.assert_close(means[assignment[0]], blob_a.mean(0))
    torch.testing.assert_close(means[assignment[20]], blob_b.mean(0))
    # determinism and degenerate sizes
    assert torch.equal(dpc_knn(features, 2)[1], assignment)
    centres, assignment = dpc_knn(features[:1], 3)
    assert centres.tolist() == [0] and assignment.tolist() == [0]
