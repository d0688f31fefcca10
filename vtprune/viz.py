"""Draw which visual tokens a pruned forward kept: ``vtprune run --show out.png``.

    inputs = processor(images=[image], text=[prompt], return_tensors="pt")
    vtprune.apply(model, "fastervlm", budget=32)
    model.generate(**inputs, max_new_tokens=4)
    vtprune.viz.save_overlay("kept.png", model, inputs, image)

One column per pruning stage of ``vtprune.stats(model)`` (after the input column), one row per token group
(the image; for LLaVA-NeXT the base view and the crop grid). Kept tokens stay bright with a green outline,
pruned ones are darkened. When a stage merged tokens (VisionZip's contextual tokens, ...), its title says how
many, and the pruned tokens are tinted blue instead of dark: their content lives on in the merged tokens.
If a stage records the sequence positions its merged tokens took (``merged_positions``), those cells get
an orange outline.

Token cells are placed with the model's own layout (:meth:`Adapter.build_layouts`): the grid of each group is
drawn over the image the vision encoder saw (LLaVA: the un-normalised ``pixel_values``; otherwise the input
image stretched to the grid, which is what Qwen-VL's resize and LLaVA-NeXT's unpadded crop grid show).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

__all__ = ["overlay", "save_overlay", "save_strip", "strip"]

_KEPT = (40, 220, 90)
_MERGED = (255, 150, 30)
_DROPPED_DIM = 0.28           # brightness left to a pruned token
_MERGED_TINT = (70, 110, 200)  # pruned tokens whose content went into merged tokens
_PANEL = 256                  # long side of a panel in pixels
_TITLE = 30


def _pixel_rows(inputs: dict[str, Any]) -> torch.Tensor | None:
    """pixel_values as [vision rows, 3, H, W] (LLaVA: 4-D; LLaVA-NeXT: [images, crops, 3, H, W] flattened),
    or None when the model takes flattened patches (Qwen-VL)."""
    pixels = inputs.get("pixel_values")
    if not isinstance(pixels, torch.Tensor):
        return None
    if pixels.dim() == 5:
        return pixels.flatten(0, 1)
    return pixels if pixels.dim() == 4 else None


def _model_view(pixels: torch.Tensor, row: int, processor) -> Image.Image:
    """The image the vision tower saw for vision row ``row``, un-normalised with the processor's mean/std."""
    image_processor = getattr(processor, "image_processor", None)
    mean = np.array(getattr(image_processor, "image_mean", None) or [0.0, 0.0, 0.0], dtype=np.float32)
    std = np.array(getattr(image_processor, "image_std", None) or [1.0, 1.0, 1.0], dtype=np.float32)
    array = pixels[row].detach().float().cpu().numpy().transpose(1, 2, 0)  # [H, W, 3]
    array = np.clip((array * std + mean) * 255.0, 0, 255).round().astype(np.uint8)
    return Image.fromarray(array, mode="RGB")


def _vit_grid(model) -> int | None:
    """Patches per side of one square vision-encoder input (CLIP-style configs), else None."""
    vision = getattr(model.config, "vision_config", None)
    image_size, patch_size = getattr(vision, "image_size", None), getattr(vision, "patch_size", None)
    if isinstance(image_size, int) and isinstance(patch_size, int) and patch_size > 0:
        return image_size // patch_size
    return None


def _panel(base: Image.Image, height: int, width: int, cells: np.ndarray, kept: np.ndarray, merged_into: bool,
           merged: np.ndarray | None, title: str, outlines: bool = True, side: int = _PANEL,
           title_height: int = _TITLE) -> Image.Image:
    """One panel: ``base`` resized so the long side is _PANEL px with a ``height x width`` token grid on top.
    ``cells`` (int [n], raster index) are the grid cells that are tokens, ``kept`` (bool [n]) which of them
    the stage kept, ``merged`` (bool [n] or None) which took a merged token; other cells are hatched."""
    scale = side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    picture = np.asarray(base.convert("RGB").resize(size, Image.NEAREST), dtype=np.float32).copy()
    state = np.full(height * width, -1)  # -1: no token, 0: pruned, 1: kept
    state[cells] = kept.astype(int)
    ys = np.minimum((np.arange(size[1]) / scale).astype(int), height - 1)
    xs = np.minimum((np.arange(size[0]) / scale).astype(int), width - 1)
    pixel_state = state.reshape(height, width)[ys[:, None], xs[None, :]]  # [H, W]
    dropped = pixel_state == 0
    if merged_into:
        picture[dropped] = 0.45 * picture[dropped] + 0.55 * np.array(_MERGED_TINT, dtype=np.float32)
    else:
        picture[dropped] *= _DROPPED_DIM
    absent = pixel_state < 0
    stripes = ((np.arange(size[1])[:, None] + np.arange(size[0])[None, :]) // 4) % 2 == 0
    picture[absent] = np.where(stripes[absent][:, None], 200.0, 235.0)
    canvas = Image.new("RGB", (size[0], size[1] + title_height), (255, 255, 255))
    canvas.paste(Image.fromarray(picture.round().astype(np.uint8)), (0, title_height))
    draw = ImageDraw.Draw(canvas)

    def outline(index: int, color, width_px: int) -> None:
        r, c = divmod(int(index), width)
        draw.rectangle((c * scale, title_height + r * scale, (c + 1) * scale - 1,
                        title_height + (r + 1) * scale - 1), outline=color, width=width_px)

    for index in cells[kept] if outlines else ():  # the input panel shows the picture itself
        outline(index, _KEPT, 1 if scale < 12 else 2)
    if merged is not None:
        for index in cells[merged]:
            outline(index, _MERGED, 2)
    font = ImageFont.load_default()
    for line_index, line in enumerate(title.split("\n")[:max(1, (title_height - 4) // 13)]):
        draw.text((3, 2 + 13 * line_index), line, fill=(0, 0, 0), font=font)
    return canvas


def _views(model, layout, call: dict[str, Any], image: Image.Image | None, processor):
    """Yield (label, base image, grid height, grid width, cells, sequence positions) per drawable view: one per
    vision-encoder input when its pixels can be shown (tokens placed by their patch index), else one per
    token group drawn over the original image. Labels name the image and, for AnyRes, the base view / crop."""
    pixels, side = _pixel_rows(call), _vit_grid(model)
    for image_index, img in enumerate(layout.images):
        name = f"image {image_index + 1}" if len(layout.images) > 1 else "image"
        first_row = int(min(int(g.vision_row.min()) for g in img.groups)) if img.groups else 0
        for group_index, group in enumerate(img.groups):
            positions = img.positions[group.members].cpu()  # [g]
            rows = torch.unique(group.vision_row)
            if pixels is not None and side is not None and int(rows.max()) < pixels.shape[0] \
                    and int(group.patch_index.max()) < side * side:
                for row in rows.tolist():
                    mine = (group.vision_row == row).cpu()
                    crop = row - first_row  # 0: the base view of an AnyRes image
                    part = "" if len(img.groups) == 1 else (", base view" if crop == 0 else f", crop {crop}")
                    yield (name + part, _model_view(pixels, row, processor), side, side,
                           group.patch_index[mine].cpu().numpy(), positions[mine])
            elif group.height and group.width:
                if image is None:
                    raise ValueError("pass the original image: the model's view cannot be rebuilt from the inputs")
                part = "" if len(img.groups) == 1 else (", base view" if group_index == 0 else ", crop grid")
                yield name + part, image, group.height, group.width, np.arange(group.size), positions


def _legend(width: int, merged: bool) -> Image.Image:
    """A strip explaining the colours of the panels."""
    font = ImageFont.load_default()
    entries = [("kept (green outline)", (200, 200, 200), _KEPT), ("pruned (darkened)", (60, 60, 60), None)]
    if merged:
        entries += [("merged away (blue)", _MERGED_TINT, None), ("merged token's place", (200, 200, 200), _MERGED)]
    entries.append(("no token (hatched)", (220, 220, 220), None))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    places, x, y = [], 4, 0
    for label, fill, edge in entries:  # wrap onto a new line where the sheet is narrow
        step = 22 + int(probe.textlength(label, font=font)) + 12
        if x > 4 and x + step > width:
            x, y = 4, y + 20
        places.append((x, y, label, fill, edge))
        x += step
    strip = Image.new("RGB", (width, y + 22), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for x, y, label, fill, edge in places:
        draw.rectangle((x, y + 5, x + 12, y + 17), fill=fill, outline=edge or (120, 120, 120), width=2 if edge else 1)
        draw.text((x + 16, y + 6), label, fill=(0, 0, 0), font=font)
    return strip


def _caption(width: int, text: str) -> Image.Image:
    """Lines of ``text`` (the question and the answer) wrapped to ``width`` pixels."""
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines: list[str] = []
    for paragraph in text.split("\n"):
        words, line = paragraph.split(), ""
        for word in words:
            candidate = f"{line} {word}".strip()
            if line and probe.textlength(candidate, font=font) > width - 8:
                lines.append(line)
                line = word
            else:
                line = candidate
        lines.append(line)
    strip = Image.new("RGB", (width, 6 + 13 * len(lines)), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for i, line in enumerate(lines):
        draw.text((4, 3 + 13 * i), line, fill=(0, 0, 0), font=font)
    return strip


def overlay(model, inputs: dict[str, Any], image: Image.Image | None = None, sample: int = 0,
            processor=None, caption: str | None = None) -> Image.Image:
    """A PIL image of the tokens kept at each stage of the last pruned forward of ``model`` on ``inputs``.

    ``inputs`` are the processor outputs of that forward (``input_ids``, ``pixel_values``, ...); ``image``
    the original image (used where the model's view cannot be reconstructed); ``sample`` the batch row;
    ``processor`` (optional) supplies the normalisation to un-normalise LLaVA ``pixel_values``; ``caption``
    (optional) is printed above the panels (``vtprune run --show`` puts the question and the answer there). A
    legend of the colours is printed below.
    """
    from .adapters.base import adapter_for
    from .api import stats as prune_stats

    stats = prune_stats(model)
    if not 0 <= sample < len(stats.samples):
        raise IndexError(f"sample {sample} is not in the last batch ({len(stats.samples)} samples)")
    sample_stats = stats.samples[sample]
    call = dict(inputs)
    layout = adapter_for(model).build_layouts(call)[sample]
    if not layout.images:
        raise ValueError("this sample has no image tokens; nothing to draw.")

    rows = []
    any_merged = False
    for label, base, height, width, cells, positions in _views(model, layout, call, image, processor):
        everything = np.ones(len(cells), dtype=bool)
        panels = [_panel(base, height, width, cells, everything, False, None,
                         f"{label}: {len(cells)} tokens", outlines=False)]
        for stage in sample_stats.stages:
            kept = torch.isin(positions, stage.kept_positions.cpu()).numpy()
            anchors = getattr(stage, "merged_positions", None)
            merged = torch.isin(positions, anchors.cpu()).numpy() if anchors is not None else None
            title = f"{stage.name} @L{stage.layer}: kept {int(kept.sum())}/{len(cells)}"
            if stage.merged:
                title += f"\n+{stage.merged} merged tokens (blue: merged away)"
                any_merged = True
            panels.append(_panel(base, height, width, cells, kept, stage.merged > 0, merged, title))
        rows.append(panels)
    if not rows:
        raise ValueError("the visual tokens of this model have no 2-D grid layout to draw.")

    gap = 6
    width = max(sum(p.width for p in row) + gap * (len(row) - 1) for row in rows)
    header = _caption(width, caption) if caption else None
    legend = _legend(width, any_merged)
    height = sum(max(p.height for p in row) for row in rows) + gap * (len(rows) - 1) + legend.height \
        + (header.height if header else 0)
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    y = 0
    if header is not None:
        sheet.paste(header, (0, 0))
        y = header.height
    for row in rows:
        x = 0
        for panel in row:
            sheet.paste(panel, (x, y))
            x += panel.width + gap
        y += max(p.height for p in row) + gap
    sheet.paste(legend, (0, height - legend.height))
    return sheet


def save_overlay(path: str | Path, model, inputs: dict[str, Any], image: Image.Image | None = None,
                 sample: int = 0, processor=None, caption: str | None = None) -> Path:
    """Write :func:`overlay` to ``path`` (format from the suffix, e.g. .png) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    overlay(model, inputs, image, sample, processor, caption).save(path)
    return path


# ------------------------------------------------------------------------------------------ video strips

_STRIP_PANEL = 120   # long side of one frame's panel
_STRIP_COLUMNS = 8   # frames per row of the strip


def strip(model, inputs: dict[str, Any], video, sample: int = 0, caption: str | None = None,
          columns: int = _STRIP_COLUMNS) -> Image.Image:
    """A PIL image of the visual tokens of the last pruned forward of ``model`` on a video, frame by frame.

    One block per pruning stage of ``vtprune.stats(model)``; in a block one panel per frame (Qwen-VL: per temporal
    group of 2 frames, drawn over its first frame), ``columns`` panels a row, each titled with the frame's time
    and its kept / total tokens. Colours as in :func:`overlay`: kept tokens bright with a green outline, pruned
    ones darkened, or tinted blue when the stage merged tokens (their content lives on in the merged ones), and
    the places merged tokens took outlined orange. ``video``: the :class:`vtprune.video.Video` (or uint8 frames
    [T, H, W, 3]) the inputs were made from.
    """
    from .adapters.base import adapter_for
    from .api import stats as prune_stats

    stats = prune_stats(model)
    if not 0 <= sample < len(stats.samples):
        raise IndexError(f"sample {sample} is not in the last batch ({len(stats.samples)} samples)")
    sample_stats = stats.samples[sample]
    layout = adapter_for(model).build_layouts(dict(inputs))[sample]
    spans = [span for span in layout.images if getattr(span, "kind", "image") == "video"]
    if not spans:
        raise ValueError("this sample has no video tokens; use overlay() for images.")
    span = spans[0]
    frames = np.asarray(getattr(video, "frames", video))  # [T, H, W, 3]
    per_group = max(1, round(len(frames) / len(span.groups)))
    times = getattr(video, "timestamps", None)
    span_times = getattr(span, "frame_times", None)
    stages = list(sample_stats.stages)
    if not stages:
        raise ValueError("no pruning stage ran on this sample; nothing to draw.")
    blocks, any_merged = [], False
    for stage in stages:
        kept_positions = stage.kept_positions.cpu()
        anchors = getattr(stage, "merged_positions", None)
        panels, kept_total = [], 0
        for t, group in enumerate(span.groups):
            positions = span.positions[group.members].cpu()  # [g]
            kept = torch.isin(positions, kept_positions).numpy()
            merged = torch.isin(positions, anchors.cpu()).numpy() if anchors is not None else None
            kept_total += int(kept.sum())
            first = min(t * per_group, len(frames) - 1)
            if span_times is not None:
                when = float(span_times[t])
            elif times is not None:
                when = float(times[first])
            else:
                when = None
            label = (f"frames {first}-{first + per_group - 1}" if per_group > 1 else f"frame {first}") + \
                (f", {when:.1f} s" if when is not None else "")
            height, width = group.height, group.width
            if not (height and width):
                raise ValueError("the video tokens of this model have no 2-D grid per frame to draw.")
            panels.append(_panel(Image.fromarray(frames[first]), height, width, np.arange(group.size), kept,
                                 stage.merged > 0, merged, f"{label}\nkept {int(kept.sum())}/{group.size}" +
                                 (f", {int(merged.sum())} merged here" if merged is not None and merged.any() else ""),
                                 side=_STRIP_PANEL))
        total = sum(group.size for group in span.groups)
        title = f"{stage.name} @L{stage.layer}: kept {kept_total}/{total} video tokens over {len(span.groups)} frames"
        if per_group > 1:
            title += f" ({per_group} frames per temporal group)"
        if stage.merged:
            title += f", +{stage.merged} merged tokens (blue: merged away)"
            any_merged = True
        blocks.append((title, panels))

    gap = 4
    width = max(min(len(p), columns) * (p[0].width + gap) for _, p in blocks) - gap
    parts: list[Image.Image] = []
    if caption:
        parts.append(_caption(width, caption))
    for title, panels in blocks:
        parts.append(_caption(width, title))
        for row_start in range(0, len(panels), columns):
            row = panels[row_start:row_start + columns]
            line = Image.new("RGB", (width, max(p.height for p in row) + gap), (255, 255, 255))
            x = 0
            for panel in row:
                line.paste(panel, (x, 0))
                x += panel.width + gap
            parts.append(line)
    parts.append(_legend(width, any_merged))
    sheet = Image.new("RGB", (width, sum(p.height for p in parts)), (255, 255, 255))
    y = 0
    for part in parts:
        sheet.paste(part, (0, y))
        y += part.height
    return sheet


def save_strip(path: str | Path, model, inputs: dict[str, Any], video, sample: int = 0,
               caption: str | None = None, columns: int = _STRIP_COLUMNS) -> Path:
    """Write :func:`strip` to ``path`` (format from the suffix, e.g. .png) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    strip(model, inputs, video, sample, caption, columns).save(path)
    return path
