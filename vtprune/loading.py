"""Loading models for the command line: a local HF directory / hub id, or the bundled offline default."""

from __future__ import annotations

from pathlib import Path

import torch

#: micro-VLMs trained by this project (models/), looked up next to the package and in the working directory
BUNDLED_MODELS = ("micro-llava", "micro-qwen2vl")


def bundled_model_dir(name: str = "micro-llava") -> Path | None:
    for root in (Path(__file__).resolve().parent.parent / "models", Path.cwd() / "models"):
        candidate = root / name
        if (candidate / "config.json").is_file():
            return candidate
    return None


def load_model(model: str | None = None, dtype: str = "float32", device: str = "cpu"):
    """Return ``(model, processor, description)``.

    ``model`` may be a local HF-format directory or hub id (loaded with ``from_pretrained``, SDPA attention),
    ``tiny:<family>`` for a random tiny model from :mod:`vtprune.testing`, or None for the bundled default:
    the trained micro-VLM in ``models/micro-llava`` when present, else ``tiny:llava``.
    """
    if model is None:
        bundled = bundled_model_dir()
        model = str(bundled) if bundled is not None else "tiny:llava"
    if model.startswith("tiny:"):
        from .testing import tiny_vlm

        family = model.split(":", 1)[1]
        net, processor = tiny_vlm(family)
        return net.to(device), processor, f"{model} (random weights, for a smoke run only)"
    from transformers import AutoModelForImageTextToText

    torch_dtype = getattr(torch, dtype)
    net = AutoModelForImageTextToText.from_pretrained(model, dtype=torch_dtype, attn_implementation="sdpa")
    net = net.to(device).eval()
    processor = load_processor(model)
    return net, processor, model


def load_processor(path: str | Path):
    """``AutoProcessor.from_pretrained(path)``; for processors whose video part needs torchvision (Qwen-VL in
    transformers 5.x) and no torchvision installed, the same processor class is built from the saved image
    processor, tokenizer and chat template with a video processor that refuses videos (images work as usual).
    """
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(path)
    except (ValueError, ImportError) as error:  # the video processor class needs torchvision
        if "torchvision" not in str(error).lower():
            raise
    import json

    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer

    from .testing import _make_processor, _video_processor

    config_file = Path(path) / "processor_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found; cannot build the processor without torchvision")
    config = json.loads(config_file.read_text())
    processor_cls = getattr(transformers, config["processor_class"])
    image_processor = AutoImageProcessor.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    video_attrs = {k: v for k, v in config.get("video_processor", {}).items()
                   if k in ("patch_size", "temporal_patch_size", "merge_size", "size")}
    video_processor = _video_processor(config.get("video_processor", {}).get("video_processor_type", ""),
                                       **video_attrs)
    return _make_processor(processor_cls, image_processor=image_processor, tokenizer=tokenizer,
                           video_processor=video_processor, chat_template=tokenizer.chat_template)
