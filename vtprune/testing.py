"""Tiny, offline, randomly initialised vision-language models for tests and examples.

vtprune hooks into the real HuggingFace model classes (LLaVA, LLaVA-NeXT, LLaVA-OneVision,
Qwen2-VL, Qwen2.5-VL, Qwen3-VL). This module lets tests and users exercise the *whole* path --
chat template, processor placeholder expansion, vision tower, projector, language model,
``generate`` -- offline and in milliseconds, by building each family at toy size:

* the real ``transformers`` model class with a tiny config (text: hidden 64, 4 layers, 4 heads,
  2 KV heads; vision: hidden 32, 2-3 layers) and random weights seeded by ``seed`` (float32,
  ``eval()``, SDPA attention in every sub-model);
* a tokenizer built in code (byte-level BPE over a few hundred entries, so any text round-trips)
  with the family's special tokens and a chat template in the family's style;
* the family's real image-processor and processor classes, configured to match the model.

Nothing is downloaded, read from the hub or written to disk.

Default visual tokens for ``tiny_image()`` (48x64): LLaVA 64, LLaVA-NeXT 268 (base 64 + 2x2
crops, unpadded, with newline tokens), LLaVA-OneVision 268, Qwen2-VL / Qwen2.5-VL 20 (4x5 merged
grid), Qwen3-VL 20.

Videos (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision) go through the families' real video processors
(they need torchvision; without it a video raises a clear error): ``tiny_video()`` (4 frames of 56x56)
gives Qwen2-VL / Qwen2.5-VL / Qwen3-VL 2 temporal groups of 4x4 tokens (32), LLaVA-OneVision 4 frames of
4x4 pooled tokens plus one newline (65). ``tiny_inputs(processor, None, prompt, videos=[clip])`` or the
processor itself (``processor(videos=[clip], text=...)``, chat items ``{"type": "video"}``).

Example::

    import torch
    from vtprune.testing import tiny_image, tiny_inputs, tiny_vlm

    model, processor = tiny_vlm("llava_next", seed=0)
    inputs = tiny_inputs(processor, [tiny_image(), None], ["Describe the image.", "Hi"])
    with torch.no_grad():
        logits = model(**inputs).logits
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
"""

from __future__ import annotations

import copy
import functools
import importlib.util
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from . import compat

__all__ = ["FAMILIES", "tiny_image", "tiny_inputs", "tiny_video", "tiny_vlm"]

# Family name -> (transformers.models submodule, model class, config class), in priority order.
_CLASSES = {
    "llava": ("llava", "LlavaForConditionalGeneration", "LlavaConfig"),
    "llava_next": ("llava_next", "LlavaNextForConditionalGeneration", "LlavaNextConfig"),
    "qwen2_vl": ("qwen2_vl", "Qwen2VLForConditionalGeneration", "Qwen2VLConfig"),
    "qwen2_5_vl": ("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLConfig"),
    "llava_onevision": ("llava_onevision", "LlavaOnevisionForConditionalGeneration", "LlavaOnevisionConfig"),
    "qwen3_vl": ("qwen3_vl", "Qwen3VLForConditionalGeneration", "Qwen3VLConfig"),
}


def _available_families() -> tuple[str, ...]:
    # find_spec locates the model sub-package without importing any modeling code
    return tuple(
        fam for fam, (module, _, _) in _CLASSES.items() if _has_module(f"transformers.models.{module}")
    )


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:
        return False


FAMILIES: tuple[str, ...] = _available_families()
"""Families :func:`tiny_vlm` can build with the installed transformers."""

# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------

# One vocabulary for every family (each uses its own subset), so token ids are stable across families.
_SPECIAL_TOKENS = (
    "<unk>",
    "<s>",
    "</s>",
    "<pad>",
    "<image>",
    "<video>",
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

_LLAMA_SPECIAL = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
# Qwen tokenizers have no BOS token; the model config still uses <|endoftext|> as bos id.
_QWEN_SPECIAL = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": "<unk>"}

# Words that get whole-word BPE merges (bare and with a leading space) so typical prompts become a
# handful of tokens; anything else falls back to byte tokens.
_WORDS = (
    "USER ASSISTANT INST user assistant system You you are a an the helpful image images picture "
    "photo video describe Describe detail details what What is in this of and to it on with at for "
    "color red green blue yellow black white left right top bottom object objects how How many "
    "there The This A yes no Yes No answer Answer question short briefly word one two three Hi "
    "Hello hello world see show shown box square"
).split()


def _bpe_segment(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply BPE merges (lowest rank first) to a list of symbols."""
    while len(symbols) > 1:
        best, best_rank = -1, len(ranks)
        for i in range(len(symbols) - 1):
            rank = ranks.get((symbols[i], symbols[i + 1]))
            if rank is not None and rank < best_rank:
                best, best_rank = i, rank
        if best < 0:
            break
        pair = (symbols[best], symbols[best + 1])
        merged, i = [], 0
        while i < len(symbols):
            if i < len(symbols) - 1 and (symbols[i], symbols[i + 1]) == pair:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    """Serialised byte-level BPE backend: 256 bytes + word merges + special tokens (built once)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in _WORDS:
        for text in (word, " " + word):
            form = byte_level.pre_tokenize_str(text)[0][0]
            seg = _bpe_segment(list(form), ranks)
            while len(seg) > 1:  # join the current segmentation left to right until one token
                pair = (seg[0], seg[1])
                ranks[pair] = len(merges)
                merges.append(pair)
                vocab.setdefault(pair[0] + pair[1], len(vocab))
                seg = _bpe_segment(list(form), ranks)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in _SPECIAL_TOKENS])
    return tok.to_str()


def _make_tokenizer(special: dict[str, str], chat_template: str):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        model_max_length=4096,
        padding_side="right",
        **special,
    )
    tokenizer.chat_template = chat_template
    return tokenizer


# --------------------------------------------------------------------------------------------------
# Chat templates (simplified, in each family's style). Content is a string or a list of
# {"type": "image"} / {"type": "video"} / {"type": "text", "text": ...} items.
# --------------------------------------------------------------------------------------------------

_TEXT_ITEMS = "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
_LLAVA_IMAGE_ITEMS = "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<image>\n' }}{% endif %}{% endfor %}"

# LLaVA-1.5 (Vicuna style): "<s>USER: <image>\nWhat is this? ASSISTANT:"
_LLAVA_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}" + _TEXT_ITEMS + "{% endif %}"
    "{{ ' ' }}"
    "{% else %}"
    "{{ message['role'].upper() + ': ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}" + _LLAVA_IMAGE_ITEMS + _TEXT_ITEMS + "{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ ' ' }}{% endif %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# LLaVA-NeXT (Mistral style): "<s>[INST] <image>\nWhat is this? [/INST]"
_LLAVA_NEXT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' }}{% elif message['role'] == 'assistant' %}{{ ' ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}" + _LLAVA_IMAGE_ITEMS + _TEXT_ITEMS + "{% endif %}"
    "{% if message['role'] == 'user' %}{{ ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ eos_token }}"
    "{% else %}{{ '\n' }}{% endif %}"
    "{% endfor %}"
)

# LLaVA-OneVision (ChatML with <image>): "<|im_start|>user\n<image>\nWhat?<|im_end|>\n<|im_start|>assistant\n"
_ONEVISION_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif item['type'] == 'video' %}{{ '<video>\n' }}{% endif %}{% endfor %}" + _TEXT_ITEMS + "{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _qwen_template(default_system: bool) -> str:
    """Qwen ChatML: "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What?<|im_end|>..."."""
    system = (
        "{% if messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
        "{% endif %}"
    )
    return (
        (system if default_system else "") + "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' }}"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}"
        "{% for item in message['content'] %}"
        "{% if item['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
        "{% elif item['type'] == 'video' %}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
        "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
        "{% endfor %}"
        "{% endif %}"
        "{{ '<|im_end|>\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )


# --------------------------------------------------------------------------------------------------
# Default tiny configs
# --------------------------------------------------------------------------------------------------

_TEXT_SIZES = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,  # GQA
    "max_position_embeddings": 4096,
}

# CLIP tower of LLaVA / LLaVA-NeXT: 32x32 image, 4x4 patches -> 64 patch tokens + CLS.
_CLIP_VISION = {
    "model_type": "clip_vision_model",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 4,
    "projection_dim": 32,
}

# AnyRes grids (height, width): a non-square image gets a base view + 2 (1x2 / 2x1) or 4 (2x2) crops.
_GRID_PINPOINTS = [[32, 64], [64, 32], [64, 64]]

# Qwen2-VL / 2.5-VL: patch 7 (real: 14), merge 2 -> one merged token per 14x14 pixels;
# 56x56 .. 112x112 pixels -> 16 .. 64 merged tokens.
_QWEN2_PATCH, _QWEN2_MIN_PIXELS, _QWEN2_MAX_PIXELS = 7, 56 * 56, 112 * 112
# Qwen3-VL: patch 8 (real: 16), merge 2 -> one merged token per 16x16 pixels; 16 .. 64 tokens.
_QWEN3_PATCH, _QWEN3_MIN_PIXELS, _QWEN3_MAX_PIXELS = 8, 64 * 64, 128 * 128


def _default_config(family: str) -> dict[str, Any]:
    """Tiny config kwargs for ``family`` (without vocab size and token ids)."""
    if family in ("llava", "llava_next"):
        text = {
            "model_type": "llama",
            **_TEXT_SIZES,
            "rms_norm_eps": 1e-5,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        }
        config = {
            "vision_config": dict(_CLIP_VISION),
            "text_config": text,
            "vision_feature_layer": -2,
            "vision_feature_select_strategy": "default",
            "projector_hidden_act": "gelu",
            "image_seq_length": 64,
            "tie_word_embeddings": False,
        }
        if family == "llava_next":
            config["image_grid_pinpoints"] = copy.deepcopy(_GRID_PINPOINTS)
        return config
    if family == "llava_onevision":
        return {
            "vision_config": {
                "model_type": "siglip_vision_model",
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 3,
                "num_attention_heads": 2,
                "image_size": 32,
                "patch_size": 4,
                "vision_use_head": False,
            },
            "text_config": {
                "model_type": "qwen2",
                **_TEXT_SIZES,
                "rms_norm_eps": 1e-6,
                "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
            },
            "vision_feature_layer": -1,
            "vision_feature_select_strategy": "full",
            "vision_aspect_ratio": "anyres_max_9",
            "image_grid_pinpoints": copy.deepcopy(_GRID_PINPOINTS),
            "tie_word_embeddings": False,
        }
    text = {**_TEXT_SIZES, "rms_norm_eps": 1e-6}
    head_dim = _TEXT_SIZES["hidden_size"] // _TEXT_SIZES["num_attention_heads"]  # 16 -> 8 rotary freqs
    if family == "qwen2_vl":
        text["rope_parameters"] = {
            "rope_type": "default",
            "rope_theta": 1000000.0,
            "mrope_section": [2, 3, 3],
        }
        vision = {
            "depth": 2,
            "embed_dim": 32,
            "hidden_size": _TEXT_SIZES["hidden_size"],  # merger output = LLM width
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": _QWEN2_PATCH,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        }
    elif family == "qwen2_5_vl":
        text["rope_parameters"] = {
            "rope_type": "default",
            "rope_theta": 1000000.0,
            "mrope_section": [2, 3, 3],
        }
        vision = {
            "depth": 3,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": _TEXT_SIZES["hidden_size"],
            "patch_size": _QWEN2_PATCH,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            # 28 px windows = 2x2 merged tokens: an image spans several windows, so the window
            # permutation is non-trivial; the last block attends globally (like 7/15/23/31 of 32).
            "window_size": 2 * 2 * _QWEN2_PATCH,
            "fullatt_block_indexes": [2],
            "tokens_per_second": 2,
        }
    elif family == "qwen3_vl":
        text["head_dim"] = head_dim
        text["rope_parameters"] = {
            "rope_type": "default",
            "rope_theta": 5000000.0,
            "mrope_section": [4, 2, 2],
            "mrope_interleaved": True,
        }
        vision = {
            "depth": 3,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": _TEXT_SIZES["hidden_size"],
            "patch_size": _QWEN3_PATCH,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "num_position_embeddings": 64,  # 8x8 learned grid, interpolated
            "deepstack_visual_indexes": [0, 1],
        }
    else:  # pragma: no cover - guarded by tiny_vlm
        raise ValueError(family)
    return {"text_config": text, "vision_config": vision, "tie_word_embeddings": False}


def _deep_merge(base: dict, overrides: dict) -> dict:
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


# --------------------------------------------------------------------------------------------------
# Processors
# --------------------------------------------------------------------------------------------------


def _image_processor(name: str, **kwargs):
    """The PIL backend of the family's image processor (needs no torchvision; deterministic)."""
    return compat.image_processor_class(name)(**kwargs)


class _NoVideoProcessorError(NotImplementedError):
    pass


@functools.cache
def _stub_video_processor_class():
    class TinyNoVideoProcessor(compat.video_processor_mixin()):
        """Stand-in for a video processor that cannot be built (no torchvision): carries the real class's
        attributes, refuses videos, and saves itself as the real class (``stands_for``), so that a saved
        processor never names this stub and loads with plain transformers where torchvision is installed."""

        stands_for: str = ""

        def preprocess(self, videos, **kwargs):
            raise _NoVideoProcessorError(
                f"video inputs need torchvision (the real {self.stands_for or 'video processor'} could not be built)"
                "; pip install torchvision"
            )

        def to_dict(self):
            if not self.stands_for:
                raise ValueError("this stand-in video processor does not know which class it replaces; "
                                 "build it with vtprune.testing._video_processor(class_name, ...)")
            out = super().to_dict()
            out.pop("stands_for", None)
            out["video_processor_type"] = self.stands_for
            return out

    TinyNoVideoProcessor.__qualname__ = "TinyNoVideoProcessor"  # picklable via module __getattr__
    return TinyNoVideoProcessor


def __getattr__(name: str):
    if name == "TinyNoVideoProcessor":
        return _stub_video_processor_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _video_processor(class_name: str, **attrs):
    """The family's real video processor when it can be built (it needs torchvision), else a stand-in.

    Qwen and OneVision processors require a ``video_processor``. Without torchvision the real classes are
    import placeholders, so a minimal ``VideoProcessorMixin`` carrying the same attributes (``merge_size``,
    ``patch_size``, ...) is used; it raises if videos are passed and saves itself under ``class_name``.
    """
    import transformers

    try:
        return getattr(transformers, class_name)(**attrs)
    except Exception:  # torchvision missing: the class is a placeholder that raises on use
        proc = _stub_video_processor_class()()
        for key, value in attrs.items():
            setattr(proc, key, value)
        proc.stands_for = class_name
        return proc


def _make_processor(processor_cls, **kwargs):
    """Instantiate the real ``processor_cls``; also accept the stub video processor if one is used.

    ``ProcessorMixin.__init__`` type-checks ``video_processor`` through the video auto-mapping,
    which is a placeholder without torchvision. For the stub, that single check is relaxed on the
    instance during ``__init__`` only; the processor stays an instance of the real class.
    """
    stub_cls = _stub_video_processor_class()
    if not isinstance(kwargs.get("video_processor"), stub_cls):
        return processor_cls(**kwargs)

    return compat.processor_accepting(processor_cls, "video_processor", stub_cls, **kwargs)


def _build_processor(family: str, tokenizer, config):
    """The family's real processor class, configured from the (possibly overridden) model config."""
    import transformers

    vc = config.vision_config
    template = tokenizer.chat_template
    if family in ("llava", "llava_next"):
        common = {
            "size": {"shortest_edge": vc.image_size},
            "crop_size": {"height": vc.image_size, "width": vc.image_size},
        }
        if family == "llava":
            image_processor = _image_processor("LlavaImageProcessor", **common)
            processor_cls = transformers.LlavaProcessor
        else:
            image_processor = _image_processor(
                "LlavaNextImageProcessor",
                image_grid_pinpoints=copy.deepcopy(config.image_grid_pinpoints),
                **common,
            )
            processor_cls = transformers.LlavaNextProcessor
        return processor_cls(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=vc.patch_size,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            num_additional_image_tokens=1,  # CLIP's CLS token
            chat_template=template,
        )
    if family == "llava_onevision":
        common = {
            "size": {"height": vc.image_size, "width": vc.image_size},
            "image_mean": [0.5, 0.5, 0.5],  # SigLIP normalisation
            "image_std": [0.5, 0.5, 0.5],
        }
        image_processor = _image_processor(
            "LlavaOnevisionImageProcessor",
            image_grid_pinpoints=copy.deepcopy(config.image_grid_pinpoints),
            **common,
        )
        return _make_processor(
            transformers.LlavaOnevisionProcessor,
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=_video_processor("LlavaOnevisionVideoProcessor", **common),
            num_image_tokens=(vc.image_size // vc.patch_size) ** 2,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            vision_aspect_ratio=config.vision_aspect_ratio,
            chat_template=template,
        )
    common = {
        "patch_size": vc.patch_size,
        "temporal_patch_size": vc.temporal_patch_size,
        "merge_size": vc.spatial_merge_size,
    }
    if family == "qwen3_vl":
        min_pixels, max_pixels = _QWEN3_MIN_PIXELS, _QWEN3_MAX_PIXELS
        common.update(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
        processor_cls, video_cls = transformers.Qwen3VLProcessor, "Qwen3VLVideoProcessor"
    else:
        min_pixels, max_pixels = _QWEN2_MIN_PIXELS, _QWEN2_MAX_PIXELS
        processor_cls = (
            transformers.Qwen2VLProcessor if family == "qwen2_vl" else transformers.Qwen2_5_VLProcessor
        )
        video_cls = "Qwen2VLVideoProcessor"
    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    return _make_processor(
        processor_cls,
        image_processor=_image_processor("Qwen2VLImageProcessor", size=size, **common),
        tokenizer=tokenizer,
        video_processor=_video_processor(video_cls, size=dict(size), **common),
        chat_template=template,
    )


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def tiny_vlm(family: str, seed: int = 0, **config_overrides):
    """Build a tiny randomly initialised ``(model, processor)`` pair for ``family``.

    ``family`` is one of :data:`FAMILIES`. Weights are drawn right after ``torch.manual_seed(seed)``,
    so equal seeds give identical models. ``config_overrides`` are applied on top of the tiny default
    config; dict values are merged into the corresponding (sub-)config dict, other values replace
    top-level keys, e.g. ``tiny_vlm("llava", text_config={"num_hidden_layers": 2},
    vision_feature_layer=-1)``. The processor is configured from the final model config.

    The model is float32, in ``eval()`` mode and uses SDPA attention in all sub-models; the processor
    is the family's real processor class around a locally built tokenizer (right padding by default;
    ``processor.tokenizer.padding_side`` is settable).
    """
    if family not in FAMILIES:
        raise ValueError(f"Unknown family {family!r}; supported families: {', '.join(FAMILIES)}")
    import transformers

    _, model_cls_name, config_cls_name = _CLASSES[family]
    if family in ("llava", "llava_next"):
        special, template = _LLAMA_SPECIAL, (_LLAVA_TEMPLATE if family == "llava" else _LLAVA_NEXT_TEMPLATE)
    elif family == "llava_onevision":
        special, template = _QWEN_SPECIAL, _ONEVISION_TEMPLATE
    else:
        special, template = _QWEN_SPECIAL, _qwen_template(default_system=family != "qwen3_vl")
    tokenizer = _make_tokenizer(special, template)
    token_id = tokenizer.convert_tokens_to_ids

    bos_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else token_id("<|endoftext|>")
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    special_ids = {"bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id}

    cfg = _default_config(family)
    cfg["text_config"].update(vocab_size=len(tokenizer), **special_ids)
    if family.startswith("llava"):
        cfg["image_token_id"] = token_id("<image>")
        if family == "llava_onevision":
            cfg["video_token_id"] = token_id("<video>")
    else:
        cfg.update(
            image_token_id=token_id("<|image_pad|>"),
            video_token_id=token_id("<|video_pad|>"),
            vision_start_token_id=token_id("<|vision_start|>"),
            vision_end_token_id=token_id("<|vision_end|>"),
        )
    cfg.update(special_ids)
    cfg = _deep_merge(cfg, config_overrides)

    config = getattr(transformers, config_cls_name)(**cfg)
    torch.manual_seed(seed)
    model = compat.model_from_config(getattr(transformers, model_cls_name), config, dtype=torch.float32)
    model.eval()

    generation_config = model.generation_config
    generation_config.bos_token_id = bos_id
    generation_config.eos_token_id = eos_id
    generation_config.pad_token_id = pad_id
    generation_config.do_sample = False

    processor = _build_processor(family, tokenizer, model.config)
    return model, processor


def tiny_image(seed: int = 0, size: tuple[int, int] = (48, 64)):
    """A deterministic RGB ``PIL.Image`` of ``size=(height, width)``: noise plus a few rectangles.

    The default is non-square on purpose (AnyRes crops with unpadding for LLaVA-NeXT/OneVision).
    """
    from PIL import Image

    height, width = (int(s) for s in size)
    if height < 1 or width < 1:
        raise ValueError(f"size must be positive (height, width), got {size!r}")
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    for _ in range(3):
        y0, x0 = int(rng.integers(0, height)), int(rng.integers(0, width))
        y1, x1 = int(rng.integers(y0 + 1, height + 1)), int(rng.integers(x0 + 1, width + 1))
        arr[y0:y1, x0:x1] = rng.integers(0, 256, size=3, dtype=np.uint8)
    return Image.fromarray(arr).convert("RGB")


def tiny_video(seed: int = 0, frames: int = 4, size: tuple[int, int] = (56, 56)) -> np.ndarray:
    """A deterministic clip, uint8 ``[frames, height, width, 3]``: noise plus a box moving across the frames
    (what the video processors take, like a decoded clip)."""
    height, width = (int(s) for s in size)
    if frames < 1 or height < 8 or width < 8:
        raise ValueError(f"a tiny video needs >= 1 frame of at least 8x8 pixels, got {frames} x {size!r}")
    rng = np.random.default_rng(seed)
    clip = rng.integers(0, 256, size=(frames, height, width, 3), dtype=np.uint8)
    colour = rng.integers(0, 256, size=3, dtype=np.uint8)
    for t in range(frames):
        y, x = (4 * t) % (height - 7), (6 * t) % (width - 7)
        clip[t, y:y + 8, x:x + 8] = colour
    return clip


def _per_sample(values, count: int, what: str) -> list[list]:
    if values is None:
        return [[] for _ in range(count)]
    if not isinstance(values, Sequence) or isinstance(values, str) or isinstance(values, np.ndarray):
        values = [values]  # a single item for a single prompt
    if len(values) != count:
        raise ValueError(f"got {len(values)} {what} entries for {count} prompts")
    return [[] if v is None else list(v) if isinstance(v, (list, tuple)) else [v] for v in values]


def tiny_inputs(processor, images, prompts, padding_side: str = "left", videos=None):
    """Chat-format ``prompts`` and run ``processor`` on the batch; returns its ``BatchFeature`` (pt).

    ``prompts`` is a string or a list of strings; ``images`` is aligned with it: per sample a PIL
    image, a list of images, or ``None`` for a text-only sample (``images=None``: all text-only).
    ``videos`` likewise (clips as ``[frames, H, W, 3]`` arrays, e.g. :func:`tiny_video`; video families).
    Each sample becomes one user turn holding one placeholder per image, then one per video, followed by
    the prompt, rendered with ``processor.apply_chat_template(..., add_generation_prompt=True)``. The
    batch is padded on ``padding_side`` (the processor's own default is left untouched).
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    per_images = _per_sample(images, len(prompts), "image")
    per_videos = _per_sample(videos, len(prompts), "video")

    texts, flat_images, flat_videos = [], [], []
    for sample_images, sample_videos, prompt in zip(per_images, per_videos, prompts, strict=True):
        content = ([{"type": "image"} for _ in sample_images] + [{"type": "video"} for _ in sample_videos]
                   + [{"type": "text", "text": prompt}])
        messages = [{"role": "user", "content": content}]
        texts.append(processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
        flat_images.extend(sample_images)
        flat_videos.extend(sample_videos)

    kwargs: dict[str, Any] = {
        "text": texts,
        "return_tensors": "pt",
        "padding": True,
        "padding_side": padding_side,
    }
    if flat_images:
        kwargs["images"] = flat_images
    if flat_videos:
        kwargs["videos"] = flat_videos
    return processor(**kwargs)
