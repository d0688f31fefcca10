"""Accuracy of a (possibly pruned) VLM on one-word VQA samples, e.g. the synthetic test split.

    from vtprune.synth import load_test_split
    from vtprune.bench.accuracy import evaluate_vqa

    samples = load_test_split()
    with vtprune.pruned(model, "fastervlm", budget=32):
        result = evaluate_vqa(model, processor, samples)
    print(result.overall, result.per_skill)

Batched greedy ``generate`` with left padding; the prediction is the decoded continuation, compared
to the reference answer after :func:`normalize_answer` (exact match). Whatever pruning is installed
on ``model`` is used as is: the caller applies / removes vtprune.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["AccuracyResult", "evaluate_vqa", "normalize_answer"]

_NUMBER_WORDS = {
    "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_DROPPED_WORDS = {"a", "an", "the"}
_PUNCTUATION = re.compile(r"[^\w\s]")


def normalize_answer(text: str) -> str:
    """Lower-case, strip punctuation and articles, number words -> digits, collapse whitespace.

    ``" Two."`` -> ``"2"``, ``"The red"`` -> ``"red"``, ``"Yes!"`` -> ``"yes"``.
    """
    words = _PUNCTUATION.sub(" ", text.lower()).split()
    return " ".join(_NUMBER_WORDS.get(w, w) for w in words if w not in _DROPPED_WORDS)


@dataclass
class AccuracyResult:
    """``overall`` and ``per_skill`` are fractions in [0, 1]; ``counts`` = samples per skill;
    ``predictions`` = decoded model outputs in sample order; ``correct`` = per-sample match."""

    n: int
    overall: float
    per_skill: dict[str, float]
    counts: dict[str, int]
    predictions: list[str]
    correct: list[bool] = field(default_factory=list)

    @property
    def stderr(self) -> float:
        """Binomial standard error of ``overall`` (fraction)."""
        return math.sqrt(self.overall * (1 - self.overall) / self.n) if self.n else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "overall": self.overall, "stderr": self.stderr, "per_skill": dict(self.per_skill),
                "counts": dict(self.counts)}


def _prompt(processor, question: str, kind: str = "image") -> str:
    messages = [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _is_video(sample) -> bool:
    return getattr(sample, "frames", None) is not None


def _progress_callback(progress, total: int):
    """``progress``: None/False (silent), True (a tqdm bar), or a callable taking the number of samples done
    in each batch (e.g. ``bar.update`` of an existing tqdm bar)."""
    if progress is None or progress is False:
        return (lambda n: None), (lambda: None)
    if progress is True:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="vqa", unit="q")
        return bar.update, bar.close
    if callable(progress):
        return progress, (lambda: None)
    raise TypeError(f"progress must be None, a bool or a callable, got {type(progress).__name__}")


def evaluate_vqa(
    model,
    processor,
    samples: Sequence,
    *,
    batch_size: int = 16,
    max_new_tokens: int = 4,
    progress: bool | Callable[[int], Any] | None = None,
    inputs_cache: dict | None = None,
) -> AccuracyResult:
    """Exact-match accuracy of ``model`` on ``samples`` (objects with ``image``, ``question``, ``answer``,
    ``skill``, like :class:`vtprune.synth.VQASample`; or with ``frames`` -- uint8 [T, H, W, 3] -- instead of
    ``image``, like :class:`vtprune.synth.video.VideoSample`: a video question), overall and per skill.

    Batched greedy ``generate`` (``do_sample=False``) with left padding, one image or one clip (all its frames,
    through the processor's video path) per question; a batch holds one kind only. The continuation is decoded without special tokens and compared after :func:`normalize_answer`.
    ``inputs_cache``: a dict kept by the caller across calls with the same processor (e.g. one per model in a
    sweep); the processor's outputs for each batch are stored in it and reused, so evaluating many pruning
    configurations on the same samples preprocesses the images and prompts once.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    tokenizer = getattr(processor, "tokenizer", processor)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    update, close = _progress_callback(progress, len(samples))

    predictions: list[str] = []
    try:
        for start in range(0, len(samples), batch_size):
            batch = samples[start:start + batch_size]
            # keyed by the sample objects themselves: the cache holds them, so their ids stay unique
            key = (str(device), tuple(id(s) for s in batch))
            cached = None if inputs_cache is None else inputs_cache.get(key)
            inputs = cached[1] if cached is not None else None
            if inputs is None:
                videos = [_is_video(s) for s in batch]
                if any(videos) and not all(videos):
                    raise ValueError("evaluate_vqa: a batch mixes image and video samples; evaluate them "
                                     "separately (or sort the samples by kind)")
                visual = {"videos": [s.frames for s in batch]} if videos[0] else {"images": [s.image for s in batch]}
                inputs = processor(
                    **visual,
                    text=[_prompt(processor, s.question, "video" if videos[0] else "image") for s in batch],
                    return_tensors="pt",
                    padding=True,
                    padding_side="left",
                ).to(device)
                if inputs_cache is not None:
                    inputs_cache[key] = (list(batch), inputs)
            with torch.inference_mode():
                output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                        pad_token_id=pad_id)
            new_tokens = output[:, inputs["input_ids"].shape[1]:]
            predictions.extend(t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
            update(len(batch))
    finally:
        close()

    correct = [normalize_answer(p) == normalize_answer(s.answer) for p, s in zip(predictions, samples, strict=True)]
    counts: dict[str, int] = {}
    hits: dict[str, int] = {}
    for sample, ok in zip(samples, correct, strict=True):
        counts[sample.skill] = counts.get(sample.skill, 0) + 1
        hits[sample.skill] = hits.get(sample.skill, 0) + int(ok)
    n = len(samples)
    return AccuracyResult(
        n=n,
        overall=sum(correct) / n if n else float("nan"),
        per_skill={skill: hits[skill] / counts[skill] for skill in counts},
        counts=counts,
        predictions=predictions,
        correct=correct,
    )


def lmms_skill_metrics(doc: dict, results: Sequence[Any], skills: Sequence[str]) -> dict[str, float | None]:
    """The ``process_results`` of vtprune's lmms-eval tasks: exact match after :func:`normalize_answer`, as
    ``exact_match`` and under the sample's skill; the other skills get ``None`` (see :func:`mean_of_present`)."""
    prediction = results[0].text if hasattr(results[0], "text") else results[0]
    correct = float(normalize_answer(str(prediction).strip()) == normalize_answer(doc["answer"]))
    return {"exact_match": correct, **{skill: correct if doc["skill"] == skill else None for skill in skills}}


def mean_of_present(values: Sequence[float | None]) -> float:
    """The per-skill aggregation of vtprune's lmms-eval tasks: the mean of the non-``None`` values (NaN if none)."""
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else float("nan")
