"""In-LLM pruning (FastV, PyramidDrop): reference equivalence after the pruning layer, batching, decoding."""

from __future__ import annotations

import pytest
import torch

import vtprune
from vtprune.testing import tiny_image, tiny_inputs

FAMILIES = ["llava", "llava_next"]
METHODS = [("fastv", {"ratio": 0.5}), ("pdrop", {"lambda_": 0.5})]


def _inputs(processor, padding_side="left"):
    images = [tiny_image(0, (48, 64)), None, tiny_image(1, (64, 48))]
    prompts = ["describe the image please", "hi", "what color"]
    return tiny_inputs(processor, images, prompts, padding_side=padding_side)


def _single(inputs, b, family):
    """Sample b of a padded batch, without its padding (image-less samples lose their pixel inputs)."""
    real = inputs["attention_mask"][b].bool()
    out = {"input_ids": inputs["input_ids"][b:b + 1, real], "attention_mask": inputs["attention_mask"][b:b + 1, real]}
    image_rows = [i for i in range(inputs["input_ids"].shape[0]) if "pixel_values" in inputs
                  and bool((inputs["input_ids"][i] == _image_token(inputs, family)).any())]
    if b in image_rows:
        idx = image_rows.index(b)
        out["pixel_values"] = inputs["pixel_values"][idx:idx + 1]
        if "image_sizes" in inputs:
            out["image_sizes"] = inputs["image_sizes"][idx:idx + 1]
    return out


def _image_token(inputs, family):
    return _image_token.ids[family]


_image_token.ids = {}


@pytest.fixture(params=FAMILIES)
def family_model(request, tiny_models):
    model, processor = tiny_models[request.param]
    _image_token.ids[request.param] = model.config.image_token_id
    return request.param, model, processor


@pytest.mark.parametrize("method,options", METHODS)
def test_nothing_pruned_is_identity(family_model, method, options):
    family, model, processor = family_model
    inputs = _inputs(processor)
    with torch.no_grad():
        ref = model(**inputs).logits
        ref_tokens = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        key = "ratio" if method == "fastv" else "lambda_"
        with vtprune.pruned(model, method, **{key: 0.0 if method == "fastv" else 1.0}):
            out = model(**inputs).logits
            tokens = model.generate(**inputs, max_new_tokens=6, do_sample=False)
            assert not any(s.pruned for s in vtprune.stats(model).samples)
    assert torch.equal(out, ref)
    assert torch.equal(tokens, ref_tokens)


@pytest.mark.parametrize("positions", ["original", "compact"])
@pytest.mark.parametrize("method,options", [METHODS[0], ("pdrop", {"layers": [2], "lambda_": 0.5})])
def test_reference_equivalence_after_pruning_layer(family_model, method, options, positions):
    """Logits equal the decoder run by hand: full sequence up to layer k, then only the kept tokens."""
    family, model, processor = family_model
    single = _single(_inputs(processor), 0, family)
    lm = model.model.language_model
    captured = {}
    hook = lm.register_forward_pre_hook(lambda m, a, k: captured.update(k), with_kwargs=True)
    with torch.no_grad():
        model(**single)
        hook.remove()
        with vtprune.pruned(model, method, positions=positions, **options):
            pruned_logits = model(**single).logits[0]
            stats = vtprune.stats(model).samples[0]
    embeds = captured["inputs_embeds"]
    length = embeds.shape[1]
    positions_full = torch.arange(length)
    image = (single["input_ids"][0] == model.config.image_token_id)
    # kept columns entering each layer, from the per-layer lengths and the final kept visual positions
    kept_final = set(stats.stages[-1].kept_positions.tolist())
    # structural tokens (LLaVA-NeXT row newlines) are never dropped by in-LLM methods
    for span in vtprune.adapters.base.adapter_for(model).build_layouts(dict(single))[0].images:
        kept_final |= set(span.positions[span.structural].tolist())
    with torch.no_grad():
        hidden = embeds
        cols = torch.arange(length)
        schedule = vtprune.registry.method_class(method)(**options).schedule(len(lm.layers), 1, 1)
        stage_layers = [layer for layer, _ in schedule]
        pos = positions_full
        for index, layer in enumerate(lm.layers):
            if index in stage_layers:
                # which columns survive this stage: the engine's per-layer length tells how many visual remain
                target_len = stats.layer_lengths[index]
                keep = [c for c in cols.tolist() if not image[c] or c in kept_final]
                extra = target_len - len(keep)
                assert extra >= 0
                assert extra == 0, "single-stage schedules keep exactly the final visual tokens"
                sel = torch.tensor([cols.tolist().index(c) for c in keep])
                hidden = hidden[:, sel]
                cols = cols[sel]
                pos = pos[sel] if positions == "original" else torch.arange(len(sel))
            pe = lm.rotary_emb(hidden, position_ids=pos[None])
            hidden = layer(hidden, attention_mask=None, position_embeddings=pe, position_ids=pos[None])
        logits = model.lm_head(lm.norm(hidden))[0]
    assert stats.layer_lengths[-1] == logits.shape[0]
    torch.testing.assert_close(pruned_logits, logits, atol=1e-5, rtol=1e-5)


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
            single = _single(inputs, b, family)
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
        vtprune.apply(model, "fastv", budget=8)  # 4 layers, K=2: at least half of 64 tokens on average
        with pytest.raises(vtprune.BudgetError, match="smallest reachable budget"):
            model(**inputs)
        vtprune.remove(model)
    with pytest.raises(vtprune.VTPruneError, match="at most one in-LLM"):
        vtprune.apply(model, ["fastv", "pdrop"])
    with pytest.raises(vtprune.MethodOptionError):
        vtprune.apply(model, "fastv", ratio=1.5)


def test_kv_cache_holds_only_kept_tokens(tiny_models):
    model, processor = tiny_models["llava"]
    single = _single(_inputs(processor), 0, "llava")
    with torch.no_grad(), vtprune.pruned(model, "fastv", ratio=0.75):
        out = model(**single, use_cache=True)
        stats = vtprune.stats(model).samples[0]
    cache = out.past_key_values
    lengths = [cache.layers[i].get_seq_length() for i in range(len(cache.layers))]
    assert lengths == stats.layer_lengths
    assert lengths[-1] < lengths[0]
