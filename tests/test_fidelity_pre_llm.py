"""Fidelity of the pre-LLM methods (design.md invariant 12): on identical float32 inputs each method keeps what
its official code keeps, at the official defaults.

Each ``official_*`` function below is this project's own transcription of the official selection routine, written
from reading the official repository at the commit cited (file and lines in its docstring): batch of one,
explicit loops, no code taken over. Every test runs the transcription and vtprune on the same tensors and asserts
identical kept sets (and, for VisionZip, the same merged tokens within float32 tolerance):

* on >= 20 random cases per method;
* on a tiny model's real signals (``tiny_vlm("llava")``; ``tiny_vlm("llava_next")`` for the per-crop rules),
  taken from an *eager* run of the vision tower with ``output_attentions`` as the official code does, and
  compared with ``vtprune.stats(model).samples[0].stages[0].kept_positions`` (VisionZip: also with the
  sequence the language model receives).

The HF classes differ from the official LLaVA code in one way these tests cannot hide: on LLaVA-NeXT the
official FasterVLM / VisionZip code neither unpads the crops nor inserts row newlines, and ranks each crop's
full patch grid; HF unpads, so the transcription is run on the patches a crop keeps after unpadding.
"""

from __future__ import annotations

import pytest
import torch
from reference_runs import capture_lm_calls

import vtprune
from vtprune.adapters.base import adapter_for
from vtprune.budget import split_equal, split_proportional
from vtprune.registry import VisualGroup, method_class
from vtprune.selectors.cls_attention import softmax_attention_rows, topk_select
from vtprune.selectors.divprune import divprune_select
from vtprune.selectors.visionzip import split_visionzip_budget
from vtprune.testing import tiny_image, tiny_inputs

RANDOM_CASES = 24
PROMPT = "Describe the image."


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


# ---------------------------------------------------------------------------------------------------------
# Transcriptions of the official selection routines
# ---------------------------------------------------------------------------------------------------------


def official_fastervlm(cls_row: torch.Tensor, k: int) -> torch.Tensor:
    """FasterVLM, Theia-4869/FasterVLM @ f5d5f12037e105a51865ecb4b28a73cd86eb4921:
    ``llava/model/multimodal_encoder/clip_encoder.py`` L36-47 (``feature_select``: the CLS query's attention
    row of ``attentions[select_layer]`` over the patch keys) and ``llava/model/llava_arch.py`` L141-157
    (``encode_images``: mean over heads, ``topk`` of ``visual_token_num``, a boolean index mask), L241-247
    (LLaVA-1.5: the features under the mask, i.e. in raster order), L185-223 (LLaVA-NeXT: the same k in the
    base image and in every crop; ``mm_patch_merge_type`` forced to ``'spatial'``, so no unpadding).

    ``cls_row`` [H, N]: attention probabilities of the CLS query to the N patches, per head. Returns the kept
    patch indices in raster order.
    """
    per_patch = cls_row.mean(dim=0)
    chosen = torch.topk(per_patch, k=k).indices
    index_mask = torch.zeros(per_patch.shape[0], dtype=torch.bool)
    index_mask[chosen] = True
    return torch.nonzero(index_mask).flatten()


def official_visionzip(attention: torch.Tensor, hidden: torch.Tensor, metric: torch.Tensor, dominant: int,
                       contextual: int):
    """VisionZip, dvlab-research/VisionZip @ 3151f6df4fca36a4cd1c985e5956e725b1f9ad02:
    ``visionzip/main.py`` L6-8 (``visionzip(model, dominant, contextual)`` passes ``dominant - 1`` to the
    tower), ``visionzip/clip_encoder.py`` L43-83 (selection and merging), ``visionzip/utils.py`` L22-24, L89
    and L186-197 (the metric: the raw keys of layer -2, averaged over heads).

    ``attention`` [H, T]: the CLS query's attention row at layer -2 over all T = 1 + N tokens (CLS first);
    ``hidden`` [T, dv]: ``hidden_states[-2]``; ``metric`` [T, dk]. Returns (kept patch indices, 0-based,
    raster order; the tokens the tower outputs [dominant + contextual, dv] in the official order: CLS, the
    dominant patches in raster order, the contextual tokens in target order).
    """
    total = hidden.shape[0]
    dominant_patches = dominant - 1
    summed = attention[:, 1:].sum(dim=0)  # over heads
    picked = summed.topk(dominant_patches).indices + 1  # token indices (CLS is 0)
    dropped = torch.ones(total, dtype=torch.bool)
    dropped[0] = False
    dropped[picked] = False
    dominant_tokens = hidden[~dropped]  # CLS first, then the picked patches in token order

    rest_metric, rest_hidden = metric[dropped], hidden[dropped]
    unit = rest_metric / rest_metric.norm(dim=-1, keepdim=True)
    rest = unit.shape[0]
    step = max(1, rest // contextual)
    targets = torch.arange(0, rest, step)[:contextual]
    is_target = torch.isin(torch.arange(rest), targets)
    similarity = unit[~is_target] @ unit[targets].T
    one_hot = torch.zeros(int((~is_target).sum()), contextual, dtype=hidden.dtype)
    one_hot[torch.arange(one_hot.shape[0]), similarity.argmax(dim=1)] = 1
    counts = one_hot.sum(dim=0).clamp(min=1)[:, None]
    contextual_tokens = rest_hidden[targets] + (one_hot.T @ rest_hidden[~is_target]) / counts
    kept = torch.sort(picked - 1).values
    return kept, torch.cat([dominant_tokens, contextual_tokens])


def official_divprune(features: torch.Tensor, k: int) -> torch.Tensor:
    """DivPrune, vbdi/divprune @ 799e2d950aa01ba7860907f5a6d86061f885dca6: ``LLaVA/llava/model/llava_arch.py``
    L147-171 (``pairwise_cosine_similarity``, ``DivPrune``) and L365-381 (applied to the image's LLM input
    embeddings; the kept indices sorted back into sequence order).

    ``features`` [N, D]. Returns the kept indices, ascending.
    """
    unit = features / features.norm(dim=1, keepdim=True)
    distance = 1.0 - unit @ unit.T
    selected = []
    for step in range(k):
        if step == 0:  # second-smallest distance in each column: the nearest other token
            scores = torch.topk(distance, 2, dim=0, largest=False).values[1, :]
        else:
            scores = distance[torch.tensor(selected)].min(dim=0).values
        selected.append(int(torch.argmax(scores)))
    return torch.sort(torch.tensor(selected)).values


# ---------------------------------------------------------------------------------------------------------
# Random cases
# ---------------------------------------------------------------------------------------------------------


def _random_vit(seed: int):
    """Random q/k of one ViT layer (CLS first) -> (per-head CLS attention row [H, T], keys mean [T, dk])."""
    gen = torch.Generator().manual_seed(seed)
    heads = int(torch.randint(1, 5, (1,), generator=gen))
    head_dim = int(torch.randint(2, 9, (1,), generator=gen))
    side = int(torch.randint(3, 9, (1,), generator=gen))
    tokens = 1 + side * side
    queries = torch.randn(heads, tokens, head_dim, generator=gen) * 2
    keys = torch.randn(heads, tokens, head_dim, generator=gen) * 2
    probs = softmax_attention_rows(queries[:, :1], keys)[:, 0]  # [H, T], eager-style probabilities
    return gen, probs, keys.mean(dim=0), tokens


@pytest.mark.parametrize("seed", range(RANDOM_CASES))
def test_fastervlm_random(seed):
    gen, probs, _, tokens = _random_vit(seed)
    k = int(torch.randint(1, tokens - 1, (1,), generator=gen))
    ours = topk_select(probs.mean(dim=0)[1:], k)  # what the adapter hands the selector: head mean, patches only
    assert torch.equal(ours, official_fastervlm(probs[:, 1:], k))


def _visionzip_group(probs, hidden, metric):
    """The VisualGroup the engine builds for one CLIP image (signals without the CLS row, its state apart)."""
    patches = hidden.shape[0] - 1
    return VisualGroup(
        features=hidden[1:], height=None, width=None, project=lambda x: x,
        signals={"cls_attention": probs.mean(dim=0)[1:], "vit_keys": metric[1:], "vit_hidden": hidden[1:],
                 "vit_cls_hidden": hidden[:1].expand(patches, -1)},
    )


@pytest.mark.parametrize("seed", range(RANDOM_CASES))
def test_visionzip_random(seed):
    gen, probs, metric, tokens = _random_vit(seed)
    patches = tokens - 1
    hidden = torch.randn(tokens, 6, generator=gen)
    budget = int(torch.randint(4, patches - 1, (1,), generator=gen))
    dominant, contextual = split_visionzip_budget(budget)
    if seed % 3 == 0:  # other splits, as the options give them
        contextual = int(torch.randint(1, budget - 1, (1,), generator=gen))
        dominant = budget - contextual
    kept, tokens_out = official_visionzip(probs, hidden, metric, dominant, contextual)
    method = method_class("visionzip")(budget=budget, dominant=dominant, contextual=contextual)
    selection = method.select(_visionzip_group(probs, hidden, metric), budget)
    assert torch.equal(selection.keep, kept)
    assert selection.keep.numel() + selection.num_merged == budget == tokens_out.shape[0]
    # merged: [CLS, contextual...]; the official's dominant block is CLS + the kept patches
    torch.testing.assert_close(selection.merged[0], tokens_out[0], rtol=0, atol=0)
    torch.testing.assert_close(hidden[1:][selection.keep], tokens_out[1:dominant], rtol=0, atol=0)
    torch.testing.assert_close(selection.merged[1:], tokens_out[dominant:], rtol=1e-5, atol=1e-6)
    # placement: CLS before the image's first token, the contextual tokens after its last one
    assert selection.order.tolist() == [-1] + [1] * contextual
    assert selection.anchors.tolist() == [0] + [patches - 1] * contextual


@pytest.mark.parametrize("seed", range(RANDOM_CASES))
def test_visionzip_without_cls_random(seed):
    """``keep_cls=False`` (and encoders without CLS): ``dominant`` patches, no CLS; the official routine with
    one more dominant slot would take the same patches plus the CLS."""
    gen, probs, metric, tokens = _random_vit(seed)
    hidden = torch.randn(tokens, 6, generator=gen)
    budget = int(torch.randint(4, tokens - 2, (1,), generator=gen))
    dominant, contextual = split_visionzip_budget(budget)
    kept, tokens_out = official_visionzip(probs, hidden, metric, dominant + 1, contextual)
    method = method_class("visionzip")(budget=budget, keep_cls=False)
    selection = method.select(_visionzip_group(probs, hidden, metric), budget)
    assert torch.equal(selection.keep, kept)
    torch.testing.assert_close(selection.merged, tokens_out[dominant + 1:], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", range(RANDOM_CASES))
def test_divprune_random(seed):
    gen = torch.Generator().manual_seed(1000 + seed)
    n = int(torch.randint(8, 120, (1,), generator=gen))
    features = torch.randn(n, int(torch.randint(4, 40, (1,), generator=gen)), generator=gen)
    if seed % 4 == 0:  # clustered tokens, as image tokens are
        features = features[torch.randint(0, max(2, n // 6), (n,), generator=gen)] + 0.05 * torch.randn_like(features)
    k = int(torch.randint(1, n, (1,), generator=gen))
    assert torch.equal(divprune_select(features, k), official_divprune(features, k))


def test_equal_share_per_crop():
    """FasterVLM's / VisionZip's LLaVA-NeXT rule: the same k in the base image and in every crop."""
    assert split_equal(145, [576] * 5) == [29] * 5
    assert split_equal(64, [576] * 5) == [13, 13, 13, 13, 12]
    assert split_equal(64, [576, 10, 576]) == [28, 10, 26]  # a crop smaller than its share keeps all of it
    assert split_equal(5000, [3, 4]) == [3, 4]


# ---------------------------------------------------------------------------------------------------------
# Real signals of tiny models
# ---------------------------------------------------------------------------------------------------------


def eager_vision_signals(model, pixel_values):
    """What the official code reads from the vision tower, from an eager run with output_attentions: per
    vision row the CLS attention row of the feature layer [H, T], ``hidden_states[feature_layer]`` [T, dv]
    and the head-mean raw keys of that layer [T, dk]."""
    tower = model.model.vision_tower
    feature_layer = model.config.vision_feature_layer
    layers = getattr(tower, "vision_model", tower).encoder.layers
    attention = layers[len(layers) + feature_layer].self_attn
    keys = {}
    handle = attention.k_proj.register_forward_hook(lambda module, args, output: keys.update(k=output))
    previous = model.config.vision_config._attn_implementation
    tower.set_attn_implementation("eager")
    try:
        out = tower(pixel_values, output_attentions=True, output_hidden_states=True)
    finally:
        tower.set_attn_implementation(previous)
        handle.remove()
    rows, tokens, _ = keys["k"].shape
    metric = keys["k"].view(rows, tokens, attention.num_heads, attention.head_dim).mean(dim=2)
    attentions = out.attentions[feature_layer]  # [rows, H, T, T]
    return attentions[:, :, 0, :], out.hidden_states[feature_layer], metric


def lm_embeds(model, inputs) -> torch.Tensor:
    """The inputs_embeds [L, D] the language model receives for sample 0 (a hook registered after vtprune's
    own pre-hook, so under pruning it sees the pruned call)."""
    with capture_lm_calls(model) as calls:
        model(**inputs)
    return calls[-1]["inputs_embeds"][0]


def unpruned_lm_embeds(model, inputs) -> torch.Tensor:
    """The inputs_embeds [L, D] the unpruned language model receives for sample 0."""
    return lm_embeds(model, inputs)


def run_pruned(model, inputs, method, budget, **options):
    """Kept positions of sample 0 and the inputs_embeds the language model received."""
    with vtprune.pruned(model, method, budget, **options):
        embeds = lm_embeds(model, inputs)
        stage = vtprune.stats(model).samples[0].stages[0]
    return stage, embeds


def _llava_case(tiny_models, image_seed=0):
    model, processor = tiny_models["llava"]
    inputs = tiny_inputs(processor, [tiny_image(image_seed)], [PROMPT])
    positions = torch.nonzero(inputs["input_ids"][0] == model.config.image_token_id).flatten()
    return model, inputs, positions


@pytest.mark.parametrize("budget", [4, 8, 16, 29, 40])
@pytest.mark.parametrize("image_seed", [0, 3])
def test_fastervlm_tiny_llava(tiny_models, budget, image_seed):
    model, inputs, positions = _llava_case(tiny_models, image_seed)
    attention, _, _ = eager_vision_signals(model, inputs["pixel_values"])
    stage, _ = run_pruned(model, inputs, "fastervlm", budget)
    assert torch.equal(stage.kept_positions, positions[official_fastervlm(attention[0][:, 1:], budget)])


@pytest.mark.parametrize("budget", [4, 8, 16, 29, 40])
@pytest.mark.parametrize("image_seed", [0, 3])
def test_visionzip_tiny_llava(tiny_models, budget, image_seed):
    """Kept patches, merged values and placement: the language model receives the official image block
    [CLS, dominant patches, contextual tokens], projected, in place of the image placeholders."""
    model, inputs, positions = _llava_case(tiny_models, image_seed)
    attention, hidden, metric = eager_vision_signals(model, inputs["pixel_values"])
    dominant, contextual = split_visionzip_budget(budget)
    kept, tokens_out = official_visionzip(attention[0], hidden[0], metric[0], dominant, contextual)
    stage, embeds = run_pruned(model, inputs, "visionzip", budget)
    assert torch.equal(stage.kept_positions, positions[kept])
    assert stage.merged == 1 + contextual and stage.visual_out == budget
    unpruned = unpruned_lm_embeds(model, inputs)
    first, last = int(positions[0]), int(positions[-1])
    expected = torch.cat([unpruned[:first], model.model.multi_modal_projector(tokens_out), unpruned[last + 1:]])
    assert embeds.shape == expected.shape
    torch.testing.assert_close(embeds, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("budget", [4, 16, 40])
def test_divprune_tiny_llava(tiny_models, budget):
    model, inputs, positions = _llava_case(tiny_models)
    features = unpruned_lm_embeds(model, inputs)[positions]  # the image's LLM input embeddings, as officially
    stage, _ = run_pruned(model, inputs, "divprune", budget)
    assert torch.equal(stage.kept_positions, positions[official_divprune(features, budget)])


def _next_groups(model, inputs):
    """Per group of the single image (base, then crops): (sequence positions [g], vision row, patch indices)."""
    (layout,) = adapter_for(model).build_layouts(dict(inputs))
    (image,) = layout.images
    return [(image.positions[g.members], int(g.vision_row[0]), g.patch_index) for g in image.groups], image


@pytest.mark.parametrize("budget", [10, 24, 60, 0.25])
@pytest.mark.parametrize("size", [(40, 80), (64, 64), (64, 50), (70, 40)])  # the last two: unpadded crops
def test_fastervlm_tiny_llava_next_equal_share_per_crop(tiny_models, budget, size):
    """Official LLaVA-NeXT rule: the same k in the base image and in every crop; the top-k of each (here among
    the crop's patches that survive HF's unpadding)."""
    model, processor = tiny_models["llava_next"]
    inputs = tiny_inputs(processor, [tiny_image(1, size)], [PROMPT])
    pixel_values = inputs["pixel_values"][0]  # [crops, 3, H, W] of the one image
    attention, _, _ = eager_vision_signals(model, pixel_values)
    groups, image = _next_groups(model, inputs)
    assert len(groups) > 2
    content = sum(len(g[0]) for g in groups)
    total = budget if isinstance(budget, int) else round(budget * content)
    shares = split_equal(total, [len(g[0]) for g in groups])
    expected = []
    for (group_positions, row, patch_index), k in zip(groups, shares, strict=True):
        scores = attention[row][:, 1:][:, patch_index]  # the crop's unpadded patches
        expected.append(group_positions[official_fastervlm(scores, k)])
    stage, _ = run_pruned(model, inputs, "fastervlm", budget)
    content_kept = stage.kept_positions[torch.isin(stage.kept_positions, torch.cat([g[0] for g in groups]))]
    assert torch.equal(content_kept, torch.sort(torch.cat(expected)).values)
    # a crop that HF does not unpad is ranked exactly as the official code ranks it (its full patch grid)
    for (group_positions, row, patch_index), k in zip(groups, shares, strict=True):
        if patch_index.numel() == attention.shape[-1] - 1:
            official = official_fastervlm(attention[row][:, 1:], k)
            assert torch.equal(group_positions[official], torch.sort(group_positions[official]).values)
            assert bool(torch.isin(group_positions[official], stage.kept_positions).all())


@pytest.mark.parametrize("budget", [15, 40])
@pytest.mark.parametrize("size", [(40, 80), (64, 50)])
def test_visionzip_tiny_llava_next(tiny_models, budget, size):
    """Per crop (equal shares): the official dominant patches and tokens of each crop, among its unpadded
    patches; the sequence holds the base block [CLS, dominant, contextual], the crop grid, then every crop's
    CLS, then every crop's contextual tokens."""
    model, processor = tiny_models["llava_next"]
    inputs = tiny_inputs(processor, [tiny_image(1, size)], [PROMPT])
    pixel_values = inputs["pixel_values"][0]
    attention, hidden, metric = eager_vision_signals(model, pixel_values)
    groups, image = _next_groups(model, inputs)
    shares = split_equal(budget, [len(g[0]) for g in groups])
    kept, blocks = [], []
    for (group_positions, row, patch_index), k in zip(groups, shares, strict=True):
        tokens = torch.cat([torch.zeros(1, dtype=torch.long), patch_index + 1])  # CLS + the unpadded patches
        dominant, contextual = split_visionzip_budget(k)
        group_kept, out = official_visionzip(attention[row][:, tokens], hidden[row][tokens], metric[row][tokens],
                                             dominant, contextual)
        kept.append(group_positions[group_kept])
        blocks.append((out, dominant))
    stage, embeds = run_pruned(model, inputs, "visionzip", budget)
    content = torch.cat([g[0] for g in groups])
    assert torch.equal(stage.kept_positions[torch.isin(stage.kept_positions, content)],
                       torch.sort(torch.cat(kept)).values)
    project = model.model.multi_modal_projector
    unpruned = unpruned_lm_embeds(model, inputs)
    base_last = int(groups[0][0][-1])
    crop_grid = stage.kept_positions[stage.kept_positions > base_last]  # kept crop patches and row newlines
    expected = torch.cat([
        unpruned[:int(image.positions[0])],
        project(blocks[0][0]),                                            # base: CLS, dominant, contextual
        unpruned[crop_grid],                                              # the crop grid
        project(torch.stack([out[0] for out, _ in blocks[1:]])),          # every crop's CLS
        project(torch.cat([out[dominant:] for out, dominant in blocks[1:]])),  # every crop's contextual tokens
        unpruned[int(image.positions[-1]) + 1:],
    ])
    assert embeds.shape == expected.shape
    torch.testing.assert_close(embeds, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_vl"])
def test_visionzip_without_cls_token_keeps_the_cls_free_variant(tiny_models, family):
    """Encoders without a [CLS] token (SigLIP, Qwen ViT) never get one: no extra token, ``keep_cls=True``
    refused at the first forward."""
    model, processor = tiny_models[family]
    assert "vit_cls_hidden" not in adapter_for(model).provides
    inputs = tiny_inputs(processor, [tiny_image(0)], [PROMPT])
    with vtprune.pruned(model, "visionzip", 8):
        model(**inputs)
        stage = vtprune.stats(model).samples[0].stages[0]
    (layout,) = adapter_for(model).build_layouts(dict(inputs))
    shares = split_equal(8, [g.size for g in layout.images[0].groups])
    assert stage.merged == sum(split_visionzip_budget(k)[1] for k in shares)  # contextual tokens only
    with vtprune.pruned(model, "visionzip", 8, keep_cls=True), pytest.raises(vtprune.MethodOptionError):
        model(**inputs)


@pytest.mark.parametrize("method", ["fastervlm", "visionzip"])
def test_equal_share_only_where_each_group_is_one_crop(tiny_models, monkeypatch, method):
    """LLaVA-NeXT: the same k per crop; LLaVA-OneVision (base view + one group of packed high-resolution crops)
    keeps the proportional split."""
    shares = []
    cls = method_class(method)
    original = cls.select
    monkeypatch.setattr(cls, "select", lambda self, group, k: shares.append((group.num_tokens, k))
                        or original(self, group, k))
    for family, split in (("llava_next", split_equal), ("llava_onevision", split_proportional)):
        model, processor = tiny_models[family]
        inputs = tiny_inputs(processor, [tiny_image(1, (64, 50))], [PROMPT])
        shares.clear()
        with vtprune.pruned(model, method, 20):
            model(**inputs)
        sizes = [n for n, _ in shares]
        assert len(sizes) > 1 and [k for _, k in shares] == split(20, sizes), family
