"""In-LLM pruning (FastV, PyramidDrop, DART, SparseVLM, TransPrune): reference equivalence after the pruning layers,
batching, decoding, KV cache, memory — method variants on LLaVA / LLaVA-NeXT, then every other family ×
every registered in-LLM method."""

from __future__ import annotations

import pytest
import torch
from reference_runs import (
    ALL_FAMILIES,
    DEEPSTACK_FAMILIES,
    IN_LLM,
    NEW_TOKENS,
    cache_cut_from,
    call_positions,
    call_side_rows,
    capture_lm_calls,
    cut_cache_lengths,
    image_cells,
    record_kept_columns,
    reference_decoder,
)

import vtprune
from vtprune import compat
from vtprune.testing import tiny_image, tiny_inputs

FAMILIES = ["llava", "llava_next"]
METHODS = [
    ("fastv", {"ratio": 0.5}),
    ("pdrop", {"lambda_": 0.5}),
    ("dart", {"ratio": 0.6}),
    ("sparsevlm", {"budget": 0.7}),                      # version "1.5": recycles pruned tokens
    ("sparsevlm", {"budget": 0.7, "version": "2.0"}),
    ("holitom_inner", {"ratio": 0.5}),                    # merges the dropped tokens into the kept ones
    ("prunevid_llm", {"alpha": 0.4}),
    ("transprune", {"budget": 0.6}),                     # stages 1, 2 on the 4-layer tiny decoder
    ("framefusion", {"budget": 0.6}),                    # an image: nothing to merge, the pruning step at layer 1
    ("flowcut_llm", {"ratio": 0.5}),                     # FlowCut's LLaVA-NeXT decoder stage, alone
    ("mustdrop_llm", {"budget": 0.6}),                   # MustDrop's prefilling filter (counts from the budget)
]
#: options under which each method keeps every visual token
NOTHING_PRUNED = {
    "fastv": {"ratio": 0.0},
    "pdrop": {"lambda_": 1.0},
    "dart": {"ratio": 0.0},
    "sparsevlm": {"budget": 1.0},
    "holitom_inner": {"ratio": 0.0},
    "prunevid_llm": {"alpha": 1.0},
    "transprune": {"budget": 1.0},
    "framefusion": {"budget": 1.0},
    "flowcut_llm": {"ratio": 0.0},
    "mustdrop_llm": {"global_thr": 0.0},  # no summed attention is below 0
}
#: methods whose kept tokens are a subset of the input (no merged tokens), with multi-stage schedules
REFERENCE_METHODS = [
    ("fastv", {"ratio": 0.5}),
    ("pdrop", {"layers": [2], "lambda_": 0.5}),
    ("pdrop", {"lambda_": 0.5}),                 # three stages on the 4-layer tiny decoder: 1, 2, 3
    ("dart", {"ratio": 0.6}),
    ("dart", {"ratio": 0.6, "layer": 1, "pivots": 3}),
    ("sparsevlm", {"budget": 0.7, "version": "2.0"}),  # "1.5" merges: tests/test_fidelity_sparsevlm.py
    ("transprune", {"layers": [1, 2, 3], "ratios": [0.875, 0.625, 0.125]}),  # the official 3-stage shape
]


def _inputs(processor, padding_side="left"):
    images = [tiny_image(0, (48, 64)), None, tiny_image(1, (64, 48))]
    prompts = ["describe the image please", "hi", "what color"]
    return tiny_inputs(processor, images, prompts, padding_side=padding_side)


def _single(inputs, b, model):
    """Sample b of a padded batch, without its padding (image-less samples lose their pixel inputs)."""
    real = inputs["attention_mask"][b].bool()
    out = {"input_ids": inputs["input_ids"][b:b + 1, real], "attention_mask": inputs["attention_mask"][b:b + 1, real]}
    image_rows = [i for i in range(inputs["input_ids"].shape[0]) if "pixel_values" in inputs
                  and bool((inputs["input_ids"][i] == model.config.image_token_id).any())]
    if b in image_rows:
        idx = image_rows.index(b)
        out["pixel_values"] = inputs["pixel_values"][idx:idx + 1]
        if "image_sizes" in inputs:
            out["image_sizes"] = inputs["image_sizes"][idx:idx + 1]
    return out


@pytest.fixture(params=FAMILIES)
def family_model(request, tiny_models):
    model, processor = tiny_models[request.param]
    return request.param, model, processor


@pytest.mark.parametrize("method", sorted(NOTHING_PRUNED))
def test_nothing_pruned_is_identity(family_model, method):
    family, model, processor = family_model
    inputs = _inputs(processor)
    with torch.no_grad():
        ref = model(**inputs).logits
        ref_tokens = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        with vtprune.pruned(model, method, **NOTHING_PRUNED[method]):
            out = model(**inputs).logits
            tokens = model.generate(**inputs, max_new_tokens=6, do_sample=False)
            assert not any(s.pruned for s in vtprune.stats(model).samples)
    assert torch.equal(out, ref)
    assert torch.equal(tokens, ref_tokens)


def test_every_in_llm_method_is_covered():
    in_llm = {name for name, info in vtprune.methods().items() if info.stage == "in-llm"}
    assert in_llm == set(NOTHING_PRUNED) == {m for m, _ in METHODS}


def _reference_run(model, single, stats, positions, max_new_tokens=0):
    """Decoder run by hand on the sample: all tokens up to each stage's layer, then that stage's kept
    tokens (from stats), with original or compact positions. Returns (logits of the prompt, greedy tokens)."""
    lm = model.model.language_model
    with torch.no_grad(), capture_lm_calls(model) as calls:
        model(**single)
    embeds = calls[-1]["inputs_embeds"]
    length = embeds.shape[1]
    image = single["input_ids"][0] == model.config.image_token_id
    structural = set()
    for span in vtprune.adapters.base.adapter_for(model).build_layouts(dict(single))[0].images:
        structural |= set(span.positions[span.structural].tolist())  # LLaVA-NeXT newlines: never dropped in-LLM
    stage_keep = {st.layer: set(st.kept_positions.tolist()) | structural for st in stats.stages}
    with torch.no_grad():
        cols, pos = torch.arange(length), torch.arange(length)
        segments = {}  # layer -> (kept columns, positions) from that layer on
        for index in range(len(lm.layers)):
            if index in stage_keep:
                sel = torch.tensor([i for i, c in enumerate(cols.tolist()) if not image[c] or c in stage_keep[index]])
                cols = cols[sel]
                pos = pos[sel] if positions == "original" else torch.arange(len(sel))
            segments[index] = (cols.clone(), pos.clone())

        cache = compat.new_dynamic_cache(lm.config)
        hidden_all = embeds
        tokens = []
        logits = None
        for step in range(max_new_tokens + 1):
            hidden = hidden_all if step == 0 else hidden_all[:, -1:]
            for index, layer in enumerate(lm.layers):
                cols_i, pos_i = segments[index]
                if step == 0:
                    keep_prev = segments[index - 1][0] if index else torch.arange(length)
                    sel = torch.tensor([keep_prev.tolist().index(c) for c in cols_i.tolist()])
                    hidden = hidden[:, sel]
                    p = pos_i
                else:
                    # decoded tokens continue after the last prompt position of each segment
                    p = torch.tensor([int(pos_i[-1]) + step])
                pe = lm.rotary_emb(hidden, position_ids=p[None])
                mask = None if hidden.shape[1] > 1 else None
                hidden = layer(hidden, attention_mask=_causal(hidden, cache, index) if step == 0 else mask,
                               position_embeddings=pe, position_ids=p[None], **compat.cache_kwargs(cache))
            step_logits = model.lm_head(lm.norm(hidden))[0]
            if step == 0:
                logits = step_logits
            if step < max_new_tokens:
                token = int(step_logits[-1].argmax())
                tokens.append(token)
                hidden_all = model.get_input_embeddings()(torch.tensor([[token]]))
    return logits, tokens


def _causal(hidden, cache, index):
    n = hidden.shape[1]
    return torch.full((n, n), float("-inf")).triu(1)[None, None]


@pytest.mark.parametrize("positions", ["original", "compact"])
@pytest.mark.parametrize("method,options", REFERENCE_METHODS)
def test_reference_equivalence_after_pruning_layers(family_model, method, options, positions):
    """Logits and greedy tokens equal the decoder run by hand: all tokens up to each stage, then only that
    stage's kept tokens (several stages for PDrop and SparseVLM), in both position conventions."""
    family, model, processor = family_model
    single = _single(_inputs(processor), 0, model)
    with torch.no_grad(), vtprune.pruned(model, method, positions=positions, **options):
        pruned_logits = model(**single).logits[0]
        stats = vtprune.stats(model).samples[0]
        tokens = model.generate(**single, max_new_tokens=8, do_sample=False)[0, -8:].tolist()
    assert stats.pruned and len(stats.stages) >= 1
    logits, ref_tokens = _reference_run(model, single, stats, positions, max_new_tokens=8)
    assert stats.layer_lengths[-1] == logits.shape[0]
    torch.testing.assert_close(pruned_logits, logits, atol=1e-5, rtol=1e-5)
    assert tokens == ref_tokens


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("method,options", METHODS)
def test_batch_equals_one_by_one(family_model, method, options, padding_side):
    family, model, processor = family_model
    inputs = _inputs(processor, padding_side)
    with torch.no_grad(), vtprune.pruned(model, method, **options):
        batch_logits = model(**inputs).logits
        stats = vtprune.stats(model)
        batch_tokens = model.generate(**inputs, max_new_tokens=6, do_sample=False) if padding_side == "left" else None
        for b in range(inputs["input_ids"].shape[0]):
            single = _single(inputs, b, model)
            alone = model(**single).logits[0]
            n = stats.samples[b].layer_lengths[-1]
            assert alone.shape[0] == n
            rows = batch_logits[b, -n:] if padding_side == "left" else batch_logits[b, :n]
            torch.testing.assert_close(rows, alone, atol=1e-4, rtol=1e-4)
            if batch_tokens is not None:
                tokens = model.generate(**single, max_new_tokens=6, do_sample=False)
                assert batch_tokens[b, -6:].tolist() == tokens[0, -6:].tolist()


def test_composition_and_budget_errors(tiny_models):
    model, processor = tiny_models["llava"]
    inputs = _inputs(processor)
    with torch.no_grad():
        with vtprune.pruned(model, ["divprune", "fastv"], budget=0.5):
            model(**inputs)
            sample = vtprune.stats(model).samples[0]
            assert [s.name for s in sample.stages] == ["divprune", "fastv"]
            assert sample.layer_lengths[0] > sample.layer_lengths[-1]
        # 4 layers, K=2: at least half of 64 tokens on average; LLaVA-1.5 fixes the tokens per image, so apply()
        # already knows (families whose counts depend on the input raise at the forward: test_bad_inputs.py)
        with pytest.raises(vtprune.BudgetError, match="smallest reachable budget"):
            vtprune.apply(model, "fastv", budget=8)
        assert not vtprune.is_pruned(model)
    with pytest.raises(vtprune.VTPruneError, match="at most one in-LLM"):
        vtprune.apply(model, ["fastv", "pdrop"])
    with pytest.raises(vtprune.MethodOptionError):
        vtprune.apply(model, "fastv", ratio=1.5)


def _assert_cache_holds_only_kept_tokens(model, single_input, method, **options):
    """Per decoder layer, the KV cache after a pruned prefill is exactly as long as the layer's sequence."""
    with torch.no_grad(), vtprune.pruned(model, method, **options):
        out = model(**single_input, use_cache=True)
        stats = vtprune.stats(model).samples[0]
    cache = compat.output_cache(out)
    lengths = [cache.layers[i].get_seq_length() for i in range(len(cache.layers))]
    # MustDrop's decoding stage cuts the caches of its filtering layers to the last filter's tokens
    assert lengths == cut_cache_lengths(stats.layer_lengths, cache_cut_from(model, method, options))
    assert stats.layer_lengths[-1] < stats.layer_lengths[0]


def test_kv_cache_holds_only_kept_tokens(tiny_models):
    model, processor = tiny_models["llava"]
    _assert_cache_holds_only_kept_tokens(model, _single(_inputs(processor), 0, model), "fastv", ratio=0.75)


def test_composition_splits_the_budget(tiny_models):
    """Default rule: the pre-LLM stage keeps 2 x budget, the in-LLM stage brings the layer average to it."""
    model, processor = tiny_models["llava"]
    single = _single(_inputs(processor), 0, model)
    with torch.no_grad():
        with vtprune.pruned(model, ["divprune", "pdrop"], budget=16):
            model(**single)
            sample = vtprune.stats(model).samples[0]
        assert [s.name for s in sample.stages] == ["divprune", "pdrop", "pdrop", "pdrop"]
        assert len(sample.stages[0].kept_positions) == 32
        assert abs(sample.equivalent_tokens - 16) <= 0.5
        with vtprune.pruned(model, ["divprune", "pdrop"], budget=0.25):  # fractions: 0.5 then 0.5 of that
            model(**single)
            sample = vtprune.stats(model).samples[0]
        assert len(sample.stages[0].kept_positions) == 32
        assert abs(sample.equivalent_tokens - 16) <= 0.5
        with vtprune.pruned(model, ["divprune", "fastv"], stage_budgets=[48, None]):  # override: fastv default R
            model(**single)
            sample = vtprune.stats(model).samples[0]
        assert len(sample.stages[0].kept_positions) == 48
        assert sample.visual_lengths == [48, 48, 24, 24]
    assert vtprune.budget.split_composed_budget(64, ["pre-llm", "in-llm"]) == [128, 64]

    with vtprune.pruned(model, ["visionzip", "fastv"], stage_budgets=[48, None]), torch.no_grad():
        model(**single)  # a pre-LLM stage that merges: its merged tokens are counted once entering the decoder
        sample = vtprune.stats(model).samples[0]
    first = sample.stages[0]
    assert first.merged > 0
    assert sample.visual_lengths[0] == first.visual_out == len(first.kept_positions) + first.merged == 48
    assert vtprune.budget.split_composed_budget(0.1, ["pre-llm", "in-llm"]) == [0.2, 0.5]
    assert vtprune.budget.split_composed_budget(64, ["in-llm"]) == [64]
    with pytest.raises(vtprune.VTPruneError, match="one per method"):
        vtprune.apply(model, ["divprune", "fastv"], stage_budgets=[48])


@pytest.mark.parametrize("method,options", METHODS)
def test_peak_memory_not_above_unpruned(tiny_models, method, options):
    """Counted at the dispatcher (every tensor storage created during the forward): the pruned forward's peak
    is not above the unpruned one, and no [B, H, L, L] attention matrix of a whole layer is ever created."""
    from vtprune.bench.live_tensors import LiveTensorPeak

    model, processor = tiny_models["llava_next"]
    inputs = tiny_inputs(processor, [tiny_image(0, (96, 128))], ["describe the image please"])
    with torch.no_grad():
        with LiveTensorPeak() as unpruned:
            model(**inputs)
        with vtprune.pruned(model, method, **options), LiveTensorPeak() as pruned:
            model(**inputs)
    assert pruned.peak_bytes <= unpruned.peak_bytes
    text = model.config.get_text_config()
    length = inputs["input_ids"].shape[1]
    assert pruned.largest_bytes < text.num_attention_heads * length * length * 4


def _layer_average(schedule, num_layers, num_visual):
    counts, current = [], num_visual
    stages = dict(schedule)
    for layer in range(num_layers):
        current = stages.get(layer, current)
        counts.append(current)
    return sum(counts) / num_layers


@pytest.mark.parametrize("budget", [192, 128, 64])
@pytest.mark.parametrize("method", ["fastv", "pdrop", "dart"])
def test_budget_schedules_reach_the_equivalent_tokens(method, budget):
    """On LLaVA-1.5's shape (576 tokens, 32 layers) every in-LLM method's schedule averages to the budget
    (SparseVLM keeps its official tables at these labels: tests/test_fidelity_sparsevlm.py)."""
    schedule = vtprune.registry.method_class(method)(budget=budget).schedule(32, 576, 1)
    # DART keeps the official count 4 + 8·TOKEN_TOPK, the nearest to the budget's: up to 4 tokens off after
    # layer 2, 4·30/32 on the layer average; PDrop truncates each stage's count (int(N·λ^i)): < 1 token
    tolerance = 4 * 30 / 32 if method == "dart" else 1.0
    assert abs(_layer_average(schedule, 32, 576) - budget) <= tolerance
    counts = [keep for _, keep in schedule]
    assert counts == sorted(counts, reverse=True) and all(c >= 1 for c in counts)


def test_published_schedules():
    sparse = vtprune.registry.method_class("sparsevlm")
    # official layers 2, 6, 15: each runs on every token, the drop enters layers 3, 7, 16
    assert sparse(budget=64).schedule(32, 576, 1) == [(3, 66), (7, 30), (16, 17)]
    assert sparse(budget=128).schedule(32, 576, 1) == [(3, 303), (7, 110), (16, 36)]
    assert sparse(budget=192, version="2.0").schedule(32, 576, 1) == [(3, 300), (7, 200), (16, 118)]
    pdrop = vtprune.registry.method_class("pdrop")
    assert [layer for layer, _ in pdrop().schedule(32, 576, 1)] == [8, 16, 24]
    assert [keep for _, keep in pdrop().schedule(32, 576, 1)] == [288, 144, 72]
    # the official counts truncate: int(576·0.6) = 345, int(576·0.36) = 207, int(576·0.216) = 124
    assert [keep for _, keep in pdrop(lambda_=0.6).schedule(32, 576, 1)] == [345, 207, 124]
    assert pdrop().positions == "compact" and pdrop(positions="original").positions == "original"
    # below what stages at 8/16/24 can reach (144), the stages move to 2/8/16
    assert [layer for layer, _ in pdrop(budget=64).schedule(32, 576, 1)] == [2, 8, 16]
    with pytest.raises(vtprune.BudgetError, match="smallest reachable"):
        pdrop(budget=64, layers=[8, 16, 24]).schedule(32, 576, 1)
    dart = vtprune.registry.method_class("dart")
    assert dart().schedule(32, 576, 1) == [(2, 132)]  # the official run "0.778 128": 4 + 8·16
    assert dart(max_num_trunction=128).schedule(32, 576, 1) == [(2, 132)]
    assert dart(ratio=0.778).schedule(32, 576, 1) == [(2, 124)]  # 4 + 8·floor(127.87 / 8)
    assert dart(ratio=0.0).schedule(32, 576, 1) == [(2, 576)]
    assert dart(budget=128).schedule(32, 576, 1) == [(2, 100)]  # keep ≈ 98.1 → nearest 4 + 8·12
    assert vtprune.registry.method_class("fastv")().schedule(32, 576, 1) == [(2, 288)]


def test_sparsevlm_v1_5_recycles_pruned_tokens(tiny_models):
    model, processor = tiny_models["llava"]
    single = _single(_inputs(processor), 0, model)
    with torch.no_grad(), vtprune.pruned(model, "sparsevlm", budget=0.7, version="1.5"):
        model(**single)
        sample = vtprune.stats(model).samples[0]
    assert all(stage.merged >= 1 for stage in sample.stages)
    for stage, layer_count in zip(sample.stages, [sample.visual_lengths[s.layer] for s in sample.stages], strict=True):
        assert layer_count == stage.visual_out
        assert stage.visual_out >= len(stage.kept_positions) + stage.merged


# =========================================================================================================
# Every other family (LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, Qwen3-VL) × every registered in-LLM method.
# Methods come from the registry, so new ones are covered without editing this section (they run with
# ``budget=IN_LLM_BUDGET`` unless listed in ``OPTIONS``); references run the decoder layers by hand on the
# columns the engine kept at each pruning layer (reference_runs.reference_decoder: 1-D RoPE or 3-D M-RoPE
# positions, Qwen3-VL deepstack rows, per-layer caches for greedy decoding).
# =========================================================================================================

NEW_FAMILIES = [f for f in ALL_FAMILIES if f not in FAMILIES]

IN_LLM_BUDGET = 0.6
#: the papers' options for the known methods (a ratio / λ rather than a budget); others get the budget
OPTIONS = {"fastv": {"ratio": 0.5}, "pdrop": {"lambda_": 0.5},
           "sparsevlm": {"budget": IN_LLM_BUDGET, "version": "2.0"}}  # "1.5" recycles: test below
PRE_FOR_COMPOSITION = "divprune"

IMAGES = (tiny_image(0, (48, 64)), None, tiny_image(1, (64, 48)))
PROMPTS = ("describe the image please", "hi", "what color")


def options_for(method: str) -> dict:
    return OPTIONS.get(method, {"budget": IN_LLM_BUDGET})


def batch_inputs(processor, padding_side="left"):
    return tiny_inputs(processor, list(IMAGES), list(PROMPTS), padding_side=padding_side)


def single_inputs(processor, b: int):
    """Sample ``b`` of the batch on its own (no padding)."""
    return tiny_inputs(processor, [IMAGES[b]], [PROMPTS[b]])


@pytest.fixture(params=NEW_FAMILIES)
def new_family_model(request, tiny_models):
    model, processor = tiny_models[request.param]
    return request.param, model, processor


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


# ---------------------------------------------------------------------------------------------------------
# 1. nothing pruned => nothing changed
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", IN_LLM)
def test_every_family_nothing_pruned_is_identity(new_family_model, method):
    _, model, processor = new_family_model
    inputs = batch_inputs(processor)
    ref = model(**inputs).logits
    ref_tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    with vtprune.pruned(model, method, budget=1.0):
        out = model(**inputs).logits
        tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        assert not any(s.pruned for s in vtprune.stats(model).samples)
    assert torch.equal(out, ref)
    assert torch.equal(tokens, ref_tokens)


# ---------------------------------------------------------------------------------------------------------
# 5. reference equivalence after the pruning layers
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("positions", ["original", "compact"])
@pytest.mark.parametrize("method", IN_LLM)
def test_every_family_reference_equivalence(new_family_model, method, positions, monkeypatch):
    """Logits and greedy tokens equal the decoder run by hand: the full sequence up to each pruning layer, then
    only the kept tokens (with their original or compact positions), each layer decoding from its own cache."""
    family, model, processor = new_family_model
    single = single_inputs(processor, 0)
    with capture_lm_calls(model) as calls:
        model(**single)
    (call,) = calls
    with monkeypatch.context() as patch:
        kept = record_kept_columns(patch)
        with vtprune.pruned(model, method, positions=positions, **options_for(method)):
            pruned_logits = model(**single).logits[0]
            stats = vtprune.stats(model).samples[0]
            out = model.generate(**single, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
    assert kept and stats.pruned
    cells = image_cells(model, single) if family.startswith("qwen") else {}
    placeholders = torch.nonzero(single["input_ids"][0] == model.config.image_token_id).flatten()
    logits, lengths, tokens, step_logits = reference_decoder(
        model, call["inputs_embeds"][0], call_positions(call), call_side_rows(call), kept, positions, cells,
        placeholders, cut_from=cache_cut_from(model, method, options_for(method)))
    assert stats.layer_lengths == lengths
    torch.testing.assert_close(pruned_logits, logits, atol=1e-5, rtol=1e-5)
    generated = out.sequences[0, single["input_ids"].shape[1]:].tolist()
    n = len(generated)
    assert generated == tokens[:n]
    torch.testing.assert_close(torch.stack(out.logits, 1)[0], step_logits[:n], atol=1e-5, rtol=1e-5)
    # the stats name the visual tokens that survive the last pruning layer
    assert set(stats.stages[-1].kept_positions.tolist()) <= set(placeholders.tolist())


# ---------------------------------------------------------------------------------------------------------
# 6. batching (also composed with a pre-LLM method)
# ---------------------------------------------------------------------------------------------------------


def _check_family_batch(model, processor, method, padding_side, **options):
    inputs = batch_inputs(processor, padding_side)
    with vtprune.pruned(model, method, **options):
        batch_logits = model(**inputs).logits
        stats = vtprune.stats(model)
        assert stats.samples[0].pruned and stats.samples[2].pruned and not stats.samples[1].pruned
        batch_tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False) if padding_side == "left" else None
        for b in range(inputs["input_ids"].shape[0]):
            single = single_inputs(processor, b)
            alone = model(**single).logits[0]
            n = stats.samples[b].layer_lengths[-1]
            assert alone.shape[0] == n
            rows = batch_logits[b, -n:] if padding_side == "left" else batch_logits[b, :n]
            torch.testing.assert_close(rows, alone, atol=1e-4, rtol=1e-4)
            if batch_tokens is not None:
                alone_new = model.generate(**single, max_new_tokens=4, do_sample=False)[0, single["input_ids"].shape[1]:]
                batch_new = batch_tokens[b, inputs["input_ids"].shape[1]:]
                n = alone_new.numel()
                assert batch_new[:n].tolist() == alone_new.tolist()
                if n < batch_new.numel():  # stopped at EOS alone; the batch pads after it
                    assert int(alone_new[-1]) == model.generation_config.eos_token_id
                    assert bool((batch_new[n:] == model.generation_config.pad_token_id).all())


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("method", IN_LLM)
def test_every_family_batch_equals_one_by_one(new_family_model, method, padding_side):
    _, model, processor = new_family_model
    _check_family_batch(model, processor, method, padding_side, **options_for(method))


@pytest.mark.parametrize("method", IN_LLM)
def test_every_family_composition_batch(new_family_model, method):
    """A pre-LLM method followed by an in-LLM one: each stage prunes, and a padded batch equals its samples."""
    _, model, processor = new_family_model
    composed = [vtprune.registry.build_method(PRE_FOR_COMPOSITION, budget=0.5),
                vtprune.registry.build_method(method, **options_for(method))]
    with vtprune.pruned(model, composed):
        model(**batch_inputs(processor))
        sample = vtprune.stats(model).samples[0]
        names = [s.name for s in sample.stages]  # one entry per stage layer of the in-LLM method
        assert names[0] == PRE_FOR_COMPOSITION and len(names) > 1 and set(names[1:]) == {method}
        assert sample.layer_lengths[0] > sample.layer_lengths[-1]
    _check_family_batch(model, processor, composed, "left")


# ---------------------------------------------------------------------------------------------------------
# 8. per-layer KV cache
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", IN_LLM)
def test_every_family_kv_cache_holds_only_kept_tokens(new_family_model, method):
    _, model, processor = new_family_model
    _assert_cache_holds_only_kept_tokens(model, single_inputs(processor, 0), method, **options_for(method))


def test_every_family_sparsevlm_recycling(new_family_model):
    """SparseVLM 1.5 adds merged (recycled) tokens inside the decoder. On Qwen3-VL those tokens would need
    deepstack features at the decoder layers that still receive them, which the merge does not define: an
    explicit error, never a silent misalignment. Elsewhere a padded batch equals its samples."""
    family, model, processor = new_family_model
    options = {"budget": 0.7, "version": "1.5"}
    if family in DEEPSTACK_FAMILIES:
        with vtprune.pruned(model, "sparsevlm", **options):
            with pytest.raises(vtprune.UnsupportedModelError, match="no deepstack features"):
                model(**single_inputs(processor, 0))
        return
    with vtprune.pruned(model, "sparsevlm", **options):
        model(**single_inputs(processor, 0))
        assert all(stage.merged >= 1 for stage in vtprune.stats(model).samples[0].stages)
    _check_family_batch(model, processor, "sparsevlm", "left", **options)
