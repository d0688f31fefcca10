"""The bad-input table (issue 12): every row is (description, the call, the expected outcome, a message fragment).

Outcomes: a clear error (API: the exception class; CLI: exit code 2 and exactly one line ``vtprune: error: ...``
on stderr, no traceback), a :class:`vtprune.DegeneratePruningWarning` while the call still runs, or "works"
(an edge input that must run as asked). CLI rows call :func:`vtprune.cli.main` in-process; for argument
errors every model-loading entry point is replaced by one that fails the test, which proves that arguments
are checked before anything is loaded. Tiny models only, no generate beyond one token: the file runs in
seconds.
"""

from __future__ import annotations

import json
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import vtprune
from vtprune import BudgetError, MethodOptionError, UnknownMethodError, UnsupportedModelError, VTPruneError
from vtprune.cli import main
from vtprune.registry import build_method
from vtprune.testing import tiny_image, tiny_inputs, tiny_vlm

WARNING = vtprune.DegeneratePruningWarning


@dataclass(frozen=True)
class Row:
    description: str
    call: Callable[..., Any]        # API: call(ctx); CLI: call(files) -> argv
    expected: Any                   # exception class, warning class, exit code, or None (works, no warning)
    fragment: str = ""              # must appear in the message / stderr / stdout
    setup: Callable[[Any, Any], None] | None = field(default=None)  # setup(monkeypatch, files) before a CLI row


# ------------------------------------------------------------------------------------------ API fixtures


@pytest.fixture(scope="module")
def shallow():
    """A 2-layer tiny LLaVA (FastV's default layer 2 does not fit it)."""
    model, processor = tiny_vlm("llava", text_config={"num_hidden_layers": 2})
    return model


@pytest.fixture
def ctx(tiny_models, shallow):
    model, processor = tiny_models["llava"]  # 4 decoder layers, 64 visual tokens per image
    inputs = tiny_inputs(processor, [tiny_image()], ["What is it?"])
    yield SimpleNamespace(model=model, shallow=shallow, inputs=inputs, models=tiny_models)
    for net in (model, shallow, *tiny_models.models()):
        if vtprune.is_pruned(net):
            vtprune.remove(net)


def forward(ctx, *args, **kwargs):
    """One pruned forward (the pruning is removed afterwards, also on error); returns the stats."""
    with vtprune.pruned(ctx.model, *args, **kwargs), torch.no_grad():
        ctx.model(**ctx.inputs)
        return vtprune.stats(ctx.model)


def forward_family(ctx, family: str, *args, **kwargs):
    """One pruned forward of another family's tiny model (families whose visual counts depend on the input, so
    some checks can only run at the forward)."""
    model, processor = ctx.models[family]
    inputs = tiny_inputs(processor, [tiny_image()], ["What is it?"])
    with vtprune.pruned(model, *args, **kwargs), torch.no_grad():
        model(**inputs)
        return vtprune.stats(model)


def apply_twice(ctx):
    vtprune.apply(ctx.model, "random", 8)
    try:
        vtprune.apply(ctx.model, "random", 8)
    finally:
        vtprune.remove(ctx.model)


def stats_before_forward(ctx):
    vtprune.apply(ctx.model, "random", 8)
    try:
        vtprune.stats(ctx.model)
    finally:
        vtprune.remove(ctx.model)


def text_only_model(ctx):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    vtprune.apply(LlamaForCausalLM(config), "divprune", 16)


def apply(ctx, *args, **kwargs):
    vtprune.apply(ctx.model, *args, **kwargs)
    vtprune.remove(ctx.model)


fastv_object = lambda: build_method("fastv", ratio=0.5)  # noqa: E731
divprune_object = lambda: build_method("divprune", budget=8)  # noqa: E731

API_ERRORS = [
    Row("unknown method", lambda c: apply(c, "fastvlm", 8), UnknownMethodError, "Known methods"),
    Row("method name typo", lambda c: apply(c, "divprun", 8), UnknownMethodError, "Did you mean 'divprune'"),
    Row("method of the wrong type", lambda c: apply(c, 42, 8), UnknownMethodError, "registered name"),
    Row("empty method list", lambda c: apply(c, [], 8), VTPruneError, "method list is empty"),
    Row("budget 0", lambda c: apply(c, "divprune", 0), BudgetError, "keeps no visual token"),
    Row("negative int budget", lambda c: apply(c, "divprune", -3), BudgetError, "positive int"),
    Row("fraction above 1", lambda c: apply(c, "divprune", 1.5), BudgetError, "(0, 1]"),
    Row("negative fraction", lambda c: apply(c, "divprune", -0.5), BudgetError, "(0, 1]"),
    Row("NaN budget", lambda c: apply(c, "divprune", float("nan")), BudgetError, "(0, 1]"),
    Row("budget as a string", lambda c: apply(c, "divprune", "64"), BudgetError, "of type str"),
    Row("budget True", lambda c: apply(c, "divprune", True), BudgetError, "of type bool"),
    Row("option a method does not take", lambda c: apply(c, "divprune", 8, dominant=3), MethodOptionError,
        "its options are: none"),
    Row("misspelt option names the valid ones", lambda c: apply(c, "fastv", lyer=3), MethodOptionError,
        "its options are: layer, ratio"),
    Row("unknown position convention", lambda c: apply(c, "divprune", 8, positions="middle"), MethodOptionError,
        "position convention"),
    Row("seed not an int", lambda c: apply(c, "random", 8, seed="0"), MethodOptionError, "seed must be an int"),
    Row("method object + budget", lambda c: apply(c, fastv_object(), 8), MethodOptionError,
        "budget passed to vtprune.apply would be ignored"),
    Row("method object + positions", lambda c: apply(c, divprune_object(), positions="original"),
        MethodOptionError, "positions passed to vtprune.apply would be ignored"),
    Row("method object + option", lambda c: apply(c, divprune_object(), dominant=3), MethodOptionError,
        "dominant passed to vtprune.apply would be ignored"),
    Row("method object + seed", lambda c: apply(c, divprune_object(), seed=3), MethodOptionError,
        "seed passed to vtprune.apply would be ignored"),
    Row("list of objects + budget", lambda c: apply(c, [divprune_object(), fastv_object()], 8), MethodOptionError,
        "would be ignored"),
    Row("stage budget for an object", lambda c: apply(c, ["divprune", fastv_object()], stage_budgets=[32, 16]),
        MethodOptionError, "keeps its own budget"),
    Row("options with a composition", lambda c: apply(c, ["divprune", "fastv"], 16, layer=1), VTPruneError,
        "when composing"),
    Row("stage_budgets of the wrong length", lambda c: apply(c, ["divprune", "fastv"], stage_budgets=[48]),
        VTPruneError, "one per method"),
    Row("two pre-LLM methods", lambda c: apply(c, ["divprune", "random"], 16), VTPruneError, "at most one pre-LLM"),
    Row("two in-LLM methods", lambda c: apply(c, ["fastv", "pdrop"]), VTPruneError, "at most one in-LLM"),
    Row("in-LLM listed before pre-LLM", lambda c: apply(c, ["fastv", "divprune"], 16), VTPruneError,
        "list the pre-LLM method before"),
    Row("build_method(object, budget)", lambda c: build_method(fastv_object(), budget=8), MethodOptionError,
        "already a configured method object"),
    Row("visionzip dominant+contextual above the budget", lambda c: apply(c, "visionzip", 8, dominant=8,
                                                                          contextual=2),
        MethodOptionError, "exceed budget=8"),
    Row("visionzip dominant above the default budget", lambda c: apply(c, "visionzip", dominant=100),
        MethodOptionError, "exceed budget=64"),
    Row("visionzip dominant=0, contextual=0", lambda c: apply(c, "visionzip", dominant=0, contextual=0),
        MethodOptionError, "keeps no visual token"),
    Row("visionzip negative dominant", lambda c: apply(c, "visionzip", 8, dominant=-1), MethodOptionError,
        "non-negative int"),
    Row("visionzip options above a fraction's per-image share",
        lambda c: forward(c, "visionzip", 0.1, dominant=5, contextual=2), BudgetError, "do not fit the 6 tokens"),
    Row("fastv layer=2 on a 2-layer model", lambda c: vtprune.apply(c.shallow, "fastv"), MethodOptionError,
        "fastv layer=2 is at or beyond this model's 2 decoder layers"),
    Row("dart layer beyond the depth", lambda c: apply(c, "dart", layer=5), MethodOptionError,
        "at or beyond this model's 4 decoder layers"),
    Row("pdrop layers beyond the depth", lambda c: apply(c, "pdrop", layers=[1, 4]), MethodOptionError,
        "reach beyond this model's 4 decoder layers"),
    Row("sparsevlm layers beyond the depth", lambda c: apply(c, "sparsevlm", layers=[2, 9]), MethodOptionError,
        "reach beyond this model's 4 decoder layers"),
    Row("sparsevlm on a 2-layer model with layers=[2]", lambda c: vtprune.apply(c.shallow, "sparsevlm", layers=[2]),
        MethodOptionError, "reach beyond"),
    Row("fastv ratio above 1", lambda c: apply(c, "fastv", ratio=1.5), MethodOptionError, "dropped fraction"),
    Row("fastv layer 0", lambda c: apply(c, "fastv", layer=0), MethodOptionError, "must be an int ≥ 1"),
    Row("pdrop lambda_ 0", lambda c: apply(c, "pdrop", lambda_=0), MethodOptionError, "must be in (0, 1]"),
    Row("sparsevlm version 3", lambda c: apply(c, "sparsevlm", version=3), MethodOptionError,
        'must be "1.5" or "2.0"'),
    Row("dart pivots 0", lambda c: apply(c, "dart", pivots=0), MethodOptionError, "positive int"),
    Row("fastv budget below what layer 2 can reach (refused at apply on LLaVA-1.5)",
        lambda c: apply(c, "fastv", 8), BudgetError, "smallest reachable budget"),
    Row("fastv budget below what layer 2 can reach (Qwen2-VL: at the forward)",
        lambda c: forward_family(c, "qwen2_vl", "fastv", 8), BudgetError, "smallest reachable budget"),
    Row("visionzip counts above a LLaVA-NeXT crop's share",
        lambda c: forward_family(c, "llava_next", "visionzip", 32, dominant=20, contextual=4), BudgetError,
        "do not fit the"),
    Row("pdrop budget below its reachable minimum", lambda c: apply(c, "pdrop", 4), BudgetError,
        "smallest reachable budget"),
    Row("apply twice", apply_twice, VTPruneError, "already pruned"),
    Row("remove an unpruned model", lambda c: vtprune.remove(c.model), VTPruneError, "nothing to remove"),
    Row("stats of an unpruned model", lambda c: vtprune.stats(c.model), VTPruneError, "is not pruned"),
    Row("stats before any forward", stats_before_forward, VTPruneError, "no forward has run"),
    Row("text-only model", text_only_model, UnsupportedModelError, "Supported model classes"),
]

API_WARNINGS = [
    Row("pre-LLM budget of 2 tokens", lambda c: forward(c, "random", 2), WARNING, "fewer than 4"),
    Row("ratio overrides an explicit budget", lambda c: forward(c, "fastv", 8, ratio=0.5), WARNING,
        "ratio=0.5 overrides budget=8"),
    Row("lambda_ overrides an explicit budget", lambda c: forward(c, "pdrop", 48, lambda_=0.5), WARNING,
        "lambda_=0.5 overrides budget=48"),
    Row("keep overrides an explicit budget", lambda c: forward(c, "sparsevlm", 16, layers=[1, 2], keep=[32, 16]),
        WARNING, "overrides budget=16"),
    Row("visionzip counts override an explicit budget", lambda c: forward(c, "visionzip", 16, dominant=5,
                                                                           contextual=2),
        WARNING, "overrides budget=16"),
    Row("README composition on a 4-layer model keeps 1 token", lambda c: forward(c, ["divprune", "fastv"], 16),
        WARNING, "keeps 1 visual token(s)"),
    Row("composition split leaves the pre-LLM stage keeping all", lambda c: forward(c, ["divprune", "fastv"], 0.5),
        WARNING, "divprune prunes nothing"),
    Row("in-LLM budget above the visual tokens", lambda c: forward(c, "fastv", 1000), WARNING,
        "nothing is pruned"),
    Row("pre-LLM budget above LLaVA-1.5's tokens per image", lambda c: forward(c, "random", 1000), WARNING,
        "keeps all 64 visual tokens of every image"),
    Row("pre-LLM fraction that keeps 2 tokens", lambda c: forward(c, "divprune", 0.03), WARNING,
        "keeps 2 of the 64 visual tokens"),
]


def kept_counts(stats) -> list[int]:
    return [stage.visual_out for stage in stats.samples[0].stages]


API_WORKS = [
    Row("budget 1.0 keeps every token, without a warning", lambda c: kept_counts(forward(c, "fastv", 1.0)) == [64],
        None),
    Row("visionzip counts without a budget are the budget", lambda c: kept_counts(
        forward(c, "visionzip", dominant=5, contextual=2)) == [7], None),
    Row("mixed list: the budget goes to the names, the object keeps its own", lambda c: kept_counts(
        forward(c, ["divprune", fastv_object()], 16)) == [32, 16], None),
    Row("an object alone, with nothing else passed", lambda c: kept_counts(forward(c, fastv_object())) == [32], None),
    Row("fastv layer=1 on a 2-layer model", lambda c: vtprune.remove(vtprune.apply(c.shallow, "fastv", layer=1))
        is c.shallow, None),
]


@pytest.mark.parametrize("row", API_ERRORS, ids=lambda r: r.description)
def test_api_error(row, ctx):
    with pytest.raises(row.expected) as info:
        row.call(ctx)
    assert isinstance(info.value, VTPruneError)
    assert row.fragment in str(info.value), str(info.value)
    assert not vtprune.is_pruned(ctx.model) and not vtprune.is_pruned(ctx.shallow)


@pytest.mark.parametrize("row", API_WARNINGS, ids=lambda r: r.description)
def test_api_warning(row, ctx):
    with pytest.warns(row.expected) as caught:
        stats = row.call(ctx)
    assert stats.samples[0].stages  # it still ran
    messages = [str(w.message) for w in caught if issubclass(w.category, WARNING)]
    assert any(row.fragment in m for m in messages), messages
    assert all(m.startswith("vtprune ") for m in messages)  # each names the method


@pytest.mark.parametrize("row", API_WORKS, ids=lambda r: r.description)
def test_api_edge_input_works(row, ctx):
    with warnings.catch_warnings():
        warnings.simplefilter("error", WARNING)
        assert row.call(ctx) is True


# ------------------------------------------------------------------------------------------ CLI fixtures


def _png(path: Path, size=(32, 24)) -> Path:
    from PIL import Image

    Image.new("RGB", size, (200, 30, 30)).save(path)
    return path


def _rows_file(path: Path, rows: list[dict], tail: str = "") -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    return path


def _ok_row(method: str, budget, accuracy: float) -> dict:
    return {"model": "/m/micro", "method": method, "budget": budget, "task": "synth", "status": "ok",
            "accuracy": accuracy, "flops": 1e9 * (budget or 1), "flops_unpruned": 1e9,
            "latency": {"prefill_ms": {"median": 5.0 * (budget or 1)}}, "bench": {"limit": 6}}


@pytest.fixture
def files(tmp_path):
    """Every file and directory the CLI rows point at."""
    f = SimpleNamespace(tmp=tmp_path, missing=str(tmp_path / "missing"))
    f.a_file = tmp_path / "a_file.txt"
    f.a_file.write_text("not an image, not a model")
    f.empty_dir = tmp_path / "empty_dir"
    f.empty_dir.mkdir()

    def model_dir(name: str, config) -> str:
        path = tmp_path / name
        path.mkdir()
        (path / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
        return str(path)

    f.bad_json = model_dir("bad_json", "{not json")
    f.llama = model_dir("llama", {"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    f.custom = model_dir("custom", {"model_type": "my_vlm", "auto_map": {"AutoConfig": "my.MyConfig"}})
    f.unknown_type = model_dir("unknown_type", {"model_type": "no_such_type"})
    f.llava_dir = model_dir("llava_dir", {"model_type": "llava", "architectures": ["LlavaForConditionalGeneration"]})
    f.png = _png(tmp_path / "ok.png")
    data = _png(tmp_path / "big.png", (64, 64)).read_bytes()
    f.truncated = tmp_path / "truncated.png"
    f.truncated.write_bytes(data[: len(data) // 2])
    f.header_only = tmp_path / "header.png"
    f.header_only.write_bytes(data[:20])
    f.big = tmp_path / "big.png"
    f.corrupted = _rows_file(tmp_path / "corrupted.jsonl", [_ok_row("none", None, 0.9)],
                             "not json\n" + json.dumps(_ok_row("random", 0.5, 0.5)) + "\n")
    f.not_rows = _rows_file(tmp_path / "not_rows.jsonl", [{"hello": "world"}])
    f.clip = str(Path(__file__).resolve().parents[1] / "eval" / "data" / "clips" / "moving_square.mp4")  # 64 frames
    f.junk_video = tmp_path / "junk.mp4"
    f.junk_video.write_bytes(b"\x00not a video" * 40)
    f.only_errors = _rows_file(tmp_path / "errors.jsonl", [{**_ok_row("fastv", 4, 0.0), "status": "error"}])
    f.torn = _rows_file(tmp_path / "torn.jsonl", [_ok_row("none", None, 0.9), _ok_row("random", 0.5, 0.6),
                                                   _ok_row("divprune", 0.5, 0.8)], '{"model": "/m/micro", "met')
    return f


@pytest.fixture
def loads(monkeypatch):
    """Replace every model-loading entry point by one that records the call and fails the test."""
    import vtprune.bench.presets as presets
    import vtprune.bench.sweep as sweep
    import vtprune.loading as loading

    calls: list[str] = []

    def refuse(name):
        def load(*args, **kwargs):
            calls.append(name)
            pytest.fail(f"{name} was called: a model was loaded before the arguments were checked")
        return load

    monkeypatch.setattr(loading, "load_model", refuse("load_model"))
    monkeypatch.setattr(sweep, "load_for_bench", refuse("load_for_bench"))
    monkeypatch.setattr(sweep, "run_cell", refuse("run_cell"))
    monkeypatch.setattr(presets, "build_preset", refuse("build_preset"))
    monkeypatch.setattr("subprocess.call", refuse("subprocess.call (lmms-eval)"))
    return calls


def _without(module: str):
    def setup(monkeypatch, files):
        monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError, as when not installed
    return setup


def _tiny_pixel_limit(monkeypatch, files):
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)  # ok.png has 768 pixels: above twice the limit


def _half_pixel_limit(monkeypatch, files):
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # 768 pixels: PIL would only warn


RUN = ["run", "--model", "tiny:llava"]
BENCH = ["bench", "--model", "tiny:llava", "--tasks", "latency", "--no-progress"]

CLI_ERRORS = [
    # run: the model
    Row("run: tiny:bogus", lambda f: ["run", "--model", "tiny:bogus"], 2, "no tiny model family 'bogus'"),
    Row("run: nonexistent model path", lambda f: ["run", "--model", f.missing], 2, "no such directory"),
    Row("run: nonexistent nested path", lambda f: ["run", "--model", "/no/such/model/dir"], 2, "no such directory"),
    Row("run: model path is a file", lambda f: ["run", "--model", str(f.a_file)], 2, "is a file, not a model"),
    Row("run: model dir without config.json", lambda f: ["run", "--model", str(f.empty_dir)], 2, "no config.json"),
    Row("run: unreadable config.json", lambda f: ["run", "--model", f.bad_json], 2, "not readable JSON"),
    Row("run: text-only model", lambda f: ["run", "--model", f.llama], 2, "vtprune cannot prune"),
    Row("run: custom code without --trust-remote-code", lambda f: ["run", "--model", f.custom], 2,
        "--trust-remote-code"),
    Row("run: unknown model_type", lambda f: ["run", "--model", f.unknown_type], 2, "transformers does not know"),
    # run: the image
    Row("run: missing image", lambda f: [*RUN, "--image", f.missing], 2, "no such file"),
    Row("run: image is a directory", lambda f: [*RUN, "--image", str(f.empty_dir)], 2, "is not a file"),
    Row("run: image is a text file", lambda f: [*RUN, "--image", str(f.a_file)], 2, "not an image PIL can read"),
    Row("run: truncated image", lambda f: [*RUN, "--image", str(f.truncated)], 2, "truncated"),
    Row("run: image of a header only", lambda f: [*RUN, "--image", str(f.header_only)], 2, "cannot be read"),
    Row("run: decompression bomb (above 2x PIL's limit)", lambda f: [*RUN, "--image", str(f.png)], 2, "too large",
        setup=_tiny_pixel_limit),
    Row("run: decompression bomb (above PIL's limit)", lambda f: [*RUN, "--image", str(f.png)], 2, "too large",
        setup=_half_pixel_limit),
    # run: other arguments
    Row("run: --device bogus", lambda f: [*RUN, "--device", "bogus"], 2, "is not a device"),
    Row("run: --device cuda:99", lambda f: [*RUN, "--device", "cuda:99"], 2, "--device cuda:99"),
    Row("run: --max-new-tokens 0", lambda f: [*RUN, "--max-new-tokens", "0"], 2, "--max-new-tokens"),
    Row("run: --max-new-tokens abc", lambda f: [*RUN, "--max-new-tokens", "abc"], 2, "not an int"),
    Row("run: unknown method", lambda f: [*RUN, "--method", "bogus"], 2, "unknown method 'bogus'"),
    Row("run: empty method in a composition", lambda f: [*RUN, "--method", "divprune+"], 2, "empty name"),
    Row("run: budget 0", lambda f: [*RUN, "--budget", "0"], 2, "keeps no visual token"),
    Row("run: budget above 1.0", lambda f: [*RUN, "--budget", "1.5"], 2, "(0, 1]"),
    Row("run: negative budget", lambda f: [*RUN, "--budget", "-4"], 2, "positive int"),
    Row("run: budget not a number", lambda f: [*RUN, "--budget", "lots"], 2, "is not an int"),
    Row("run: option without =", lambda f: [*RUN, "--option", "dominant"], 2, "name=value"),
    Row("run: option the method does not take", lambda f: [*RUN, "--method", "fastv", "--option", "lyer=3"], 2,
        "its options are: layer, ratio"),
    Row("run: visionzip counts above the budget", lambda f: [*RUN, "--method", "visionzip", "--budget", "8",
                                                             "--option", "dominant=8", "--option", "contextual=2"],
        2, "exceed budget=8"),
    Row("run: option with a composition", lambda f: [*RUN, "--method", "divprune+fastv", "--option", "layer=1"], 2,
        "composing"),
    Row("run: unknown positions", lambda f: [*RUN, "--positions", "middle"], 2, "invalid choice"),
    Row("run: unsupported dtype", lambda f: [*RUN, "--dtype", "float64"], 2, "invalid choice"),
    Row("run: --show is a directory", lambda f: [*RUN, "--show", str(f.empty_dir)], 2, "is a directory"),
    # run: the video
    Row("run: --frames without --video", lambda f: [*RUN, "--frames", "8"], 2, "pass --video FILE too"),
    Row("run: --fps without --video", lambda f: [*RUN, "--fps", "1"], 2, "pass --video FILE too"),
    Row("run: --video and --image", lambda f: ["run", "--video", f.clip, "--image", str(f.png)], 2, "not both"),
    Row("run: missing video", lambda f: ["run", "--video", f.missing], 2, "does not exist"),
    Row("run: video is a directory", lambda f: ["run", "--video", str(f.empty_dir)], 2, "not a file"),
    Row("run: video is not a video", lambda f: ["run", "--video", str(f.junk_video)], 2, "could not read"),
    Row("run: --frames 0", lambda f: ["run", "--video", f.clip, "--frames", "0"], 2, "--frames"),
    Row("run: --fps -1", lambda f: ["run", "--video", f.clip, "--fps", "-1"], 2, "positive number"),
    Row("run: --fps nan", lambda f: ["run", "--video", f.clip, "--fps", "nan"], 2, "positive number"),
    Row("run: --frames and --fps", lambda f: ["run", "--video", f.clip, "--frames", "8", "--fps", "1"], 2,
        "not both"),
    Row("run: more frames than the clip has", lambda f: ["run", "--video", f.clip, "--frames", "65"], 2,
        "pass num_frames <= 64"),
    Row("run: --fps above the clip's", lambda f: ["run", "--video", f.clip, "--fps", "30"], 2, "pass fps <= 8"),
    Row("run: --max-pixels without --video", lambda f: [*RUN, "--max-pixels", "151200"], 2, "pass --video FILE too"),
    Row("run: --max-pixels on LLaVA-OneVision", lambda f: ["run", "--model", "tiny:llava_onevision", "--video", f.clip,
                                                         "--max-pixels", "151200"], 2, "drop --max-pixels"),
    Row("run: --max-pixels below one patch", lambda f: ["run", "--video", f.clip, "--max-pixels", "100"], 2,
        "--max-pixels"),
    Row("run: video into an image-only model", lambda f: [*RUN, "--video", f.clip], 2, "takes no videos"),
    Row("run: video into an image-only model directory", lambda f: ["run", "--model", f.llava_dir, "--video", f.clip],
        2, "takes no videos"),
    Row("unknown command", lambda f: ["prune"], 2, "invalid choice"),
    Row("no command", lambda f: [], 2, "required"),
    # bench
    Row("bench: --threads -1", lambda f: [*BENCH, "--threads", "-1"], 2, "--threads"),
    Row("bench: --batch-size 0", lambda f: [*BENCH, "--batch-size", "0"], 2, "--batch-size"),
    Row("bench: --limit -5", lambda f: [*BENCH, "--limit", "-5"], 2, "--limit"),
    Row("bench: --repeats 0", lambda f: [*BENCH, "--repeats", "0"], 2, "--repeats"),
    Row("bench: --new-tokens 0", lambda f: [*BENCH, "--new-tokens", "0"], 2, "--new-tokens"),
    Row("bench: --jobs 0", lambda f: [*BENCH, "--jobs", "0"], 2, "--jobs"),
    Row("bench: unknown method", lambda f: [*BENCH, "--methods", "bogus"], 2, "unknown method(s) bogus"),
    Row("bench: no method named", lambda f: [*BENCH, "--methods", ","], 2, "names no method"),
    Row("bench: budget 0", lambda f: [*BENCH, "--budgets", "full,0"], 2, "keeps no visual token"),
    Row("bench: budget above 1.0", lambda f: [*BENCH, "--budgets", "1.5"], 2, "(0, 1]"),
    Row("bench: budget not a number", lambda f: [*BENCH, "--budgets", "lots"], 2, "is not 'full'"),
    Row("bench: unknown task", lambda f: [*BENCH, "--tasks", "mmmu", "--out", str(f.tmp / "r.jsonl")], 2,
        "unknown task"),
    Row("bench: accuracy of a random-weight model", lambda f: ["bench", "--model", "tiny:llava"], 2,
        "pass --tasks latency"),
    Row("bench: unknown preset", lambda f: ["bench", "--preset", "bogus"], 2, "is not a preset"),
    Row("bench: nonexistent model", lambda f: ["bench", "--model", f.missing], 2, "no such directory"),
    Row("bench: tiny:bogus", lambda f: ["bench", "--model", "tiny:bogus"], 2, "no tiny model family"),
    Row("bench: option without a method", lambda f: [*BENCH, "--option", "layer=3"], 2, "per method"),
    Row("bench: option the method does not take", lambda f: [*BENCH, "--option", "fastv.lyer=3"], 2,
        "does not take option(s) lyer"),
    Row("bench: option for a method not swept", lambda f: [*BENCH, "--methods", "fastv", "--option",
                                                            "divprune.x=1"], 2, "not among --methods"),
    Row("bench: unwritable --out", lambda f: [*BENCH, "--out", str(f.a_file / "r.jsonl")], 2,
        "cannot write the results file"),
    Row("bench: --out is a directory", lambda f: [*BENCH, "--out", str(f.empty_dir)], 2, "cannot write"),
    Row("bench: --device bogus", lambda f: [*BENCH, "--device", "bogus"], 2, "is not a device"),
    Row("bench: --video-frames 0", lambda f: [*BENCH, "--video-frames", "0"], 2, "--video-frames"),
    Row("bench: --video-frames with accuracy", lambda f: ["bench", "--model", "tiny:qwen2_vl", "--tasks", "synth",
                                                         "--video-frames", "4"], 2, "pass --tasks latency"),
    Row("bench: --video-frames on an image-only preset", lambda f: ["bench", "--preset", "llava-1.5-7b",
                                                                   "--video-frames", "8"], 2, "no video shape"),
    # plot
    Row("plot: missing results file", lambda f: ["plot", f.missing, "--out", str(f.tmp / "p")], 2, "not found"),
    Row("plot: results file is a directory", lambda f: ["plot", str(f.empty_dir), "--out", str(f.tmp / "p")], 2,
        "not found"),
    Row("plot: corrupted line in the middle", lambda f: ["plot", str(f.corrupted), "--out", str(f.tmp / "p")], 2,
        "corrupted"),
    Row("plot: JSON that is not a bench row", lambda f: ["plot", str(f.not_rows), "--out", str(f.tmp / "p")], 2,
        "not a vtprune bench row"),
    Row("plot: only errored rows", lambda f: ["plot", str(f.only_errors), "--out", str(f.tmp / "p")], 2,
        "nothing to plot"),
    Row("plot: --out under a file", lambda f: ["plot", str(f.torn), "--out", str(f.a_file / "p")], 2,
        "is a file, not a directory"),
    Row("plot: without matplotlib", lambda f: ["plot", str(f.torn)], 2, "pip install matplotlib",
        setup=_without("matplotlib")),
    # eval
    Row("eval: without lmms-eval", lambda f: ["eval"], 2, "pip install", setup=_without("lmms_eval")),
    Row("eval: unknown method", lambda f: ["eval", "--method", "bogus"], 2, "unknown method 'bogus'"),
    Row("eval: budget 0", lambda f: ["eval", "--method", "divprune", "--budget", "0"], 2, "keeps no visual token"),
    Row("eval: budget without a method", lambda f: ["eval", "--budget", "64"], 2, "--budget without --method"),
    Row("eval: not a model directory", lambda f: ["eval", "--model", str(f.empty_dir)], 2, "no config.json"),
    Row("eval: tiny model", lambda f: ["eval", "--model", "tiny:llava"], 2, "needs a model directory"),
    Row("eval: --limit 0", lambda f: ["eval", "--limit", "0"], 2, "--limit"),
    Row("eval: --batch-size 0", lambda f: ["eval", "--batch-size", "0"], 2, "--batch-size"),
    Row("eval: --device bogus", lambda f: ["eval", "--device", "bogus"], 2, "is not a device"),
]


@pytest.mark.parametrize("row", CLI_ERRORS, ids=lambda r: r.description)
def test_cli_error(row, files, loads, capsys, monkeypatch):
    if row.setup is not None:
        row.setup(monkeypatch, files)
    torn_before = files.torn.read_bytes()
    code = main(row.call(files))
    out, err = capsys.readouterr()
    assert code == row.expected, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vtprune: error: "), err
    assert "Traceback" not in err
    assert row.fragment in lines[0], lines[0]
    assert loads == []  # nothing was loaded
    assert files.torn.read_bytes() == torn_before  # inputs are never written


# ------------------------------------------------------------------------------------------ CLI: must work


def test_cli_plot_reads_a_torn_file_without_writing_it(files, capsys):
    """A reader never writes: the torn last line is skipped with a note, the file keeps every byte."""
    before = files.torn.read_bytes()
    assert main(["plot", str(files.torn), "--out", str(files.tmp / "plots")]) == 0
    out, err = capsys.readouterr()
    assert files.torn.read_bytes() == before
    assert "skipped a torn last line" in err and "left as it is" in err
    assert list((files.tmp / "plots").glob("*.png"))
    no_newline = files.tmp / "no_newline.jsonl"
    no_newline.write_text(json.dumps(_ok_row("none", None, 0.9)))  # one row, killed before its newline
    assert main(["plot", str(no_newline), "--out", str(files.tmp / "plots2")]) == 2
    assert no_newline.read_text() == json.dumps(_ok_row("none", None, 0.9))  # not truncated to 0 bytes


def test_cli_run_honours_dtype_on_tiny_models(capsys):
    assert main(["run", "--model", "tiny:llava", "--dtype", "bfloat16", "--method", "random", "--budget", "8",
                 "--max-new-tokens", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "torch.bfloat16" in out and "random@L0: kept 8" in out


def test_row_counts():
    """The table is at least 60 rows (issue 12); the counts by outcome are reported in the issue note."""
    errors = len(API_ERRORS) + len(CLI_ERRORS)
    assert errors + len(API_WARNINGS) + len(API_WORKS) + 2 >= 60
    assert len({r.description for r in API_ERRORS + API_WARNINGS + API_WORKS + CLI_ERRORS}) == (
        len(API_ERRORS) + len(API_WARNINGS) + len(API_WORKS) + len(CLI_ERRORS))  # ids are unique
