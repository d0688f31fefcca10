"""Demo (a): one clip through a pruned video LLM, several methods side by side.

    python eval/demos/video_methods.py                                   # offline: bundled model or tiny:qwen2_vl
    python eval/demos/video_methods.py --model Qwen/Qwen2.5-VL-3B-Instruct --video clip.mp4 --frames 32 \\
        --methods divprune,visionzip,fastv --budget 0.25 --device cuda --dtype bfloat16

For the unpruned model and each method: the answer, the visual tokens (in, equivalent, per frame), the prefill
FLOPs and the measured prefill time (median of ``--repeats`` timed prefills after a warm-up, each one forward with
a KV cache, as ``vtprune bench`` times them), the speedup over the unpruned prefill, and a strip of the frames with
the kept tokens (``OUT/strip_<method>.png``). The table is printed and written to ``OUT/results.md``.

Without ``--model`` the demo runs on the bundled video micro-model (``models/micro-qwen2vl-video``) when it is
present, else on ``tiny:qwen2_vl`` -- random weights: its answers are noise; token counts, FLOPs and times are
real. Nothing is downloaded unless ``--model`` names a hub checkpoint.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, when run from a checkout

import vtprune  # noqa: E402
from vtprune.bench.latency import PrefillRunner  # noqa: E402
from vtprune.cli import default_video_model  # noqa: E402
from vtprune.errors import VTPruneError  # noqa: E402
from vtprune.loading import RANDOM_WEIGHT_SPECS as RANDOM  # noqa: E402
from vtprune.loading import check_device, check_model_spec, load_any  # noqa: E402
from vtprune.video import load_video, shipped_clips, video_inputs  # noqa: E402
from vtprune.viz import save_strip  # noqa: E402

DEFAULT_METHODS = "divprune,visionzip,fastervlm,random"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF directory / hub id / tiny:<family> / preset:NAME (random weights, real shapes); "
                             "default: the bundled video micro-model, else tiny:qwen2_vl")
    parser.add_argument("--video", default=None, help="video file; default: the shipped moving_square.mp4")
    parser.add_argument("--prompt", default=None, help="default: the shipped clip's question")
    parser.add_argument("--frames", type=int, default=16, help="frames sampled uniformly (default 16)")
    parser.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated (default {DEFAULT_METHODS})")
    parser.add_argument("--budget", type=float, default=0.25, help="fraction (<= 1) or tokens (> 1) of the clip")
    parser.add_argument("--repeats", type=int, default=3, help="timed prefills per configuration")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--max-pixels", type=int, default=None,
                        help="Qwen-VL: the most pixels a frame keeps (the model card's max_pixels, e.g. 151200)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--out", default="video_demo", help="directory for results.md and the strips")
    return parser


def prefill_ms(model, inputs, repeats: int) -> float:
    """Median wall milliseconds of ``repeats`` prefills (one untimed first)."""
    runner = PrefillRunner(model, inputs)
    runner()
    return statistics.median(runner()[0]["prefill"][0] for _ in range(repeats))


def answer(model, processor, inputs, max_new_tokens: int) -> str:
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip()


def main(argv: list[str] | None = None) -> list[dict]:
    args = build_parser().parse_args(argv)
    budget = int(args.budget) if args.budget > 1 else args.budget
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for method in methods:  # typos fail before anything loads
        vtprune.registry.method_class(method)
    model_spec = args.model or default_video_model()
    if not model_spec.startswith("preset:"):
        check_model_spec(model_spec)
    device = check_device(args.device)
    clip = shipped_clips()[0]
    video = load_video(args.video or clip["path"], num_frames=args.frames)
    prompt = args.prompt or (clip["question"] if args.video is None else "What happens in the video?")
    model, processor, description = load_any(model_spec, dtype=args.dtype, device=device)
    noise = str(description).startswith(RANDOM)
    inputs = video_inputs(processor, video, prompt, device=device, dtype=getattr(torch, args.dtype),
                              max_pixels=args.max_pixels)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"video:  {video.describe()}\nmodel:  {description}"
          + ("\n        random weights: answers are noise (token counts, FLOPs and times are real)" if noise else ""))
    print(f"prompt: {prompt}" + (f"   (reference: {clip['answer']})" if args.video is None else ""))

    rows = []
    full_ms = prefill_ms(model, inputs, args.repeats)
    visual = int(sum((inputs["input_ids"] == t).sum() for t in (model.config.video_token_id,)))
    rows.append({"method": "none", "budget": "full", "answer": answer(model, processor, inputs, args.max_new_tokens),
                 "visual": visual, "equivalent": float(visual), "per_frame": None, "gflops": None,
                 "prefill_ms": full_ms, "speedup": 1.0, "strip": None})
    for method in methods:
        started = time.perf_counter()
        try:
            with vtprune.pruned(model, method, budget=budget):
                text = answer(model, processor, inputs, args.max_new_tokens)
                sample = vtprune.stats(model).samples[0]
                strip = save_strip(out / f"strip_{method}.png", model, inputs, video,
                                   caption=f"{method} at budget {budget}" + (" (random weights)" if noise else "")
                                   + f"\nQ: {prompt}\nA: {text}")
                ms = prefill_ms(model, inputs, args.repeats)
        except VTPruneError as error:  # e.g. a budget an in-LLM method cannot reach on a shallow model
            print(f"  {method}: not run: {error}")
            rows.append({"method": method, "budget": budget, "answer": f"not run: {error}", "visual": visual,
                         "equivalent": float("nan"), "per_frame": None, "gflops": None, "prefill_ms": float("nan"),
                         "speedup": float("nan"), "strip": None})
            continue
        if rows[0]["gflops"] is None and sample.flops_unpruned:
            rows[0]["gflops"] = sample.flops_unpruned / 1e9
        rows.append({"method": method, "budget": budget, "answer": text, "visual": sample.visual_in,
                     "equivalent": sample.equivalent_tokens, "per_frame": getattr(sample, "frame_kept", None),
                     "gflops": None if sample.flops is None else sample.flops / 1e9, "prefill_ms": ms,
                     "speedup": full_ms / ms, "strip": strip.name})
        print(f"  {method}: {time.perf_counter() - started:.1f} s")

    header = ("| method | budget | answer | visual tokens | equivalent | per frame | prefill GFLOPs | prefill ms | "
              "speedup | strip |")
    lines = [header, "|" + "---|" * 10]
    for r in rows:
        frames = " ".join(str(n) for n in r["per_frame"]) if r["per_frame"] else ""
        gflops = "" if r["gflops"] is None else f"{r['gflops']:.3f}"
        lines.append(f"| {r['method']} | {r['budget']} | {r['answer'].replace('|', '/')} | {r['visual']} | "
                     f"{r['equivalent']:.1f} | {frames} | {gflops} | {r['prefill_ms']:.1f} | {r['speedup']:.2f} | "
                     f"{r['strip'] or ''} |")
    table = "\n".join(lines)
    title = (f"# {video.path.name}, {video.num_frames} frames, on {description}\n\n"
             + ("Random weights: the answers are noise; token counts, FLOPs and times are real.\n\n" if noise else "")
             + f"Prompt: {prompt}\n\n")
    (out / "results.md").write_text(title + table + "\n")
    print(table)
    print(f"written: {out / 'results.md'} and the strips in {out}/")
    return rows


if __name__ == "__main__":
    try:
        main()
    except VTPruneError as error:
        sys.exit(f"error: {error}")
