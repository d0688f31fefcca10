"""The ``vtprune`` command: ``methods``, ``run`` (one image + prompt through a pruned model), ``bench``
(sweeps: accuracy, FLOPs, latency, memory), ``plot`` (Pareto plots) and ``eval`` (accuracy through lmms-eval)."""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line ``vtprune: error: ...`` (the problem and the fix) on stderr and
    exit code 2, like every other failure of the command; ``--help`` still prints the usage."""

    def error(self, message: str):
        hint = f" (see: {self.prog} --help)"
        self.exit(2, f"vtprune: error: {message}{hint}\n")


def _parse_budget(text: str):
    """``--budget``: an int (tokens per image), a float in (0, 1] (fraction) or 'none' (the paper default)."""
    from .budget import validate_budget
    from .errors import BudgetError

    if text.lower() in ("none", "default"):
        return None
    try:
        value: int | float = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"budget {text!r} is not an int (tokens per image), a float in (0, 1] or 'none'"
            ) from None
    try:
        return validate_budget(value)
    except BudgetError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _int_at_least(lowest: int, meaning: str = ""):
    """argparse type: an int >= ``lowest``; the message says what the value means."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an int") from None
        if value < lowest:
            raise argparse.ArgumentTypeError(f"{value} is below {lowest}; pass an int >= {lowest}"
                                             + (f" ({meaning})" if meaning else ""))
        return value
    parse.__name__ = "int"
    return parse


def _positive_float(meaning: str):
    """argparse type: a finite float > 0."""
    def parse(text: str) -> float:
        import math

        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value) or value <= 0:
            raise argparse.ArgumentTypeError(f"{text} must be a positive number ({meaning})")
        return value
    parse.__name__ = "float"
    return parse


def _parse_option(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"option {text!r} must look like name=value, e.g. dominant=54")
    key, value = text.split("=", 1)
    if not key.strip():
        raise argparse.ArgumentTypeError(f"option {text!r} has no name; use name=value, e.g. dominant=54")
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        parsed = value
    return key.strip(), parsed


def _check_methods(names: list[str], budget=None, positions=None, seed: int = 0, options=None) -> None:
    """Build the methods as ``vtprune.apply`` will (unknown name, bad option or value -> VTPruneError), without
    touching a model, so that a typo fails before any model is loaded."""
    from .budget import split_composed_budget
    from .errors import DegeneratePruningWarning
    from .registry import build_method, method_class

    options = dict(options or {})
    stages = [method_class(name).stage for name in names]
    if len(names) > 1 and options:
        from .errors import MethodOptionError

        raise MethodOptionError("--option cannot be used when composing methods (name+name); run one method, "
                                "or use the Python API with vtprune.registry.build_method.")
    with warnings.catch_warnings():  # errors only: apply() warns about degenerate settings itself
        warnings.simplefilter("ignore", DegeneratePruningWarning)
        for name, share in zip(names, split_composed_budget(budget, stages), strict=True):
            build_method(name, budget=share, positions=positions, seed=seed, **options)


def cmd_methods(args) -> int:
    from . import methods
    from .registry import methods_markdown

    infos = methods()
    if args.json:
        print(json.dumps({k: {**v.__dict__, "defaults": v.defaults} for k, v in infos.items()}, indent=2,
                         default=str))
        return 0
    reachable = None
    if args.model is not None:
        from .loading import check_model_spec, load_model

        check_model_spec(args.model)
        model, processor, description = load_model(args.model)
        reachable, note = _reachable_budgets(model, processor)
        print(f"model: {description}; {note}\n")
    print(methods_markdown(reachable), end="")
    return 0


def _reachable_budgets(model, processor) -> tuple[dict[str, str], str]:
    """Per method, the int budgets (equivalent visual tokens per image) it can reach on ``model`` for the
    bundled test image: pre-LLM methods any count up to the image's tokens; in-LLM methods from the smallest
    layer average their stages allow (they keep every token before their first layer); adaptive in-LLM methods
    (FrameFusion) decide their count from the input itself, so no range is claimed for them."""
    import warnings

    from .adapters.base import adapter_for
    from .errors import VTPruneError
    from .registry import method_class, registered_methods

    adapter = adapter_for(model)
    sample = _default_image()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sample.question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = processor(images=[sample.image], text=[text], return_tensors="pt")["input_ids"]
    tokens = int(torch.isin(ids, torch.tensor(adapter.placeholder_token_ids())).sum())
    layers = len(adapter.decoder_layers)
    out = {}
    for name, info in registered_methods().items():
        if info.stage == "in-vit":
            try:
                adapter.vit_layers()
                lowest = method_class(name)().lowest_tokens(adapter)
            except VTPruneError:
                out[name] = "refused on this model"
                continue
            out[name] = f"{lowest}–{tokens} per vision input"
            continue
        if info.stage != "in-llm":
            out[name] = f"1–{tokens}"
            continue
        if getattr(method_class(name), "adaptive", False):  # FrameFusion: merging decides the count per input
            out[name] = f"decided per input (≤ {tokens})"
            continue
        lowest = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for budget in range(1, tokens + 1):
                try:
                    method_class(name)(budget=budget).schedule(layers, tokens, 1)
                except VTPruneError:
                    continue
                lowest = budget
                break
        out[name] = f"{lowest}–{tokens}" if lowest is not None else "none"
    size = "x".join(str(v) for v in sample.image.size)
    return out, f"{tokens} visual tokens for a {size} image, {layers} decoder layers"


def _default_image():
    """A question of the shipped synthetic test split (what the bundled micro-VLMs were trained for)."""
    from .synth import load_test_split

    return load_test_split(limit=6)[5]  # fine_detail: "What color is the small object?"


def _method_names(text: str) -> list[str]:
    """``--method``: one registered name, or several joined by ``+`` to compose (``divprune+fastv``)."""
    from .errors import UnknownMethodError

    names = [part.strip() for part in text.split("+")]
    if not all(names):
        raise UnknownMethodError(f"--method {text!r} has an empty name; use e.g. divprune or divprune+fastv.")
    return names


def _check_run_args(args):
    """Everything about ``vtprune run``'s arguments that can be checked without a model; returns the image
    (loaded, or None for the default test image), or for ``--video`` the sampled clip (decoding a clip is
    seconds at most, loading a model can be minutes: a bad clip fails first)."""
    from .errors import VTPruneError
    from .loading import check_device, check_model_spec, load_image

    if args.video is None and (args.frames is not None or args.fps is not None or args.max_pixels is not None):
        flag = "--frames" if args.frames is not None else "--fps" if args.fps is not None else "--max-pixels"
        raise VTPruneError(f"{flag} samples a video: pass --video FILE too (images take no {flag}).")
    if args.video is not None and args.image is not None:
        raise VTPruneError("pass --image or --video, not both (one visual input per run).")
    if args.video is not None and args.model is None:
        args.model = default_video_model()
    check_model_spec(args.model, trust_remote_code=args.trust_remote_code)
    if args.video is not None:
        _check_video_model(args.model, args.max_pixels)
    args.device = check_device(args.device)
    names = _method_names(args.method)
    _check_methods(names, budget=args.budget, positions=args.positions, seed=args.seed,
                   options=dict(args.option or []))
    if args.show:
        _check_writable_file(args.show, "--show")
    if args.video is not None:
        from .video import check_sampling, load_video

        check_sampling(args.frames, args.fps)
        return load_video(args.video, num_frames=args.frames, fps=args.fps)
    return load_image(args.image) if args.image else None


#: model types whose processor and vtprune adapter take videos
VIDEO_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_onevision")
#: the bundled video micro-model (trained on the synthetic clips), used by ``run --video`` when present
VIDEO_MICRO_MODEL = "micro-qwen2vl-video"
#: ``run --video``'s fallback when no bundled video model is present
VIDEO_TINY_MODEL = "tiny:qwen2_vl"


def default_video_model() -> str:
    from .loading import bundled_model_dir

    bundled = bundled_model_dir(VIDEO_MICRO_MODEL)
    return str(bundled) if bundled is not None else VIDEO_TINY_MODEL


def _check_video_model(model: str, max_pixels: int | None = None) -> None:
    """A model given for ``--video`` must be of a family that takes videos (hub ids are checked at loading);
    ``--max-pixels`` needs a Qwen-VL family."""
    from .errors import VTPruneError

    if model.startswith("tiny:"):
        model_type = model.split(":", 1)[1]
    else:
        config = Path(model).expanduser() / "config.json"
        if not config.is_file():
            return  # a hub id: from_pretrained resolves it
        model_type = json.loads(config.read_text()).get("model_type")
    if model_type not in VIDEO_MODEL_TYPES:
        raise VTPruneError(f"--model {model!r} ({model_type}) takes no videos; --video needs one of "
                           f"{', '.join(VIDEO_MODEL_TYPES)} (e.g. Qwen/Qwen2.5-VL-3B-Instruct, "
                           "llava-hf/llava-onevision-qwen2-0.5b-ov-hf, or tiny:qwen2_vl).")
    if max_pixels is not None and not model_type.startswith("qwen"):
        raise VTPruneError(f"--max-pixels caps Qwen-VL video frames; {model_type} resizes every frame to its vision "
                           "tower's input size: drop --max-pixels.")


def _check_writable_file(path: str, flag: str) -> None:
    from pathlib import Path

    from .errors import VTPruneError

    target = Path(path).expanduser()
    if target.is_dir():
        raise VTPruneError(f"{flag} {path!r} is a directory; pass a file name such as kept.png.")
    parent = target.parent
    if parent.exists() and not parent.is_dir():
        raise VTPruneError(f"{flag} {path!r}: {parent} is a file, not a directory; pass a writable path.")


def _model_inputs(processor, image, prompt: str, device: str, dtype: torch.dtype):
    """Processor inputs for one image + prompt, on ``device``; floating tensors (pixels) in the model's dtype."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=[image], text=[text], return_tensors="pt").to(device)
    for key, value in inputs.items():
        if torch.is_tensor(value) and value.is_floating_point():
            inputs[key] = value.to(dtype)
    return inputs


def cmd_run(args) -> int:
    import vtprune

    from .loading import load_model

    if args.video is not None:
        return _run_video(args)
    image = _check_run_args(args)
    model, processor, description = load_model(args.model, dtype=args.dtype, device=args.device,
                                               trust_remote_code=args.trust_remote_code)
    if image is None:
        sample = _default_image()
        image = sample.image
        if args.prompt is None:
            args.prompt = sample.question
            print(f"image:  synthetic test sample {sample.id} (reference answer: {sample.answer})")
    if args.prompt is None:
        args.prompt = "What is in the image?"
    inputs = _model_inputs(processor, image, args.prompt, args.device, getattr(torch, args.dtype))
    options = dict(args.option or [])
    names = _method_names(args.method)
    vtprune.apply(model, names[0] if len(names) == 1 else names, budget=args.budget, positions=args.positions,
                  seed=args.seed, **options)
    with torch.inference_mode():
        start = time.perf_counter()
        output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
        elapsed = time.perf_counter() - start
    stats = vtprune.stats(model)
    answer = processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
    print(f"model:  {description}  ({next(model.parameters()).dtype})")
    print(f"method: {args.method}  budget: {args.budget}")
    print(f"answer: {answer.strip()}")
    print(stats.summary())
    print(f"generate: {elapsed * 1000:.1f} ms for {output.shape[1] - inputs['input_ids'].shape[1]} new tokens")
    if args.show:
        from .viz import save_overlay

        caption = (f"{args.method} at budget {args.budget} on {Path(str(description)).name}\n"
                   f"Q: {args.prompt}\nA: {answer.strip()}")
        path = save_overlay(args.show, model, inputs, image, processor=processor, caption=caption)
        print(f"kept tokens drawn to {path}")
    return 0


def _run_video(args) -> int:
    """``vtprune run --video``: one clip + prompt through the pruned model; the answer, the visual tokens (per
    frame), the prefill time (to the first token's logits) and, with ``--show``, a strip of the frames with the
    kept tokens."""
    from transformers import LogitsProcessorList

    import vtprune

    from .bench.latency import Clock, StepClock
    from .errors import VTPruneError
    from .loading import load_model
    from .video import shipped_clips, video_inputs

    video = _check_run_args(args)
    reference = None
    try:
        clips = shipped_clips() if args.prompt is None else []
    except VTPruneError:  # not a source checkout: no shipped clips to recognise
        clips = []
    for clip in clips:
        if Path(clip["path"]).resolve() == video.path.resolve():
            args.prompt, reference = clip["question"], clip["answer"]
    if args.prompt is None:
        args.prompt = "What happens in the video?"
    model, processor, description = load_model(args.model, dtype=args.dtype, device=args.device,
                                               trust_remote_code=args.trust_remote_code)
    inputs = video_inputs(processor, video, args.prompt, device=args.device, dtype=getattr(torch, args.dtype),
                          max_pixels=args.max_pixels)
    names = _method_names(args.method)
    vtprune.apply(model, names[0] if len(names) == 1 else names, budget=args.budget, positions=args.positions,
                  seed=args.seed, **dict(args.option or []))
    clock = Clock(args.device)
    steps = StepClock(clock)
    with torch.inference_mode():
        start = clock.mark()
        output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False,
                                logits_processor=LogitsProcessorList([steps]))
        end = clock.mark()
        clock.synchronize()
    prefill_ms = clock.elapsed_ms(start, steps.marks[0]) if steps.marks else float("nan")
    total_ms = clock.elapsed_ms(start, end)
    stats = vtprune.stats(model)
    sample = stats.samples[0]
    answer = processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip()
    random_weights = str(description).startswith("tiny:")
    print(f"video:  {video.describe()}")
    print(f"model:  {description}  ({next(model.parameters()).dtype})")
    if random_weights:
        print("        random weights: answers are noise (the token counts, FLOPs and times are real)")
    print(f"method: {args.method}  budget: {args.budget}")
    print(f"prompt: {args.prompt}")
    print(f"answer: {answer}" + (f"   (reference: {reference})" if reference is not None else ""))
    frames = getattr(sample, "frame_kept", None)
    print(f"visual tokens: {sample.visual_in} -> {sample.equivalent_tokens:.1f} equivalent tokens"
          + (f"; per frame: {' '.join(str(n) for n in frames)}" if frames else ""))
    if sample.flops is not None and sample.flops_unpruned:
        print(f"prefill FLOPs: {sample.flops / 1e9:.3f} / {sample.flops_unpruned / 1e9:.3f} GFLOPs unpruned "
              f"({sample.flops_unpruned / max(sample.flops, 1):.2f}x fewer)")
    print(f"prefill: {prefill_ms:.1f} ms (to the first token)   generate: {total_ms:.1f} ms for "
          f"{output.shape[1] - inputs['input_ids'].shape[1]} new tokens")
    print(stats.summary())
    if args.show:
        from .viz import save_strip

        name = args.model if random_weights else Path(str(description)).name
        caption = (f"{args.method} at budget {args.budget} on {name}"
                   + (" (random weights: answers are noise)" if random_weights else "")
                   + f"\nQ: {args.prompt}\nA: {answer}")
        path = save_strip(args.show, model, inputs, video, caption=caption)
        print(f"kept tokens per frame drawn to {path}")
    return 0


def _split(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def _check_bench_args(args) -> tuple[list[str], list[str], list[str], dict[str, dict[str, object]]]:
    """Everything about ``vtprune bench``'s arguments that can be checked without a model: returns (models,
    presets, methods, per-method options)."""
    from . import methods
    from .bench.presets import list_presets
    from .bench.sweep import default_models, parse_budget
    from .errors import VTPruneError
    from .loading import check_device, check_model_spec

    args.device = check_device(args.device)
    models = list(args.model or [])
    for model in models:
        check_model_spec(model, trust_remote_code=args.trust_remote_code)
    known_presets = list_presets()
    for name in args.preset or []:
        if name not in known_presets:
            raise VTPruneError(f"--preset {name!r} is not a preset; presets: {', '.join(known_presets)} "
                               "(vtprune bench --list-presets).")
    presets = [f"preset:{name}" for name in (args.preset or [])]
    args.default_run = not models and not presets
    if not models and not presets:
        models = default_models()
        if not models:
            raise VTPruneError("no bundled micro-VLM found in models/ (micro-llava); pass --model DIR or "
                               "--preset NAME")
    registered = list(methods())
    chosen = registered if args.methods in (None, "all") else _split(args.methods)
    if not chosen:
        raise VTPruneError(f"--methods {args.methods!r} names no method; pass e.g. divprune,fastv or all.")
    unknown = [m for m in chosen if any(part not in registered for part in m.split("+"))]
    if unknown:
        raise VTPruneError(f"unknown method(s) {', '.join(unknown)}; registered: {', '.join(registered)}")
    tiny = [m for m in models if m.startswith("tiny:")]
    if tiny and {"synth", "synth_video"} & set(_split(args.tasks or "synth")):
        raise VTPruneError(f"{tiny[0]} has random weights: accuracy (task synth, the default for --model) is not "
                           "reported for it; pass --tasks latency, or a trained model directory.")
    if args.video_frames is not None:
        from .bench.presets import video_frames_default

        if "synth" in _split(args.tasks or ("synth" if models else "latency")):
            raise VTPruneError("--video-frames measures latency on a video input; accuracy (task synth) is image "
                               "questions: pass --tasks latency.")
        for name in args.preset or []:
            video_frames_default(name)  # an image-only preset: a clear error naming the video presets
    for text in _split(args.budgets):
        parse_budget(text)
    if args.budgets is not None and not _split(args.budgets):
        raise VTPruneError(f"--budgets {args.budgets!r} names no budget; pass e.g. full,0.5,64.")
    options = {m: dict(o) for m, o in _group_options(args.option or []).items()}
    for method, opts in options.items():
        if method not in chosen:
            raise VTPruneError(f"--option {method}.…: method {method!r} is not among --methods "
                               f"({', '.join(chosen)}); drop the option or add the method.")
        _check_methods([method], options=opts)
    return models, presets, chosen, options


#: sweep-config keys -> the ``vtprune bench`` argument each one sets
_CONFIG_KEYS = {"models": "model", "presets": "preset", "methods": "methods", "budgets": "budgets", "tasks": "tasks",
                "video_frames": "video_frames",
                "limit": "limit", "batch_size": "batch_size", "repeats": "repeats", "warmup": "warmup",
                "new_tokens": "new_tokens", "threads": "threads", "device": "device", "dtype": "dtype",
                "out": "out", "jobs": "jobs"}


def _sweep_runs(args) -> list[tuple[int, list[tuple[str, object]]]]:
    """The sweeps ``vtprune bench`` runs: (seed, ``--option`` pairs) per run. With ``--config FILE`` (YAML:
    the keys of ``_CONFIG_KEYS`` plus ``seeds: [..]`` and ``options: {method: {name: value or [values]}}``), one
    run per seed x combination of the option grids, all into the same results file; without, one run."""
    import itertools

    from .errors import VTPruneError

    if not args.config:
        return [(args.seed, list(args.option or []))]
    import yaml

    path = Path(args.config)
    if not path.is_file():
        raise VTPruneError(f"--config {args.config!r}: no such file; pass a YAML sweep config (see eval/sweeps/).")
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise VTPruneError(f"--config {args.config!r} is not valid YAML: {error}".splitlines()[0]) from None
    if not isinstance(config, dict):
        raise VTPruneError(f"--config {args.config!r} must hold a mapping (models:, methods:, budgets:, ...).")
    known = set(_CONFIG_KEYS) | {"seeds", "options"}
    unknown = sorted(set(config) - known)
    if unknown:
        raise VTPruneError(f"--config {args.config!r}: unknown key(s) {', '.join(unknown)}; known: "
                           f"{', '.join(sorted(known))}.")
    defaults = vars(build_parser().parse_args(["bench"]))
    for key, attribute in _CONFIG_KEYS.items():
        if key not in config:
            continue
        if getattr(args, attribute) != defaults[attribute]:
            raise VTPruneError(f"{key} is set both in --config and on the command line; set it in one place.")
        value = config[key]
        if key in ("methods", "budgets", "tasks") and isinstance(value, list):
            value = ",".join(str(v) for v in value)
        elif key in ("models", "presets") and not isinstance(value, list):
            value = [value]
        setattr(args, attribute, value)
    if ("seeds" in config and args.seed != defaults["seed"]) or ("options" in config and args.option):
        raise VTPruneError("seeds / options are set both in --config and on the command line; set them in one place.")
    seeds = config.get("seeds", [args.seed])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(x, int) for x in seeds):
        raise VTPruneError(f"--config {args.config!r}: seeds must be a list of ints, e.g. [0, 1, 2].")
    grids = config.get("options") or {}
    if not isinstance(grids, dict) or not all(isinstance(v, dict) for v in grids.values()):
        raise VTPruneError(f"--config {args.config!r}: options must map a method to its options, e.g. "
                           "{fastv: {layer: [1, 2]}}.")
    axes = [[(f"{method}.{name}", v) for v in (values if isinstance(values, list) else [values])]
            for method, opts in grids.items() for name, values in opts.items()]
    return [(seed, list(point)) for seed in seeds for point in itertools.product(*axes)]


#: questions per task in the default ``vtprune bench`` (no --model / --preset): the first 210 of each test split
#: (35 per image skill, all 210 clips = 30 per video skill); one binomial standard error sqrt(p (1 - p) / n) is
#: at most 2.5 points at the default models' full-token accuracies (micro-llava 91.4 % -> 1.9,
#: micro-qwen2vl-video 88.6 % -> 2.2; 3.5 at p = 0.5); methods are compared on the same questions (paired), so
#: their differences are tighter
DEFAULT_RUN_QUESTIONS = 210


def _bench_limit(args) -> int | None:
    """SweepOptions.limit from ``--limit``: None (all) for 0, the default run's DEFAULT_RUN_QUESTIONS when not
    given without --model / --preset, all otherwise."""
    if args.limit is None:
        return DEFAULT_RUN_QUESTIONS if getattr(args, "default_run", False) else None
    return None if args.limit == 0 else args.limit


def cmd_bench(args) -> int:
    from .bench import report
    from .bench.sweep import (
        ACCURACY_TASKS,
        ResultsFile,
        SweepOptions,
        default_video_models,
        iter_rows,
        plan_cells,
        run_sweep,
    )

    if args.list_presets:
        from .bench.presets import list_presets, load_preset

        for name in list_presets():
            preset = load_preset(name)
            video = "-" if preset.video is None else f"{preset.video['frames']} frames"
            print(f"{name:<25} {preset.family:<16} {preset.dtype:<9} {preset.reference or '-':<44} video: {video:<10} "
                  f"{preset.notes}")
        return 0
    runs = []
    for seed, option_pairs in _sweep_runs(args):
        args.option = option_pairs
        models, presets, chosen, method_options = _check_bench_args(args)
        options = SweepOptions(
            limit=_bench_limit(args), batch_size=args.batch_size, repeats=args.repeats,
            warmup=args.warmup, new_tokens=args.new_tokens, threads=args.threads, device=args.device,
            dtype=args.dtype, native=not args.no_native, paired=not args.no_paired, seed=seed,
            method_options=method_options, trust_remote_code=args.trust_remote_code,
            config=str(Path(args.config).resolve()) if args.config else None, video_frames=args.video_frames,
        )
        options.validate()
        runs.append(options)
    cells = []
    # without --model / --preset: the bundled image micro-VLMs on task synth and, unless --tasks says otherwise,
    # the bundled video micro-VLM on task synth_video (every method runs on video) at full / 50 / 25 / 10 %
    video_models = default_video_models() if args.default_run and args.tasks is None else []
    for group, default_tasks, default_budgets in ((models, "synth", "full,0.5,0.25,0.125"),
                                                   (video_models, "synth_video", "full,0.5,0.25,0.1"),
                                                   (presets, "latency", "full,192,128,64")):
        if group:
            cells += plan_cells(group, chosen, _split(args.budgets or default_budgets),
                                _split(args.tasks or default_tasks))
    out = Path(args.out)
    stem = out.with_suffix("")
    ResultsFile(out).check_writable()
    for table in (Path(f"{stem}.csv"), Path(f"{stem}.md")):
        _check_writable_file(str(table), "--out (its table)")
    if args.threads:
        torch.set_num_threads(args.threads)
    jobs = args.jobs
    if jobs is None:  # accuracy sweeps over several models: one process per model on a multi-core machine
        synth_only = all(cell.task in ACCURACY_TASKS for cell in cells)
        jobs = min(len({cell.model for cell in cells}), os.cpu_count() or 1) if synth_only else 1
    rows = [row for options in runs
            for row in run_sweep(cells, out, options, progress=not args.no_progress, use_ray=args.ray, jobs=jobs)]
    # the tables describe the whole results file (newest row per cell and settings), not only this run's cells
    every_row = iter_rows([out])
    records = report.summaries(every_row)
    Path(f"{stem}.csv").write_text(report.to_csv(records))
    markdown = report.to_markdown(records)
    spreads = report.accuracy_spread(records)
    if spreads:
        markdown += "\n### Best vs worst method per budget (accuracy)\n\n" + report.spread_markdown(spreads)
    Path(f"{stem}.md").write_text(markdown)
    report.print_table(records, title=f"vtprune bench: {len(rows)} cells of this run, {len(every_row)} in {out}",
                       full=args.full_table)
    paper = report.paper_markdown(records)
    if paper:
        Path(f"{stem}_paper.md").write_text(paper)
        print(paper)
    for s in spreads:
        print(f"{s['model_name']} @ {s['budget']}: best {s['best']} {100 * s['best_accuracy']:.1f} %, "
              f"worst {s['worst']} {100 * s['worst_accuracy']:.1f} % -> spread {s['spread_points']:.1f} points "
              f"({s['methods']} methods, {s['n']} questions)")
    print(f"rows: {out}   tables: {stem}.md, {stem}.csv" + (f", {stem}_paper.md" if paper else ""))
    sections = []
    for clock in (("cpu", "wall") if not str(args.device).startswith("cuda") else ("wall",)):
        checked = report.check_targets(records, 64, clock)
        if checked:
            sections.append(f"### Targets at 64 equivalent tokens ({clock} time)\n\n" + report.targets_markdown(checked))
    if sections:
        Path(f"{stem}_targets.md").write_text("\n".join(sections))
        print("\n".join(sections) if args.targets else f"latency targets (pass/fail): {stem}_targets.md (--targets prints them)")
    crashed = [row for row in rows if row.get("status") == "crash"]
    if crashed:  # a bug, not a refusal: the run must not look successful
        print(f"vtprune bench: {len(crashed)} cell(s) crashed -- a bug in vtprune or the model code, not a refusal; "
              f"the other cells' rows are in {out}, the crashed ones carry their traceback there and run again "
              "next time:", file=sys.stderr)
        for row in crashed:
            print(f"  {Path(str(row['model'])).name} {row['method']} @ {row['budget']} ({row['task']}): {row['error']}",
                  file=sys.stderr)
        return 1
    return 0


def _group_options(pairs) -> dict[str, dict[str, object]]:
    """``--option fastv.layer=3`` -> {"fastv": {"layer": 3}}."""
    from .errors import VTPruneError

    grouped: dict[str, dict[str, object]] = {}
    for key, value in pairs:
        method, _, name = key.partition(".")
        if not method or not name:
            raise VTPruneError(f"bench options are per method: --option METHOD.NAME=VALUE, e.g. "
                               f"--option fastv.layer=3 (got {key!r})")
        grouped.setdefault(method, {})[name] = value
    return grouped


def cmd_plot(args) -> int:
    """Pareto PNGs from results files. Reads them only: a torn last line (a sweep killed mid-write) is skipped
    with a note, never cut off (the sweep that owns the file does that when it resumes)."""
    from .bench.sweep import iter_rows
    from .errors import VTPruneError

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise VTPruneError("vtprune plot needs matplotlib: pip install matplotlib") from None
    from .bench.plot import plot_rows

    _check_writable_dir(args.out, "--out")

    def note(path, size):
        print(f"vtprune plot: skipped a torn last line of {path} ({size} bytes, an interrupted write); the file "
              "is left as it is", file=sys.stderr)

    rows = iter_rows(args.results, on_torn=note)
    if not any(row.get("status", "ok") == "ok" for row in rows):
        raise VTPruneError(f"no finished rows in {', '.join(args.results)}; nothing to plot (run vtprune bench "
                           "first).")
    paths = plot_rows(rows, args.out)
    if not paths:
        raise VTPruneError(f"the rows of {', '.join(args.results)} have nothing to plot (neither accuracy nor "
                           "latency); pass results of vtprune bench.")
    for path in paths:
        print(path)
    return 0


def _check_writable_dir(path: str, flag: str) -> None:
    from pathlib import Path

    from .errors import VTPruneError

    target = Path(path).expanduser()
    for parent in (target, *target.parents):
        if parent.exists():
            if not parent.is_dir():
                raise VTPruneError(f"{flag} {path!r}: {parent} is a file, not a directory; pass a directory.")
            break


def cmd_eval(args) -> int:
    from .errors import VTPruneError
    from .loading import check_device, check_model_spec

    if args.model is not None and args.model.startswith("tiny:"):
        raise VTPruneError("vtprune eval needs a model directory (lmms-eval loads it with from_pretrained); "
                           "tiny: models are not supported here, save one with save_pretrained first.")
    check_model_spec(args.model, trust_remote_code=False)
    args.device = check_device(args.device)
    if args.method and args.method.lower() != "none":
        _check_methods(_method_names(args.method), budget=args.budget)
    elif args.budget is not None:
        raise VTPruneError("--budget without --method: pass --method NAME (the default runs the unpruned model).")
    _check_writable_dir(args.output_path, "--output-path")
    try:
        import lmms_eval  # noqa: F401
    except ImportError:
        raise VTPruneError("vtprune eval needs lmms-eval: pip install -e '.[eval]' && pip install --no-deps "
                           "lmms-eval==0.7.3") from None
    from .bench.lmms import run_lmms_eval

    return run_lmms_eval(model=args.model, method=args.method, budget=args.budget, tasks=args.tasks,
                         limit=args.limit, output_path=args.output_path, device=args.device, dtype=args.dtype,
                         batch_size=args.batch_size, extra=args.lmms_args)


#: how budgets read, shown by every --help
BUDGET_HELP = (
    "Budgets: an int is the number of equivalent visual tokens per image, i.e. the visual tokens the language\n"
    "model processes averaged over its layers (for a pre-LLM method simply the tokens kept); a float in (0, 1]\n"
    "is a fraction of each image's visual tokens, and 'none' the method's paper default.\n"
    "An in-LLM method keeps every token before its first pruning layer, so its smallest reachable budget depends\n"
    "on the model: `vtprune methods --model DIR` lists it."
)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="vtprune", description="Visual-token pruning for VLMs.",
        epilog=BUDGET_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("methods", help="list the registered pruning methods (the README's table)")
    p.add_argument("--model", default=None,
                   help="also give each method's reachable budgets on this model (a directory or tiny:<family>)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("run", help="one image + prompt through a pruned model; prints the answer and stats", epilog=BUDGET_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help="HF directory or hub id; 'tiny:<family>' for a random tiny model; default: bundled model")
    p.add_argument("--image", default=None, help="image file (default: a generated test image)")
    p.add_argument("--video", default=None, metavar="CLIP",
                   help="a video file instead of an image (decoded with decord, else PyAV), e.g. "
                        "eval/data/clips/moving_square.mp4; without --model: the bundled video micro-model, else "
                        "tiny:qwen2_vl")
    p.add_argument("--frames", type=_int_at_least(1, "frames sampled from the video"), default=None,
                   help="--video: frames sampled uniformly over the clip (default: 16)")
    p.add_argument("--fps", type=_positive_float("frames sampled per second of the video"), default=None,
                   help="--video: sample this many frames per second of the clip instead of --frames")
    p.add_argument("--max-pixels", type=_int_at_least(784, "pixels per video frame"), default=None,
                   help="--video on Qwen-VL: the most pixels a frame keeps (the model card's max_pixels, e.g. "
                        "151200 = 360*420); default: the processor's")
    p.add_argument("--prompt", default=None,
                   help="default: the question of the default image, or 'What is in the image?'")
    p.add_argument("--method", default="divprune")
    p.add_argument("--budget", type=_parse_budget, default=None,
                   help="int tokens per image, float fraction, or 'none' for the paper default")
    p.add_argument("--positions", choices=["original", "compact"], default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--option", type=_parse_option, action="append", metavar="NAME=VALUE",
                   help="method option, repeatable (e.g. --option dominant=54)")
    p.add_argument("--max-new-tokens", type=_int_at_least(1, "tokens to generate"), default=16)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--show", default=None, metavar="OUT.png",
                   help="save the image (a video: a strip of its frames) with the kept tokens of each stage "
                        "highlighted")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow a checkpoint's own Python code (off: such checkpoints are refused, never prompted)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("bench", help="sweep methods x budgets x models x tasks; JSONL rows (resumable) + tables", epilog=BUDGET_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", metavar="DIR",
                   help="HF model directory (repeatable); default: models/micro-llava (task synth) and "
                        "models/micro-qwen2vl-video (task synth_video)")
    p.add_argument("--preset", action="append", metavar="NAME",
                   help="shape preset of models/presets with random weights, latency only (repeatable)")
    p.add_argument("--list-presets", action="store_true", help="list the presets and exit")
    p.add_argument("--methods", default="all", help="comma-separated registered methods, or 'all' (default)")
    p.add_argument("--budgets", default=None,
                   help="comma-separated: 'full' (unpruned), ints (tokens), floats (fractions); default "
                        "full,0.5,0.25,0.125 for models and full,192,128,64 for presets")
    p.add_argument("--tasks", default=None, help="synth (accuracy), synth_video (accuracy on the synthetic video "
                                                "clips) and/or latency; default synth for models, latency for "
                                                "presets; without --model/--preset also synth_video on the bundled "
                                                "video micro-VLM (full,0.5,0.25,0.1)")
    p.add_argument("--limit", type=_int_at_least(0, "0 = all questions"), default=None,
                   help="synth / synth_video: the first N questions of the test split (skill-balanced prefix); 0 = "
                        "all (600 image questions, 210 clips); default: all with --model, and "
                        f"{DEFAULT_RUN_QUESTIONS} (35 image questions per skill, all 210 clips) for the default run "
                        "without --model/--preset: a binomial standard error of at most 2.5 accuracy points at "
                        "the default models' full-token accuracies (89-91 %%)")
    p.add_argument("--batch-size", type=_int_at_least(1), default=16)
    p.add_argument("--repeats", type=_int_at_least(1, "timed runs per measurement"), default=5)
    p.add_argument("--warmup", type=_int_at_least(0), default=1)
    p.add_argument("--new-tokens", type=_int_at_least(1), default=8, help="tokens generated per timed generate")
    p.add_argument("--threads", type=_int_at_least(1, "torch threads"), default=None,
                   help="torch threads (recorded in every row)")
    p.add_argument("--video-frames", type=_int_at_least(1, "frames of the video input"), default=None, metavar="N",
                   help="latency on a video of N frames instead of an image: presets with a video shape (random "
                        "frames at the preset's frame size, e.g. --preset llava-onevision-0.5b --video-frames 32), "
                        "or N frames of a shipped synthetic clip for model directories and tiny: models")
    p.add_argument("--no-native", action="store_true", help="latency: skip the native-K reference")
    p.add_argument("--no-paired", action="store_true", help="latency: skip the interleaved unpruned reference")
    p.add_argument("--option", type=_parse_option, action="append", metavar="METHOD.NAME=VALUE",
                   help="method option, repeatable (e.g. --option fastv.layer=3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench_results/results.jsonl",
                   help="JSONL results (re-running with the same file resumes); .md/.csv tables next to it")
    p.add_argument("--ray", action="store_true", help="run the cells as Ray tasks on a local Ray instance")
    p.add_argument("--jobs", type=_int_at_least(1), default=None,
                   help="worker processes, each running whole models (default: one per model, up to the CPU "
                        "count, when only accuracy is measured; else 1 so timings do not share the machine)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--config", default=None, metavar="FILE.yaml",
                   help="a sweep config (models, methods, budgets, tasks, seeds, per-method option grids, ...; "
                        "see eval/sweeps/); every seed x option combination runs into the same --out")
    p.add_argument("--full-table", action="store_true",
                   help="print every column (the markdown/CSV files always have them); default: a compact summary")
    p.add_argument("--targets", action="store_true",
                   help="latency runs: print the pass/fail table of the latency protocol's targets (README, "
                        "'Benchmarks'); it is always written to <out>_targets.md")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: the preset's dtype, float32 for model directories")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow a checkpoint's own Python code (off: such checkpoints are refused, never prompted)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("plot", help="Pareto plots (PNG) from bench results")
    p.add_argument("results", nargs="+", help="JSONL files written by vtprune bench")
    p.add_argument("--out", default="bench_results/plots", help="output directory")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("eval", help="accuracy through lmms-eval with a pruned model (the 'vtprune' lmms-eval model)", epilog=BUDGET_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF model directory; default: the bundled micro-llava")
    p.add_argument("--method", default=None, help="registered method (default: none, the unpruned model)")
    p.add_argument("--budget", type=_parse_budget, default=None)
    p.add_argument("--tasks", default="vtprune_synth", help="lmms-eval tasks (default: the synthetic test split)")
    p.add_argument("--limit", type=_int_at_least(1, "the first N documents of each task"), default=None)
    p.add_argument("--batch-size", type=_int_at_least(1), default=1)
    p.add_argument("--output-path", default="bench_results/lmms_eval")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("lmms_args", nargs=argparse.REMAINDER, help="after --: extra lmms-eval arguments")
    p.set_defaults(func=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit code. Every expected failure -- a bad argument, a missing optional
    package, a model or file that cannot be used -- is one line ``vtprune: error: ...`` on stderr and a
    non-zero code (2), never a traceback; arguments are checked before any model is loaded."""
    from .errors import VTPruneError

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # argparse: --help (0) or a usage error (2, already printed as one line)
        return stop.code if isinstance(stop.code, int) else 2
    try:
        return args.func(args)
    except VTPruneError as error:
        print(f"vtprune: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except OSError as error:  # disk full, permission denied, ... while writing results
        print(f"vtprune: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vtprune: error: interrupted", file=sys.stderr)
        return 130


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
