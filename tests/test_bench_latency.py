"""Latency / memory measurement machinery on tiny models (what is measured, not how fast it is)."""

from __future__ import annotations

import pytest
import torch

import vtprune
from vtprune.bench.latency import (
    SectionClock,
    Timing,
    cache_bytes,
    expected_cache_bytes,
    measure_latency,
    measure_paired,
    native_k_inputs,
    native_k_prefill,
    time_call,
)
from vtprune.bench.memory import measure_peak_memory
from vtprune.engine.session import SESSION_ATTRIBUTE
from vtprune.testing import tiny_image, tiny_inputs


@pytest.fixture
def llava(tiny_models):
    model, processor = tiny_models["llava"]
    return model, processor, tiny_inputs(processor, [tiny_image()], ["What is in the image?"])


def test_timing_summary():
    t = Timing([5.0, 1.0, 3.0, 2.0, 4.0])
    assert t.median == 3.0 and t.min == 1.0 and t.max == 5.0 and t.n == 5
    assert t.quantile(0.25) == 2.0 and t.quantile(0.75) == 4.0
    assert t.spread == pytest.approx(2.0 / 3.0)
    d = t.to_dict()
    assert d["median"] == 3.0 and d["samples"] == [5.0, 1.0, 3.0, 2.0, 4.0]


def test_time_call_counts_repeats_and_warmup():
    calls = []
    timing = time_call(lambda: calls.append(1), warmup=2, repeats=5)
    assert len(calls) == 7 and timing.n == 5 and all(s >= 0 for s in timing.samples)


def test_section_clock_nests():
    clock = SectionClock("cpu")
    with clock.section("engine"):
        with clock.section("select"):
            sum(range(20000))
    totals = clock.totals()
    assert set(totals) == {"engine", "select"} and totals["engine"] >= totals["select"] > 0


def test_unpruned_latency_fields(llava):
    model, _, inputs = llava
    result = measure_latency(model, inputs, new_tokens=3, warmup=1, repeats=5)
    assert result.prefill.n == 5 and result.ttft.n == 5 and result.e2e.n == 5
    assert result.decode.n == 5 * 2  # two intervals per 3-token generate
    assert result.select is None and result.engine is None  # not pruned: no engine timing
    assert result.cpu["prefill"].n == 5 and result.cpu["decode"].n == 10  # CPU time alongside the wall time
    assert "select" not in result.cpu
    length = inputs["input_ids"].shape[1]
    assert result.kv_cache_lengths == [length] * model.config.text_config.num_hidden_layers
    assert result.kv_cache_bytes == expected_cache_bytes(model.config, result.kv_cache_lengths, torch.float32)


@pytest.mark.parametrize("method", ["divprune", "fastv"])
def test_pruned_latency_times_selection_and_shrinks_cache(llava, method):
    model, _, inputs = llava
    with vtprune.pruned(model, method, budget=0.5):
        result = measure_latency(model, inputs, new_tokens=2, warmup=1, repeats=5)
        stats = vtprune.stats(model).samples[0]
        assert getattr(model, SESSION_ATTRIBUTE).timer is None  # the timer is removed after measuring
    assert result.select.n == 5 and result.engine.n == 5
    for select, engine, prefill in zip(result.select.samples, result.engine.samples, result.prefill.samples,
                                       strict=True):
        assert 0 < select <= engine < prefill
    # the cache holds exactly the tokens each layer processed: KV bytes proportional to the kept tokens
    assert result.kv_cache_lengths == stats.layer_lengths
    assert result.kv_cache_bytes == expected_cache_bytes(model.config, stats.layer_lengths, torch.float32)
    assert result.kv_cache_lengths[-1] < inputs["input_ids"].shape[1]


def test_engine_timer_is_a_noop_when_unset(llava):
    model, _, inputs = llava
    with vtprune.pruned(model, "divprune", budget=16):
        session = getattr(model, SESSION_ATTRIBUTE)
        assert session.timer is None
        with torch.inference_mode():
            a = model(**inputs).logits
        session.timer = SectionClock("cpu")
        with torch.inference_mode():
            b = model(**inputs).logits
        assert set(session.timer.totals()) == {"select", "engine"}
        session.timer = None
    assert torch.equal(a, b)


def test_native_k_inputs_keep_text_and_first_k_image_tokens(llava):
    model, _, inputs = llava
    short = native_k_inputs(model, inputs, 10)
    ids = inputs["input_ids"]
    image = ids == model.config.image_token_id
    assert short["input_ids"].shape[1] == ids.shape[1] - int(image.sum()) + 10
    assert int(short["visual"].sum()) == 10
    assert torch.equal(short["input_ids"][~short["visual"]], ids[~image])
    with pytest.raises(ValueError, match="exceeds"):
        native_k_inputs(model, inputs, int(image.sum()) + 1)


def test_native_k_with_every_token_is_the_unpruned_model(llava):
    model, _, inputs = llava
    k = int((inputs["input_ids"] == model.config.image_token_id).sum())
    native = native_k_prefill(model, inputs, k)()
    with torch.inference_mode():
        reference = model(**inputs).logits[:, -1:]
    torch.testing.assert_close(native, reference, rtol=1e-5, atol=1e-5)


def test_native_k_runs_on_k_tokens(llava):
    model, _, inputs = llava
    seen = []
    lm = model.model.language_model
    handle = lm.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["inputs_embeds"].shape[1]),
                                          with_kwargs=True)
    try:
        native_k_prefill(model, inputs, 8)()
    finally:
        handle.remove()
    image_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert seen == [inputs["input_ids"].shape[1] - image_tokens + 8]


def test_measure_paired_interleaves_and_leaves_model_unpruned(llava):
    model, _, inputs = llava
    events = []

    def install():
        events.append("install")
        vtprune.apply(model, "divprune", budget=16)

    def uninstall():
        events.append("remove")
        vtprune.remove(model)

    paired = measure_paired(model, inputs, install=install, uninstall=uninstall, native_k=16, new_tokens=2,
                            warmup=1, repeats=5)
    assert not vtprune.is_pruned(model)
    assert events == ["install", "remove"] * 6
    assert paired.pruned.prefill.n == paired.unpruned.prefill.n == paired.native.n == 5
    assert paired.pruned.select.n == 5 and paired.unpruned.select is None
    assert paired.native_cpu.n == 5 and paired.pruned.cpu["select"].n == 5
    assert paired.pruned.kv_cache_bytes < paired.unpruned.kv_cache_bytes


def test_cache_bytes_of_nothing():
    assert cache_bytes(None) == 0


def test_peak_memory_sees_tensor_allocations():
    def allocate():
        x = torch.ones(16 * 2**20 // 4)  # 16 MiB
        y = x * 2
        return float(y[0])

    value, memory = measure_peak_memory(allocate)
    assert value == 2.0
    if memory.kind == "cpu-peak-rss":
        assert 24 * 2**20 <= memory.delta_bytes <= 200 * 2**20
    assert memory.peak_bytes >= memory.delta_bytes
    assert memory.tensor_peak_bytes == 32 * 2**20  # x and y alive together


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl"])
def test_native_k_runs_for_every_family(tiny_models, family):
    model, processor = tiny_models[family]
    inputs = tiny_inputs(processor, [tiny_image()], ["What is in the image?"])
    seen = []
    core = model.model
    handle = core.language_model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["inputs_embeds"].shape[1]), with_kwargs=True)
    try:
        logits = native_k_prefill(model, inputs, 8)()
    finally:
        handle.remove()
    image_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert seen == [inputs["input_ids"].shape[1] - image_tokens + 8]
    assert logits.shape[:2] == (1, 1) and torch.isfinite(logits).all()
