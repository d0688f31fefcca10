"""The in-ViT stage (``vtprune/engine/vit_stage.py``) and its methods ``tome`` and ``flowcut`` (with FlowCut's
decoder stage ``flowcut_llm`` for AnyRes inputs, at the end).

* known-answer tests of the pure cores (``vtprune.selectors.tome`` / ``flowcut``);
* fidelity: each core against this project's literal transcription of the official computation
  (facebookresearch/ToMe @ af95e4b ``tome/merge.py`` / ``tome/patch/timm.py``; TungChintao/FlowCut @ a2ecd24
  ``flowcut/modeling_clip_flowcut.py`` / ``flowcut/utils_flowcut.py``), on random tensors and on a tiny CLIP tower
  run block by block in eager math as the official patched forwards do;
* invariants on the LLaVA, LLaVA-NeXT and LLaVA-OneVision tiny models: keep-all = unwrapped (bitwise), batch =
  one-by-one with padding, reference equivalence (the pruned tower equals the unwrapped layers run on the kept
  tokens), generate(), remove() restores exactly, determinism, stats / budget, composition and refusals.
"""

from __future__ import annotations

import math

import pytest
import torch
from reference_runs import capture_lm_calls

import vtprune
from vtprune.bench.flops import vision_flops
from vtprune.errors import MethodOptionError, UnsupportedModelError, VTPruneError
from vtprune.selectors.flowcut import (
    adaptive_prune_count,
    flowcut_keep,
    flowcut_layer_signals,
    flowcut_llm_scores,
    flowcut_score,
)
from vtprune.selectors.tome import apply_merge, bipartite_soft_matching, parse_r, schedule_for_target
from vtprune.testing import tiny_image, tiny_inputs, tiny_vlm

FAMILIES = ("llava", "llava_next", "llava_onevision")
METHODS = ("tome", "flowcut")
BUDGET = {"llava": 16, "llava_next": 0.4, "llava_onevision": 0.4}


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def _tower(model):
    tower = model.model.vision_tower
    return getattr(tower, "vision_model", tower)


def _supported(family: str, method: str) -> bool:
    return not (family == "llava_onevision" and method == "flowcut")  # SigLIP has no [CLS]


def _inputs(processor, two: bool = True):
    images = [tiny_image(0), tiny_image(1, size=(64, 40))] if two else [tiny_image(0)]
    prompts = ["Describe the image.", "What is here?"] if two else ["Describe the image."]
    return tiny_inputs(processor, images, prompts)


# ---------------------------------------------------------------------------------------------------------
# Pure cores: known answers
# ---------------------------------------------------------------------------------------------------------


def test_tome_merges_exactly_the_duplicate_pairs():
    torch.manual_seed(0)
    t, c = 20, 16
    metric = torch.randn(1, t, c)
    duplicates = [2, 6, 14]  # A tokens (even) that equal their B neighbour (odd)
    for a in duplicates:
        metric[0, a] = metric[0, a + 1]
    plan = bipartite_soft_matching(metric, len(duplicates), class_token=True)
    assert sorted(plan.src[0].tolist()) == duplicates
    kept = plan.keep[0]
    for src, dst in zip(plan.src[0].tolist(), plan.dst[0].tolist(), strict=True):
        assert int(kept[dst]) == src + 1  # merged into its duplicate
    x = torch.randn(1, t, 8)
    size = torch.ones(1, t, 1)
    merged, new_size = apply_merge(plan, x, size)
    assert merged.shape == (1, t - 3, 8) and float(new_size.sum()) == t
    for src, dst in zip(plan.src[0].tolist(), plan.dst[0].tolist(), strict=True):
        torch.testing.assert_close(merged[0, dst], (x[0, src] + x[0, src + 1]) / 2)
    assert int(kept[0]) == 0  # the CLS token stays first


def test_tome_protects_cls_and_caps_at_half():
    metric = torch.ones(2, 9, 4)  # every pair equally similar
    plan = bipartite_soft_matching(metric, 100, class_token=True)
    assert plan.src.shape[1] == (9 - 1) // 2
    assert not bool((plan.src == 0).any())
    assert bipartite_soft_matching(metric, 0, class_token=True) is None


def test_tome_sizes_sum_over_layers():
    torch.manual_seed(1)
    x, size = torch.randn(3, 33, 8), torch.ones(3, 33, 1)
    for r in (8, 6, 4, 3):
        plan = bipartite_soft_matching(torch.randn(3, x.shape[1], 5), r, class_token=False)
        x, size = apply_merge(plan, x, size)
        assert torch.equal(size.sum(1), torch.full((3, 1), 33.0))


def test_parse_r_and_budget_schedule():
    assert parse_r(4, 8) == [8, 8, 8, 8]
    assert parse_r(5, (8, -1)) == [16, 12, 8, 4, 0]  # the paper's decreasing schedule: 2r down to 0
    assert parse_r(4, [3, 2]) == [3, 2, 0, 0]
    schedule = schedule_for_target(577, 65, 23, protected=1)
    assert sum(schedule) == 512 and max(schedule) - min(schedule) <= 1
    assert sum(schedule_for_target(65, 17, 2, protected=1)) == 48  # needs the maximal merges
    with pytest.raises(ValueError, match="cannot bring"):
        schedule_for_target(65, 4, 2, protected=1)


def test_flowcut_adaptive_count_and_keep():
    uniform = torch.full((1, 100), 0.01)
    assert adaptive_prune_count(uniform, 4, 10) == 0  # maximal entropy: nothing pruned yet
    peaked = torch.full((1, 100), 1e-6)
    peaked[0, 0] = 1.0
    assert adaptive_prune_count(peaked, 4, 10) == 45  # (100 - 10) / 2 · (1 - H²), H ≈ 0
    two = torch.cat([uniform, peaked])
    assert adaptive_prune_count(two, 4, 10) == 45  # the maximum over the image's rows
    keep = flowcut_keep(torch.tensor([[0.1, 0.9, 0.3, 0.8, 0.2]]), 3)
    assert keep.tolist() == [[1, 2, 3]]


# ---------------------------------------------------------------------------------------------------------
# Fidelity: literal transcriptions of the official code
# ---------------------------------------------------------------------------------------------------------


def official_tome_merge(metric, x, size, r, class_token):
    """facebookresearch/ToMe @ af95e4b ``tome/merge.py`` L18-97 (``bipartite_soft_matching`` with its ``merge``
    closure) and L210-224 (``merge_wavg``), transcribed: [B, t, c] inputs, returns merged x and size."""
    protected = 1 if class_token else 0
    t = metric.shape[1]
    r = min(r, (t - protected) // 2)
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[..., ::2, :], metric[..., 1::2, :]
    scores = a @ b.transpose(-1, -2)
    if class_token:
        scores[..., 0, :] = -math.inf
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
    unm_idx = edge_idx[..., r:, :]
    src_idx = edge_idx[..., :r, :]
    dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
    if class_token:
        unm_idx = unm_idx.sort(dim=1)[0]

    def merge(v):
        src, dst = v[..., ::2, :], v[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce="sum")
        return torch.cat([unm, dst], dim=1)

    x = merge(x * size)
    size = merge(size)
    return x / size, size


@pytest.mark.parametrize("case", range(24))
def test_tome_matches_official_merge(case):
    gen = torch.Generator().manual_seed(case)
    t = int(torch.randint(9, 80, (1,), generator=gen))
    metric = torch.randn(2, t, 12, generator=gen)
    x = torch.randn(2, t, 6, generator=gen)
    size = torch.randint(1, 4, (2, t, 1), generator=gen).float()
    r = int(torch.randint(1, t // 2 + 2, (1,), generator=gen))
    class_token = bool(case % 2)
    expected_x, expected_size = official_tome_merge(metric, x, size, r, class_token)
    plan = bipartite_soft_matching(metric, r, class_token)
    got_x, got_size = apply_merge(plan, x, size)
    assert torch.equal(got_size, expected_size)
    torch.testing.assert_close(got_x, expected_x, rtol=0, atol=1e-6)


def official_flowcut_layer(attn_module, hidden, target, rpl, cumulative, keep):
    """TungChintao/FlowCut @ a2ecd24 ``flowcut/modeling_clip_flowcut.py`` L14-97 (``CLIPAttention_forward``:
    eager attention, CLS-value semantic attention, value metric) and L100-172 (``CLIPEncoderLayer_forward``), with
    ``flowcut/utils_flowcut.py`` (``compute_score``, ``adaptive_prune_ratio``), transcribed for one layer.
    ``attn_module`` is the HF layer; returns (hidden, cumulative, keep)."""
    layer = attn_module
    sa = layer.self_attn
    bsz, tgt_len, embed_dim = hidden.shape
    residual = hidden
    h = layer.layer_norm1(hidden)
    q = (sa.q_proj(h) * sa.scale).view(bsz, tgt_len, sa.num_heads, sa.head_dim).transpose(1, 2)
    k = sa.k_proj(h).view(bsz, tgt_len, sa.num_heads, sa.head_dim).transpose(1, 2)
    v = sa.v_proj(h).view(bsz, tgt_len, sa.num_heads, sa.head_dim).transpose(1, 2)
    value_metric = v.clone()
    proj = (bsz * sa.num_heads, -1, sa.head_dim)
    q, k, v = q.reshape(*proj), k.reshape(*proj), v.reshape(*proj)
    attn_weights = torch.softmax(torch.bmm(q, k.transpose(1, 2)), dim=-1)
    semantic_weight = torch.bmm(v[:, :1], v.transpose(1, 2))
    semantic_attn = torch.softmax(semantic_weight, dim=-1).view(bsz, sa.num_heads, tgt_len).mean(1)
    out = torch.bmm(attn_weights, v).view(bsz, sa.num_heads, tgt_len, sa.head_dim).transpose(1, 2)
    hidden = residual + sa.out_proj(out.reshape(bsz, tgt_len, embed_dim))
    hidden = hidden + layer.mlp(layer.layer_norm2(hidden))
    v_metric = value_metric.mean(1)
    if hidden.shape[1] > target:
        cls_attention = attn_weights.view(bsz, sa.num_heads, tgt_len, tgt_len)[:, :, 0, 1:].mean(dim=1)
        rel = cls_attention / cls_attention.sum(dim=-1, keepdim=True)
        sem = semantic_attn[:, 1:] / semantic_attn[:, 1:].sum(dim=-1, keepdim=True)
        scores = (rel + sem) * torch.norm(v_metric[:, 1:], p=1, dim=-1)
        cumulative = scores.clone() if cumulative is None else 0.5 * cumulative + 0.5 * scores
        if not rpl % 2:
            if rpl:
                n = cls_attention.shape[-1]
                prob = cls_attention / cls_attention.sum(dim=-1, keepdim=True)
                entropy = -torch.sum(prob * torch.log(prob), dim=-1)
                ratio = entropy / torch.log(torch.tensor(n))
                r = (n - (target - 1)) / rpl ** 0.5 * (1 - ratio ** 2)
                if r.shape[0] > 1:
                    r = r.max(0).values
                prune = int(r.round())
            else:
                prune = hidden.shape[1]
            target_num = max(hidden.shape[1] - prune, target)
            _, keep_indices = torch.topk(cumulative, target_num - 1, dim=1)
            keep_indices = keep_indices.sort(dim=1).values
            top = torch.gather(hidden[:, 1:, :], 1, keep_indices.unsqueeze(-1).expand(-1, -1, hidden.size(-1)))
            cumulative = torch.gather(cumulative, 1, keep_indices)
            keep = torch.gather(keep, 1, keep_indices)
            hidden = torch.cat([hidden[:, :1, :], top], dim=1)
    return hidden, cumulative, keep


def test_flowcut_signals_match_official_formulas():
    torch.manual_seed(3)
    q, k, v = torch.randn(2, 4, 17, 8), torch.randn(2, 4, 17, 8), torch.randn(2, 4, 17, 8)
    cls_attention, semantic, value = flowcut_layer_signals(q, k, v, 8 ** -0.5)
    attn = torch.softmax((q * 8 ** -0.5) @ k.transpose(-1, -2), dim=-1)
    torch.testing.assert_close(cls_attention, attn[:, :, 0, 1:].mean(1))
    torch.testing.assert_close(semantic, torch.softmax(v[:, :, :1] @ v.transpose(-1, -2), -1)[:, :, 0, 1:].mean(1))
    score = flowcut_score(cls_attention, semantic, value)
    expected = (cls_attention / cls_attention.sum(-1, keepdim=True) + semantic / semantic.sum(-1, keepdim=True)) \
        * v.mean(1)[:, 1:].abs().sum(-1)
    torch.testing.assert_close(score, expected)


@pytest.mark.parametrize("budget", [8, 20, 40])
def test_flowcut_tower_matches_official(budget):
    """The whole progressive pruning on an 8-block tiny CLIP tower (feature layer −2: prunes at rpl 4, 2, 0)."""
    model, processor = tiny_vlm("llava", vision_config={"num_hidden_layers": 8})
    inputs = _inputs(processor, two=False)
    tower = _tower(model)
    hidden = tower.pre_layrnorm(tower.embeddings(inputs["pixel_values"]))
    select_layer = len(tower.encoder.layers) - 2
    target = budget + 1
    cumulative, keep = None, torch.arange(hidden.shape[1]).expand(1, -1)
    for idx, layer in enumerate(tower.encoder.layers[:select_layer]):
        hidden, cumulative, keep = official_flowcut_layer(layer, hidden, target, select_layer - idx - 1, cumulative,
                                                          keep)
    official_patches = sorted((keep[0] + 1).tolist())  # keep indexes the patch columns
    with vtprune.pruned(model, "flowcut", budget=budget):
        with capture_lm_calls(model):
            model(**inputs)
        kept = vtprune.stats(model).samples[0].stages[0].kept_positions
    placeholders = torch.nonzero(inputs["input_ids"][0] == model.config.image_token_id).flatten()
    vtprune_patches = (torch.searchsorted(placeholders, kept) + 1).tolist()  # placeholder j = patch j + 1
    assert vtprune_patches == official_patches and len(official_patches) == budget


@pytest.mark.parametrize("r", [4, (5, -1)])
def test_tome_tower_matches_official_blocks(r):
    """ToMe's block (``tome/patch/timm.py`` L21-96: attention with + log(size), merge between attention and MLP,
    keys averaged over heads) run literally in eager math on the tiny CLIP tower, against vtprune's tower."""
    model, processor = tiny_vlm("llava", vision_config={"num_hidden_layers": 6})
    inputs = _inputs(processor, two=False)
    tower = _tower(model)
    x = tower.pre_layrnorm(tower.embeddings(inputs["pixel_values"]))
    feature = len(tower.encoder.layers) - 2
    schedule = parse_r(len(tower.encoder.layers), r)
    size = None
    for idx, layer in enumerate(tower.encoder.layers[:feature + 1]):
        sa = layer.self_attn
        b, n, c = x.shape
        h = layer.layer_norm1(x)
        q = sa.q_proj(h).view(b, n, sa.num_heads, sa.head_dim).transpose(1, 2)
        k = sa.k_proj(h).view(b, n, sa.num_heads, sa.head_dim).transpose(1, 2)
        v = sa.v_proj(h).view(b, n, sa.num_heads, sa.head_dim).transpose(1, 2)
        attn = (q @ k.transpose(-2, -1)) * sa.scale
        if size is not None:
            attn = attn + size.log()[:, None, None, :, 0]
        out = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c)
        x = x + sa.out_proj(out)
        if schedule[idx] > 0:
            if size is None:
                size = torch.ones_like(x[..., 0, None])
            x, size = official_tome_merge(k.mean(1), x, size, schedule[idx], True)
        x = x + layer.mlp(layer.layer_norm2(x))
    with vtprune.pruned(model, "tome", r=r):
        captured = {}
        handle = model.model.multi_modal_projector.register_forward_pre_hook(
            lambda module, args: captured.setdefault("features", args[0]))
        model(**inputs)
        handle.remove()
    features = captured["features"][0]  # [patches, d], removed slots zero
    alive = features.abs().sum(-1) > 0
    assert int(alive.sum()) == x.shape[1] - 1
    # the same tokens, in any order (vtprune keeps each at its representative patch)
    ours = features[alive]
    theirs = x[0, 1:]
    match = torch.cdist(theirs, ours).argmin(-1)
    assert sorted(match.tolist()) == list(range(ours.shape[0]))
    torch.testing.assert_close(ours[match], theirs, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Invariants on the tiny models
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_keep_all_is_unwrapped_and_remove_restores(tiny_models, family, method):
    if not _supported(family, method):
        pytest.skip("flowcut needs a [CLS] token")
    model, processor = tiny_models[family]
    inputs = _inputs(processor)
    reference = model(**inputs).logits
    with vtprune.pruned(model, method, budget=1.0):
        assert torch.equal(model(**inputs).logits, reference)
    vtprune.apply(model, method, BUDGET[family])
    pruned = model(**inputs).logits
    assert torch.equal(model(**inputs).logits, pruned)  # deterministic
    vtprune.remove(model)
    assert torch.equal(model(**inputs).logits, reference)
    assert all("forward" not in vars(layer) for layer in _tower(model).encoder.layers)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_batch_equals_one_by_one_and_generate(tiny_models, family, method):
    if not _supported(family, method):
        pytest.skip("flowcut needs a [CLS] token")
    model, processor = tiny_models[family]
    inputs = _inputs(processor)
    images = [tiny_image(0), tiny_image(1, size=(64, 40))]
    prompts = ["Describe the image.", "What is here?"]
    with vtprune.pruned(model, method, budget=BUDGET[family]):
        batch = model.generate(**inputs, max_new_tokens=3)
        batch_stats = vtprune.stats(model).samples
        width = inputs["input_ids"].shape[1]
        for i in range(2):
            single = tiny_inputs(processor, [images[i]], [prompts[i]])
            alone = model.generate(**single, max_new_tokens=3)
            assert torch.equal(alone[0, single["input_ids"].shape[1]:], batch[i, width:])
            one = vtprune.stats(model).samples[0]
            assert torch.equal(one.stages[0].kept_positions + (width - single["input_ids"].shape[1]),
                               batch_stats[i].stages[0].kept_positions)


@pytest.mark.parametrize("method", METHODS)
def test_llava_budget_and_stats(tiny_models, method):
    model, processor = tiny_models["llava"]
    inputs = _inputs(processor)
    with vtprune.pruned(model, method, budget=16):
        with capture_lm_calls(model) as calls:
            model(**inputs)
        stats = vtprune.stats(model)
    for b, sample in enumerate(stats.samples):
        stage = sample.stages[0]
        assert sample.visual_in == 64 and len(stage.kept_positions) + stage.merged == stage.visual_out == 16
        assert sample.visual_lengths == [16] * len(sample.visual_lengths)
        assert sample.flops < sample.flops_unpruned
        assert int(calls[0]["attention_mask"][b].sum()) == int(inputs["attention_mask"][b].sum()) - 48
    merged = stats.samples[0].stages[0].merged
    assert (merged > 0) if method == "tome" else merged == 0


def test_flowcut_reference_equivalence(tiny_models):
    """The pruned tower equals the unwrapped tower's layers run on the kept tokens (with their own position
    embeddings, added before the first block): flowcut prunes to the budget after block 0 of the tiny tower."""
    model, processor = tiny_models["llava"]
    inputs = _inputs(processor, two=False)
    tower = _tower(model)
    with vtprune.pruned(model, "flowcut", budget=16):
        captured = {}
        handle = model.model.multi_modal_projector.register_forward_pre_hook(
            lambda module, args: captured.setdefault("features", args[0]))
        model(**inputs)
        handle.remove()
    features = captured["features"][0]
    alive = torch.nonzero(features.abs().sum(-1) > 0).flatten() + 1  # token slots (CLS = 0)
    slots = torch.cat([torch.zeros(1, dtype=torch.long), alive])
    x = tower.encoder.layers[0](tower.pre_layrnorm(tower.embeddings(inputs["pixel_values"])), None)
    x = x[:, slots]
    x = tower.encoder.layers[1](x, None)  # the feature layer (−2 of 3)
    torch.testing.assert_close(features[alive - 1], x[0, 1:], rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore::vtprune.DegeneratePruningWarning")  # fastv after 2 stages: few tokens
@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_compositions(tiny_models, family):
    model, processor = tiny_models[family]
    inputs = _inputs(processor)
    for combo in (["tome", "fastv"], ["flowcut", "divprune"], ["tome", "random", "fastv"]):
        with vtprune.pruned(model, combo, budget=0.2):
            model.generate(**inputs, max_new_tokens=2)
            sample = vtprune.stats(model).samples[0]
            assert [s.name for s in sample.stages] == combo
            vit, second = sample.stages[0], sample.stages[1]
            if second.layer == 0:  # a pre-LLM stage selects among what the in-ViT stage left
                assert second.visual_out < vit.visual_out
                assert sample.visual_lengths[0] == second.visual_out
            assert sample.visual_lengths[-1] < sample.visual_lengths[0] or second.layer == 0
    with pytest.raises(VTPruneError, match="reads the vision encoder's attention"):
        vtprune.apply(model, ["tome", "fastervlm"], 0.2)
    with pytest.raises(VTPruneError, match="in-ViT method first"):
        vtprune.apply(model, ["divprune", "tome"], 0.2)


def test_refusals(tiny_models):
    with pytest.raises(UnsupportedModelError, match=r"\[CLS\]"):
        vtprune.apply(tiny_models["llava_onevision"][0], "flowcut", 0.4)
    for family in ("qwen2_vl", "qwen2_5_vl"):
        with pytest.raises(UnsupportedModelError, match="PatchMerger"):
            vtprune.apply(tiny_models[family][0], "tome", 0.4)
    assert not vtprune.is_pruned(tiny_models["qwen2_vl"][0])


def test_vision_flops_per_layer_lengths():
    model, _ = tiny_vlm("llava")
    layers = model.config.vision_config.num_hidden_layers
    full = vision_flops(model.config, 2)
    assert vision_flops(model.config, 2, vit_layer_lengths=[[65] * layers] * 2) == full
    assert vision_flops(model.config, 2, vit_layer_lengths=[[(65, 33), 33, 33]] * 2) < full
    with pytest.raises(ValueError, match="vit_layer_lengths"):
        vision_flops(model.config, 2, vit_layer_lengths=[[65] * layers])


def test_positions_original_and_compact(tiny_models):
    model, processor = tiny_models["llava"]
    inputs = _inputs(processor, two=False)
    for positions in ("original", "compact"):
        with vtprune.pruned(model, "tome", budget=16, positions=positions):
            with capture_lm_calls(model) as calls:
                model(**inputs)
            kept = vtprune.stats(model).samples[0].stages[0].kept_positions
        ids = calls[0]["position_ids"][0]
        length = int(inputs["input_ids"].shape[1]) - 48
        if positions == "compact":
            assert torch.equal(ids, torch.arange(length))
        else:
            placeholders = torch.nonzero(inputs["input_ids"][0] == model.config.image_token_id).flatten()
            first = int(placeholders[0])
            visual = ids[first:first + 16]  # the original positions of the 16 tokens, merged ones at their patch
            assert bool((visual[1:] > visual[:-1]).all()) and bool(torch.isin(visual, placeholders).all())
            assert bool(torch.isin(kept, visual).all()) and int(ids[first + 16]) == int(placeholders[-1]) + 1


def test_refuses_when_the_blocks_never_run(tiny_models):
    model, processor = tiny_models["llava"]
    inputs = _inputs(processor, two=False)
    with vtprune.pruned(model, "tome", budget=16):
        for layer in _tower(model).encoder.layers:  # as if transformers called the blocks some other way
            del layer.forward
        with pytest.raises(vtprune.SilentlyUnprunedError, match="in-ViT stage"):
            model(**inputs)


# ---------------------------------------------------------------------------------------------------------
# FlowCut's decoder stage for AnyRes inputs (flowcut_llm)
# ---------------------------------------------------------------------------------------------------------


def official_flowcut_llm(q, k, v, last, start, end, target, head_dim):
    """TungChintao/FlowCut @ a2ecd24 ``flowcut/modeling_llama_flowcut.py`` L246-290 (``LlamaSdpaAttention_forward``,
    one sample ``b``): ``q``/``k``/``v`` [H, L, dh] the layer's query/key states after RoPE and ``repeat_kv``, and its
    values; the visual span ``start:end``; ``last`` = ``last_instruct_pos``. ``utils_flowcut.compute_score``.
    Returns the kept visual indices (into the span), sorted."""
    vis_k, vis_v = k[:, start:end], v[:, start:end]
    text_q, text_v = q[:, last - 1:last], v[:, last - 1:last]
    relation = torch.softmax(torch.bmm(text_q, vis_k.transpose(1, 2)) / math.sqrt(head_dim), dim=-1,
                             dtype=torch.float32).mean(0)
    semantic = torch.softmax(torch.bmm(text_v, vis_v.transpose(1, 2)) / math.sqrt(head_dim), dim=-1,
                             dtype=torch.float32).mean(0)
    value = vis_v.mean(0)
    score = (relation / relation.sum(dim=-1, keepdim=True) + semantic / semantic.sum(dim=-1, keepdim=True)) \
        * torch.norm(value, p=1, dim=-1)
    return torch.topk(score, target, dim=1).indices.sort().values[0]


@pytest.mark.parametrize("seed", range(6))
def test_flowcut_llm_scores_match_official_formula(seed):
    torch.manual_seed(seed)
    q, k, v = torch.randn(4, 30, 8), torch.randn(4, 30, 8), torch.randn(4, 30, 8)
    start, end, last = 5, 25, 30
    ours = flowcut_llm_scores(q[:, last - 1:last], k[:, start:end], v[:, last - 1:last], v[:, start:end], 8 ** -0.5)
    assert torch.equal(flowcut_keep(ours[None], 7)[0], official_flowcut_llm(q, k, v, last, start, end, 7, 8))


def _layer_one_qkv(model, inputs):
    """Layer 1's query/key states (after RoPE, ``repeat_kv``) and values of the unwrapped model, built from its
    input with the modeling module's own functions, as the official patched attention holds them."""
    import sys

    lm = model.model.language_model
    layer = lm.layers[1]
    seen = {}
    handle = layer.register_forward_pre_hook(lambda m, a, kw: seen.update(hidden=a[0] if a else kw["hidden_states"],
                                                                          pe=kw["position_embeddings"]),
                                             with_kwargs=True)
    try:
        model(**inputs)
    finally:
        handle.remove()
    attn = layer.self_attn
    module = sys.modules[type(attn).__module__]
    x = layer.input_layernorm(seen["hidden"])
    b, n, _ = x.shape
    dh = attn.head_dim
    q = attn.q_proj(x).view(b, n, -1, dh).transpose(1, 2)
    k = attn.k_proj(x).view(b, n, -1, dh).transpose(1, 2)
    v = attn.v_proj(x).view(b, n, -1, dh).transpose(1, 2)
    cos, sin = seen["pe"]
    q, k = module.apply_rotary_pos_emb(q, k, cos, sin)
    groups = q.shape[1] // k.shape[1]
    return q, module.repeat_kv(k, groups), module.repeat_kv(v, groups), dh


@pytest.mark.parametrize("target", [4, 16, 40])
def test_flowcut_llm_tiny_llava_matches_official(tiny_models, target):
    model, processor = tiny_models["llava"]
    inputs = _inputs(processor, two=False)
    positions = torch.nonzero(inputs["input_ids"][0] == model.config.image_token_id).flatten()
    q, k, v, dh = _layer_one_qkv(model, inputs)
    start, end, last = int(positions[0]), int(positions[-1]) + 1, inputs["input_ids"].shape[1]
    official = official_flowcut_llm(q[0], k[0], v[0], last, start, end, target, dh)
    with vtprune.pruned(model, "flowcut_llm", target=target):
        model(**inputs)
        (stage,) = vtprune.stats(model).samples[0].stages
    assert stage.layer == 2 and torch.equal(stage.kept_positions, positions[official])


def test_flowcut_anyres_keeps_half_per_crop_then_the_budget_at_layer_two(tiny_models):
    from vtprune.engine.session import SESSION_ATTRIBUTE

    model, processor = tiny_models["llava_next"]
    inputs = _inputs(processor)
    with vtprune.pruned(model, "flowcut", budget=16):
        model(**{k: v[:1] for k, v in inputs.items()})  # one image: every tower row is one of its inputs
        rows = getattr(model, SESSION_ATTRIBUTE).vit_stage.layer_lengths()
        assert len(rows) > 1 and all(lengths[-1] == 16 // 2 + 1 for lengths in rows)  # + [CLS]
        batch = model.generate(**inputs, max_new_tokens=3)
        for sample in vtprune.stats(model).samples:
            vit, llm = sample.stages
            assert (vit.name, vit.layer, llm.name, llm.layer) == ("flowcut", 0, "flowcut_llm", 2)
            assert llm.kept_positions.numel() == 16 and bool(torch.isin(llm.kept_positions, vit.kept_positions).all())
        width = inputs["input_ids"].shape[1]
        for i, (image, prompt) in enumerate(zip([tiny_image(0), tiny_image(1, size=(64, 40))],
                                                ["Describe the image.", "What is here?"], strict=True)):
            single = tiny_inputs(processor, [image], [prompt])
            alone = model.generate(**single, max_new_tokens=3)
            assert torch.equal(alone[0, single["input_ids"].shape[1]:], batch[i, width:])
    with vtprune.pruned(model, "flowcut", budget=16, llm=False):
        model(**inputs)
        assert [s.name for s in vtprune.stats(model).samples[0].stages] == ["flowcut"]
    with vtprune.pruned(model, "flowcut", budget=0.4):  # a fraction: the official target_num is a count
        model(**inputs)
        assert [s.name for s in vtprune.stats(model).samples[0].stages] == ["flowcut"]
    with pytest.raises(MethodOptionError, match="int budget"):
        vtprune.apply(model, "flowcut", 0.4, llm=True)
    with pytest.raises(MethodOptionError, match="target"):
        vtprune.apply(model, "flowcut_llm", target=0)
    assert not vtprune.is_pruned(model)
    llava, _ = tiny_models["llava"]
    with vtprune.pruned(llava, "flowcut", budget=16):  # LLaVA-1.5: the ViT stage alone, as officially
        llava(**tiny_inputs(tiny_models["llava"][1], [tiny_image(0)], ["Hi"]))
        assert [s.name for s in vtprune.stats(llava).samples[0].stages] == ["flowcut"]
