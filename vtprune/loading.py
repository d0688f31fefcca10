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
    from transformers import AutoModelForImageTextToText, AutoProcessor

    torch_dtype = getattr(torch, dtype)
    net = AutoModelForImageTextToText.from_pretrained(model, dtype=torch_dtype, attn_implementation="sdpa")
    net = net.to(device).eval()
    processor = AutoProcessor.from_pretrained(model)
    return net, processor, model
