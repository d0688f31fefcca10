"""The video methods on a LLaVA-OneVision-0.5B-shaped model (random weights) on CPU, one video of N frames:
per method and retention, the measured prefill and per-token decode time, the method's own selection time, the
analytic prefill FLOPs and the equivalent visual tokens, each against the unpruned model. Speed does not depend
on weight values; accuracy is never reported here.

    nice python eval/scripts/video_methods_latency.py --preset llava-onevision-0.5b --frames 16 \\
        --out eval/results/video_methods_cpu --repeats 3 --threads 2

``dycoke`` appears twice: its temporal merging alone (``decode=False``) and with its decode-time KV pruning (the
decode column then shows what the decode stage saves). The decode time is the median interval between consecutive
generation steps after the first (one decode forward each).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import transformers

import vtprune
from vtprune.bench.presets import build_preset, preset_inputs
from vtprune.errors import BudgetError

METHODS = (("holitom", {}), ("fastvid", {}), ("dycoke", {"decode": False}), ("dycoke", {}), ("prunevid", {}),
           ("visionzip_video", {}))
BUDGETS = (0.25, 0.1)


class _Clock:
    """A session timer (vtprune/engine/timing.py): seconds spent in each section."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def section(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def _timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class _Stamps(transformers.LogitsProcessor):
    """Records the time of every generation step (called once per step, after that step's forward)."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def measure(model, inputs, repeats: int, new_tokens: int) -> dict:
    with torch.no_grad():
        prefill = _timed(lambda: model(**inputs), repeats)
        stamps = _Stamps()
        model.generate(**inputs, max_new_tokens=1 + new_tokens, min_new_tokens=1 + new_tokens, do_sample=False,
                       logits_processor=transformers.LogitsProcessorList([stamps]))
    steps = [b - a for a, b in zip(stamps.times[:-1], stamps.times[1:], strict=True)]  # decode steps only
    return {"prefill_s": prefill, "decode_s_per_token": statistics.median(steps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llava-onevision-0.5b")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--methods", default=",".join(sorted({m for m, _ in METHODS})))
    parser.add_argument("--budgets", default=",".join(str(b) for b in BUDGETS))
    parser.add_argument("--out", default="eval/results/video_methods_cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, processor = build_preset(args.preset, dtype=getattr(torch, args.dtype))
    inputs = preset_inputs(args.preset, processor, video_frames=args.frames)
    wanted = set(args.methods.split(","))
    budgets = [float(b) for b in args.budgets.split(",")]
    rows = []
    base = measure(model, inputs, args.repeats, args.new_tokens)
    with vtprune.pruned(model, "random", budget=1.0):  # stats of the unpruned forward
        with torch.no_grad():
            model(**inputs)
        full = vtprune.stats(model).samples[0]
    rows.append({"method": "full", "budget": 1.0, **base, "select_s": 0.0, "flops": full.flops_unpruned,
                 "equivalent_tokens": full.visual_in})
    print(json.dumps(rows[-1]), flush=True)
    for name, options in METHODS:
        if name not in wanted:
            continue
        for budget in budgets:
            label = name + ("" if not options else "(" + ",".join(f"{k}={v}" for k, v in options.items()) + ")")
            with vtprune.pruned(model, name, budget=budget, **options):
                session = model._vtprune_session
                clock = _Clock()
                session.timer = clock
                try:
                    with torch.no_grad():
                        model(**inputs)
                except BudgetError as error:  # e.g. DyCoke keeps whole frames: a budget below them is refused
                    print(json.dumps({"method": label, "budget": budget, "unreachable": str(error)}), flush=True)
                    continue
                stats = vtprune.stats(model).samples[0]
                select = clock.seconds.get("select", 0.0)
                session.timer = None
                timing = measure(model, inputs, args.repeats, args.new_tokens)
            rows.append({"method": label, "budget": budget, **timing, "select_s": select, "flops": stats.flops,
                         "equivalent_tokens": stats.equivalent_tokens})
            print(json.dumps(rows[-1]), flush=True)
    end = measure(model, inputs, args.repeats, args.new_tokens)  # the unpruned model again: drift of the machine
    rows.append({"method": "full (again, last)", "budget": 1.0, **end, "select_s": 0.0, "flops": full.flops_unpruned,
                 "equivalent_tokens": full.visual_in})
    print(json.dumps(rows[-1]), flush=True)
    meta = {"preset": args.preset, "frames": args.frames, "threads": args.threads, "dtype": args.dtype,
            "repeats": args.repeats, "new_tokens": args.new_tokens, "torch": torch.__version__,
            "transformers": transformers.__version__, "machine": platform.processor() or platform.machine(),
            "visual_tokens": full.visual_in}
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# Video methods, {args.preset}, {args.frames} frames ({full.visual_in} visual tokens), CPU, "
             f"{args.threads} threads, {args.dtype}, random weights", "",
             "| method | retention | prefill s | speedup | FLOPs-implied | select ms (% of prefill) | decode ms/token "
             "| equivalent tokens |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        speed = base["prefill_s"] / r["prefill_s"]
        implied = full.flops_unpruned / r["flops"] if r["flops"] else float("nan")
        lines.append(f"| {r['method']} | {r['budget']} | {r['prefill_s']:.2f} | {speed:.2f}x | {implied:.2f}x | "
                     f"{1000 * r['select_s']:.0f} ({100 * r['select_s'] / r['prefill_s']:.1f} %) | "
                     f"{1000 * r['decode_s_per_token']:.0f} | {r['equivalent_tokens']:.0f} |")
    lines += ["", "Command: `nice python eval/scripts/video_methods_latency.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()) + "`"]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
