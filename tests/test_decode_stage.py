"""The decode stage (vtprune/engine/decode_stage.py) with DyCoke's decode-time KV pruning (``dycoke_decode``).

* keep-all (p=0) decodes exactly as the unwrapped model (greedy, sampling, beams);
* pruned, it equals a reference run of the unwrapped model whose layers from ``layer`` on are masked, at every
  decode step, to exactly the cache columns the stage attended to (so the gathered view is the same attention);
* the attention that decides (layer ``layer − 1``, current token, from q/k) equals eager attention;
* batches with padding, composition with a pre-LLM method, and clear refusals.
"""

from __future__ import annotations

import pytest
import torch

import vtprune
from vtprune import compat
from vtprune.engine import decode_stage
from vtprune.engine.attention_rows import attention_over_keys
from vtprune.errors import MethodOptionError, VTPruneError
from vtprune.testing import tiny_image, tiny_inputs, tiny_vlm

FAMILIES = ["llava", "qwen2_vl"]
NEW = 6


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def _generate(model, inputs, **kwargs):
    return model.generate(**inputs, max_new_tokens=NEW, output_logits=True, return_dict_in_generate=True,
                          pad_token_id=0, **{"do_sample": False, **kwargs})


def _inputs(processor, batch: int = 1):
    prompts = ["Describe the image.", "What is in the picture? Answer briefly please."][:batch]
    return tiny_inputs(processor, [tiny_image(i) for i in range(batch)], prompts)


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_all_equals_unpruned(family):
    model, processor = tiny_vlm(family)
    inputs = _inputs(processor, 2)
    ref = _generate(model, inputs)
    ref_beam = model.generate(**inputs, max_new_tokens=NEW, num_beams=2, do_sample=False, pad_token_id=0)
    torch.manual_seed(0)
    ref_sample = model.generate(**inputs, max_new_tokens=NEW, do_sample=True, pad_token_id=0)
    with vtprune.pruned(model, "dycoke_decode", p=0.0):
        out = _generate(model, inputs)
        beam = model.generate(**inputs, max_new_tokens=NEW, num_beams=2, do_sample=False, pad_token_id=0)
        torch.manual_seed(0)
        sample = model.generate(**inputs, max_new_tokens=NEW, do_sample=True, pad_token_id=0)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(beam, ref_beam)
    assert torch.equal(sample, ref_sample)


def _reference_with_masks(model, inputs, layer: int, columns: list[list[torch.Tensor | None]], **kwargs):
    """The unwrapped model's generate, with decoder layers >= ``layer`` masked at decode step s to the cache
    columns ``columns[s][b]`` (None: all)."""
    layers = model.model.language_model.layers
    step = {"index": -1}

    def first(module, args, kw):
        hidden = args[0] if args else kw["hidden_states"]
        if hidden.shape[1] == 1:
            step["index"] += 1

    def mask(index, module, args, kw):
        hidden = args[0] if args else kw["hidden_states"]
        if hidden.shape[1] != 1 or step["index"] >= len(columns):
            return None
        cache = kw.get("cache", kw.get("past_key_values"))
        length = cache.layers[index].get_seq_length() + 1
        rows = columns[step["index"]]
        allowed = torch.zeros(hidden.shape[0], 1, 1, length, dtype=torch.bool)
        for b, cols in enumerate(rows):
            if cols is None:
                allowed[b] = kw["attention_mask"][b, :, -1:, :length].bool() if kw.get("attention_mask") is not None \
                    else True
            else:
                allowed[b, 0, 0, cols] = True
        return args, {**kw, "attention_mask": allowed}

    handles = [layers[0].register_forward_pre_hook(first, with_kwargs=True)]
    for i in range(layer, len(layers)):
        handles.append(layers[i].register_forward_pre_hook(lambda m, a, k, i=i: mask(i, m, a, k), with_kwargs=True))
    try:
        return _generate(model, inputs, **kwargs)
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("batch", [1, 2])
def test_pruned_decode_equals_masked_reference(family, batch):
    model, processor = tiny_vlm(family)
    inputs = _inputs(processor, batch)
    with vtprune.pruned(model, "dycoke_decode", layer=1, p=0.7, threshold=0.999):
        out = _generate(model, inputs)
        stage = model._vtprune_session.decode_stage
        columns, history = stage.step_columns, stage.history
    assert len(columns) == NEW - 1
    visual = sum(int((inputs["input_ids"][b] == model.config.image_token_id).sum()) for b in range(batch))
    assert all(sum(step) < visual for step in history)  # every step attends to fewer visual entries
    ref = _reference_with_masks(model, inputs, 1, columns)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("beams", [1, 2])
def test_persistent_view_equals_gathering_every_step(family, beams, monkeypatch):
    """The gathered view is kept across steps while the kept set is unchanged (new entries appended to its buffers,
    reordered with the cache under beam search); gathering it afresh at every step gives bitwise the same run."""
    model, processor = tiny_vlm(family)
    inputs = _inputs(processor, 2)
    kwargs = {"num_beams": beams, "output_scores": True, "max_new_tokens": 40}

    def run():
        with vtprune.pruned(model, "dycoke_decode", layer=1, p=0.7, threshold=0.99):
            out = model.generate(**inputs, do_sample=False, pad_token_id=0, return_dict_in_generate=True, **kwargs)
            return out, model._vtprune_session.decode_stage.state

    monkeypatch.setattr(decode_stage, "SPARE", 1)  # small buffers: the doubling path runs too
    out, state = run()
    pruned_steps = sum(step is not None for step in state.columns)
    assert 1 <= state.views < pruned_steps  # some steps reused the view of an earlier one
    monkeypatch.setattr(decode_stage._View, "same_kept", lambda self, kept: False)
    ref, state = run()
    assert state.views == sum(step is not None for step in state.columns)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.scores, ref.scores, strict=True):
        assert torch.equal(a, b)


def test_stable_attention_gathers_once():
    """threshold -1: every step after the first finds the attention pattern unchanged, so the kept set and its
    gathered view are those of the first step for the whole generation."""
    model, processor = tiny_vlm("llava")
    inputs = _inputs(processor)
    with vtprune.pruned(model, "dycoke_decode", threshold=-1.0):
        _generate(model, inputs)
        state = model._vtprune_session.decode_stage.state
    assert len(state.columns) == NEW - 1 and state.views == 1


def test_decode_view_is_cheaper_than_full_cache():
    model, processor = tiny_vlm("llava")
    inputs = _inputs(processor)
    with vtprune.pruned(model, "dycoke_decode"):
        _generate(model, inputs)
        stage = model._vtprune_session.decode_stage
        columns = stage.step_columns
    length = inputs["input_ids"].shape[1]
    visual = int((inputs["input_ids"] == model.config.image_token_id).sum())
    for s, rows in enumerate(columns):  # prompt text + 20 % of the visual tokens + decoded tokens
        assert rows[0].numel() == length - visual + int(visual * (1 - 0.8)) + s + 1


def test_attention_that_decides_equals_eager():
    model, processor = tiny_vlm("qwen2_vl")
    model.set_attn_implementation("eager")
    inputs = _inputs(processor)
    layers = model.model.language_model.layers
    captured = []

    def keep_input(module, args, kw):
        captured.append((args[0] if args else kw["hidden_states"], kw["position_embeddings"]))

    handle = layers[2].register_forward_pre_hook(keep_input, with_kwargs=True)
    try:
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, output_attentions=True,
                             return_dict_in_generate=True, pad_token_id=0)
    finally:
        handle.remove()
    cache = compat.output_cache(out) if compat.output_cache(out) is not None else out.past_key_values
    prompt = inputs["input_ids"].shape[1]
    for s in range(1, 4):  # decode steps
        hidden, pe = captured[s]
        keys = cache.layers[2].keys[:, :, :prompt + s]
        rows = attention_over_keys(layers[2], hidden, pe, keys, None, average_heads=True)[:, -1]
        torch.testing.assert_close(rows, out.attentions[s][2].mean(dim=1)[:, -1].float(), atol=1e-6, rtol=1e-5)


def test_composes_with_a_pre_llm_method():
    model, processor = tiny_vlm("llava")
    inputs = _inputs(processor)
    with vtprune.pruned(model, ["divprune", "dycoke_decode"], budget=0.5):
        out = _generate(model, inputs)
        stats = vtprune.stats(model)
        history = model._vtprune_session.decode_stage.history
    kept = stats.samples[0].stages[0].visual_out
    assert kept == 32 and all(step == [int(kept * (1 - 0.8))] for step in history)
    assert out.sequences.shape[1] == inputs["input_ids"].shape[1] + NEW


def test_refusals():
    model, _ = tiny_vlm("llava")
    with pytest.raises(VTPruneError, match="in-LLM"):
        vtprune.apply(model, ["fastv", "dycoke_decode"])
    assert not vtprune.is_pruned(model)
    with pytest.raises(MethodOptionError, match="layer"):
        vtprune.apply(model, "dycoke_decode", layer=0)
    with pytest.raises(MethodOptionError, match="p="):
        vtprune.apply(model, "dycoke_decode", p=1.0)
