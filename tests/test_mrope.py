"""3-D M-RoPE positions on the Qwen-VL families (Qwen2-VL, Qwen2.5-VL, Qwen3-VL).

* ``positions="original"``: through ``generate`` on a padded batch with images of different sizes, the 3-D
  position ids the decoder sees for every kept token equal the unpruned model's ids for that token, and the
  first generated token gets the unpruned run's ids (decoding continues with the model's ``rope_deltas``).
* ``positions="compact"``: an unpruned sequence keeps the model's own positions, a pruned sub-grid gets
  exactly the model's rope index of an image with that grid, and decoding continues after the last position.
* Decoding by hand without an attention mask (the model would derive positions from the pruned cache length).
"""

from __future__ import annotations

import pytest
import torch
from reference_runs import (
    IN_LLM,
    MROPE_FAMILIES,
    NEW_TOKENS,
    PRE_LLM,
    assert_same_greedy,
    cache_cut_from,
    call_positions,
    call_side_rows,
    capture_lm_calls,
    generate,
    image_cells,
    lm_logits,
    make_case,
    merged_tokens,
    record_kept_columns,
    reference_decoder,
    reference_greedy,
    reference_sequence,
    spy_selections,
)

import vtprune
from vtprune import compat
from vtprune.adapters.base import adapter_for
from vtprune.engine.positions import pruned_positions
from vtprune.registry import method_class
from vtprune.testing import tiny_image, tiny_inputs

IMAGES = [tiny_image(0), tiny_image(3, (80, 40)), None]
PROMPTS = ["Describe the image.", "What color is the box on the left of this picture?", "Hi"]
# MustDrop merges whole 3x3 windows: the 4 x 5 grid keeps at least 12 tokens
BUDGET = {**{m: 8 for m in PRE_LLM}, **{m: 0.6 for m in IN_LLM}, "mustdrop": 0.75}
MULTI_BUDGET = {"mustdrop": 0.75}  # the two-image sample's budget where 6 tokens per image is out of reach
#: SparseVLM's default version "1.5" inserts recycled tokens after the kept visual block (no image position of
#: their own) and the in-LLM references have no merged tokens: these checks run its "2.0" (drops only)
OPTIONS = {"sparsevlm": {"version": "2.0"},
           # pre-LLM stages alone (the companion stages of HoliTom / PruneVid are in-LLM methods of their own)
           **{m: dict(method_class(m).solo) for m in PRE_LLM if method_class(m).solo}}


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(params=MROPE_FAMILIES)
def qwen(request, tiny_models):
    model, processor = tiny_models[request.param]
    return model, processor


@pytest.fixture(params=[f for f in MROPE_FAMILIES if f != "qwen2_5_vl"])  # 2.5-VL: Qwen2-VL's rope index
def qwen_family(request, tiny_models):
    model, processor = tiny_models[request.param]
    return request.param, model, processor


def first_steps(model, inputs):
    """generate 2 tokens; returns, per decoder layer, the (cos, sin) of the prefill and of the first decode step,
    and the language-model-level position ids of both calls."""
    lm = model.model.language_model
    seen: list[list] = [[] for _ in lm.layers]
    lm_calls: list = []
    handles = [layer.register_forward_pre_hook(
        lambda m, a, k, i=i: seen[i].append(tuple(t.clone() for t in k["position_embeddings"])), with_kwargs=True)
        for i, layer in enumerate(lm.layers)]
    handles.append(lm.register_forward_pre_hook(lambda m, a, k: lm_calls.append(k["position_ids"].clone()),
                                                with_kwargs=True))
    try:
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    finally:
        for handle in handles:
            handle.remove()
    return seen, lm_calls


def kept_sources(stats, mask: torch.Tensor, image_positions: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per sample, the original positions of the tokens that reach the last decoder layer, in order (merged
    tokens excluded): every real text token plus the visual tokens the last stage kept."""
    out = []
    for b, sample in enumerate(stats.samples):
        real = torch.nonzero(mask[b]).flatten()
        text = real[~torch.isin(real, image_positions[b])]
        kept = sample.stages[-1].kept_positions if sample.stages else image_positions[b]
        out.append(torch.sort(torch.cat([text, kept])).values)
    return out


@pytest.mark.parametrize("method", PRE_LLM + IN_LLM)
def test_original_positions_follow_the_unpruned_rope_index(qwen, method):
    model, processor = qwen
    inputs = tiny_inputs(processor, IMAGES, PROMPTS, padding_side="left")
    grids = inputs["image_grid_thw"].tolist()
    assert len(grids) == 2 and grids[0] != grids[1]
    mask = inputs["attention_mask"]
    image = [torch.nonzero(inputs["input_ids"][b] == model.config.image_token_id).flatten() for b in range(3)]
    ref_layers, ref_calls = first_steps(model, inputs)
    with vtprune.pruned(model, method, BUDGET[method], positions="original", **OPTIONS.get(method, {})):
        layers, calls = first_steps(model, inputs)
        stats = vtprune.stats(model)
    assert stats.samples[0].pruned and stats.samples[1].pruned
    assert ref_calls[0].shape[0] == calls[0].shape[0] == 4  # generate passes [text row; t; h; w]
    last = len(layers) - 1
    (ref_cos, _), (cos, _) = ref_layers[last][0], layers[last][0]
    (ref_step_cos, _), (step_cos, _) = ref_layers[last][1], layers[last][1]
    width = cos.shape[1]
    for b, sources in enumerate(kept_sources(stats, mask, image)):
        merged = stats.samples[b].stages[-1].merged if stats.samples[b].stages else 0
        columns = torch.arange(width - sources.numel() - merged, width)  # left padding
        if merged:  # merged tokens stand at a pruned image position (their anchor); take them out by position
            real = torch.nonzero(mask[b]).flatten()
            matched = torch.stack([real[(cos[b, c][None] == ref_cos[b, real]).all(-1)].squeeze(0) for c in columns])
            plain = torch.isin(matched, sources)
            anchors = matched[~plain]
            assert anchors.numel() == merged and bool(torch.isin(anchors, image[b]).all())
            columns = columns[plain]
        # the kept tokens, in order, have the unpruned rotary embedding of the same token
        assert torch.equal(cos[b, columns], ref_cos[b, sources])
        if method in PRE_LLM:  # and the language model receives the unpruned (t, h, w) ids themselves
            assert torch.equal(calls[0][1:, b, columns], ref_calls[0][1:, b, sources])
    # the first generated token: same (t, h, w) ids and rotary embedding as in the unpruned run
    assert torch.equal(calls[1][1:], ref_calls[1][1:])
    torch.testing.assert_close(step_cos, ref_step_cos, rtol=0, atol=0)


@pytest.mark.parametrize("method", PRE_LLM)
def test_compact_decoding_continues_after_the_last_position(qwen, method):
    model, processor = qwen
    inputs = tiny_inputs(processor, IMAGES, PROMPTS, padding_side="left")
    with vtprune.pruned(model, method, BUDGET[method], positions="compact"):
        _, calls = first_steps(model, inputs)
    prefill, step = calls[0], calls[1]
    assert torch.equal(step[1:, :, 0], prefill[1:, :, -1] + 1)
    assert torch.equal(step[0, :, 0], prefill[0, :, -1] + 1)  # the text row is the pruned sequence index


def test_compact_of_an_unpruned_sequence_is_the_models_rope_index(qwen):
    model, processor = qwen
    inputs = tiny_inputs(processor, IMAGES, PROMPTS, padding_side="right")
    positions, _ = model.model.get_rope_index(
        inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
        image_grid_thw=inputs["image_grid_thw"], attention_mask=inputs["attention_mask"])
    image_token = model.config.image_token_id
    for b in range(3):
        real = inputs["attention_mask"][b].bool()
        original = positions[:, b, real]
        is_image = inputs["input_ids"][b, real] == image_token
        image_of = torch.where(is_image, torch.zeros_like(is_image, dtype=torch.long), -1)
        rule = adapter_for(model).compact_image_positions
        assert torch.equal(pruned_positions(original, "compact", image_of, rule), original)


def test_compact_pooled_grid_is_the_rope_index_of_that_grid(qwen, monkeypatch):
    """pool keeps an exact ph x pw grid of merged tokens: its compact positions are what the model's own rope
    index gives an image of that grid in the same prompt."""
    model, processor = qwen
    inputs = tiny_inputs(processor, [tiny_image(0)], ["Describe the image."])
    records = []
    original = method_class("pool").select
    monkeypatch.setattr(method_class("pool"), "select",
                        lambda self, group, k: records.append((group, original(self, group, k))) or records[-1][1])
    captured = []
    with vtprune.pruned(model, "pool", 6, positions="compact"):
        handle = model.model.language_model.register_forward_pre_hook(  # after the engine's hook: sees its output
            lambda m, a, k: captured.append(k["position_ids"].clone()), with_kwargs=True)
        try:
            model(**inputs)
        finally:
            handle.remove()
    ((group, selection),) = records
    rows = torch.unique(selection.anchors // group.width).numel()
    cols = torch.unique(selection.anchors % group.width).numel()
    assert rows * cols == selection.num_merged and rows > 1 and cols > 1
    ids = inputs["input_ids"][0]
    image = torch.nonzero(ids == model.config.image_token_id).flatten()
    merge = model.config.vision_config.spatial_merge_size
    small = torch.cat([ids[: image[0]], ids.new_full((rows * cols,), model.config.image_token_id), ids[image[-1] + 1:]])
    expected, _ = model.model.get_rope_index(
        small[None], mm_token_type_ids=(small == model.config.image_token_id).int()[None],
        image_grid_thw=torch.tensor([[1, rows * merge, cols * merge]]))
    assert torch.equal(captured[0], expected)


@pytest.mark.parametrize("positions", ["original", "compact"])
@pytest.mark.parametrize("method", ["fastervlm", "fastv"])
def test_decoding_by_hand_without_attention_mask(qwen, method, positions):
    """The model computes decode positions from the cache length when no mask is given; the pruned cache is
    shorter, so the engine passes the unpruned positions: a hand loop matches generate step by step."""
    model, processor = qwen
    inputs = tiny_inputs(processor, [tiny_image(0)], ["Describe the image."])
    del inputs["attention_mask"]
    with vtprune.pruned(model, method, BUDGET[method], positions=positions):
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        step = model(**inputs, use_cache=True)
        cache = compat.output_cache(step)
        for t, expected in enumerate(out.logits):
            torch.testing.assert_close(step.logits[:, -1], expected, rtol=0, atol=1e-5)
            token = expected.argmax(-1, keepdim=True)
            if t + 1 < len(out.logits):
                step = model(input_ids=token, **compat.cache_kwargs(cache), use_cache=True)


# ---------------------------------------------------------------------------------------------------------
# several images of different sizes in one sample
# ---------------------------------------------------------------------------------------------------------

TWO_IMAGES = [tiny_image(0), tiny_image(3, (80, 40))]
_MULTI: dict = {}


def multi_image_case(family, model, processor):
    if family not in _MULTI:
        inputs = tiny_inputs(processor, [TWO_IMAGES], ["Compare the two images."])
        assert len(inputs["image_grid_thw"]) == 2
        _MULTI[family] = make_case(family, model, processor, inputs)
    return _MULTI[family]


@pytest.mark.parametrize("positions", ["original", "compact"])
@pytest.mark.parametrize("method", PRE_LLM)
def test_several_images_pre_llm_reference(qwen_family, method, positions, monkeypatch):
    """Two images of different grids in one sample: the pruned forward and greedy generation equal the bare
    language model run on the kept sequence with hand-built 3-D positions (each image compacted on its own)."""
    family, model, processor = qwen_family
    case = multi_image_case(family, model, processor)
    with spy_selections(monkeypatch, method) as records, vtprune.pruned(model, method, MULTI_BUDGET.get(method, 6),
                                                                             positions=positions,
                                                                             **OPTIONS.get(method, {})):
        with capture_lm_calls(model) as calls:
            logits = model(**case.inputs).logits[0]
        (stage,) = vtprune.stats(model).samples[0].stages
        merged, anchors, merged_side = merged_tokens(case, records)
        embeds, position_ids, _, side = reference_sequence(
            case, stage.kept_positions, positions, merged if stage.merged else None, anchors, merged_side)
        assert torch.equal(calls[0]["inputs_embeds"][0], embeds)
        assert torch.equal(call_positions(calls[0]), position_ids)
        torch.testing.assert_close(logits, lm_logits(model, embeds, position_ids, side), rtol=0, atol=1e-5)
        tokens, step_logits = generate(model, case.inputs)
    assert_same_greedy((tokens[0].tolist(), step_logits[0]),
                       reference_greedy(model, embeds, position_ids, side), case.eos)


@pytest.mark.parametrize("positions", ["original", "compact"])
@pytest.mark.parametrize("method", IN_LLM)
def test_several_images_in_llm_reference(qwen_family, method, positions, monkeypatch):
    family, model, processor = qwen_family
    case = multi_image_case(family, model, processor)
    with capture_lm_calls(model) as calls:
        model(**case.inputs)
    with monkeypatch.context() as patch:
        kept = record_kept_columns(patch)
        with vtprune.pruned(model, method, BUDGET[method], positions=positions, **OPTIONS.get(method, {})):
            pruned_logits = model(**case.inputs).logits[0]
            tokens, step_logits = generate(model, case.inputs)
    logits, _, ref_tokens, ref_step_logits = reference_decoder(
        model, calls[0]["inputs_embeds"][0], call_positions(calls[0]), call_side_rows(calls[0]), kept, positions,
        image_cells(model, case.inputs), case.image_positions, steps=NEW_TOKENS,
        cut_from=cache_cut_from(model, method, {"budget": BUDGET[method], **OPTIONS.get(method, {})}))
    torch.testing.assert_close(pruned_logits, logits, rtol=1e-5, atol=1e-5)
    assert_same_greedy((tokens[0].tolist(), step_logits[0]), (ref_tokens, ref_step_logits), case.eos)
