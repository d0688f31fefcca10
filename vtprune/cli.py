"""The ``vtprune`` command: ``methods``, ``run`` (one image + prompt through a pruned model), ``bench``
(sweeps: accuracy, FLOPs, latency, memory), ``plot`` (Pareto plots) and ``eval`` (accuracy through lmms-eval)."""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import time

import torch


def _parse_budget(text: str):
    if text.lower() in ("none", "default"):
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"budget {text!r} is not an int (tokens per image), a float in (0, 1] or 'none'"
        ) from None


def _parse_option(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"option {text!r} must look like name=value, e.g. dominant=54")
    key, value = text.split("=", 1)
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        parsed = value
    return key.strip(), parsed


def cmd_methods(args) -> int:
    from . import methods

    infos = methods()
    if args.json:
        print(json.dumps({k: {**v.__dict__, "defaults": v.defaults} for k, v in infos.items()}, indent=2,
                         default=str))
        return 0
    print(f"{'method':<11} {'stage':<8} {'budget':>7}  {'policy':<8} {'positions':<9} {'signals':<32} paper")
    for info in infos.values():
        signals = ",".join(info.signals) or "-"
        print(f"{info.name:<11} {info.stage:<8} {info.default_budget!s:>7}  {info.budget_policy:<8} "
              f"{info.positions:<9} {signals:<32} {info.paper}")
    return 0


def _default_image():
    """A question of the shipped synthetic test split (what the bundled micro-VLMs were trained for)."""
    from .synth import load_test_split

    return load_test_split(limit=6)[5]  # fine_detail: "What color is the small object?"


def cmd_run(args) -> int:
    import vtprune

    from .loading import load_model

    model, processor, description = load_model(args.model, dtype=args.dtype, device=args.device)
    if args.image:
        from PIL import Image

        image = Image.open(args.image).convert("RGB")
    else:
        sample = _default_image()
        image = sample.image
        if args.prompt is None:
            args.prompt = sample.question
            print(f"image:  synthetic test sample {sample.id} (reference answer: {sample.answer})")
    if args.prompt is None:
        args.prompt = "What is in the image?"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": args.prompt}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=[image], text=[text], return_tensors="pt").to(args.device)
    options = dict(args.option or [])
    vtprune.apply(model, args.method, budget=args.budget, positions=args.positions, seed=args.seed, **options)
    with torch.inference_mode():
        start = time.perf_counter()
        output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
        elapsed = time.perf_counter() - start
    stats = vtprune.stats(model)
    answer = processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
    print(f"model:  {description}")
    print(f"method: {args.method}  budget: {args.budget}")
    print(f"answer: {answer.strip()}")
    print(stats.summary())
    print(f"generate: {elapsed * 1000:.1f} ms for {output.shape[1] - inputs['input_ids'].shape[1]} new tokens")
    if args.show:
        from .viz import save_overlay

        path = save_overlay(args.show, model, inputs, image, processor=processor)
        print(f"kept tokens drawn to {path}")
    return 0


def _split(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def cmd_bench(args) -> int:
    from pathlib import Path

    from . import methods
    from .bench import report
    from .bench.sweep import SweepOptions, default_models, plan_cells, run_sweep
    from .errors import VTPruneError

    if args.list_presets:
        from .bench.presets import list_presets, load_preset

        for name in list_presets():
            preset = load_preset(name)
            print(f"{name:<22} {preset.family:<16} {preset.dtype:<9} {preset.reference or '-':<44} {preset.notes}")
        return 0
    models = list(args.model or [])
    presets = [f"preset:{name}" for name in (args.preset or [])]
    if not models and not presets:
        models = default_models()
        if not models:
            raise VTPruneError("no bundled micro-VLM found in models/ (micro-llava, micro-qwen2vl); pass --model "
                               "DIR or --preset NAME")
    registered = list(methods())
    chosen = registered if args.methods in (None, "all") else _split(args.methods)
    unknown = [m for m in chosen if m not in registered]
    if unknown:
        raise VTPruneError(f"unknown method(s) {', '.join(unknown)}; registered: {', '.join(registered)}")
    options = SweepOptions(
        limit=None if args.limit == 0 else args.limit, batch_size=args.batch_size, repeats=args.repeats,
        warmup=args.warmup, new_tokens=args.new_tokens, threads=args.threads, device=args.device, dtype=args.dtype,
        native=not args.no_native, paired=not args.no_paired, seed=args.seed,
        method_options={m: dict(o) for m, o in _group_options(args.option or []).items()},
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    cells = []
    for group, default_tasks, default_budgets in ((models, "synth", "full,0.5,0.25,0.125"),
                                                   (presets, "latency", "full,192,128,64")):
        if group:
            cells += plan_cells(group, chosen, _split(args.budgets or default_budgets),
                                _split(args.tasks or default_tasks))
    out = Path(args.out)
    jobs = args.jobs
    if jobs is None:  # accuracy sweeps over several models: one process per model on a multi-core machine
        synth_only = all(cell.task == "synth" for cell in cells)
        jobs = min(len({cell.model for cell in cells}), os.cpu_count() or 1) if synth_only else 1
    rows = run_sweep(cells, out, options, progress=not args.no_progress, use_ray=args.ray, jobs=jobs)
    records = report.summaries(rows)
    stem = out.with_suffix("")
    Path(f"{stem}.csv").write_text(report.to_csv(records))
    markdown = report.to_markdown(records)
    spreads = report.accuracy_spread(records)
    if spreads:
        markdown += "\n### Best vs worst method per budget (accuracy)\n\n" + report.spread_markdown(spreads)
    Path(f"{stem}.md").write_text(markdown)
    report.print_table(records, title=f"vtprune bench: {len(rows)} cells ({out})")
    for s in spreads:
        print(f"{s['model_name']} @ {s['budget']}: best {s['best']} {100 * s['best_accuracy']:.1f} %, "
              f"worst {s['worst']} {100 * s['worst_accuracy']:.1f} % -> spread {s['spread_points']:.1f} points "
              f"({s['methods']} methods, {s['n']} questions)")
    print(f"rows: {out}   tables: {stem}.md, {stem}.csv")
    sections = []
    for clock in (("cpu", "wall") if not str(args.device).startswith("cuda") else ("wall",)):
        checked = report.check_targets(records, 64, clock)
        if checked:
            sections.append(f"### Targets at 64 equivalent tokens ({clock} time)\n\n" + report.targets_markdown(checked))
    if sections:
        Path(f"{stem}_targets.md").write_text("\n".join(sections))
        print("\n".join(sections))
    return 0


def _group_options(pairs) -> dict[str, dict[str, object]]:
    """``--option fastv.layer=3`` -> {"fastv": {"layer": 3}}."""
    from .errors import VTPruneError

    grouped: dict[str, dict[str, object]] = {}
    for key, value in pairs:
        if "." not in key:
            raise VTPruneError(f"bench options are per method: --option METHOD.NAME=VALUE (got {key!r})")
        method, name = key.split(".", 1)
        grouped.setdefault(method, {})[name] = value
    return grouped


def cmd_plot(args) -> int:
    from .bench.plot import plot_rows
    from .bench.sweep import iter_rows

    rows = iter_rows(args.results)
    paths = plot_rows(rows, args.out)
    for path in paths:
        print(path)
    return 0 if paths else 1


def cmd_eval(args) -> int:
    from .bench.lmms import run_lmms_eval

    return run_lmms_eval(model=args.model, method=args.method, budget=args.budget, tasks=args.tasks,
                         limit=args.limit, output_path=args.output_path, device=args.device, dtype=args.dtype,
                         batch_size=args.batch_size, extra=args.lmms_args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vtprune", description="Visual-token pruning for VLMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("methods", help="list the registered pruning methods")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("run", help="one image + prompt through a pruned model; prints the answer and stats")
    p.add_argument("--model", default=None,
                   help="HF directory or hub id; 'tiny:<family>' for a random tiny model; default: bundled model")
    p.add_argument("--image", default=None, help="image file (default: a generated test image)")
    p.add_argument("--prompt", default=None,
                   help="default: the question of the default image, or 'What is in the image?'")
    p.add_argument("--method", default="divprune")
    p.add_argument("--budget", type=_parse_budget, default=None,
                   help="int tokens per image, float fraction, or 'none' for the paper default")
    p.add_argument("--positions", choices=["original", "compact"], default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--option", type=_parse_option, action="append", metavar="NAME=VALUE",
                   help="method option, repeatable (e.g. --option dominant=54)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--show", default=None, metavar="OUT.png",
                   help="save the image with the kept tokens of each stage highlighted")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("bench", help="sweep methods x budgets x models x tasks; JSONL rows (resumable) + tables")
    p.add_argument("--model", action="append", metavar="DIR",
                   help="HF model directory (repeatable); default: the bundled micro-VLMs")
    p.add_argument("--preset", action="append", metavar="NAME",
                   help="shape preset of models/presets with random weights, latency only (repeatable)")
    p.add_argument("--list-presets", action="store_true", help="list the presets and exit")
    p.add_argument("--methods", default="all", help="comma-separated registered methods, or 'all' (default)")
    p.add_argument("--budgets", default=None,
                   help="comma-separated: 'full' (unpruned), ints (tokens), floats (fractions); default "
                        "full,0.5,0.25,0.125 for models and full,192,128,64 for presets")
    p.add_argument("--tasks", default=None, help="synth (accuracy) and/or latency; default synth for models, "
                                                "latency for presets")
    p.add_argument("--limit", type=int, default=0,
                   help="synth: the first N questions of the test split (skill-balanced prefix); default 0 = all "
                        "600, a binomial standard error of at most 2.0 accuracy points")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=8, help="tokens generated per timed generate")
    p.add_argument("--threads", type=int, default=None, help="torch threads (recorded in every row)")
    p.add_argument("--no-native", action="store_true", help="latency: skip the native-K reference")
    p.add_argument("--no-paired", action="store_true", help="latency: skip the interleaved unpruned reference")
    p.add_argument("--option", type=_parse_option, action="append", metavar="METHOD.NAME=VALUE",
                   help="method option, repeatable (e.g. --option fastv.layer=3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench_results/results.jsonl",
                   help="JSONL results (re-running with the same file resumes); .md/.csv tables next to it")
    p.add_argument("--ray", action="store_true", help="run the cells as Ray tasks on a local Ray instance")
    p.add_argument("--jobs", type=int, default=None,
                   help="worker processes, each running whole models (default: one per model, up to the CPU "
                        "count, when only accuracy is measured; else 1 so timings do not share the machine)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: the preset's dtype, float32 for model directories")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("plot", help="Pareto plots (PNG) from bench results")
    p.add_argument("results", nargs="+", help="JSONL files written by vtprune bench")
    p.add_argument("--out", default="bench_results/plots", help="output directory")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("eval", help="accuracy through lmms-eval with a pruned model (the 'vtprune' lmms-eval model)")
    p.add_argument("--model", default=None, help="HF model directory; default: the bundled micro-llava")
    p.add_argument("--method", default=None, help="registered method (default: none, the unpruned model)")
    p.add_argument("--budget", type=_parse_budget, default=None)
    p.add_argument("--tasks", default="vtprune_synth", help="lmms-eval tasks (default: the synthetic test split)")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--output-path", default="bench_results/lmms_eval")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("lmms_args", nargs=argparse.REMAINDER, help="after --: extra lmms-eval arguments")
    p.set_defaults(func=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .errors import VTPruneError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except VTPruneError as error:
        print(f"vtprune: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
