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
    # chance on this skill mix is 0.28 (vtprune.synth.CHANCE); the shipped checkpoints score 0.89 / 0.83 on
    # these 36 questions and 88.7 % / 85.3 % on the whole 600-question test split (eval_results.json)
    assert result.overall >= 0.75, (result.overall, result.per_skill)
    for skill in ("attribute", "existence", "ocr", "fine_detail"):  # the skills both models have mastered
        assert result.per_skill[skill] >= 5 / 6, (skill, result.per_skill)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_recorded_accuracy_meets_the_targets(name):
    """The held-out numbers the training script recorded (600 test questions): overall >= 85 % (micro-llava) /
    80 % (micro-qwen2vl), and every skill above chance except where the note says otherwise."""
    from vtprune.synth import CHANCE

    results = json.loads((_model_dir(name) / "eval_results.json").read_text())["test"]
    assert results["n"] == 600
    assert results["overall"] >= {"micro-llava": 0.85, "micro-qwen2vl": 0.80}[name]
    for skill, accuracy in results["per_skill"].items():
        if name == "micro-qwen2vl" and skill == "spatial":
            continue  # at chance: Qwen2-VL's ViT has no absolute positions (see models/README.md)
        assert accuracy >= CHANCE[skill] + 0.15, (skill, accuracy)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_checkpoint_files_are_small_and_documented(name):
    directory = _model_dir(name)
    size = sum(f.stat().st_size for f in directory.iterdir() if f.is_file())
    assert size < 40 * 2**20
    assert (directory / "model.safetensors").is_file() and not list(directory.glob("*.bin"))
    results = json.loads((directory / "eval_results.json").read_text())
    assert results["test"]["n"] >= 600 and "command" in results


# -- the video micro-model (models/micro-qwen2vl-video, models/train_micro_video.py) ---------------------------


def test_video_model_loads_offline_and_answers_clips(monkeypatch):
    pytest.importorskip("torchvision", reason="the clips go through Qwen2VLVideoProcessor, which needs torchvision")
    from transformers import AutoModelForImageTextToText

    from vtprune.synth.video import VIDEO_CHANCE, load_video_test_split

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    directory = _model_dir("micro-qwen2vl-video")
    model = AutoModelForImageTextToText.from_pretrained(directory, attn_implementation="sdpa").eval()
    processor = load_processor(directory)
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    clips = load_video_test_split(limit=70)  # decoded from the shipped mp4 files, 10 per skill
    result = evaluate_vqa(model, processor, clips, batch_size=14)
    chance = sum(VIDEO_CHANCE[c.skill] for c in clips) / len(clips)
    # the shipped checkpoint's accuracy on all 210 clips is in eval_results.json (88.6 %, checked below)
    assert result.overall >= 0.75 and result.overall >= chance + 0.45, (result.overall, result.per_skill)


def test_video_model_recorded_accuracy_meets_the_targets():
    """Held-out numbers recorded by the training script on the 210 mp4 test clips: 88.6 % (the issue's target is
    80 %), every skill clearly above chance (at least 15 points; the lowest margins: counting 53 % and motion 73 %
    against 25 %); the image skills kept."""
    from vtprune.synth.video import VIDEO_CHANCE, VIDEO_SKILLS, VIDEO_TEST_SIZE

    results = json.loads((_model_dir("micro-qwen2vl-video") / "eval_results.json").read_text())
    test = results["test"]
    assert test["n"] == VIDEO_TEST_SIZE and set(test["per_skill"]) == set(VIDEO_SKILLS)
    assert test["overall"] >= 0.80
    for skill, accuracy in test["per_skill"].items():
        assert accuracy >= VIDEO_CHANCE[skill] + 0.15, (skill, accuracy)
    assert results["image_test"]["n"] == 600 and results["image_test"]["overall"] >= 0.8
    assert "command" in results and results["train_seconds"] > 0


def test_video_model_files_and_processor():
    import transformers

    directory = _model_dir("micro-qwen2vl-video")
    size = sum(f.stat().st_size for f in directory.iterdir() if f.is_file())
    assert size < 40 * 2**20
    assert (directory / "model.safetensors").is_file() and not list(directory.glob("*.bin"))
    config = json.loads((directory / "processor_config.json").read_text())
    assert config["processor_class"] == "Qwen2VLProcessor"
    assert config["video_processor"]["video_processor_type"] == "Qwen2VLVideoProcessor"
    assert config["video_processor"]["size"]["longest_edge"] == 64 * 64  # 64x64 frames: 16 tokens per 2 frames
    assert hasattr(transformers, config["image_processor"]["image_processor_type"])
    assert "video" in (directory / "chat_template.jinja").read_text()
