"""Shape presets: real model shapes with random weights, for latency, memory and FLOPs benchmarks.

A preset is a JSON file in ``models/presets/`` (``NAME.json``)::

    {"name": "llava-1.5-7b", "family": "llava", "reference": "llava-hf/llava-1.5-7b-hf",
     "dtype": "float16", "image_size": [336, 336], "prompt_tokens": 64, "notes": "...",
     "config": {... the transformers config of the reference checkpoint: every shape ...}}

:func:`build_preset` turns it into the family's real transformers class with random weights, created
directly in the target dtype and on the target device (``torch.device(device)`` as the default device and
the dtype as the default dtype while the modules are constructed, then transformers' own initialisation
in place), so no float32 copy is ever materialised: peak memory is the model's size in that dtype. The
processor is the family's real processor class around the local tokenizer of :mod:`vtprune.testing`, so
the placeholder expansion (AnyRes crops, unpadding, Qwen's dynamic resolution) is the real one; the
special-token ids of the config are remapped to that tokenizer (shapes are untouched).

A preset may also carry the shape of a video input (``"video"``)::

    "video": {"frames": 32, "frame_size": [384, 384], "fps": 1.0, "max_pixels": null, "notes": "..."}

``frames``: sampled frames (``vtprune bench --video-frames N`` overrides it); ``frame_size``: (height, width) of each
decoded frame; ``fps``: the sampling rate the frames stand for (it sets the metadata the processor reads: Qwen2.5-VL's
``second_per_grid_ts``); ``max_pixels``: Qwen-VL's per-frame pixel cap of the video processor. :func:`preset_inputs`
with ``video_frames`` builds a random clip of that shape through the real video processor.

Random weights give meaningless answers: accuracy is never reported for a preset (the benchmark refuses).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import compat
from ..errors import VTPruneError

__all__ = ["Preset", "preset_dir", "list_presets", "load_preset", "build_preset", "preset_inputs", "preset_video",
           "preset_video_inputs", "video_frames_default"]

_MODEL_CLASSES = {
    "llava": ("LlavaForConditionalGeneration", "LlavaConfig"),
    "llava_next": ("LlavaNextForConditionalGeneration", "LlavaNextConfig"),
    "llava_onevision": ("LlavaOnevisionForConditionalGeneration", "LlavaOnevisionConfig"),
    "qwen2_vl": ("Qwen2VLForConditionalGeneration", "Qwen2VLConfig"),
    "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLConfig"),
}


@dataclass(frozen=True)
class Preset:
    name: str
    family: str
    config: dict[str, Any]
    dtype: str = "bfloat16"
    image_size: tuple[int, int] = (336, 336)
    prompt_tokens: int = 64
    reference: str | None = None
    notes: str = ""
    path: Path | None = None
    video: dict[str, Any] | None = None  # the video input shape (see the module docstring), None: images only

    def hf_config(self):
        """The transformers config object (token ids as in the file)."""
        import transformers

        return getattr(transformers, _MODEL_CLASSES[self.family][1])(**self.config)


def preset_dir() -> Path:
    """``models/presets`` of the source checkout (or of the working directory)."""
    for root in (Path(__file__).resolve().parents[2], Path.cwd()):
        candidate = root / "models" / "presets"
        if candidate.is_dir():
            return candidate
    raise VTPruneError("models/presets was not found next to the vtprune package or in the working directory; "
                       "run from a source checkout or pass a preset JSON path.")


def list_presets() -> list[str]:
    return sorted(p.stem for p in preset_dir().glob("*.json"))


def load_preset(name_or_path: str | Path) -> Preset:
    """A preset by name (``models/presets/NAME.json``) or by path to a JSON file."""
    path = Path(name_or_path)
    if path.suffix != ".json" or not path.is_file():
        path = preset_dir() / f"{name_or_path}.json"
    if not path.is_file():
        raise VTPruneError(f"unknown preset {name_or_path!r}; available: {', '.join(list_presets())}.")
    data = json.loads(path.read_text())
    family = data["family"]
    if family not in _MODEL_CLASSES:
        raise VTPruneError(f"preset {path.name}: family {family!r} is not one of {', '.join(_MODEL_CLASSES)}.")
    return Preset(name=data["name"], family=family, config=data["config"], dtype=data.get("dtype", "bfloat16"),
                  image_size=tuple(data.get("image_size", (336, 336))), prompt_tokens=int(data.get("prompt_tokens", 64)),
                  reference=data.get("reference"), notes=data.get("notes", ""), path=path,
                  video=_check_video_shape(path.name, data.get("video")))


def _check_video_shape(name: str, video: Any) -> dict[str, Any] | None:
    if video is None:
        return None
    frames, size = video.get("frames"), video.get("frame_size")
    if not (isinstance(frames, int) and frames >= 1 and isinstance(size, list) and len(size) == 2
            and all(isinstance(v, int) and v > 0 for v in size)):
        raise VTPruneError(f"preset {name}: 'video' needs frames (int >= 1) and frame_size [height, width], got "
                           f"{video!r}.")
    return dict(video)


def _local_tokenizer(family: str):
    """The local tokenizer (and chat template) :mod:`vtprune.testing` uses for ``family``."""
    from .. import testing

    if family in ("llava", "llava_next"):
        special = testing._LLAMA_SPECIAL
        template = testing._LLAVA_TEMPLATE if family == "llava" else testing._LLAVA_NEXT_TEMPLATE
    elif family == "llava_onevision":
        special, template = testing._QWEN_SPECIAL, testing._ONEVISION_TEMPLATE
    else:
        special, template = testing._QWEN_SPECIAL, testing._qwen_template(default_system=True)
    return testing._make_tokenizer(special, template)


def _remap_token_ids(family: str, config: dict[str, Any], tokenizer) -> dict[str, Any]:
    config = json.loads(json.dumps(config))  # deep copy
    token = tokenizer.convert_tokens_to_ids
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else token("<|endoftext|>")
    ids = {"bos_token_id": bos, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    config["text_config"].update(ids)
    config.update(ids)
    if family.startswith("llava"):
        config["image_token_id"] = token("<image>")
        if family == "llava_onevision":
            config["video_token_id"] = token("<video>")
    else:
        config.update(image_token_id=token("<|image_pad|>"), video_token_id=token("<|video_pad|>"),
                      vision_start_token_id=token("<|vision_start|>"), vision_end_token_id=token("<|vision_end|>"))
    return config


def _qwen_processor_limits(processor, image_size: tuple[int, int], video: dict[str, Any] | None = None) -> None:
    """Let the Qwen image processor keep the preset's image size, and the video processor its frames up to the
    preset's per-frame ``max_pixels`` (the local processor is set up for tiny images)."""
    pixels = image_size[0] * image_size[1]
    limits = [(processor.image_processor, pixels)]
    if video is not None:
        frame = video["frame_size"][0] * video["frame_size"][1]
        limits.append((processor.video_processor, video.get("max_pixels") or frame))
    for target, most in limits:
        target.size = {"shortest_edge": min(most, 56 * 56), "longest_edge": max(most, 56 * 56)}
        for attr in ("min_pixels", "max_pixels"):
            if getattr(target, attr, None) is not None:
                setattr(target, attr, target.size["shortest_edge" if attr == "min_pixels" else "longest_edge"])


def build_preset(preset: str | Preset, *, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu",
                 seed: int = 0):
    """``(model, processor)`` for a preset: random weights in ``dtype`` (default: the preset's) on ``device``.

    The modules are constructed under ``torch.device(device)`` with ``dtype`` as the default dtype, so
    every parameter is allocated once, in its final dtype and place; transformers' ``_init_weights`` then
    draws the random values in place. SDPA attention, ``eval()`` mode.
    """
    import transformers

    from ..testing import _build_processor

    if not isinstance(preset, Preset):
        preset = load_preset(preset)
    if dtype is None:
        dtype = preset.dtype
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    tokenizer = _local_tokenizer(preset.family)
    config_dict = _remap_token_ids(preset.family, preset.config, tokenizer)
    model_cls_name, config_cls_name = _MODEL_CLASSES[preset.family]
    config = getattr(transformers, config_cls_name)(**config_dict)
    model_cls = getattr(transformers, model_cls_name)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch_dtype)
        with torch.device(device):
            model = compat.model_from_config(model_cls, config, dtype=torch_dtype)
    finally:
        torch.set_default_dtype(previous)
    model.eval()
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = (config_dict["bos_token_id"], config_dict["eos_token_id"],
                                                           config_dict["pad_token_id"])
    gen.do_sample = False
    processor = _build_processor(preset.family, tokenizer, model.config)
    if preset.family.startswith("qwen"):
        _qwen_processor_limits(processor, preset.image_size, preset.video)
    return model, processor


def _prompt_text(tokens: int) -> str:
    """A question of about ``tokens`` tokens for the local byte-level tokenizer."""
    words = ("describe the objects their colors shapes and positions in the picture in detail "
             "and say which one is the largest").split()
    text = []
    while len(" ".join(text)) < tokens * 3:
        text.append(words[len(text) % len(words)])
    return " ".join(text)


def preset_inputs(preset: str | Preset, processor, *, batch: int = 1, seed: int = 0,
                  device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                  video_frames: int | None = None):
    """A benchmark input: ``batch`` copies of one random image at the preset's ``image_size`` with a chat
    prompt of about ``prompt_tokens`` text tokens, through the real processor. With ``video_frames``, a random
    clip of that many frames at the preset's video ``frame_size`` instead of the image (:func:`preset_video`)."""
    from PIL import Image

    if not isinstance(preset, Preset):
        preset = load_preset(preset)
    if video_frames is not None:
        return preset_video_inputs(preset, processor, video_frames, batch=batch, seed=seed, device=device,
                                   dtype=dtype)
    height, width = preset.image_size
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": _prompt_text(preset.prompt_tokens)}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=[image] * batch, text=[text] * batch, return_tensors="pt", padding=True)
    inputs = inputs.to(device)
    if dtype is not None and "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return inputs


def video_frames_default(preset: str | Preset) -> int:
    """The preset's own frame count (its ``video.frames``); a clear error for an image-only preset."""
    if not isinstance(preset, Preset):
        preset = load_preset(preset)
    if preset.video is None:
        with_video = [name for name in list_presets() if load_preset(name).video is not None]
        raise VTPruneError(f"preset {preset.name!r} has no video shape; video presets: {', '.join(with_video)}.")
    return int(preset.video["frames"])


def preset_video(preset: str | Preset, frames: int | None = None, seed: int = 0):
    """A random clip in the preset's video shape: a :class:`vtprune.video.Video` of ``frames`` (default: the
    preset's) uint8 frames at ``frame_size``, with transformers' metadata as if sampled at the preset's ``fps``
    (default 1 frame per second) from a clip of exactly those frames."""
    from ..video import Video

    if not isinstance(preset, Preset):
        preset = load_preset(preset)
    count = video_frames_default(preset) if frames is None else int(frames)
    if count < 1:
        raise VTPruneError(f"video frames must be >= 1, got {frames!r}.")
    height, width = preset.video["frame_size"]
    fps = float(preset.video.get("fps") or 1.0)
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(count, height, width, 3), dtype=np.uint8)
    metadata = compat.video_metadata(total_num_frames=count, fps=fps, duration=count / fps, height=height,
                                     width=width, frames_indices=list(range(count)), video_backend="synthetic")
    return Video(frames=pixels, metadata=metadata, path=Path(f"{preset.name}-random-{count}-frames"))


def preset_video_inputs(preset: str | Preset, processor, frames: int | None = None, *, batch: int = 1,
                        seed: int = 0, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """``batch`` copies of one random clip (:func:`preset_video`) with the preset's benchmark prompt, through
    the real processor (video placeholders expanded by it: OneVision 196 tokens per 384 px frame + 1 newline,
    Qwen-VL one group of merged tokens per 2 frames)."""
    from ..video import video_inputs

    if not isinstance(preset, Preset):
        preset = load_preset(preset)
    clip = preset_video(preset, frames, seed=seed)
    prompt = _prompt_text(preset.prompt_tokens)
    return video_inputs(processor, [clip] * batch, [prompt] * batch, padding_side="left", device=device,
                        dtype=dtype)
