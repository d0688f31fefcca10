"""Synthetic visual question answering: seeded scenes and one-word questions across six skills.

Every sample is a 128x128 image on a grid of 8x8-pixel cells (see :mod:`vtprune.synth.scene`) with one question whose answer is one
word. The skills stress different token selectors:

``attribute``    "What color is the triangle?" / "What shape is the red object?" (target unique)
``existence``    "Is there a blue cross?" -- yes/no, exactly balanced; half of the "no" questions reuse a
                 colour or a shape that is present (POPE-style adversarial negatives)
``counting``     "How many circles are there?" / "How many green objects are there?" -> 1..4
``spatial``      "Is the red circle left or right of the blue square?" / "... above or below ..." -> left/right/
                 above/below (GQA-style: the question names the axis, the model decides the side)
``ocr``          "What character is on the sign?" -> one of 18 characters (5x7 px) on a one-cell sign
``fine_detail``  "What color is the small object?" -> colour of the one 6-8 px object (one cell)

Skills are assigned round-robin (sample ``i`` has skill ``SKILLS[i % 6]``), and within a skill the
answer cycles through its answer set with the per-skill index, so any prefix of a split is balanced
across skills and (up to one cycle) across answers; everything else about a scene is random. Sample ``i`` of a split is drawn from its own generator seeded by
``(seed, split, i)``: deterministic, independent of ``n``, and the splits never share a random stream.

The test split is shipped as files (``eval/data/synth_vqa/test/``: PNGs + ``metadata.jsonl``), an
"imagefolder" dataset that ``datasets.load_dataset("imagefolder", data_dir=...)`` and lmms-eval tasks read.
Re-create it with ``python -m vtprune.synth --split test --n 600 --out eval/data/synth_vqa``.

Video: :mod:`vtprune.synth.video` builds 16-frame clips from the same scenes (seven temporal skills; test split
shipped as mp4 files in ``eval/data/synth_video/``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .scene import (
    CELL,
    CHARACTERS,
    COLORS,
    IMAGE_SIZE,
    PLURALS,
    REGULAR_CELLS,
    REGULAR_SIZE,
    SHAPES,
    SIGN_CELLS,
    SMALL_CELLS,
    SMALL_SIZE,
    SceneObject,
    box_in_block,
    place_block,
    render,
)

SKILLS: tuple[str, ...] = ("attribute", "existence", "counting", "spatial", "ocr", "fine_detail")
SPLITS: tuple[str, ...] = ("train", "val", "test")
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
RELATIONS: tuple[str, ...] = ("left", "right", "above", "below")
MAX_COUNT = 4
#: size of the shipped test split: 100 questions per skill (see eval/data/synth_vqa/README.md)
TEST_SIZE = 600

#: every answer a question can have, per skill (normalized form)
ANSWERS: dict[str, tuple[str, ...]] = {
    "attribute": COLOR_NAMES + SHAPES,
    "existence": ("yes", "no"),
    "counting": tuple(str(c) for c in range(1, MAX_COUNT + 1)),
    "spatial": RELATIONS,
    "ocr": tuple(c.lower() for c in CHARACTERS),
    "fine_detail": COLOR_NAMES,
}

#: accuracy of uniform guessing among the answers a question allows, per skill (attribute: half colour
#: questions, 1 of 6, half shape questions, 1 of 4; spatial: the question names the axis, 1 of 2)
CHANCE: dict[str, float] = {
    "attribute": 0.5 / len(COLOR_NAMES) + 0.5 / len(SHAPES),
    "existence": 0.5,
    "counting": 1 / MAX_COUNT,
    "spatial": 0.5,
    "ocr": 1 / len(CHARACTERS),
    "fine_detail": 1 / len(COLOR_NAMES),
}

_SPLIT_CODES = {name: code for code, name in enumerate(SPLITS)}
_SIGN_PROBABILITY = 0.25  # chance of a distractor sign in skills other than ocr


@dataclass(frozen=True)
class VQASample:
    """One question about one image. ``objects`` describe the scene; ``targets`` index the objects the
    question is about (empty for a "no" existence question)."""

    id: str
    image: Image.Image
    question: str
    answer: str
    skill: str
    objects: tuple[SceneObject, ...] = ()
    targets: tuple[int, ...] = ()


# --------------------------------------------------------------------------------------------------
# Scene builders: each returns (objects, question, answer, targets) or None when placement failed
# --------------------------------------------------------------------------------------------------

_Built = tuple[list[SceneObject], str, str, tuple[int, ...]]


def _pick(rng: np.random.Generator, options) -> str:
    return options[int(rng.integers(len(options)))]


def _add_shape(rng, objects: list[SceneObject], color: str, shape: str, small: bool = False,
               accept: Callable | None = None) -> bool:
    low, high = SMALL_SIZE if small else REGULAR_SIZE
    size = int(rng.integers(low, high + 1))
    block = place_block(rng, [o.box for o in objects], SMALL_CELLS if small else REGULAR_CELLS, accept=accept)
    if block is None:
        return False
    objects.append(SceneObject("shape", box_in_block(block, size), color=color, shape=shape, small=small))
    return True


def _add_sign(rng, objects: list[SceneObject], char: str | None = None) -> bool:
    char = _pick(rng, CHARACTERS) if char is None else char
    block = place_block(rng, [o.box for o in objects], SIGN_CELLS)
    if block is None:
        return False
    objects.append(SceneObject("sign", box_in_block(block, SIGN_CELLS * CELL), char=char))
    return True


def _add_distractors(rng, objects, count: int, allowed: Callable[[str, str], bool]) -> bool:
    """Add ``count`` regular shapes whose (colour, shape) satisfies ``allowed``."""
    combos = [(c, s) for c in COLOR_NAMES for s in SHAPES if allowed(c, s)]
    for _ in range(count):
        color, shape = combos[int(rng.integers(len(combos)))]
        if not _add_shape(rng, objects, color, shape):
            return False
    return True


def _maybe_sign(rng, objects) -> bool:
    return _add_sign(rng, objects) if rng.random() < _SIGN_PROBABILITY else True


def _attribute(rng, k: int) -> _Built | None:
    objects: list[SceneObject] = []
    # the asked attribute cycles with k (balanced answers); the other one is random
    if k % 2 == 0:  # colour question
        color, shape = COLOR_NAMES[(k // 2) % len(COLOR_NAMES)], _pick(rng, SHAPES)
    else:  # shape question
        color, shape = _pick(rng, COLOR_NAMES), SHAPES[(k // 2) % len(SHAPES)]
    ok = _add_shape(rng, objects, color, shape)
    distractors = int(rng.integers(1, 4))
    if k % 2 == 0:  # ask the colour of the only object with this shape
        ok = ok and _add_distractors(rng, objects, distractors, lambda c, s: s != shape)
        question, answer = f"What color is the {shape}?", color
    else:  # ask the shape of the only object with this colour
        ok = ok and _add_distractors(rng, objects, distractors, lambda c, s: c != color)
        question, answer = f"What shape is the {color} object?", shape
    if not (ok and _maybe_sign(rng, objects)):
        return None
    return objects, question, answer, (0,)


def _existence(rng, k: int) -> _Built | None:
    objects: list[SceneObject] = []
    count = int(rng.integers(2, 5))
    if not _add_distractors(rng, objects, count, lambda c, s: True):
        return None
    present = {(o.color, o.shape) for o in objects}
    if k % 2 == 0:  # yes
        target = int(rng.integers(len(objects)))
        color, shape = objects[target].color, objects[target].shape
        answer, targets = "yes", tuple(i for i, o in enumerate(objects) if (o.color, o.shape) == (color, shape))
    else:  # no: a colour or a shape that is present (adversarial) or any absent combination
        mode = int(rng.integers(3))
        reference = objects[int(rng.integers(len(objects)))]
        absent = [(c, s) for c in COLOR_NAMES for s in SHAPES if (c, s) not in present]
        if mode == 0:
            candidates = [(c, s) for c, s in absent if c == reference.color]
        elif mode == 1:
            candidates = [(c, s) for c, s in absent if s == reference.shape]
        else:
            candidates = absent
        if not candidates:
            return None
        color, shape = candidates[int(rng.integers(len(candidates)))]
        answer, targets = "no", ()
    if not _maybe_sign(rng, objects):
        return None
    article = "an" if color[0] in "aeiou" else "a"
    return objects, f"Is there {article} {color} {shape}?", answer, targets


def _counting(rng, k: int) -> _Built | None:
    objects: list[SceneObject] = []
    count = 1 + (k // 2) % MAX_COUNT
    distractors = int(rng.integers(0, 3))
    if k % 2 == 0:
        shape = _pick(rng, SHAPES)
        ok = _add_distractors(rng, objects, count, lambda c, s: s == shape)
        ok = ok and _add_distractors(rng, objects, distractors, lambda c, s: s != shape)
        question = f"How many {PLURALS[shape]} are there?"
    else:
        color = _pick(rng, COLOR_NAMES)
        ok = _add_distractors(rng, objects, count, lambda c, s: c == color)
        ok = ok and _add_distractors(rng, objects, distractors, lambda c, s: c != color)
        question = f"How many {color} objects are there?"
    if not (ok and _maybe_sign(rng, objects)):
        return None
    return objects, question, str(count), tuple(range(count))


def _relation_holds(relation: str, a: tuple[float, float], b: tuple[float, float], margin: float = 24.0) -> bool:
    """``a`` is ``relation`` of ``b`` along one axis by ``margin`` px, and clearly more than along the other."""
    dx, dy = a[0] - b[0], a[1] - b[1]
    if relation in ("left", "right"):
        along = -dx if relation == "left" else dx
        return along >= margin and abs(dy) <= along / 2
    along = -dy if relation == "above" else dy
    return along >= margin and abs(dx) <= along / 2


def spatial_question(first: tuple[str, str], second: tuple[str, str], relation: str) -> str:
    """The question whose answer is ``relation`` of the (colour, shape) ``first`` to ``second``; it names the
    axis of the relation ("left or right" / "above or below")."""
    axis = "left or right" if relation in ("left", "right") else "above or below"
    return f"Is the {first[0]} {first[1]} {axis} of the {second[0]} {second[1]}?"


def _spatial(rng, k: int) -> _Built | None:
    objects: list[SceneObject] = []
    relation = RELATIONS[k % len(RELATIONS)]
    combos = [(c, s) for c in COLOR_NAMES for s in SHAPES]
    first = combos[int(rng.integers(len(combos)))]
    others = [cs for cs in combos if cs[0] != first[0] and cs[1] != first[1]]
    second = others[int(rng.integers(len(others)))]
    if not _add_shape(rng, objects, *second):  # the reference object
        return None
    reference = objects[0].center

    def accept(block):
        center = ((block[0] + block[2]) * CELL / 2, (block[1] + block[3]) * CELL / 2)
        return _relation_holds(relation, center, reference)

    if not _add_shape(rng, objects, *first, accept=accept):
        return None
    distractors = int(rng.integers(0, 3))
    if not _add_distractors(rng, objects, distractors, lambda c, s: (c, s) not in (first, second)):
        return None
    if not _maybe_sign(rng, objects):
        return None
    return objects, spatial_question(first, second, relation), relation, (1, 0)


def _ocr(rng, k: int) -> _Built | None:
    objects: list[SceneObject] = []
    char = CHARACTERS[k % len(CHARACTERS)]
    if not _add_sign(rng, objects, char):
        return None
    if not _add_distractors(rng, objects, int(rng.integers(1, 4)), lambda c, s: True):
        return None
    return objects, "What character is on the sign?", char.lower(), (0,)


def _fine_detail(rng, k: int) -> _Built | None:
    objects: list[SceneObject] = []
    color = COLOR_NAMES[k % len(COLOR_NAMES)]
    if not _add_shape(rng, objects, color, _pick(rng, SHAPES), small=True):
        return None
    if not _add_distractors(rng, objects, int(rng.integers(1, 4)), lambda c, s: True):
        return None
    if not _maybe_sign(rng, objects):
        return None
    return objects, "What color is the small object?", color, (0,)


_BUILDERS: dict[str, Callable[[np.random.Generator, int], _Built | None]] = {
    "attribute": _attribute,
    "existence": _existence,
    "counting": _counting,
    "spatial": _spatial,
    "ocr": _ocr,
    "fine_detail": _fine_detail,
}


def scene_questions(objects: tuple[SceneObject, ...] | list[SceneObject],
                    with_targets: bool = False) -> dict[str, list[tuple]]:
    """Every question of the six skills that is well posed for a scene: skill -> [(question, answer)].

    Used to ask several questions about one training image. ``existence`` lists the "yes" questions first
    (one per present colour x shape), then the "no" ones; counting only counts present kinds (1..4).
    ``with_targets=True`` adds a third element: the indices of the objects a model has to look at (for
    existence, every object sharing the colour or the shape asked about).
    """
    shapes = [(i, o) for i, o in enumerate(objects) if o.kind == "shape"]
    signs = [(i, o) for i, o in enumerate(objects) if o.kind == "sign"]
    out: dict[str, list[tuple]] = {skill: [] for skill in SKILLS}
    combos = [(o.color, o.shape) for _, o in shapes]

    def article(color: str) -> str:
        return "an" if color[0] in "aeiou" else "a"

    def related(color: str, shape: str) -> tuple[int, ...]:
        return tuple(i for i, o in shapes if o.color == color or o.shape == shape)

    present = sorted(set(combos), key=combos.index)
    absent = [(c, s) for c in COLOR_NAMES for s in SHAPES if (c, s) not in present]
    out["existence"] = [(f"Is there {article(c)} {c} {s}?", "yes", related(c, s)) for c, s in present] + \
                       [(f"Is there {article(c)} {c} {s}?", "no", related(c, s)) for c, s in absent]
    for shape in SHAPES:
        matching = tuple(i for i, o in shapes if o.shape == shape)
        if len(matching) == 1:
            out["attribute"].append((f"What color is the {shape}?", objects[matching[0]].color, matching))
        if 1 <= len(matching) <= MAX_COUNT:
            out["counting"].append((f"How many {PLURALS[shape]} are there?", str(len(matching)), matching))
    for color in COLOR_NAMES:
        matching = tuple(i for i, o in shapes if o.color == color)
        if len(matching) == 1:
            out["attribute"].append((f"What shape is the {color} object?", objects[matching[0]].shape, matching))
        if 1 <= len(matching) <= MAX_COUNT:
            out["counting"].append((f"How many {color} objects are there?", str(len(matching)), matching))
    unique = [(i, o) for i, o in shapes if combos.count((o.color, o.shape)) == 1]
    for i, a in unique:
        for j, b in unique:
            for relation in RELATIONS:
                if i != j and _relation_holds(relation, a.center, b.center):
                    question = spatial_question((a.color, a.shape), (b.color, b.shape), relation)
                    out["spatial"].append((question, relation, (i, j)))
    if len(signs) == 1:
        out["ocr"].append(("What character is on the sign?", signs[0][1].char.lower(), (signs[0][0],)))
    small = [i for i, o in shapes if o.small]
    if len(small) == 1:
        out["fine_detail"].append(("What color is the small object?", objects[small[0]].color, (small[0],)))
    if not with_targets:
        return {skill: [(q, a) for q, a, _ in questions] for skill, questions in out.items()}
    return out


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def generate_sample(split: str, index: int, seed: int = 0) -> VQASample:
    """Sample ``index`` of ``split`` (deterministic in ``(seed, split, index)``)."""
    if split not in _SPLIT_CODES:
        raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_CODES[split], index]))
    skill = SKILLS[index % len(SKILLS)]
    per_skill_index = index // len(SKILLS)
    for _ in range(100):
        built = _BUILDERS[skill](rng, per_skill_index)
        if built is not None:
            break
    else:  # pragma: no cover - placement of <= 7 blocks on the 16x16 grid never fails 100 times in a row
        raise RuntimeError(f"could not build a {skill} scene for {split}[{index}]")
    objects, question, answer, targets = built
    image = Image.fromarray(render(objects, rng), mode="RGB")
    return VQASample(id=f"{split}-{index:05d}", image=image, question=question, answer=answer, skill=skill,
                     objects=tuple(objects), targets=targets)


def generate_split(split: str, n: int, seed: int = 0) -> list[VQASample]:
    """The first ``n`` samples of ``split`` ("train", "val" or "test"); skills round-robin."""
    return [generate_sample(split, i, seed) for i in range(n)]


def iterate_split(split: str, start: int = 0, seed: int = 0) -> Iterable[VQASample]:
    """Endless stream of samples ``start, start+1, ...`` of ``split`` (for training)."""
    index = start
    while True:
        yield generate_sample(split, index, seed)
        index += 1


def _repo_data_root() -> Path | None:
    here = Path(__file__).resolve().parent.parent.parent  # repository root for a source checkout
    for root in (here / "eval" / "data" / "synth_vqa", Path.cwd() / "eval" / "data" / "synth_vqa"):
        if (root / "test" / "metadata.jsonl").is_file():
            return root
    return None


def export_split(samples: list[VQASample], root: str | Path, split: str | None = None) -> Path:
    """Write ``samples`` as an imagefolder split: ``root/<split>/<id>.png`` + ``metadata.jsonl``.

    ``split`` defaults to the samples' id prefix (``test-00042`` -> ``test``). Returns the split
    directory. ``datasets.load_dataset("imagefolder", data_dir=root)`` loads it (columns ``image``,
    ``id``, ``question``, ``answer``, ``skill``, ``objects``, ``targets``).
    """
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
        file_name = f"{sample.id}.png"
        sample.image.save(directory / file_name, format="PNG", optimize=True)
        lines.append(json.dumps({
            "file_name": file_name,
            "id": sample.id,
            "question": sample.question,
            "answer": sample.answer,
            "skill": sample.skill,
            "objects": [o.to_dict() for o in sample.objects],
            "targets": list(sample.targets),
        }))
    (directory / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return directory


def load_split(root: str | Path, split: str = "test", limit: int | None = None) -> list[VQASample]:
    """Read an exported split back (the inverse of :func:`export_split`)."""
    directory = Path(root) / split
    metadata = directory / "metadata.jsonl"
    if not metadata.is_file():
        raise FileNotFoundError(f"{metadata} not found; create it with "
                                f"python -m vtprune.synth --split {split} --out {root}")
    samples = []
    with metadata.open() as handle:
        for line in handle:
            if limit is not None and len(samples) >= limit:
                break
            if not line.strip():
                continue
            row = json.loads(line)
            with Image.open(directory / row["file_name"]) as image:
                pixels = image.convert("RGB")
            samples.append(VQASample(
                id=row["id"], image=pixels, question=row["question"], answer=row["answer"], skill=row["skill"],
                objects=tuple(SceneObject.from_dict(o) for o in row.get("objects", [])),
                targets=tuple(row.get("targets", [])),
            ))
    return samples


def load_test_split(limit: int | None = None, root: str | Path | None = None) -> list[VQASample]:
    """The shipped test split (first ``limit`` samples; any prefix is skill-balanced).

    ``root`` defaults to ``eval/data/synth_vqa`` of the source checkout (or of the working directory);
    when the files are not there (an installed wheel), the same samples are generated in memory.
    """
    if root is None:
        root = _repo_data_root()
        if root is None:
            return generate_split("test", TEST_SIZE if limit is None else min(limit, TEST_SIZE))
    return load_split(root, "test", limit)


__all__ = [
    "ANSWERS", "CHANCE", "CHARACTERS", "COLOR_NAMES", "IMAGE_SIZE", "MAX_COUNT", "RELATIONS", "SHAPES", "SKILLS", "SPLITS",
    "TEST_SIZE", "SceneObject", "VQASample", "export_split", "generate_sample", "generate_split",
    "iterate_split", "load_split", "load_test_split", "scene_questions", "spatial_question",
]
