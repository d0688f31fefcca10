"""In-ViT methods (tome, flowcut) against native-K and pre-LLM methods on the CPU preset ``llava-cpu-0.5b``
(LLaVA-1.5 shape: CLIP ViT-B/14 at 336 px, 576 visual tokens, 24-layer decoder; random weights, bfloat16).

Native-K (``vtprune.bench.latency.native_k_prefill``) is the unpruned model on an input with only K visual tokens
from the start: the vision tower and projector run on the full image, the decoder on K visual tokens. It bounds
every pre-LLM method from below; only an in-ViT method, which also shrinks the vision tower's work, can beat it.
Each configuration is timed in interleaved rounds with its native-K reference (``measure_paired``), so load from
other processes hits both alike; the ratio pruned/native is the figure of merit. ``select`` is the method's own
work (ToMe's matching, FlowCut's scores, a pre-LLM selection) as a share of the pruned prefill. Also reported:
the analytic prefill FLOPs and the encoder's tokens per block.

    nice python eval/scripts/in_vit_cpu.py --out eval/results/in_vit_cpu --repeats 3 --threads 2
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
import transformers

import vtprune
from vtprune.bench.latency import measure_paired
from vtprune.bench.presets import build_preset, preset_inputs

K = 64
CONFIGS = [  # (label, method, options)
    ("tome", "tome", {}),
    ("tome r=(43, -1) (decreasing schedule)", "tome", {"r": (43, -1)}),
    ("flowcut", "flowcut", {}),
    ("random (pre-LLM)", "random", {}),
    ("divprune (pre-LLM)", "divprune", {}),
    ("fastervlm (pre-LLM)", "fastervlm", {}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="eval/results/in_vit_cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--preset", default="llava-cpu-0.5b")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, processor = build_preset(args.preset)
    inputs = preset_inputs(args.preset, processor)
    rows = []
    for label, method, options in CONFIGS:
        budget = None if "r" in options else K
        holder = {}

        def install(method=method, options=options, budget=budget):
            vtprune.apply(model, method, budget, **options)

        def uninstall(holder=holder):
            holder["stats"] = vtprune.stats(model).samples[0]
            vtprune.remove(model)

        paired = measure_paired(model, inputs, install=install, uninstall=uninstall, native_k=K, unpruned=False,
                                new_tokens=0, warmup=1, repeats=args.repeats)
        sample = holder["stats"]
        pruned_ms, native_ms = paired.pruned.prefill.median, paired.native.median
        select_ms = paired.pruned.select.median if paired.pruned.select is not None else 0.0
        rows.append({
            "config": label, "method": method, "options": {k: list(v) if isinstance(v, tuple) else v
                                                           for k, v in options.items()},
            "budget": budget, "visual_tokens": sample.visual_lengths[0], "flops": sample.flops,
            "flops_unpruned": sample.flops_unpruned, "prefill_ms": pruned_ms,
            "prefill_ms_all": paired.pruned.prefill.samples, "native_k_ms": native_ms,
            "native_k_ms_all": paired.native.samples, "native_over_pruned": native_ms / pruned_ms,
            "select_ms": select_ms, "select_pct": 100.0 * select_ms / pruned_ms,
        })
        print(f"{label}: {pruned_ms:.0f} ms vs native-K {native_ms:.0f} ms ({native_ms / pruned_ms:.2f}x), "
              f"select {100.0 * select_ms / pruned_ms:.2f} %, {sample.visual_lengths[0]} visual tokens", flush=True)
    meta = {"preset": args.preset, "K": K, "torch": torch.__version__, "transformers": transformers.__version__,
            "threads": args.threads, "repeats": args.repeats, "machine": platform.processor() or platform.machine(),
            "command": f"nice python eval/scripts/in_vit_cpu.py --out {args.out} --repeats {args.repeats} "
                       f"--threads {args.threads}"}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = ["| configuration | visual tokens to the LLM | prefill GFLOPs | prefill ms (median) | native-K ms "
             "| native-K / pruned | select % of prefill |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['visual_tokens']} | {r['flops'] / 1e9:.1f} | {r['prefill_ms']:.0f} "
                     f"| {r['native_k_ms']:.0f} | {r['native_over_pruned']:.2f}x | {r['select_pct']:.2f} |")
    header = (f"# In-ViT vs native-K on `{args.preset}` (K = {K}, random weights, CPU)\n\n"
              f"Command: `{meta['command']}`; torch {torch.__version__}, transformers {transformers.__version__}, "
              f"{args.threads} thread(s), median of {args.repeats} interleaved rounds (pruned, then native-K) after a "
              "warm-up round, on a machine shared with other jobs.\n\n")
    out.with_suffix(".md").write_text(header + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
