"""TransPrune (token transition + instruction-guided attention): the pure core on known answers, the schedule,
option errors, and fidelity to a literal transcription of the official scoring (liaolea/TransPrune @ c9e8284,
``llava/model/modeling_llama_transprune.py``) on the tensors the pruned tiny LLaVA actually computed.
The registry-driven invariants (keep-all, batch = one-by-one, reference equivalence, KV cache, generate) run
for transprune in tests/test_invariants.py, tests/test_in_llm.py and tests/test_video.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

import vtprune
from vtprune.budget import BudgetError
from vtprune.errors import MethodOptionError
from vtprune.selectors.transprune import transition_weight, transprune_scores, transprune_select
from vtprune.testing import tiny_image, tiny_inputs

TransPrune = vtprune.registry.method_class("transprune")


# ---------------------------------------------------------------------------------------------------------
# pure core
# ---------------------------------------------------------------------------------------------------------
def test_transition_weight_known_answer():
    before = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 3.0]]])  # [1, 3, 2]
    after = torch.tensor([[[0.0, 2.0], [1.0, 0.0], [0.0, 1.5]]])
    w = transition_weight(before, after)
    # token 0: norm ratio 2, direction change 1 − cos = 1; token 1: unchanged; token 2: ratio 0.5, no turn
    z = math.e + 2.0
    expected = torch.tensor([[2.0 * math.e / z, 1.0 / z, 0.5 / z]])
    assert torch.allclose(w, expected, atol=1e-6)
    assert w.argmax().item() == 0  # the token whose representation changes most ranks first


def test_transition_weight_ignores_padding():
    torch.manual_seed(0)
    before, after = torch.randn(1, 5, 8), torch.randn(1, 5, 8)
    real = torch.tensor([[False, False, True, True, True]])
    padded = transition_weight(before, after, real)
    alone = transition_weight(before[:, 2:], after[:, 2:])
    assert torch.equal(padded[:, :2], torch.zeros(1, 2))
    assert torch.allclose(padded[:, 2:], alone, atol=1e-7)


def test_select_ranks_by_transition_plus_attention():
    transition = torch.tensor([0.1, 0.9, 0.3, 0.2, 0.05])
    attention = torch.full((5,), 0.2)  # uniform attention: the transition decides
    assert transprune_select(transition, attention, 2).tolist() == [1, 2]
    attention = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0])  # normalised attention mass 1 outweighs TTV's 0.9/1.55
    assert transprune_select(transition, attention, 1).tolist() == [4]
    scores = transprune_scores(transition, attention)
    assert torch.allclose(scores.sum(), torch.tensor(2.0), atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# schedule and options
# ---------------------------------------------------------------------------------------------------------
def test_official_schedule_on_32_layers():
    method = TransPrune()
    assert method.schedule(32, 576, 1) == [(7, 504), (9, 360), (12, 72)]
    assert method.observed_layers(32) == [6, 7, 8, 9, 10, 11]  # official 1-indexed accumulating layers 7..12
    assert method.positions == "compact"


def test_budget_bends_the_official_ratios():
    for budget in (150, 236, 0.3):  # the official list is 236.25 equivalent tokens
        schedule = TransPrune(budget=budget).schedule(32, 576, 1)
        bounds = [0] + [layer for layer, _ in schedule] + [32]
        kept = [576] + [k for _, k in schedule]
        equivalent = sum((bounds[i + 1] - bounds[i]) * kept[i] for i in range(len(kept))) / 32
        target = budget if isinstance(budget, int) else budget * 576
        assert target - 3 <= equivalent <= target + 1e-6  # int() truncation of each stage
        assert [layer for layer, _ in schedule] == [7, 9, 12]
    with pytest.raises(BudgetError, match="smallest reachable budget"):
        TransPrune(budget=125).schedule(32, 576, 1)  # 7 full layers: 126
    assert TransPrune(budget=64, ratios=[0.5, 0.25, 0.125]).schedule(32, 576, 1) == [(7, 288), (9, 144), (12, 72)]


def test_scaled_layers_and_clear_errors():
    assert TransPrune().schedule(4, 100, 1) == [(1, 62), (2, 12)]  # [7, 9, 12]·4/32 → 1, 1, 2 (merged)
    assert TransPrune().observed_layers(4) == [0, 1]
    with pytest.raises(MethodOptionError, match="beyond this model's 4 decoder layers"):
        TransPrune(layers=[7, 9, 12]).check_model(4)
    with pytest.raises(MethodOptionError, match="one ratio per pruning layer"):
        TransPrune(layers=[1, 2], ratios=[0.5])
    with pytest.raises(MethodOptionError, match="non-increasing"):
        TransPrune(ratios=[0.5, 0.6, 0.1])
    with pytest.raises(MethodOptionError, match="before the last pruning layer"):
        TransPrune(layers=[1, 2], ratios=[0.5, 0.25], accumulate=[0, 3]).check_model(4)


def test_hooks_only_while_applied(tiny_models):
    model, _ = tiny_models["llava"]
    layers = model.model.language_model.layers
    counts = lambda: sum(len(x.self_attn._forward_hooks) + len(x.mlp._forward_hooks) for x in layers)  # noqa: E731
    before = counts()
    with vtprune.pruned(model, "transprune"):
        assert counts() == before + 4  # layers 0 and 1, attention and MLP
    assert counts() == before
    with vtprune.pruned(model, "fastv"):
        assert counts() == before  # only methods that observe sublayers get the hooks


# ---------------------------------------------------------------------------------------------------------
# fidelity: literal transcription of the official scoring
# ---------------------------------------------------------------------------------------------------------
def official_compute_transf_weight(before_hidden_states, after_hidden_states):
    """``LlamaDecoderLayer.compute_transf_weight`` (L914-927), as written."""
    before_norm = torch.norm(before_hidden_states, dim=-1)
    after_norm = torch.norm(after_hidden_states, dim=-1)
    length_ratio = after_norm / before_norm
    cosine_similarities = 1 - F.cosine_similarity(before_hidden_states, after_hidden_states, dim=-1)
    exp_cosine = torch.exp(cosine_similarities)
    necc = exp_cosine / exp_cosine.sum()
    return length_ratio * necc


def official_rank_drop(next_layer: nn.Module, rotary: nn.Module, features: torch.Tensor, image_index: int,
                       image_tokens: int, keep_length: int, transf_weight_list: list[torch.Tensor]):
    """``transprune_rank_drop`` (L1425-1514) for one unpadded sample (batch 1, right padding): q/k of the NEXT
    layer on its input norm, RoPE at positions 0..L−1, causal eager softmax of the text queries after the image,
    head mean, text mean, restricted to the image; TTV summed over the list; both normalised and added; topk,
    sorted. Returns the kept columns and the re-gathered weight list. (LLaVA-1.5 has no GQA; the tiny model's
    keys are repeated to every head, as its transformers attention does.)"""
    attn = next_layer.self_attn
    hidden_states = next_layer.input_layernorm(features)
    bsz, q_len, _ = hidden_states.size()
    head_dim = attn.head_dim
    query_states = attn.q_proj(hidden_states).view(bsz, q_len, -1, head_dim).transpose(1, 2)
    key_states = attn.k_proj(hidden_states).view(bsz, q_len, -1, head_dim).transpose(1, 2)
    position_ids = torch.arange(0, q_len).unsqueeze(0)
    cos, sin = rotary(hidden_states, position_ids=position_ids)
    query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)
    key_states = repeat_kv(key_states, query_states.shape[1] // key_states.shape[1])
    eager_attention_mask = torch.triu(torch.full((q_len, q_len), torch.finfo(torch.float32).min), diagonal=1)
    cur_key_states, cur_query_states = key_states[0], query_states[0]
    prompt_ids = image_index + image_tokens
    prompt_total_len = q_len  # prompt_len (text) + image tokens: the whole prefill
    text_query_states = cur_query_states[:, prompt_ids:prompt_total_len, :]
    text_eager_attention_mask = eager_attention_mask[None, prompt_ids:prompt_total_len, :]
    attn_weights = torch.matmul(text_query_states, cur_key_states.transpose(1, 2)) / math.sqrt(head_dim)
    attn_weights = attn_weights + text_eager_attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query_states.dtype)
    attention_avg_head = torch.mean(attn_weights, dim=0)
    attention_avg_head = attention_avg_head[:, image_index:image_index + image_tokens]
    attention_avg_text = torch.mean(attention_avg_head, dim=0)
    accmulate_transf_weight = torch.zeros(image_tokens)
    for weight in transf_weight_list:
        accmulate_transf_weight += weight[0][image_index:image_index + image_tokens]
    accmulate_transf_weight = accmulate_transf_weight / (accmulate_transf_weight.sum() + 1e-8)
    attention_avg_text = attention_avg_text / (attention_avg_text.sum() + 1e-8)
    score = accmulate_transf_weight + attention_avg_text
    top_rank_index = score.topk(keep_length).indices
    top_rank_index = top_rank_index + image_index
    top_rank_index = top_rank_index.sort().values
    start_index = image_index + image_tokens
    change_weight_list = []
    for weight in transf_weight_list:
        change_weight_list.append(torch.cat([weight[0, :image_index], weight[0, top_rank_index],
                                             weight[0, start_index:]], dim=0).unsqueeze(0))
    return top_rank_index, change_weight_list


class _SublayerCapture:
    """(input, output) of every attention / MLP call of the decoder layers, in call order, during one prefill."""

    def __init__(self, layers: nn.ModuleList):
        self.calls: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        self.outputs: dict[int, torch.Tensor] = {}
        self.handles = []
        for i, layer in enumerate(layers):
            self.handles.append(layer.register_forward_hook(self._layer(i)))
            for module in (layer.self_attn, layer.mlp):
                self.handles.append(module.register_forward_hook(self._sub(i), with_kwargs=True))

    def _layer(self, i):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            self.outputs.setdefault(i, hidden.detach().clone())
        return hook

    def _sub(self, i):
        def hook(module, args, kwargs, output):
            before = args[0] if args else kwargs["hidden_states"]
            after = output[0] if isinstance(output, tuple) else output
            self.calls.append((i, before.detach().clone(), after.detach().clone()))
        return hook

    def close(self):
        for handle in self.handles:
            handle.remove()


FIDELITY_CASES = [
    ("describe the image please", (48, 64), 0, {}),                       # defaults on 4 layers: 1, 2
    ("what color is the large object", (64, 48), 1, {"layers": [1, 2, 3], "ratios": [0.875, 0.625, 0.125],
                                                     "accumulate": [0, 1, 2]}),   # the official schedule shape
    ("count the shapes", (56, 56), 2, {"layers": [2], "ratios": [0.5], "accumulate": [0, 1]}),
    ("hi", (40, 40), 3, {"budget": 0.6}),
]


@pytest.mark.parametrize("prompt, size, seed, options", FIDELITY_CASES)
def test_matches_the_official_scoring(tiny_models, prompt, size, seed, options):
    model, processor = tiny_models["llava"]
    inputs = tiny_inputs(processor, [tiny_image(seed, size)], [prompt])
    lm = model.model.language_model
    method = TransPrune(**options)
    num_layers = len(lm.layers)
    observed = set(method.observed_layers(num_layers))
    with torch.no_grad(), vtprune.pruned(model, "transprune", **options):
        capture = _SublayerCapture(lm.layers)
        try:
            model(**inputs)
        finally:
            capture.close()
        sample = vtprune.stats(model).samples[0]
    where = torch.nonzero(inputs["input_ids"][0] == model.config.image_token_id).flatten()
    image_index, count = int(where[0]), where.numel()
    schedule = method.schedule(num_layers, count, 1)
    assert [(s.layer, len(s.kept_positions)) for s in sample.stages] == schedule
    # official: the weights of the accumulating layers, attention + FFN, appended after each layer runs
    per_layer: dict[int, torch.Tensor] = {}
    for i, before, after in capture.calls:
        if i in observed:
            w = official_compute_transf_weight(before, after)
            per_layer[i] = per_layer[i] + w if i in per_layer else w
    positions = list(range(inputs["input_ids"].shape[1]))  # original position of each current column
    transf_weight_list: list[torch.Tensor] = []
    image_tokens = count
    done = set()
    with torch.no_grad():
        for stage, (layer, keep_length) in zip(sample.stages, schedule, strict=True):
            for i in sorted(observed):
                if i < layer and i not in done:  # layers run before this drop, on the sequence of their time
                    transf_weight_list.append(per_layer[i])
                    done.add(i)
            features = capture.outputs[layer - 1]  # the sequence the stage drops from (compact positions)
            assert features.shape[1] == len(positions)
            kept, transf_weight_list = official_rank_drop(lm.layers[layer], lm.rotary_emb, features, image_index,
                                                          image_tokens, keep_length, transf_weight_list)
            assert stage.kept_positions.tolist() == [positions[c] for c in kept.tolist()]
            positions = positions[:image_index] + [positions[c] for c in kept.tolist()] \
                + positions[image_index + image_tokens:]
            image_tokens = keep_length

