"""The bundled micro-VLMs (models/): load offline with the Auto classes and answer test questions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vtprune.bench.accuracy import evaluate_vqa
from vtprune.loading import load_processor
from vtprune.synth import load_test_split

ROOT = Path(__file__).resolve().parent.parent
MODELS = {"micro-llava": "LlavaForConditionalGeneration", "micro-qwen2vl": "Qwen2VLForConditionalGeneration"}


def _model_dir(name: str) -> Path:
    directory = ROOT / "models" / name
    if not (directory / "config.json").is_file():
        pytest.skip(f"models/{name} is not in this checkout")
    return directory


@pytest.fixture(scope="module")
def questions():
    return load_test_split(limit=36)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_loads_offline_and_answers(name, questions, monkeypatch):
    from transformers import AutoModelForImageTextToText

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    directory = _model_dir(name)
    model = AutoModelForImageTextToText.from_pretrained(directory, attn_implementation="sdpa").eval()
    processor = load_processor(directory)  # AutoProcessor, or the torchvision-free fallback for Qwen2-VL
    assert type(model).__name__ == MODELS[name]
    assert model.dtype == torch.float32
    result = evaluate_vqa(model, processor, questions, batch_size=12)
    # far above chance (about 0.27 on this skill mix); the targets (85 % / 80 %) are not met yet by the
    # shipped checkpoints (66.2 % / 71.8 % on the 600-question test split, eval_results.json)
    assert result.overall >= 0.5, (result.overall, result.per_skill)
    assert all(acc > 0 for acc in result.per_skill.values()), result.per_skill


@pytest.mark.parametrize("name", sorted(MODELS))
def test_checkpoint_files_are_small_and_documented(name):
    directory = _model_dir(name)
    size = sum(f.stat().st_size for f in directory.iterdir() if f.is_file())
    assert size < 40 * 2**20
    assert (directory / "model.safetensors").is_file() and not list(directory.glob("*.bin"))
    results = json.loads((directory / "eval_results.json").read_text())
    assert results["test"]["n"] >= 600 and "command" in results
