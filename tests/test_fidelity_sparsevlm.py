"""Fidelity of ``sparsevlm`` to the official code, both versions (v1.5 and v2.0 / SparseVLM+).

Official code: Gumpest/SparseVLMs @ 26a5f48813c46cd1c7364160354e7fdd3febaa67 (main, 2025-12-13; both versions,
switched by the ``USE_VERSION`` environment variable, default v1.5). The functions ``official_*`` below are our
own transcription of it, written for one sample (the official code runs batch size 1):

* raters ............... llava/model/language_model/modelling_sparse_llama.py lines 198-204
* a pruning layer ...... modelling_sparse_llama.py lines 221-321 (the inference branch): layer ℓ runs on all
                         tokens, its attention scores them, the drop applies to its output
* attention weights .... modelling_sparse_llama.py lines 641-696 with utils.py lines 95-116 (softmax of the
                         scaled, causally masked q·k of the layer)
* v2.0 correction ...... modelling_sparse_llama.py lines 241-251 (divide by the RoPE logits of all-ones q/k)
* v2.0 head choice ..... score.py lines 48-55 (top 14 heads by summed rater→visual attention)
* top-k ................ score.py lines 23-46 (head mean, rater mean, topk of min(count, n − 1))
* recycling ............ modelling_sparse_llama.py lines 275-307 (int(0.3·n)+1 tokens, int(m/10)+1 clusters,
                         inserted after the kept visual block, position ids truncated)
* clustering ........... utils.py lines 179-239 (cluster_and_merge: DPC-KNN, k = number of clusters)
* schedules ............ score.py lines 9-21

The transcription runs on the same fp32 tensors as vtprune: (1) ≥ 20 random cases per version through
``SparseVLM.select`` on a random decoder layer; (2) the real signals of tiny LLaVA models, comparing every
stage's ``vtprune.stats(model).samples[0].stages[j].kept_positions`` and the prompt logits.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from reference_runs import capture_lm_calls
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    repeat_kv,
)

import vtprune
from vtprune.catalog.in_llm import LayerContext
from vtprune.registry import build_method
from vtprune.testing import tiny_image, tiny_inputs, tiny_vlm

COMMIT = "26a5f48813c46cd1c7364160354e7fdd3febaa67"

#: score.py lines 11-14 (USE_VERSION unset -> first list, USE_VERSION=2_0 -> second)
OFFICIAL_TABLES = {
    "1.5": {192: [300, 200, 110], 128: [303, 110, 36], 96: [238, 48, 26], 64: [66, 30, 17]},
    "2.0": {192: [300, 200, 118], 128: [238, 108, 60], 96: [246, 54, 28], 64: [66, 34, 20]},
}
OFFICIAL_LAYERS = [2, 6, 15]  # LlamaDynamicvitModel(pruning_loc=[2, 6, 15])


# ------------------------------------------------------------------------------------ the transcription


def official_raters(embeds: torch.Tensor, v_start: int, v_num: int) -> torch.Tensor:
    """Indices (into the text after the image) of the raters. ``embeds`` [1, L, D]: the LLM input."""
    visual = embeds[:, v_start:v_start + v_num, :]
    text = embeds[:, v_start + v_num:, :]
    relevance = (visual @ text.transpose(1, 2)).softmax(2).mean(1)  # [1, T]
    return torch.where(relevance > relevance.mean())[1]


def official_attention(layer, hidden: torch.Tensor, cos_sin) -> torch.Tensor:
    """[1, H, L, L] softmax attention weights of ``layer`` on its input ``hidden`` (causal, no padding)."""
    attn = layer.self_attn
    _, length, _ = hidden.shape
    x = layer.input_layernorm(hidden)
    head_dim = attn.head_dim
    q = attn.q_proj(x).view(1, length, -1, head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(1, length, -1, head_dim).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, *cos_sin)
    k = repeat_kv(k, q.shape[1] // k.shape[1])
    bias = torch.full((length, length), float("-inf")).triu(1)
    return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(head_dim) + bias, dim=-1)


def official_rope_weights(num_heads: int, head_dim: int, cos_sin) -> torch.Tensor:
    """[1, H, L, L] the logits all-ones queries and keys get from RoPE alone (divided by √dh, no softmax)."""
    cos, _ = cos_sin
    length = cos.shape[-2]
    ones = torch.ones(1, num_heads, length, head_dim)
    q, k = apply_rotary_pos_emb(ones, ones.clone(), *cos_sin)
    return q @ k.transpose(2, 3) / math.sqrt(head_dim)


def official_cluster_and_merge(x: torch.Tensor, cluster_num: int, generator: torch.Generator | None = None):
    """x [1, N, C] -> (merged [1, c, C] in the order of the centres, centre indices [c], whether two densities
    tie exactly). With ``generator`` the official noise (uniform, 1e-6) orders equal densities at random, as
    the official code does; without it they are ordered by index (vtprune's deterministic rule). The noise
    only matters on exact ties, which are common when k is 1 or 2: with k = 1 every density is exp(0) = 1,
    with k = 2 mutual nearest neighbours have the same density."""
    _, n, channels = x.shape
    dist = (x[:, :, None, :] - x[:, None, :, :]).norm(dim=-1, p=2) / (channels ** 0.5)  # [1, N, N]
    nearest, _ = torch.topk(dist, k=cluster_num, dim=-1, largest=False)
    density = (-(nearest ** 2).mean(dim=-1)).exp()
    ties = bool((density[0][:, None] == density[0][None, :]).sum() > n)
    if generator is not None:
        density = density + torch.rand(density.shape, generator=generator) * 1e-6  # the official noise
        denser = density[:, None, :] > density[:, :, None]  # [1, i, j]: j denser than i
    else:
        index = torch.arange(n)
        denser = (density[:, None, :] > density[:, :, None]) | (
            (density[:, None, :] == density[:, :, None]) & (index[None, None, :] < index[None, :, None]))
    denser = denser.to(x.dtype)
    far = dist.flatten(1).max(dim=-1)[0][:, None, None]
    delta, _ = (dist * denser + far * (1 - denser)).min(dim=-1)
    _, centres = torch.topk(delta * density, k=cluster_num, dim=-1)  # [1, c]
    to_centres = dist[0, centres[0]]  # [c, N]
    cluster = to_centres.argmin(dim=0)
    cluster[centres[0]] = torch.arange(cluster_num)
    weight = torch.zeros(cluster_num, 1).index_add_(0, cluster, torch.ones(n, 1)) + 1e-6
    merged = torch.zeros(cluster_num, channels).index_add_(0, cluster, x[0] / weight[cluster])
    return merged[None], centres[0], ties


def official_stage(attn, out, position_ids, v_start, v_num, raters, count, version, rope_weights,
                   generator, origin):
    """One pruning layer. ``attn`` [1, H, L, L] layer ℓ's attention weights, ``out`` [1, L, D] its output,
    ``raters`` indices into the text after the visual block, ``origin`` [L] original position of each token
    (-1: merged); ``generator``: see :func:`official_cluster_and_merge`. Returns (new out, new position ids,
    new v_num, new origin, kept visual mask [v_num], merged tokens or None, whether densities tied)."""
    text_start = v_start + v_num
    rater_rows = raters + text_start
    if version == "2.0":
        attn = attn / rope_weights
        per_head = attn[0][:, rater_rows, v_start:text_start].sum((1, 2))
        attn = attn[:, per_head.topk(min(14, attn.shape[1]))[1]]
    relation = attn.mean(1)[:, rater_rows, v_start:v_start + v_num].mean(1)  # [1, v_num]
    keep = torch.zeros_like(relation, dtype=torch.bool)
    _, top = torch.topk(relation, min(count, v_num - 1), dim=1)
    keep[0][top] = True
    policy = torch.ones(out.shape[1], dtype=torch.bool)
    policy[v_start:text_start] = keep[0]
    kept_vis = int(keep.sum())
    selected = torch.where(policy)[0]
    merged, ties = None, False
    if version == "1.5" and bool((~policy).any()):
        dropped_tokens = out[:, ~policy]  # in sequence order
        dropped_scores = relation[0][~keep[0]]
        chosen = dropped_scores.topk(int(dropped_scores.shape[0] * 0.3) + 1)[1]
        clusters = int(chosen.shape[0] / 10) + 1
        merged, _, ties = official_cluster_and_merge(dropped_tokens[:, chosen], clusters, generator)
        kept = out[:, selected]
        out = torch.cat([kept[:, :v_start + kept_vis], merged, kept[:, v_start + kept_vis:]], dim=1)
        position_ids = position_ids[:, :selected.numel() + clusters]  # truncated: compact positions
        origin = torch.cat([origin[selected][:v_start + kept_vis], torch.full((clusters,), -1),
                            origin[selected][v_start + kept_vis:]])
        v_num = kept_vis + clusters
    else:
        out = out[:, selected]
        position_ids = position_ids[:, selected] if version == "2.0" else position_ids[:, :selected.numel()]
        origin = origin[selected]
        v_num = kept_vis
    return out, position_ids, v_num, origin, keep[0], merged, ties


def official_forward(model, embeds, v_start, v_num, layers, counts, version):
    """The official decoder loop (batch 1) on the tiny model's language model: returns (prompt logits,
    per stage the sorted original positions of the kept non-merged visual tokens, merged counts)."""
    lm = model.model.language_model
    raters = official_raters(embeds, v_start, v_num)
    hidden, length = embeds, embeds.shape[1]
    position_ids = torch.arange(length)[None]
    origin = torch.arange(length)
    stages, merged_counts = [], []
    for index, layer in enumerate(lm.layers):
        cos_sin = lm.rotary_emb(hidden, position_ids=position_ids)
        n = hidden.shape[1]
        mask = torch.full((n, n), float("-inf")).triu(1)[None, None]
        out = layer(hidden, attention_mask=mask, position_embeddings=cos_sin, position_ids=position_ids)
        out = out[0] if isinstance(out, tuple) else out
        if index in layers:
            attn = official_attention(layer, hidden, cos_sin)
            rope = official_rope_weights(attn.shape[1], layer.self_attn.head_dim, cos_sin)
            out, position_ids, v_num, origin, _, merged, _ = official_stage(
                attn, out, position_ids, v_start, v_num, raters, counts[layers.index(index)], version, rope,
                None, origin)
            block = origin[v_start:v_start + v_num]
            stages.append(sorted(block[block >= 0].tolist()))
            merged_counts.append(0 if merged is None else merged.shape[1])
        hidden = out
    return model.lm_head(lm.norm(hidden))[0], stages, merged_counts


# ------------------------------------------------------------------------------ (1) random tensors


def _random_case(seed: int, version: str):
    """A random decoder layer (32 heads, so that the 14 priority heads are a real choice) and a random
    sequence: pre-prompt, visual block, text; for v2.0 gapped position ids (an earlier stage's survivors)."""
    gen = torch.Generator().manual_seed(seed)
    heads, head_dim = 32, 4
    config = LlamaConfig(hidden_size=heads * head_dim, intermediate_size=64, num_attention_heads=heads,
                         num_key_value_heads=8, num_hidden_layers=2, max_position_embeddings=4096)
    torch.manual_seed(seed)
    layer = LlamaDecoderLayer(config, layer_idx=1).eval()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.2 if p.dim() > 1 else 1.0, generator=gen)
    rotary = LlamaRotaryEmbedding(config)
    pre = int(torch.randint(1, 12, (1,), generator=gen))
    v_num = int(torch.randint(40, 200, (1,), generator=gen))
    text = int(torch.randint(3, 30, (1,), generator=gen))
    length = pre + v_num + text
    hidden_in = torch.randn(1, length, config.hidden_size, generator=gen)
    out = torch.randn(1, length, config.hidden_size, generator=gen)  # layer ℓ's output: what gets merged
    embeds = torch.randn(1, length, config.hidden_size, generator=gen)  # the LLM input: rater selection
    if version == "2.0" and seed % 2:
        position_ids = torch.sort(torch.randperm(3 * length, generator=gen)[:length]).values[None]
    else:
        position_ids = torch.arange(length)[None]
    count = int(torch.randint(max(1, v_num // 10), v_num, (1,), generator=gen))
    return layer, rotary, embeds, hidden_in, out, position_ids, pre, v_num, count


@pytest.mark.parametrize("version", ["1.5", "2.0"])
def test_random_cases_match_the_official_selection(version):
    """24 random cases per version: identical kept sets; v1.5's recycled tokens equal within fp32 tolerance,
    in the same order (they sit after the kept visual tokens, in the official order). Against the official
    random noise on the densities the recycled tokens are identical too, except where two densities tie
    exactly (the official outcome is then random; vtprune's is one of its outcomes)."""
    method = build_method("sparsevlm", version=version)
    identical = identical_with_noise = 0
    for seed in range(24):
        layer, rotary, embeds, hidden_in, out, position_ids, v_start, v_num, count = _random_case(seed, version)
        length = embeds.shape[1]
        with torch.no_grad():
            cos_sin = rotary(hidden_in, position_ids=position_ids)
            attn = official_attention(layer, hidden_in, cos_sin)
            rope = official_rope_weights(attn.shape[1], layer.self_attn.head_dim, cos_sin)
            raters = official_raters(embeds, v_start, v_num)
            official = [official_stage(attn, out, position_ids, v_start, v_num, raters, count, version, rope,
                                       generator, torch.arange(length))
                        for generator in (None, torch.Generator().manual_seed(seed))]
            # vtprune on the same tensors: SparseVLM.select at the layer after ℓ
            real = torch.ones(1, length, dtype=torch.bool)
            visual = torch.zeros(1, length, dtype=torch.bool)
            visual[0, v_start:v_start + v_num] = True
            text = real & ~visual
            source = [torch.arange(length)]
            prepared = method.prepare(embeds, real, visual, text, source)
            ctx = LayerContext(
                layer=1, layers=torch.nn.ModuleList([layer, layer]), hidden=out, position_embeddings=cos_sin,
                previous_hidden=hidden_in, previous_position_embeddings=cos_sin, real=real, visual=visual,
                last=torch.tensor([[length - 1]]), text=text, source=source, prepared=prepared,
                previous_position_ids=position_ids, rotary=rotary)
            (selection,) = method.select(ctx, [count])
        assert prepared[0].tolist() == (raters + v_start + v_num).tolist()
        _, _, _, _, keep, merged, ties = official[0]
        assert selection.keep.tolist() == (torch.nonzero(keep).flatten() + v_start).tolist(), f"case {seed}"
        if version == "1.5":
            torch.testing.assert_close(selection.merged, merged[0], atol=1e-5, rtol=1e-5)
            assert selection.anchors.tolist() == [v_start + v_num - 1] * merged.shape[1]
            noisy = official[1][5][0]
            same = noisy.shape == selection.merged.shape and torch.allclose(noisy, selection.merged, atol=1e-5)
            assert same or ties, f"case {seed}: differs from the official noise without a density tie"
            identical_with_noise += same
        else:
            assert selection.merged is None
            identical_with_noise += 1
        identical += 1
    assert identical == 24
    print(f"sparsevlm {version}: identical on {identical}/24 random cases; "
          f"{identical_with_noise}/24 also against the official random tie-break")


# --------------------------------------------------------------------------- (2) tiny models' signals

TINY_CASES = [  # (model seed, image seed, prompt, options)
    (0, 0, "describe the image please", {"budget": 0.6}),
    (0, 1, "what color is the large square in the picture", {"budget": 32}),
    (0, 2, "how many shapes", {"budget": 0.5}),
    (0, 3, "is there a red rectangle on the left side", {"budget": 0.3}),
    (0, 4, "describe", {"budget": 0.7}),
    (0, 5, "what is in the top left corner of the image", {"layers": [0, 1, 2], "keep": [40, 20, 6]}),
    (0, 6, "what shape", {"layers": [1, 2], "keep": [30, 12]}),
    (0, 7, "tell me about the colors", {"layers": [0], "keep": [9]}),
    (1, 0, "describe the image please", {"budget": 0.6}),
    (1, 8, "which object is the biggest one", {"budget": 0.4}),
    (2, 9, "what do you see", {"layers": [0, 2], "keep": [48, 5]}),
]


@pytest.fixture(scope="module")
def llava_models():
    built = {}

    def get(seed):
        if seed not in built:
            built[seed] = tiny_vlm("llava", seed=seed)
        return built[seed]
    return get


@pytest.mark.parametrize("version", ["1.5", "2.0"])
@pytest.mark.parametrize("case", range(len(TINY_CASES)))
def test_tiny_llava_matches_the_official_forward(llava_models, version, case):
    """Every stage's kept visual positions (``stats().samples[0].stages[j].kept_positions``) equal the
    official loop's on the same tiny LLaVA, the merged counts too, and the prompt logits agree: the drop timing,
    recycled values, their placement and the positions of each version are the official ones."""
    model_seed, image_seed, prompt, options = TINY_CASES[case]
    model, processor = llava_models(model_seed)
    _compare_with_official(model, tiny_inputs(processor, [tiny_image(image_seed)], [prompt]), version, options)


def _compare_with_official(model, inputs, version, options):
    """Run vtprune and the official loop on one sample; assert identical stages and close prompt logits."""
    lm = model.model.language_model
    with torch.no_grad(), capture_lm_calls(model) as calls:
        model(**inputs)
    embeds = calls[-1]["inputs_embeds"]
    image = torch.nonzero(inputs["input_ids"][0] == model.config.image_token_id).flatten()
    v_start, v_num = int(image[0]), image.numel()
    assert image.tolist() == list(range(v_start, v_start + v_num))
    method = build_method("sparsevlm", version=version, **options)
    schedule = method.schedule(len(lm.layers), v_num, 1)
    layers = [layer - 1 for layer, _ in schedule]  # official ℓ: the drop enters layer ℓ + 1
    counts = [count for _, count in schedule]
    with torch.no_grad():
        official_logits, official_stages, official_merged = official_forward(
            model, embeds, v_start, v_num, layers, counts, version)
        with vtprune.pruned(model, method):
            logits = model(**inputs).logits[0]
            sample = vtprune.stats(model).samples[0]
    assert [stage.layer for stage in sample.stages] == [layer + 1 for layer in layers]
    assert [stage.kept_positions.tolist() for stage in sample.stages] == official_stages
    assert [stage.merged for stage in sample.stages] == official_merged
    torch.testing.assert_close(logits, official_logits, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def micro_llava():
    from transformers import AutoModelForImageTextToText

    from vtprune.loading import bundled_model_dir, load_processor

    directory = bundled_model_dir("micro-llava")
    if directory is None:
        pytest.skip("models/micro-llava is not in this checkout")
    model = AutoModelForImageTextToText.from_pretrained(directory, attn_implementation="sdpa").eval()
    return model, load_processor(directory)


@pytest.mark.parametrize("version", ["1.5", "2.0"])
def test_micro_llava_matches_the_official_forward(micro_llava, version):
    """The trained micro-llava (256 visual tokens, 4 layers) on 4 test questions at two budgets: the same kept
    sets at every stage as the official loop, and the same prompt logits."""
    from vtprune.synth import load_test_split

    model, processor = micro_llava
    for i, sample in enumerate(load_test_split(limit=4)):
        inputs = tiny_inputs(processor, [sample.image], [sample.question])
        _compare_with_official(model, inputs, version, {"budget": (96, 0.5)[i % 2]})


# ------------------------------------------------------------------------------------------ schedules


@pytest.mark.parametrize("version", ["1.5", "2.0"])
def test_official_schedules_and_timing(version):
    """LLaVA-1.5's shape: the official table at its labels, stages entering layers 3, 7, 16 (layers 2, 6, 15
    run on every token); other budgets reach their layer average; the depth scales the layers."""
    for budget, counts in OFFICIAL_TABLES[version].items():
        schedule = build_method("sparsevlm", budget=budget, version=version).schedule(32, 576, 1)
        assert schedule == [(layer + 1, count) for layer, count in zip(OFFICIAL_LAYERS, counts, strict=True)]
    for budget in (100, 150, 80, 0.25):
        schedule = build_method("sparsevlm", budget=budget, version=version).schedule(32, 576, 1)
        stages, current, total = dict(schedule), 576, 0
        for layer in range(32):
            current = stages.get(layer, current)
            total += current
        target = budget * 576 if isinstance(budget, float) else budget
        assert abs(total / 32 - target) <= 1.0
    tiny = build_method("sparsevlm", budget=32, version=version)
    assert [layer for layer, _ in tiny.schedule(4, 64, 1)] == [1, 2, 3]  # official ℓ = 0, 1, 2
    assert tiny.pruning_layers(2) == [1]


def test_defaults_versions_and_deprecated_values():
    info = vtprune.methods()["sparsevlm"]
    assert info.defaults["version"] == "1.5" and info.positions == "compact"
    assert build_method("sparsevlm").positions == "compact"
    assert build_method("sparsevlm", version="2.0").positions == "original"
    assert build_method("sparsevlm", version=2.0).config["version"] == "2.0"
    assert build_method("sparsevlm", version="2.0", positions="compact").positions == "compact"
    for old, new in ((1, "1.5"), (2, "2.0")):
        with pytest.warns(DeprecationWarning, match=f"version={old} is deprecated.*'{new}'"):
            method = build_method("sparsevlm", version=old)
        assert method.config["version"] == new
        assert method.positions == {"1.5": "compact", "2.0": "original"}[new]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_method("sparsevlm", version="1.5")
    with pytest.raises(vtprune.MethodOptionError, match='must be "1.5" or "2.0"'):
        build_method("sparsevlm", version=3)
