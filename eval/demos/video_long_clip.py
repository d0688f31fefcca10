"""Demo (b): a long clip at more and more frames, with and without pruning: prefill time and peak memory.

    python eval/demos/video_long_clip.py                                 # offline: bundled model or tiny:qwen2_vl
    python eval/demos/video_long_clip.py --model llava-hf/llava-onevision-qwen2-0.5b-ov-hf --video long.mp4 \\
        --frames 8,16,32,64,128 --method visionzip --budget 0.125 --device cuda --dtype float16
    python eval/demos/video_long_clip.py --model preset:llava-onevision-7b --frames 8,16,32,64 --device cuda \
        --dtype bfloat16                           # real 7B shapes, random weights: where pruning makes a clip fit

For every frame count: the visual tokens, the prefill (one forward with a KV cache, median of ``--repeats`` after a
warm-up) and its peak memory (CUDA: the allocator's peak above the start; CPU: peak resident memory above the
start), unpruned and pruned. Memory is the point of the sweep: visual tokens grow linearly with the frames, and the
KV cache and attention with them; pruning keeps the decoder's share flat. A configuration that runs out of GPU
memory is recorded as "OOM" and the sweep goes on, so the table shows where pruning makes a clip fit; with
``--memory-limit MiB`` (e.g. the free memory of a smaller GPU) the table also marks which runs stay under it.
Writes ``OUT/long_clip.md`` and ``OUT/long_clip.png`` (time and memory against frames; needs matplotlib).

Without ``--model`` it runs on the bundled video micro-model when present, else on ``tiny:qwen2_vl`` (random
weights: times and memory are real, answers are not computed). The shipped clips have 64 frames; pass a longer
``--video`` for more.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, when run from a checkout

import vtprune  # noqa: E402
from vtprune.bench.latency import PrefillRunner  # noqa: E402
from vtprune.bench.memory import measure_peak_memory  # noqa: E402
from vtprune.cli import default_video_model  # noqa: E402
from vtprune.errors import VTPruneError  # noqa: E402
from vtprune.loading import RANDOM_WEIGHT_SPECS as RANDOM  # noqa: E402
from vtprune.loading import check_device, check_model_spec, load_any  # noqa: E402
from vtprune.video import load_video, shipped_clips, video_inputs  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF directory / hub id / tiny:<family> / preset:NAME (random weights, real shapes); "
                             "default: the bundled video micro-model, else tiny:qwen2_vl")
    parser.add_argument("--video", default=None, help="video file; default: the shipped moving_square.mp4")
    parser.add_argument("--frames", default="8,16,32,64", help="comma-separated frame counts (default 8,16,32,64)")
    parser.add_argument("--method", default="visionzip", help="default visionzip (per frame, cheap to select)")
    parser.add_argument("--budget", type=float, default=0.25, help="fraction (<= 1) or tokens (> 1) of the clip")
    parser.add_argument("--repeats", type=int, default=3, help="timed prefills per point")
    parser.add_argument("--memory-limit", type=float, default=None, metavar="MiB",
                        help="mark the runs whose peak memory stays under this many MiB")
    parser.add_argument("--max-pixels", type=int, default=None,
                        help="Qwen-VL: the most pixels a frame keeps (the model card's max_pixels, e.g. 151200)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--out", default="video_demo", help="directory for long_clip.md / long_clip.png")
    return parser


def _oom(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def measure(model, inputs, repeats: int, device: str) -> dict:
    """Peak memory of one prefill, then the median time of ``repeats`` more; {"status": "OOM"} when it does not
    fit."""
    runner = PrefillRunner(model, inputs)
    try:
        _, memory = measure_peak_memory(lambda: runner(), device)
        times = [runner()[0]["prefill"][0] for _ in range(repeats)]
    except (RuntimeError, MemoryError) as error:
        if not _oom(error):
            raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return {"status": "OOM", "prefill_ms": None, "peak_mib": None}
    return {"status": "ok", "prefill_ms": statistics.median(times), "peak_mib": memory.delta_bytes / 2**20}


def plot(rows: list[dict], path: Path, title: str) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label, style in (("full", "unpruned", "o-"), ("pruned", "pruned", "s-")):
        points = [(r["frames"], r[key]) for r in rows if r[key]["status"] == "ok"]
        left.plot([f for f, _ in points], [m["prefill_ms"] for _, m in points], style, label=label)
        right.plot([f for f, _ in points], [m["peak_mib"] for _, m in points], style, label=label)
        for frames, _ in ((r["frames"], r) for r in rows if r[key]["status"] == "OOM"):
            right.axvline(frames, color="red", alpha=0.3)
    for axis, what in ((left, "prefill ms"), (right, "peak memory of the prefill (MiB)")):
        axis.set_xlabel("frames")
        axis.set_ylabel(what)
        axis.legend()
        axis.grid(alpha=0.3)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def main(argv: list[str] | None = None) -> list[dict]:
    args = build_parser().parse_args(argv)
    budget = int(args.budget) if args.budget > 1 else args.budget
    frames = sorted({int(f) for f in args.frames.split(",") if f.strip()})
    if not frames or frames[0] < 1:
        raise VTPruneError(f"--frames {args.frames!r}: pass frame counts >= 1, e.g. 8,16,32,64")
    vtprune.registry.method_class(args.method)
    model_spec = args.model or default_video_model()
    if not model_spec.startswith("preset:"):
        check_model_spec(model_spec)
    device = check_device(args.device)
    path = args.video or shipped_clips()[0]["path"]
    clips = {n: load_video(path, num_frames=n) for n in frames}  # a clip too short fails here, before the model
    model, processor, description = load_any(model_spec, dtype=args.dtype, device=device)
    noise = str(description).startswith(RANDOM)
    print(f"model: {description}" + ("  (random weights: times and memory are real)" if noise else ""))
    prompt = "What happens in the video?"
    rows = []
    for n in frames:
        inputs = video_inputs(processor, clips[n], prompt, device=device, dtype=getattr(torch, args.dtype),
                              max_pixels=args.max_pixels)
        visual = int((inputs["input_ids"] == model.config.video_token_id).sum())
        full = measure(model, inputs, args.repeats, device)
        with vtprune.pruned(model, args.method, budget=budget):
            pruned = measure(model, inputs, args.repeats, device)
            kept = vtprune.stats(model).samples[0].equivalent_tokens if pruned["status"] == "ok" else None
        rows.append({"frames": n, "visual": visual, "kept": kept, "full": full, "pruned": pruned})
        print(f"  {n} frames: {visual} visual tokens; unpruned {full['status']} {full['prefill_ms'] or 0:.1f} ms; "
              f"pruned {pruned['status']} {pruned['prefill_ms'] or 0:.1f} ms")
        del inputs

    def cell(m: dict, key: str, fmt: str) -> str:
        return "OOM" if m["status"] == "OOM" else format(m[key], fmt)

    def fits(m: dict) -> str:
        if args.memory_limit is None:
            return ""
        return " | no" if m["status"] == "OOM" or m["peak_mib"] > args.memory_limit else " | yes"

    limit = "" if args.memory_limit is None else f" | unpruned fits {args.memory_limit:g} MiB | pruned fits"
    lines = [f"| frames | visual tokens | pruned eq. tokens | unpruned prefill ms | pruned prefill ms | speedup | "
             f"unpruned peak MiB | pruned peak MiB{limit} |",
             "|" + "---|" * (8 + (2 if args.memory_limit is not None else 0))]
    for r in rows:
        full, pruned = r["full"], r["pruned"]
        speedup = f"{full['prefill_ms'] / pruned['prefill_ms']:.2f}" if "OOM" not in (full["status"],
                                                                                    pruned["status"]) else ""
        kept = "" if r["kept"] is None else f"{r['kept']:.1f}"
        lines.append(f"| {r['frames']} | {r['visual']} | {kept} | {cell(full, 'prefill_ms', '.1f')} | "
                     f"{cell(pruned, 'prefill_ms', '.1f')} | {speedup} | {cell(full, 'peak_mib', '.1f')} | "
                     f"{cell(pruned, 'peak_mib', '.1f')}{fits(full)}{fits(pruned)} |")
    table = "\n".join(lines)
    title = f"{Path(str(path)).name} on {description}: {args.method} at budget {budget} vs unpruned ({device})"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "long_clip.md").write_text(f"# {title}\n\n" + table + "\n")
    picture = plot(rows, out / "long_clip.png", title)
    print(table)
    print(f"written: {out / 'long_clip.md'}" + (f", {picture}" if picture else ""))
    return rows


if __name__ == "__main__":
    try:
        main()
    except VTPruneError as error:
        sys.exit(f"error: {error}")
