"""The ``vtprune`` command: ``methods`` and ``run`` (one image + prompt through a pruned model)."""

from __future__ import annotations

import argparse
import ast
import json
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
