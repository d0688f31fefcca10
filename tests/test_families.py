"""Family-specific parts of the Qwen-VL and LLaVA-OneVision adapters.

* CLS-free signals: the mean attention each merged token receives at the feature layer, computed from q/k on
  the SDPA model, equals the same quantity taken from an *eager* copy's attention probabilities (test-only);
  Qwen2.5-VL's window order is undone; captured merger inputs project back to the image features.
* LLaVA-OneVision with a downsampled (``anyres_max``) high-resolution grid.
* Qwen3-VL deepstack features: a merging method without merge weights is refused with an explicit error.
* ``vtprune run`` on each tiny family.
"""

from __future__ import annotations

import copy
import sys
from contextlib import contextmanager

import pytest
import torch

import vtprune
from vtprune.adapters.base import adapter_for, supported_model_classes
from vtprune.engine.side_inputs import MergedRows, gather_side_rows
from vtprune.registry import Method, Selection, method_class
from vtprune.testing import tiny_image, tiny_inputs, tiny_vlm

CLS_FREE = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_onevision")


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@contextmanager
def recorded_groups(monkeypatch, method: str):
    """The VisualGroup every ``select`` call of ``method`` received."""
    groups = []
    cls = method_class(method)
    original = cls.select
    with monkeypatch.context() as patch:
        patch.setattr(cls, "select", lambda self, group, k: groups.append(group) or original(self, group, k))
        yield groups


def eager_received_attention(model, inputs, family: str) -> list[torch.Tensor]:
    """Per vision-encoder attention segment of the feature layer (image for Qwen, crop for OneVision): the
    attention each token receives, mean over heads and queries, from an eager copy's probabilities."""
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    if family == "llava_onevision":
        tower = eager.model.vision_tower
        layers = getattr(tower, "vision_model", tower).encoder.layers
        target = layers[len(layers) + eager.config.vision_feature_layer].self_attn
    else:
        target = eager.model.visual.blocks[-1].attn
    module = sys.modules[type(target).__module__]
    original = module.eager_attention_forward
    received = []

    def recording(attention, *args, **kwargs):
        output, weights = original(attention, *args, **kwargs)
        if attention is target:  # [rows, H, Q, K]
            received.extend(weights.float().mean(dim=(1, 2)))
        return output, weights

    module.eager_attention_forward = recording
    try:
        eager(**inputs)
    finally:
        module.eager_attention_forward = original
    return received


@pytest.mark.parametrize("family", CLS_FREE)
def test_cls_free_scores_match_eager_attention(family, tiny_models, monkeypatch):
    model, processor = tiny_models[family]
    inputs = tiny_inputs(processor, [tiny_image(0), tiny_image(3, (80, 40))], ["Describe.", "What is it?"])
    with recorded_groups(monkeypatch, "fastervlm") as groups, vtprune.pruned(model, "fastervlm", 4):
        model(**inputs)
    received = eager_received_attention(model, inputs, family)
    if family == "llava_onevision":  # segments are crops; each image's first group is its base view (one crop)
        crops = adapter_for(model)._crops_per_image(inputs)
        assert len(received) == sum(crops) and all(c > 1 for c in crops)
        bases, first_rows = groups[0::2], [0, crops[0]]  # per image: base view, then the high-resolution grid
        for group, row in zip(bases, first_rows, strict=True):
            assert (group.height, group.width) == (8, 8)
            torch.testing.assert_close(group.signals["cls_attention"], received[row], rtol=1e-5, atol=1e-6)
        return
    merge = model.config.vision_config.spatial_merge_size
    grids = inputs["image_grid_thw"]
    expected = []
    for (t, h, w), scores in zip(grids.tolist(), received, strict=True):  # the last block attends per image
        if family == "qwen2_5_vl":  # the block ran in window order: the model's own reverse permutation
            from transformers.vision_utils import get_vision_window_index

            vc = model.config.vision_config
            window, _ = get_vision_window_index(torch.tensor([[t, h, w]]), merge, vc.window_size, vc.patch_size)
            scores = scores.view(-1, merge * merge)[torch.argsort(window)].reshape(-1)
        expected.append(scores.view(-1, merge * merge).mean(dim=1))
    assert len(groups) == 2
    for group, scores in zip(groups, expected, strict=True):
        torch.testing.assert_close(group.signals["cls_attention"], scores, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["llava", "llava_onevision"])
def test_attention_signals_reuse_the_feature_layers_projections(family, tiny_models):
    """cls_attention and vit_keys come from the feature layer's own q_proj / k_proj outputs: with a method that
    reads both (visionzip), each projection runs exactly as often as in the unpruned model (no second projection of
    every patch, which costs as much as the layer's attention itself on long clips)."""
    model, processor = tiny_models[family]
    inputs = tiny_inputs(processor, [tiny_image(0)], ["Describe."])
    attention = adapter_for(model)._vision_layers()[adapter_for(model)._feature_layer_index()].self_attn
    calls = {"q": [], "k": []}
    handles = [attention.q_proj.register_forward_hook(lambda m, a, o: calls["q"].append(tuple(o.shape))),
               attention.k_proj.register_forward_hook(lambda m, a, o: calls["k"].append(tuple(o.shape)))]
    try:
        model(**inputs)
        unpruned = {k: list(v) for k, v in calls.items()}
        calls["q"].clear()
        calls["k"].clear()
        with vtprune.pruned(model, "visionzip", budget=8):
            model(**inputs)
            signals = vtprune.stats(model).samples[0]
    finally:
        for h in handles:
            h.remove()
    assert calls == unpruned and len(unpruned["q"]) >= 1
    assert signals.stages[0].visual_out < signals.visual_in  # it pruned


@pytest.mark.parametrize("family", CLS_FREE)
def test_captured_vision_states_project_to_the_image_features(family, tiny_models, monkeypatch):
    """The merger / projector inputs captured for VisionZip map back to the exact LLM tokens (so the window
    order, 2x2 grouping and packing are undone correctly)."""
    model, processor = tiny_models[family]
    inputs = tiny_inputs(processor, [tiny_image(0), tiny_image(3, (80, 40))], ["Describe.", "What is it?"])
    with recorded_groups(monkeypatch, "visionzip") as groups, vtprune.pruned(model, "visionzip", 4):
        model(**inputs)
        adapter = adapter_for(model)
        for group in groups:
            torch.testing.assert_close(adapter.project(group.signals["vit_hidden"]), group.features,
                                       rtol=1e-5, atol=1e-5)
            assert group.signals["vit_keys"].shape[0] == group.num_tokens


def test_onevision_downsampled_grid(monkeypatch):
    """``anyres_max_1`` makes the model interpolate the unpadded crop grid; the layout and signals follow."""
    model, processor = tiny_vlm("llava_onevision", vision_aspect_ratio="anyres_max_1")
    inputs = tiny_inputs(processor, [tiny_image(0)], ["Describe the image."])
    layout = adapter_for(model).build_layouts(dict(inputs))[0]
    (image,) = layout.images
    base, high = image.groups
    assert image.num_tokens == int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert (base.height, base.width) == (8, 8)
    # 2 x 2 crops of 8 x 8, unpadded to 12 x 16, interpolated by 1 / sqrt(12 * 16 / 64) -> 6 x 9
    assert (high.height, high.width) == (6, 9)
    assert int(image.structural.sum()) == high.height
    for method in ("fastervlm", "visionzip", "pool"):
        with recorded_groups(monkeypatch, method) as groups, vtprune.pruned(model, method, 12):
            logits = model(**inputs).logits
            stats = vtprune.stats(model).samples[0]
        assert [g.num_tokens for g in groups] == [64, 54]
        for group in groups:
            for name, signal in group.signals.items():
                assert signal.shape[0] == group.num_tokens and bool(torch.isfinite(signal).all()), name
        assert stats.pruned and logits.shape[1] == stats.layer_lengths[0]


@pytest.mark.parametrize("method", ["fastervlm", "pool", "fastv"])
def test_onevision_several_images_per_sample(method, tiny_models):
    """A sample with several images gets no AnyRes crops (base view + one newline each); a padded batch of such
    a sample, a one-image sample and a text-only one equals each sample alone."""
    model, processor = tiny_models["llava_onevision"]
    images = [[tiny_image(0), tiny_image(3, (40, 80))], [tiny_image(1)], []]
    prompts = ["Compare the images.", "Describe the picture in detail.", "Hi"]

    def encode(rows: list[int], padding_side: str = "left"):
        """The processor on nested images (tiny_inputs flattens them, which means one image per sample)."""
        texts = [processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}] * len(images[b]) + [{"type": "text", "text": prompts[b]}]}],
            add_generation_prompt=True, tokenize=False) for b in rows]
        nested = [images[b] for b in rows if images[b]]
        return processor(text=texts, images=nested or None, return_tensors="pt", padding=True,
                         padding_side=padding_side)

    inputs = encode([0, 1, 2])
    assert inputs["batch_num_images"].tolist() == [2, 1]
    layouts = adapter_for(model).build_layouts(dict(inputs))
    assert [len(layout.images) for layout in layouts] == [2, 1, 0]
    for image in layouts[0].images:
        assert image.num_tokens == 65 and int(image.structural.sum()) == 1 and len(image.groups) == 1
    assert len(layouts[1].images[0].groups) == 2  # a single image gets its crops
    budget = 16 if method != "fastv" else 0.6
    with vtprune.pruned(model, method, budget):
        logits = model(**inputs).logits
        stats = vtprune.stats(model)
        tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False)[:, inputs["input_ids"].shape[1]:]
        for b in range(3):
            single = encode([b])
            alone = model(**single).logits[0]
            n = alone.shape[0]
            assert n == stats.samples[b].layer_lengths[-1]
            torch.testing.assert_close(logits[b, -n:], alone, rtol=1e-4, atol=1e-4)
            alone_tokens = model.generate(**single, max_new_tokens=4, do_sample=False)[0, single["input_ids"].shape[1]:]
            assert tokens[b, :alone_tokens.numel()].tolist() == alone_tokens.tolist()
    assert stats.samples[0].pruned and stats.samples[1].pruned


class _MergeWithoutWeights(Method):
    """A test method that merges every token into one without declaring merge weights."""

    name = "_merge_without_weights"

    def select(self, group, k):
        return Selection(keep=torch.empty(0, dtype=torch.long), merged=group.features.mean(0, keepdim=True),
                         anchors=torch.zeros(1, dtype=torch.long))


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_deepstack_refuses_merges_without_weights(family, tiny_models):
    model, processor = tiny_models[family]
    inputs = tiny_inputs(processor, [tiny_image(0)], ["Describe the image."])
    with vtprune.pruned(model, _MergeWithoutWeights(budget=4)):
        if family == "qwen3_vl":  # its deepstack rows cannot follow a merge of unknown composition
            with pytest.raises(vtprune.UnsupportedModelError, match="without merge weights"):
                model(**inputs)
        else:  # no deepstack: the merged token needs nothing else
            model(**inputs)
            assert vtprune.stats(model).samples[0].stages[0].merged == 1


def test_side_rows_of_unknown_merged_tokens_raise():
    mask = torch.tensor([[False, True, True, False]])
    rows = torch.arange(4.0).view(2, 2)
    columns = [(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 3]), torch.tensor([False, False, True]))]
    with pytest.raises(vtprune.UnsupportedModelError, match="no deepstack features"):
        gather_side_rows(mask, rows, 0, columns, [None], 3)
    merged = MergedRows(anchors=torch.tensor([2]), rows=[torch.full((1, 2), 7.0)])
    columns = [(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2]), torch.tensor([False, False, True]))]
    new_mask, new_rows = gather_side_rows(mask, rows, 0, columns, [merged], 3)
    assert new_mask.tolist() == [[False, True, True]]
    assert new_rows.tolist() == [[0.0, 1.0], [7.0, 7.0]]


def test_supported_classes_and_errors():
    names = supported_model_classes()
    for cls in ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration",
                "Qwen3VLForConditionalGeneration", "LlavaOnevisionForConditionalGeneration"):
        assert cls in names


@pytest.mark.parametrize("family", CLS_FREE)
def test_cli_run_on_tiny_family(family, capsys):
    from vtprune.cli import main

    assert main(["run", "--model", f"tiny:{family}", "--method", "visionzip", "--budget", "8",
                 "--max-new-tokens", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "sample 0: visual" in out and "kept" in out
