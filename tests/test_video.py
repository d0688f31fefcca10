"""Video inputs on every video family (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision) × every registered method.

Clips are small uint8 arrays [T, H, W, 3] fed through the families' real video processors (no files). Methods come
from the registry, so methods registered later are covered here without editing this file; a method that declares
``video_unsupported`` must refuse a video with a clear error (checked instead of its invariants).

References are built by hand from an *unwrapped* run (what its language model receives: embeddings, position ids,
deepstack rows), as in test_invariants.py / test_in_llm.py; compact M-RoPE positions of a video are recomputed
from their definition (:func:`reference_compact_video`), never by engine code. The exhaustive grid (every method at
several budgets, both paddings with generation) is marked slow; the fast suite runs every method once per family
for each invariant.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np
import pytest
import reference_runs
import torch

pytest.importorskip("torchvision", reason="video inputs go through the HF video processors, which need torchvision (the video extra)")
from reference_runs import (
    IN_LLM,
    NEW_TOKENS,
    PRE_LLM,
    VIDEO_ONLY,
    Case,
    assert_same_greedy,
    call_positions,
    call_side_rows,
    capture_lm_calls,
    generate,
    lm_logits,
    merged_order,
    merged_tokens,
    record_kept_columns,
    reference_decoder,
    reference_greedy,
    reference_sequence,
)

import vtprune
from vtprune.budget import split_equal
from vtprune.registry import Method, VisualGroup, method_class
from vtprune.testing import FAMILIES, tiny_image, tiny_video

VIDEO_FAMILIES = tuple(f for f in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_onevision") if f in FAMILIES)
MROPE = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
ALL_METHODS = PRE_LLM + VIDEO_ONLY + IN_LLM
REFUSING = tuple(m for m in ALL_METHODS if method_class(m).video_unsupported)
VIDEO_PRE = tuple(m for m in PRE_LLM + VIDEO_ONLY if m not in REFUSING)
VIDEO_IN = tuple(m for m in IN_LLM if m not in REFUSING)
POSITIONS = ("original", "compact")
BUDGET = 0.5  # a fraction of each clip's visual tokens
IN_LLM_OPTIONS = {"fastv": {"ratio": 0.5}, "pdrop": {"lambda_": 0.5},
                  "sparsevlm": {"budget": 0.6, "version": "2.0"}}
PROMPT = "What is in this video?"
#: the least budget a method can meet on the tiny clips: DyCoke keeps the first frame of every pair whole (2 of 3);
#: MustDrop merges whole 3x3 windows (a 4x4 frame keeps at least 8 tokens, a 4x5 one 12)
MIN_BUDGET = {"dycoke": 0.7, "mustdrop": 0.75}


def in_llm_options(family: str, method: str) -> dict:
    """The papers' ratios for the known in-LLM methods, ``budget=0.6`` for the others (reachable on the 4-layer
    decoders). SparseVLM on Qwen3-VL starts after the deepstack layers, as in test_invariants.py."""
    options = dict(IN_LLM_OPTIONS.get(method, {"budget": 0.6}))
    if (family, method) == ("qwen3_vl", "sparsevlm"):
        options["layers"] = [1, 2]
    return options


def method_kwargs(family: str, method: str, budget=BUDGET) -> dict:
    """In-LLM methods: their options; pre-LLM methods: the budget (at least what the method can reach) with their
    companion stages off (``Method.solo``: each stage is checked against its own reference; the companions are
    in-LLM / decode methods of their own)."""
    if method in IN_LLM:
        return in_llm_options(family, method)
    return {"budget": max(budget, MIN_BUDGET.get(method, 0.0)), **method_class(method).solo}


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


# ---------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------


#: a deterministic uint8 clip [frames, H, W, 3] (noise and a moving box)
clip = tiny_video


def chat_inputs(processor, samples, padding_side: str = "left", **video_kwargs):
    """``samples``: per sample (items, prompt), items a list of ("image", PIL) / ("video", clip); one user turn
    each, the visual items first, through the processor's chat template and the processor itself."""
    texts, images, videos = [], [], []
    for items, prompt in samples:
        content = [{"type": kind} for kind, _ in items] + [{"type": "text", "text": prompt}]
        texts.append(processor.apply_chat_template([{"role": "user", "content": content}],
                                                   add_generation_prompt=True, tokenize=False))
        for kind, value in items:
            (images if kind == "image" else videos).append(value)
    kwargs = {"text": texts, "return_tensors": "pt", "padding": True, "padding_side": padding_side, **video_kwargs}
    if images:
        kwargs["images"] = images
    if videos:
        kwargs["videos"] = videos
        if type(processor).__name__ == "Qwen2_5_VLProcessor":  # 1 frame per second: 2 s per temporal group, so
            # the M-RoPE time scaling (tokens_per_second * second_per_grid_ts = 4 on the tiny model) is exercised
            kwargs["video_metadata"] = [{"fps": 1.0, "total_num_frames": len(v)} for v in videos]
    return processor(**kwargs)


def batch_samples(family: str, images: bool = True):
    """A mixed batch: a video; an image and a video (another size / frame count); two videos; text only.
    LLaVA-OneVision batches videos as one tensor, so its clips share the frame count. ``images=False``: the same
    without the image (for methods that refuse images)."""
    frames = 4 if family == "llava_onevision" else 6
    image = [("image", tiny_image(1))] if images else []
    return [
        ([("video", clip(0))], PROMPT),
        ([*image, ("video", clip(1, frames, (42, 56)))], "What color is the box on the left?"),
        ([("video", clip(2)), ("video", clip(3, 4, (56, 42)))], "Describe both videos"),
        ([], "Hi"),
    ]


# ---------------------------------------------------------------------------------------------------------
# One unwrapped run of a single video sample
# ---------------------------------------------------------------------------------------------------------


@dataclass
class VideoCase(Case):
    per_frame: int = 0          # content tokens per frame
    frames: int = 0             # frames (temporal groups) of the clip


def video_token(model) -> int:
    return model.config.video_token_id


def video_cells(case_model, inputs, positions: torch.Tensor, per_frame: int) -> dict:
    """M-RoPE families: sequence position -> (video, frame, t, h, w) of every video token of sample 0, (t, h, w)
    being its unwrapped rope ids (frames fill the placeholders in order)."""
    placeholders = torch.nonzero(inputs["input_ids"][0] == video_token(case_model)).flatten().tolist()
    return {p: (0, i // per_frame, *(int(v) for v in positions[:, p])) for i, p in enumerate(placeholders)}


_CASES: dict[str, VideoCase] = {}


def video_case(family: str, tiny_models) -> VideoCase:
    if family not in _CASES:
        model, processor = tiny_models[family]
        inputs = chat_inputs(processor, [([("video", clip(0))], PROMPT)])
        with capture_lm_calls(model) as calls:
            logits = model(**inputs).logits[0]
        (call,) = calls
        tokens, step_logits = generate(model, inputs)
        is_video = inputs["input_ids"][0] == video_token(model)
        positions = call_positions(call)
        layout = _layout(model, inputs)[0].images[0]
        per_frame, frames = layout.groups[0].size, layout.num_frames
        _CASES[family] = VideoCase(
            family, model, processor, inputs, logits, tokens[0].tolist(), step_logits[0], call["inputs_embeds"][0],
            positions, torch.nonzero(is_video).flatten(), torch.nonzero(~is_video).flatten(), call_side_rows(call),
            video_cells(model, inputs, positions, per_frame) if family in MROPE else {}, per_frame, frames,
        )
    return _CASES[family]


@pytest.fixture(params=VIDEO_FAMILIES)
def vcase(request, tiny_models) -> VideoCase:
    return video_case(request.param, tiny_models)


def _layout(model, inputs):
    from vtprune.adapters.base import adapter_for

    return adapter_for(model).build_layouts(dict(inputs))


def reference_compact_video(first: torch.Tensor, cells: list) -> torch.Tensor:
    """Compact position ids of a pruned sequence from the definition (vtprune.engine.positions and
    qwen_compact_image), written independently: text counts up by one; a run of tokens of one video with no
    text between them starts at the current position; each frame's kept rows and columns are renumbered 0, 1, ...
    in order; the temporal id keeps its offset from the run's first kept temporal id; the next token comes the
    largest kept-row / kept-column count of the run's frames later. 1-D: consecutive.

    ``cells`` per token: None for text, else (video, frame, t, h, w) with the unwrapped rope ids (merged tokens:
    their anchor's)."""
    n = len(cells)
    if first.dim() == 0:
        return first + torch.arange(n)
    out = torch.zeros(3, n, dtype=torch.long)
    current, i = int(first.min()), 0
    while i < n:
        if cells[i] is None:
            out[:, i] = current
            current, i = current + 1, i + 1
            continue
        j = i
        while j < n and cells[j] is not None and cells[j][0] == cells[i][0]:
            j += 1
        run = cells[i:j]
        t0 = min(c[2] for c in run)
        rows = {f: sorted({c[3] for c in run if c[1] == f}) for f in {c[1] for c in run}}
        cols = {f: sorted({c[4] for c in run if c[1] == f}) for f in {c[1] for c in run}}
        for k, c in zip(range(i, j), run, strict=True):
            out[:, k] = torch.tensor([current + c[2] - t0, current + rows[c[1]].index(c[3]),
                                      current + cols[c[1]].index(c[4])])
        current += max(max(len(rows[f]), len(cols[f])) for f in rows)
        i = j
    return out


class _Spy:
    """Records (group, Selection) of every ``select`` / ``select_clip`` call of a method class; a clip is recorded
    as the VisualGroup of its flattened tokens (so reference_runs.merged_tokens reads it like a group)."""

    def __init__(self, patch, method: str):
        cls = method_class(method)
        self.records: list = []
        select, select_clip = cls.select, cls.select_clip

        def spy_select(inner, group, k):
            selection = select(inner, group, k)
            self.records.append((group, selection))
            return selection

        def spy_clip(inner, clip_input, k):
            selection = select_clip(inner, clip_input, k)
            flat = VisualGroup(features=clip_input.flat_features(), height=None, width=None,
                               signals={name: v.flatten(0, 1) for name, v in clip_input.signals.items()},
                               project=clip_input.project)
            self.records.append((flat, selection))
            return selection

        patch.setattr(cls, "select", spy_select)
        patch.setattr(cls, "select_clip", spy_clip)


def pruned_run(case: VideoCase, method: str, positions: str | None = None, **kwargs):
    kwargs = kwargs or method_kwargs(case.family, method)
    if method not in IN_LLM:  # the pre-LLM stage alone (its companion stages have their own tests)
        kwargs = {**method_class(method).solo, **kwargs}
    vtprune.apply(case.model, method, positions=positions, **kwargs)
    with capture_lm_calls(case.model) as calls:
        logits = case.model(**case.inputs).logits[0]
    (call,) = calls
    return logits, call, vtprune.stats(case.model)


def sources_of(case: VideoCase, kept: torch.Tensor, anchors: torch.Tensor, order: torch.Tensor) -> list[int]:
    """Original position (anchor of a merged token) of every token of the hand-built pruned sequence, in the order
    of reference_sequence."""
    entries = [(int(p), 0) for p in torch.sort(torch.cat([case.text_positions, kept])).values.tolist()]
    ranks = order.tolist() if order.numel() else [1] * anchors.numel()
    entries += [(int(a), int(r)) for a, r in zip(anchors.tolist(), ranks, strict=True)]
    return [p for p, _ in sorted(entries)]


# ---------------------------------------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_video_layout(family, tiny_models):
    """Frames (Qwen: temporal groups of 2 frames) with their grids, timestamps text between Qwen3-VL's frames,
    OneVision's pooled frames and one structural newline, Qwen2.5-VL's frame times."""
    case = video_case(family, tiny_models)
    model, inputs = case.model, case.inputs
    (layout,) = _layout(model, inputs)
    (span,) = layout.images
    assert span.kind == "video" and span.is_video
    assert torch.equal(span.positions, case.image_positions)
    sizes = {g.size for g in span.groups}
    assert len(sizes) == 1 and all(g.height * g.width == g.size for g in span.groups)
    members = torch.cat([g.members for g in span.groups])
    assert torch.equal(members, torch.arange(members.numel()))  # frame-major
    if family in MROPE:
        (grid,) = inputs["video_grid_thw"].tolist()
        assert span.num_frames == grid[0] == 2  # 4 frames, temporal patch 2
        assert span.groups[0].height == grid[1] // 2 and span.groups[0].width == grid[2] // 2
        assert not bool(span.structural.any())
        assert layout.vision_grids == [tuple(grid)]
    else:
        assert span.num_frames == 4
        assert span.groups[0].height == span.groups[0].width == 4  # 8 x 8 SigLIP patches pooled 2 x 2
        assert span.structural.tolist() == [False] * (span.num_tokens - 1) + [True]
        newline = model.model.image_newline
        assert torch.equal(case.embeds[span.positions[-1]], newline.to(case.embeds.dtype))
        assert layout.vision_inputs == 4  # every frame through the tower
    gaps = torch.nonzero(span.positions[1:] - span.positions[:-1] > 1).flatten() + 1
    if family == "qwen3_vl":  # each frame after the first is preceded by text: <t seconds><|vision_start|>
        assert gaps.tolist() == [g.members[0].item() for g in span.groups[1:]]
    else:
        assert gaps.numel() == 0
    if family == "qwen2_5_vl":
        seconds = float(inputs["second_per_grid_ts"][0])
        torch.testing.assert_close(span.frame_times, torch.arange(span.num_frames, dtype=torch.float32) * seconds)
    else:
        assert span.frame_times is None
    frame = span.frame_of()
    for t, group in enumerate(span.groups):
        assert bool((frame[group.members] == t).all())


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_mixed_batch_layout(family, tiny_models):
    """Images and videos of one sample in sequence order, several videos, text-only samples."""
    model, processor = tiny_models[family]
    inputs = chat_inputs(processor, batch_samples(family))
    layouts = _layout(model, inputs)
    kinds = [[span.kind for span in layout.images] for layout in layouts]
    assert kinds == [["video"], ["image", "video"], ["video", "video"], []]
    assert layouts[1].image_ids == [0, 1] and layouts[2].image_ids == [2, 3]
    for b, layout in enumerate(layouts):
        starts = [int(span.positions[0]) for span in layout.images]
        assert starts == sorted(starts)
        video_positions = torch.nonzero(inputs["input_ids"][b] == video_token(model)).flatten()
        ours = torch.cat([s.positions for s in layout.videos]) if layout.videos else torch.empty(0, dtype=torch.long)
        assert torch.equal(torch.sort(ours).values, video_positions)


# ---------------------------------------------------------------------------------------------------------
# 1. nothing pruned => nothing changed (logits and greedy generation, bitwise)
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", VIDEO_PRE + VIDEO_IN)
def test_keep_all_is_unwrapped(vcase, method):
    model, inputs = vcase.model, vcase.inputs
    with vtprune.pruned(model, method, budget=1.0):
        logits = model(**inputs).logits[0]
        sample = vtprune.stats(model).samples[0]
        tokens, step_logits = generate(model, inputs)
    assert torch.equal(logits, vcase.logits)
    assert tokens[0].tolist() == vcase.tokens and torch.equal(step_logits[0], vcase.step_logits)
    assert sample.visual_in == vcase.image_positions.numel() and not sample.pruned
    assert sample.frame_kept == [vcase.per_frame] * vcase.frames and sample.video_frames == [vcase.frames]


# ---------------------------------------------------------------------------------------------------------
# 3 + 4 + 5. text kept, order, positions (both conventions), reference equivalence, greedy generation
# ---------------------------------------------------------------------------------------------------------


def _check_budget(case: VideoCase, method: str, sample, budget=BUDGET) -> None:
    """The clip's budget: a fraction of its content tokens (an int: its tokens), split evenly over frames for
    per-frame methods."""
    cls = method_class(method)
    total = case.per_frame * case.frames
    k = min(budget, total) if isinstance(budget, int) else max(1, round(budget * total))
    assert sum(sample.frame_kept) <= k
    if cls.video_policy == "per_frame":
        shares = split_equal(k, [case.per_frame] * case.frames)
        assert all(kept <= share for kept, share in zip(sample.frame_kept, shares, strict=True))
        if cls.exact_count:
            assert sample.frame_kept == shares
    elif cls.exact_count:
        assert sum(sample.frame_kept) == k


@pytest.mark.parametrize("positions", POSITIONS)
@pytest.mark.parametrize("method", VIDEO_PRE)
def test_reference_equivalence(vcase, method, positions, monkeypatch):
    check_reference(vcase, method, positions, BUDGET, monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize("budget", [0.1, 0.3, 0.8, "frame+3"])
@pytest.mark.parametrize("positions", POSITIONS)
@pytest.mark.parametrize("method", VIDEO_PRE)
def test_reference_equivalence_budget_grid(vcase, method, positions, budget, monkeypatch):
    """The exhaustive grid: fractions from a tenth of the clip to most of it, and an int budget (one frame's
    tokens + 3, uneven over the frames)."""
    if budget == "frame+3":
        budget = vcase.per_frame + 3
    check_reference(vcase, method, positions, budget, monkeypatch)


def check_reference(vcase, method, positions, budget, monkeypatch):
    model = vcase.model
    if method in MIN_BUDGET:  # at least what the method can reach on this clip
        least = MIN_BUDGET[method]
        budget = max(budget, round(least * vcase.per_frame * vcase.frames)) if isinstance(budget, int) \
            else max(budget, least)
    with monkeypatch.context() as patch:
        spy = _Spy(patch, method)
        logits, call, stats = pruned_run(vcase, method, positions, budget=budget)
    (sample,) = stats.samples
    (stage,) = sample.stages
    kept = stage.kept_positions
    assert bool((kept[1:] > kept[:-1]).all()) and bool(torch.isin(kept, vcase.image_positions).all())
    assert sample.pruned and sample.video_frames == [vcase.frames]
    _check_budget(vcase, method, sample, budget)
    merged, anchors, merged_side = merged_tokens(vcase, spy.records)
    order = merged_order(spy.records)
    assert merged.shape[0] == stage.merged
    embeds, position_ids, is_merged, side = reference_sequence(
        vcase, kept, "original", merged if stage.merged else None, anchors, merged_side, order)
    if positions == "compact":
        sources = sources_of(vcase, kept, anchors, order)
        position_ids = reference_compact_video(vcase.position_ids[..., 0], [vcase.cells.get(p) for p in sources])
    engine_embeds = call["inputs_embeds"][0]
    # text tokens all enter the decoder, unchanged and in order (they are rows of the reference sequence)
    assert torch.equal(engine_embeds, embeds)
    assert torch.equal(call_positions(call), position_ids)
    torch.testing.assert_close(logits, lm_logits(model, embeds, position_ids, side), rtol=0, atol=1e-5)
    tokens, step_logits = generate(model, vcase.inputs)
    assert torch.equal(vtprune.stats(model).samples[0].stages[0].kept_positions, kept)
    assert_same_greedy((tokens[0].tolist(), step_logits[0]), reference_greedy(model, embeds, position_ids, side),
                       vcase.eos)
    vtprune.remove(model)


@pytest.mark.parametrize("positions", POSITIONS)
@pytest.mark.parametrize("method", VIDEO_IN)
def test_in_llm_reference_equivalence(vcase, method, positions, monkeypatch):
    """In-LLM methods see the clip's tokens as one span: the decoder run by hand on the columns kept at each
    pruning layer (original or compact positions) gives the same logits and greedy tokens."""
    model, inputs = vcase.model, vcase.inputs
    with capture_lm_calls(model) as calls:
        model(**inputs)
    (call,) = calls
    with monkeypatch.context() as patch:
        kept = record_kept_columns(patch)
        patch.setattr(reference_runs, "reference_compact", reference_compact_video)
        with vtprune.pruned(model, method, positions=positions, **in_llm_options(vcase.family, method)):
            pruned_logits = model(**inputs).logits[0]
            sample = vtprune.stats(model).samples[0]
            out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
        assert kept and sample.pruned
        logits, lengths, tokens, step_logits = reference_decoder(
            model, call["inputs_embeds"][0], call_positions(call), call_side_rows(call), kept, positions,
            vcase.cells, vcase.image_positions,
            cut_from=reference_runs.cache_cut_from(model, method, in_llm_options(vcase.family, method)))
    assert sample.layer_lengths == lengths
    torch.testing.assert_close(pruned_logits, logits, atol=1e-5, rtol=1e-5)
    generated = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    assert generated == tokens[:len(generated)]
    torch.testing.assert_close(torch.stack(out.logits, 1)[0], step_logits[:len(generated)], atol=1e-5, rtol=1e-5)
    last = sample.stages[-1].kept_positions
    assert bool(torch.isin(last, vcase.image_positions).all())
    assert sum(sample.frame_kept) == sample.visual_lengths[-1] - (1 if vcase.family == "llava_onevision" else 0)


# ---------------------------------------------------------------------------------------------------------
# 6. batching: a padded mixed batch (images, videos, several videos, text only) == each sample alone
# ---------------------------------------------------------------------------------------------------------

_ALONE: dict[tuple, tuple] = {}


def _refuses_images(method) -> bool:
    """Whether a method (or any method of a composition) refuses images: its batches leave the image out."""
    return any(method_class(m).image_unsupported for m in (method if isinstance(method, list) else [method]))


def run_alone(family, model, processor, method, kwargs, positions, index, with_generation):
    key = (family, str(method), positions, index, with_generation)
    if key not in _ALONE:
        inputs = chat_inputs(processor, [batch_samples(family, not _refuses_images(method))[index]])
        tokens = None
        with vtprune.pruned(model, method, positions=positions, **kwargs):
            logits = model(**inputs).logits[0]
            sample = vtprune.stats(model).samples[0]
            if with_generation:
                tokens = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
                tokens = tokens[0, inputs["input_ids"].shape[1]:].tolist()
        _ALONE[key] = (logits, [s.kept_positions for s in sample.stages], sample.frame_kept, tokens)
    return _ALONE[key]


def check_batch(family, tiny_models, method, padding_side, positions, **kwargs):
    model, processor = tiny_models[family]
    kwargs = kwargs or method_kwargs(family, method)
    samples = batch_samples(family, images=not _refuses_images(method))  # or the image is refused
    inputs = chat_inputs(processor, samples, padding_side)
    mask = inputs["attention_mask"]
    assert len(set(mask.sum(-1).tolist())) == len(samples)
    with_generation = padding_side == "left"
    alone = [run_alone(family, model, processor, method, kwargs, positions, b, with_generation)
             for b in range(len(samples))]
    with vtprune.pruned(model, method, positions=positions, **kwargs):
        logits = model(**inputs).logits
        stats = vtprune.stats(model)
        tokens = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False) if with_generation else None
    assert stats.samples[-1].visual_in == 0 and stats.samples[-1].frame_kept is None
    for b, (ref_logits, ref_kept, ref_frames, ref_tokens) in enumerate(alone):
        sample = stats.samples[b]
        n = sample.layer_lengths[-1]
        assert n == ref_logits.shape[0]
        rows = logits[b, -n:] if padding_side == "left" else logits[b, :n]
        torch.testing.assert_close(rows, ref_logits, rtol=0, atol=1e-4)
        first = int(torch.nonzero(mask[b]).min())
        if sample.visual_in:  # the same tokens kept by every stage, up to the padding offset
            got = [stage.kept_positions - first for stage in sample.stages]
            assert len(got) == len(ref_kept) and all(torch.equal(g, r) for g, r in zip(got, ref_kept, strict=True))
        assert sample.frame_kept == ref_frames
        if tokens is not None:
            new = tokens[b, inputs["input_ids"].shape[1]:].tolist()
            assert new[:len(ref_tokens)] == ref_tokens
            if len(ref_tokens) < NEW_TOKENS:
                assert ref_tokens[-1] == model.generation_config.eos_token_id


@pytest.mark.parametrize("method", VIDEO_PRE + VIDEO_IN)
@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_batch_equals_alone(family, method, tiny_models):
    """Left padding with batched greedy generation, compact positions (a different decode shift per sample)."""
    check_batch(family, tiny_models, method, "left", "compact")


@pytest.mark.slow
@pytest.mark.parametrize("method", VIDEO_PRE + VIDEO_IN)
@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_batch_equals_alone_right_padding(family, method, tiny_models):
    check_batch(family, tiny_models, method, "right", "original")


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_composition_batch_equals_alone(family, tiny_models):
    """A whole-clip pre-LLM method (frames) composed with an in-LLM one (fastv) on the mixed batch: both stages
    prune the videos and every sample equals its run alone."""
    model, processor = tiny_models[family]
    with vtprune.pruned(model, ["frames", "fastv"], budget=0.2):  # frames keeps 0.4 of each clip, fastv 0.5 of it
        model(**chat_inputs(processor, batch_samples(family)[:1]))
        sample = vtprune.stats(model).samples[0]
    names = [stage.name for stage in sample.stages]
    assert names[0] == "frames" and set(names[1:]) == {"fastv"} and len(names) > 1
    assert sample.stages[0].visual_out < sample.visual_in and sample.layer_lengths[-1] < sample.layer_lengths[0]
    check_batch(family, tiny_models, ["frames", "fastv"], "left", "original", budget=0.2)


# ---------------------------------------------------------------------------------------------------------
# 8. per-layer KV cache; 9. determinism; generate() modes
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", VIDEO_IN)
def test_kv_cache_holds_only_kept_tokens(vcase, method):
    from vtprune import compat

    with vtprune.pruned(vcase.model, method, **in_llm_options(vcase.family, method)):
        out = vcase.model(**vcase.inputs, use_cache=True)
        sample = vtprune.stats(vcase.model).samples[0]
    cache = compat.output_cache(out)
    cut_from = reference_runs.cache_cut_from(vcase.model, method, in_llm_options(vcase.family, method))
    assert [layer.get_seq_length() for layer in cache.layers] == reference_runs.cut_cache_lengths(
        sample.layer_lengths, cut_from)
    assert sample.layer_lengths[-1] < sample.layer_lengths[0]


@pytest.mark.parametrize("method", VIDEO_PRE + VIDEO_IN)
def test_deterministic_selection(vcase, method):
    kept = []
    for _ in range(2):
        with vtprune.pruned(vcase.model, method, **method_kwargs(vcase.family, method)):
            vcase.model(**vcase.inputs)
            kept.append([s.kept_positions for s in vtprune.stats(vcase.model).samples[0].stages])
    assert len(kept[0]) == len(kept[1]) and all(torch.equal(a, b) for a, b in zip(*kept, strict=True))


@pytest.mark.parametrize("method", ["divprune", "frames", "fastv"])
def test_generate_modes(vcase, method):
    """Beam search with several returned sequences (the pre-encoded video is repeated per beam) and sampling:
    every beam row is pruned like the sample alone; seeded sampling repeats; top_k=1 sampling is greedy."""
    model, inputs = vcase.model, vcase.inputs
    with vtprune.pruned(model, method, **method_kwargs(vcase.family, method)):
        model(**inputs)
        alone = vtprune.stats(model).samples[0]
        greedy = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
        beams = model.generate(**inputs, max_new_tokens=NEW_TOKENS, num_beams=2, num_return_sequences=2,
                               do_sample=False)
        rows = vtprune.stats(model).samples
        assert beams.shape[0] == 2 and len(rows) == 2
        for row in rows:
            assert row.frame_kept == alone.frame_kept
            assert all(torch.equal(a.kept_positions, b.kept_positions)
                       for a, b in zip(row.stages, alone.stages, strict=True))
        sampled = []
        for _ in range(2):
            torch.manual_seed(7)
            sampled.append(model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=True, temperature=1.0))
        assert torch.equal(sampled[0], sampled[1])
        torch.manual_seed(7)
        top1 = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=True, top_k=1)
        assert torch.equal(top1, greedy)
        static = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, cache_implementation="static")
        assert torch.equal(static, greedy)
        if method not in IN_LLM:  # an in-LLM method re-scores at every uncached step (the last token changes)
            no_cache = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=False)
            assert torch.equal(no_cache, greedy)


# ---------------------------------------------------------------------------------------------------------
# Budgets, policies, the frames baseline, refusal
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_budget_int_is_the_clips_tokens_and_policies(family, tiny_models):
    """An int budget is the clip's tokens (not per frame); per_frame splits it evenly (remainder to the earliest
    frames); global (divprune) selects once over the clip."""
    case = video_case(family, tiny_models)
    k = case.per_frame + 3  # not a multiple of the frame count
    with vtprune.pruned(case.model, "random", budget=k):
        case.model(**case.inputs)
        sample = vtprune.stats(case.model).samples[0]
    assert sample.frame_kept == split_equal(k, [case.per_frame] * case.frames)
    calls = []
    cls = method_class("divprune")
    original = cls.select

    def spy(self, group, kk):
        calls.append((group.num_tokens, group.frame, kk))
        return original(self, group, kk)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cls, "select", spy)
        with vtprune.pruned(case.model, "divprune", budget=k):
            case.model(**case.inputs)
            sample = vtprune.stats(case.model).samples[0]
    assert calls == [(case.per_frame * case.frames, None, k)]
    assert sum(sample.frame_kept) == k


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_frames_baseline(family, tiny_models):
    """Whole evenly spaced frames (first and last included), as many as the budget holds; below one frame, a
    uniform sub-grid of the middle frame; on Qwen3-VL the timestamps of dropped frames stay (text)."""
    model, processor = tiny_models[family]
    inputs = chat_inputs(processor, [([("video", clip(5, 8))], PROMPT)], do_sample_frames=False)
    (layout,) = _layout(model, inputs)
    (span,) = layout.images
    frames, per_frame = span.num_frames, span.groups[0].size
    assert frames >= 4
    with vtprune.pruned(model, "frames", budget=2 * per_frame + per_frame // 2):
        model(**inputs)
        sample = vtprune.stats(model).samples[0]
    assert sample.frame_kept == [per_frame] + [0] * (frames - 2) + [per_frame]
    with vtprune.pruned(model, "frames", budget=3 * per_frame):
        model(**inputs)
        kept3 = vtprune.stats(model).samples[0].frame_kept
    middle = np.linspace(0, frames - 1, 3).astype(int)[1]
    assert [t for t, c in enumerate(kept3) if c] == [0, int(middle), frames - 1]
    assert all(c in (0, per_frame) for c in kept3)
    with vtprune.pruned(model, "frames", budget=per_frame // 2):
        model(**inputs)
        below = vtprune.stats(model).samples[0].frame_kept
    assert below == [0] * (frames // 2) + [per_frame // 2] + [0] * (frames - frames // 2 - 1)


def test_video_unsupported_method_refuses(tiny_models):
    """A method that declares it cannot prune videos refuses a forward with a video (naming itself and the fix)
    and still prunes images."""

    class NoVideo(Method):
        name = "no_video_test"
        video_unsupported = "it scores whole images only."

        def select(self, group, k):
            return vtprune.registry.Selection(keep=torch.arange(k))

    model, processor = tiny_models["qwen2_vl"]
    video = chat_inputs(processor, [([("video", clip(0))], PROMPT)])
    image = chat_inputs(processor, [([("image", tiny_image(0))], PROMPT)])
    with vtprune.pruned(model, NoVideo(budget=0.5)):
        with pytest.raises(vtprune.UnsupportedModelError, match="no_video_test.*cannot prune videos"):
            model(**video)
        model(**image)
        assert vtprune.stats(model).samples[0].pruned
    for name in REFUSING:  # registered methods that refuse videos do so the same way
        with vtprune.pruned(model, name):
            with pytest.raises(vtprune.UnsupportedModelError, match=name):
                model(**video)


# ---------------------------------------------------------------------------------------------------------
# FLOPs: vtprune.stats' analytic prefill FLOPs of a video forward against FlopCounterMode
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", [None, *VIDEO_PRE, *VIDEO_IN])
@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_video_flops_match_flop_counter(family, method, tiny_models):
    """Every frame through the vision tower (Qwen: temporal patches, attention per temporal group; OneVision:
    SigLIP + projector on all patches of every frame, then the pooling), the decoder on the pruned sequence and
    the LM head, within 1 % of FlopCounterMode on the same forward. The method's own work (selection, and the
    vision signals it asks for) is taken off the measured total as in test_flops_stats.py."""
    from test_flops_stats import _CPU_SDPA, _count, _SelectFlops
    from torch.utils.flop_counter import FlopCounterMode

    from vtprune.engine.session import SESSION_ATTRIBUTE

    model, processor = tiny_models[family]
    # an adaptive in-LLM method (FrameFusion) shortens each clip by its own amount, and the counter sees the padded
    # batch: it gets the same clip twice
    second = clip(0) if method and getattr(method_class(method), "adaptive", False) else clip(1)
    inputs = chat_inputs(processor, [([("video", clip(0))], PROMPT), ([("video", second)], PROMPT)])
    assert bool(inputs["attention_mask"].all())  # per-sample FLOPs exclude padding; the counter sees the batch
    name, kwargs = (method, method_kwargs(family, method, 0.25)) if method else ("random", {"budget": 1.0})
    core = model.model
    accepted = inspect.signature(core.get_video_features).parameters
    vision_kwargs = {k: v for k, v in inputs.items() if k in accepted}
    vision_plain = _count(lambda: core.get_video_features(**vision_kwargs))
    with vtprune.pruned(model, name, **kwargs):
        signal_flops = _count(lambda: core.get_video_features(**vision_kwargs)) - vision_plain
        timer = _SelectFlops()
        getattr(model, SESSION_ATTRIBUTE).timer = timer
        with FlopCounterMode(display=False, custom_mapping=_CPU_SDPA) as counter:
            model(**inputs)
        stats = vtprune.stats(model)
    measured = counter.get_total_flops() - timer.flops - signal_flops
    assert stats.flops > 0 and signal_flops >= 0
    assert abs(stats.flops - measured) <= 0.01 * measured, (stats.flops, measured, stats.flops / measured)
    if method is None:
        assert stats.flops == stats.flops_unpruned
    else:
        assert stats.flops < stats.flops_unpruned


# ---------------------------------------------------------------------------------------------------------
# Signals of video tokens
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", MROPE)
def test_qwen_video_frame_signals_equal_the_frame_as_an_image(family, tiny_models):
    """The Qwen ViT attends within each temporal group, so a temporal group of a video is encoded exactly like an
    image made of the same patches (grid 1 x h x w): its tokens and every captured signal (mean received
    attention, keys, merger inputs; Qwen2.5-VL's window order undone) must equal that image's."""
    model, processor = tiny_models[family]
    inputs = chat_inputs(processor, [([("video", clip(0))], PROMPT)])
    (t, h, w), patches = inputs["video_grid_thw"][0].tolist(), inputs["pixel_values_videos"]
    per_frame = h * w  # patches per temporal group (in the processor's order: groups one after the other)
    signals = ("cls_attention", "vit_keys", "vit_hidden")
    core = model.model
    with vtprune.pruned(model, "visionzip", budget=0.5):
        store = model._vtprune_session.store
        video = core.get_video_features(patches, inputs["video_grid_thw"]).pooler_output[0]
        video_tables = {name: store.table("video", name) for name in signals}
        for frame in range(t):
            rows = patches[frame * per_frame:(frame + 1) * per_frame]
            image = core.get_image_features(rows, torch.tensor([[1, h, w]])).pooler_output[0]
            tokens = slice(frame * image.shape[0], (frame + 1) * image.shape[0])
            torch.testing.assert_close(video[tokens], image, rtol=0, atol=1e-5)
            for name in signals:
                torch.testing.assert_close(video_tables[name][0, tokens], store.table("image", name)[0],
                                           rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# vtprune.testing: videos through the families' real video processors
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_tiny_vlm_takes_videos(family, tiny_models):
    from vtprune.testing import _stub_video_processor_class, tiny_inputs

    model, processor = tiny_models[family]
    assert not isinstance(processor.video_processor, _stub_video_processor_class())  # torchvision is installed
    inputs = tiny_inputs(processor, [tiny_image(0), None], ["What is this?", "Hi"], videos=[tiny_video(0), None])
    assert "pixel_values_videos" in inputs and "pixel_values" in inputs
    counts = (inputs["input_ids"] == video_token(model)).sum(-1).tolist()
    expected = 65 if family == "llava_onevision" else 32  # 4 pooled 4x4 frames + newline; 2 groups of 4x4
    assert counts == [expected, 0]
    logits = model(**inputs).logits
    assert logits.shape[:2] == inputs["input_ids"].shape and bool(torch.isfinite(logits).all())
    np.testing.assert_array_equal(tiny_video(3), tiny_video(3))
    assert tiny_video(3, frames=6, size=(40, 48)).shape == (6, 40, 48, 3)


@pytest.mark.parametrize("method", ["random", "frames"])
def test_loss_on_kept_positions(vcase, method):
    """``labels`` with a video: the loss is the causal-LM loss of the pruned sequence, each kept column's target
    taken from the caller's labels (Qwen3-VL's timestamps between frames keep their labels)."""
    import torch.nn.functional as F

    model, inputs = vcase.model, vcase.inputs
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == video_token(model), -100)
    with vtprune.pruned(model, method, budget=BUDGET):
        out = model(**inputs, labels=labels)
        (stage,) = vtprune.stats(model).samples[0].stages
    assert stage.merged == 0
    kept = torch.sort(torch.cat([vcase.text_positions, stage.kept_positions])).values
    pruned_labels = labels[0, kept]
    assert out.logits.shape[1] == kept.numel()
    expected = F.cross_entropy(out.logits[0, :-1], pruned_labels[1:], ignore_index=-100)
    torch.testing.assert_close(out.loss, expected, rtol=0, atol=1e-5)


def test_compact_rule_per_temporal_group():
    """The compact rope index of a pruned Qwen video, on hand-made ids: each temporal group ranks its own kept rows
    and columns, temporal offsets (time scaling 2 here) are kept from the first kept group, the advance is the
    largest kept sub-grid; one frame alone (or an image) is the image rule."""
    from vtprune.adapters.qwen_vl import qwen_compact_image
    from vtprune.engine.positions import compact_mrope

    start = 10
    # frame 0 keeps (row 1, col 0), (1, 2); frame 1 keeps (0, 1), (2, 1), (2, 2); temporal ids start + 2t
    t = torch.tensor([0, 0, 2, 2, 2]) + start
    h = torch.tensor([1, 1, 0, 2, 2]) + start
    w = torch.tensor([0, 2, 1, 1, 2]) + start
    grid, frame = torch.stack([t, h, w]), torch.tensor([0, 0, 1, 1, 1])
    offsets, advance = qwen_compact_image(grid, frame)
    assert offsets.tolist() == [[0, 0, 2, 2, 2], [0, 0, 0, 1, 1], [0, 1, 0, 0, 1]]
    assert advance == 2
    alone, alone_advance = qwen_compact_image(grid[:, 2:])  # one frame: the image rule
    assert alone.tolist() == [[0, 0, 0], [0, 1, 1], [0, 0, 1]] and alone_advance == 2
    # in a sequence: text, the video, text
    rope = torch.cat([torch.full((3, 1), start - 1), grid, torch.full((3, 1), start + 5)], dim=1)
    image_of = torch.tensor([-1, 0, 0, 0, 0, 0, -1])
    frame_of = torch.tensor([0, 0, 0, 1, 1, 1, 0])
    out = compact_mrope(rope, image_of, qwen_compact_image, frame_of)
    expected = torch.cat([torch.full((3, 1), start - 1), offsets + start, torch.full((3, 1), start + 2)], dim=1)
    assert torch.equal(out, expected)
    # the same ids without frame information would rank rows / columns over the whole clip
    assert not torch.equal(compact_mrope(rope, image_of, qwen_compact_image), expected)


def test_qwen2_5_time_scaling_is_exercised(tiny_models):
    """The Qwen2.5-VL clips of these tests are sampled at 1 fps: temporal ids step by tokens_per_second x 2 s."""
    case = video_case("qwen2_5_vl", tiny_models)
    assert float(case.inputs["second_per_grid_ts"][0]) == 2.0
    temporal = case.position_ids[0, case.image_positions]
    first = int(temporal[0])
    assert sorted(set(temporal.tolist())) == [first, first + 4]
