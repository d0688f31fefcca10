"""Scenes of the synthetic VQA task and their rendering (numpy only, bit-identical everywhere).

A scene is a 64x64 RGB image: a low-saturation textured background (noise, stripes, checker or
blotches) and a few objects -- coloured shapes (circle, square, triangle, cross) of a regular size
(9-14 px, i.e. ~3 patches of 4 px), at most one *small* shape (4-6 px, ~1-2 patches) and optional
light "signs" carrying one dark 5x7 character drawn at 2x (12x16 px).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .glyphs import CHARACTERS, glyph_mask

IMAGE_SIZE = 64

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 185, 60),
    "blue": (45, 85, 235),
    "yellow": (240, 215, 35),
    "purple": (150, 55, 200),
    "orange": (245, 135, 25),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
REGULAR_SIZE = (9, 14)   # inclusive range of a regular shape's side in pixels
SMALL_SIZE = (4, 6)      # the fine-detail object
SIGN_SIZE = (16, 12)     # (height, width) of a sign plate
COLOR_JITTER = 12


@dataclass(frozen=True)
class SceneObject:
    """One object: ``kind`` "shape" or "sign"; ``box`` = (x0, y0, x1, y1) in pixels, end-exclusive."""

    kind: str
    box: tuple[int, int, int, int]
    color: str | None = None       # shapes
    shape: str | None = None       # shapes
    small: bool = False            # shapes: the fine-detail size
    char: str | None = None        # signs

    @property
    def center(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2

    def to_dict(self) -> dict:
        """JSON-ready dict with every field (None where it does not apply), box as a list."""
        data = asdict(self)
        data["box"] = list(self.box)
        return data

    @staticmethod
    def from_dict(data: dict) -> SceneObject:
        return SceneObject(
            kind=data["kind"], box=tuple(data["box"]), color=data.get("color"), shape=data.get("shape"),
            small=bool(data.get("small", False)), char=data.get("char"),
        )


def _overlaps(box, placed, gap: int) -> bool:
    x0, y0, x1, y1 = box
    return any(x0 < b[2] + gap and b[0] < x1 + gap and y0 < b[3] + gap and b[1] < y1 + gap for b in placed)


def place_box(rng: np.random.Generator, placed: list, height: int, width: int, gap: int = 2,
              tries: int = 200, accept=None) -> tuple[int, int, int, int] | None:
    """A random ``(x0, y0, x1, y1)`` box of the given size inside the image, not touching ``placed``
    boxes (``gap`` pixels apart) and satisfying ``accept(box)``; None if none was found."""
    for _ in range(tries):
        x0 = int(rng.integers(1, IMAGE_SIZE - width))
        y0 = int(rng.integers(1, IMAGE_SIZE - height))
        box = (x0, y0, x0 + width, y0 + height)
        if _overlaps(box, placed, gap):
            continue
        if accept is not None and not accept(box):
            continue
        return box
    return None


def _background(rng: np.random.Generator) -> np.ndarray:
    """[64, 64, 3] float: grey-ish base with a slight tint and one of four textures."""
    n = IMAGE_SIZE
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float64)
    base = rng.uniform(70, 150) + rng.normal(0, 8, size=3)  # [3]
    kind = int(rng.integers(4))
    if kind == 0:  # fine noise
        texture = rng.normal(0, 14, size=(n, n))
    elif kind == 1:  # stripes of random orientation and period
        theta = rng.uniform(0, np.pi)
        period = rng.uniform(4, 10)
        texture = rng.uniform(12, 22) * np.sin(2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / period
                                                + rng.uniform(0, 2 * np.pi))
    elif kind == 2:  # checkerboard
        cell = int(rng.integers(3, 9))
        texture = rng.uniform(10, 18) * (((xx // cell + yy // cell) % 2) * 2 - 1)
    else:  # blotches: a coarse random grid upsampled (nearest, then smoothed by a box filter)
        coarse = rng.normal(0, 22, size=(8, 8))
        texture = np.kron(coarse, np.ones((8, 8)))
        kernel = 5
        padded = np.pad(texture, kernel // 2, mode="edge")
        windows = np.lib.stride_tricks.sliding_window_view(padded, (kernel, kernel))
        texture = windows.mean(axis=(-1, -2))
    image = base[None, None, :] + texture[:, :, None] + rng.normal(0, 4, size=(n, n, 3))
    return image


def _shape_mask(shape: str, box: tuple[int, int, int, int]) -> np.ndarray:
    """Boolean [64, 64] mask of ``shape`` inscribed in ``box``."""
    x0, y0, x1, y1 = box
    size = x1 - x0
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float64) + 0.5  # pixel centres
    dx, dy = xx - cx, yy - cy
    half = size / 2
    if shape == "square":
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == "circle":
        return dx**2 + dy**2 <= half**2
    if shape == "triangle":  # pointing up
        from_top = yy - y0
        return (from_top >= 0) & (yy <= y1) & (np.abs(dx) <= from_top / 2 + 0.25)
    if shape == "cross":
        arm = max(size / 6, 1.0)
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= half)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= half))
    raise ValueError(f"unknown shape {shape!r}")


def render(objects: list[SceneObject], rng: np.random.Generator) -> np.ndarray:
    """uint8 [64, 64, 3] image of ``objects`` on a random textured background."""
    image = _background(rng)
    for obj in objects:
        if obj.kind == "shape":
            color = np.array(COLORS[obj.color], dtype=np.float64) + rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, 3)
            image[_shape_mask(obj.shape, obj.box)] = color
        elif obj.kind == "sign":
            x0, y0, x1, y1 = obj.box
            image[y0:y1, x0:x1] = rng.uniform(205, 240) + rng.normal(0, 3, size=3)
            glyph = glyph_mask(obj.char)  # [14, 10]
            gy, gx = y0 + (y1 - y0 - glyph.shape[0]) // 2, x0 + (x1 - x0 - glyph.shape[1]) // 2
            region = image[gy:gy + glyph.shape[0], gx:gx + glyph.shape[1]]
            region[glyph] = rng.uniform(10, 50)
        else:
            raise ValueError(f"unknown object kind {obj.kind!r}")
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def object_map(objects: list[SceneObject] | tuple[SceneObject, ...]) -> np.ndarray:
    """int [64, 64]: index of the object drawn at each pixel (later objects on top, as rendered), -1 elsewhere."""
    index = np.full((IMAGE_SIZE, IMAGE_SIZE), -1, dtype=np.int64)
    for i, obj in enumerate(objects):
        if obj.kind == "shape":
            index[_shape_mask(obj.shape, obj.box)] = i
        else:
            x0, y0, x1, y1 = obj.box
            index[y0:y1, x0:x1] = i
    return index


__all__ = [
    "CHARACTERS", "COLORS", "IMAGE_SIZE", "PLURALS", "SHAPES", "SceneObject", "object_map", "place_box", "render",
]
