"""The design invariants (design.md §2) for every supported family × registered method.

Methods are taken from the registry by stage (``vtprune.methods()``), so a newly registered method is covered
here without editing this file; in-LLM methods get their reference-equivalence, batching and KV-cache checks in
test_in_llm.py. Every reference is built by hand from an *unwrapped* run of the model (the embeddings, position
ids and deepstack rows its language model receives; see reference_runs.py), never by the engine: the engine's
output is only ever compared with it. All runs are CPU, float32, SDPA, under ``torch.no_grad()``.
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from reference_runs import (
    ALL_FAMILIES,
    IN_LLM,
    MROPE_FAMILIES,
    NEW_TOKENS,
    PRE_LLM,
    Case,
    assert_same_greedy,
    call_positions,
    capture_lm_calls,
    generate,
    lm_logits,
    make_case,
    merged_order,
    merged_tokens,
    new_tokens,
    reference_greedy,
    reference_sequence,
    spy_selections,
)

import vtprune
from vtprune.budget import tokens_for
from vtprune.registry import method_class
from vtprune.selectors.baselines import pool_grid
from vtprune.testing import tiny_image, tiny_inputs

FAMILIES = ALL_FAMILIES
METHODS = PRE_LLM
ALL_METHODS = PRE_LLM + IN_LLM
# methods that read vision-encoder attention (hooks on the vision tower)
VISION_ATTENTION = {"cls_attention", "received_attention", "flat_cls_attention"}
CLS_METHODS = tuple(m for m in PRE_LLM if VISION_ATTENTION & set(method_class(m).signals))
POSITIONS = ("original", "compact")
# budgets that prune: llava has 64 visual tokens per image; llava_next / onevision 268 (base 64 + crops +
# newlines); the Qwen families 20 (a 4 x 5 merged grid)
BUDGET = {"llava": 16, "llava_next": 24, "llava_onevision": 24, "qwen2_vl": 8, "qwen2_5_vl": 8, "qwen3_vl": 8}
#: pre-LLM methods that cannot reach BUDGET on the tiny grids: MustDrop merges whole 3x3 windows, so an 8x8 grid
#: keeps at least 32 tokens and a 4x5 one 12
METHOD_BUDGET = {"mustdrop": 0.75}
IN_LLM_BUDGET = 0.6  # equivalent tokens as a fraction: reachable by every in-LLM schedule on the 4-layer models
PROMPT = "Describe the image."
# batch for the batching invariant: different images (llava_next / onevision: different crop counts; Qwen:
# different grids), different prompt lengths, and a text-only sample
BATCH_PROMPTS = ("Describe the image.", "What color is the box on the left of this picture?", "Hi")

HOOK_DICTS = (
    "_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
    "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks",
)


def budget_for(family: str, method: str):
    return IN_LLM_BUDGET if method in IN_LLM else METHOD_BUDGET.get(method, BUDGET[family])


def options_for(family: str, method: str) -> dict:
    """SparseVLM 1.5 recycles tokens inside the decoder, which a deepstack model refuses at the decoder layers
    that still receive deepstack rows (layers 0-1 of the tiny Qwen3-VL; its default first drop enters layer 1):
    there its stages start after them (on a real Qwen3-VL the scaled default layers already do)."""
    if (family, method) == ("qwen3_vl", "sparsevlm"):
        return {"layers": [1, 2]}
    return dict(method_class(method).solo)  # a pre-LLM stage alone, without its companion stages


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


# ---------------------------------------------------------------------------------------------------------
# The unwrapped run of one sample, computed once per family
# ---------------------------------------------------------------------------------------------------------


_CASES: dict[str, Case] = {}


def build_case(family: str, tiny_models) -> Case:
    if family not in _CASES:
        model, processor = tiny_models[family]
        assert not vtprune.is_pruned(model)
        _CASES[family] = make_case(family, model, processor, tiny_inputs(processor, [tiny_image(0)], [PROMPT]))
    return _CASES[family]


@pytest.fixture(params=FAMILIES)
def case(request, tiny_models) -> Case:
    return build_case(request.param, tiny_models)


# ---------------------------------------------------------------------------------------------------------
# Reference helpers (no engine code involved)
# ---------------------------------------------------------------------------------------------------------


def pruned_run(case: Case, method: str, positions: str | None = None, budget=None, **options):
    """Apply ``method``, run one forward capturing what the language model receives; leaves pruning installed."""
    options = {**options_for(case.family, method), **options}
    vtprune.apply(case.model, method, budget_for(case.family, method) if budget is None else budget,
                  positions=positions, **options)
    with capture_lm_calls(case.model) as calls:
        logits = case.model(**case.inputs).logits[0]
    (call,) = calls
    return logits, call, vtprune.stats(case.model)


def hook_snapshot(model) -> dict:
    """Per module: class, every hook dict, and the names of its instance attributes; key None: global hooks."""
    snap = {}
    for name, module in model.named_modules(remove_duplicate=False):
        hooks = {attr: dict(getattr(module, attr, {})) for attr in HOOK_DICTS}
        snap[name] = (type(module), hooks, frozenset(vars(module)))
    global_hooks = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                    "_global_module_registration_hooks")
    snap[None] = tuple(dict(getattr(torch.nn.modules.module, attr)) for attr in global_hooks)
    return snap


def assert_untouched(model, before: dict) -> None:
    after = hook_snapshot(model)
    assert after.keys() == before.keys()
    assert after.pop(None) == before[None], "a global module hook was left behind"
    for name, entry in before.items():
        if name is None:
            continue
        cls, hooks, attrs = entry
        assert after[name][0] is cls, f"class of {name!r} changed"
        assert after[name][1] == hooks, f"hooks of {name!r} changed"
        assert after[name][2] == attrs, f"attributes of {name!r} changed: {after[name][2] ^ attrs}"
    for name, module in model.named_modules(remove_duplicate=False):
        left = [a for a in vars(module) if a.startswith("_vtprune")]
        assert not left, f"{name!r} still has {left}"


def is_newline(case: Case, positions: torch.Tensor) -> torch.Tensor:
    """LLaVA-NeXT / OneVision row newlines among ``positions`` (their embedding is the model's image_newline)."""
    newline = getattr(case.model.model, "image_newline", None)
    if newline is None:
        return torch.zeros(positions.numel(), dtype=torch.bool)
    return (case.embeds[positions] == newline[None]).all(-1)


# ---------------------------------------------------------------------------------------------------------
# 1. nothing pruned => nothing changed
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("budget", [100000, 1.0])
@pytest.mark.parametrize("method", ALL_METHODS)
def test_full_budget_changes_nothing(case, method, budget):
    model = case.model
    # a pre-LLM stage alone (its companion stages keep their own defaults, tested as in-LLM / decode methods)
    with vtprune.pruned(model, method, budget, **method_class(method).solo):
        logits = model(**case.inputs).logits[0]
        assert torch.equal(logits, case.logits)
        for sample in vtprune.stats(model).samples:
            assert not sample.pruned
            assert sample.equivalent_tokens == sample.visual_in == case.image_positions.numel()
        if isinstance(budget, int):  # generation is checked once per method (with the float budget)
            return
        tokens, step_logits = generate(model, case.inputs)
        assert tokens[0].tolist() == case.tokens
        assert torch.equal(step_logits[0], case.step_logits)
        assert not vtprune.stats(model).samples[0].pruned


# ---------------------------------------------------------------------------------------------------------
# 2. remove() restores exactly
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ALL_METHODS)
def test_remove_restores_exactly(case, method):
    model = case.model
    before = hook_snapshot(model)
    config_before = model.config.to_dict()
    vtprune.apply(model, method, budget_for(case.family, method), **options_for(case.family, method))
    assert vtprune.is_pruned(model)
    pruned_logits = model(**case.inputs).logits[0]
    assert vtprune.stats(model).samples[0].pruned
    assert pruned_logits.shape[0] < case.length
    new_tokens(model, case.inputs)
    vtprune.remove(model)
    assert not vtprune.is_pruned(model)
    assert_untouched(model, before)
    assert model.config.to_dict() == config_before
    assert torch.equal(model(**case.inputs).logits[0], case.logits)
    with pytest.raises(vtprune.VTPruneError):
        vtprune.stats(model)


@pytest.mark.parametrize("method", CLS_METHODS)
def test_pruned_context_manager_removes_on_exit_and_on_error(case, method):
    model = case.model
    before = hook_snapshot(model)
    with vtprune.pruned(model, method, budget_for(case.family, method)) as same:
        assert same is model and vtprune.is_pruned(model)
        assert model(**case.inputs).logits.shape[1] < case.length
    assert not vtprune.is_pruned(model)
    assert_untouched(model, before)

    with pytest.raises(RuntimeError, match="boom"):
        with vtprune.pruned(model, method, budget_for(case.family, method)):
            model(**case.inputs)
            raise RuntimeError("boom")
    assert not vtprune.is_pruned(model)
    assert_untouched(model, before)
    assert torch.equal(model(**case.inputs).logits[0], case.logits)


# ---------------------------------------------------------------------------------------------------------
# 3. text tokens never pruned; kept order; sequence length
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_text_kept_and_visual_order(case, method, monkeypatch):
    with spy_selections(monkeypatch, method) as records:
        logits, call, stats = pruned_run(case, method)
    (sample,) = stats.samples
    assert sample.visual_in == case.image_positions.numel()
    (stage,) = sample.stages
    assert stage.layer == 0 and stage.name == method
    kept = stage.kept_positions
    assert kept.dtype == torch.long
    assert bool((kept[1:] > kept[:-1]).all()), "kept positions must be strictly ascending"
    assert bool(torch.isin(kept, case.image_positions).all()), "kept positions must be image-token positions"
    assert stage.merged == sum(selection.num_merged for _, selection in records)
    if method == "pool":  # every content token is pooled; only row newlines stay as they are
        assert stage.merged > 0 and kept.numel() == int(is_newline(case, kept).sum())
    # the budget counts content tokens (row newlines are layout and come on top)
    content = int((~is_newline(case, kept)).sum())
    budget = budget_for(case.family, method)
    limit = budget if isinstance(budget, int) else tokens_for(budget, int((~is_newline(case, case.image_positions)).sum()))
    assert 0 < content + stage.merged <= limit
    assert sample.pruned
    expected = case.text_positions.numel() + kept.numel() + stage.merged
    assert sample.layer_lengths[0] == expected
    assert call["inputs_embeds"].shape[1] == expected == logits.shape[0]
    # every text token enters the decoder, unchanged and in order
    embeds = call["inputs_embeds"][0]
    slot = 0
    for p in case.text_positions.tolist():  # an in-order subsequence match
        while slot < embeds.shape[0] and not torch.equal(embeds[slot], case.embeds[p]):
            slot += 1
        assert slot < embeds.shape[0], f"text token at position {p} was pruned or reordered"
        slot += 1


# ---------------------------------------------------------------------------------------------------------
# 4 + 5. positions and reference equivalence (logits and greedy generation), both position conventions
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("positions", POSITIONS)
@pytest.mark.parametrize("method", METHODS)
def test_reference_equivalence(case, method, positions, monkeypatch):
    model = case.model
    with spy_selections(monkeypatch, method) as records:
        logits, call, stats = pruned_run(case, method, positions)
    (stage,) = stats.samples[0].stages
    merged, anchors, merged_side = merged_tokens(case, records)
    order = merged_order(records)
    assert merged.shape[0] == stage.merged
    if stage.merged:
        assert bool(torch.isin(anchors, case.image_positions).all())
        if not any(selection.order is not None for _, selection in records):
            # merged tokens that stand for pruned visual tokens: their anchors are image positions that were dropped
            assert not bool(torch.isin(anchors, stage.kept_positions).any())
    embeds, position_ids, is_merged, side = reference_sequence(
        case, stage.kept_positions, positions, merged if stage.merged else None, anchors, merged_side, order)

    engine_embeds = call["inputs_embeds"][0]
    assert engine_embeds.shape == embeds.shape
    # kept rows are the unpruned embeddings, bitwise; merged rows are the method's tokens at their anchors
    assert torch.equal(engine_embeds[~is_merged], embeds[~is_merged])
    assert torch.equal(engine_embeds, embeds)
    assert torch.equal(call_positions(call), position_ids)
    if method == "pool" and case.family == "llava":  # one 8x8 grid: check the pooled tokens independently
        grid = 8
        assert case.image_positions.numel() == grid * grid
        pooled = pool_grid(case.embeds[case.image_positions], grid, grid, BUDGET[case.family])
        windows = pooled.assignment
        means = torch.stack([case.embeds[case.image_positions[windows == w]].mean(0)
                             for w in range(int(windows.max()) + 1)])
        torch.testing.assert_close(engine_embeds[is_merged], means, rtol=0, atol=1e-6)
        assert torch.equal(anchors, case.image_positions[pooled.anchors])

    reference = lm_logits(model, embeds, position_ids, side)
    torch.testing.assert_close(logits, reference, rtol=0, atol=1e-5)

    tokens, step_logits = generate(model, case.inputs)
    generated = (tokens[0].tolist(), step_logits[0])
    # generate leaves the stats of its prefill, which is the forward above
    after = vtprune.stats(model).samples[0]
    assert torch.equal(after.stages[0].kept_positions, stage.kept_positions)
    assert after.layer_lengths == stats.samples[0].layer_lengths
    assert_same_greedy(generated, reference_greedy(model, embeds, position_ids, side), case.eos)
    vtprune.remove(model)


# ---------------------------------------------------------------------------------------------------------
# loss on the kept positions
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_loss_on_kept_positions(case, method):
    input_ids = case.inputs["input_ids"]
    labels = input_ids.masked_fill(input_ids == case.model.config.image_token_id, -100)
    logits, _, stats = pruned_run(case, method)
    out = case.model(**case.inputs, labels=labels)
    assert torch.equal(out.logits[0], logits)
    (stage,) = stats.samples[0].stages
    # the image span is contiguous; the pruned one holds the kept visual and merged tokens, all unlabelled
    first, last = int(case.image_positions[0]), int(case.image_positions[-1])
    assert case.image_positions.numel() == last - first + 1
    span = stage.kept_positions.numel() + stage.merged
    pruned_labels = torch.cat([labels[0, :first], torch.full((span,), -100), labels[0, last + 1:]])
    assert pruned_labels.shape[0] == logits.shape[0]
    expected = F.cross_entropy(logits[:-1], pruned_labels[1:], ignore_index=-100)
    torch.testing.assert_close(out.loss, expected, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# 6. batching: padded batch == each sample alone
# ---------------------------------------------------------------------------------------------------------

_ALONE: dict[tuple, tuple] = {}


def batch_images(family: str):
    """Two different images (different crop counts / grid sizes) and a text-only sample."""
    if family in ("llava_next", "llava_onevision"):
        second = tiny_image(3, size=(40, 80))
    elif family in MROPE_FAMILIES:
        second = tiny_image(3, size=(80, 40))
    else:
        second = tiny_image(3)
    return [tiny_image(0), second, None]


def run_alone(case: Case, method: str, positions: str, index: int, with_generation: bool):
    """One sample of the batch run alone, pruned: (logits [n, V], kept positions, tokens, step logits [t, V])
    (tokens and step logits None without generation)."""
    key = (case.family, method, positions, index, with_generation)
    if key not in _ALONE:
        image = batch_images(case.family)[index]
        inputs = tiny_inputs(case.processor, [image], [BATCH_PROMPTS[index]])
        tokens = step_logits = None
        with vtprune.pruned(case.model, method, budget_for(case.family, method), positions=positions,
                            **method_class(method).solo):  # the pre-LLM stage alone
            logits = case.model(**inputs).logits[0]
            sample = vtprune.stats(case.model).samples[0]
            kept = sample.stages[0].kept_positions if sample.stages else torch.empty(0, dtype=torch.long)
            if with_generation:
                tokens, step_logits = generate(case.model, inputs)
                tokens, step_logits = tokens[0].tolist(), step_logits[0]
        assert logits.shape[0] == sample.layer_lengths[0]
        _ALONE[key] = (logits, kept, tokens, step_logits)
    return _ALONE[key]


@pytest.mark.parametrize("padding_side,positions", [("left", "compact"), ("right", "original")])
@pytest.mark.parametrize("method", METHODS)
def test_batch_equals_alone(case, method, padding_side, positions):
    """Left padding with generation (compact positions: a different decode shift per sample) and right padding
    with original positions; both position conventions are generated one by one in test_reference_equivalence."""
    model = case.model
    inputs = tiny_inputs(case.processor, batch_images(case.family), list(BATCH_PROMPTS), padding_side=padding_side)
    mask = inputs["attention_mask"]
    assert len(set(mask.sum(-1).tolist())) == 3, "the samples must have different lengths"
    assert bool((mask[:, 0] == 0).any()) == (padding_side == "left")
    if case.family in MROPE_FAMILIES:  # two different image grids in one batch
        grids = inputs["image_grid_thw"].tolist()
        assert len(grids) == 2 and grids[0] != grids[1]
    alone = [run_alone(case, method, positions, b, padding_side == "left") for b in range(3)]
    vtprune.apply(model, method, budget_for(case.family, method), positions=positions,
                  **method_class(method).solo)
    logits = model(**inputs).logits
    stats = vtprune.stats(model)
    lengths = [s.layer_lengths[0] for s in stats.samples]
    assert logits.shape[1] == max(lengths)
    assert stats.samples[0].pruned and stats.samples[1].pruned
    assert stats.samples[2].visual_in == 0 and not stats.samples[2].pruned
    for b, (ref_logits, ref_kept, _, _) in enumerate(alone):
        n = lengths[b]
        assert n == ref_logits.shape[0]
        # the pruned output keeps the input's padding side
        real = logits[b, -n:] if padding_side == "left" else logits[b, :n]
        torch.testing.assert_close(real, ref_logits, rtol=0, atol=1e-4)
        # the same visual tokens are kept as when the sample runs alone (up to its padding offset)
        first = int(torch.nonzero(mask[b]).min())
        sample = stats.samples[b]
        kept = sample.stages[0].kept_positions if sample.stages else torch.empty(0, dtype=torch.long)
        assert torch.equal(kept - first, ref_kept)
    if padding_side == "left":  # batched generation needs left padding
        tokens, step_logits = generate(model, inputs)
        for b, (_, _, ref_tokens, ref_step_logits) in enumerate(alone):
            n = len(ref_tokens)
            assert tokens[b, :n].tolist() == ref_tokens
            torch.testing.assert_close(step_logits[b, :n], ref_step_logits, rtol=0, atol=1e-4)
            if n < NEW_TOKENS:  # stopped at EOS alone; the batch pads after it
                assert ref_tokens[-1] == case.eos
    vtprune.remove(model)


# ---------------------------------------------------------------------------------------------------------
# 7. SDPA everywhere
# ---------------------------------------------------------------------------------------------------------


def attention_implementations(model) -> set[str]:
    """The attention implementation of the model and of every sub-model (vision tower, language model)."""
    from transformers import PreTrainedModel

    return {m.config._attn_implementation for m in model.modules() if isinstance(m, PreTrainedModel)}


def eager_modules(model) -> list:
    """The transformers modules of the model's classes that define an eager attention function."""
    names = {type(m).__module__ for m in model.modules()}
    return [sys.modules[n] for n in sorted(names) if hasattr(sys.modules[n], "eager_attention_forward")]


@pytest.mark.parametrize("method", CLS_METHODS + IN_LLM)
def test_sdpa_everywhere(case, method, monkeypatch):
    model = case.model
    assert attention_implementations(model) == {"sdpa"}

    def no_eager(*args, **kwargs):
        raise AssertionError("eager attention was used")

    modules = eager_modules(model)
    assert modules  # the vision tower's and the decoder's modules (one module for the Qwen families)
    for module in modules:
        monkeypatch.setattr(module, "eager_attention_forward", no_eager)
    seen = []
    handle = model.model.language_model.layers[0].register_forward_pre_hook(
        lambda module, args: seen.append(attention_implementations(model)))
    try:
        with vtprune.pruned(model, method, budget_for(case.family, method), **options_for(case.family, method)):
            logits = model(**case.inputs).logits
            assert vtprune.stats(model).samples[0].pruned
            assert logits.shape[1] < case.length
    finally:
        handle.remove()
    assert seen == [{"sdpa"}]
    assert attention_implementations(model) == {"sdpa"}


# ---------------------------------------------------------------------------------------------------------
# 9. determinism
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ALL_METHODS)
def test_deterministic_selection(case, method):
    logits, _, first = pruned_run(case, method)
    kept = first.samples[0].stages[-1].kept_positions.clone()
    again = case.model(**case.inputs).logits[0]
    assert torch.equal(vtprune.stats(case.model).samples[0].stages[-1].kept_positions, kept)
    assert torch.equal(again, logits)
    vtprune.remove(case.model)
    _, _, fresh = pruned_run(case, method)  # a fresh apply selects the same tokens
    assert torch.equal(fresh.samples[0].stages[-1].kept_positions, kept)


def test_random_seed_changes_selection(case):
    _, _, stats = pruned_run(case, "random", seed=0)
    seed0 = stats.samples[0].stages[0].kept_positions.clone()
    vtprune.remove(case.model)
    _, _, stats = pruned_run(case, "random", seed=1)
    seed1 = stats.samples[0].stages[0].kept_positions
    assert seed0.numel() > 0 and not torch.equal(seed0, seed1)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_stage_stats_account_for_every_visual_token_leaving_it(case, method):
    """Each stage's kept tokens plus its merged tokens (``merged_positions``: the places merged tokens take, what
    ``vtprune run --show`` outlines) are the visual tokens leaving it, all at visual positions of the input."""
    from vtprune.adapters.base import adapter_for

    _, _, stats = pruned_run(case, method)
    visual = adapter_for(case.model).build_layouts(dict(case.inputs))[0].visual_positions()
    for stage in stats.samples[0].stages:
        merged = stage.merged_positions
        count = 0 if merged is None else merged.numel()
        assert stage.kept_positions.numel() + count == stage.visual_out, (stage.name, stage.layer)
        assert torch.isin(stage.kept_positions, visual).all()
        if merged is not None:
            assert count > 0 and torch.equal(merged, torch.sort(merged).values)
            assert torch.isin(merged, visual).all(), (stage.name, merged)
