"""Fidelity of the in-LLM methods (FastV, PyramidDrop, DART): on identical fp32 tensors, vtprune keeps what the
official code keeps, at the official defaults.

Each ``official_*`` function below is this project's own transcription of an official selection routine,
written from reading the official repository at the commit cited (files and lines in the comments). They
are deliberately naive — the official tensor layout, Python sets and loops — and share nothing with
vtprune's selectors. Two kinds of checks:

* random cases: random decoder layers / hidden states / layouts, fed both to vtprune's method (its
  ``select`` on a hand-built ``LayerContext``) and to the transcription (≥ 20 cases per method);
* real signals: ``tiny_vlm("llava")`` and the bundled micro-llava, pruned by ``vtprune.pruned``; the hidden states the pruned model
  actually computed are captured with hooks and fed to the transcription, whose kept positions must equal
  ``vtprune.stats(model).samples[0].stages[j].kept_positions``.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    repeat_kv,
)

import vtprune
from vtprune.catalog.in_llm import LayerContext
from vtprune.loading import load_processor
from vtprune.synth import load_test_split
from vtprune.testing import tiny_image, tiny_inputs, tiny_vlm

RANDOM_CASES = 24


# ---------------------------------------------------------------------------------------------------------
# What the official (LLaMA, eager attention) code computes inside a decoder layer
# ---------------------------------------------------------------------------------------------------------
def _rotated_qk(layer: nn.Module, hidden: torch.Tensor, rotary: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k [H, L, dh] of ``layer`` for ``hidden`` [1, L, D] at positions 0..L−1, after RoPE, k repeated to
    every query head (``repeat_kv``) — as LlamaAttention computes them for one sample."""
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    length = x.shape[1]
    q = attn.q_proj(x).view(1, length, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(1, length, -1, attn.head_dim).transpose(1, 2)
    cos, sin = rotary(x, position_ids=torch.arange(length).unsqueeze(0))
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k = repeat_kv(k, q.shape[1] // k.shape[1])
    return q[0], k[0]


def _eager_attention(layer: nn.Module, hidden: torch.Tensor, rotary: nn.Module) -> torch.Tensor:
    """The attention weights [H, L, L] eager attention returns for one sample (``output_attentions``)."""
    q, k = _rotated_qk(layer, hidden, rotary)
    length = q.shape[1]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    causal = torch.full((length, length), torch.finfo(scores.dtype).min).triu(1)
    return F.softmax(scores + causal, dim=-1, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------------
# Transcriptions of the official selection routines
# ---------------------------------------------------------------------------------------------------------
def official_fastv(attention: torch.Tensor, start: int, length: int, ratio: float) -> list[int]:
    """pkunlp-icler/FastV @ d1659729b5bf1be225e99ee15783deeea80f63b1,
    src/FastV/llava-hf/transformers/src/transformers/models/llama/modeling_llama.py, ``fastv_forward``
    L1072-1101 (``layer_idx == FASTV_k``), with layer K−1's attention requested at L1105-1108:
    mean over heads of layer K−1's attention, the last row, its image slice, ``topk(round(len·(1−r)))``,
    then ``keep_indexs`` sorted. ``attention`` [H, L, L] of layer K−1. Returns the kept image positions."""
    mean_over_heads = attention.mean(dim=0)
    last_row = mean_over_heads[-1]
    image_part = last_row[start:start + length]
    top = image_part.topk(round(length * (1 - ratio))).indices + start
    return sorted(top.tolist())


def official_pdrop_stage(layer: nn.Module, features: torch.Tensor, rotary: nn.Module, start: int,
                         image_tokens: int, keep_length: int) -> list[int]:
    """Cooperx521/PyramidDrop @ 6444f304aee4b7edcb022839fb9e8cd07859704a, llava/model/modeling_llama_pdrop.py,
    ``pdrop_rank_drop`` L1291-1406 (inference branch): the input norm, q/k projections and RoPE of the layer
    the drop happens before (``self.layers[rank_layer]``, L1325-1344) on the current, compactly re-indexed
    sequence (``position_ids`` = arange, L1446 of the previous stage), the query of the last prompt token
    (``prompt_total_len − 1``, L1390-1392), ``softmax(q·kᵀ/√d + causal mask)`` in fp32, mean over heads, the
    image slice, mean over the single query, ``topk(keep_length)`` + image start, sorted (L1395-1407).
    ``features`` [1, L, D] = output of layer ``rank_layer − 1``. Returns the kept positions (in the current
    sequence). The official multiplies ``num_heads`` queries with ``num_key_value_heads`` keys (equal in
    LLaMA-1.5); for GQA layers the keys are repeated per head here, as the model's attention does."""
    q, k = _rotated_qk(layer, features, rotary)
    length = features.shape[1]
    query = q[:, length - 1:length, :]  # (heads, 1, dh)
    mask = torch.zeros(1, length)  # the causal row of the last token hides nothing
    weights = torch.matmul(query, k.transpose(1, 2)) / math.sqrt(q.shape[-1]) + mask
    weights = F.softmax(weights, dim=-1, dtype=torch.float32)
    per_head_mean = torch.mean(weights, dim=0)[:, start:start + image_tokens]
    per_text_mean = torch.mean(per_head_mean, dim=0)
    top = per_text_mean.topk(keep_length).indices + start
    return top.sort().values.tolist()


def official_pdrop_counts(num_visual: int, ratios: list[float]) -> list[int]:
    """PyramidDrop @ 6444f304, modeling_llama_pdrop.py L1306-1307 (``int(N · ratio)``) with the ratio list
    of llava/eval/model_vqa_loader.py L94-96 (``[1.0] + image_token_ratio_list``)."""
    return [int(num_visual * r) for r in ratios]


def official_dart(last_layer_state: torch.Tensor, key_states: torch.Tensor, start: int, length: int,
                  token_topk: int, pivot_image_token: int = 4, pivot_text_token: int = 4) -> list[int]:
    """ZichenWen1/DART @ 5a19452fc173017191c247848673e0bde755695a (read from the fork xqy1111111/DART, whose
    history holds it unchanged), llava/model/language_model/modeling_llama_self.py,
    ``get_retained_image_token`` L397-449: the keys of layer K−1 (``any_states``: after RoPE and
    ``repeat_kv``, heads concatenated) rank image tokens and the tokens after the image by L1 norm; the
    top ones become pivots, collected in a Python ``set`` of their positions that is iterated as such; each
    pivot takes the ``TOKEN_TOPK`` remaining image tokens with the lowest cosine similarity of the normed
    layer-(K−1) output; the text pivots are removed at the end.
    ``last_layer_state`` [L, D] = norm(output of layer K−1); ``key_states`` [H, L, dh]."""
    per_token = key_states.permute(1, 0, 2).reshape(key_states.shape[1], -1)
    image_keys = per_token[start:start + length, :]
    query_keys = per_token[start + length:, :]
    image_norm = torch.norm(image_keys, p=1, dim=-1)
    query_norm = torch.norm(query_keys, p=1, dim=-1)
    image_pivots = (image_norm.topk(pivot_image_token).indices + start).tolist()
    text_pivots = (query_norm.topk(pivot_text_token).indices + start + length).tolist()
    selected = set(image_pivots + text_pivots)
    candidates = set(range(start, start + length)) - set(image_pivots)
    candidate_list = list(candidates)
    for pivot in list(selected):
        vectors = last_layer_state[candidate_list, :]
        negative_similarity = -F.cosine_similarity(last_layer_state[pivot, :], vectors, dim=-1)
        picked = [candidate_list[i] for i in negative_similarity.topk(token_topk).indices]
        selected.update(picked)
        candidates.difference_update(picked)
        candidate_list = list(candidates)
    selected.difference_update(text_pivots)
    return sorted(selected)


def official_dart_token_topk(length: int, reduction_ratio: float, max_num_trunction: int | None,
                             pivots: int = 8) -> int:
    """DART @ 5a19452f, modeling_llama_self.py L409: ``ceil((max_num_trunction or N·(1−r)) // pivots)``."""
    budget = max_num_trunction if max_num_trunction is not None else length * (1 - reduction_ratio)
    return math.ceil(budget // pivots)


# ---------------------------------------------------------------------------------------------------------
# Random cases: the same fp32 tensors through vtprune's selection and the transcription
# ---------------------------------------------------------------------------------------------------------
def _random_decoder(seed: int, kv_heads: int):
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=kv_heads,
                         head_dim=16, num_hidden_layers=3, vocab_size=32)
    config._attn_implementation = "sdpa"
    layers = nn.ModuleList([LlamaDecoderLayer(config, layer_idx=i) for i in range(3)]).eval()
    for layer in layers:
        for module in (layer.self_attn.q_proj, layer.self_attn.k_proj):
            nn.init.normal_(module.weight, std=0.3)
        nn.init.uniform_(layer.input_layernorm.weight, 0.5, 1.5)
    norm = LlamaRMSNorm(64).eval()
    nn.init.uniform_(norm.weight, 0.5, 1.5)
    return layers, norm, LlamaRotaryEmbedding(config)


def _random_layout(rng: random.Random):
    prefix, num_visual, suffix = rng.randint(2, 40), rng.randint(24, 140), rng.randint(6, 30)
    return prefix, num_visual, suffix, prefix + num_visual + suffix


def _context(layers, norm, rotary, layer: int, previous: torch.Tensor, hidden: torch.Tensor,
             prefix: int, num_visual: int) -> LayerContext:
    length = hidden.shape[1]
    positions = torch.arange(length).unsqueeze(0)
    pe = rotary(hidden, position_ids=positions)
    visual = torch.zeros(1, length, dtype=torch.bool)
    visual[0, prefix:prefix + num_visual] = True
    return LayerContext(
        layer=layer, layers=layers, hidden=hidden, position_embeddings=pe, previous_hidden=previous,
        previous_position_embeddings=pe, real=torch.ones(1, length, dtype=torch.bool), visual=visual,
        last=torch.tensor([[length - 1]]), text=~visual, source=[torch.arange(length)], norm=norm,
        previous_position_ids=positions, rotary=rotary,
    )


def _random_states(seed: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    scale = 0.5 + 3 * torch.rand(1, generator=g).item()
    previous = torch.randn(1, length, 64, generator=g) * scale
    hidden = previous + torch.randn(1, length, 64, generator=g) * scale
    return previous, hidden


def _kept(method, ctx: LayerContext, wanted: int) -> list[int]:
    [selection] = method.select(ctx, [wanted])
    return selection.keep.tolist()


@pytest.mark.parametrize("case", range(RANDOM_CASES))
def test_fastv_random_cases_match_the_official_selection(case):
    rng = random.Random(1000 + case)
    layers, norm, rotary = _random_decoder(case, kv_heads=rng.choice([2, 4]))
    prefix, num_visual, _, length = _random_layout(rng)
    previous, hidden = _random_states(case, length)
    k = rng.choice([1, 2])
    ratio = rng.choice([0.25, 0.5, 0.75, 0.875, round(rng.uniform(0.1, 0.9), 3)])
    method = vtprune.registry.method_class("fastv")(layer=k, ratio=ratio)
    [(layer, wanted)] = method.plan_schedule(3, num_visual, 1)
    assert (layer, wanted) == (k, round(num_visual * (1 - ratio)))
    with torch.no_grad():
        ours = _kept(method, _context(layers, norm, rotary, k, previous, hidden, prefix, num_visual), wanted)
        official = official_fastv(_eager_attention(layers[k - 1], previous, rotary), prefix, num_visual, ratio)
    assert ours == official


@pytest.mark.parametrize("case", range(RANDOM_CASES))
def test_pdrop_random_cases_match_the_official_selection(case):
    rng = random.Random(2000 + case)
    layers, norm, rotary = _random_decoder(case, kv_heads=rng.choice([2, 4]))
    prefix, num_visual, suffix, _ = _random_layout(rng)
    lam = rng.choice([0.5, 0.5, 0.6, 0.7, 0.4])
    stage = rng.randint(0, 2)  # the sequence already holds int(N·λ^stage) visual tokens
    method = vtprune.registry.method_class("pdrop")(lambda_=lam, layers=[1, 2, 3][: stage + 1])
    schedule = method.plan_schedule(4, num_visual, 1)
    ratios = [1.0] + [float(f"{lam ** (i + 1):.10g}") for i in range(3)]  # as the scripts write them
    counts = official_pdrop_counts(num_visual, ratios)
    assert [keep for _, keep in schedule] == counts[1:stage + 2]
    current, keep = counts[stage], counts[stage + 1]
    length = prefix + current + suffix
    _, hidden = _random_states(case, length)
    with torch.no_grad():
        ctx = _context(layers, norm, rotary, 1, None, hidden, prefix, current)
        ours = _kept(method, ctx, keep)
        official = official_pdrop_stage(layers[1], hidden, rotary, prefix, current, keep)
    assert ours == official


@pytest.mark.parametrize("case", range(RANDOM_CASES))
def test_dart_random_cases_match_the_official_selection(case):
    rng = random.Random(3000 + case)
    layers, norm, rotary = _random_decoder(case, kv_heads=rng.choice([2, 4]))
    prefix, num_visual, _, length = _random_layout(rng)
    previous, hidden = _random_states(case, length)
    k = rng.choice([1, 2])
    if case % 3 == 0:  # the official run: max_num_trunction decides
        options, cap, ratio = {"max_num_trunction": rng.randint(8, num_visual - 8)}, None, 0.778
        cap = options["max_num_trunction"]
    else:
        ratio = round(rng.uniform(0.3, 0.9), 3)
        options, cap = {"ratio": ratio}, None
    token_topk = official_dart_token_topk(num_visual, ratio, cap)
    method = vtprune.registry.method_class("dart")(layer=k, **options)
    [(layer, wanted)] = method.plan_schedule(3, num_visual, 1)
    assert (layer, wanted) == (k, 4 + 8 * token_topk)
    with torch.no_grad():
        ours = _kept(method, _context(layers, norm, rotary, k, previous, hidden, prefix, num_visual), wanted)
        _, keys = _rotated_qk(layers[k - 1], previous, rotary)
        official = official_dart(norm(hidden)[0], keys, prefix, num_visual, token_topk)
    assert ours == official


def test_dart_default_count_is_the_official_run():
    """The README's ``0.778 128`` on LLaVA-1.5 (576 tokens): TOKEN_TOPK 16, 4 + 8·16 = 132 kept."""
    dart = vtprune.registry.method_class("dart")
    assert official_dart_token_topk(576, 0.778, 128) == 16
    assert dart().plan_schedule(32, 576, 1) == [(2, 4 + 8 * 16)]
    assert official_dart_token_topk(576, 0.778, None) == 15
    assert dart(ratio=0.778).plan_schedule(32, 576, 1) == [(2, 4 + 8 * 15)]


def test_dart_visits_pivots_in_the_official_set_order():
    """The order is not sorted: positions wrap modulo the set's table size (32 slots for 8 pivots)."""
    from vtprune.selectors.dart import set_iteration_order

    positions = [300, 41, 610, 77, 615, 640, 612, 700]
    order = set_iteration_order(positions)
    assert [positions[i] for i in order] == list(set(positions))
    assert [positions[i] for i in order] != sorted(positions)


# ---------------------------------------------------------------------------------------------------------
# Real signals: tiny LLaVA and micro-llava, pruned by vtprune, compared with the transcription on the captured states
# ---------------------------------------------------------------------------------------------------------
PROMPTS = [
    ("describe the image please", (48, 64), 0),
    ("what color is the square in the middle of this picture", (64, 48), 1),
    ("how many", (64, 64), 2),
    ("is there a red circle", (32, 80), 3),
    ("read the text in the top left corner of the image", (80, 32), 4),
    ("which shape is larger", (56, 56), 5),
]
MICRO_LLAVA = Path(__file__).resolve().parent.parent / "models" / "micro-llava"
CASES = range(len(PROMPTS))


@pytest.fixture(scope="module", params=["tiny-llava", "micro-llava"])
def llava(request):
    """(model, processor, [(image, prompt), ...]): the tiny random LLaVA (64 visual tokens) and the bundled
    trained micro-llava (256 visual tokens) on questions of its test split."""
    if request.param == "tiny-llava":
        model, processor = tiny_vlm("llava")
        return model, processor, [(tiny_image(seed, size), prompt) for prompt, size, seed in PROMPTS]
    if not (MICRO_LLAVA / "config.json").is_file():
        pytest.skip("models/micro-llava is not in this checkout")
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(MICRO_LLAVA, attn_implementation="sdpa").eval()
    processor = load_processor(MICRO_LLAVA)
    return model, processor, [(s.image, s.question) for s in load_test_split(limit=len(PROMPTS))]


def _sample(llava, case):
    model, processor, samples = llava
    image, prompt = samples[case]
    return model, dict(tiny_inputs(processor, [image], [prompt]))


class _Capture:
    """Inputs and outputs of the decoder layers during one forward (prefill only)."""

    def __init__(self, layers: nn.ModuleList):
        self.inputs: dict[int, torch.Tensor] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.handles = []
        for i, layer in enumerate(layers):
            self.handles.append(layer.register_forward_pre_hook(self._pre(i), with_kwargs=True))
            self.handles.append(layer.register_forward_hook(self._post(i)))

    def _pre(self, i):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            self.inputs.setdefault(i, hidden.detach().clone())
        return hook

    def _post(self, i):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            self.outputs.setdefault(i, hidden.detach().clone())
        return hook

    def close(self):
        for handle in self.handles:
            handle.remove()


def _run_pruned(model, inputs, method, **options):
    lm = model.model.language_model
    with torch.no_grad(), vtprune.pruned(model, method, **options):
        capture = _Capture(lm.layers)
        try:
            model(**inputs)
        finally:
            capture.close()
        stats = vtprune.stats(model)
    return capture, stats.samples[0], lm


def _image_span(model, inputs) -> tuple[int, int]:
    where = torch.nonzero(inputs["input_ids"][0] == model.config.image_token_id).flatten()
    assert torch.equal(where, torch.arange(int(where[0]), int(where[0]) + where.numel()))
    return int(where[0]), where.numel()


@pytest.mark.parametrize("case", CASES)
def test_fastv_on_llava_matches_the_official_selection(llava, case):
    model, inputs = _sample(llava, case)
    start, length = _image_span(model, inputs)
    capture, sample, lm = _run_pruned(model, inputs, "fastv")  # defaults: K = 2, R = 0.5
    [stage] = sample.stages
    assert stage.layer == 2 and len(stage.kept_positions) == round(length * 0.5)
    with torch.no_grad():
        attention = _eager_attention(lm.layers[1], capture.inputs[1], lm.rotary_emb)
    assert stage.kept_positions.tolist() == official_fastv(attention, start, length, 0.5)


@pytest.mark.parametrize("case", CASES)
def test_pdrop_on_llava_matches_the_official_selection(llava, case):
    model, inputs = _sample(llava, case)
    start, length = _image_span(model, inputs)
    capture, sample, lm = _run_pruned(model, inputs, "pdrop")  # defaults: λ = 0.5, compact positions
    layers = [stage.layer for stage in sample.stages]
    assert layers == [1, 2, 3]  # 1/4, 1/2, 3/4 of the 4-layer decoder
    counts = official_pdrop_counts(length, [1.0, 0.5, 0.25, 0.125])
    positions = list(range(inputs["input_ids"].shape[1]))  # original position of each current column
    for i, stage in enumerate(sample.stages):
        features = capture.outputs[stage.layer - 1]  # the sequence the stage drops from
        assert features.shape[1] == len(positions)
        with torch.no_grad():
            kept = official_pdrop_stage(lm.layers[stage.layer], features, lm.rotary_emb, start, counts[i],
                                        counts[i + 1])
        assert stage.kept_positions.tolist() == [positions[c] for c in kept]
        positions = positions[:start] + [positions[c] for c in kept] + positions[start + counts[i]:]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("options", [{}, {"ratio": 0.5}, {"max_num_trunction": 24}])
def test_dart_on_llava_matches_the_official_selection(llava, case, options):
    model, inputs = _sample(llava, case)
    start, length = _image_span(model, inputs)
    ratio, cap = options.get("ratio", 0.778), options.get("max_num_trunction")
    if not options:  # the default: the official run "0.778 128" with 128 scaled to this image's tokens
        cap = round(length * (1 - 0.778))
    token_topk = official_dart_token_topk(length, ratio, cap)
    capture, sample, lm = _run_pruned(model, inputs, "dart", **options)
    [stage] = sample.stages
    assert stage.layer == 2 and len(stage.kept_positions) == 4 + 8 * token_topk
    with torch.no_grad():
        _, keys = _rotated_qk(lm.layers[1], capture.inputs[1], lm.rotary_emb)
        state = lm.norm(capture.outputs[1])[0]
    assert stage.kept_positions.tolist() == official_dart(state, keys, start, length, token_topk)
