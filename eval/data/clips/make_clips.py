"""Write the shipped synthetic clips (eval/data/clips/*.mp4 + clips.json) from the project's scene renderer.

    python eval/data/clips/make_clips.py            # rewrites the clips next to this file

Each clip is 64 frames of 128x128 pixels at 8 fps (8 s): a static textured background and static objects drawn by
``vtprune.synth.scene.render`` (the same seeded background in every frame), plus objects that move, appear or
change over time. Static scenery with a few moving objects is what makes video tokens redundant across frames (the
premise of video token pruning). Every clip has one question with a one-word answer (``clips.json``). Encoded with
PyAV (H.264, crf 23) through ``vtprune.video.save_video``; seeded, so re-running gives the same frames.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))  # the repository root, when run as a script from a checkout

from vtprune.synth.scene import CELL, IMAGE_SIZE, SceneObject, render  # noqa: E402
from vtprune.video import save_video  # noqa: E402

FRAMES, FPS = 64, 8


def _shape(color: str, shape: str, x: int, y: int, size: int = 14) -> SceneObject:
    return SceneObject(kind="shape", box=(x, y, x + size, y + size), color=color, shape=shape)


def _sign(char: str, cx: int, cy: int) -> SceneObject:
    return SceneObject(kind="sign", box=(cx * CELL, cy * CELL, (cx + 1) * CELL, (cy + 1) * CELL), char=char)


def _frames(seed: int, objects_at) -> np.ndarray:
    """[FRAMES, 128, 128, 3]: ``objects_at(t)`` rendered over the same seeded background in every frame."""
    return np.stack([render(objects_at(t), np.random.default_rng(seed)) for t in range(FRAMES)])


def moving_square(t: int) -> list[SceneObject]:
    """A red square crosses the scene left to right; a blue circle and a green triangle stay put."""
    x = 4 + round((IMAGE_SIZE - 22) * t / (FRAMES - 1))
    return [_shape("blue", "circle", 24, 80), _shape("green", "triangle", 88, 16), _shape("red", "square", x, 48)]


def appearing_sign(t: int) -> list[SceneObject]:
    """A sign with the character 'K' appears in the second half; a yellow cross stays put."""
    objects = [_shape("yellow", "cross", 16, 16), _shape("purple", "circle", 96, 96)]
    if t >= FRAMES // 2:
        objects.append(_sign("K", 9, 6))
    return objects


def counting(t: int) -> list[SceneObject]:
    """Orange circles appear one by one (one every 16 frames): four at the end."""
    spots = [(16, 24), (72, 24), (24, 88), (88, 80)]
    return [_shape("orange", "circle", x, y) for x, y in spots[: t // 16 + 1]] + [_shape("blue", "square", 56, 56)]


CLIPS = [
    {"file": "moving_square.mp4", "seed": 11, "scene": moving_square,
     "question": "Which direction does the red square move, left or right?", "answer": "right"},
    {"file": "appearing_sign.mp4", "seed": 12, "scene": appearing_sign,
     "question": "What character appears on the sign?", "answer": "K"},
    {"file": "counting.mp4", "seed": 13, "scene": counting,
     "question": "How many orange circles are there at the end?", "answer": "4"},
]


def main(out: Path = HERE) -> list[Path]:
    entries, paths = [], []
    for clip in CLIPS:
        path = save_video(out / clip["file"], _frames(clip["seed"], clip["scene"]), fps=FPS)
        paths.append(path)
        entries.append({"file": clip["file"], "question": clip["question"], "answer": clip["answer"],
                        "frames": FRAMES, "fps": FPS, "size": [IMAGE_SIZE, IMAGE_SIZE],
                        "scene": clip["scene"].__doc__})
    (out / "clips.json").write_text(json.dumps(entries, indent=2) + "\n")
    return paths


if __name__ == "__main__":
    for written in main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE):
        print(written, written.stat().st_size, "bytes")
