"""The transformers boundary (vtprune/compat.py), the supported-version warning, and the guard that a pruned model
never runs unpruned without a word when a transformers internal changes under it."""

from __future__ import annotations

import inspect
import json
import os
import time
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from packaging.version import Version
from torch import nn

import vtprune
from vtprune import compat
from vtprune.adapters.base import adapter_for
from vtprune.errors import SilentlyUnprunedError
from vtprune.testing import FAMILIES, tiny_image, tiny_inputs

ROOT = Path(__file__).resolve().parent.parent


# -- the boundary knows the installed release ----------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_cache_keyword_is_the_installed_releases(tiny_models, family):
    """Every forward vtprune hooks or calls takes the cache under compat.CACHE_KWARG."""
    model, _ = tiny_models[family]
    adapter = adapter_for(model)
    for forward in (type(model).forward, type(adapter.language_model).forward,
                    type(adapter.decoder_layers[0]).forward, type(adapter.decoder_layers[0].self_attn).forward):
        assert compat.CACHE_KWARG in inspect.signature(forward).parameters, forward.__qualname__
    from transformers.masking_utils import create_causal_mask

    assert compat.CACHE_KWARG in inspect.signature(create_causal_mask).parameters


def test_cache_helpers_read_both_spellings_and_write_one():
    cache = compat.new_dynamic_cache(transformers.LlamaConfig(num_hidden_layers=1))
    assert compat.get_cache({"past_key_values": cache}) is cache
    assert compat.get_cache({"cache": cache, "past_key_values": None}) is cache
    assert compat.get_cache({"input_ids": 1}) is None
    out = compat.with_cache({"past_key_values": None, "cache": None, "x": 1}, cache)
    assert out == {"x": 1, compat.CACHE_KWARG: cache}


def test_tested_range_matches_pyproject():
    text = (ROOT / "pyproject.toml").read_text()
    low, high = compat.TESTED_RANGE
    assert f'"transformers>={low.rsplit(".0", 1)[0]},<{high}"' in text or f'"transformers>={low},<{high}"' in text
    assert compat.in_tested_range(Version(transformers.__version__)), (
        f"CI runs transformers {transformers.__version__}, outside compat.TESTED_RANGE {compat.TESTED_RANGE}")


def test_apply_warns_once_outside_the_tested_range(tiny_models, monkeypatch):
    model, _ = tiny_models["llava"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # inside the range: no warning at all
        vtprune.apply(model, "random", 4)
        vtprune.remove(model)
    monkeypatch.setattr(compat, "TRANSFORMERS_VERSION", Version("5.31.0"))
    monkeypatch.setattr(compat.transformers, "__version__", "5.31.0")
    with pytest.warns(UserWarning, match=r"tested with transformers>=5\.23\.0,<5\.25.*5\.31\.0") as caught:
        vtprune.apply(model, "random", 4)
    vtprune.remove(model)
    assert len([w for w in caught if issubclass(w.category, UserWarning)]) == 1


# -- the guard: never silently unpruned --------------------------------------------------------------------
def _assert_names_the_stack(error: Exception, model: nn.Module) -> None:
    text = str(error)
    assert type(model).__name__ in text
    assert transformers.__version__ in text
    assert compat.supported_range_text() in text


class _Elsewhere(nn.Module):
    """A module that is never called: hooks installed on it never run (as when transformers renames or
    restructures the module an adapter points at)."""

    def __init__(self, num_layers: int = 0):
        super().__init__()
        self.layers = nn.ModuleList(nn.Identity() for _ in range(num_layers))

    def _deepstack_process(self, hidden, mask, rows):  # Qwen3-VL's side-input injector lives here too
        return hidden


@pytest.mark.parametrize("family", FAMILIES)
def test_guard_language_model_hook_that_never_runs(tiny_models, family, monkeypatch):
    model, processor = tiny_models[family]
    adapter_cls = type(adapter_for(model))
    elsewhere = _Elsewhere()
    monkeypatch.setattr(adapter_cls, "language_model", property(lambda self: elsewhere))
    inputs = tiny_inputs(processor, [tiny_image(0)], ["Describe the image."])
    with vtprune.pruned(model, "random", 4), torch.no_grad():
        with pytest.raises(SilentlyUnprunedError, match="would run unpruned") as raised:
            model(**inputs)
    _assert_names_the_stack(raised.value, model)


@pytest.mark.parametrize("family", FAMILIES)
def test_guard_visual_inputs_under_an_unknown_name(tiny_models, family, monkeypatch):
    """transformers renames the argument that carries the images (here: the adapter no longer recognises any):
    the placeholders in input_ids give it away before the forward runs."""
    model, processor = tiny_models[family]
    monkeypatch.setattr(type(adapter_for(model)), "has_visual_input", lambda self, call: False)
    inputs = tiny_inputs(processor, [tiny_image(0)], ["Describe the image."])
    with vtprune.pruned(model, "divprune", 4), torch.no_grad():
        with pytest.raises(SilentlyUnprunedError, match="placeholder tokens") as raised:
            model.generate(**inputs, max_new_tokens=2, do_sample=False)
    _assert_names_the_stack(raised.value, model)


@pytest.mark.parametrize("family", FAMILIES)
def test_guard_pre_encoded_outputs_under_an_unknown_name(tiny_models, family, monkeypatch):
    """generate() pre-encodes the images and hands the forward ``mm_encoder_outputs``; if that name changes,
    the engine must not decode the prompt unpruned."""
    model, processor = tiny_models[family]
    monkeypatch.setattr(compat, "encoder_outputs", lambda call: {})
    inputs = tiny_inputs(processor, [tiny_image(0)], ["Describe the image."])
    with vtprune.pruned(model, "divprune", 4), torch.no_grad():
        with pytest.raises(SilentlyUnprunedError):
            model.generate(**inputs, max_new_tokens=2, do_sample=False)


@pytest.mark.parametrize("family", FAMILIES)
def test_guard_decoder_layer_hooks_that_never_run(tiny_models, family, monkeypatch):
    model, processor = tiny_models[family]
    adapter_cls = type(adapter_for(model))
    elsewhere = _Elsewhere(len(adapter_for(model).decoder_layers))
    monkeypatch.setattr(adapter_cls, "decoder_layers", property(lambda self: elsewhere.layers))
    inputs = tiny_inputs(processor, [tiny_image(0)], ["Describe the image."])
    with vtprune.pruned(model, "fastv", 0.5, layer=1), torch.no_grad():
        with pytest.raises(SilentlyUnprunedError, match="in-LLM stage saw 0 of") as raised:
            model(**inputs)
    _assert_names_the_stack(raised.value, model)


@pytest.mark.parametrize("entry", ["vision", "side_inputs"])
def test_missing_internal_is_refused_at_apply(tiny_models, entry, monkeypatch):
    """A renamed internal: one clear error at apply(), and nothing half-installed stays on the model."""
    model, _ = tiny_models["qwen3_vl"]
    adapter_cls = type(adapter_for(model))
    if entry == "vision":
        monkeypatch.setattr(adapter_cls, "vision_entry_points", (("model", "get_image_features_v2"),))
    else:  # wrapped after the vision entry point, which must then be unwrapped again
        monkeypatch.setattr(adapter_cls, "side_input_injector", ("", "_deepstack_process_v2"))
    before = set(vars(model.model))
    with pytest.raises(vtprune.UnsupportedModelError, match="_v2") as raised:
        vtprune.apply(model, "divprune", 4)
    _assert_names_the_stack(raised.value, model)
    assert not vtprune.is_pruned(model)
    assert set(vars(model.model)) == before
    assert not model._forward_pre_hooks and not model._forward_hooks


def test_guard_no_visual_token_found(tiny_models, monkeypatch):
    model, processor = tiny_models["llava"]
    adapter_cls = type(adapter_for(model))
    real_build = adapter_cls.build_layouts

    def no_images(self, call):
        layouts = real_build(self, call)
        for layout in layouts:
            layout.images.clear()
        return layouts

    monkeypatch.setattr(adapter_cls, "build_layouts", no_images)
    inputs = tiny_inputs(processor, [tiny_image(0)], ["Describe the image."])
    with vtprune.pruned(model, "divprune", 4), torch.no_grad():
        with pytest.raises(SilentlyUnprunedError, match="no visual token was found"):
            model(**inputs)


@pytest.mark.parametrize("family", FAMILIES)
def test_guard_stays_quiet_on_text_only_and_decoding(tiny_models, family):
    model, processor = tiny_models[family]
    text_only = tiny_inputs(processor, None, ["Hello there."])
    with_image = tiny_inputs(processor, [tiny_image(0)], ["Describe the image."])
    with vtprune.pruned(model, "divprune", 4), torch.no_grad():
        model(**text_only)
        assert vtprune.stats(model).samples[0].visual_in == 0
        model.generate(**with_image, max_new_tokens=3, do_sample=False)
        sample = vtprune.stats(model).samples[0]
        assert sample.stages and sample.stages[0].visual_out < sample.visual_in


# -- artifacts never name the testing stub -------------------------------------------------------------------
def test_stub_video_processor_saves_as_the_real_class(tmp_path, monkeypatch):
    from vtprune.testing import _make_processor, _stub_video_processor_class, _video_processor

    def needs_torchvision(self, *args, **kwargs):
        raise ImportError("Qwen2VLVideoProcessor requires the Torchvision library")

    if getattr(transformers, "Qwen2VLVideoProcessor", None) is not None:  # as without torchvision: cannot build
        monkeypatch.setattr(transformers.Qwen2VLVideoProcessor, "__init__", needs_torchvision)
    video = _video_processor("Qwen2VLVideoProcessor", patch_size=8, temporal_patch_size=2, merge_size=2)
    assert isinstance(video, _stub_video_processor_class())
    _, reference = vtprune.testing.tiny_vlm("qwen2_vl")
    processor = _make_processor(transformers.Qwen2VLProcessor, image_processor=reference.image_processor,
                                tokenizer=reference.tokenizer, video_processor=video,
                                chat_template=reference.chat_template)
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert saved["video_processor"]["video_processor_type"] == "Qwen2VLVideoProcessor"
    assert "Tiny" not in (tmp_path / "processor_config.json").read_text()


@pytest.mark.parametrize("name", ["micro-llava", "micro-qwen2vl", "micro-qwen2vl-video"])
def test_shipped_processors_name_real_classes(name):
    text = (ROOT / "models" / name / "processor_config.json").read_text()
    assert "Tiny" not in text and "vtprune" not in text
    for key, value in json.loads(text).items():
        if isinstance(value, dict):
            for field in ("image_processor_type", "video_processor_type"):
                if field in value:
                    assert hasattr(transformers, value[field]), (key, value[field])


@pytest.mark.parametrize("name", ["micro-llava", "micro-qwen2vl", "micro-qwen2vl-video"])
def test_shipped_checkpoints_load_with_plain_transformers(name, monkeypatch):
    """Where torchvision is installed (the users' stack), the plain Auto classes load the bundled models and
    generate; without it vtprune.loading.load_processor is the way (tested in test_micro_models)."""
    pytest.importorskip("torchvision")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    directory = ROOT / "models" / name
    processor = transformers.AutoProcessor.from_pretrained(directory)
    model = transformers.AutoModelForImageTextToText.from_pretrained(directory).eval()
    if name.startswith("micro-qwen2vl"):
        assert type(processor.video_processor).__name__ == "Qwen2VLVideoProcessor"
    inputs = tiny_inputs(processor, [tiny_image(0, size=(128, 128))], ["What color is the small object?"])
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]


# -- vtprune eval: success is judged by what lmms-eval wrote --------------------------------------------------
def test_eval_results_check(tmp_path):
    from vtprune.bench.lmms import _results_problem

    started = time.time()
    assert "wrote no results file" in _results_problem(tmp_path, started)
    stale = tmp_path / "old" / "x_results.json"
    stale.parent.mkdir()
    stale.write_text(json.dumps({"results": {"vtprune_synth": {"exact_match": 1.0}}}))
    os.utime(stale, (started - 60, started - 60))
    assert "wrote no results file" in _results_problem(tmp_path, started)  # an earlier run's file is stale
    fresh = tmp_path / "new" / "y_results.json"
    fresh.parent.mkdir()
    fresh.write_text(json.dumps({"results": {}}))
    assert "no task results" in _results_problem(tmp_path, started)
    fresh.write_text(json.dumps({"results": {"vtprune_synth": {"exact_match": 0.5}}}))
    assert _results_problem(tmp_path, started) is None


def test_eval_exits_nonzero_when_lmms_eval_writes_nothing(tmp_path, monkeypatch, capsys):
    pytest.importorskip("lmms_eval")
    import vtprune.bench.lmms as lmms
    import vtprune.cli

    monkeypatch.setattr(lmms.subprocess, "call", lambda *a, **k: 0)  # "succeeds" without writing anything
    code = vtprune.cli.main(["eval", "--limit", "2", "--output-path", str(tmp_path)])
    assert code != 0
    assert "wrote no results file" in capsys.readouterr().err
    monkeypatch.setattr(lmms.subprocess, "call", lambda *a, **k: 3)
    assert vtprune.cli.main(["eval", "--limit", "2", "--output-path", str(tmp_path)]) == 3
