"""Tests for vtprune.testing: tiny offline VLMs for every supported family."""

from __future__ import annotations

import os
import pickle
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from vtprune.testing import FAMILIES, tiny_image, tiny_inputs, tiny_vlm

# Placeholder tokens expected for the default tiny_image() (48x64), see the module docstring.
DEFAULT_IMAGE_TOKENS = {
    "llava": 64,
    "llava_next": 268,
    "llava_onevision": 268,
    "qwen2_vl": 20,
    "qwen2_5_vl": 20,
    "qwen3_vl": 20,
}

MODEL_CLASSES = {
    "llava": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
    "llava_onevision": "LlavaOnevisionForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
}


@pytest.fixture(scope="module", params=FAMILIES)
def family_vlm(request):
    model, processor = tiny_vlm(request.param)
    return request.param, model, processor


def _image_token_id(model) -> int:
    return model.config.image_token_id


def _spy_image_features(model):
    """Record the per-image feature lengths the model itself produces (what its forward consumes)."""
    inner = model.model
    original = inner.get_image_features
    lengths: list[int] = []

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        lengths.extend(int(f.shape[0]) for f in out.pooler_output)
        return out

    inner.get_image_features = spy
    return lengths, lambda: delattr(inner, "get_image_features")


def test_families_exported():
    for fam in ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "llava_onevision"):
        assert fam in FAMILIES
    import transformers

    assert ("qwen3_vl" in FAMILIES) == hasattr(transformers, "Qwen3VLForConditionalGeneration")
    assert isinstance(FAMILIES, tuple)


def test_unknown_family_lists_supported():
    with pytest.raises(ValueError) as excinfo:
        tiny_vlm("not_a_vlm")
    message = str(excinfo.value)
    assert "not_a_vlm" in message
    for fam in FAMILIES:
        assert fam in message


def test_model_properties(family_vlm):
    fam, model, processor = family_vlm
    assert type(model).__name__ == MODEL_CLASSES[fam]
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.config.get_text_config()._attn_implementation == "sdpa"
    assert model.config.vision_config._attn_implementation == "sdpa"
    text = model.config.get_text_config()
    assert (text.hidden_size, text.num_hidden_layers) == (64, 4)
    assert (text.num_attention_heads, text.num_key_value_heads) == (4, 2)
    assert text.vocab_size == len(processor.tokenizer)
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    tok = processor.tokenizer
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert model.generation_config.pad_token_id == tok.pad_token_id is not None
    assert tok.convert_ids_to_tokens(_image_token_id(model)) == processor.image_token
    # the processor is the family's real class (not a subclass) and survives pickling
    assert type(processor).__module__.startswith("transformers.models.")
    clone = pickle.loads(pickle.dumps(processor))
    assert clone.tokenizer.get_vocab() == tok.get_vocab()


@pytest.mark.parametrize("second", ["text", "image"])
def test_end_to_end(family_vlm, second):
    fam, model, processor = family_vlm
    images = [tiny_image(1, size=(40, 72)), None if second == "text" else tiny_image(2, size=(64, 48))]
    prompts = ["Describe the image in detail, please.", "Hi"]
    inputs = tiny_inputs(processor, images, prompts)
    ids = inputs["input_ids"]
    assert ids.shape[0] == 2
    assert bool(inputs["attention_mask"][:, -1].all())  # left padding
    assert not bool(inputs["attention_mask"].all())  # prompts differ in length

    n_placeholders = (ids == _image_token_id(model)).sum(dim=1).tolist()
    assert n_placeholders[0] > 0
    assert (n_placeholders[1] == 0) == (second == "text")

    lengths, restore = _spy_image_features(model)
    try:
        with torch.no_grad():
            out = model(**inputs)
    finally:
        restore()
    assert lengths == [n for n in n_placeholders if n > 0]
    assert out.logits.shape[:2] == ids.shape
    assert out.logits.shape[-1] == len(processor.tokenizer)
    assert torch.isfinite(out.logits).all()

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        generated = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert generated.shape == (2, ids.shape[1] + 4)
    assert torch.equal(generated[:, : ids.shape[1]], ids)


def test_default_visual_token_count(family_vlm):
    fam, model, processor = family_vlm
    inputs = tiny_inputs(processor, [tiny_image()], ["What is this?"])
    assert int((inputs["input_ids"] == _image_token_id(model)).sum()) == DEFAULT_IMAGE_TOKENS[fam]


def test_text_only_batch_and_right_padding(family_vlm):
    fam, model, processor = family_vlm
    inputs = tiny_inputs(processor, None, ["Hi", "What color is the box?"], padding_side="right")
    assert bool(inputs["attention_mask"][:, 0].all())
    assert "pixel_values" not in inputs
    with torch.no_grad():
        logits = model(**inputs).logits
    assert torch.isfinite(logits).all()
    assert processor.tokenizer.padding_side == "right"  # tiny_inputs does not mutate the processor


def test_chat_template_and_padding_side(family_vlm):
    fam, model, processor = family_vlm
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.count(processor.image_token) == 1
    assert "What is this?" in text

    tok = processor.tokenizer
    assert tok.decode(tok("Hello world, 123 ü!")["input_ids"]) == "Hello world, 123 ü!"
    tok.padding_side = "left"
    try:
        enc = tok(["a", "a b c d"], padding=True)
        assert enc["attention_mask"][0][0] == 0 and enc["attention_mask"][0][-1] == 1
    finally:
        tok.padding_side = "right"


@pytest.mark.parametrize("family", FAMILIES)
def test_seeded_weights(family):
    a, _ = tiny_vlm(family, seed=0)
    b, _ = tiny_vlm(family, seed=0)
    c, _ = tiny_vlm(family, seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys() == sc.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_config_overrides():
    model, processor = tiny_vlm("llava", text_config={"num_hidden_layers": 2}, vision_feature_layer=-1)
    assert model.config.text_config.num_hidden_layers == 2
    assert model.config.text_config.hidden_size == 64  # merged, not replaced
    assert model.config.vision_feature_layer == -1
    # the processor follows the overridden vision config
    model, processor = tiny_vlm(
        "llava", vision_config={"image_size": 48}, vision_feature_select_strategy="full"
    )
    inputs = tiny_inputs(processor, [tiny_image()], ["x"])
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 12 * 12 + 1
    with torch.no_grad():
        model(**inputs)


def test_qwen2_5_window_attention_is_nontrivial():
    if "qwen2_5_vl" not in FAMILIES:
        pytest.skip("Qwen2.5-VL not available")
    model, processor = tiny_vlm("qwen2_5_vl")
    vc = model.config.vision_config
    _, grid_h, grid_w = tiny_inputs(processor, [tiny_image()], ["x"])["image_grid_thw"][0].tolist()
    window = vc.window_size // vc.spatial_merge_size // vc.patch_size  # in merged tokens
    assert window >= 2
    assert grid_h // vc.spatial_merge_size > window and grid_w // vc.spatial_merge_size > window
    assert 0 < len(vc.fullatt_block_indexes) < vc.depth


def test_tiny_inputs_single_prompt():
    model, processor = tiny_vlm(FAMILIES[0])
    inputs = tiny_inputs(processor, tiny_image(), "What is this?")
    assert inputs["input_ids"].shape[0] == 1
    with pytest.raises(ValueError):
        tiny_inputs(processor, [tiny_image()], ["a", "b"])


def test_tiny_image_deterministic():
    a, b, c = tiny_image(3, size=(20, 30)), tiny_image(3, size=(20, 30)), tiny_image(4, size=(20, 30))
    assert a.mode == "RGB" and a.size == (30, 20)
    assert a.tobytes() == b.tobytes()
    assert a.tobytes() != c.tobytes()
