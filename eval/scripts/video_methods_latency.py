"""The video methods on the CPU-sized LLaVA-OneVision-0.5B preset (random weights), one clip of N frames: per
method and retention, the prefill and per-token decode **process CPU time** (1 thread), the analytic prefill FLOPs,
the FLOPs-implied and the measured prefill speedup over the unpruned model and their ratio (issue 14's target:
measured ≥ 0.9 × implied), the equivalent visual tokens, and the time spent choosing the tokens (the method's
``select``, segmentation and clustering included, and everything the engine adds) as a share of the pruned
prefill. Speed does not depend on weight values; accuracy is never reported here.

    nice python eval/scripts/video_methods_latency.py --frames 16 --rounds 3 --out eval/results/video_methods_cpu

How it measures, for a machine shared with other jobs: ``torch.set_num_threads(1)`` and ``time.process_time``
(CPU time of this process, which other processes' load barely changes, unlike wall time); every round runs the
unpruned model first and again after every ``--full-every`` pruned configurations, and each configuration's
measured speedup in a round is the mean of the unpruned runs just before and after it divided by its own time;
the table gives medians over the rounds. One run = one prefill (``use_cache=True``) then ``--new-tokens`` decode
steps on its cache (one forward of one token each; the decode figure is the median step). The load average of
the machine is recorded at the start, after every round and at the end.

``dycoke`` appears twice: its temporal merging alone (``decode=False``) and with its decode-time KV pruning
(compare their decode columns). A retention a method cannot reach (DyCoke keeps whole frames) is listed with its
refusal, and DyCoke is measured at 0.33 too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import transformers

import vtprune
import vtprune.compat
from vtprune.bench.presets import build_preset, preset_inputs
from vtprune.errors import BudgetError

METHODS = (("holitom", {}), ("fastvid", {}), ("dycoke", {"decode": False}), ("dycoke", {}), ("prunevid", {}),
           ("visionzip_video", {}), ("frames", {}), ("divprune", {}))
BUDGETS = (0.25, 0.1)
#: retentions measured besides ``--budgets`` (DyCoke keeps 5 of 16 frames whole: 0.25 and 0.1 are refused; 0.33 is
#: the nearest it reaches, its 5 whole frames plus a few tokens of the others)
EXTRA = {"dycoke": (0.33,)}


class CpuClock:
    """A session timer (vtprune/engine/timing.py) in process CPU seconds per named section."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def section(self, name: str):
        start = time.process_time()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.process_time() - start


def run_once(model, inputs, new_tokens: int, clock: CpuClock | None = None) -> dict:
    """One prefill and ``new_tokens`` decode steps on its cache, in process CPU seconds (with ``clock``: its
    sections during the prefill too)."""
    mask = inputs["attention_mask"]
    with torch.no_grad():
        start = time.process_time()
        out = model(**inputs, use_cache=True)
        prefill = time.process_time() - start
        sections = dict(clock.seconds) if clock is not None else {}
        stats = vtprune.stats(model).samples[0] if clock is not None else None
        cache = vtprune.compat.output_cache(out)
        token = out.logits[:, -1:].argmax(-1)
        steps = []
        for _ in range(new_tokens):
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            start = time.process_time()
            out = model(input_ids=token, attention_mask=mask, use_cache=True, **vtprune.compat.cache_kwargs(cache))
            steps.append(time.process_time() - start)
            cache = vtprune.compat.output_cache(out)
            token = out.logits[:, -1:].argmax(-1)
    return {"prefill_s": prefill, "decode_s": statistics.median(steps), "select_s": sections.get("select", 0.0),
            "engine_s": sections.get("engine", 0.0), "stats": stats}


def strip(run: dict) -> dict:
    return {k: v for k, v in run.items() if k != "stats"}


def label_of(name: str, options: dict) -> str:
    return name + ("" if not options else "(" + ",".join(f"{k}={v}" for k, v in options.items()) + ")")


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llava-onevision-cpu-0.5b")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--full-every", type=int, default=5, help="pruned configurations between unpruned runs")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--methods", default=",".join(dict.fromkeys(m for m, _ in METHODS)))
    parser.add_argument("--budgets", default=",".join(str(b) for b in BUDGETS))
    parser.add_argument("--out", default="eval/results/video_methods_cpu")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    load_log = {"start": load()}
    model, processor = build_preset(args.preset, dtype=getattr(torch, args.dtype))
    inputs = preset_inputs(args.preset, processor, video_frames=args.frames)
    wanted = args.methods.split(",")
    budgets = [float(b) for b in args.budgets.split(",")]
    cells = [(name, options, budget) for name, options in METHODS if name in wanted
             for budget in budgets + [b for b in EXTRA.get(name, ()) if b not in budgets]]

    with vtprune.pruned(model, "random", budget=1.0), torch.no_grad():  # stats of the unpruned forward
        model(**inputs)
        full_stats = vtprune.stats(model).samples[0]
    info: dict[tuple, dict] = {}              # per cell: FLOPs and equivalent tokens (first round), or the refusal
    full_runs: list[list[dict]] = []          # per round: the unpruned runs in order
    runs: dict[tuple, list[dict]] = {}        # per cell: per round {prefill_s, decode_s, select_s, engine_s, before, after}

    def close_block(r: int, pending: list[dict]) -> None:
        """An unpruned run after the pending configurations of round ``r``: their reference "after"."""
        full_runs[-1].append(strip(run_once(model, inputs, args.new_tokens)))
        for p in pending:
            p["after"] = len(full_runs[-1]) - 1
        print(json.dumps({"round": r, "full": full_runs[-1][-1], "load": load()}), flush=True)

    for r in range(args.rounds):
        full_runs.append([strip(run_once(model, inputs, args.new_tokens))])
        print(json.dumps({"round": r, "full": full_runs[-1][-1], "load": load()}), flush=True)
        pending = []
        runnable = [c for c in cells if "refused" not in info.get((label_of(c[0], c[1]), c[2]), {})]
        for name, options, budget in runnable:
            key = (label_of(name, options), budget)
            with vtprune.pruned(model, name, budget=budget, **options):
                clock = CpuClock()
                model._vtprune_session.timer = clock
                try:
                    timing = run_once(model, inputs, args.new_tokens, clock)
                except BudgetError as error:  # refused before the model ran (DyCoke keeps whole frames)
                    info[key] = {"refused": str(error)}
                    print(json.dumps({"method": key[0], "budget": budget, "refused": str(error)}), flush=True)
                    continue
                finally:
                    model._vtprune_session.timer = None
                if key not in info:
                    smp = timing.pop("stats")
                    info[key] = {"flops": smp.flops, "equivalent_tokens": smp.equivalent_tokens}
                timing.pop("stats", None)
            row = {**timing, "before": len(full_runs[-1]) - 1}
            runs.setdefault(key, []).append(row)
            pending.append(row)
            print(json.dumps({"round": r, "method": key[0], "budget": budget, **row}), flush=True)
            if len(pending) == args.full_every:
                close_block(r, pending)
                pending = []
        if pending:
            close_block(r, pending)
        load_log[f"after round {r}"] = load()
    load_log["end"] = load()

    def reference(r: int, row: dict, field: str) -> float:
        return (full_runs[r][row["before"]][field] + full_runs[r][row["after"]][field]) / 2

    full_prefill = statistics.median(x["prefill_s"] for rnd in full_runs for x in rnd)
    full_decode = statistics.median(x["decode_s"] for rnd in full_runs for x in rnd)
    table = [{"method": "full", "budget": 1.0, "prefill_s": full_prefill, "decode_ms": 1000 * full_decode,
              "gflops": full_stats.flops_unpruned / 1e9, "implied": 1.0, "measured": 1.0, "ratio": 1.0,
              "equivalent_tokens": float(full_stats.visual_in), "decode_vs_full": 1.0, "select_pct": 0.0,
              "engine_pct": 0.0, "rounds": [x["prefill_s"] for rnd in full_runs for x in rnd]}]
    for name, options, budget in cells:
        key = (label_of(name, options), budget)
        if "refused" in info[key]:
            table.append({"method": key[0], "budget": budget, "refused": info[key]["refused"]})
            continue
        rows = runs[key]
        speed = statistics.median(reference(r, row, "prefill_s") / row["prefill_s"] for r, row in enumerate(rows))
        decode_vs = statistics.median(row["decode_s"] / reference(r, row, "decode_s") for r, row in enumerate(rows))
        prefill = statistics.median(row["prefill_s"] for row in rows)
        implied = full_stats.flops_unpruned / info[key]["flops"]
        table.append({"method": key[0], "budget": budget, "prefill_s": prefill,
                      "decode_ms": 1000 * statistics.median(row["decode_s"] for row in rows),
                      "gflops": info[key]["flops"] / 1e9, "implied": implied, "measured": speed,
                      "ratio": speed / implied, "equivalent_tokens": info[key]["equivalent_tokens"],
                      "decode_vs_full": decode_vs,
                      "select_pct": 100 * statistics.median(row["select_s"] / row["prefill_s"] for row in rows),
                      "engine_pct": 100 * statistics.median(row["engine_s"] / row["prefill_s"] for row in rows),
                      "rounds": rows})
    command = "nice python eval/scripts/video_methods_latency.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items())
    meta = {"preset": args.preset, "frames": args.frames, "threads": 1, "clock": "process CPU time",
            "dtype": args.dtype, "rounds": args.rounds, "new_tokens": args.new_tokens, "full_every": args.full_every,
            "torch": torch.__version__, "transformers": transformers.__version__, "vtprune": vtprune.__version__,
            "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "visual_tokens": full_stats.visual_in, "load_average_1_5_15": load_log, "command": command}
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": table, "full_runs": full_runs}, indent=1))
    lines = [f"# Video methods, `{args.preset}`, {args.frames} frames ({full_stats.visual_in} visual tokens), "
             f"CPU, 1 thread, {args.dtype}, random weights", "",
             f"Process CPU time, median of {args.rounds} rounds; each round alternates the unpruned model with the "
             f"pruned configurations (an unpruned run first and after every {args.full_every} configurations; a "
             "configuration's speedup is measured against the mean of the unpruned runs around it). Decode: median "
             f"of {args.new_tokens} single-token steps on the prefill's cache. *select* = the method's own selection "
             "(segmentation and clustering included); *engine* = all the engine adds to the prefill (contains "
             "select). Load average (1/5/15 min) on this shared 2-core machine: "
             + "; ".join(f"{k} {'/'.join(str(x) for x in v)}" for k, v in load_log.items()) + ".", "",
             "| method | retention | prefill CPU s | GFLOPs | FLOPs-implied | measured | measured / implied | "
             "decode ms/token (vs full) | equivalent tokens | select % | engine % |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for t in table:
        if "refused" in t:
            lines.append(f"| {t['method']} | {t['budget']} | – | – | – | – | – | – | – | – | refused: "
                         f"{t['refused']} |")
            continue
        flag = "" if t["ratio"] >= 0.9 else " ✗"
        lines.append(f"| {t['method']} | {t['budget']} | {t['prefill_s']:.2f} | {t['gflops']:.0f} | "
                     f"{t['implied']:.2f}x | {t['measured']:.2f}x | {t['ratio']:.2f}{flag} | "
                     f"{t['decode_ms']:.0f} ({t['decode_vs_full']:.2f}) | {t['equivalent_tokens']:.1f} | "
                     f"{t['select_pct']:.2f} | {t['engine_pct']:.2f} |")
    lines += ["", f"Command: `{command}`"]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
