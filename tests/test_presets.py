"""Shape presets: real shapes (checked by parameter count), inputs through the real processors, and
random-weight construction directly in the target dtype."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from vtprune.bench.flops import vision_tokens_per_input
from vtprune.bench.memory import measure_peak_memory
from vtprune.bench.presets import build_preset, list_presets, load_preset, preset_inputs

# published parameter counts (billions) of the reference checkpoints
PUBLISHED = {
    "llava-1.5-7b": 7.06, "llava-1.5-13b": 13.35, "llava-next-7b": 7.06, "llava-onevision-0.5b": 0.89,
    "llava-onevision-7b": 8.03, "qwen2-vl-2b": 2.21, "qwen2-vl-7b": 8.29, "qwen2.5-vl-3b": 3.75,
    "qwen2.5-vl-7b": 8.29, "llava-cpu-0.5b": 0.46, "llava-onevision-cpu-0.5b": 0.58,
}
#: image tokens of the preset's benchmark input (LLaVA-1.5 layout: 24x24 patches; Qwen: 48x48 patches / 2x2)
IMAGE_TOKENS = {"llava-1.5-7b": 576, "llava-1.5-13b": 576, "llava-cpu-0.5b": 576, "qwen2-vl-2b": 576,
                "qwen2-vl-7b": 576, "qwen2.5-vl-3b": 576, "qwen2.5-vl-7b": 576}


def test_every_listed_model_has_a_preset():
    assert set(list_presets()) == set(PUBLISHED)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_shapes(name):
    model, processor = build_preset(name, device="meta")
    preset = load_preset(name)
    params = sum(p.numel() for p in model.parameters()) / 1e9
    assert params == pytest.approx(PUBLISHED[name], rel=0.01)
    assert next(model.parameters()).dtype == getattr(torch, preset.dtype)
    assert model.config._attn_implementation == "sdpa"
    inputs = preset_inputs(preset, processor)
    image_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    if name in IMAGE_TOKENS:
        assert image_tokens == IMAGE_TOKENS[name]
    assert image_tokens > 500
    if preset.family == "llava":
        assert vision_tokens_per_input(model.config) == 576


def test_unknown_preset_names_the_available_ones():
    from vtprune.errors import VTPruneError

    with pytest.raises(VTPruneError, match="llava-cpu-0.5b"):
        load_preset("llava-9000b")


def test_random_weights_are_built_in_the_target_dtype_without_a_float32_copy():
    base = load_preset("llava-cpu-0.5b")
    config = {**base.config, "text_config": {**base.config["text_config"], "num_hidden_layers": 6},
              "vision_config": {**base.config["vision_config"], "num_hidden_layers": 2}}
    preset = dataclasses.replace(base, config=config)
    (model, _), memory = measure_peak_memory(lambda: build_preset(preset, dtype="bfloat16"))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert weights > 250 * 2**20
    if memory.kind == "cpu-peak-rss":
        # a float32 copy first would peak at >= 3x the bfloat16 weights (fp32 + bf16)
        assert memory.delta_bytes < 1.6 * weights, (memory.delta_bytes, weights)
    assert all(torch.isfinite(p).all() and p.float().std() > 0 for n, p in model.named_parameters()
               if n.endswith("q_proj.weight"))


def test_preset_forward_runs_pruned():
    import vtprune

    base = load_preset("llava-cpu-0.5b")
    config = {**base.config, "text_config": {**base.config["text_config"], "num_hidden_layers": 2,
                                             "hidden_size": 64, "intermediate_size": 128,
                                             "num_attention_heads": 4, "num_key_value_heads": 4},
              "vision_config": {**base.config["vision_config"], "num_hidden_layers": 2, "hidden_size": 64,
                                "intermediate_size": 128, "num_attention_heads": 4}}
    preset = dataclasses.replace(base, config=config)
    model, processor = build_preset(preset, dtype="float32")
    inputs = preset_inputs(preset, processor)
    with vtprune.pruned(model, "divprune", budget=64), torch.inference_mode():
        model(**inputs)
        stats = vtprune.stats(model).samples[0]
    assert stats.visual_in == 576 and stats.equivalent_tokens == 64


#: video presets: (frames, visual tokens of their video input) -- OneVision 196 per 384 px frame + 1 newline;
#: Qwen2.5-VL at the model card's max_pixels 360*420: 336x420 frames, 16 temporal groups x 12x15 merged tokens
VIDEO_TOKENS = {"llava-onevision-0.5b": (32, 32 * 196 + 1), "llava-onevision-7b": (32, 32 * 196 + 1),
                "llava-onevision-cpu-0.5b": (16, 16 * 196 + 1), "qwen2.5-vl-7b": (32, 16 * 12 * 15),
                "qwen2.5-vl-3b": (32, 16 * 12 * 15)}


@pytest.mark.parametrize("name", sorted(VIDEO_TOKENS))
def test_video_preset_shapes(name):
    pytest.importorskip("torchvision")
    from vtprune.bench.presets import video_frames_default

    model, processor = build_preset(name, device="meta")
    frames, tokens = VIDEO_TOKENS[name]
    assert video_frames_default(name) == frames
    inputs = preset_inputs(name, processor, video_frames=frames)
    assert int((inputs["input_ids"] == model.config.video_token_id).sum()) == tokens
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 0
    if name.startswith("qwen"):
        assert inputs["video_grid_thw"].tolist() == [[16, 24, 30]]
        assert inputs["second_per_grid_ts"].tolist() == [2.0]  # 2 frames per group at 1 fps
    else:
        assert inputs["pixel_values_videos"].shape == (1, frames, 3, 384, 384)
    # --video-frames overrides the count
    fewer = preset_inputs(name, processor, video_frames=8)
    per_frame = (tokens - (0 if name.startswith("qwen") else 1)) // frames
    assert int((fewer["input_ids"] == model.config.video_token_id).sum()) == \
        8 * per_frame + (0 if name.startswith("qwen") else 1)


def test_image_only_preset_refuses_video():
    from vtprune.bench.presets import video_frames_default
    from vtprune.errors import VTPruneError

    with pytest.raises(VTPruneError, match="no video shape; video presets: .*llava-onevision-0.5b"):
        video_frames_default("llava-1.5-7b")
