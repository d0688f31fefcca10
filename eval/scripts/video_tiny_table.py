"""Visual tokens and prefill FLOPs of every registered method on one video, before and after pruning.

A tiny LLaVA-OneVision-shaped model (``vtprune.testing.tiny_vlm("llava_onevision")``, random weights) gets one
8-frame clip (``tiny_video``) and a question; each registered method runs at the same budget (default 25 % of
the clip's visual tokens) with its default options. A method that cannot run there (e.g. an in-LLM schedule
that a 4-layer decoder cannot reach, or an in-ViT stage on video) is listed with its error message, not skipped
silently. Writes ``<out>.json`` (one row per method) and ``<out>.md``. ``--methods a,b`` measures only those.

    python eval/scripts/video_tiny_table.py --out eval/results/video_tiny_onevision
    python eval/scripts/video_tiny_table.py --budget 0.5 --methods framefusion,fastv,holitom_inner,prunevid_llm,divprune \
        --out eval/results/video_tiny_onevision_in_llm_50
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import torch

import vtprune
from vtprune.errors import VTPruneError
from vtprune.testing import tiny_inputs, tiny_video, tiny_vlm


def measure(family: str, frames: int, budget: float, methods: list[str] | None = None) -> list[dict]:
    model, processor = tiny_vlm(family, seed=0)
    inputs = tiny_inputs(processor, None, ["What happens in the video?"], videos=[tiny_video(seed=0, frames=frames)])
    rows = []
    for name in methods or sorted(vtprune.methods()):
        row = {"method": name, "budget": budget}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with vtprune.pruned(model, name, budget=budget), torch.no_grad():
                    model(**inputs)
                    sample = vtprune.stats(model).samples[0]
        except (VTPruneError, ValueError) as error:
            row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0]}"
            rows.append(row)
            continue
        row.update(
            visual_in=sample.visual_in, equivalent_tokens=round(sample.equivalent_tokens, 2),
            flops=int(sample.flops), flops_unpruned=int(sample.flops_unpruned), frame_kept=sample.frame_kept,
        )
        rows.append(row)
    return rows


def to_markdown(rows: list[dict], family: str, frames: int) -> str:
    lines = [f"Tiny {family} (random weights), one {frames}-frame clip (`tiny_video`), each method at budget "
             f"{rows[0]['budget']} with its default options.", "",
             "| method | visual tokens in | equivalent tokens | prefill MFLOPs (unpruned) | FLOPs ratio | kept per frame |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['method']} | – | – | – | – | refused: {row['error']} |")
            continue
        lines.append(
            f"| {row['method']} | {row['visual_in']} | {row['equivalent_tokens']:.1f} | "
            f"{row['flops'] / 1e6:.1f} ({row['flops_unpruned'] / 1e6:.1f}) | "
            f"{row['flops'] / row['flops_unpruned']:.3f} | {row['frame_kept']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="llava_onevision")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--budget", type=float, default=0.25)
    parser.add_argument("--methods", default=None, help="comma-separated method names (default: every registered one)")
    parser.add_argument("--out", required=True, help="output stem (writes .json and .md)")
    args = parser.parse_args()
    methods = args.methods.split(",") if args.methods else None
    if methods:
        unknown = sorted(set(methods) - set(vtprune.methods()))
        if unknown:
            parser.error(f"unknown method(s) {', '.join(unknown)}; see `vtprune methods`")
    rows = measure(args.family, args.frames, args.budget, methods)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    markdown = to_markdown(rows, args.family, args.frames)
    command = "python eval/scripts/video_tiny_table.py"
    for flag, value, default in (("--family", args.family, "llava_onevision"), ("--frames", args.frames, 8),
                                 ("--budget", args.budget, 0.25), ("--methods", args.methods, None)):
        if value != default:
            command += f" {flag} {value}"
    out.with_suffix(".md").write_text(f"Command: `{command} --out {args.out}`\n\n" + markdown)
    print(markdown)


if __name__ == "__main__":
    main()
