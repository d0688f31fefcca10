"""attention_rows against the eager attention weights of tiny HF decoders (Llama, Qwen2, Qwen3, Mistral,
Qwen2-VL / Qwen2.5-VL / Qwen3-VL text models with M-RoPE)."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaModel,
    MistralConfig,
    MistralModel,
    Qwen2Config,
    Qwen2Model,
    Qwen3Config,
    Qwen3Model,
    Qwen3VLTextConfig,
    Qwen3VLTextModel,
)
from transformers.models.qwen2_5_vl import Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel
from transformers.models.qwen2_vl import Qwen2VLTextConfig, Qwen2VLTextModel
from transformers.models.qwen2_vl import modeling_qwen2_vl as qwen2_vl_modeling

from vtprune import compat
from vtprune.engine.attention_rows import attention_rows, key_states, last_token_index, rope_only_rows

TOL = 1e-5
MAX_ERR: dict[str, float] = {}  # case -> max abs error seen (for reporting)

_COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=100,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=2,
)


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


_MROPE = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}  # sums to dh/2 = 8


def _build(model_cls, config_cls, attn="eager", seed=0, **extra):
    config = config_cls(**{**_COMMON, **extra})
    config._attn_implementation = attn
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    # HF init (std 0.02) makes attention nearly uniform; random, larger weights make rows peaky, so RoPE,
    # norms, biases and masks all visibly matter.
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def _capture(model, layer_idx, **inputs):
    """Run ``model`` with eager attentions; return (attn[layer] [B,H,L,L], layer input, position_embeddings)."""
    captured = {}

    def hook(module, args, kwargs):
        captured["hidden"] = args[0] if args else kwargs["hidden_states"]
        captured["pe"] = kwargs["position_embeddings"]

    handle = model.layers[layer_idx].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            out = model(**inputs, output_attentions=True)
    finally:
        handle.remove()
    return out.attentions[layer_idx], captured["hidden"], captured["pe"]


def _eager_rows(attn, query_index):
    """attn [B, H, L, L] -> [B, H, Q, L] at query_index [B, Q]."""
    b, h, _, length = attn.shape
    idx = query_index[:, None, :, None].expand(b, h, query_index.shape[1], length)
    return attn.float().gather(2, idx)


def _check(case, got, want, tol=TOL):
    assert got.dtype == torch.float32
    assert got.shape == want.shape, (got.shape, want.shape)
    err = float((got - want).detach().abs().max())
    MAX_ERR[case] = max(MAX_ERR.get(case, 0.0), err)
    assert err <= tol, f"{case}: max abs error {err:.3g} > {tol}"


def _ids(b, length, seed=0):
    return torch.randint(3, 100, (b, length), generator=torch.Generator().manual_seed(seed))


QUERY_SETS = {
    "q3": torch.tensor([[2, 5, 8], [8, 0, 4]]),  # several rows per sample, different per sample, unsorted
    "last": torch.tensor([[8], [8]]),
}


# --------------------------------------------------------------------------------------- 1-D RoPE


@pytest.mark.parametrize("layer_idx", [0, 1])
@pytest.mark.parametrize("queries", list(QUERY_SETS))
@pytest.mark.parametrize(
    "family",
    ["llama", "qwen2", "qwen3", "mistral"],
)
def test_matches_eager_1d_rope(family, queries, layer_idx):
    builders = {
        "llama": (LlamaModel, LlamaConfig, {}),
        "qwen2": (Qwen2Model, Qwen2Config, {}),
        "qwen3": (Qwen3Model, Qwen3Config, {"head_dim": 16}),
        "mistral": (MistralModel, MistralConfig, {"sliding_window": None}),
    }
    model_cls, config_cls, extra = builders[family]
    model = _build(model_cls, config_cls, **extra)
    attn_mod = model.layers[layer_idx].self_attn
    assert attn_mod.num_key_value_groups == 2  # GQA
    if family == "qwen2":
        assert attn_mod.q_proj.bias is not None and attn_mod.k_proj.bias is not None
    if family == "qwen3":
        assert hasattr(attn_mod, "q_norm") and hasattr(attn_mod, "k_norm")

    attn, hidden, pe = _capture(model, layer_idx, input_ids=_ids(2, 9))
    qi = QUERY_SETS[queries]
    got = attention_rows(model.layers[layer_idx], hidden, pe, qi)
    _check(f"{family}/{queries}", got, _eager_rows(attn, qi))
    # average_heads is the head mean of the same rows
    avg = attention_rows(model.layers[layer_idx], hidden, pe, qi, average_heads=True)
    assert avg.shape == (2, qi.shape[1], 9)
    torch.testing.assert_close(avg, got.mean(1), atol=1e-7, rtol=0)


def test_non_causal_and_negative_index():
    model = _build(LlamaModel, LlamaConfig)
    attn, hidden, pe = _capture(model, 1, input_ids=_ids(2, 9))
    layer = model.layers[1]
    # -1 means the last column; identical to index L-1
    a = attention_rows(layer, hidden, pe, torch.tensor([[-1], [-1]]))
    b = attention_rows(layer, hidden, pe, torch.tensor([8]))  # 1-D index shared by the batch
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    _check("llama/last(-1)", a, _eager_rows(attn, torch.tensor([[8], [8]])))
    # non-causal: an early query sees later keys, rows still sum to 1
    nc = attention_rows(layer, hidden, pe, torch.tensor([[0], [3]]), causal=False)
    assert float(nc[0, :, 0, 1:].sum()) > 0
    torch.testing.assert_close(nc.sum(-1), torch.ones_like(nc.sum(-1)))


# ---------------------------------------------------------------------------------------- padding


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_left_padding(family):
    model_cls, config_cls = {"llama": (LlamaModel, LlamaConfig), "qwen2": (Qwen2Model, Qwen2Config)}[family]
    model = _build(model_cls, config_cls)
    length = 9
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, :3] = 0  # sample 1 is left-padded by 3
    ids = _ids(2, length)
    ids[1, :3] = 2
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate() builds them
    last = last_token_index(mask, 2, length)
    assert last.tolist() == [[8], [8]]
    qi = torch.tensor([[1, 4, 8], [3, 6, 8]])  # real rows only (sample 1's first real token is 3)
    for layer_idx in (0, 1):
        attn, hidden, pe = _capture(
            model, layer_idx, input_ids=ids, attention_mask=mask, position_ids=position_ids
        )
        layer = model.layers[layer_idx]
        got = attention_rows(layer, hidden, pe, qi, key_padding_mask=mask.bool())
        assert torch.all(got[1, :, :, :3] == 0)  # padding keys get exactly zero
        _check(f"{family}/left-pad q3", got, _eager_rows(attn, qi))
        got_last = attention_rows(layer, hidden, pe, last, key_padding_mask=mask, average_heads=True)
        _check(f"{family}/left-pad last", got_last, _eager_rows(attn, last).mean(1))
        assert torch.all(got_last[1, :, :3] == 0)
        # a padding query (sees only padding keys) gets an all-zero row instead of NaN
        pad_row = attention_rows(layer, hidden, pe, torch.tensor([[0], [0]]), key_padding_mask=mask)
        assert torch.all(pad_row[1] == 0) and torch.isfinite(pad_row).all()


def test_right_padding_last_token():
    model = _build(LlamaModel, LlamaConfig)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, 6:] = 0  # sample 0 right-padded: last real token at 5
    last = last_token_index(mask, 2, 9)
    assert last.tolist() == [[5], [8]] and last.dtype == torch.long
    attn, hidden, pe = _capture(model, 1, input_ids=_ids(2, 9), attention_mask=mask)
    got = attention_rows(model.layers[1], hidden, pe, last, key_padding_mask=mask)
    _check("llama/right-pad last", got, _eager_rows(attn, last))
    assert torch.all(got[0, :, :, 6:] == 0)


def test_last_token_index():
    assert last_token_index(None, 3, 7).tolist() == [[6]] * 3
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [0, 0, 0, 0, 0], [1, 0, 1, 1, 0]])
    assert last_token_index(mask, 4, 5).tolist() == [[4], [2], [0], [3]]
    assert last_token_index(mask.bool(), 4, 5).tolist() == [[4], [2], [0], [3]]
    with pytest.raises(ValueError):
        last_token_index(mask, 4, 6)


# ---------------------------------------------------------------------------------- sliding window


def test_mistral_sliding_window_auto():
    model = _build(MistralModel, MistralConfig, sliding_window=3)
    attn, hidden, pe = _capture(model, 1, input_ids=_ids(2, 9))
    qi = torch.tensor([[2, 5, 8], [8, 0, 4]])
    got = attention_rows(model.layers[1], hidden, pe, qi)
    _check("mistral/sliding-window=3", got, _eager_rows(attn, qi))
    assert torch.all(got[0, :, 2, :6] == 0)  # query 8 sees keys 6..8 only
    full = attention_rows(model.layers[1], hidden, pe, qi, sliding_window=None)
    assert float(full[0, :, 2, :6].sum()) > 0


# -------------------------------------------------------------------------------------------- M-RoPE


def _mrope_positions(b, length):
    """[3, B, L] positions that differ across the t/h/w axes (like an image block inside text)."""
    base = torch.arange(length).expand(b, length)
    pos = torch.stack([base, base.clone(), base.clone()])
    pos[0, :, 2:6] = 2  # temporal axis frozen over the "image"
    pos[1, :, 2:6] = torch.tensor([2, 2, 3, 3])  # rows
    pos[2, :, 2:6] = torch.tensor([2, 3, 2, 3])  # cols
    pos[:, 1] += 1  # second sample shifted, so batch rows differ too
    return pos


MROPE_FAMILIES = {
    "qwen2_vl": (Qwen2VLTextModel, Qwen2VLTextConfig, {"rope_parameters": dict(_MROPE)}),
    "qwen2_5_vl": (Qwen2_5_VLTextModel, Qwen2_5_VLTextConfig, {"rope_parameters": dict(_MROPE)}),
    # Qwen3-VL: interleaved M-RoPE plus q_norm / k_norm
    "qwen3_vl": (
        Qwen3VLTextModel,
        Qwen3VLTextConfig,
        {
            "head_dim": 16,
            "rope_parameters": {
                "rope_type": "default",
                "mrope_section": [4, 2, 2],
                "mrope_interleaved": True,
                "rope_theta": 10000.0,
            },
        },
    ),
}


@pytest.mark.parametrize("family", list(MROPE_FAMILIES))
def test_mrope_matches_eager(family):
    model_cls, config_cls, extra = MROPE_FAMILIES[family]
    model = _build(model_cls, config_cls, **extra)
    pos = _mrope_positions(2, 9)
    assert not torch.equal(pos[0], pos[1]) and not torch.equal(pos[1], pos[2])
    qi = torch.tensor([[2, 5, 8], [8, 0, 4]])
    for layer_idx in (0, 1):
        attn, hidden, pe = _capture(model, layer_idx, input_ids=_ids(2, 9), position_ids=pos)
        got = attention_rows(model.layers[layer_idx], hidden, pe, qi)
        _check(f"{family}/mrope q3", got, _eager_rows(attn, qi))
        last = last_token_index(None, 2, 9)
        _check(f"{family}/mrope last", attention_rows(model.layers[layer_idx], hidden, pe, last), _eager_rows(attn, last))
    # sensitivity: plain text positions (same on all axes) give visibly different rows
    text_pe = model.rotary_emb(hidden, torch.arange(9).view(1, 1, 9).expand(3, 2, 9))
    wrong = attention_rows(model.layers[1], hidden, text_pe, qi)
    assert float((wrong - got).abs().max()) > 1e-3


def _legacy_apply_multimodal_rotary_pos_emb(q, k, cos, sin, mrope_section, unsqueeze_dim=1):
    """transformers 4.x Qwen2-VL: cos/sin are [3, B, L, dh] and get recombined here."""
    mrope_section = mrope_section * 2
    cos = torch.cat([m[i % 3] for i, m in enumerate(cos.split(mrope_section, dim=-1))], dim=-1)
    sin = torch.cat([m[i % 3] for i, m in enumerate(sin.split(mrope_section, dim=-1))], dim=-1)
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    rot = qwen2_vl_modeling.rotate_half
    return q * cos + rot(q) * sin, k * cos + rot(k) * sin


def test_legacy_4d_mrope_uses_family_multimodal_function(monkeypatch):
    """transformers-4.x-style M-RoPE ([3, B, L, dh] cos/sin) goes through the family's own
    apply_multimodal_rotary_pos_emb with the config's mrope_section, and equals the v5 path."""
    model = _build(Qwen2VLTextModel, Qwen2VLTextConfig, rope_parameters=dict(_MROPE))
    pos = _mrope_positions(2, 9)
    attn, hidden, pe = _capture(model, 1, input_ids=_ids(2, 9), position_ids=pos)
    layer = model.layers[1]
    qi = torch.tensor([[2, 5, 8], [8, 0, 4]])

    calls = []

    def spy(q, k, cos, sin, mrope_section, unsqueeze_dim=1):
        calls.append(list(mrope_section))
        return _legacy_apply_multimodal_rotary_pos_emb(q, k, cos, sin, mrope_section, unsqueeze_dim)

    fake = types.ModuleType("fake_legacy_qwen2_vl")
    fake.apply_multimodal_rotary_pos_emb = spy
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    legacy_cls = type("LegacyQwen2VLAttention", (type(layer.self_attn),), {"__module__": fake.__name__})
    monkeypatch.setattr(layer.self_attn, "__class__", legacy_cls)

    # v4 rotary embedding: per-axis cos/sin, not yet recombined
    inv_freq = model.rotary_emb.inv_freq
    freqs = pos[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    got = attention_rows(layer, hidden, (emb.cos(), emb.sin()), qi)
    assert calls and all(c == [2, 3, 3] for c in calls)
    _check("qwen2_vl/legacy-4d-mrope", got, _eager_rows(attn, qi))


# ------------------------------------------------------------------ no attention forward, sdpa model


def test_never_calls_attention_forward_and_works_under_sdpa(monkeypatch):
    eager = _build(LlamaModel, LlamaConfig, attn="eager")
    sdpa = _build(LlamaModel, LlamaConfig, attn="sdpa")
    sdpa.load_state_dict(eager.state_dict())
    assert sdpa.config._attn_implementation == "sdpa"
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :2] = 0
    ids = _ids(2, 9)
    ref, _, _ = _capture(eager, 1, input_ids=ids, attention_mask=mask)

    captured = {}

    def hook(module, args, kwargs):
        captured["hidden"], captured["pe"] = args[0], kwargs["position_embeddings"]

    handle = sdpa.layers[1].register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        sdpa(input_ids=ids, attention_mask=mask)
    handle.remove()

    def boom(*args, **kwargs):
        raise AssertionError("attention forward must not be called")

    for layer in sdpa.layers:
        monkeypatch.setattr(layer.self_attn, "forward", boom)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", boom)
    layer = sdpa.layers[1]
    with pytest.raises(AssertionError):
        layer.self_attn(captured["hidden"])  # the patch is live
    qi = torch.tensor([[4, 8], [0, 8]])
    got = attention_rows(layer, captured["hidden"], captured["pe"], qi, key_padding_mask=mask)
    _check("llama/sdpa-model", got, _eager_rows(ref, qi))


def test_low_precision_model():
    model = _build(LlamaModel, LlamaConfig).to(torch.bfloat16)
    attn, hidden, pe = _capture(model, 1, input_ids=_ids(2, 9))
    assert hidden.dtype == torch.bfloat16
    qi = torch.tensor([[8], [5]])
    got = attention_rows(model.layers[1], hidden, pe, qi)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.sum(-1), torch.ones_like(got.sum(-1)))
    # eager computes scores in bf16, we in fp32: agree to bf16 precision
    assert float((got - _eager_rows(attn, qi)).abs().max()) < 3e-2


def test_input_validation():
    model = _build(LlamaModel, LlamaConfig)
    _, hidden, pe = _capture(model, 0, input_ids=_ids(2, 9))
    layer = model.layers[0]
    with pytest.raises(IndexError):
        attention_rows(layer, hidden, pe, torch.tensor([[9], [0]]))
    with pytest.raises(TypeError):
        attention_rows(layer, hidden, pe, torch.tensor([[1.0], [0.0]]))
    with pytest.raises(ValueError):
        attention_rows(layer, hidden, pe, torch.tensor([[1], [0]]), key_padding_mask=torch.ones(2, 8))
    with pytest.raises(ValueError):
        attention_rows(layer, hidden, pe, torch.tensor([[1, 2, 3]]))


def test_gqa_head_mapping_matches_repeat_kv():
    """Query head h must read kv head h // groups (transformers' repeat_kv), not h % num_kv."""
    model = _build(LlamaModel, LlamaConfig, num_attention_heads=8, num_key_value_heads=2, head_dim=8)
    attn, hidden, pe = _capture(model, 0, input_ids=_ids(1, 9))
    qi = torch.tensor([[3, 8]])
    _check("llama/gqa-8q-2kv", attention_rows(model.layers[0], hidden, pe, qi), _eager_rows(attn, qi))



# ------------------------------------------------------------------------- key states, RoPE-only rows


@pytest.mark.parametrize("family", ["llama", "qwen3", "qwen2_vl"])
def test_key_states_equal_the_cached_keys(family):

    builders = {
        "llama": (LlamaModel, LlamaConfig, {}),
        "qwen3": (Qwen3Model, Qwen3Config, {"head_dim": 16}),
        "qwen2_vl": (Qwen2VLTextModel, Qwen2VLTextConfig, {"rope_parameters": _MROPE}),
    }
    model_cls, config_cls, extra = builders[family]
    model = _build(model_cls, config_cls, attn="sdpa", **extra)
    captured = {}
    model.layers[1].register_forward_pre_hook(
        lambda m, a, k: captured.update(hidden=a[0] if a else k["hidden_states"], pe=k["position_embeddings"]),
        with_kwargs=True)
    cache = compat.new_dynamic_cache(model.config)
    model(input_ids=_ids(2, 9), **compat.cache_kwargs(cache), use_cache=True)
    keys = key_states(model.layers[1], captured["hidden"], captured["pe"])
    torch.testing.assert_close(keys, cache.layers[1].keys, atol=1e-5, rtol=1e-5)


def test_rope_only_rows_are_distributions_and_shift_invariant():
    model = _build(LlamaModel, LlamaConfig)
    hidden = torch.zeros(2, 12, 64)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :3] = 0  # left padding in sample 1
    query = torch.tensor([[11, 6], [11, 6]])
    rows = []
    for shift in (0, 40):
        pos = torch.arange(12)[None].expand(2, 12) + shift
        rows.append(rope_only_rows(model.layers[0], model.rotary_emb(hidden, position_ids=pos), query, mask))
    torch.testing.assert_close(rows[0], rows[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rows[0].sum(-1), torch.ones(2, 2))
    assert float(rows[0][1, :, :3].abs().max()) == 0.0  # padding keys
    assert float(rows[0][:, 1, 7:].abs().max()) == 0.0  # causal
    # RoPE's long-range decay: the query's own position gets the largest weight
    assert rows[0][0, 0].argmax().item() == 11
