"""Scenes of the synthetic VQA task and their rendering (numpy only, bit-identical everywhere).

A scene is a 128x128 RGB image on a grid of 8x8-pixel cells (16x16 cells: one cell per vision-encoder patch
of the micro-VLMs). Objects sit on the grid, so every patch shows one recognisable part of one object:

* regular shapes (circle, square, triangle, cross; 13-16 px) fill a block of 2x2 cells, one quadrant per cell;
* the *small* shape (6-8 px, fine-detail skill) fills one cell;
* a *sign* is one light cell carrying one dark 5x7 character (OCR skill).

The background is a low-saturation texture (noise, stripes, checker or blotches) drawn at half resolution.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .glyphs import CHARACTERS, GLYPH_HEIGHT, GLYPH_WIDTH, glyph_mask

IMAGE_SIZE = 128
CELL = 8                       # pixels per grid cell (= one vision patch of the micro-VLMs)
GRID = IMAGE_SIZE // CELL      # 16 cells per side

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
REGULAR_CELLS, SMALL_CELLS, SIGN_CELLS = 2, 1, 1  # side of each kind of object in cells
REGULAR_SIZE = (13, 16)   # inclusive range of a regular shape's side in pixels (inside its 2x2 block)
SMALL_SIZE = (6, 8)       # the fine-detail object (inside one cell)
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


def _block(box) -> tuple[int, int, int, int]:
    """The grid cells (cx0, cy0, cx1, cy1) a pixel box lies in, end-exclusive."""
    x0, y0, x1, y1 = box
    return x0 // CELL, y0 // CELL, (x1 - 1) // CELL + 1, (y1 - 1) // CELL + 1


def place_block(rng: np.random.Generator, placed: list, cells: int, gap: int = 1, tries: int = 200,
                accept=None, grid: int = GRID) -> tuple[int, int, int, int] | None:
    """A random block of ``cells x cells`` grid cells ``(cx0, cy0, cx1, cy1)`` on a ``grid x grid`` board that
    keeps ``gap`` free cells to every ``placed`` pixel box and satisfies ``accept(block)``; None if none was
    found."""
    taken = [_block(b) for b in placed]
    for _ in range(tries):
        cx0 = int(rng.integers(0, grid - cells + 1))
        cy0 = int(rng.integers(0, grid - cells + 1))
        block = (cx0, cy0, cx0 + cells, cy0 + cells)
        if any(cx0 < t[2] + gap and t[0] < block[2] + gap and cy0 < t[3] + gap and t[1] < block[3] + gap
               for t in taken):
            continue
        if accept is not None and not accept(block):
            continue
        return block
    return None


def box_in_block(block, size: int) -> tuple[int, int, int, int]:
    """The ``size x size`` pixel box centred in a grid block."""
    cx0, cy0, cx1, cy1 = block
    side = (cx1 - cx0) * CELL
    x0, y0 = cx0 * CELL + (side - size) // 2, cy0 * CELL + (side - size) // 2
    return x0, y0, x0 + size, y0 + size


def background(rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """[size, size, 3] float: grey-ish base with a slight tint and one of four textures (drawn at half
    resolution, each texel 2x2 pixels: cheaper to store, and the texture stays finer than an 8 px patch).
    ``size`` must be a multiple of 16."""
    n = size // 2
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
        texture = np.kron(coarse, np.ones((n // 8, n // 8)))
        kernel = 5
        padded = np.pad(texture, kernel // 2, mode="edge")
        windows = np.lib.stride_tricks.sliding_window_view(padded, (kernel, kernel))
        texture = windows.mean(axis=(-1, -2))
    image = base[None, None, :] + texture[:, :, None] + rng.normal(0, 4, size=(n, n, 3))
    return np.kron(image, np.ones((2, 2, 1)))  # [size, size, 3]


_background = background


def shape_mask(shape: str, box: tuple[int, int, int, int], image_size: int = IMAGE_SIZE) -> np.ndarray:
    """Boolean [image_size, image_size] mask of ``shape`` inscribed in ``box``."""
    x0, y0, x1, y1 = box
    size = x1 - x0
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    yy, xx = np.mgrid[0:image_size, 0:image_size].astype(np.float64) + 0.5  # pixel centres
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


_shape_mask = shape_mask


def render(objects: list[SceneObject], rng: np.random.Generator) -> np.ndarray:
    """uint8 [128, 128, 3] image of ``objects`` on a random textured background."""
    image = _background(rng)
    for obj in objects:
        if obj.kind == "shape":
            color = np.array(COLORS[obj.color], dtype=np.float64) + rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, 3)
            image[_shape_mask(obj.shape, obj.box)] = color
        elif obj.kind == "sign":
            x0, y0, x1, y1 = obj.box
            image[y0:y1, x0:x1] = rng.uniform(205, 240) + rng.normal(0, 3, size=3)
            glyph = glyph_mask(obj.char, scale=1)  # [7, 5]
            gy, gx = y0 + (y1 - y0 - GLYPH_HEIGHT) // 2, x0 + (x1 - x0 - GLYPH_WIDTH) // 2
            region = image[gy:gy + glyph.shape[0], gx:gx + glyph.shape[1]]
            region[glyph] = rng.uniform(10, 50)
        else:
            raise ValueError(f"unknown object kind {obj.kind!r}")
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def object_map(objects: list[SceneObject] | tuple[SceneObject, ...]) -> np.ndarray:
    """int [128, 128]: index of the object drawn at each pixel (later objects on top, as rendered), -1 elsewhere."""
    index = np.full((IMAGE_SIZE, IMAGE_SIZE), -1, dtype=np.int64)
    for i, obj in enumerate(objects):
        if obj.kind == "shape":
            index[_shape_mask(obj.shape, obj.box)] = i
        else:
            x0, y0, x1, y1 = obj.box
            index[y0:y1, x0:x1] = i
    return index


__all__ = [
    "CELL", "CHARACTERS", "COLORS", "GRID", "IMAGE_SIZE", "PLURALS", "SHAPES", "SceneObject", "box_in_block",
    "background", "object_map", "place_block", "render", "shape_mask",
]
