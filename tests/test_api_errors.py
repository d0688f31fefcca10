"""Bad input to the public API fails early, with an error that names the problem and the fix, and leaves the
model untouched."""

from __future__ import annotations

import math
import re

import pytest
import torch

import vtprune

SIX_METHODS = ("random", "uniform", "pool", "fastervlm", "visionzip", "divprune")


@pytest.fixture
def model(tiny_models):
    model, _ = tiny_models["llava"]
    assert not vtprune.is_pruned(model)
    return model


def hooks_of(model) -> list:
    """Every hook (all kinds) and instance attribute of every module, to show a failed apply left nothing."""
    kinds = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs")
    return [(name, type(m), *(dict(getattr(m, k)) for k in kinds), frozenset(vars(m)))
            for name, m in model.named_modules()]


def assert_rejected(model, error: type[Exception], *args, **kwargs) -> str:
    """``vtprune.apply(model, *args, **kwargs)`` raises ``error``; the model is left as it was. Returns the message."""
    before = hooks_of(model)
    with pytest.raises(error) as info:
        vtprune.apply(model, *args, **kwargs)
    assert isinstance(info.value, vtprune.VTPruneError)
    assert not vtprune.is_pruned(model)
    assert hooks_of(model) == before
    return str(info.value)


def test_unknown_method_lists_known_methods(model):
    message = assert_rejected(model, vtprune.UnknownMethodError, "fastvlm_typo", budget=16)
    assert "fastvlm_typo" in message
    for name in ("divprune", "visionzip", "random"):
        assert name in message
    message = assert_rejected(model, vtprune.UnknownMethodError, "divprun", budget=16)
    assert "Did you mean 'divprune'" in message


@pytest.mark.parametrize("budget", [0, -3, "64", True, 1.5, float("nan"), float("inf"), -0.5])
def test_bad_budget(model, budget):
    message = assert_rejected(model, vtprune.BudgetError, "divprune", budget=budget)
    assert "budget" in message
    # the message says what a valid budget looks like
    assert re.search(r"positive int|\(0, 1\]", message), message


@pytest.mark.parametrize("budget", [1, 16, 64, 100000, 0.25, 1.0, None])
def test_good_budgets_are_accepted(model, budget):
    with vtprune.pruned(model, "divprune", budget):
        assert vtprune.is_pruned(model)
    assert not vtprune.is_pruned(model)


def test_unsupported_model_lists_supported_classes():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    llama = LlamaForCausalLM(config)
    message = assert_rejected(llama, vtprune.UnsupportedModelError, "divprune", budget=16)
    assert "LlamaForCausalLM" in message
    assert "LlavaForConditionalGeneration" in message
    assert "LlavaNextForConditionalGeneration" in message


def test_unknown_option_names_accepted_options(model):
    message = assert_rejected(model, vtprune.MethodOptionError, "divprune", budget=8, dominant=3)
    assert "dominant" in message
    assert "positions" in message and "seed" in message  # divprune has no own options: the generic ones
    message = assert_rejected(model, vtprune.MethodOptionError, "visionzip", budget=8, ratio=0.5)
    assert "ratio" in message
    assert "dominant" in message and "contextual" in message


def test_bad_option_value(model):
    message = assert_rejected(model, vtprune.MethodOptionError, "visionzip", budget=8, dominant=-1)
    assert "dominant" in message and "non-negative int" in message


def test_bad_positions(model):
    message = assert_rejected(model, vtprune.VTPruneError, "divprune", budget=8, positions="foo")
    assert "foo" in message
    assert "original" in message and "compact" in message


def test_bad_seed(model):
    message = assert_rejected(model, vtprune.VTPruneError, "random", budget=8, seed="0")
    assert "seed" in message


def test_apply_twice_says_remove_first(model):
    vtprune.apply(model, "divprune", budget=16)
    try:
        before = hooks_of(model)
        with pytest.raises(vtprune.VTPruneError, match=r"vtprune\.remove"):
            vtprune.apply(model, "random", budget=16)
        assert hooks_of(model) == before  # the first pruning is intact, nothing was added
    finally:
        vtprune.remove(model)
    assert not vtprune.is_pruned(model)


def test_stats_and_remove_without_pruning(model):
    with pytest.raises(vtprune.VTPruneError, match=r"vtprune\.apply"):
        vtprune.stats(model)
    with pytest.raises(vtprune.VTPruneError, match="nothing to remove"):
        vtprune.remove(model)


def test_stats_before_any_forward(model, tiny_models):
    from vtprune.testing import tiny_image, tiny_inputs

    with vtprune.pruned(model, "divprune", budget=16):
        with pytest.raises(vtprune.VTPruneError, match="no forward"):
            vtprune.stats(model)
        inputs = tiny_inputs(tiny_models["llava"][1], [tiny_image(0)], ["Describe the image."])
        with torch.no_grad():
            model(**inputs)
        assert vtprune.stats(model).samples[0].pruned


def test_methods_lists_the_pre_llm_catalog():
    catalog = vtprune.methods()
    assert set(SIX_METHODS) <= set(catalog)
    for name in SIX_METHODS:
        info = catalog[name]
        assert info.name == name
        assert info.stage == "pre-llm"
        assert isinstance(info.paper, str) and info.paper
        assert info.positions in ("original", "compact")
        assert info.summary
        budget = info.default_budget
        assert budget is None or (isinstance(budget, int) and budget > 0) or (
            isinstance(budget, float) and math.isfinite(budget) and 0 < budget <= 1)
    # the official codes' conventions (issue 16): every pre-LLM paper method re-indexes positions
    assert catalog["divprune"].positions == catalog["fastervlm"].positions == catalog["visionzip"].positions == "compact"
    assert set(catalog["visionzip"].defaults) == {"dominant", "contextual", "keep_cls"}
    assert catalog["fastervlm"].budget_policy == catalog["visionzip"].budget_policy == "equal_per_crop"
