"""The synthetic video QA generator: determinism, balance, events as the questions say, mp4 round trip, the
shipped test split and its lmms-eval task."""

from __future__ import annotations

import json
from collections import Counter
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest

from vtprune.synth.video import (
    FRAME_SIZE,
    NUM_FRAMES,
    VIDEO_ANSWERS,
    VIDEO_CHANCE,
    VIDEO_SKILLS,
    VIDEO_TEST_SIZE,
    clip_questions,
    export_video_split,
    generate_clip,
    generate_training_clip,
    generate_video_split,
    load_video_split,
    read_mp4,
    track_map,
)

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "eval" / "data" / "synth_video"


@pytest.fixture(scope="module")
def clips():
    return generate_video_split("val", 140, seed=5)


def test_deterministic_and_independent_of_n(clips):
    again = generate_video_split("val", 14, seed=5)
    for a, b in zip(clips[:14], again, strict=True):
        assert (a.id, a.question, a.answer, a.skill, a.tracks) == (b.id, b.question, b.answer, b.skill, b.tracks)
        assert np.array_equal(a.frames, b.frames)
    assert generate_clip("val", 9, seed=5).question == clips[9].question
    other = generate_clip("test", 9, seed=5)
    assert not np.array_equal(other.frames, clips[9].frames)
    with pytest.raises(ValueError, match="unknown split"):
        generate_clip("dev", 0)


def test_shapes_balance_and_answers(clips):
    assert Counter(c.skill for c in clips) == {s: 20 for s in VIDEO_SKILLS}
    for clip in clips:
        assert clip.frames.shape == (NUM_FRAMES, FRAME_SIZE, FRAME_SIZE, 3) and clip.frames.dtype == np.uint8
        assert clip.answer in VIDEO_ANSWERS[clip.skill], (clip.id, clip.answer)
    for skill in ("appearance", "motion", "counting"):
        answers = Counter(c.answer for c in clips if c.skill == skill)
        assert len(answers) == len(VIDEO_ANSWERS[skill]) and max(answers.values()) - min(answers.values()) <= 1
    assert set(VIDEO_CHANCE) == set(VIDEO_SKILLS)
    assert all(0 < VIDEO_CHANCE[s] <= 0.5 for s in VIDEO_SKILLS)


def test_every_reference_names_one_object_and_question_is_posed(clips):
    for clip in clips:
        shapes = [t for t in clip.tracks if t.kind == "shape"]
        assert len({t.shape for t in shapes}) == len(shapes)
        colors = [c for t in shapes for c in dict.fromkeys(t.colors)]
        assert len(set(colors)) == len(colors)
        posed = [(q, a, tg) for q, a, tg in clip_questions(clip.tracks)[clip.skill]]
        assert (clip.question, clip.answer) in [(q, a) for q, a, _ in posed], clip.id


def _visible_pixels(clip, track_index: int) -> list[int]:
    return [int((track_map(clip.tracks, t) == track_index).sum()) for t in range(NUM_FRAMES)]


def test_events_happen_in_the_pixels(clips):
    """The rendered frames show what the answer says (checked on the pixels' owner map and on the pixels)."""
    for clip in clips:
        target = clip.targets[0]
        track = clip.tracks[target]
        pixels = _visible_pixels(clip, target)
        if clip.skill == "appearance":
            on = [p > 0 for p in pixels]
            assert on[0] != on[-1] and on[-1] == (clip.answer == "appear")
            assert sum(a != b for a, b in pairwise(on)) == 1
        elif clip.skill == "counting":
            on = [p > 0 for p in pixels]
            runs = sum(1 for t in range(NUM_FRAMES) if on[t] and (t == 0 or not on[t - 1]))
            assert runs == int(clip.answer)
            assert all(on[2 * g] == on[2 * g + 1] for g in range(NUM_FRAMES // 2))  # aligned with groups
        elif clip.skill == "motion":
            (x0, y0, _, _), (x1, y1, _, _) = track.boxes[0], track.boxes[-1]
            expected = {"left": x1 < x0 - 20, "right": x1 > x0 + 20, "up": y1 < y0 - 20, "down": y1 > y0 + 20}
            assert expected[clip.answer]
            centre_first = np.argwhere(track_map(clip.tracks, 0) == target).mean(axis=0)
            centre_last = np.argwhere(track_map(clip.tracks, NUM_FRAMES - 1) == target).mean(axis=0)
            moved = centre_last - centre_first    # (row, column)
            axis = 1 if clip.answer in ("left", "right") else 0
            assert abs(moved[axis]) >= 20 and abs(moved[1 - axis]) < 2
        elif clip.skill == "brief_ocr":
            shown = [c is not None for c in track.chars]
            assert 2 <= sum(shown) <= 4 and track.chars[shown.index(True)].lower() == clip.answer
            x0, y0, x1, y1 = track.boxes[0]
            dark = [(clip.frames[t, y0:y1, x0:x1].mean(axis=-1) < 100).sum() for t in range(NUM_FRAMES)]
            assert all((d > 0) == s for d, s in zip(dark, shown, strict=True))
        elif clip.skill == "color_change":
            assert track.colors[0] != track.colors[-1] == clip.answer
        elif clip.skill == "temporal_order":
            first, second = (clip.tracks[i] for i in clip.targets)
            assert first.color == clip.answer
            change = [next(t for t in range(1, NUM_FRAMES) if tr.visible[t] != tr.visible[t - 1])
                      for tr in (first, second)]
            assert change[1] - change[0] >= 4
        elif clip.skill == "static_attribute":
            assert all(p == pixels[0] > 0 for p in pixels) and track.color == clip.answer
            assert all(np.array_equal(clip.frames[0][track_map(clip.tracks, 0) == target],
                                      clip.frames[t][track_map(clip.tracks, t) == target]) for t in range(NUM_FRAMES))


def test_every_change_lies_inside_one_temporal_group(clips):
    """Appear / disappear / colour change at an odd frame 2g+1 (frame 2g shows the old state), a move step only
    between the two frames of a group, a flashing shape inside one 16 px token cell: the temporal patch of 2
    sees each change, and one token carries it -- in the split clips and in the training clips."""
    training = [generate_training_clip(i, seed=2) for i in range(40)]
    roles = Counter()
    for clip in [*clips, *training]:
        for track in clip.tracks:
            if track.kind == "sign":
                continue
            roles[track.role] += 1
            changes = [t for t in range(1, NUM_FRAMES) if track.visible[t] != track.visible[t - 1]
                       or track.colors[t] != track.colors[t - 1]]
            if track.role in ("appear", "disappear", "color_change"):
                assert len(changes) == 1 and changes[0] % 2 == 1 and 3 <= changes[0] <= 13, (clip.id, changes)
            elif track.role == "flash":
                assert all(t % 2 == 0 for t in changes)   # flashes cover whole groups
                x0, y0, x1, y1 = track.boxes[0]
                assert x0 // 16 == (x1 - 1) // 16 and y0 // 16 == (y1 - 1) // 16, track.boxes[0]
            elif track.role == "move":
                steps = [t for t in range(1, NUM_FRAMES) if track.boxes[t] != track.boxes[t - 1]]
                assert steps and all(t % 2 == 1 for t in steps)  # between frames 2g and 2g+1 only
                assert all(max(abs(a - b) for a, b in zip(track.boxes[t], track.boxes[t - 1], strict=True)) >= 4
                           for t in steps)
    assert all(roles[r] > 0 for r in ("appear", "disappear", "color_change", "flash", "move"))


def test_training_clips_are_busier_and_answerable():
    counts, skills = [], Counter()
    for i in range(70):
        clip = generate_training_clip(i, seed=1)
        questions = clip_questions(clip.tracks)
        counts.append(sum(len(v) for v in questions.values()))
        skills[clip.skill] += 1
        assert (clip.question, clip.answer) in [(q, a) for q, a, _ in questions[clip.skill]]
    assert np.mean(counts) >= 3
    assert set(skills) == set(VIDEO_SKILLS)


def test_mp4_round_trip(tmp_path, clips):
    subset = clips[:7]
    directory = export_video_split(subset, tmp_path)
    rows = [json.loads(line) for line in (directory / "metadata.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [c.id for c in subset]
    loaded = load_video_split(tmp_path, "val")
    for clip, back in zip(subset, loaded, strict=True):
        assert back.frames.shape == clip.frames.shape
        assert np.abs(back.frames.astype(int) - clip.frames.astype(int)).mean() < 6  # near-lossless H.264
        assert back.tracks == clip.tracks and back.question == clip.question
    with pytest.raises(FileNotFoundError, match="not found"):
        read_mp4(tmp_path / "missing.mp4")
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(ValueError, match="cannot be decoded"):
        read_mp4(tmp_path / "empty.mp4")


def test_shipped_test_split_matches_the_generator():
    metadata = DATA / "test" / "metadata.jsonl"
    rows = [json.loads(line) for line in metadata.read_text().splitlines()]
    assert len(rows) == VIDEO_TEST_SIZE
    assert Counter(r["skill"] for r in rows) == {s: VIDEO_TEST_SIZE // len(VIDEO_SKILLS) for s in VIDEO_SKILLS}
    for row in rows[:: 23]:
        clip = generate_clip("test", int(row["id"].rsplit("-", 1)[1]))
        assert (clip.question, clip.answer, list(clip.targets)) == (row["question"], row["answer"], row["targets"])
        decoded = read_mp4(DATA / "test" / row["video"])
        assert np.abs(decoded.astype(int) - clip.frames.astype(int)).mean() < 6
    size = sum(p.stat().st_size for p in (DATA / "test").iterdir())
    assert size < 3_000_000


def test_lmms_task_functions():
    import importlib.util

    spec = importlib.util.spec_from_file_location("video_task_utils",
                                                  REPO / "eval" / "lmms_tasks" / "vtprune_synth_video" / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    row = json.loads((DATA / "test" / "metadata.jsonl").read_text().splitlines()[1])
    (path,) = utils.doc_to_visual(row)
    assert Path(path).is_file() and path.endswith(".mp4")
    assert utils.doc_to_text(row) == row["question"]
    right = utils.process_results(row, [row["answer"].upper() + "."])
    wrong = utils.process_results(row, ["banana"])
    assert right["exact_match"] == 1.0 and right[row["skill"]] == 1.0 and wrong["exact_match"] == 0.0
    assert all(right[s] is None for s in VIDEO_SKILLS if s != row["skill"])
    assert utils.aggregate_skill([1.0, None, 0.0]) == 0.5


def test_evaluate_vqa_takes_video_samples():
    """evaluate_vqa runs clips through the processor's video path (one clip per question) and refuses a batch
    that mixes images and clips."""
    pytest.importorskip("torchvision")
    from vtprune.bench.accuracy import evaluate_vqa
    from vtprune.synth import generate_sample
    from vtprune.testing import tiny_vlm

    model, processor = tiny_vlm("qwen2_vl")
    processor.tokenizer.padding_side = "left"
    clips = generate_video_split("test", 3)
    calls = []
    original = model.generate

    def spy(**kwargs):
        calls.append(kwargs)
        return original(**kwargs)

    model.generate = spy
    result = evaluate_vqa(model, processor, clips, batch_size=3, max_new_tokens=2)
    assert result.n == 3 and set(result.per_skill) == {c.skill for c in clips}
    assert "pixel_values" not in calls[0]
    assert calls[0]["video_grid_thw"][:, 0].tolist() == [NUM_FRAMES // 2] * 3  # 16 frames, temporal patch 2
    with pytest.raises(ValueError, match="mixes image and video"):
        evaluate_vqa(model, processor, [clips[0], generate_sample("test", 0)], batch_size=2)
