"""models/train_micro.py's training machinery on tiny sizes: conversations, labels and the grounding objective."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vtprune.synth import SceneObject, generate_sample

ROOT = Path(__file__).resolve().parent.parent
TINY = {"vision_hidden": 32, "vision_layers": 1, "vision_heads": 2, "vision_ffn": 64, "text_hidden": 32,
        "text_layers": 2, "text_heads": 4, "text_kv_heads": 2, "text_ffn": 64, "init": 0.02}


@pytest.fixture(scope="module")
def train():
    spec = importlib.util.spec_from_file_location("train_micro", ROOT / "models" / "train_micro.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("train_micro", module)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("family", ["llava", "qwen2vl"])
def test_grounding_objective_reads_the_answer_tokens_attention(train, family):
    torch.manual_seed(0)
    tokenizer = train.build_tokenizer(family)
    model, processor = (train.build_llava if family == "llava" else train.build_qwen2vl)(tokenizer, TINY)
    samples = [generate_sample("train", i) for i in range(6)]  # one of each skill
    batch, targets = train.make_batch(processor, family, samples, np.random.default_rng(0), extra=3)
    # one answer span per turn, and every turn that names objects gets visual targets
    answer = batch["labels"] != -100
    starts = answer & ~torch.cat([answer.new_zeros(len(samples), 1), answer[:, :-1]], dim=1)
    assert starts.sum(-1).tolist() == [len(t) for t in targets]
    header_end = tokenizer.convert_tokens_to_ids(train._ASSISTANT_HEADER[family][-1])
    for row in range(len(samples)):  # the token before each answer ends the assistant header
        assert all(batch["input_ids"][row, i - 1] == header_end for i in starts[row].nonzero().flatten())
    spatial = samples[3]
    assert spatial.skill == "spatial" and targets[3][0][1] is not None  # the order head has a target

    cell = train.PATCH if family == "llava" else 2 * train.PATCH
    turn_cells = train.turn_cell_masks(samples, targets, cell)
    cells = train.image_cells(batch["input_ids"], model.config.image_token_id)
    assert (cells >= 0).sum(-1).tolist() == [(train.IMAGE_SIZE // cell) ** 2] * len(samples)
    layer = model.model.language_model.layers[1]
    capture = train.LayerInputCapture(layer)
    model(**batch)
    loss = train.grounding_loss(capture, batch["attention_mask"], batch["labels"], cells, turn_cells, floor=1.0)
    hinged = train.grounding_loss(capture, batch["attention_mask"], batch["labels"], cells, turn_cells, floor=0.5)
    with_order = train.grounding_loss(capture, batch["attention_mask"], batch["labels"], cells, turn_cells,
                                      floor=1.0, order_weight=0.5)
    capture.remove()
    # an untrained model spreads attention over ~300 tokens: far below the floor on the asked objects
    assert torch.isfinite(loss) and loss > 1.0
    assert float(hinged) == pytest.approx(float(loss) - np.log(2), rel=0.05)  # every turn is far below 50 % mass
    assert float(with_order) > float(loss)  # the spatial turn's order head adds its -log mass
    loss.backward()
    assert layer.self_attn.q_proj.weight.grad.abs().sum() > 0
    assert model.model.language_model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0  # via layer 1's input


def test_order_focus_is_the_first_object_along_the_asked_axis(train):
    class Scene:
        objects = (SceneObject("shape", (80, 16, 96, 32), color="red", shape="circle"),
                   SceneObject("shape", (16, 64, 32, 80), color="blue", shape="square"))

    assert train.order_focus(Scene, "Is the red circle left or right of the blue square?", (0, 1)) == (0, 1)
    assert train.order_focus(Scene, "Is the red circle above or below the blue square?", (0, 1)) == (1, 0)
    assert train.order_focus(Scene, "What color is the circle?", (0,)) is None


def test_position_questions_name_one_object_and_its_half(train):
    class Scene:
        objects = (SceneObject("shape", (8, 8, 24, 24), color="red", shape="circle"),       # top left
                   SceneObject("shape", (56, 96, 72, 112), color="blue", shape="square"),   # bottom, centred in x
                   SceneObject("shape", (96, 16, 112, 32), color="red", shape="circle"))    # duplicate kind: skipped

    questions = train.position_questions(Scene)
    assert ("Is the blue square on the top or the bottom?", "bottom", (1,)) in questions
    assert not any("blue square on the left" in q for q, _, _ in questions)  # too close to the middle line
    assert not any("red circle" in q for q, _, _ in questions)
    tokenizer = train.build_tokenizer("qwen2vl")
    assert tokenizer.unk_token not in tokenizer.tokenize(questions[0][0])


@pytest.fixture(scope="module")
def train_video(train):
    sys.path.insert(0, str(ROOT / "models"))
    try:
        spec = importlib.util.spec_from_file_location("train_micro_video", ROOT / "models" / "train_micro_video.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "models"))
    return module


def test_video_token_targets_change_count_and_first_change_grounding(train_video):
    """Per-token targets of train_micro_video on the split's clips: the flashing shape's k-th flash token has
    running count k (one token per flash: it sits in one 16 px cell), an appearing shape's token of the group
    of its change is "appear", a moving shape's tokens carry its direction; "Which color ... first?" grounds
    on the first shape's tokens in the group of its change only."""
    from vtprune.synth.video import generate_clip

    tv = train_video
    seen = set()
    for index in range(70):
        clip = generate_clip("val", index)
        owners = tv._group_owners(clip)
        _, change, counts = tv.clip_dense_targets(clip, owners)
        target = clip.targets[0]
        mask = tv.clip_token_mask(owners, (target,)).numpy()
        if clip.skill == "counting":
            assert sorted(c for c, m in zip(counts, mask, strict=True) if m) == list(range(1, int(clip.answer) + 1))
            seen.add("counting")
        elif clip.skill == "appearance":
            # a shape split over 4 tokens covers < 1/8 of each in the group of its change (one frame of two) and
            # is labelled background there; a shape within fewer tokens carries its change
            group = tv.transition_group(clip.tracks[target])
            label = tv.MOTION_CLASSES.index(clip.answer)
            assert all(change[i] != label for i, m in enumerate(mask) if m and i // 16 != group)
            if label in [change[i] for i in range(group * 16, group * 16 + 16) if mask[i]]:
                seen.add("appearance")
        elif clip.skill == "motion":
            moving = [change[i] for i, m in enumerate(mask) if m and change[i]]
            assert moving and max(set(moving), key=moving.count) == tv.MOTION_CLASSES.index(clip.answer)
            seen.add("motion")
        elif clip.skill == "temporal_order":
            grounded = tv.ground_mask(clip, owners, clip.question, clip.targets).reshape(8, 16)
            group = tv.transition_group(clip.tracks[clip.targets[0]])
            assert grounded.any() and grounded.nonzero()[:, 0].unique().tolist() == [group]
            seen.add("temporal_order")
    assert seen == {"counting", "appearance", "motion", "temporal_order"}
