"""In-LLM pruning on every family × registered in-LLM method: reference equivalence after the pruning layers
(logits and greedy generation, both position conventions), batching, per-layer KV caches, composition.

Methods come from the registry by stage, so new in-LLM methods are covered without editing this file (they run
with ``budget=IN_LLM_BUDGET`` unless listed in ``OPTIONS``). References are built by hand: the decoder layers
of the unwrapped language model are run one by one on the sequence the engine kept at each pruning layer.
"""

from __future__ import annotations

import pytest
import torch
from reference_runs import (
    ALL_FAMILIES,
    IN_LLM,
    NEW_TOKENS,
    call_positions,
    call_side_rows,
    capture_lm_calls,
    image_cells,
    record_kept_columns,
    reference_decoder,
)

import vtprune
from vtprune.testing import tiny_image, tiny_inputs

FAMILIES = ALL_FAMILIES
IN_LLM_BUDGET = 0.6
#: the papers' options for the known methods (a ratio / λ rather than a budget); others get the budget
OPTIONS = {"fastv": {"ratio": 0.5}, "pdrop": {"lambda_": 0.5}}
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


@pytest.fixture(params=FAMILIES)
def family_model(request, tiny_models):
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
def test_nothing_pruned_is_identity(family_model, method):
    _, model, processor = family_model
    inputs = batch_inputs(processor)
    ref = model(**inputs).logits
    ref_tokens = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    with vtprune.pruned(model, method, budget=1.0):
        out = model(**inputs).logits
        tokens = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        assert not any(s.pruned for s in vtprune.stats(model).samples)
    assert torch.equal(out, ref)
    assert torch.equal(tokens, ref_tokens)


# ---------------------------------------------------------------------------------------------------------
# 5. reference equivalence after the pruning layers
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("positions", ["original", "compact"])
@pytest.mark.parametrize("method", IN_LLM)
def test_reference_equivalence_after_pruning_layer(family_model, method, positions, monkeypatch):
    """Logits and greedy tokens equal the decoder run by hand: the full sequence up to each pruning layer, then
    only the kept tokens (with their original or compact positions), each layer decoding from its own cache."""
    family, model, processor = family_model
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
        placeholders)
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


def _check_batch(model, processor, method, padding_side, **options):
    inputs = batch_inputs(processor, padding_side)
    with vtprune.pruned(model, method, **options):
        batch_logits = model(**inputs).logits
        stats = vtprune.stats(model)
        assert stats.samples[0].pruned and stats.samples[2].pruned and not stats.samples[1].pruned
        batch_tokens = model.generate(**inputs, max_new_tokens=6, do_sample=False) if padding_side == "left" else None
        for b in range(inputs["input_ids"].shape[0]):
            single = single_inputs(processor, b)
            alone = model(**single).logits[0]
            n = stats.samples[b].layer_lengths[-1]
            assert alone.shape[0] == n
            rows = batch_logits[b, -n:] if padding_side == "left" else batch_logits[b, :n]
            torch.testing.assert_close(rows, alone, atol=1e-4, rtol=1e-4)
            if batch_tokens is not None:
                alone_new = model.generate(**single, max_new_tokens=6, do_sample=False)[0, single["input_ids"].shape[1]:]
                batch_new = batch_tokens[b, inputs["input_ids"].shape[1]:]
                n = alone_new.numel()
                assert batch_new[:n].tolist() == alone_new.tolist()
                if n < batch_new.numel():  # stopped at EOS alone; the batch pads after it
                    assert int(alone_new[-1]) == model.generation_config.eos_token_id
                    assert bool((batch_new[n:] == model.generation_config.pad_token_id).all())


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("method", IN_LLM)
def test_batch_equals_one_by_one(family_model, method, padding_side):
    _, model, processor = family_model
    _check_batch(model, processor, method, padding_side, **options_for(method))


@pytest.mark.parametrize("method", IN_LLM)
def test_composition_batch_equals_one_by_one(family_model, method):
    """A pre-LLM method followed by an in-LLM one: each stage prunes, and a padded batch equals its samples."""
    _, model, processor = family_model
    composed = [vtprune.registry.build_method(PRE_FOR_COMPOSITION, budget=0.5),
                vtprune.registry.build_method(method, **options_for(method))]
    with vtprune.pruned(model, composed):
        model(**batch_inputs(processor))
        sample = vtprune.stats(model).samples[0]
        assert [s.name for s in sample.stages] == [PRE_FOR_COMPOSITION, method]
        assert sample.layer_lengths[0] > sample.layer_lengths[-1]
    _check_batch(model, processor, composed, "left")


# ---------------------------------------------------------------------------------------------------------
# 8. per-layer KV cache
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", IN_LLM)
def test_kv_cache_holds_only_kept_tokens(family_model, method):
    _, model, processor = family_model
    single = single_inputs(processor, 0)
    with vtprune.pruned(model, method, **options_for(method)):
        out = model(**single, use_cache=True)
        stats = vtprune.stats(model).samples[0]
    cache = out.past_key_values
    lengths = [cache.layers[i].get_seq_length() for i in range(len(cache.layers))]
    assert lengths == stats.layer_lengths
    assert lengths[-1] < lengths[0]


# ---------------------------------------------------------------------------------------------------------
# budget errors
# ---------------------------------------------------------------------------------------------------------


def test_composition_and_budget_errors(tiny_models):
    model, processor = tiny_models["llava"]
    inputs = batch_inputs(processor)
    vtprune.apply(model, "fastv", budget=8)  # 4 layers, K=2: at least half of 64 tokens on average
    with pytest.raises(vtprune.BudgetError, match="smallest reachable budget"):
        model(**inputs)
    vtprune.remove(model)
    with pytest.raises(vtprune.VTPruneError, match="at most one in-LLM"):
        vtprune.apply(model, ["fastv", "pdrop"])
    with pytest.raises(vtprune.MethodOptionError):
        vtprune.apply(model, "fastv", ratio=1.5)
