"""VisPruner, HiPrune, PruMerge / PruMerge+ and CDPruner (issue 17): known answers of the pure cores, fidelity to
the official selection routines (design.md invariant 12) and the signals the adapters capture for them.

Each ``official_*`` function is this project's own transcription of the official routine, written from reading
the official repository at the commit cited (file and lines in its docstring), with the official batch layout
and no code taken over. The family-wide invariants (keep-all, batching, positions, reference equivalence,
generate) run for these methods in test_invariants.py, which iterates the registry.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from reference_runs import capture_lm_calls

import vtprune
from vtprune.errors import MethodOptionError, UnsupportedModelError
from vtprune.selectors.cdpruner import cdpruner_kernel, cdpruner_relevance, cdpruner_select, dpp_greedy_map
from vtprune.selectors.hiprune import anchor_count, hiprune_select
from vtprune.selectors.prumerge import iqr_outlier_count, prumerge_indices, prumerge_merge
from vtprune.selectors.vispruner import split_vispruner_budget, vispruner_select
from vtprune.testing import tiny_image, tiny_inputs

RANDOM_CASES = 12
PROMPT = "What is in the image?"


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


# ---------------------------------------------------------------------------------------------------------
# Known answers of the pure cores
# ---------------------------------------------------------------------------------------------------------


def test_vispruner_removes_duplicates_and_keeps_the_important():
    # scores descend with the index: tokens 0, 1 are important; the residual 2..11 pairs every even rank with a
    # duplicate at the next odd rank, so all 5 A tokens are the duplicates and the B tokens survive
    n = 12
    scores = torch.linspace(1.0, 0.0, n)
    directions = torch.eye(8)
    features = torch.zeros(n, 8)
    features[0], features[1] = directions[6], directions[7]
    for pair in range(5):
        features[2 + 2 * pair] = directions[pair]
        features[3 + 2 * pair] = directions[pair] * 3.0  # same direction: cosine 1
    keep = vispruner_select(scores, features, important=2, diverse=5)
    assert keep.tolist() == [0, 1, 3, 5, 7, 9, 11]
    assert split_vispruner_budget(64, 0.5) == (32, 32) and split_vispruner_budget(7, 0.5) == (3, 4)


def test_vispruner_removes_eight_per_round_in_similarity_order():
    # 20 residual tokens, 2 to keep: rounds of 8 then 8 -> 2 remain, both distinct from each other
    torch.manual_seed(0)
    scores = torch.arange(20, 0, -1).float()
    features = torch.randn(20, 16)
    keep = vispruner_select(scores, features, important=0, diverse=2)
    assert keep.numel() == 2


def test_hiprune_anchor_buffers_registers():
    # 4 x 4 grid; the object layer peaks at 5 -> anchor 5, buffers 4, 6, 1, 9; registers: the deep layer's best
    # others (5 is excluded although it scores highest there)
    object_scores = torch.zeros(16)
    object_scores[5] = 1.0
    deep = torch.arange(16).float() / 100
    deep[5] = 1.0
    keep = hiprune_select(object_scores, deep, k=8, width=4, anchors=anchor_count(8, 0.625))
    assert anchor_count(8, 0.625) == 1
    assert keep.tolist() == [1, 4, 5, 6, 9, 13, 14, 15]


def test_hiprune_clamps_and_shrinks_anchors_that_do_not_fit():
    object_scores = torch.zeros(16)
    object_scores[0], object_scores[10] = 2.0, 1.0
    keep = hiprune_select(object_scores, torch.zeros(16), k=4, width=4, anchors=2)
    # anchor 0 alone: 0, 1, 4 (0 - 1 and 0 - 4 clamp to 0); anchor 10 would exceed k=4 -> 1 anchor + 1 register
    assert keep.numel() == 4 and {0, 1, 4} <= set(keep.tolist())


def test_iqr_finds_the_outliers():
    scores = torch.full((40,), 0.01) + torch.linspace(0, 1e-3, 40)
    scores[[3, 17, 30]] = torch.tensor([0.5, 0.4, 0.3])
    assert iqr_outlier_count(scores) == 3
    kept = prumerge_indices(scores, 3, plus=False)
    assert kept.tolist() == [3, 17, 30]  # descending score
    plus = prumerge_indices(scores, 3, plus=True)
    # ratio 3/40 -> step int(40/3)=13 -> spacing int(13/3)=4: 0, 4, ..., 36 (all new)
    assert plus.tolist() == [3, 17, 30] + list(range(0, 39, 4))
    fixed = prumerge_indices(scores, 3, plus=True, budget=7)
    assert fixed[:3].tolist() == [3, 17, 30] and fixed.numel() == 7 and fixed.unique().numel() == 7


def test_prumerge_merge_known_values():
    hidden = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 3.0]])
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.1, 1.0]])
    scores = torch.tensor([0.4, 0.3, 0.2, 0.1])
    result = prumerge_merge(hidden, keys, scores, torch.tensor([0, 1]), neighbours=1)
    # token 0's most similar key is token 2: x0 + 0.2 * x2; token 1's is token 3: x1 + 0.1 * x3;
    # extra = 0.2 * x2 + 0.1 * x3
    expected = torch.tensor([[1.4, 0.0], [0.0, 1.3], [0.4, 0.3]])
    torch.testing.assert_close(result.merged, expected)
    torch.testing.assert_close(result.weights @ hidden, expected)


def test_dpp_picks_diverse_tokens():
    # three clusters of identical tokens: a 3-token DPP picks one of each
    base = torch.eye(3)
    features = base[[0, 0, 0, 1, 1, 2, 2, 2]] + 1e-3 * torch.arange(8)[:, None]
    keep = cdpruner_select(features, torch.ones(8), 3)
    assert sorted(0 if i < 3 else 1 if i < 5 else 2 for i in keep.tolist()) == [0, 1, 2]


def test_dpp_prefers_relevant_among_equally_diverse():
    features = torch.eye(4)
    relevance = torch.tensor([0.1, 0.9, 0.2, 0.8])
    assert cdpruner_select(features, relevance, 2).tolist() == [1, 3]


def test_dpp_greedy_second_pick_maximises_the_determinant():
    torch.manual_seed(1)
    x = torch.randn(10, 6)
    kernel = cdpruner_kernel(x, torch.rand(10) + 0.1).double()
    first, second = dpp_greedy_map(kernel.float(), 2).tolist()
    assert first == int(torch.argmax(torch.diagonal(kernel)))
    dets = [torch.det(kernel[[first, j]][:, [first, j]]) if j != first else -1 for j in range(10)]
    assert second == int(np.argmax([float(d) for d in dets]))


def test_cdpruner_relevance_is_negated_cosine_min_max():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    text = torch.tensor([[1.0, 0.0]])
    rel = cdpruner_relevance(image, text)
    # -cos = [-1, 0, -0.707]: min-max -> [1e-6, 1 + 1e-6, (1 - 0.707) + 1e-6]
    torch.testing.assert_close(rel, torch.tensor([1e-6, 1 + 1e-6, 1 - 2**-0.5 + 1e-6]))


# ---------------------------------------------------------------------------------------------------------
# Transcriptions of the official routines
# ---------------------------------------------------------------------------------------------------------


def official_vispruner(attentions: torch.Tensor, features: torch.Tensor, visual_token_num: int,
                       important_ratio: float) -> torch.Tensor:
    """VisPruner, Theia-4869/VisPruner @ aefa01a, ``llava/model/llava_arch.py`` L140-186 ``encode_images``.
    ``attentions [B, H, N]`` (CLS row per head), ``features [B, N, C]``; returns the index mask [B, N]."""
    B, N, C = features.shape
    important_token_num = int(visual_token_num * important_ratio)
    diverse_token_num = visual_token_num - important_token_num
    image_attentions = attentions.mean(dim=1)
    token_indices = image_attentions.argsort(dim=-1, descending=True)
    important_indices = token_indices[:, :important_token_num]
    residual_indices = token_indices[:, important_token_num:]
    image_normalized = features / features.norm(dim=-1, keepdim=True)
    while diverse_token_num > 0:
        R = residual_indices.shape[1]
        r = min(8, R - diverse_token_num)
        if r <= 0:
            break
        residual_tokens = image_normalized[torch.arange(B).unsqueeze(-1).expand(-1, R), residual_indices]
        a, b = residual_tokens[..., ::2, :], residual_tokens[..., 1::2, :]
        scores = (a @ b.transpose(-1, -2)).max(dim=-1).values
        distinct_indices = scores.argsort(dim=-1, descending=True)[:, r:]
        residual_indices = torch.cat([
            residual_indices[..., ::2][torch.arange(B).unsqueeze(-1).expand(-1, R // 2 - r), distinct_indices],
            residual_indices[..., 1::2]], dim=-1)
    selected = torch.cat([important_indices, residual_indices], dim=-1) if diverse_token_num > 0 \
        else important_indices
    masks = torch.zeros(B, N, dtype=torch.bool)
    masks.scatter_(1, selected, True)
    return masks


def official_hiprune(shallow_attention: torch.Tensor, deep_attention: torch.Tensor, visual_token_num: int,
                     alpha: float, width: int) -> torch.Tensor:
    """HiPrune, Danielement321/HiPrune @ 6e83a12, ``LLaVA/llava/model/llava_arch.py`` L140-182 (batch of one; the
    official hard-codes width 24 and N 576). Inputs: the head- and query-mean attention [1, N] (CLS column
    dropped) of the object layer and of the deep layer. Returns the index mask [N]."""
    N = shallow_attention.shape[1]
    deep_attention = deep_attention.clone()
    shallow_token_num = round(visual_token_num * alpha / 5)
    idx = torch.topk(shallow_attention[0].unsqueeze(0), k=shallow_token_num, dim=1)[1]
    idx = torch.cat([idx, idx - 1, idx + 1, idx - width, idx + width], dim=1).clamp(0, N - 1)
    idx = torch.unique(idx, sorted=False).unsqueeze(0)
    deep_token_num = visual_token_num - idx.shape[1]
    available = torch.zeros(1, N, dtype=torch.bool)
    available.scatter_(1, idx, 1)
    deep_attention[0] -= available.int().squeeze()
    deep_idx = torch.topk(deep_attention[0].unsqueeze(0), k=deep_token_num, dim=1)[1]
    mask = torch.zeros(N, dtype=torch.bool)
    mask[torch.cat([idx, deep_idx], dim=1)[0]] = True
    return mask


def official_prumerge(q: torch.Tensor, k: torch.Tensor, image_features: torch.Tensor, plus: bool):
    """PruMerge(+) (adaptive), 42Shawn/LLaVA-PruMerge @ 097c041, ``llava/model/multimodal_encoder/clip_encoder.py``
    L34-47 (IQR with numpy), L85-171 / L174-281. ``q``, ``k`` [1, T, C] hooked q_proj / k_proj outputs of the last
    layer (CLS first), ``image_features`` [1, N, C] (N = T - 1). Returns (idx [m], tokens [m + 1, C])."""
    B, N, C = image_features.shape
    attn = F.softmax((q @ k.transpose(-2, -1)) * C**-0.5, dim=-1)
    cls_attn = attn[:, 0, 1:]
    values = cls_attn.to(torch.float32).cpu().numpy().flatten()
    q1, q3 = np.percentile(values, 25), np.percentile(values, 75)
    reduction_ratio = len(np.where(values > q3 + 1.5 * (q3 - q1))[0]) / len(values)
    _, idx = torch.topk(cls_attn, int(N * reduction_ratio), dim=1, largest=True)
    if plus:
        step_length = int(1 / reduction_ratio)
        seq = torch.arange(0, N - 1, int(step_length / 3))
        flat = idx.flatten()
        filtered = torch.tensor([x for x in seq if x not in flat], dtype=torch.long)
        idx = torch.cat((idx, filtered.unsqueeze(0)), dim=1)
    index = idx.unsqueeze(-1).expand(-1, -1, C)
    key_wo_cls = k[:, 1:]
    x_others = torch.gather(image_features, 1, index)
    x_others_attn = torch.gather(cls_attn, 1, idx)
    key_others = torch.gather(key_wo_cls, 1, index)
    keep = torch.zeros(N, dtype=torch.bool)
    keep[idx[0]] = True
    compl = torch.nonzero(~keep).flatten().unsqueeze(0)
    non_topk = torch.gather(image_features, 1, compl.unsqueeze(-1).expand(-1, -1, C))
    non_topk_key = torch.gather(key_wo_cls, 1, compl.unsqueeze(-1).expand(-1, -1, C))
    non_topk_attn = torch.gather(cls_attn, 1, compl)
    key_others_norm = F.normalize(key_others, p=2, dim=-1)
    non_topk_key_norm = F.normalize(non_topk_key, p=2, dim=-1)
    left = x_others.shape[1]
    updated = torch.zeros_like(x_others)
    for i in range(left):
        own = key_others_norm[0, i].unsqueeze(0).unsqueeze(0)
        rest_x = torch.cat([x_others[0, :i].unsqueeze(0), x_others[0, i + 1:].unsqueeze(0), non_topk], dim=1)
        rest_attn = torch.cat([x_others_attn[0, :i].unsqueeze(0), x_others_attn[0, i + 1:].unsqueeze(0),
                               non_topk_attn], dim=1)
        rest_keys = torch.cat([key_others_norm[0, :i].unsqueeze(0), key_others_norm[0, i + 1:].unsqueeze(0),
                               non_topk_key_norm], dim=1)
        cluster = torch.topk(torch.bmm(own, rest_keys.transpose(1, 2)), k=32, dim=2, largest=True)[1]
        tokens = rest_x[:, cluster.squeeze(), :]
        weights = rest_attn[:, cluster.squeeze()].unsqueeze(-1)
        updated[0, i] = x_others[0, i] + torch.sum(tokens * weights, dim=1)
    extra = torch.sum(non_topk * non_topk_attn.unsqueeze(-1), dim=1, keepdim=True)
    return idx[0], torch.cat([updated, extra], dim=1)[0]


def official_cdpruner(image_features: torch.Tensor, image_embeds: torch.Tensor, text_embeds: torch.Tensor,
                      visual_token_num: int) -> torch.Tensor:
    """CDPruner, Theia-4869/CDPruner @ 9541616, ``llava/model/llava_arch.py`` L140-187 (after the projector).
    ``image_features [B, N, D]`` projected, ``image_embeds [B, N, C]``, ``text_embeds [M, C]``. Index mask."""
    B, N, _ = image_features.shape
    image_normalized = (image_features / image_features.norm(dim=-1, keepdim=True)).float()
    similarity = torch.matmul(image_normalized, image_normalized.transpose(1, 2))
    image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
    text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
    relevance = (-torch.matmul(image_embeds, text_embeds.t())).mean(dim=-1)
    relevance = (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())
    kernel = relevance.unsqueeze(2) * similarity * relevance.unsqueeze(1)
    cis = torch.zeros((visual_token_num, B, N))
    di2s = torch.diagonal(kernel, dim1=1, dim2=2).clone()
    select_idx = torch.empty((visual_token_num, B), dtype=torch.long)
    for i in range(visual_token_num):
        j = torch.argmax(di2s, dim=-1)
        select_idx[i] = j
        eis = (kernel[torch.arange(B), j] - torch.einsum('tb,tbn->bn', cis[:i, torch.arange(B), j], cis[:i])) \
            / torch.sqrt(di2s[torch.arange(B), j]).unsqueeze(-1)
        cis[i, :, :] = eis
        di2s -= torch.square(eis)
        di2s[torch.arange(B), j] = -float('inf')
    masks = torch.zeros(B, N, dtype=torch.bool)
    masks.scatter_(1, torch.sort(select_idx.t()).values, True)
    return masks


# ---------------------------------------------------------------------------------------------------------
# Fidelity on random inputs
# ---------------------------------------------------------------------------------------------------------


def _mask(keep: torch.Tensor, n: int) -> torch.Tensor:
    out = torch.zeros(n, dtype=torch.bool)
    out[keep] = True
    return out


@pytest.mark.parametrize("seed", range(RANDOM_CASES))
def test_vispruner_random(seed):
    """Cases the official indexing handles: an even residual and at least 8 diverse tokens (else its
    ``expand(-1, R // 2 - r)`` fails)."""
    gen = torch.Generator().manual_seed(seed)
    n = 2 * int(torch.randint(12, 60, (1,), generator=gen))
    heads = int(torch.randint(1, 5, (1,), generator=gen))
    attentions = torch.rand(1, heads, n, generator=gen)
    features = torch.randn(1, n, 12, generator=gen)
    ratio = [0.5, 0.25, 0.75, 0.0][seed % 4]
    k = int(torch.randint(16, n - 2, (1,), generator=gen))
    while split_vispruner_budget(k, ratio)[0] % 2 or split_vispruner_budget(k, ratio)[1] < 8:
        k += 1
    important, diverse = split_vispruner_budget(k, ratio)
    assert k < n
    ours = vispruner_select(attentions[0].mean(0), features[0], important, diverse)
    assert torch.equal(_mask(ours, n), official_vispruner(attentions, features, k, ratio)[0])


@pytest.mark.parametrize("seed", range(RANDOM_CASES))
def test_hiprune_random(seed):
    gen = torch.Generator().manual_seed(seed)
    side = int(torch.randint(6, 25, (1,), generator=gen))
    n = side * side
    shallow, deep = torch.rand(1, n, generator=gen), torch.rand(1, n, generator=gen)
    k = int(torch.randint(n // 6, n // 2, (1,), generator=gen))
    alpha = [0.1, 0.5, 1.0][seed % 3]
    if 5 * anchor_count(k, alpha) > k:
        alpha = 0.1
    ours = hiprune_select(shallow[0], deep[0], k, side, anchor_count(k, alpha))
    assert torch.equal(_mask(ours, n), official_hiprune(shallow, deep, k, alpha, side))


@pytest.mark.parametrize("plus", [False, True])
@pytest.mark.parametrize("seed", range(RANDOM_CASES // 2))
def test_prumerge_random(seed, plus):
    gen = torch.Generator().manual_seed(seed)
    n, width = 144, 16
    q = torch.randn(1, n + 1, width, generator=gen) * 3
    k = torch.randn(1, n + 1, width, generator=gen) * 3
    features = torch.randn(1, n, width, generator=gen)
    idx, tokens = official_prumerge(q, k, features, plus)
    scores = torch.softmax((q[0, :1] @ k[0].T) * width**-0.5, dim=-1)[0, 1:]
    kept = prumerge_indices(scores, iqr_outlier_count(scores), plus)
    assert torch.equal(kept, idx)
    result = prumerge_merge(features[0], k[0, 1:], scores, kept)
    torch.testing.assert_close(result.merged, tokens, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", range(RANDOM_CASES))
def test_cdpruner_random(seed):
    gen = torch.Generator().manual_seed(seed)
    n = int(torch.randint(20, 120, (1,), generator=gen))
    features = torch.randn(1, n, 160, generator=gen)  # full rank, as LLaVA's 4096-d tokens (else d^2 -> 0)
    image = torch.randn(1, n, 10, generator=gen)
    text = torch.randn(int(torch.randint(1, 6, (1,), generator=gen)), 10, generator=gen)
    k = int(torch.randint(1, n // 2, (1,), generator=gen))
    ours = cdpruner_select(features[0], cdpruner_relevance(image[0], text), k)
    assert torch.equal(_mask(ours, n), official_cdpruner(features, image, text, k)[0])


# ---------------------------------------------------------------------------------------------------------
# Fidelity on a tiny LLaVA's real signals (eager run of the vision tower, as the official code)
# ---------------------------------------------------------------------------------------------------------


def _eager_tower(model, pixel_values, hooks=()):
    tower = model.model.vision_tower
    previous = model.config.vision_config._attn_implementation
    tower.set_attn_implementation("eager")
    try:
        return tower(pixel_values, output_attentions=True, output_hidden_states=True)
    finally:
        tower.set_attn_implementation(previous)


def _llava(tiny_models, image_seed=0):
    model, processor = tiny_models["llava"]
    inputs = tiny_inputs(processor, [tiny_image(image_seed)], [PROMPT])
    positions = torch.nonzero(inputs["input_ids"][0] == model.config.image_token_id).flatten()
    return model, inputs, positions


def _kept(model, inputs, method, budget, **options):
    with vtprune.pruned(model, method, budget, **options), capture_lm_calls(model) as calls:
        model(**inputs)
        stage = vtprune.stats(model).samples[0].stages[0]
    return stage, calls[-1]["inputs_embeds"][0]


@pytest.mark.parametrize("budget", [16, 24, 40])
@pytest.mark.parametrize("image_seed", [0, 3])
def test_vispruner_tiny_llava(tiny_models, budget, image_seed):
    model, inputs, positions = _llava(tiny_models, image_seed)
    out = _eager_tower(model, inputs["pixel_values"])
    layer = model.config.vision_feature_layer
    attentions = out.attentions[layer][:, :, 0, 1:]  # official feature_select: CLS row, patches
    features = out.hidden_states[layer][:, 1:]
    assert (features.shape[1] - int(budget * 0.5)) % 2 == 0  # the official indexing needs an even residual
    stage, _ = _kept(model, inputs, "vispruner", budget)
    assert torch.equal(stage.kept_positions, positions[official_vispruner(attentions, features, budget, 0.5)[0]])


@pytest.mark.parametrize("budget", [8, 16, 40])
@pytest.mark.parametrize("object_layer", [1, 2])
def test_hiprune_tiny_llava(tiny_models, budget, object_layer):
    model, inputs, positions = _llava(tiny_models)
    out = _eager_tower(model, inputs["pixel_values"])
    deep = out.attentions[model.config.vision_feature_layer].mean(dim=1).mean(dim=1)[:, 1:]
    shallow = out.attentions[object_layer - 1].mean(dim=1).mean(dim=1)[:, 1:]
    alpha = 0.5  # 0.1 gives no anchor at these budgets
    stage, _ = _kept(model, inputs, "hiprune", budget, alpha=alpha, object_layer=object_layer)
    assert torch.equal(stage.kept_positions, positions[official_hiprune(shallow, deep, budget, alpha, 8)])


@pytest.mark.parametrize("method", ["prumerge", "prumerge_plus"])
@pytest.mark.parametrize("image_seed", [1, 3, 6, 15])
def test_prumerge_tiny_llava(tiny_models, method, image_seed):
    """Adaptive default: the same tokens in the official order, projected, in place of the image."""
    model, inputs, positions = _llava(tiny_models, image_seed)
    tower = model.model.vision_tower
    layers = getattr(tower, "vision_model", tower).encoder.layers
    hooked = {}
    handles = [layers[-1].self_attn.q_proj.register_forward_hook(lambda m, a, o: hooked.update(q=o)),
               layers[-1].self_attn.k_proj.register_forward_hook(lambda m, a, o: hooked.update(k=o))]
    try:
        out = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True)
    finally:
        for handle in handles:
            handle.remove()
    features = out.hidden_states[model.config.vision_feature_layer][:, 1:]
    scores = torch.softmax(hooked["q"][0, :1] @ hooked["k"][0].T * features.shape[-1]**-0.5, -1)[0, 1:]
    if iqr_outlier_count(scores) == 0:
        pytest.skip("no outlier: the official code divides by zero")
    _, tokens = official_prumerge(hooked["q"], hooked["k"], features, method == "prumerge_plus")
    stage, embeds = _kept(model, inputs, method, None)
    with capture_lm_calls(model) as calls:
        model(**inputs)
    unpruned = calls[-1]["inputs_embeds"][0]
    first, last = int(positions[0]), int(positions[-1])
    expected = torch.cat([unpruned[:first], model.model.multi_modal_projector(tokens), unpruned[last + 1:]])
    assert stage.merged == tokens.shape[0]
    assert embeds.shape == expected.shape
    torch.testing.assert_close(embeds, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("budget", [4, 16, 40])
def test_cdpruner_tiny_llava_own_embeddings(tiny_models, budget):
    """Default relevance: the official computation with the LLM's input embeddings of the instruction (the text
    after the image) on both sides."""
    model, inputs, positions = _llava(tiny_models)
    with capture_lm_calls(model) as calls:
        model(**inputs)
    embeds = calls[-1]["inputs_embeds"][0]
    image = embeds[positions]
    text = embeds[int(positions[-1]) + 1:]
    expected = official_cdpruner(image[None], image[None], text, budget)[0]
    stage, _ = _kept(model, inputs, "cdpruner", budget)
    assert torch.equal(stage.kept_positions, positions[expected])


def test_cdpruner_text_tower(tiny_models):
    """A user text tower and image projection: the relevance compares them (the official CLIP path)."""
    model, inputs, positions = _llava(tiny_models)
    seen = {}
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(model.config.text_config.vocab_size, 6, generator=gen)
    projection = torch.randn(model.config.vision_config.hidden_size, 6, generator=gen)

    def text_tower(ids):
        seen["ids"] = ids
        return table[ids]

    def image_projection(hidden):
        return hidden @ projection

    out = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True)
    hidden = out.hidden_states[model.config.vision_feature_layer][0, 1:]
    with capture_lm_calls(model) as calls:
        model(**inputs)
    features = calls[-1]["inputs_embeds"][0][positions]
    ids = inputs["input_ids"][0, int(positions[-1]) + 1:]
    expected = official_cdpruner(features[None], (hidden @ projection)[None], table[ids], 16)[0]
    stage, _ = _kept(model, inputs, "cdpruner", 16, text_tower=text_tower, image_projection=image_projection)
    assert torch.equal(seen["ids"], ids)
    assert torch.equal(stage.kept_positions, positions[expected])


# ---------------------------------------------------------------------------------------------------------
# Signals and options
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_5_vl"])
def test_hiprune_received_attention_matches_an_eager_run(tiny_models, family):
    """The received-attention layer signal equals the eager attention probabilities' head/query mean."""
    model, processor = tiny_models[family]
    inputs = tiny_inputs(processor, [tiny_image(0)], [PROMPT])
    captured = {}
    method = vtprune.registry.build_method("hiprune", budget=8, object_layer=1)
    original = type(method).select

    def spy(self, group, k):
        if not captured:  # the first group: the base view / the image
            captured.update(group.signals)
        return original(self, group, k)

    type(method).select = spy
    try:
        with vtprune.pruned(model, method):
            model(**inputs)
    finally:
        type(method).select = original
    assert set(captured) == {"received_attention@0", "received_attention@feature"}
    assert all(bool(torch.isfinite(v).all()) and bool((v >= 0).all()) for v in captured.values())
    if family == "llava_onevision":
        out = _eager_tower(model, inputs["pixel_values"][0])
        base = out.attentions[0][0].mean(dim=0).mean(dim=0)  # base view: [P]
        torch.testing.assert_close(captured["received_attention@0"][: base.numel()], base, rtol=1e-4, atol=1e-6)


def test_options_are_checked(tiny_models):
    with pytest.raises(MethodOptionError, match="important_ratio"):
        vtprune.registry.build_method("vispruner", important_ratio=1.5)
    with pytest.raises(MethodOptionError, match="object_layer"):
        vtprune.registry.build_method("hiprune", object_layer=0)
    with pytest.raises(MethodOptionError, match="together"):
        vtprune.registry.build_method("cdpruner", text_tower=lambda ids: ids)
    model, _ = tiny_models["llava"]
    with pytest.raises((MethodOptionError, UnsupportedModelError), match="beyond|does not exist"):
        vtprune.apply(model, "hiprune", budget=8, object_layer=9)
    assert not vtprune.is_pruned(model)
    with pytest.raises(UnsupportedModelError, match="does not exist"):
        vtprune.apply(model, "prumerge", layer=7)
    assert not vtprune.is_pruned(model)


def test_registered_names():
    names = vtprune.methods()
    for name in ("vispruner", "hiprune", "prumerge", "prumerge_plus", "cdpruner"):
        assert names[name].stage == "pre-llm"
    assert names["prumerge"].default_budget is None


def test_composition_with_the_in_vit_stage(tiny_models):
    """Methods reading vision attention refuse an in-ViT stage before them (it changes the tokens those blocks
    see); CDPruner, which reads none, composes."""
    model, processor = tiny_models["llava"]
    for method in ("hiprune", "prumerge", "vispruner"):
        with pytest.raises(vtprune.VTPruneError, match="reads the vision encoder's attention"):
            vtprune.apply(model, ["tome", method], 0.2)
        assert not vtprune.is_pruned(model)
    inputs = tiny_inputs(processor, [tiny_image(0)], [PROMPT])
    with vtprune.pruned(model, ["tome", "cdpruner"], budget=0.2):
        model(**inputs)
        sample = vtprune.stats(model).samples[0]
    assert [s.name for s in sample.stages] == ["tome", "cdpruner"]
    assert sample.stages[1].visual_out < sample.stages[0].visual_out
