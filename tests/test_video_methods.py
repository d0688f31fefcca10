"""The video methods (vtprune/catalog/video.py) on the tiny video families: the glue hands each method's core the
clip the engine built and returns its answer unchanged; known answers through a real model (a static clip); the
companion stages (HoliTom's inner merge, PruneVid's in-LLM selection, DyCoke's decode-time KV pruning) install and
switch off; images: a one-frame clip, or a clear refusal (DyCoke). The video invariants of every registered method
(reference equivalence, batching, positions, generate) are in tests/test_video.py, which iterates the registry.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("torchvision", reason="video inputs go through the HF video processors, which need torchvision (the video extra)")

import vtprune
from vtprune.adapters.base import adapter_for
from vtprune.errors import BudgetError, MethodOptionError
from vtprune.registry import method_class
from vtprune.selectors.video import (
    dycoke_ttm,
    fastvid_select,
    holitom_select,
    prunevid_merge,
    visionzip_video_select,
)
from vtprune.testing import FAMILIES, tiny_image, tiny_inputs, tiny_vlm

VIDEO_FAMILIES = tuple(f for f in ("llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl") if f in FAMILIES)
METHODS = ("holitom", "fastvid", "dycoke", "prunevid", "visionzip_video")
PROMPT = "What is in this video?"


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


_MODELS: dict[str, tuple] = {}


def _model(family: str):
    if family not in _MODELS:
        _MODELS[family] = tiny_vlm(family)
    return _MODELS[family]


def _clip(seed: int, frames: int = 8, size=(56, 56), static: bool = False) -> np.ndarray:
    """uint8 [frames, H, W, 3]: noise plus a box moving from frame to frame (or one frame repeated)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
    out = np.repeat(base[None], frames, axis=0) if static else rng.integers(0, 256, (frames, *size, 3), dtype=np.uint8)
    if not static:
        for t in range(frames):
            y, x = (4 * t) % (size[0] - 8), (6 * t) % (size[1] - 8)
            out[t, y:y + 8, x:x + 8] = (255, 0, 0)
    return out


def _video_inputs(processor, video: np.ndarray, prompt: str = PROMPT):
    content = [{"type": "video"}, {"type": "text", "text": prompt}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)
    return processor(text=[text], videos=[video], return_tensors="pt", padding=True)


def _capture(monkeypatch, name: str) -> list:
    """Record (clip, k, selection) of every select_clip call of method ``name``."""
    calls = []
    cls = method_class(name)
    original = cls.select_clip

    def spy(self, clip, k):
        selection = original(self, clip, k)
        calls.append((clip, k, selection))
        return selection

    monkeypatch.setattr(cls, "select_clip", spy)
    return calls


def _core(name: str, clip, k: int, budget):
    """The method's core on the captured clip, at the registry defaults (the glue's expected answer)."""
    info = vtprune.methods()[name].defaults
    feats, attn = clip.features, clip.signals.get("cls_attention")
    total = clip.frames * clip.tokens_per_frame
    if name == "holitom":
        ratio = budget if isinstance(budget, float) else k / total
        return holitom_select(feats, attn, ratio, tau=info["tau"], beta=info["beta"], dominant_share=info["d"],
                              knn=info["k"], max_window=info["max_window"], max_tokens=k)
    if name == "fastvid":
        return fastvid_select(feats, attn, feats.float().mean(dim=1), k // clip.frames, info["d"], info["p"],
                              info["beta"], info["c"], info["tau"])
    if name == "visionzip_video":
        keys = clip.signals["vit_keys"].reshape(clip.frames, clip.tokens_per_frame, -1)
        return visionzip_video_select(feats, keys, attn, max(1, k // clip.frames), info["dominant_ratio"])
    if name == "prunevid":
        return prunevid_merge(feats, info["tau"], info["cluster_ratio"], info["temporal_segment_ratio"], info["k"])[0]
    raise AssertionError(name)


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_glue_returns_the_core_answer(family, method, monkeypatch):
    model, processor = _model(family)
    inputs = _video_inputs(processor, _clip(0))
    calls = _capture(monkeypatch, method)
    # dycoke keeps the pattern's whole frames (half of 4 frames); prunevid's stage 1 has no budget (a cap)
    budget = {"dycoke": 0.6, "prunevid": 0.9}.get(method, 0.25)
    with vtprune.pruned(model, method, budget=budget):
        model(**inputs)
        stats = vtprune.stats(model).samples[0]
    (clip, k, selection), = calls
    assert clip.features.dim() == 3 and clip.frames >= 2
    assert selection.keep.numel() + selection.num_merged <= k
    if method == "dycoke":  # explicit budget: frame 0 whole, the pruned frames at the count that fits
        n = clip.tokens_per_frame
        assert int((selection.keep < n).sum()) == n
    elif method == "prunevid" and _core(method, clip, k, budget).num_tokens > k:  # the cap re-clusters
        assert selection.keep.numel() + selection.num_merged <= k
    else:
        want = _core(method, clip, k, budget)
        assert torch.equal(selection.keep.cpu(), want.keep.cpu())
        if want.merged is not None:
            torch.testing.assert_close(selection.merged, want.merged)
            assert torch.equal(selection.anchors.cpu(), want.anchors.cpu())
            torch.testing.assert_close(selection.weights, want.weights)
    assert stats.stages[0].name == method and stats.stages[0].visual_out <= k + 1  # + a trailing newline


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_holitom_static_clip_keeps_one_token_per_position(family):
    """A clip of one frame repeated: every position is static over the single window, ρ' = min(ρ·T, 1) = 1, so the
    clip keeps exactly one (merged) token per position of a frame."""
    model, processor = _model(family)
    inputs = _video_inputs(processor, _clip(1, static=True))
    layout = adapter_for(model).build_layouts(dict(inputs))[0].images[0]
    per_frame, frames = layout.groups[0].size, len(layout.groups)
    assert frames >= 2
    with vtprune.pruned(model, "holitom", budget=max(0.25, 1 / frames), inner=False):
        model(**inputs)
        stage = vtprune.stats(model).samples[0].stages[0]
    assert stage.merged == per_frame
    # no token is kept as it is, except LLaVA-OneVision's trailing newline (structural, kept with the clip)
    structural = layout.positions[layout.structural]
    assert set(stage.kept_positions.tolist()) <= set(structural.tolist())


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_dycoke_ttm_in_the_model(family, monkeypatch):
    model, processor = _model(family)
    inputs = _video_inputs(processor, _clip(2))
    calls = _capture(monkeypatch, "dycoke")
    with vtprune.pruned(model, "dycoke"):  # budget None: the official k = 0.7 within its cap
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        history = model._vtprune_session.decode_stage.history
    (clip, k, selection), = calls
    want = dycoke_ttm(clip.features, 0.7)
    if want.numel() <= k:
        assert torch.equal(selection.keep.cpu(), want.cpu())
    assert len(history) == 3 and out.shape[1] == inputs["input_ids"].shape[1] + 4


def test_companions_install_and_switch_off():
    model, processor = _model("qwen2_vl")
    inputs = _video_inputs(processor, _clip(3))
    for name, option, companion in (("holitom", "inner", "holitom_inner"), ("prunevid", "llm", "prunevid_llm"),
                                    ("dycoke", "decode", "dycoke_decode")):
        with vtprune.pruned(model, name):
            assert [m.name for m in model._vtprune_session.methods] == [name, companion]
            model.generate(**inputs, max_new_tokens=3, do_sample=False)
            stages = [s.name for s in vtprune.stats(model).samples[0].stages]
        assert stages[0] == name
        if companion != "dycoke_decode":
            assert stages[-1] == companion
        with vtprune.pruned(model, name, **{option: False}):
            assert [m.name for m in model._vtprune_session.methods] == [name]


@pytest.mark.parametrize("method", [m for m in METHODS if m != "dycoke"])
def test_images_are_one_frame_clips(method):
    model, processor = _model("qwen2_vl")
    inputs = tiny_inputs(processor, [tiny_image(0)], ["Describe the image."])
    with vtprune.pruned(model, method, budget=0.5):
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        sample = vtprune.stats(model).samples[0]
    assert sample.stages[0].name == method and sample.stages[0].visual_out <= 0.5 * sample.visual_in + 1
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3


def test_dycoke_refuses_images_and_unreachable_budgets():
    model, processor = _model("qwen2_vl")
    inputs = tiny_inputs(processor, [tiny_image(0)], ["Describe the image."])
    with vtprune.pruned(model, "dycoke"), pytest.raises(MethodOptionError, match="dycoke_decode"):
        model(**inputs)
    video = _video_inputs(processor, _clip(4))
    with vtprune.pruned(model, "dycoke", budget=0.1), pytest.raises(BudgetError, match="whole"):
        model(**video)
