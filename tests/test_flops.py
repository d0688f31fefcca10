"""vtprune.bench.flops vs torch.utils.flop_counter.FlopCounterMode on tiny models built from configs.

On CPU, SDPA dispatches to ``aten._scaled_dot_product_flash_attention_for_cpu``, which FlopCounterMode
has no formula for (it would silently count 0 attention FLOPs). We register torch's own SDPA formula
(the one it uses for the CUDA flash / efficient / cuDNN kernels) for that op, and cross-check once
against the math backend, whose decomposition into bmm's FlopCounterMode counts natively.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    PhiConfig,
    PhiModel,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from vtprune import compat
from vtprune.bench import flops as F

REL_TOL = 0.01
IMG = 299  # image token id of the tiny LLaVA-family models (vocab 300)


def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


_CPU_SDPA = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flop}


def counted(fn) -> int:
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_CPU_SDPA) as fc:
        fn()
    return fc.get_total_flops()


def assert_close(analytic: int, measured: int) -> None:
    assert measured > 0
    assert abs(analytic - measured) <= REL_TOL * measured, (analytic, measured, analytic / measured)


def _build(cls, config):
    torch.manual_seed(0)
    return cls._from_config(config, attn_implementation="sdpa").eval()


#: the tiny vision towers' shared sizes (CLIP and SigLIP take the same keys)
_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
               patch_size=4)


def _clip(**kw):
    return CLIPVisionConfig(**{**_VISION, **kw})


def _siglip(**kw):
    return SiglipVisionConfig(**{**_VISION, **kw})


def _llama():
    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=300)


def _qwen2():
    return Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=300)


@pytest.fixture(scope="module")
def llava():
    cfg = LlavaConfig(vision_config=_clip(), text_config=_llama(), image_token_id=IMG)
    return cfg, _build(LlavaForConditionalGeneration, cfg)


# ----------------------------------------------------------------------------------------- (a) LLaVA-1.5


def test_llava_full_forward(llava):
    cfg, model = llava
    per_image = F.vision_tokens_per_input(cfg)
    assert per_image == 64  # (32/4)^2 patches, CLS dropped by the "default" strategy
    ids = torch.tensor([[1, 2, 3] + [IMG] * per_image + [4, 5, 6, 7]])
    measured = counted(lambda: model(input_ids=ids, pixel_values=torch.randn(1, 3, 32, 32)))
    n = ids.shape[1]
    b = F.model_prefill_flops(
        cfg, [n] * 4, num_vision_inputs=1, num_projected_tokens=per_image, logits_positions=n
    )
    assert_close(b.total, measured)


def test_llava_vision_and_projector_two_images(llava):
    cfg, model = llava
    measured = counted(lambda: model.model.get_image_features(pixel_values=torch.randn(2, 3, 32, 32)))
    assert_close(F.vision_flops(cfg, 2) + F.projector_flops(cfg, 2 * 64), measured)
    # vision_feature_layer=-2 still runs every CLIP layer: the count is linear in num_hidden_layers
    one_layer = F.vision_flops(LlavaConfig(vision_config=_clip(num_hidden_layers=1), text_config=_llama()), 2)
    assert F.vision_flops(cfg, 2) - one_layer == one_layer - F.vision_flops(
        LlavaConfig(vision_config=_clip(num_hidden_layers=0), text_config=_llama()), 2
    )


def test_lm_head_logits_to_keep(llava):
    cfg, model = llava
    ids = torch.tensor([[1, 2, 3] + [IMG] * 64 + [4]])
    full = counted(lambda: model(input_ids=ids, pixel_values=torch.randn(1, 3, 32, 32)))
    last = counted(lambda: model(input_ids=ids, pixel_values=torch.randn(1, 3, 32, 32), logits_to_keep=1))
    assert full - last == F.lm_head_flops(cfg, ids.shape[1]) - F.lm_head_flops(cfg, 1)


# ------------------------------------------------------------------------------- (b) LM on pruned length


@pytest.mark.parametrize("n", [1, 7, 33, 96])
def test_language_model_on_inputs_embeds(llava, n):
    cfg, model = llava
    lm = model.model.language_model
    measured = counted(lambda: lm(inputs_embeds=torch.randn(1, n, 64)))
    assert_close(F.llm_prefill_flops(cfg.text_config, [n] * 4), measured)


def test_math_backend_agrees(llava):
    """The custom CPU-SDPA formula agrees with the math backend, which FlopCounterMode counts natively."""
    cfg, model = llava
    lm = model.model.language_model
    x = torch.randn(1, 40, 64)
    with sdpa_kernel(SDPBackend.MATH), torch.no_grad(), FlopCounterMode(display=False) as fc:
        lm(inputs_embeds=x)
    assert fc.get_total_flops() == counted(lambda: lm(inputs_embeds=x))
    assert_close(F.llm_prefill_flops(cfg, [40] * 4), fc.get_total_flops())


# ---------------------------------------------------------------------------------- (c) two segments


def _run_layers(lm, layers, h, pos, past=None):
    """What LlamaModel.forward does per layer: causal mask + rotary from the model, then the layers."""
    mask = compat.create_causal_mask(lm.config, h, None, None, pos)
    pe = lm.rotary_emb(h, position_ids=pos)
    for layer in layers:
        h = layer(
            h,
            attention_mask=mask,
            position_embeddings=pe,
            position_ids=pos,
            **compat.cache_kwargs(past),
            use_cache=past is not None,
        )
    return h


@pytest.mark.parametrize("n1,n2,k", [(50, 20, 2), (64, 9, 1), (30, 30, 3)])
def test_two_segment_prefill(llava, n1, n2, k):
    cfg, model = llava
    lm = model.model.language_model
    L = cfg.text_config.num_hidden_layers

    def run():
        h, pos = torch.randn(1, n1, 64), torch.arange(n1)[None]
        h = _run_layers(lm, lm.layers[:k], h, pos)
        keep = torch.randperm(n1)[:n2].sort().values  # pruning keeps original positions
        _run_layers(lm, lm.layers[k:], h[:, keep], pos[:, keep])

    assert_close(F.llm_prefill_flops(cfg.text_config, [n1] * k + [n2] * (L - k)), counted(run))


# ----------------------------------------------------------------------------------------- (d) decode


@pytest.mark.parametrize("n", [5, 40])
def test_decode_step_with_cache(llava, n):
    cfg, model = llava
    lm = model.model.language_model
    with torch.no_grad():
        past = compat.output_cache(lm(inputs_embeds=torch.randn(1, n, 64), use_cache=True))
    measured = counted(lambda: lm(inputs_embeds=torch.randn(1, 1, 64), **compat.cache_kwargs(past), use_cache=True))
    assert_close(F.llm_decode_flops(cfg.text_config, [n] * 4, 1), measured)
    # two more tokens (cache now n+1)
    measured2 = counted(
        lambda: [
            lm(inputs_embeds=torch.randn(1, 1, 64), **compat.cache_kwargs(past), use_cache=True) for _ in range(2)
        ]
    )
    assert_close(F.llm_decode_flops(cfg.text_config, [n + 1] * 4, 2), measured2)
    # decode_flops with one token == decoder_layer_flops(1, cache + 1) summed
    assert F.llm_decode_flops(cfg, [n] * 4, 1) == 4 * F.decoder_layer_flops(cfg, 1, n + 1)


def test_decode_with_pruned_cache(llava):
    """Layers 0..k-1 cached n1 tokens, layers k.. n2 tokens (a pruned prefill), then 3 decode steps."""
    cfg, model = llava
    lm = model.model.language_model
    n1, n2, k = 48, 12, 2
    cache = compat.new_dynamic_cache(lm.config)
    with torch.no_grad():
        h, pos = torch.randn(1, n1, 64), torch.arange(n1)[None]
        h = _run_layers(lm, lm.layers[:k], h, pos, past=cache)
        keep = torch.arange(n1 - n2, n1)
        _run_layers(lm, lm.layers[k:], h[:, keep], pos[:, keep], past=cache)
    assert [cache.get_seq_length(i) for i in range(4)] == [n1] * k + [n2] * (4 - k)

    def decode():
        for step in range(3):
            h, p = torch.randn(1, 1, 64), torch.tensor([[n1 + step]])
            pe = lm.rotary_emb(h, position_ids=p)
            for layer in lm.layers:  # one query attends to every cached key: no mask needed
                h = layer(
                    h,
                    attention_mask=None,
                    position_embeddings=pe,
                    position_ids=p,
                    **compat.cache_kwargs(cache),
                    use_cache=True,
                )

    assert_close(F.llm_decode_flops(cfg, [n1] * k + [n2] * (4 - k), 3), counted(decode))


# --------------------------------------------------------------------------------------- (e) LLaVA-NeXT


def test_llava_next_base_plus_crops():
    cfg = LlavaNextConfig(
        vision_config=_clip(),
        text_config=_llama(),
        image_token_id=IMG,
        image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]],
    )
    model = _build(LlavaNextForConditionalGeneration, cfg)
    image_sizes = torch.tensor([[50, 60]])
    num_patches = compat.image_size_to_num_patches("llava_next")([50, 60], cfg.image_grid_pinpoints, cfg.vision_config.image_size)
    assert num_patches == 5  # base + 2x2 crops
    pv = torch.randn(1, num_patches, 3, 32, 32)
    per_input = F.vision_tokens_per_input(cfg)

    measured = counted(lambda: model.model.get_image_features(pixel_values=pv, image_sizes=image_sizes))
    assert_close(F.vision_flops(cfg, num_patches) + F.projector_flops(cfg, num_patches * per_input), measured)
    assert_close(F.vision_flops(cfg, num_patches), measured - F.projector_flops(cfg, num_patches * per_input))

    with torch.no_grad():
        n_img = sum(
            f.shape[0]
            for f in model.model.get_image_features(pixel_values=pv, image_sizes=image_sizes).pooler_output
        )
    ids = torch.tensor([[1, 2] + [IMG] * n_img + [3, 4, 5]])
    n = ids.shape[1]
    measured = counted(lambda: model(input_ids=ids, pixel_values=pv, image_sizes=image_sizes))
    b = F.model_prefill_flops(cfg, [n] * 4, num_patches, num_patches * per_input, n)
    assert_close(b.total, measured)


# ------------------------------------------------------------------------------------ (f) OneVision, SigLIP


def test_llava_onevision_full_forward():
    cfg = LlavaOnevisionConfig(
        vision_config=_siglip(vision_use_head=False),
        text_config=_qwen2(),
        image_token_id=IMG,
        video_token_id=IMG - 1,
        image_grid_pinpoints=[[32, 32], [32, 64], [64, 32], [64, 64]],
    )
    assert cfg.vision_feature_layer == -1 and cfg.vision_feature_select_strategy == "full"
    model = _build(LlavaOnevisionForConditionalGeneration, cfg)
    image_sizes = torch.tensor([[30, 62]])
    num_patches = compat.image_size_to_num_patches("llava_next")([30, 62], cfg.image_grid_pinpoints, cfg.vision_config.image_size)
    pv = torch.randn(1, num_patches, 3, 32, 32)
    per_input = F.vision_tokens_per_input(cfg)
    assert per_input == 64  # SigLIP: no CLS, "full" keeps every patch

    measured = counted(lambda: model.model.get_image_features(pixel_values=pv, image_sizes=image_sizes))
    assert_close(F.vision_flops(cfg, num_patches) + F.projector_flops(cfg, num_patches * per_input), measured)

    with torch.no_grad():
        n_img = sum(
            f.shape[0]
            for f in model.model.get_image_features(pixel_values=pv, image_sizes=image_sizes).pooler_output
        )
    ids = torch.tensor([[1, 2] + [IMG] * n_img + [3, 4, 5]])
    n = ids.shape[1]
    measured = counted(lambda: model(input_ids=ids, pixel_values=pv, image_sizes=image_sizes))
    assert_close(F.model_prefill_flops(cfg, [n] * 3, num_patches, num_patches * per_input, n).total, measured)


@pytest.mark.parametrize("use_head", [True, False])
def test_siglip_tower_with_and_without_head(use_head):
    vc = _siglip(vision_use_head=use_head)
    model = _build(SiglipVisionModel, vc)
    assert_close(F.vision_flops(vc, 3), counted(lambda: model(pixel_values=torch.randn(3, 3, 32, 32))))


# ------------------------------------------------------------------------------------------- (f) Qwen-VL

_QWEN_TOKENS = dict(
    image_token_id=290, video_token_id=291, vision_start_token_id=292, vision_end_token_id=293
)


def _qwen_text():
    return dict(
        bos_token_id=1,
        eos_token_id=2,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=300,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
    )


def _qwen_ids(grid, merge=2):
    ids = [1, 2]
    for t, h, w in grid:
        ids += [292] + [290] * (t * h * w // merge**2) + [293]
    return torch.tensor([ids + [3, 4]])


def _check_qwen(cfg, cls, grid, video_grid):
    model = _build(cls, cfg)
    vc = cfg.vision_config
    patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2

    # full forward with images
    pv = torch.randn(sum(t * h * w for t, h, w in grid), patch_dim)
    ids = _qwen_ids(grid)
    n = ids.shape[1]
    n_img = int((ids == 290).sum())
    types = (ids == 290).int()  # text 0, image 1 (what the processor returns as mm_token_type_ids)
    measured = counted(
        lambda: model(
            input_ids=ids, pixel_values=pv, image_grid_thw=torch.tensor(grid), mm_token_type_ids=types
        )
    )
    b = F.model_prefill_flops(cfg, [n] * 2, len(grid), n_img, n, grid_thw=grid)
    assert_close(b.total, measured)

    # the ViT alone on a video-like grid (t > 1: attention per frame)
    pv = torch.randn(sum(t * h * w for t, h, w in video_grid), patch_dim)
    n_merged = sum(t * h * w for t, h, w in video_grid) // vc.spatial_merge_size**2
    measured = counted(lambda: model.model.visual(pv, grid_thw=torch.tensor(video_grid)))
    assert_close(F.vision_flops(cfg, grid_thw=video_grid) + F.projector_flops(cfg, n_merged), measured)


def test_qwen2_vl():
    cfg = Qwen2VLConfig(
        vision_config=dict(
            depth=2,
            embed_dim=32,
            hidden_size=64,
            num_heads=4,
            mlp_ratio=2,
            patch_size=4,
            spatial_merge_size=2,
        ),
        text_config=_qwen_text(),
        **_QWEN_TOKENS,
    )
    _check_qwen(
        cfg, Qwen2VLForConditionalGeneration, grid=[[1, 4, 6], [1, 8, 4]], video_grid=[[3, 4, 4], [1, 2, 6]]
    )


def test_qwen2_5_vl_window_attention():
    cfg = Qwen2_5_VLConfig(
        vision_config=dict(
            depth=4,
            hidden_size=32,
            intermediate_size=48,
            num_heads=4,
            out_hidden_size=64,
            patch_size=4,
            spatial_merge_size=2,
            window_size=16,  # 2x2 merged units per window
            fullatt_block_indexes=[1, 3],
        ),
        text_config=_qwen_text(),
        **_QWEN_TOKENS,
    )
    # 10x6 patches -> 5x3 merged -> windows of 2x2, 2x1, 2x2, 2x1, 1x2, 1x1 merged units
    assert sorted(F._qwen_window_lengths(10, 6, cfg.vision_config)) == sorted([16, 8, 16, 8, 8, 4])
    _check_qwen(
        cfg,
        Qwen2_5_VLForConditionalGeneration,
        grid=[[1, 10, 6], [1, 4, 4]],
        video_grid=[[2, 8, 8], [1, 6, 10]],
    )
    # window attention is cheaper than full attention
    full = Qwen2_5_VLConfig(
        vision_config={**cfg.vision_config.to_dict(), "fullatt_block_indexes": [0, 1, 2, 3]},
        text_config=_qwen_text(),
    )
    assert F.vision_flops(cfg, grid_thw=[[1, 16, 16]]) < F.vision_flops(full, grid_thw=[[1, 16, 16]])


def test_qwen3_vl_deepstack():
    text = _qwen_text()
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2],
                               "mrope_interleaved": True}
    cfg = Qwen3VLConfig(
        vision_config=dict(
            depth=3,
            hidden_size=32,
            intermediate_size=48,
            num_heads=4,
            out_hidden_size=64,
            patch_size=4,
            spatial_merge_size=2,
            num_position_embeddings=16,
            deepstack_visual_indexes=[0, 1],
        ),
        text_config={**text, "head_dim": 16},
        **_QWEN_TOKENS,
    )
    _check_qwen(cfg, Qwen3VLForConditionalGeneration, grid=[[1, 4, 6], [1, 8, 4]], video_grid=[[2, 4, 4]])
    # the two deepstack mergers cost as much as the main one each
    vc = cfg.vision_config
    width = vc.hidden_size * 4
    assert F.projector_flops(cfg, 10) == 3 * (2 * 10 * width * width + 2 * 10 * width * vc.out_hidden_size)


# ----------------------------------------------------------------------------------- misc / formulas


def test_two_matrix_ffn_phi():
    cfg = PhiConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=300
    )
    model = _build(PhiModel, cfg)
    measured = counted(lambda: model(inputs_embeds=torch.randn(1, 21, 64)))
    assert_close(F.llm_prefill_flops(cfg, [21, 21]), measured)


def test_decoder_layer_closed_form():
    cfg = _llama()  # d=64, 4 heads of 16, 2 kv heads, m=128, gated
    n, k = 10, 25
    d, hd, kv = 64, 16, 2
    expected = (
        2 * n * d * d + 2 * 2 * n * d * kv * hd + 2 * n * d * d + 4 * n * k * 4 * hd + 3 * 2 * n * d * 128
    )
    assert F.decoder_layer_flops(cfg, n, k) == expected
    assert F.decoder_layer_flops(cfg, n) == F.decoder_layer_flops(cfg, n, n)


def test_literature_formula_hand_computed():
    cfg = LlamaConfig(
        hidden_size=4, intermediate_size=8, num_hidden_layers=2, num_attention_heads=2, vocab_size=10
    )
    # n=3: 4*3*16 + 2*9*4 + 2*3*4*8 = 192 + 72 + 192 = 456 ; n=2: 128 + 32 + 128 = 288
    assert F.literature_prefill_flops(cfg, [3, 2]) == 744
    # for MHA + 2-matrix FFN it is exactly half of the FLOPs convention (multiply-adds)
    phi = PhiConfig(
        hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, vocab_size=300
    )
    assert 2 * F.literature_prefill_flops(phi, [30, 12]) == F.llm_prefill_flops(phi, [30, 12])


def test_breakdown_arithmetic(llava):
    cfg, _ = llava
    a = F.model_prefill_flops(cfg, [70] * 4, 1, 64, 1)
    b = F.model_prefill_flops(cfg, [70, 70, 20, 20], 1, 64, 1)
    s = a + b
    assert s.total == a.total + b.total and s.llm == a.llm + b.llm
    assert sum([a, b]) == s
    assert b.llm < a.llm and b.vision == a.vision


def test_errors(llava):
    cfg, _ = llava
    with pytest.raises(ValueError, match="supported"):
        F.vision_flops(PhiConfig(), 1)
    with pytest.raises(ValueError, match="llava"):
        F.projector_flops(LlamaConfig(), 1)
    with pytest.raises(ValueError, match="layers"):
        F.llm_prefill_flops(cfg, [10, 10])
    with pytest.raises(ValueError, match="grid_thw"):
        F.vision_flops(Qwen2VLConfig(), 1)
    with pytest.raises(ValueError, match="grid_thw"):
        F.vision_flops(cfg, 1, grid_thw=[[1, 2, 2]])
