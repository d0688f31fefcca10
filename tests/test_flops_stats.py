"""``vtprune.stats(model).flops`` (the analytic count of what a pruned forward ran) against
``torch.utils.flop_counter.FlopCounterMode`` on the same forward, for every family vtprune supports and
every registered method, pruned and unpruned.

The method's own work is not part of the model's FLOPs and is taken off the measured total: the selection
(similarity matrices, attention rows, ...) is counted by a second FlopCounterMode opened inside the engine's
``select`` section (the timing hook of :mod:`vtprune.engine.timing`), and the vision signals a method asks for
(e.g. attention received per patch, computed from q/k in the ViT) as the extra FLOPs of the vision forward
with pruning installed over the same forward without.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

import vtprune
from vtprune.adapters.base import adapter_for
from vtprune.engine.session import SESSION_ATTRIBUTE
from vtprune.errors import UnsupportedModelError
from vtprune.testing import FAMILIES, tiny_image, tiny_inputs

_CPU_SDPA = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
             lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v)}


class _SelectFlops:
    """Engine timer that counts the FLOPs of the ``select`` sections."""

    def __init__(self):
        self.flops = 0

    @contextmanager
    def section(self, name):
        if name != "select":
            yield
            return
        with FlopCounterMode(display=False, custom_mapping=_CPU_SDPA) as counter:
            yield
        self.flops += counter.get_total_flops()


def _count(fn) -> int:
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_CPU_SDPA) as counter:
        fn()
    return counter.get_total_flops()


def _supported(family: str, tiny_models) -> bool:
    try:
        adapter_for(tiny_models[family][0])
    except UnsupportedModelError:
        return False
    return True


def _in_vit_supported(model, method: str) -> bool:
    try:
        vtprune.apply(model, method, 0.5)
    except UnsupportedModelError:
        return False
    vtprune.remove(model)
    return True


#: pre-LLM methods that cannot reach 0.25 on the tiny grids (MustDrop merges whole 3x3 windows)
_MIN_BUDGET = {"mustdrop": 0.75}


def _budget(method: str) -> float:
    return 0.5 if vtprune.methods()[method].stage == "in-llm" else _MIN_BUDGET.get(method, 0.25)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", [None, *(m for m in vtprune.methods()
                                             if not vtprune.registry.method_class(m).image_unsupported)])
def test_stats_flops_match_flop_counter(tiny_models, family, method):
    if not _supported(family, tiny_models):
        pytest.skip(f"no vtprune adapter for {family} yet")
    model, processor = tiny_models[family]
    # two samples of the same length: per-sample FLOPs exclude padding, FlopCounterMode counts the padded batch
    inputs = tiny_inputs(processor, [tiny_image(), tiny_image(seed=1)], ["What is this?", "What is this?"])
    assert bool(inputs["attention_mask"].all())
    # method None: a keep-everything budget, i.e. the unpruned forward (bitwise, invariant 1)
    name, budget = (method, _budget(method)) if method else ("random", 1.0)
    core = model.model
    accepted = inspect.signature(core.get_image_features).parameters
    vision_kwargs = {k: v for k, v in inputs.items() if k in accepted and k not in ("input_ids", "attention_mask")}
    vision_plain = _count(lambda: core.get_image_features(**vision_kwargs))
    options = {}
    if (name, family) == ("sparsevlm", "qwen3_vl"):  # SparseVLM 1.5 recycles tokens: its drops must enter the
        options, budget = {"layers": [1, 2]}, 0.6      # tiny Qwen3-VL after its deepstack layers (0-1)
    in_vit = method is not None and vtprune.methods()[method].stage == "in-vit"
    if in_vit and not _in_vit_supported(model, method):
        pytest.skip(f"{method} refuses {family} (see its docstring)")
    if in_vit:  # which removed tokens fall in the crops' unpadded area depends on the image: one image twice
        inputs = tiny_inputs(processor, [tiny_image(), tiny_image()], ["What is this?", "What is this?"])
    with vtprune.pruned(model, name, budget=budget, **options):
        # an in-ViT stage reduces the vision forward itself (its own FLOPs are counted in "select")
        signal_flops = 0 if in_vit else _count(lambda: core.get_image_features(**vision_kwargs)) - vision_plain
        timer = _SelectFlops()
        getattr(model, SESSION_ATTRIBUTE).timer = timer
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_CPU_SDPA) as counter:
            model(**inputs)
        stats = vtprune.stats(model)
    measured = counter.get_total_flops() - timer.flops - signal_flops
    analytic = stats.flops
    assert analytic > 0 and measured > 0
    assert abs(analytic - measured) <= 0.01 * measured, (analytic, measured, analytic / measured)
    assert signal_flops >= 0
    if method is None:
        assert stats.flops == stats.flops_unpruned and timer.flops == 0 and signal_flops == 0
    elif vtprune.methods()[method].stage == "decode":  # prunes the KV cache while decoding: prefill untouched
        assert stats.flops == stats.flops_unpruned
    else:
        assert stats.flops < stats.flops_unpruned
