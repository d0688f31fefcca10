"""Train the bundled micro-VLMs from scratch on the synthetic VQA task (vtprune.synth).

    python models/train_micro.py llava     # -> models/micro-llava/    (~40 min on 2 CPU cores)
    python models/train_micro.py qwen2vl   # -> models/micro-qwen2vl/  (~30 min on 2 CPU cores)

Each run is reproducible from ``--seed`` (weights, data order and augmentations are seeded; CPU float32 with a
fixed thread count). It prints a progress bar, a training log (``training_log.jsonl`` in the output
directory) and the held-out accuracy per skill on the validation split and on the shipped test split
(``eval_results.json``).

micro-llava    ``LlavaForConditionalGeneration``: CLIP ViT (128x128 input, 8 px patches -> 16x16 = 256 patch
               tokens + CLS) + 2-layer MLP projector + Llama decoder. The ViT's CLS output is trained with an
               auxiliary multi-label presence objective (which colour x shape combinations, which sign
               character and which small-object colour appear), so CLS attention points at objects -- the
               signal FasterVLM / VisionZip use.
micro-qwen2vl  ``Qwen2VLForConditionalGeneration``: Qwen2-VL ViT (2-D RoPE, no CLS) with 8 px patches and the
               2x2 PatchMerger (128x128 -> 64 visual tokens) + Qwen2 decoder with 3-D M-RoPE.

Objectives besides the answer tokens' loss: per-token object classes (dense) on the vision output, CLS presence
(micro-llava), patch row/column (micro-llava), and the grounding objective on decoder layer 1's attention
from each answer-predicting token (see ``grounding_loss``); models/README.md explains each.

Both get a word-level tokenizer built here (``tokenizers`` WordLevel over the task's vocabulary plus common
prompt words, lower-cased; unknown words map to ``<unk>``), the family's chat template and the real
transformers processor classes, saved as an HF directory (safetensors) that
``AutoModelForImageTextToText.from_pretrained`` / ``AutoProcessor.from_pretrained`` load offline.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run from a source checkout without installing
    sys.path.insert(0, str(REPO))

from vtprune import compat  # noqa: E402
from vtprune.bench.accuracy import evaluate_vqa  # noqa: E402
from vtprune.synth import (  # noqa: E402
    ANSWERS,
    CHARACTERS,
    COLOR_NAMES,
    PLURALS,
    RELATIONS,
    SHAPES,
    SKILLS,
    generate_sample,
    generate_split,
    load_test_split,
    scene_questions,
)
from vtprune.synth.scene import CELL, IMAGE_SIZE, object_map  # noqa: E402

# --------------------------------------------------------------------------------------------------
# Tokenizer and chat templates
# --------------------------------------------------------------------------------------------------

# Prompt words beyond the task's own, so everyday prompts ("What is in the image?") tokenize sensibly.
_COMMON_WORDS = (
    "user assistant system you are a an the helpful what which who is are in on of this that image picture photo "
    "describe tell me about answer with one single word please and or to it its there here how many where color "
    "colour shape object objects thing things small large big tiny sign character letter digit number written "
    "relative left right above below top bottom yes no do does see can any"
).split()

LLAVA_SPECIAL = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
LLAVA_EXTRA = ("<image>",)
QWEN_SPECIAL = {"unk_token": "<unk>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
QWEN_EXTRA = ("<|im_start|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>",
              "<|video_pad|>")

# The micro-VLMs' chat templates state the user's text both before and after the image:
#   micro-llava:   "<s>USER: What color is the circle?\n<image>\nWhat color is the circle? ASSISTANT: red</s>"
#   micro-qwen2vl: "...<|im_start|>user\nWhat color...?\n<|vision_start|><|image_pad|>...<|vision_end|>What color...?<|im_end|>..."
# The copy before the image makes the visual tokens question-aware inside the decoder (each can attend to the
# question), so a 4-layer decoder trained from scratch learns the question -> object routing within minutes
# instead of stalling at the text prior. The copy after the image keeps the standard layout that pruning
# methods rely on (the last prompt token and the text after the image attend to the visual tokens).
_TEXT = "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
_HAS_IMAGE = "{% set ns = namespace(image=false) %}{% for item in message['content'] %}" \
             "{% if item['type'] in ('image', 'video') %}{% set ns.image = true %}{% endif %}{% endfor %}"

LLAVA_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}" + _TEXT + "{% endif %}{{ ' ' }}"
    "{% else %}"
    "{{ message['role'].upper() + ': ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}" + _HAS_IMAGE +
    "{% if ns.image %}" + _TEXT + "{{ '\n' }}{% endif %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<image>\n' }}{% endif %}{% endfor %}"
    + _TEXT + "{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ ' ' }}{% endif %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

QWEN_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}" + _HAS_IMAGE +
    "{% if ns.image %}" + _TEXT + "{{ '\n' }}{% endif %}"
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


def task_words() -> list[str]:
    """Every word the synthetic questions and answers use (lower-cased)."""
    words = set(_COMMON_WORDS)
    for template in ("What color is the", "What shape is the object", "Is there a an", "How many are there",
                     "Is the left or right of the", "Is the above or below of the", "What character is on the sign",
                     "What color is the small object"):
        words.update(template.lower().split())
    words.update(COLOR_NAMES)
    words.update(SHAPES)
    words.update(PLURALS.values())
    words.update(RELATIONS)
    for answers in ANSWERS.values():
        words.update(answers)
    words.update(c.lower() for c in CHARACTERS)
    return sorted(words)


def build_tokenizer(family: str, extra_words: tuple[str, ...] = ()):
    """Word-level fast tokenizer: special tokens first, then punctuation and the task's words (plus
    ``extra_words``, e.g. the video task's)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special, extra = (LLAVA_SPECIAL, LLAVA_EXTRA) if family == "llava" else (QWEN_SPECIAL, QWEN_EXTRA)
    specials = list(dict.fromkeys([*special.values(), *extra]))
    vocab = {token: i for i, token in enumerate(specials)}
    for token in [*".,:;?!'\"()-", *sorted(set(task_words()) | {w.lower() for w in extra_words})]:
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()  # \w+ | [^\w\s]+
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=1024, padding_side="right",
                                        **special)
    if family != "llava":
        tokenizer.add_special_tokens({"additional_special_tokens": list(extra)})
    tokenizer.chat_template = LLAVA_TEMPLATE if family == "llava" else QWEN_TEMPLATE
    return tokenizer


# --------------------------------------------------------------------------------------------------
# Models and processors
# --------------------------------------------------------------------------------------------------

PATCH = CELL  # one vision patch per 8x8-pixel grid cell of the synthetic scenes: 128x128 -> 16x16 = 256 patches

_SHARED = {
    "vision_hidden": 96, "vision_layers": 3, "vision_heads": 4, "vision_ffn": 256,
    "text_hidden": 128, "text_layers": 4, "text_heads": 4, "text_kv_heads": 2, "text_ffn": 384,
    "steps": 3000, "batch_size": 16, "lr": 1.5e-3, "init": 0.06, "extra_questions": 6,
    "objects_until": 400, "background_from": 300, "background_until": 1500,
    "dense_weight": 0.5, "ground_weight": 0.5, "ground_layer": 1, "ground_floor": 1.0, "order_weight": 0.0,
    "ground_counting": 1, "position_questions": 0,
}
PRESETS = {
    "llava": {**_SHARED, "steps": 2700, "aux_weight": 0.5, "position_weight": 0.2},
    "qwen2vl": {**_SHARED, "aux_weight": 0.0, "position_weight": 0.0},
}


def build_llava(tokenizer, p: dict):
    import transformers

    ids = tokenizer.convert_tokens_to_ids
    text = {
        "model_type": "llama", "vocab_size": len(tokenizer), "hidden_size": p["text_hidden"],
        "intermediate_size": p["text_ffn"], "num_hidden_layers": p["text_layers"],
        "num_attention_heads": p["text_heads"], "num_key_value_heads": p["text_kv_heads"],
        "max_position_embeddings": 1024, "rms_norm_eps": 1e-5, "initializer_range": p.get("init", 0.02),
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id, "tie_word_embeddings": False,
    }
    vision = {
        "model_type": "clip_vision_model", "hidden_size": p["vision_hidden"], "intermediate_size": p["vision_ffn"],
        "num_hidden_layers": p["vision_layers"], "num_attention_heads": p["vision_heads"],
        "image_size": IMAGE_SIZE, "patch_size": PATCH, "projection_dim": p["vision_hidden"],
        "initializer_range": p.get("init", 0.02),
    }
    config = transformers.LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=ids("<image>"),
        vision_feature_layer=-1, vision_feature_select_strategy="default", projector_hidden_act="gelu",
        image_seq_length=(IMAGE_SIZE // PATCH) ** 2, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = compat.model_from_config(transformers.LlavaForConditionalGeneration, config, dtype=torch.float32)
    image_processor = transformers.LlavaImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    )
    processor = transformers.LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=tokenizer.chat_template,
    )
    return model, processor


def build_qwen2vl(tokenizer, p: dict):
    import transformers

    ids = tokenizer.convert_tokens_to_ids
    head_dim = p["text_hidden"] // p["text_heads"]
    half = head_dim // 2  # rotary frequencies, split over (temporal, height, width)
    section = [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]
    special = {"bos_token_id": ids("<|endoftext|>"), "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id}
    text = {
        "vocab_size": len(tokenizer), "hidden_size": p["text_hidden"], "intermediate_size": p["text_ffn"],
        "num_hidden_layers": p["text_layers"], "num_attention_heads": p["text_heads"],
        "num_key_value_heads": p["text_kv_heads"], "max_position_embeddings": 1024, "rms_norm_eps": 1e-6,
        "initializer_range": p.get("init", 0.02),
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section},
        "tie_word_embeddings": False, **special,
    }
    vision = {
        "depth": p["vision_layers"], "embed_dim": p["vision_hidden"], "hidden_size": p["text_hidden"],
        "num_heads": p["vision_heads"], "mlp_ratio": p["vision_ffn"] // p["vision_hidden"], "patch_size": PATCH,
        "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3, "initializer_range": p.get("init", 0.02),
    }
    config = transformers.Qwen2VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"), tie_word_embeddings=False, **special,
    )
    model = compat.model_from_config(transformers.Qwen2VLForConditionalGeneration, config, dtype=torch.float32)
    pixels = IMAGE_SIZE * IMAGE_SIZE
    common = {"patch_size": PATCH, "temporal_patch_size": 2, "merge_size": 2,
              "size": {"shortest_edge": pixels, "longest_edge": pixels}}
    from vtprune.testing import _make_processor, _video_processor

    processor = _make_processor(
        transformers.Qwen2VLProcessor,
        image_processor=transformers.Qwen2VLImageProcessorPil(**common),
        tokenizer=tokenizer,
        video_processor=_video_processor("Qwen2VLVideoProcessor", **common),
        chat_template=tokenizer.chat_template,
    )
    return model, processor


# --------------------------------------------------------------------------------------------------
# Auxiliary CLS objective (micro-llava): multi-label presence of scene contents
# --------------------------------------------------------------------------------------------------

_COMBOS = [(c, s) for c in COLOR_NAMES for s in SHAPES]
PRESENCE_LABELS = ([f"{c} {s}" for c, s in _COMBOS] + ["sign"] + [f"char {c}" for c in CHARACTERS]
                   + [f"small {c}" for c in COLOR_NAMES])


def presence_targets(sample) -> list[float]:
    """Multi-hot vector over PRESENCE_LABELS for one sample."""
    target = [0.0] * len(PRESENCE_LABELS)
    for obj in sample.objects:
        if obj.kind == "sign":
            target[len(_COMBOS)] = 1.0
            target[len(_COMBOS) + 1 + CHARACTERS.index(obj.char)] = 1.0
        else:
            target[_COMBOS.index((obj.color, obj.shape))] = 1.0
            if obj.small:
                target[len(_COMBOS) + 1 + len(CHARACTERS) + COLOR_NAMES.index(obj.color)] = 1.0
    return target


# Dense objective: every visual token is classified by the object it shows (background, a regular
# colour x shape, a small colour x shape, or a sign with its character). It gives the tiny vision encoders a
# signal at every token from the first step, so the decoder soon has object features to route.
DENSE_CLASSES = (["background"] + [f"{c} {s}" for c, s in _COMBOS] + [f"small {c} {s}" for c, s in _COMBOS]
                 + [f"sign {c}" for c in CHARACTERS])


def dense_targets(sample, cell: int) -> list[int]:
    """Class of each ``cell x cell`` pixel cell of the 64x64 image (raster order): the object covering most of
    the cell if it covers at least a quarter of it, else background."""
    index = object_map(sample.objects)  # [64, 64]
    side = IMAGE_SIZE // cell
    blocks = index.reshape(side, cell, side, cell).transpose(0, 2, 1, 3).reshape(side * side, cell * cell)
    coverage = np.stack([(blocks == k).sum(axis=1) for k in range(len(sample.objects))], axis=1)  # [cells, K]
    labels = []
    for obj in sample.objects:
        if obj.kind == "sign":
            labels.append(1 + 2 * len(_COMBOS) + CHARACTERS.index(obj.char))
        else:
            labels.append(1 + _COMBOS.index((obj.color, obj.shape)) + (len(_COMBOS) if obj.small else 0))
    best = coverage.argmax(axis=1)
    covered = coverage.max(axis=1) * 4 >= cell * cell
    return np.where(covered, np.array(labels)[best], 0).tolist()


def image_cells(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """[B, L] long: for each image-token column its visual-token index (0.. in raster order), -1 elsewhere."""
    is_image = input_ids == image_token_id
    return torch.where(is_image, is_image.long().cumsum(-1) - 1, torch.full_like(input_ids, -1))


def forward_visual_subset(model, family: str, batch, keep: list[torch.Tensor], cells: torch.Tensor):
    """Forward pass in which each row keeps only the visual tokens ``keep[row]`` (bool per image token, raster
    order) at their original (M-)RoPE positions; the curriculum below uses it to shorten the early sequences.
    Returns the output and the shortened (attention_mask, labels, cells) the grounding objective needs."""
    input_ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    rows, length = input_ids.shape
    inner = model.model
    image_features = getattr(inner, compat.IMAGE_FEATURES)
    if family == "llava":
        features = torch.cat(list(image_features(pixel_values=batch["pixel_values"]).pooler_output))
        positions = torch.arange(length).expand(rows, length)  # right padding: 0..L-1
    else:
        features = torch.cat(image_features(batch["pixel_values"], batch["image_grid_thw"]).pooler_output)
        positions, _ = compat.rope_index(inner, input_ids, mm_token_type_ids=batch["mm_token_type_ids"],
                                            image_grid_thw=batch["image_grid_thw"], attention_mask=mask)  # [3, B, L]
    embeds = model.get_input_embeddings()(input_ids)
    is_image = input_ids == model.config.image_token_id
    embeds = embeds.masked_scatter(is_image[..., None].expand_as(embeds), features.to(embeds.dtype))
    kept_rows = []
    for row in range(rows):
        keep_row = mask[row].bool().clone()
        image_positions = is_image[row].nonzero().flatten()
        keep_row[image_positions[~keep[row]]] = False
        kept_rows.append(keep_row.nonzero().flatten())
    width = max(len(k) for k in kept_rows)
    new_embeds = embeds.new_zeros(rows, width, embeds.shape[-1])
    new_mask = mask.new_zeros(rows, width)
    new_labels = labels.new_full((rows, width), -100)
    new_cells = cells.new_full((rows, width), -1)
    new_positions = positions.new_zeros(*positions.shape[:-2], rows, width)
    for row, kept in enumerate(kept_rows):
        n = len(kept)
        new_embeds[row, :n] = embeds[row, kept]
        new_mask[row, :n] = 1
        new_labels[row, :n] = labels[row, kept]
        new_cells[row, :n] = cells[row, kept]
        new_positions[..., row, :n] = positions[..., row, kept]
    output = model(inputs_embeds=new_embeds, attention_mask=new_mask, position_ids=new_positions, labels=new_labels)
    return output, new_mask, new_labels, new_cells


class LayerInputCapture:
    """Forward pre-hook on one decoder layer: keeps its input hidden states and (cos, sin) rotary embeddings."""

    def __init__(self, layer: nn.Module):
        self.layer = layer
        self.hidden: torch.Tensor | None = None
        self.position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None
        self.handle = layer.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.hidden = args[0] if args else kwargs["hidden_states"]
        self.position_embeddings = kwargs["position_embeddings"]

    def remove(self):
        self.handle.remove()


def grounding_loss(capture: LayerInputCapture, attention_mask: torch.Tensor, labels: torch.Tensor,
                   cells: torch.Tensor, turn_cells: list[list[tuple[torch.Tensor, tuple[int, torch.Tensor] | None]]],
                   floor: float, order_weight: float = 0.0) -> torch.Tensor:
    """Grounding objective at the captured decoder layer, for the token that predicts each answer (the last token
    of its assistant header):

    * its head-averaged attention mass on the visual tokens of the objects the question is about:
      max(0, log(floor) - log(mass)), i.e. -log(mass) with the presets' floor 1.0 (a floor < 1 leaves part of
      the mass free); turns about no object are skipped;
    * with ``order_weight`` > 0 (off in the presets), for spatial questions one head per axis (ORDER_HEADS)
      attending to the object that comes first along the asked axis: -log(that head's mass on it).

    The attention rows are recomputed from the layer's own q/k (vtprune.engine.attention_rows), the rows
    FastV-style methods read at inference. ``labels`` [B, L] (-100 outside answers), ``cells`` [B, L]
    visual-token index per column (-1 elsewhere), ``turn_cells[b][t]`` = (bool [n_visual] tokens turn ``t`` of
    sample ``b`` is about, optional (head, bool [n_visual]) order target)."""
    from vtprune.engine.attention_rows import attention_rows

    rows, length = labels.shape
    answer = labels != -100
    starts = answer & ~torch.cat([answer.new_zeros(rows, 1), answer[:, :-1]], dim=1)  # first token of each answer
    queries = [(starts[b].nonzero().flatten() - 1).tolist() for b in range(rows)]
    width = max(1, max(len(q) for q in queries))
    query_index = torch.zeros(rows, width, dtype=torch.long)
    target = torch.zeros(rows, width, length, dtype=torch.bool)
    order_target = torch.zeros(rows, width, length, dtype=torch.bool)
    order_head = torch.zeros(rows, width, dtype=torch.long)
    is_visual = cells >= 0
    for b in range(rows):
        if len(queries[b]) != len(turn_cells[b]):  # cannot happen with make_batch; never guess the pairing
            continue
        for t, (position, (wanted, order)) in enumerate(zip(queries[b], turn_cells[b], strict=True)):
            query_index[b, t] = position
            target[b, t] = is_visual[b] & wanted[cells[b].clamp(min=0)]
            if order is not None:
                order_head[b, t] = order[0]
                order_target[b, t] = is_visual[b] & order[1][cells[b].clamp(min=0)]
    valid, order_valid = target.any(-1), order_target.any(-1)  # [B, Q]
    if not valid.any():
        return labels.new_zeros((), dtype=torch.float32)
    probs = attention_rows(capture.layer, capture.hidden, capture.position_embeddings, query_index,
                           key_padding_mask=attention_mask)  # [B, H, Q, L]
    mass = (probs.mean(1) * target).sum(-1).clamp_min(1e-6)  # [B, Q]
    loss = ((math.log(floor) - mass.log()).clamp_min(0) * valid).sum() / valid.sum()
    if order_weight > 0 and order_valid.any():
        per_head = probs.gather(1, order_head[:, None, :, None].expand(-1, 1, -1, length))[:, 0]  # [B, Q, L]
        order_mass = (per_head * order_target).sum(-1).clamp_min(1e-6)
        loss = loss + order_weight * (-(order_mass.log()) * order_valid).sum() / order_valid.sum()
    return loss


class VisionCapture:
    """Forward hook on the vision encoder: keeps the pooled CLS output (CLIP) or the merged tokens (Qwen2-VL)
    and the per-token features the decoder receives, for the auxiliary objectives."""

    def __init__(self, tower: nn.Module, family: str):
        self.family = family
        self.pooled: torch.Tensor | None = None
        self.tokens: torch.Tensor | None = None
        self.handle = tower.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        if self.family == "llava":
            self.pooled = output.pooler_output          # [B, dv] post-layernorm CLS
            self.tokens = output.last_hidden_state[:, 1:]  # [B, 256, dv] patch tokens fed to the projector
        else:
            self.tokens = output.pooler_output          # [B * 64, D] merged tokens, raster order per image

    def remove(self):
        self.handle.remove()


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def prompt_text(processor, question: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


_ASSISTANT_HEADER = {"llava": ("assistant", ":"), "qwen2vl": ("<|im_start|>", "assistant")}


def warmup_questions(sample) -> list[tuple[str, str, tuple[int, ...]]]:
    """Training-only questions that need no binding of attributes (answerable from pooled visual features),
    with the objects they are about: they give the decoder an easy gradient towards reading the visual tokens
    (the role captioning plays in LLaVA's first stage)."""
    shapes = [(i, o) for i, o in enumerate(sample.objects) if o.kind == "shape"]
    signs = tuple(i for i, o in enumerate(sample.objects) if o.kind == "sign")
    questions = []
    for c in COLOR_NAMES:
        hits = tuple(i for i, o in shapes if o.color == c)
        questions.append((f"Is there {'an' if c[0] in 'aeiou' else 'a'} {c} object?", "yes" if hits else "no", hits))
    for shape in SHAPES:
        hits = tuple(i for i, o in shapes if o.shape == shape)
        questions.append((f"Is there a {shape}?", "yes" if hits else "no", hits))
    questions.append(("Is there a sign?", "yes" if signs else "no", signs))
    questions.append(("How many objects are there?", str(len(shapes)), tuple(i for i, _ in shapes)))
    return questions


def primary_targets(sample) -> tuple[int, ...]:
    """The objects the sample's own question is about (see scene_questions(with_targets=True))."""
    for question, _, targets in scene_questions(sample.objects, with_targets=True)[sample.skill]:
        if question == sample.question:
            return targets
    return tuple(sample.targets)


def position_questions(sample, margin: float = 16.0) -> list[tuple[str, str, tuple[int, ...]]]:
    """Training-only questions about where one object lies in the image ("Is the red circle on the left or the
    right?" -> left / right; "... on the top or the bottom?" -> top / bottom), for objects whose colour x shape
    is unique and whose centre is at least ``margin`` px from the middle line asked about: reading one object's
    position is the step a spatial comparison of two objects builds on."""
    shapes = [(i, o) for i, o in enumerate(sample.objects) if o.kind == "shape"]
    combos = [(o.color, o.shape) for _, o in shapes]
    middle = IMAGE_SIZE / 2
    questions = []
    for i, o in shapes:
        if combos.count((o.color, o.shape)) != 1:
            continue
        x, y = o.center
        if abs(x - middle) >= margin:
            questions.append((f"Is the {o.color} {o.shape} on the left or the right?", "left" if x < middle else "right",
                              (i,)))
        if abs(y - middle) >= margin:
            questions.append((f"Is the {o.color} {o.shape} on the top or the bottom?", "top" if y < middle else "bottom",
                              (i,)))
    return questions


def extra_turns(sample, rng: np.random.Generator, count: int, positions: bool = False
                ) -> list[tuple[str, str, tuple[int, ...]]]:
    """``count`` more (question, answer, targets) about the same scene: a skill with a well-posed question (or
    the warm-up set, or with ``positions`` the position set) is drawn uniformly, then a question of it
    (existence: yes or no with equal probability)."""
    pool = {**scene_questions(sample.objects, with_targets=True), "warmup": warmup_questions(sample)}
    if positions:
        pool["position"] = position_questions(sample)
    skills = [skill for skill, questions in pool.items() if questions]
    turns: list[tuple[str, str, tuple[int, ...]]] = []
    for _ in range(count):
        skill = skills[int(rng.integers(len(skills)))]
        questions = pool[skill]
        if skill in ("existence", "warmup"):
            wanted = "yes" if rng.random() < 0.5 else "no"
            questions = [qa for qa in questions if qa[1] == wanted] or questions
        turn = questions[int(rng.integers(len(questions)))]
        if turn[0] != sample.question and turn not in turns:
            turns.append(turn)
    return turns


def conversation(sample, turns: list[tuple[str, str]]) -> list[dict]:
    """Chat messages: the image with the sample's question first, then the extra turns (text only)."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sample.question}]},
                {"role": "assistant", "content": sample.answer}]
    for question, answer, *_ in turns:
        messages += [{"role": "user", "content": [{"type": "text", "text": question}]},
                     {"role": "assistant", "content": answer}]
    return messages


def answer_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor, header: list[int], eos_id: int):
    """Labels = input ids on every assistant answer and its eos token (after each ``header``), else -100."""
    labels = torch.full_like(input_ids, -100)
    width = len(header)
    for row in range(input_ids.shape[0]):
        ids = input_ids[row].tolist()
        length = int(attention_mask[row].sum())  # right padding: the real tokens come first
        i = 0
        while i < length:
            if ids[i:i + width] == header:
                j = i + width
                while j < length and ids[j] != eos_id:
                    j += 1
                labels[row, i + width:min(j + 1, length)] = input_ids[row, i + width:min(j + 1, length)]
                i = j
            i += 1
    return labels


ORDER_HEADS = {"left or right": 0, "above or below": 1}  # decoder heads trained to find the first object on an axis


def order_focus(sample, question: str, objects: tuple[int, ...]) -> tuple[int, int] | None:
    """For a spatial question ("Is A left or right of B?"): (head, object) = the head that the grounding
    objective trains to attend to the object that comes first along the asked axis (the leftmost / topmost of
    A and B), so that the identity that head reads out decides the answer. None for other questions."""
    for axis, head in ORDER_HEADS.items():
        if axis in question and len(objects) == 2:
            coordinate = 0 if head == 0 else 1  # x for left/right, y for above/below
            first = min(objects, key=lambda i: sample.objects[i].center[coordinate])
            return head, first
    return None


def make_batch(processor, family: str, samples, rng: np.random.Generator, extra: int, positions: bool = False):
    """Processor inputs for one conversation per sample (its question + ``extra`` more about the same image),
    with labels on the answers and their eos tokens only; also returns, per sample and turn (in conversation
    order): (indices of the objects the turn asks about, its order_focus, its question)."""
    tokenizer = processor.tokenizer
    texts, targets = [], []
    for s in samples:
        turns = extra_turns(s, rng, extra, positions)
        texts.append(processor.apply_chat_template(conversation(s, turns), tokenize=False))
        asked = [(s.question, tuple(primary_targets(s))), *((t[0], tuple(t[2])) for t in turns)]
        targets.append([(objects, order_focus(s, question, objects), question) for question, objects in asked])
    batch = processor(images=[s.image for s in samples], text=texts, return_tensors="pt", padding=True,
                      padding_side="right")
    header = tokenizer.convert_tokens_to_ids(list(_ASSISTANT_HEADER[family]))
    batch["labels"] = answer_labels(batch["input_ids"], batch["attention_mask"], header, tokenizer.eos_token_id)
    return batch, targets


def cells_of(sample, objects, cell: int) -> np.ndarray:
    """bool [cells]: the ``cell x cell`` pixel cells showing any pixel of the given objects (raster order)."""
    side = IMAGE_SIZE // cell
    index = object_map(sample.objects)
    wanted = np.isin(index, list(objects)) if objects else np.zeros_like(index, dtype=bool)
    return wanted.reshape(side, cell, side, cell).any(axis=(1, 3)).reshape(-1)


def turn_cell_masks(samples, targets, cell: int) -> list[list[tuple[torch.Tensor, tuple[int, torch.Tensor] | None]]]:
    """make_batch's per-turn objects as visual-token masks: per sample, per turn (bool [n_visual] of the asked
    objects, optional (head, bool [n_visual]) of the object the order head should find)."""
    return [[(torch.from_numpy(cells_of(s, objects, cell)),
              None if order is None else (order[0], torch.from_numpy(cells_of(s, (order[1],), cell))))
             for objects, order, *_ in turns]
            for s, turns in zip(samples, targets, strict=True)]


def curriculum(step: int, preset: dict) -> tuple[float, float, int]:
    """Token curriculum at ``step``: (share of the other objects' tokens, share of background tokens, extra
    questions). The decoder first sees only the tokens of the objects asked about, so reading them out is
    learned in a few dozen steps; the other objects are then mixed in (the question -> object routing forms
    while distractors are few), then the background, then full 256-token sequences for the rest of the run.
    Extra questions (whose objects would defeat the first phase) start once all objects are shown."""
    objects_end, background_start, background_end = (int(preset[k]) for k in
                                                     ("objects_until", "background_from", "background_until"))
    objects = min(1.0, step / objects_end) if objects_end else 1.0
    if step < background_start:
        background = 0.0
    elif step < background_end:
        background = (step - background_start) / max(1, background_end - background_start)
    else:
        background = 1.0
    extra = int(preset["extra_questions"]) if step >= objects_end else 0
    return objects, background, extra


def cpu_has_bf16() -> bool:
    """Native bf16 matmul (AVX512-BF16 or AMX); elsewhere bf16 autocast is emulated and slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def lr_at(step: int, total: int, peak: float, warmup: int, decay: float = 0.2) -> float:
    """Warmup (linear), stable at ``peak``, then cosine decay to 5% over the last ``decay`` share of the run."""
    if step < warmup:
        return peak * (step + 1) / warmup
    decay_start = int(total * (1 - decay))
    if step < decay_start:
        return peak
    progress = (step - decay_start) / max(1, total - decay_start)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def evaluate(model, processor, samples, batch_size: int = 32) -> dict:
    model.eval()
    result = evaluate_vqa(model, processor, samples, batch_size=batch_size, max_new_tokens=3)
    model.train()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("family", choices=sorted(PRESETS))
    parser.add_argument("--out", default=None, help="output directory (default: models/micro-<family>)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (results depend on it; on 2 shared cores 1 thread was fastest)")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                        help="bf16 autocast (weights stay float32); auto = bf16 where the CPU has native bf16")
    parser.add_argument("--val-size", type=int, default=600)
    parser.add_argument("--eval-every", type=int, default=0, help="validation accuracy every N steps (0: end only)")
    parser.add_argument("--state", default=None, help="file to save the training state to (for --resume)")
    parser.add_argument("--save-every", type=int, default=200, help="save the training state every N steps")
    parser.add_argument("--resume", default=None, help="continue a run from a --state file (same settings)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a preset entry, e.g. --set text_layers=2")
    args = parser.parse_args(argv)

    from tqdm.auto import tqdm

    preset = dict(PRESETS[args.family])
    for item in args.set:
        key, value = item.split("=", 1)
        preset[key] = type(preset[key])(value) if key in preset else float(value)
    for key in ("steps", "batch_size", "lr"):
        if getattr(args, key) is not None:
            preset[key] = getattr(args, key)
    out = Path(args.out) if args.out else REPO / "models" / f"micro-{args.family.replace('qwen2vl', 'qwen2vl')}"

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    bf16 = args.precision == "bf16" or (args.precision == "auto" and cpu_has_bf16())
    tokenizer = build_tokenizer(args.family)
    build = build_llava if args.family == "llava" else build_qwen2vl
    model, processor = build(tokenizer, preset)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())

    aux_head = None
    params = list(model.parameters())
    tower = model.model.vision_tower if args.family == "llava" else model.model.visual
    capture = VisionCapture(tower, args.family)
    token_width = model.config.vision_config.hidden_size  # CLIP hidden / Qwen merger output (= LLM width)
    dense_cell = PATCH if args.family == "llava" else 2 * PATCH
    dense_head = nn.Linear(token_width, len(DENSE_CLASSES))
    params += list(dense_head.parameters())
    if preset["aux_weight"] > 0:
        aux_head = nn.Linear(model.config.vision_config.hidden_size, len(PRESENCE_LABELS))
        params += list(aux_head.parameters())
    side = IMAGE_SIZE // dense_cell
    # position objective: row and column of every visual token, so "where" is readable from each token
    position_head = nn.Linear(token_width, 2 * side)
    position_target = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1)
    position_target = position_target.reshape(-1, 2)  # [cells, (row, col)] raster order
    if preset["position_weight"] > 0:
        params += list(position_head.parameters())
    layer_capture = LayerInputCapture(model.model.language_model.layers[int(preset["ground_layer"])])
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=preset["lr"], betas=(0.9, 0.98), eps=1e-8)

    steps, batch_size = int(preset["steps"]), int(preset["batch_size"])
    warmup = max(1, steps // 20)
    val_samples = generate_split("val", args.val_size, seed=args.seed)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "training_log.jsonl"
    first_step, elapsed_before = 0, 0.0
    if args.resume:
        state = torch.load(args.resume, weights_only=False)
        same = {k: v for k, v in state["preset"].items() if k != "steps"} == {k: v for k, v in preset.items()
                                                                             if k != "steps"}
        if state["seed"] != args.seed or not same or state["step"] > int(steps * 0.8):
            raise SystemExit(f"{args.resume} was saved by a run with other settings (only --steps may differ, "
                             "and the state must lie before the learning-rate decay)")
        model.load_state_dict(state["model"])
        dense_head.load_state_dict(state["dense_head"])
        if aux_head is not None:
            aux_head.load_state_dict(state["aux_head"])
        position_head.load_state_dict(state["position_head"])
        optimizer.load_state_dict(state["optimizer"])
        first_step, elapsed_before = state["step"], state["elapsed_s"]
        ema_loss, ema_aux, ema_dense, ema_ground = state["ema"]
        kept_lines = log_path.read_text().splitlines()[:first_step] if log_path.is_file() else []
        log_path.write_text("".join(line + "\n" for line in kept_lines))
        print(f"resumed from {args.resume} at step {first_step}", flush=True)
    else:
        ema_loss = ema_aux = ema_dense = ema_ground = None
    log = log_path.open("a" if args.resume else "w")
    print(f"micro-{args.family}: {n_params / 1e6:.2f} M parameters, {steps} steps x {batch_size}, "
          f"lr {preset['lr']}, threads {args.threads}, {'bf16 autocast' if bf16 else 'float32'}", flush=True)

    start = time.perf_counter() - elapsed_before
    bar = tqdm(range(first_step, steps), initial=first_step, total=steps, desc=f"train micro-{args.family}", unit="step", dynamic_ncols=True, mininterval=2)
    for step in bar:
        token_rng = torch.Generator().manual_seed(args.seed * 1_000_003 + step)  # per step: resumable
        samples = [generate_sample("train", step * batch_size + i, seed=args.seed) for i in range(batch_size)]
        share_objects, share_background, extra = curriculum(step, preset)
        batch, targets = make_batch(processor, args.family, samples, np.random.default_rng([args.seed, 1, step]),
                                    extra, bool(preset["position_questions"]))
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, preset["lr"], warmup)
        turn_cells = turn_cell_masks(samples, targets, dense_cell)
        cells = image_cells(batch["input_ids"], model.config.image_token_id)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if share_background < 1.0 or share_objects < 1.0:
                keep = []
                for s, turns in zip(samples, turn_cells, strict=True):
                    asked = torch.stack([wanted for wanted, _ in turns]).any(0)
                    objects = torch.from_numpy(cells_of(s, range(len(s.objects)), dense_cell))
                    draw = torch.rand(asked.shape, generator=token_rng)
                    keep.append(asked | (objects & (draw < share_objects)) | (~objects & (draw < share_background)))
                output, mask, labels, cells = forward_visual_subset(model, args.family, batch, keep, cells)
            else:
                output = model(**batch)
                mask, labels = batch["attention_mask"], batch["labels"]
        loss = output.loss
        ground_value = 0.0
        if preset["ground_weight"] > 0:
            ground_cells = turn_cells
            if not preset["ground_counting"]:  # counting by attention needs unsaturated mass (a sink to compare to)
                ground_cells = [[(torch.zeros_like(wanted) if question.startswith("How many") else wanted, order)
                                 for (wanted, order), (_, _, question) in zip(masks, turns, strict=True)]
                                for masks, turns in zip(turn_cells, targets, strict=True)]
            ground = grounding_loss(layer_capture, mask, labels, cells, ground_cells, preset["ground_floor"],
                                    preset["order_weight"])
            loss = loss + preset["ground_weight"] * ground
            ground_value = float(ground)
        if preset["position_weight"] > 0:
            logits = position_head(capture.tokens.float()).reshape(-1, 2, side)  # [B * cells, (row, col), side]
            where = position_target.repeat(len(samples), 1).flatten()  # [B * cells * 2]
            loss = loss + preset["position_weight"] * nn.functional.cross_entropy(logits.reshape(-1, side), where)
        dense_target = torch.tensor([dense_targets(s, dense_cell) for s in samples]).flatten()
        dense = nn.functional.cross_entropy(dense_head(capture.tokens.float()).flatten(0, -2), dense_target)
        loss = loss + preset["dense_weight"] * dense
        aux_value = 0.0
        if aux_head is not None:
            target = torch.tensor([presence_targets(s) for s in samples])
            aux = nn.functional.binary_cross_entropy_with_logits(aux_head(capture.pooled.float()), target)
            loss = loss + preset["aux_weight"] * aux
            aux_value = float(aux)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()

        lm = float(output.loss)
        ema_dense = float(dense) if ema_dense is None else 0.98 * ema_dense + 0.02 * float(dense)
        ema_loss = lm if ema_loss is None else 0.98 * ema_loss + 0.02 * lm
        ema_aux = aux_value if ema_aux is None else 0.98 * ema_aux + 0.02 * aux_value
        ema_ground = ground_value if ema_ground is None else 0.98 * ema_ground + 0.02 * ground_value
        record = {"step": step + 1, "lm_loss": round(lm, 5), "aux_loss": round(aux_value, 5),
                  "ground_loss": round(ground_value, 5),
                  "dense_loss": round(float(dense), 5),
                  "lr": optimizer.param_groups[0]["lr"], "elapsed_s": round(time.perf_counter() - start, 1)}
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < steps:
            result = evaluate(model, processor, val_samples[:120])
            record["val_acc_120"] = round(result.overall, 4)
            bar.write(f"step {step + 1}: val(120) {result.overall:.3f} "
                      + " ".join(f"{k}={v:.2f}" for k, v in result.per_skill.items()))
        log.write(json.dumps(record) + "\n")
        log.flush()
        if args.state and args.save_every and (step + 1) % args.save_every == 0 and step + 1 < steps:
            state = {"step": step + 1, "seed": args.seed, "preset": preset,
                     "model": model.state_dict(), "dense_head": dense_head.state_dict(),
                     "aux_head": aux_head.state_dict() if aux_head is not None else None,
                     "position_head": position_head.state_dict(),
                     "optimizer": optimizer.state_dict(), "elapsed_s": time.perf_counter() - start,
                     "ema": (ema_loss, ema_aux, ema_dense, ema_ground)}
            torch.save(state, f"{args.state}.tmp")
            os.replace(f"{args.state}.tmp", args.state)
        bar.set_postfix(loss=f"{ema_loss:.3f}", ground=f"{ema_ground:.3f}", dense=f"{ema_dense:.3f}", aux=f"{ema_aux:.3f}")
    bar.close()
    train_seconds = time.perf_counter() - start
    capture.remove()
    layer_capture.remove()

    model.eval()
    generation = model.generation_config
    generation.do_sample = False
    generation.max_new_tokens = 4
    generation.bos_token_id = model.config.text_config.bos_token_id
    generation.eos_token_id = tokenizer.eos_token_id
    generation.pad_token_id = tokenizer.pad_token_id

    print("evaluating on the validation and test splits ...", flush=True)
    val = evaluate_vqa(model, processor, val_samples, batch_size=32, max_new_tokens=3, progress=True)
    test = evaluate_vqa(model, processor, load_test_split(), batch_size=32, max_new_tokens=3, progress=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    results = {
        "family": args.family, "seed": args.seed, "preset": preset, "parameters": n_params,
        "train_seconds": round(train_seconds, 1), "train_samples": steps * batch_size,
        "final_lm_loss_ema": round(ema_loss, 4), "final_aux_loss_ema": round(ema_aux, 4),
        "final_dense_loss_ema": round(ema_dense, 4), "final_ground_loss_ema": round(ema_ground, 4),
        "val": val.to_dict(), "test": test.to_dict(),
        "torch": torch.__version__, "threads": args.threads, "bf16_autocast": bf16, "machine": platform.processor() or platform.machine(),
        "command": "python models/train_micro.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    (out / "eval_results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"trained in {train_seconds / 60:.1f} min; final loss (EMA) {ema_loss:.4f}" +
          (f", aux {ema_aux:.4f}" if aux_head is not None else ""))
    for name, result in (("val", val), ("test", test)):
        skills = " ".join(f"{k}={result.per_skill[k]:.3f}" for k in SKILLS if k in result.per_skill)
        print(f"{name}: {result.overall:.3f} ± {result.stderr:.3f} (n={result.n})  {skills}")
    print(f"saved to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
