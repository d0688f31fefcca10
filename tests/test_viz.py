"""vtprune.viz (kept-token overlay) and `vtprune run --show`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import vtprune
from vtprune.cli import main
from vtprune.testing import tiny_image, tiny_inputs
from vtprune.viz import overlay


def _run(model, processor, method, budget):
    image = tiny_image(size=(48, 64))
    inputs = tiny_inputs(processor, [image], ["Describe the image."])
    vtprune.apply(model, method, budget=budget)
    with torch.inference_mode():
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    return image, inputs


def _panels(sheet: Image.Image, count: int) -> list[np.ndarray]:
    """Split the first row of the sheet into ``count`` equal panels (without the title strip)."""
    array = np.asarray(sheet)
    width = (array.shape[1] - 6 * (count - 1)) // count
    return [array[30:286, i * (width + 6): i * (width + 6) + width] for i in range(count)]


def test_overlay_darkens_exactly_the_pruned_tokens(tiny_models):
    model, processor = tiny_models["llava"]
    image, inputs = _run(model, processor, "fastervlm", 16)
    sheet = overlay(model, inputs, image, processor=processor)
    vtprune.remove(model)
    full, pruned = _panels(sheet, 2)
    cell = 256 // 8  # 8x8 token grid drawn on 256 px
    centres = full[cell // 2::cell, cell // 2::cell].astype(float).sum(-1)
    after = pruned[cell // 2::cell, cell // 2::cell].astype(float).sum(-1)
    darkened = after < 0.5 * centres
    assert int((~darkened).sum()) == 16 and int(darkened.sum()) == 64 - 16


def test_overlay_one_column_per_stage_and_merged_title(tiny_models):
    model, processor = tiny_models["llava"]
    image, inputs = _run(model, processor, ["divprune", "fastv"], 0.75)
    stages = len(vtprune.stats(model).samples[0].stages)
    sheet = overlay(model, inputs, image, processor=processor)
    vtprune.remove(model)
    assert stages == 2 and sheet.width > 3 * 256

    image, inputs = _run(model, processor, "visionzip", 16)
    assert vtprune.stats(model).samples[0].stages[0].merged > 0
    assert overlay(model, inputs, image, processor=processor).width > 2 * 256
    vtprune.remove(model)


def test_overlay_needs_a_pruned_forward(tiny_models):
    model, processor = tiny_models["llava"]
    inputs = tiny_inputs(processor, [tiny_image()], ["Hi"])
    with pytest.raises(vtprune.VTPruneError, match="not pruned"):
        overlay(model, inputs)


def test_cli_run_show_writes_an_image(tmp_path, capsys):
    out = tmp_path / "kept.png"
    code = main(["run", "--model", "tiny:llava_next", "--method", "fastervlm", "--budget", "0.25",
                 "--max-new-tokens", "2", "--device", "cpu", "--show", str(out)])
    assert code == 0 and out.is_file()
    assert "kept tokens drawn to" in capsys.readouterr().out
    with Image.open(out) as drawn:
        assert drawn.width > 2 * 256 and drawn.height > 256  # base view + crops, input + one stage


def test_input_panel_is_clean_and_the_sheet_has_caption_legend_and_crop_labels(tiny_models):
    from vtprune.adapters.base import adapter_for
    from vtprune.viz import _views

    model, processor = tiny_models["llava"]
    image, inputs = _run(model, processor, "fastervlm", 16)
    plain = overlay(model, inputs, image, processor=processor)
    captioned = overlay(model, inputs, image, processor=processor, caption="Q: what?\nA: red")
    vtprune.remove(model)
    assert captioned.height > plain.height  # the question and answer sit above the panels
    full, pruned = _panels(plain, 2)
    outline = np.array([40, 220, 90])  # vtprune.viz._KEPT
    assert not (full == outline).all(-1).any()  # no outline on the input panel: the picture itself
    assert (pruned == outline).all(-1).any()
    legend = np.asarray(plain)[-22:]
    assert (legend < 250).any()  # the legend strip is drawn

    model, processor = tiny_models["llava_next"]
    image, inputs = _run(model, processor, "divprune", 16)
    layout = adapter_for(model).build_layouts(dict(inputs))[0]
    labels = [view[0] for view in _views(model, layout, dict(inputs), image, processor)]
    vtprune.remove(model)
    assert labels[0] == "image, base view" and len(labels) == len(set(labels)) > 1
    assert all(label.startswith("image, crop ") for label in labels[1:])
