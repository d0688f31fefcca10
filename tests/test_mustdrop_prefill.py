"""MustDrop's prefilling stage (``mustdrop_llm``, installed by ``mustdrop`` with ``prefill=True``): fidelity to the
authors' code on identical inputs, the key set, the budget mode and the switch.

``official_dual_attention_filter`` and ``official_prefill`` are this project's literal transcriptions of
liuting20/MustDrop @ 909afa5 ``llava/model/language_model/modelling_sparse_llama.py`` (the layer loop L196-264,
``dual_attention_filter`` L336-354) and ``llava/model/multimodal_encoder/clip_encoder.py`` L97-107 (the key set),
written in the official tensor layout (batch 1, eager attention weights [1, H, S, S]) and sharing nothing with
vtprune's selectors. Registry-driven files (test_invariants.py, test_in_llm.py, test_video.py, test_mrope.py,
test_flops_stats.py) cover ``mustdrop_llm`` and ``mustdrop`` with ``-k mustdrop``.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from reference_runs import capture_lm_calls
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

import vtprune
from vtprune.catalog.pre_llm_more import MustDropLLM
from vtprune.errors import MethodOptionError
from vtprune.selectors.cls_attention import topk_select
from vtprune.selectors.mustdrop import dual_attention_keep, key_set_count
from vtprune.testing import tiny_image, tiny_inputs, tiny_vlm

MICRO_LLAVA = Path(__file__).resolve().parent.parent / "models" / "micro-llava"


# ---------------------------------------------------------------------------------------------------------
# Transcriptions of the official code
# ---------------------------------------------------------------------------------------------------------
def official_dual_attention_filter(attn, v_token_start, img_seq, global_thr=1.0, individual_thr=0.0):
    """modelling_sparse_llama.py L336-354, as written (``attn`` [1, H, S, S] eager weights of one layer)."""
    b, head, total_seq, _ = attn.shape
    attn = attn[0]
    text_seq = total_seq - img_seq - v_token_start
    attn = attn.narrow(1, v_token_start + img_seq, text_seq).narrow(2, v_token_start, img_seq)
    attn = attn.mean(dim=0)
    attn_sum = attn.sum(dim=0)
    candidate_mask = (attn_sum < attn_sum.sum(dim=0) * global_thr) & (attn.max(dim=0)[0] < individual_thr)
    all_indices = torch.arange(img_seq, device=attn.device)
    important_indices = all_indices[~candidate_mask]
    return important_indices, text_seq


def official_key_set(attn: torch.Tensor, keep_rate: float = 0.08) -> torch.Tensor:
    """clip_encoder.py L97-107: ``attn`` [B, H, N, N] of the last ViT block; top ceil(keep_rate·(N−1)) of the
    [CLS] row (patch columns), mean over heads."""
    B, H, N, _ = attn.shape
    left_tokens = math.ceil(keep_rate * (N - 1))
    cls_attn = attn[:, :, 0, 1:]
    cls_attn = cls_attn.mean(dim=1)
    _, index = torch.topk(cls_attn, left_tokens, dim=1, largest=True)
    return index


def official_prefill(layers, rotary, hidden_states, v_token_start, img_seq, key_set_, pruning_layers, global_thr,
                     individual_thr):
    """The prefill loop of ``LlamaDynamicvitModel.forward`` L216-264 (batch 1, no cache), with each pruning layer's
    attention weights computed eagerly from its input. Returns the kept image indices after every pruning layer,
    mapped back to the original image (the official ``final_indices`` composed)."""
    position_ids = torch.arange(hidden_states.shape[1]).unsqueeze(0)
    kept_per_layer, current = [], torch.arange(img_seq)
    for layer_idx, decoder_layer in enumerate(layers):
        cos, sin = rotary(hidden_states, position_ids=position_ids)
        attn_weights = None
        if layer_idx in pruning_layers:
            attn_weights = _eager_weights(decoder_layer, hidden_states, (cos, sin))
        hidden_states = decoder_layer(hidden_states, attention_mask=None, position_ids=position_ids,
                                      position_embeddings=(cos, sin))
        hidden_states = hidden_states[0] if isinstance(hidden_states, tuple) else hidden_states
        if layer_idx in pruning_layers:
            vis_indices, text_seq = official_dual_attention_filter(attn_weights, v_token_start, img_seq,
                                                                   global_thr=global_thr,
                                                                   individual_thr=individual_thr)
            vis_indices = torch.cat((vis_indices, key_set_))
            vis_indices = torch.unique(vis_indices)
            key_set_ = torch.nonzero(torch.isin(vis_indices, key_set_)).squeeze()
            sys_indices = position_ids.narrow(1, 0, v_token_start)[0]
            text_indices = position_ids.narrow(1, v_token_start + img_seq, text_seq)[0]
            merged_indices = torch.cat((sys_indices, vis_indices + v_token_start, text_indices), dim=0)
            img_seq = vis_indices.shape[0]
            position_ids = position_ids.narrow(1, 0, v_token_start + img_seq + text_seq)
            hidden_states = torch.index_select(hidden_states, 1, merged_indices)
            current = current[vis_indices]
            kept_per_layer.append(current.clone())
    return kept_per_layer


def _eager_weights(layer, hidden, position_embeddings) -> torch.Tensor:
    """[1, H, S, S]: the eager attention weights of a LLaMA layer for ``hidden`` [1, S, D] (causal)."""
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    length = x.shape[1]
    q = attn.q_proj(x).view(1, length, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(1, length, -1, attn.head_dim).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, *position_embeddings)
    k = repeat_kv(k, q.shape[1] // k.shape[1])
    scores = q @ k.transpose(-1, -2) / math.sqrt(attn.head_dim)
    causal = torch.full((length, length), torch.finfo(scores.dtype).min).triu(1)
    return F.softmax(scores + causal, dim=-1, dtype=torch.float32)


def _clip_last_block_weights(model, pixel_values) -> torch.Tensor:
    """[1, H, N, N]: the eager attention weights of the vision tower's last block (what ``output_attentions``
    returns there), from its q/k."""
    seen = {}
    tower = model.model.vision_tower
    block = getattr(tower, "vision_model", tower).encoder.layers[-1]
    def hook(module, args, kwargs):
        seen.setdefault("x", (args[0] if args else kwargs["hidden_states"]).detach())

    handle = block.self_attn.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model.model.vision_tower(pixel_values, output_hidden_states=True)
    finally:
        handle.remove()
    x, attn = seen["x"], block.self_attn
    rows, tokens, _ = x.shape
    q = attn.q_proj(x).view(rows, tokens, attn.num_heads, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(rows, tokens, attn.num_heads, attn.head_dim).transpose(1, 2)
    return F.softmax((q @ k.transpose(-1, -2)) * attn.scale, dim=-1, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------------
# Pure rule on identical attention
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(20))
def test_dual_attention_rule_matches_the_official_filter(seed):
    gen = torch.Generator().manual_seed(seed)
    heads, start, img, text = 4, 3, 30, 7
    total = start + img + text
    logits = torch.randn(1, heads, total, total, generator=gen) * 2
    logits = logits + torch.full((total, total), -1e9).triu(1)
    attn = logits.softmax(-1)
    keys = torch.randperm(img, generator=gen)[:3]
    share = 1.0 / img
    global_thr, individual_thr = share * float(torch.rand((), generator=gen) * 1.5), float(torch.rand((), generator=gen)) * 0.1
    official, _ = official_dual_attention_filter(attn, start, img, global_thr, individual_thr)
    official = torch.unique(torch.cat((official, keys)))
    rows = attn[0, :, start + img:, start:start + img].mean(0)  # [T, V], head mean, as attention_rows averages
    keep = dual_attention_keep(rows, global_thr, individual_thr)
    keep[keys] = True
    assert torch.equal(torch.nonzero(keep).flatten(), official)


def test_key_set_matches_the_official_topk():
    gen = torch.Generator().manual_seed(3)
    attn = torch.randn(1, 4, 65, 65, generator=gen).softmax(-1)
    official = torch.sort(official_key_set(attn)[0]).values
    scores = attn[0, :, 0, 1:].mean(0)
    assert key_set_count(64, 0.08) == official.numel() == 6
    assert key_set_count(576, 0.08) == 47
    assert torch.equal(topk_select(scores, 6), official)


# ---------------------------------------------------------------------------------------------------------
# The whole prefill on a real model: vtprune's stages against the official loop
# ---------------------------------------------------------------------------------------------------------
PROMPTS = ["describe the image please", "what color is the large square in the middle of this picture?"]


def _models():
    out = [("tiny", *tiny_vlm("llava"))]
    if (MICRO_LLAVA / "config.json").is_file():
        from transformers import AutoModelForImageTextToText

        from vtprune.loading import load_processor

        model = AutoModelForImageTextToText.from_pretrained(MICRO_LLAVA, attn_implementation="sdpa").eval()
        out.append(("micro", model, load_processor(MICRO_LLAVA)))
    return out


@pytest.fixture(scope="module")
def models():
    return _models()


@pytest.mark.parametrize("case", range(2))
@pytest.mark.parametrize("which", [0, 1])
def test_prefill_matches_the_official_loop(models, which, case):
    if which >= len(models):
        pytest.skip("models/micro-llava is not in this checkout")
    _, model, processor = models[which]
    inputs = dict(tiny_inputs(processor, [tiny_image(case, (64, 48))], [PROMPTS[case]]))
    lm = model.model.language_model
    with torch.no_grad():
        with capture_lm_calls(model) as calls:
            model(**inputs)
        embeds = calls[0]["inputs_embeds"]
        where = torch.nonzero(inputs["input_ids"][0] == model.config.image_token_id).flatten()
        start, img = int(where[0]), where.numel()
        official_keys = official_key_set(_clip_last_block_weights(model, inputs["pixel_values"]))[0]
        # thresholds around the uniform share, so that the filters drop some tokens and keep others
        global_thr, individual_thr = 1.0 / img, 4.0 / img
        num_layers = len(lm.layers)
        method = MustDropLLM(global_thr=global_thr, individual_thr=individual_thr)
        layers = method.filter_layers(num_layers)
        official = official_prefill(lm.layers, lm.rotary_emb, embeds, start, img, official_keys, layers,
                                    global_thr, individual_thr)
        with vtprune.pruned(model, "mustdrop_llm", global_thr=global_thr, individual_thr=individual_thr):
            model(**inputs)
            stages = vtprune.stats(model).samples[0].stages
    assert any(kept.numel() < img for kept in official)  # the case exercises the filter
    ours = {stage.layer: stage.kept_positions - start for stage in stages}
    previous = torch.arange(img)
    for layer, kept in zip(layers, official, strict=True):
        if kept.numel() == previous.numel():  # nothing dropped: the adaptive stage records nothing
            assert layer + 1 not in ours
        else:
            assert torch.equal(ours[layer + 1], kept), (layer, ours.get(layer + 1), kept)
        previous = kept
    assert torch.isin(official_keys, official[-1]).all()  # the key set survives every filter


# ---------------------------------------------------------------------------------------------------------
# Switch, budget mode, options
# ---------------------------------------------------------------------------------------------------------
def test_prefill_switch_and_solo():
    model, processor = tiny_vlm("llava")
    inputs = dict(tiny_inputs(processor, [tiny_image(0)], [PROMPTS[1]]))
    strict = {"global_thr": 0.05, "individual_thr": 0.2}  # drops most of the 48 tokens after stage 1
    with torch.no_grad():
        with vtprune.pruned(model, "mustdrop", 0.75, **strict):
            both = model(**inputs).logits
            names = [s.name for s in vtprune.stats(model).samples[0].stages]
            eq_both = vtprune.stats(model).samples[0].equivalent_tokens
        with vtprune.pruned(model, "mustdrop", 0.75, prefill=False, **strict):
            alone = model(**inputs).logits
            assert [s.name for s in vtprune.stats(model).samples[0].stages] == ["mustdrop"]
            eq_alone = vtprune.stats(model).samples[0].equivalent_tokens
    assert names[0] == "mustdrop" and "mustdrop_llm" in names
    assert eq_both < eq_alone == 48
    assert not torch.equal(both, alone)
    assert MustDropLLM.options["global_thr"] == 0.001 and MustDropLLM.options["individual_thr"] == 0.001
    assert vtprune.methods()["mustdrop"].defaults["prefill"] is True


def test_budget_mode_meets_the_layer_average():
    model, processor = tiny_vlm("llava", text_config={"num_hidden_layers": 8})
    inputs = dict(tiny_inputs(processor, [tiny_image(1)], [PROMPTS[0]]))
    with torch.no_grad(), vtprune.pruned(model, "mustdrop_llm", 0.5):
        model(**inputs)
        sample = vtprune.stats(model).samples[0]
    # filters after layers 0 and 2 (2, 6, 10, 14 of 32 scaled to 8: 0, 1, 2, 3): pruning before 1, 2, 3, 4
    assert [s.layer for s in sample.stages] == [1, 2, 3, 4]
    assert abs(sample.equivalent_tokens - 32) <= 2
    counts = [s.visual_out for s in sample.stages]
    assert counts == sorted(counts, reverse=True) and counts[-1] >= key_set_count(64, 0.08)


def test_options_are_checked():
    model, _ = tiny_vlm("llava")
    for bad in ({"layers": [3, 1]}, {"global_thr": 2}, {"key_ratio": -0.1}, {"cut_cache": 1}, {"layers": [3]}):
        with pytest.raises(MethodOptionError):
            vtprune.apply(model, "mustdrop_llm", **bad)  # [3]: a 4-layer decoder has no layer after it
        assert not vtprune.is_pruned(model)
    with pytest.raises(MethodOptionError):
        vtprune.apply(model, "mustdrop", 0.75, prefill="yes")
    assert MustDropLLM().filter_layers(32) == [2, 6, 10, 14]
    assert MustDropLLM().filter_layers(4) == [0, 1]
    assert MustDropLLM().filter_layers(40) == [2, 7, 12, 17]


# ---------------------------------------------------------------------------------------------------------
# Decoding stage: the KV cache of the filtering layers cut to the survivors
# ---------------------------------------------------------------------------------------------------------
def _prefill_cache(model, inputs, **options):
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config.text_config)
    with torch.no_grad(), vtprune.pruned(model, "mustdrop_llm", 0.5, **options):
        out = model(**inputs, use_cache=True, past_key_values=cache)
        sample_stats = vtprune.stats(model).samples
    return cache, out.logits, sample_stats


def test_cut_cache_keeps_the_survivors_entries():
    model, processor = tiny_vlm("llava", text_config={"num_hidden_layers": 8})
    images = [tiny_image(0), None, tiny_image(1, (48, 64))]
    inputs = dict(tiny_inputs(processor, images, ["describe the image please", "hi", "what color"],
                              padding_side="left"))
    full, logits_full, _ = _prefill_cache(model, inputs, cut_cache=False)
    cut, logits_cut, stats = _prefill_cache(model, inputs, cut_cache=True)
    assert torch.equal(logits_full, logits_cut)  # the prefill is untouched
    lengths = [layer.keys.shape[-2] for layer in full.layers]
    assert lengths[0] > lengths[1] > lengths[2] > lengths[3] > lengths[4] == lengths[7]  # filters 0-3: drops at 1-4
    # layers 0..3 (the filtering layers, from the first) now hold what layer 4 holds; layers 4.. are unchanged
    for index, (a, b) in enumerate(zip(full.layers, cut.layers, strict=True)):
        if index >= 4:
            assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
            continue
        assert b.keys.shape[-2] == lengths[4]
        # the entries of the survivors, gathered from the layer's own (uncut) cache: compare per sample through the
        # keys' values (each real cached entry of the cut layer is one of the uncut layer's entries)
        for row in range(b.keys.shape[0]):
            real = inputs["attention_mask"][row].bool()
            final_real = int(real.sum()) - (stats[row].visual_in - stats[row].stages[-1].visual_out
                                            if stats[row].stages else 0)
            got = b.keys[row, :, -final_real:]  # left padding: the real entries are the last ones
            flat = a.keys[row].transpose(0, 1).reshape(a.keys.shape[-2], -1)
            matches = (got.transpose(0, 1).reshape(final_real, -1)[:, None] == flat[None]).all(-1)
            assert bool(matches.any(-1).all())
            where = matches.float().argmax(-1)
            assert bool((where[1:] > where[:-1]).all())  # in order


def test_cut_cache_generation_matches_each_sample_alone():
    model, processor = tiny_vlm("llava", text_config={"num_hidden_layers": 8})
    images = [tiny_image(0), tiny_image(1, (48, 64))]
    prompts = ["describe the image please", "what color"]
    batch = dict(tiny_inputs(processor, images, prompts, padding_side="left"))
    with torch.no_grad(), vtprune.pruned(model, "mustdrop_llm", 0.5):
        together = model.generate(**batch, max_new_tokens=6, do_sample=False)[:, -6:]
        for row in range(2):
            alone = dict(tiny_inputs(processor, [images[row]], [prompts[row]]))
            single = model.generate(**alone, max_new_tokens=6, do_sample=False)[:, -6:]
            assert together[row].tolist() == single[0].tolist()
        uncut = None
    with torch.no_grad(), vtprune.pruned(model, "mustdrop_llm", 0.5, cut_cache=False):
        uncut = model.generate(**batch, max_new_tokens=6, do_sample=False, output_logits=True,
                               return_dict_in_generate=True)
    with torch.no_grad(), vtprune.pruned(model, "mustdrop_llm", 0.5):
        cut = model.generate(**batch, max_new_tokens=6, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    assert torch.equal(uncut.logits[0], cut.logits[0])  # the prefill's logits
    assert not torch.allclose(uncut.logits[1], cut.logits[1])  # decode steps see the cut layers


def test_static_cache_decodes_uncut_with_a_warning():
    model, processor = tiny_vlm("llava")
    inputs = dict(tiny_inputs(processor, [tiny_image(0)], [PROMPTS[0]]))
    strict = {"global_thr": 0.05, "individual_thr": 0.2}
    with torch.no_grad():
        with vtprune.pruned(model, "mustdrop", 0.75, cut_cache=False, **strict):
            uncut = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        with vtprune.pruned(model, "mustdrop", 0.75, **strict):
            with pytest.warns(vtprune.DegeneratePruningWarning, match="cut does not run"):
                static = model.generate(**inputs, max_new_tokens=4, do_sample=False, cache_implementation="static")
    assert static.tolist() == uncut.tolist()
