"""Synthetic video QA: seeded 16-frame clips, mostly static, with short events, and one-word questions.

A clip is ``NUM_FRAMES`` = 16 RGB frames of ``FRAME_SIZE`` = 64 px (a board of 8x8 cells of 8 px, drawn with the
image scene generator :mod:`vtprune.synth.scene`): one textured background and a few objects that stay put for
the whole clip, plus the event the question is about. 16 frames give Qwen2-VL's temporal patch of 2 eight
temporal groups; with 8 px patches and the 2x2 merger a frame pair is 16 visual tokens, a clip 128. Most tokens
repeat from group to group (as in real video), so a pruner that keeps "what changes" keeps the answer, and one
that samples frames or tokens uniformly loses the short events.

Skills (``VIDEO_SKILLS``; one-word answers; chance = uniform guessing among the answers the question allows):

``static_attribute``  "What color is the square?" about an object that never changes (the control)      1/6
``appearance``        "Does the red circle appear or disappear?" (at an odd frame 5-11)                  1/2
``brief_ocr``         "What character flashes on the sign?": the sign shows its character for 2-4 frames
                      only (always covering one whole temporal group), blank otherwise                   1/18
``motion``            "Which way does the blue cross move?" -> left/right/up/down (32-48 px, a step of
                      4-6 px inside each temporal group)                                                 1/4
``temporal_order``    "Which color appears first, red or green?" (two objects appear, or two disappear,
                      at odd frames at least 4 frames apart)                                             1/2
``color_change``      "What color does the triangle become?" (one change at an odd frame 5-11)          1/6
``counting``          "How many times does the yellow circle flash?" -> 1..4 flashes of 2 frames each,
                      aligned with the temporal groups, never two in adjacent groups; the shape sits in
                      one 16 px token cell                                                               1/4

Every change happens *inside* a temporal group (appear / disappear / colour change at an odd frame 2g+1, a
move step between frames 2g and 2g+1, a flash covering whole groups), so Qwen2-VL's temporal patch of 2 sees it
and a single token carries it; what happened *when* is then only in the tokens' temporal positions.

Every shape in a clip has its own colour *and* its own shape, so "the square" and "the red circle" always name
one object; a clip has 1-2 static distractors and, half of the time, one distractor event (another object that
appears, disappears, moves, changes colour or flashes). Skills are assigned round-robin (clip ``i`` has skill
``VIDEO_SKILLS[i % 7]``) and the answer cycles within a skill, so any prefix of a split is balanced. Clip ``i``
of a split is drawn from its own generator seeded by ``(seed, 100 + split, i)``: deterministic, independent of
``n``, and never sharing a random stream with the image task or another split.

:func:`clip_questions` lists every well-posed question about a clip (several per clip, for training), and
:func:`generate_training_clip` draws busier clips (up to four objects with events and a sign) for that purpose.

The test split ships as files (``eval/data/synth_video/test/``: one H.264 mp4 per clip, written with PyAV,
plus ``metadata.jsonl`` that ``datasets.load_dataset("json", data_files=...)`` reads; the ``video`` column is
the mp4's file name in that directory). Re-create it with
``python -m vtprune.synth.video --split test --n 210 --out eval/data/synth_video``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import numpy as np

from .glyphs import CHARACTERS, GLYPH_HEIGHT, GLYPH_WIDTH, glyph_mask
from .scene import (
    CELL,
    COLOR_JITTER,
    COLORS,
    REGULAR_SIZE,
    SHAPES,
    background,
    box_in_block,
    place_block,
    shape_mask,
)

FRAME_SIZE = 64                   # pixels per side of a frame
FRAME_GRID = FRAME_SIZE // CELL   # 8 cells per side
NUM_FRAMES = 16
FPS = 4                           # frame rate written into the mp4 files (16 frames = 4 s)
VIDEO_SKILLS: tuple[str, ...] = ("static_attribute", "appearance", "brief_ocr", "motion", "temporal_order",
                                 "color_change", "counting")
SPLITS: tuple[str, ...] = ("train", "val", "test")
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
MAX_FLASHES = 4
#: size of the shipped test split: 30 clips per skill (standard error <= 2.5 points at >= 82 % accuracy)
VIDEO_TEST_SIZE = 210

#: every answer a question can have, per skill (normalized form)
VIDEO_ANSWERS: dict[str, tuple[str, ...]] = {
    "static_attribute": COLOR_NAMES,
    "appearance": ("appear", "disappear"),
    "brief_ocr": tuple(c.lower() for c in CHARACTERS),
    "motion": DIRECTIONS,
    "temporal_order": COLOR_NAMES,   # one of the two colours the question names
    "color_change": COLOR_NAMES,
    "counting": tuple(str(c) for c in range(1, MAX_FLASHES + 1)),
}

#: accuracy of uniform guessing among the answers a question allows, per skill
VIDEO_CHANCE: dict[str, float] = {
    "static_attribute": 1 / len(COLOR_NAMES),
    "appearance": 0.5,
    "brief_ocr": 1 / len(CHARACTERS),
    "motion": 1 / len(DIRECTIONS),
    "temporal_order": 0.5,
    "color_change": 1 / len(COLOR_NAMES),
    "counting": 1 / MAX_FLASHES,
}

_SPLIT_CODES = {name: 100 + code for code, name in enumerate(SPLITS)}  # disjoint from the image task's codes
_TRAINING_CODE = 199                                                   # generate_training_clip's stream
#: inclusive range of the frame at which an appear/disappear/colour change happens; always an odd frame 2g+1,
#: so the change lies inside temporal group g (its first frame shows the old state, its second the new one):
#: Qwen2-VL's temporal patch of 2 sees the transition and one token per object cell carries it
_EVENT_WINDOW = (5, 11)
_SIGN_TONES = ((205, 240), (10, 50))  # light sign face, dark glyph (as in the image task)

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class Track:
    """One object over the clip. ``role``: "static", "appear", "disappear", "move", "color_change", "flash"
    (shapes) or "sign" (a light cell whose character shows in the frames where ``chars[t]`` is set). Per-frame
    tuples have ``NUM_FRAMES`` entries; ``box`` = (x0, y0, x1, y1) pixels, end-exclusive."""

    kind: str
    role: str
    boxes: tuple[Box, ...]
    visible: tuple[bool, ...]
    colors: tuple[str | None, ...]
    shape: str | None = None
    chars: tuple[str | None, ...] = ()

    @property
    def color(self) -> str | None:
        """The colour in the first frame (the only one except for ``color_change``)."""
        return self.colors[0]

    def runs(self) -> list[tuple[int, int]]:
        """Visible runs ``[(start, end), ...]`` (end-exclusive) -- for a sign, the runs that show a character."""
        on = [c is not None for c in self.chars] if self.kind == "sign" else list(self.visible)
        out, start = [], None
        for t, flag in enumerate(on + [False]):
            if flag and start is None:
                start = t
            elif not flag and start is not None:
                out.append((start, t))
                start = None
        return out

    def to_dict(self) -> dict:
        """Compact JSON-ready dict: constant per-frame fields are stored once."""
        data: dict = {"kind": self.kind, "role": self.role}
        if self.shape is not None:
            data["shape"] = self.shape
        data["box"] = list(self.boxes[0]) if len(set(self.boxes)) == 1 else [list(b) for b in self.boxes]
        data["visible"] = "".join("1" if v else "0" for v in self.visible)
        if self.kind == "shape":
            data["color"] = self.colors[0] if len(set(self.colors)) == 1 else list(self.colors)
        else:
            data["chars"] = "".join(c if c is not None else "." for c in self.chars)
        return data

    @staticmethod
    def from_dict(data: dict) -> Track:
        box = data["box"]
        boxes = tuple(tuple(b) for b in box) if isinstance(box[0], list) else (tuple(box),) * NUM_FRAMES
        visible = tuple(c == "1" for c in data["visible"])
        if data["kind"] == "shape":
            color = data["color"]
            colors = tuple(color) if isinstance(color, list) else (color,) * NUM_FRAMES
            chars: tuple = ()
        else:
            colors = (None,) * NUM_FRAMES
            chars = tuple(None if c == "." else c for c in data["chars"])
        return Track(kind=data["kind"], role=data["role"], boxes=boxes, visible=visible, colors=colors,
                     shape=data.get("shape"), chars=chars)


@dataclass(frozen=True)
class VideoSample:
    """One question about one clip. ``frames``: uint8 [NUM_FRAMES, FRAME_SIZE, FRAME_SIZE, 3]; ``targets``
    index the tracks the question is about."""

    id: str
    frames: np.ndarray
    question: str
    answer: str
    skill: str
    tracks: tuple[Track, ...] = ()
    targets: tuple[int, ...] = ()


# --------------------------------------------------------------------------------------------------
# Building a clip
# --------------------------------------------------------------------------------------------------


class _Clip:
    """Tracks under construction; every shape gets a colour and a shape no other shape of the clip uses."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.tracks: list[Track] = []
        self.occupied: list[Box] = []   # pixel boxes (a moving track: the box it sweeps)
        self.colors: set[str] = set()
        self.shapes: set[str] = set()

    def free_color(self, exclude=()) -> str | None:
        options = [c for c in COLOR_NAMES if c not in self.colors and c not in exclude]
        return options[int(self.rng.integers(len(options)))] if options else None

    def free_shape(self) -> str | None:
        options = [s for s in SHAPES if s not in self.shapes]
        return options[int(self.rng.integers(len(options)))] if options else None

    def _block(self, accept=None) -> Box | None:
        return place_block(self.rng, self.occupied, 2, accept=accept, grid=FRAME_GRID)

    def add_shape(self, role: str, color: str, shape: str, *, visible=None, colors=None,
                  direction: str | None = None) -> int | None:
        """Add a regular shape; returns its track index, or None when it did not fit."""
        if color in self.colors or shape in self.shapes:
            raise ValueError(f"{color} or {shape} is already used in this clip")
        size = int(self.rng.integers(REGULAR_SIZE[0], REGULAR_SIZE[1] + 1))
        if role == "move":
            distance = int(self.rng.integers(32, 49))
            dx, dy = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[direction]

            def fits(block) -> bool:  # the end block lies inside the frame, the swept box clear of others
                x0, y0 = block[0] * CELL + dx * distance, block[1] * CELL + dy * distance
                if not (0 <= x0 and 0 <= y0 and x0 + 2 * CELL <= FRAME_SIZE and y0 + 2 * CELL <= FRAME_SIZE):
                    return False
                sx0, sy0 = min(x0, block[0] * CELL), min(y0, block[1] * CELL)
                sx1, sy1 = max(x0, block[0] * CELL) + 2 * CELL, max(y0, block[1] * CELL) + 2 * CELL
                return not any(sx0 < b[2] + CELL and b[0] < sx1 + CELL and sy0 < b[3] + CELL and b[1] < sy1 + CELL
                               for b in self.occupied)

            block = self._block(fits)
            if block is None:
                return None
            start = box_in_block(block, size)
            # the move happens inside the temporal groups: between the two frames of each of the 8 groups the
            # object moves distance / 8 (4-6 px), between groups it stays (so each group's tokens see a clear step)
            boxes = []
            for t in range(NUM_FRAMES):
                fraction = (t // 2 + t % 2) / (NUM_FRAMES // 2)
                ox, oy = round(dx * distance * fraction), round(dy * distance * fraction)
                boxes.append((start[0] + ox, start[1] + oy, start[2] + ox, start[3] + oy))
            end = boxes[-1]
            self.occupied.append((min(start[0], end[0]), min(start[1], end[1]),
                                  max(start[2], end[2]), max(start[3], end[3])))
        else:
            # a flashing shape sits in one 16 px token cell (blocks at even cells): one token per flash
            block = self._block((lambda b: b[0] % 2 == 0 and b[1] % 2 == 0) if role == "flash" else None)
            if block is None:
                return None
            boxes = [box_in_block(block, size)] * NUM_FRAMES
            self.occupied.append(boxes[0])
        visible = (True,) * NUM_FRAMES if visible is None else tuple(bool(v) for v in visible)
        colors = (color,) * NUM_FRAMES if colors is None else tuple(colors)
        self.colors.update(colors)
        self.shapes.add(shape)
        self.tracks.append(Track("shape", role, tuple(boxes), visible, colors, shape=shape))
        return len(self.tracks) - 1

    def add_sign(self, char: str, start: int, duration: int) -> int | None:
        block = place_block(self.rng, self.occupied, 1, grid=FRAME_GRID)
        if block is None:
            return None
        box = box_in_block(block, CELL)
        self.occupied.append(box)
        chars = tuple(char if start <= t < start + duration else None for t in range(NUM_FRAMES))
        self.tracks.append(Track("sign", "sign", (box,) * NUM_FRAMES, (True,) * NUM_FRAMES,
                                 (None,) * NUM_FRAMES, chars=chars))
        return len(self.tracks) - 1

    # ---- events ----------------------------------------------------------------------------------

    def event_frame(self) -> int:
        """An odd frame in ``_EVENT_WINDOW`` (the transition lies inside one temporal group)."""
        first, last = (_EVENT_WINDOW[0] - 1) // 2, (_EVENT_WINDOW[1] - 1) // 2
        return 2 * int(self.rng.integers(first, last + 1)) + 1

    def appear(self, appear: bool, color: str, shape: str, at: int | None = None) -> int | None:
        at = self.event_frame() if at is None else at
        visible = [(t >= at) == appear for t in range(NUM_FRAMES)]
        return self.add_shape("appear" if appear else "disappear", color, shape, visible=visible)

    def color_change(self, before: str, after: str, shape: str) -> int | None:
        at = self.event_frame()
        colors = [before if t < at else after for t in range(NUM_FRAMES)]
        if after in self.colors:
            raise ValueError(f"{after} is already used in this clip")
        return self.add_shape("color_change", before, shape, colors=colors)

    def flash(self, count: int, color: str, shape: str) -> int | None:
        groups = NUM_FRAMES // 2
        for _ in range(100):   # `count` of the 8 temporal groups, no two adjacent
            chosen = sorted(int(g) for g in self.rng.choice(groups, size=count, replace=False))
            if all(b - a >= 2 for a, b in pairwise(chosen)):
                break
        else:  # pragma: no cover - 4 non-adjacent groups out of 8 are found within a few draws
            return None
        visible = [t // 2 in chosen for t in range(NUM_FRAMES)]
        return self.add_shape("flash", color, shape, visible=visible)

    def random_event(self) -> int | None:
        """One distractor shape with a random role (static included) in free colours and shapes."""
        color, shape = self.free_color(), self.free_shape()
        if color is None or shape is None:
            return None
        role = ("static", "appear", "disappear", "move", "color_change", "flash")[int(self.rng.integers(6))]
        if role == "static":
            return self.add_shape("static", color, shape)
        if role in ("appear", "disappear"):
            return self.appear(role == "appear", color, shape)
        if role == "move":
            return self.add_shape("move", color, shape, direction=DIRECTIONS[int(self.rng.integers(4))])
        if role == "color_change":
            after = self.free_color(exclude=(color,))
            if after is None:
                return self.add_shape("static", color, shape)
            return self.color_change(color, after, shape)
        return self.flash(int(self.rng.integers(1, MAX_FLASHES + 1)), color, shape)


def _brief_window(rng: np.random.Generator) -> tuple[int, int]:
    """(start, duration) of a brief event: 2-4 frames inside frames 2..13 that cover one whole temporal group."""
    duration = int(rng.integers(2, 5))
    while True:
        start = int(rng.integers(2, 15 - duration))
        if any(start <= 2 * g and 2 * g + 2 <= start + duration for g in range(NUM_FRAMES // 2)):
            return start, duration


_Built = tuple[_Clip, str, str, tuple[int, ...]]


def _target_pair(clip: _Clip, color: str | None = None) -> tuple[str, str]:
    color = clip.free_color() if color is None else color
    return color, clip.free_shape()


def _static_attribute(clip: _Clip, k: int) -> _Built | None:
    color, shape = COLOR_NAMES[k % len(COLOR_NAMES)], SHAPES[int(clip.rng.integers(len(SHAPES)))]
    target = clip.add_shape("static", color, shape)
    return None if target is None else (clip, f"What color is the {shape}?", color, (target,))


def _appearance(clip: _Clip, k: int) -> _Built | None:
    color, shape = _target_pair(clip)
    appear = k % 2 == 0
    target = clip.appear(appear, color, shape)
    question = f"Does the {color} {shape} appear or disappear?"
    return None if target is None else (clip, question, "appear" if appear else "disappear", (target,))


def _brief_ocr(clip: _Clip, k: int) -> _Built | None:
    char = CHARACTERS[k % len(CHARACTERS)]
    target = clip.add_sign(char, *_brief_window(clip.rng))
    return None if target is None else (clip, "What character flashes on the sign?", char.lower(), (target,))


def _motion(clip: _Clip, k: int) -> _Built | None:
    direction = DIRECTIONS[k % len(DIRECTIONS)]
    color, shape = _target_pair(clip)
    target = clip.add_shape("move", color, shape, direction=direction)
    return None if target is None else (clip, f"Which way does the {color} {shape} move?", direction, (target,))


def _temporal_order(clip: _Clip, k: int) -> _Built | None:
    appear = (k // 2) % 2 == 0
    first_color = COLOR_NAMES[(k // 4) % len(COLOR_NAMES)]
    second_color = clip.free_color(exclude=(first_color,))
    g1 = int(clip.rng.integers(1, 5))          # transitions inside temporal groups g1 < g2 (frames 2g+1),
    g2 = int(clip.rng.integers(g1 + 2, 7))     # at least two groups (4 frames) apart
    t1, t2 = 2 * g1 + 1, 2 * g2 + 1
    first = clip.appear(appear, first_color, clip.free_shape(), at=t1)
    if first is None:
        return None
    second = clip.appear(appear, second_color, clip.free_shape(), at=t2)
    if second is None:
        return None
    named = (first_color, second_color) if k % 2 == 0 else (second_color, first_color)
    verb = "appears" if appear else "disappears"
    return clip, f"Which color {verb} first, {named[0]} or {named[1]}?", first_color, (first, second)


def _color_change(clip: _Clip, k: int) -> _Built | None:
    after = COLOR_NAMES[k % len(COLOR_NAMES)]
    before = clip.free_color(exclude=(after,))
    shape = clip.free_shape()
    target = clip.color_change(before, after, shape)
    return None if target is None else (clip, f"What color does the {shape} become?", after, (target,))


def _counting(clip: _Clip, k: int) -> _Built | None:
    count = 1 + k % MAX_FLASHES
    color, shape = _target_pair(clip)
    target = clip.flash(count, color, shape)
    question = f"How many times does the {color} {shape} flash?"
    return None if target is None else (clip, question, str(count), (target,))


_BUILDERS = {
    "static_attribute": _static_attribute,
    "appearance": _appearance,
    "brief_ocr": _brief_ocr,
    "motion": _motion,
    "temporal_order": _temporal_order,
    "color_change": _color_change,
    "counting": _counting,
}


def _fill(clip: _Clip) -> bool:
    """1-2 static distractors and, half of the time, one distractor event."""
    for _ in range(int(clip.rng.integers(1, 3))):
        color, shape = clip.free_color(), clip.free_shape()
        if color is None or shape is None:
            return True
        if clip.add_shape("static", color, shape) is None:
            return False
    if clip.rng.random() < 0.5 and clip.free_shape() is not None:
        return clip.random_event() is not None
    return True


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------


def render_clip(tracks: Iterable[Track], rng: np.random.Generator) -> np.ndarray:
    """uint8 [NUM_FRAMES, FRAME_SIZE, FRAME_SIZE, 3]: one static textured background, each track drawn in the
    frames where it is visible (a colour keeps one jitter for the whole clip)."""
    tracks = list(tracks)
    base = background(rng, FRAME_SIZE)                    # [64, 64, 3] float
    tones = []
    for track in tracks:
        if track.kind == "shape":
            tones.append({c: np.array(COLORS[c], dtype=np.float64) + rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, 3)
                          for c in dict.fromkeys(track.colors)})
        else:
            tones.append((rng.uniform(*_SIGN_TONES[0]) + rng.normal(0, 3, size=3), rng.uniform(*_SIGN_TONES[1])))
    frames = np.empty((NUM_FRAMES, FRAME_SIZE, FRAME_SIZE, 3), dtype=np.uint8)
    masks: dict[tuple[str, Box], np.ndarray] = {}
    for t in range(NUM_FRAMES):
        image = base.copy()
        for track, tone in zip(tracks, tones, strict=True):
            if not track.visible[t]:
                continue
            box = track.boxes[t]
            if track.kind == "shape":
                key = (track.shape, box)
                if key not in masks:
                    masks[key] = shape_mask(track.shape, box, FRAME_SIZE)
                image[masks[key]] = tone[track.colors[t]]
            else:
                x0, y0, x1, y1 = box
                image[y0:y1, x0:x1] = tone[0]
                if track.chars[t] is not None:
                    glyph = glyph_mask(track.chars[t], scale=1)   # [7, 5]
                    gy, gx = y0 + (y1 - y0 - GLYPH_HEIGHT) // 2, x0 + (x1 - x0 - GLYPH_WIDTH) // 2
                    image[gy:gy + GLYPH_HEIGHT, gx:gx + GLYPH_WIDTH][glyph] = tone[1]
        frames[t] = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return frames


def track_map(tracks: Iterable[Track], t: int) -> np.ndarray:
    """int [FRAME_SIZE, FRAME_SIZE]: index of the track drawn at each pixel of frame ``t`` (later tracks on
    top, as rendered), -1 elsewhere."""
    index = np.full((FRAME_SIZE, FRAME_SIZE), -1, dtype=np.int64)
    for i, track in enumerate(tracks):
        if not track.visible[t]:
            continue
        if track.kind == "shape":
            index[shape_mask(track.shape, track.boxes[t], FRAME_SIZE)] = i
        else:
            x0, y0, x1, y1 = track.boxes[t]
            index[y0:y1, x0:x1] = i
    return index


# --------------------------------------------------------------------------------------------------
# Questions
# --------------------------------------------------------------------------------------------------


def clip_questions(tracks: tuple[Track, ...] | list[Track]) -> dict[str, list[tuple[str, str, tuple[int, ...]]]]:
    """Every well-posed question about a clip: skill -> [(question, answer, target track indices)].

    Used to ask several questions about one training clip; the sample's own question is always among them
    (every shape has a unique colour and shape, so each reference names one track).
    """
    out: dict[str, list[tuple[str, str, tuple[int, ...]]]] = {skill: [] for skill in VIDEO_SKILLS}
    events: dict[str, list[tuple[int, int]]] = {"appear": [], "disappear": []}   # role -> [(frame, track)]
    for i, track in enumerate(tracks):
        if track.kind == "sign":
            char = next((c for c in track.chars if c is not None), None)
            if char is not None:
                out["brief_ocr"].append(("What character flashes on the sign?", char.lower(), (i,)))
            continue
        color, shape = track.color, track.shape
        if track.role == "static":
            out["static_attribute"].append((f"What color is the {shape}?", color, (i,)))
        elif track.role in ("appear", "disappear"):
            out["appearance"].append((f"Does the {color} {shape} appear or disappear?", track.role, (i,)))
            (start, end), = track.runs()
            events[track.role].append((start if track.role == "appear" else end, i))
        elif track.role == "move":
            (x0, y0, _, _), (x1, y1, _, _) = track.boxes[0], track.boxes[-1]
            if abs(x1 - x0) >= abs(y1 - y0):
                direction = "right" if x1 > x0 else "left"
            else:
                direction = "down" if y1 > y0 else "up"
            out["motion"].append((f"Which way does the {color} {shape} move?", direction, (i,)))
        elif track.role == "color_change":
            out["color_change"].append((f"What color does the {shape} become?", track.colors[-1], (i,)))
        elif track.role == "flash":
            question = f"How many times does the {color} {shape} flash?"
            out["counting"].append((question, str(len(track.runs())), (i,)))
    for role, verb in (("appear", "appears"), ("disappear", "disappears")):
        timed = sorted(events[role])
        for a in range(len(timed)):
            for b in range(a + 1, len(timed)):
                (ta, ia), (tb, ib) = timed[a], timed[b]
                if tb - ta < 2:
                    continue
                ca, cb = tracks[ia].color, tracks[ib].color
                for named in ((ca, cb), (cb, ca)):
                    out["temporal_order"].append(
                        (f"Which color {verb} first, {named[0]} or {named[1]}?", ca, (ia, ib)))
    return out


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def generate_clip(split: str, index: int, seed: int = 0) -> VideoSample:
    """Clip ``index`` of ``split`` (deterministic in ``(seed, split, index)``)."""
    if split not in _SPLIT_CODES:
        raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_CODES[split], index]))
    skill = VIDEO_SKILLS[index % len(VIDEO_SKILLS)]
    k = index // len(VIDEO_SKILLS)
    for _ in range(100):
        built = _BUILDERS[skill](_Clip(rng), k)
        if built is not None and _fill(built[0]):
            break
    else:  # pragma: no cover - at most four 2x2 blocks and a sign on the 8x8 board
        raise RuntimeError(f"could not build a {skill} clip for {split}[{index}]")
    clip, question, answer, targets = built
    tracks = tuple(clip.tracks)
    return VideoSample(id=f"{split}-{index:05d}", frames=render_clip(tracks, rng), question=question,
                       answer=answer, skill=skill, tracks=tracks, targets=targets)


def generate_training_clip(index: int, seed: int = 0) -> VideoSample:
    """A busier clip for training (its own random stream, never equal to a split's clip): an optional brief
    sign and 2-4 shapes, each with a random role; the sample's question is one of :func:`clip_questions`
    (the skill cycles with ``index`` where the clip has a question of it)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, _TRAINING_CODE, index]))
    for _ in range(100):
        clip = _Clip(rng)
        ok = True
        if rng.random() < 0.6:
            ok = clip.add_sign(CHARACTERS[int(rng.integers(len(CHARACTERS)))], *_brief_window(rng)) is not None
        for _ in range(int(rng.integers(2, 5))):
            ok = ok and clip.random_event() is not None
        if ok:
            break
    else:  # pragma: no cover
        raise RuntimeError(f"could not build training clip {index}")
    tracks = tuple(clip.tracks)
    questions = clip_questions(tracks)
    skills = [s for s in VIDEO_SKILLS if questions[s]]
    wanted = VIDEO_SKILLS[index % len(VIDEO_SKILLS)]
    skill = wanted if wanted in skills else skills[int(rng.integers(len(skills)))]
    question, answer, targets = questions[skill][int(rng.integers(len(questions[skill])))]
    return VideoSample(id=f"trainclip-{index:06d}", frames=render_clip(tracks, rng), question=question,
                       answer=answer, skill=skill, tracks=tracks, targets=targets)


def generate_video_split(split: str, n: int, seed: int = 0) -> list[VideoSample]:
    """The first ``n`` clips of ``split``; skills round-robin."""
    return [generate_clip(split, i, seed) for i in range(n)]


def write_mp4(frames: np.ndarray, path: str | Path, fps: int = FPS, crf: int = 12) -> None:
    """Write uint8 [T, H, W, 3] frames as an H.264 mp4 (yuv420p, near-lossless ``crf``) with PyAV."""
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "preset": "veryslow", "tune": "animation"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    # reproducible bytes: x264 writes its settings (no timestamps) and PyAV no creation time


def read_mp4(path: str | Path) -> np.ndarray:
    """Every frame of a video file as uint8 [T, H, W, 3] (decoded with PyAV); a clear error when the file is
    missing or holds no frame."""
    import av

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video file {path} not found")
    try:
        with av.open(str(path)) as container:
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    except av.FFmpegError as error:
        raise ValueError(f"video file {path} cannot be decoded ({error}); re-create it") from error
    if not frames:
        raise ValueError(f"video file {path} holds no frame")
    return np.stack(frames)


def export_video_split(samples: list[VideoSample], root: str | Path, split: str | None = None) -> Path:
    """Write ``samples`` as ``root/<split>/<id>.mp4`` + ``root/<split>/metadata.jsonl`` (columns ``video`` --
    the file name --, ``id``, ``question``, ``answer``, ``skill``, ``targets``, ``tracks``). Returns the split
    directory; ``datasets.load_dataset("json", data_files=str(dir / "metadata.jsonl"))`` loads it."""
    if not samples:
        raise ValueError("no samples to export")
    if split is None:
        prefixes = {s.id.rsplit("-", 1)[0] for s in samples}
        if len(prefixes) != 1:
            raise ValueError(f"samples come from several splits {sorted(prefixes)}; pass split=")
        split = prefixes.pop()
    directory = Path(root) / split
    directory.mkdir(parents=True, exist_ok=True)
    lines = []
    for sample in samples:
        name = f"{sample.id}.mp4"
        write_mp4(sample.frames, directory / name)
        lines.append(json.dumps({
            "video": name, "id": sample.id, "question": sample.question, "answer": sample.answer,
            "skill": sample.skill, "targets": list(sample.targets), "tracks": [t.to_dict() for t in sample.tracks],
        }))
    (directory / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return directory


def load_video_split(root: str | Path, split: str = "test", limit: int | None = None,
                     decode: bool = True) -> list[VideoSample]:
    """Read an exported split back; ``decode=True`` reads the frames from the mp4 files (what a model sees),
    ``decode=False`` re-renders them losslessly from the generator instead (same seed 0 and index)."""
    directory = Path(root) / split
    metadata = directory / "metadata.jsonl"
    if not metadata.is_file():
        raise FileNotFoundError(f"{metadata} not found; create it with "
                                f"python -m vtprune.synth.video --split {split} --out {root}")
    samples = []
    with metadata.open() as handle:
        for line in handle:
            if limit is not None and len(samples) >= limit:
                break
            if not line.strip():
                continue
            row = json.loads(line)
            if decode:
                frames = read_mp4(directory / row["video"])
            else:
                frames = generate_clip(split, int(row["id"].rsplit("-", 1)[1])).frames
            samples.append(VideoSample(
                id=row["id"], frames=frames, question=row["question"], answer=row["answer"], skill=row["skill"],
                tracks=tuple(Track.from_dict(t) for t in row.get("tracks", [])), targets=tuple(row["targets"]),
            ))
    return samples


def video_data_root() -> Path | None:
    """``eval/data/synth_video`` of the source checkout (or of the working directory) if its test split is
    there."""
    here = Path(__file__).resolve().parent.parent.parent
    for root in (here / "eval" / "data" / "synth_video", Path.cwd() / "eval" / "data" / "synth_video"):
        if (root / "test" / "metadata.jsonl").is_file():
            return root
    return None


def load_video_test_split(limit: int | None = None, root: str | Path | None = None) -> list[VideoSample]:
    """The shipped test split (first ``limit`` clips, decoded from the mp4 files; any prefix is
    skill-balanced). Without the files (an installed wheel) the same clips are generated in memory."""
    if root is None:
        root = video_data_root()
        if root is None:
            n = VIDEO_TEST_SIZE if limit is None else min(limit, VIDEO_TEST_SIZE)
            return generate_video_split("test", n)
    return load_video_split(root, "test", limit)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vtprune.synth.video",
                                     description="Export a split of the synthetic video QA task as mp4 files.")
    parser.add_argument("--split", default="test", choices=SPLITS)
    parser.add_argument("--n", type=int, default=VIDEO_TEST_SIZE, help="number of clips (skills round-robin)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="eval/data/synth_video", help="root directory; files go to OUT/SPLIT/")
    args = parser.parse_args(argv)
    directory = export_video_split(generate_video_split(args.split, args.n, args.seed), args.out, args.split)
    print(f"wrote {args.n} clips to {directory}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = [
    "DIRECTIONS", "FPS", "FRAME_GRID", "FRAME_SIZE", "NUM_FRAMES", "VIDEO_ANSWERS", "VIDEO_CHANCE", "VIDEO_SKILLS",
    "VIDEO_TEST_SIZE", "Track", "VideoSample", "clip_questions", "export_video_split", "generate_clip",
    "generate_training_clip", "generate_video_split", "load_video_split", "load_video_test_split", "read_mp4",
    "render_clip", "track_map", "video_data_root", "write_mp4",
]
