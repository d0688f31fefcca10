"""In-LLM methods on a small LLaVA-1.5-shaped model (random weights) on CPU: per-layer visual counts,
equivalent tokens, analytic prefill FLOPs and measured prefill time, each against the unpruned model.

Shape: CLIP-style ViT at 336 px / patch 14 (576 visual tokens, as LLaVA-1.5) with a narrow encoder, and a
32-layer Llama decoder of width 512 (so that FastV's layer 2 and PDrop's 8/16/24 mean what they mean on the
7B model). Speed does not depend on weight values; accuracy is never reported here.

    python eval/scripts/in_llm_cpu.py --out eval/results/in_llm_cpu --repeats 7 --threads 1
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import transformers

import vtprune
from vtprune.testing import tiny_image, tiny_inputs, tiny_vlm

METHODS = ("fastv", "pdrop", "dart", "sparsevlm")
BUDGETS = (192, 128, 64)


def build_model():
    return tiny_vlm(
        "llava",
        vision_config={"image_size": 336, "patch_size": 14, "hidden_size": 64, "intermediate_size": 128,
                       "num_hidden_layers": 2, "num_attention_heads": 4},
        text_config={"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 32,
                     "num_attention_heads": 8, "num_key_value_heads": 8},
    )


def run_lengths(values: list[int]) -> str:
    """[576, 576, 300, 300, 300] -> '576x2 300x3'."""
    out, previous, count = [], None, 0
    for v in [*values, None]:
        if v == previous:
            count += 1
            continue
        if previous is not None:
            out.append(f"{previous}x{count}")
        previous, count = v, 1
    return " ".join(out)


def prefill_seconds(model, inputs) -> float:
    with torch.no_grad():
        start = time.perf_counter()
        model(**inputs, use_cache=True)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="eval/results/in_llm_cpu")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, processor = build_model()
    inputs = tiny_inputs(processor, [tiny_image(0, (336, 336))], ["What is the colour of the largest object?"])
    cells = [(None, None)] + [(m, b) for m in METHODS for b in BUDGETS]
    times: dict = {cell: [] for cell in cells}
    samples = {}
    # round-robin: every round times each configuration once, so that load from other processes on a
    # shared machine spreads over all of them instead of biasing whichever ran during a busy spell
    for round_index in range(args.repeats + 1):
        for method, budget in cells:
            if method is None:
                elapsed = prefill_seconds(model, inputs)
            else:
                with vtprune.pruned(model, method, budget=budget):
                    elapsed = prefill_seconds(model, inputs)
                    samples[(method, budget)] = vtprune.stats(model).samples[0]
            if round_index:  # round 0 is the warm-up
                times[(method, budget)].append(elapsed)
        print(f"round {round_index}/{args.repeats} done", flush=True)
    base = times[(None, None)]
    rows = []
    for method, budget in cells[1:]:
        sample = samples[(method, budget)]
        rows.append({
            "method": method, "budget": budget, "visual_in": sample.visual_in,
            "visual_per_layer": sample.visual_lengths, "equivalent_tokens": sample.equivalent_tokens,
            "stages": [(s.layer, len(s.kept_positions), s.merged) for s in sample.stages],
            "flops": sample.flops, "flops_unpruned": sample.flops_unpruned,
            "prefill_s": statistics.median(times[(method, budget)]), "prefill_s_all": times[(method, budget)],
            "prefill_unpruned_s": statistics.median(base),
        })
    meta = {"torch": torch.__version__, "transformers": transformers.__version__, "threads": args.threads,
            "repeats": args.repeats, "machine": platform.processor() or platform.machine(),
            "unpruned_prefill_s_all": base, "sequence_length": int(inputs["input_ids"].shape[1])}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [
        "| method | budget | visual tokens per layer (count x layers) | equivalent | prefill GFLOPs (pruned / unpruned) "
        "| FLOPs speedup | prefill ms median (pruned / unpruned) | measured speedup |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['budget']} | {run_lengths(r['visual_per_layer'])} | {r['equivalent_tokens']:.1f} "
            f"| {r['flops'] / 1e9:.2f} / {r['flops_unpruned'] / 1e9:.2f} | {r['flops_unpruned'] / r['flops']:.2f}x "
            f"| {r['prefill_s'] * 1e3:.1f} / {r['prefill_unpruned_s'] * 1e3:.1f} "
            f"| {r['prefill_unpruned_s'] / r['prefill_s']:.2f}x |"
        )
    header = (f"# In-LLM methods, LLaVA-1.5-shaped model (576 visual tokens, 32-layer d=512 decoder, random weights)\n\n"
              f"Command: `python eval/scripts/in_llm_cpu.py --repeats {args.repeats} --threads {args.threads}`; "
              f"torch {torch.__version__}, transformers {transformers.__version__}, CPU, {args.threads} thread(s), "
              f"median of {args.repeats} rounds after a warm-up round (each round times every configuration once, round-robin); sequence {meta['sequence_length']} tokens.\n\n")
    out.with_suffix(".md").write_text(header + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
