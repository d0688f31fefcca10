"""The synthetic VQA generator: determinism, balance, ground-truth consistency, export/load round trip."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from vtprune.synth import (
    ANSWERS,
    CHANCE,
    IMAGE_SIZE,
    SKILLS,
    TEST_SIZE,
    export_split,
    generate_sample,
    generate_split,
    load_split,
    load_test_split,
)
from vtprune.synth.scene import PLURALS


def _pixels(sample) -> np.ndarray:
    return np.asarray(sample.image)


@pytest.fixture(scope="module")
def samples():
    return generate_split("train", 240, seed=3)


def test_deterministic_and_independent_of_n(samples):
    again = generate_split("train", 24, seed=3)
    for a, b in zip(samples[:24], again, strict=True):
        assert (a.id, a.question, a.answer, a.skill, a.objects) == (b.id, b.question, b.answer, b.skill, b.objects)
        assert np.array_equal(_pixels(a), _pixels(b))
    single = generate_sample("train", 17, seed=3)
    assert single.question == samples[17].question and np.array_equal(_pixels(single), _pixels(samples[17]))


def test_splits_and_seeds_differ():
    train, test, reseeded = generate_sample("train", 0), generate_sample("test", 0), generate_sample("train", 0, seed=1)
    assert not np.array_equal(_pixels(train), _pixels(test))
    assert not np.array_equal(_pixels(train), _pixels(reseeded))
    with pytest.raises(ValueError, match="unknown split"):
        generate_sample("dev", 0)


def test_images_are_rgb_64(samples):
    assert all(s.image.mode == "RGB" and s.image.size == (IMAGE_SIZE, IMAGE_SIZE) for s in samples)


def test_skills_round_robin_and_answers_balanced(samples):
    assert [s.skill for s in samples[:12]] == list(SKILLS) * 2
    assert Counter(s.skill for s in samples) == dict.fromkeys(SKILLS, 40)
    for skill in SKILLS:
        answers = Counter(s.answer for s in samples if s.skill == skill)
        assert set(answers) <= set(ANSWERS[skill]), skill
        if skill == "existence":
            assert answers == {"yes": 20, "no": 20}
        elif skill in ("counting", "spatial", "fine_detail"):
            # the answer cycles through the answer set: every answer appears, as evenly as 40 allows
            assert set(answers) == set(ANSWERS[skill]), skill
            assert max(answers.values()) - min(answers.values()) <= 1, (skill, answers)
    ocr = Counter(s.answer for s in generate_split("test", 6 * 18) if s.skill == "ocr")
    assert ocr == dict.fromkeys(ANSWERS["ocr"], 1)


def _shapes(sample):
    return [o for o in sample.objects if o.kind == "shape"]


def test_answers_match_the_scene(samples):
    for s in samples:
        shapes, signs = _shapes(s), [o for o in s.objects if o.kind == "sign"]
        q = s.question
        if s.skill == "attribute":
            target = s.objects[s.targets[0]]
            if q.startswith("What color"):
                assert sum(o.shape == target.shape for o in shapes) == 1 and s.answer == target.color
            else:
                assert sum(o.color == target.color for o in shapes) == 1 and s.answer == target.shape
        elif s.skill == "existence":
            color, shape = q.rstrip("?").split()[-2:]
            present = any((o.color, o.shape) == (color, shape) for o in shapes)
            assert s.answer == ("yes" if present else "no")
        elif s.skill == "counting":
            word = q.split()[2]
            if word in PLURALS.values():
                count = sum(PLURALS[o.shape] == word for o in shapes)
            else:
                count = sum(o.color == word for o in shapes)
            assert s.answer == str(count)
        elif s.skill == "spatial":
            a, b = (s.objects[i].center for i in s.targets)
            dx, dy = a[0] - b[0], a[1] - b[1]
            expected = ("left" if dx < 0 else "right") if abs(dx) > abs(dy) else ("above" if dy < 0 else "below")
            assert s.answer == expected
            # GQA-style: the question names the axis, the answer is one of its two sides
            axis = "left or right" if expected in ("left", "right") else "above or below"
            assert axis in q and q.startswith("Is the ")
        elif s.skill == "ocr":
            assert len(signs) == 1 and s.answer == signs[0].char.lower()
        else:
            small = [o for o in shapes if o.small]
            assert len(small) == 1 and s.answer == small[0].color


def test_objects_do_not_overlap(samples):
    for s in samples:
        boxes = [o.box for o in s.objects]
        for i, a in enumerate(boxes):
            assert 0 <= a[0] < a[2] <= IMAGE_SIZE and 0 <= a[1] < a[3] <= IMAGE_SIZE
            for b in boxes[i + 1:]:
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]


def test_export_load_round_trip(tmp_path, samples):
    directory = export_split(samples[:12], tmp_path)
    assert directory == tmp_path / "train" and (directory / "metadata.jsonl").is_file()
    loaded = load_split(tmp_path, "train")
    assert len(loaded) == 12 and len(load_split(tmp_path, "train", limit=5)) == 5
    for a, b in zip(samples[:12], loaded, strict=True):
        assert (a.id, a.question, a.answer, a.skill, a.objects, a.targets) == \
               (b.id, b.question, b.answer, b.skill, b.objects, b.targets)
        assert np.array_equal(_pixels(a), _pixels(b))
    with pytest.raises(FileNotFoundError, match="python -m vtprune.synth"):
        load_split(tmp_path, "test")


def test_exported_split_loads_with_datasets(tmp_path, samples):
    datasets = pytest.importorskip("datasets")
    export_split(samples[:6], tmp_path)
    data = datasets.load_dataset("imagefolder", data_dir=str(tmp_path), split="train")
    assert len(data) == 6
    assert data[0]["question"] == samples[0].question and data[0]["answer"] == samples[0].answer
    assert np.array_equal(np.asarray(data[0]["image"].convert("RGB")), _pixels(samples[0]))


def test_shipped_test_split_matches_the_generator():
    shipped = load_test_split(limit=12)
    generated = generate_split("test", 12)
    for a, b in zip(shipped, generated, strict=True):
        assert (a.id, a.question, a.answer) == (b.id, b.question, b.answer)
        assert np.array_equal(_pixels(a), _pixels(b))
    assert len(load_test_split()) == TEST_SIZE


def test_scene_questions_include_the_sample_question_and_are_consistent(samples):
    from vtprune.synth import scene_questions

    for s in samples[:60]:
        pool = scene_questions(s.objects)
        assert (s.question, s.answer) in pool[s.skill]
        for skill, questions in pool.items():
            assert all(answer in ANSWERS[skill] for _, answer in questions), skill
        yes = [q for q, a in pool["existence"] if a == "yes"]
        assert len(yes) == len({(o.color, o.shape) for o in s.objects if o.kind == "shape"})


def test_object_map_marks_every_object():
    from vtprune.synth.scene import object_map

    sample = generate_sample("test", 5)  # fine_detail: one small object
    index = object_map(sample.objects)
    for i, obj in enumerate(sample.objects):
        x0, y0, x1, y1 = obj.box
        assert (index == i).any() and (index[y0:y1, x0:x1] == i).sum() == (index == i).sum()
    assert (index == -1).mean() > 0.5  # mostly background


def test_chance_levels_follow_the_answer_sets(samples):
    assert set(CHANCE) == set(SKILLS)
    assert CHANCE["existence"] == CHANCE["spatial"] == 0.5 and CHANCE["ocr"] == 1 / len(ANSWERS["ocr"])
    # attribute: colour questions choose among the colours, shape questions among the shapes (half each)
    colours = sum(s.question.startswith("What color") for s in samples if s.skill == "attribute")
    shapes = sum(s.question.startswith("What shape") for s in samples if s.skill == "attribute")
    assert colours == shapes
    assert all(0 < p <= 0.5 for p in CHANCE.values())
