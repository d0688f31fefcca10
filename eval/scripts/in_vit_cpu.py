"""In-ViT methods (tome, flowcut) against native-K and the pre-LLM / in-LLM methods on the CPU preset
``llava-cpu-0.5b`` (LLaVA-1.5 shape: CLIP ViT-B/14 at 336 px, 576 visual tokens, 24-layer decoder; random
weights, bfloat16).

Native-K (``vtprune.bench.latency.native_k_prefill``) is the unpruned model on an input with only K visual tokens
from the start: the vision tower and projector run on the full image, the decoder on K visual tokens. It bounds
every pre-LLM method from below; only an in-ViT method, which also shrinks the vision tower's work, can beat it.
Each configuration is timed in interleaved rounds with its native-K reference (``measure_paired``), so load from
other processes hits both alike; the ratio pruned/native is the figure of merit. ``select`` is the method's own
work (ToMe's matching, FlowCut's scores, a pre-LLM selection) as a share of the pruned prefill. Also reported:
the analytic prefill FLOPs and the encoder's tokens per block.

    nice python eval/scripts/in_vit_cpu.py --out eval/results/in_vit_cpu --repeats 3 --threads 1
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
from vtprune.engine.session import SESSION_ATTRIBUTE
from vtprune.errors import VTPruneError

K = 64
CONFIGS = [  # (label, method, options)
    ("tome", "tome", {}),
    ("tome r=(43, -1) (paper's decreasing schedule)", "tome", {"r": (43, -1)}),
    ("flowcut", "flowcut", {}),
    ("random (pre-LLM)", "random", {}),
    ("divprune (pre-LLM)", "divprune", {}),
    ("vispruner (pre-LLM)", "vispruner", {}),
    ("hiprune (pre-LLM)", "hiprune", {}),
    ("prumerge (pre-LLM)", "prumerge", {}),
    ("prumerge_plus (pre-LLM)", "prumerge_plus", {}),
    ("cdpruner (pre-LLM)", "cdpruner", {}),
    ("transprune (in-LLM)", "transprune", {}),
    ("mustdrop (pre-LLM, stage 1: 3x3 window merge)", "mustdrop", {}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="eval/results/in_vit_cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--preset", default="llava-cpu-0.5b")
    parser.add_argument("--only", nargs="*", default=None,
                        help="measure only these configuration labels and add them to an existing results file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, processor = build_preset(args.preset)
    inputs = preset_inputs(args.preset, processor)
    out = Path(args.out)
    rows, commands = [], []
    if args.only is not None and out.with_suffix(".json").exists():  # keep the other configurations' rows
        saved = json.loads(out.with_suffix(".json").read_text())
        rows = [r for r in saved["rows"] if r["config"] not in args.only]
        commands = saved["meta"].get("commands", [saved["meta"].get("command")])
    for label, method, options in CONFIGS:
        if args.only is not None and label not in args.only:
            continue
        budget = None if "r" in options else K
        holder = {}

        def install(method=method, options=options, budget=budget):
            vtprune.apply(model, method, budget, **options)

        def uninstall(holder=holder):
            holder["stats"] = vtprune.stats(model).samples[0]
            stage = getattr(model, SESSION_ATTRIBUTE).vit_stage
            lengths = stage.layer_lengths() if stage is not None else None
            holder["vit"] = "all 577" if lengths is None else " ".join(
                str(n if isinstance(n, int) else f"{n[0]}→{n[1]}") for n in lengths[0])
            vtprune.remove(model)

        try:
            paired = measure_paired(model, inputs, install=install, uninstall=uninstall, native_k=K, unpruned=False,
                                    new_tokens=0, warmup=1, repeats=args.repeats)
        except VTPruneError as error:  # e.g. an in-LLM schedule that cannot reach K on this decoder: a row says so
            if vtprune.is_pruned(model):
                vtprune.remove(model)
            rows.append({"config": label, "method": method, "budget": budget, "error": f"{type(error).__name__}: {error}"})
            print(f"{label}: refused: {error}", flush=True)
            continue
        sample = holder["stats"]
        # process CPU time: on a machine shared with other jobs it is far steadier than wall time
        pruned_ms, native_ms = paired.pruned.cpu["prefill"].median, paired.native_cpu.median
        select = paired.pruned.cpu.get("select")
        select_ms = select.median if select is not None else 0.0
        wall_ms, native_wall_ms = paired.pruned.prefill.median, paired.native.median
        rows.append({
            "config": label, "method": method, "options": {k: list(v) if isinstance(v, tuple) else v
                                                           for k, v in options.items()},
            "budget": budget, "visual_tokens": sample.visual_lengths[0], "vit_tokens": holder["vit"], "flops": sample.flops,
            "flops_unpruned": sample.flops_unpruned, "prefill_ms": pruned_ms,
            "prefill_ms_all": paired.pruned.cpu["prefill"].samples, "native_k_ms": native_ms,
            "native_k_ms_all": paired.native_cpu.samples, "prefill_wall_ms": wall_ms, "native_k_wall_ms": native_wall_ms, "native_over_pruned": native_ms / pruned_ms,
            "select_ms": select_ms, "select_pct": 100.0 * select_ms / pruned_ms,
        })
        print(f"{label}: {pruned_ms:.0f} ms vs native-K {native_ms:.0f} ms ({native_ms / pruned_ms:.2f}x), "
              f"select {100.0 * select_ms / pruned_ms:.2f} %, {sample.visual_lengths[0]} visual tokens", flush=True)
    meta = {"preset": args.preset, "K": K, "torch": torch.__version__, "transformers": transformers.__version__,
            "threads": args.threads, "repeats": args.repeats, "machine": platform.processor() or platform.machine(),
            "commands": [*commands, f"nice python eval/scripts/in_vit_cpu.py --out {args.out} --repeats "
                                    f"{args.repeats} --threads {args.threads}"
                                    + (" --only " + " ".join(repr(o) for o in args.only) if args.only else "")]}
    order = [label for label, _, _ in CONFIGS]
    rows.sort(key=lambda r: order.index(r["config"]) if r["config"] in order else len(order))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = ["| configuration | visual tokens to the LLM | ViT tokens per block | prefill GFLOPs | prefill CPU ms (median) "
             "| native-K CPU ms | native-K / pruned | select % of prefill | wall ms pruned / native-K |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['config']} | refused: {r['error']} |||||||")
            continue
        lines.append(f"| {r['config']} | {r['visual_tokens']} | {r['vit_tokens']} | {r['flops'] / 1e9:.1f} "
                     f"| {r['prefill_ms']:.0f} | {r['native_k_ms']:.0f} | {r['native_over_pruned']:.2f}x "
                     f"| {r['select_pct']:.2f} | {r['prefill_wall_ms']:.0f} / {r['native_k_wall_ms']:.0f} |")
    header = (f"# In-ViT vs native-K on `{args.preset}` (K = {K}, random weights, CPU)\n\n"
              f"Commands: {'; '.join(f'`{c}`' for c in meta['commands'])}; torch {torch.__version__}, transformers {transformers.__version__}, "
              f"{args.threads} thread(s), median process CPU time of {args.repeats} interleaved rounds (pruned, then "
              "native-K) after a warm-up round, on a machine shared with other jobs (wall times, inflated by that "
              "load, in the last column). ViT tokens per block: tokens through attention→MLP of each CLIP block "
              "(577 = CLS + 576 patches).\n\n")
    out.with_suffix(".md").write_text(header + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
