"""evaluate_vqa: normalization, per-skill bookkeeping, batched == one by one."""

from __future__ import annotations

import dataclasses

import pytest

import vtprune
from vtprune.bench.accuracy import evaluate_vqa, normalize_answer
from vtprune.synth import generate_split


@pytest.mark.parametrize(("raw", "expected"), [
    (" Two.", "2"), ("The red", "red"), ("Yes!", "yes"), ("an orange", "orange"), ("LEFT", "left"),
    ("  k ", "k"), ("4", "4"), ("the small object is red", "small object is red"), ("", ""),
])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


@pytest.fixture(scope="module")
def samples():
    return generate_split("val", 10)


def test_batched_equals_one_by_one_and_bookkeeping(tiny_models, samples):
    model, processor = tiny_models["llava"]
    single = evaluate_vqa(model, processor, samples, batch_size=1, max_new_tokens=3)
    batched = evaluate_vqa(model, processor, samples, batch_size=4, max_new_tokens=3)
    assert batched.predictions == single.predictions and len(single.predictions) == len(samples)

    # references set to the model's own prediction on even samples, to an impossible word on odd ones
    relabeled = [dataclasses.replace(s, answer=p if i % 2 == 0 else "zzz-never")
                 for i, (s, p) in enumerate(zip(samples, single.predictions, strict=True))]
    seen = []
    result = evaluate_vqa(model, processor, relabeled, batch_size=3, max_new_tokens=3, progress=seen.append)
    assert seen == [3, 3, 3, 1]
    assert result.correct == [i % 2 == 0 for i in range(len(samples))]
    assert result.n == 10 and result.overall == pytest.approx(0.5)
    assert result.counts == {"attribute": 2, "existence": 2, "counting": 2, "spatial": 2, "ocr": 1, "fine_detail": 1}
    # skill order is round-robin, so sample i has skill i % 6; even ones are right
    assert result.per_skill == {"attribute": 1.0, "existence": 0.0, "counting": 1.0, "spatial": 0.0, "ocr": 1.0,
                                "fine_detail": 0.0}
    assert result.to_dict()["stderr"] == pytest.approx((0.25 / 10) ** 0.5)


def test_uses_the_pruning_installed_on_the_model(tiny_models, samples):
    model, processor = tiny_models["llava"]
    with vtprune.pruned(model, "random", budget=4):
        pruned = evaluate_vqa(model, processor, samples[:4], batch_size=2, max_new_tokens=2)
        assert vtprune.stats(model).samples[0].equivalent_tokens == 4
    assert len(pruned.predictions) == 4


def test_rejects_bad_batch_size(tiny_models, samples):
    model, processor = tiny_models["llava"]
    with pytest.raises(ValueError, match="batch_size"):
        evaluate_vqa(model, processor, samples, batch_size=0)


class _CountingProcessor:
    """Delegates to a processor and counts its calls (image + prompt preprocessing)."""

    def __init__(self, processor):
        self.processor, self.calls = processor, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.processor(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.processor, name)


def test_inputs_cache_preprocesses_once_and_never_mixes_samples(tiny_models, samples):
    model, processor = tiny_models["llava"]
    counting, cache = _CountingProcessor(processor), {}
    first = evaluate_vqa(model, counting, samples, batch_size=4, max_new_tokens=2, inputs_cache=cache)
    assert counting.calls == 3
    second = evaluate_vqa(model, counting, samples, batch_size=4, max_new_tokens=2, inputs_cache=cache)
    assert counting.calls == 3 and second.predictions == first.predictions
    # other sample objects (even with the same content) are preprocessed, never served from another batch
    others = [dataclasses.replace(s) for s in samples]
    evaluate_vqa(model, counting, others, batch_size=4, max_new_tokens=2, inputs_cache=cache)
    assert counting.calls == 6
    uncached = evaluate_vqa(model, processor, samples, batch_size=4, max_new_tokens=2)
    assert uncached.predictions == first.predictions


def test_image_lmms_task_scores_like_evaluate_vqa():
    """The vtprune_synth lmms-eval task scores with normalize_answer and reports the sample's skill only."""
    import importlib.util
    from pathlib import Path

    from vtprune.synth import SKILLS

    path = Path(__file__).resolve().parents[1] / "eval" / "lmms_tasks" / "vtprune_synth" / "utils.py"
    spec = importlib.util.spec_from_file_location("image_task_utils", path)
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    doc = {"question": "How many circles?", "answer": "2", "skill": "counting"}
    right = utils.process_results(doc, ["Two."])
    wrong = utils.process_results(doc, ["3"])
    assert right == {"exact_match": 1.0, **{s: (1.0 if s == "counting" else None) for s in SKILLS}}
    assert wrong["exact_match"] == 0.0 and wrong["counting"] == 0.0 and wrong["ocr"] is None
    assert utils.doc_to_text(doc) == "How many circles?"
    assert utils.aggregate_skill([1.0, None, 0.0, 1.0]) == 2 / 3
    assert utils.aggregate_skill([None, None]) != utils.aggregate_skill([None, None])  # NaN: no sample of the skill
