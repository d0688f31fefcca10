"""Where a prefill's time goes: per component (vision tower, projector, pruning engine, decoder, LM head) and
per operator, for the unpruned model, pruned configurations and native-K, on a preset (random weights).

Explains the benchmark's target misses: it shows whether a pruned prefill loses time in the engine, in
the method's selection, or in the model itself running less efficiently on a shorter sequence.

    python eval/scripts/profile_prefill.py --preset llava-cpu-0.5b --threads 1 --repeats 5 \\
        --config divprune:64 --config fastv:64 --native 64 > eval/results/cpu-llava-0.5b/profile.md

Component times come from forward pre/post hooks (CPU, one thread: the hooks see the real elapsed time;
process CPU time is reported); medians of ``--repeats`` runs after one warm-up, configurations interleaved.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import torch

import vtprune
from vtprune.bench import flops as F
from vtprune.bench.latency import native_k_prefill
from vtprune.bench.presets import build_preset, load_preset, preset_inputs
from vtprune.engine.session import SESSION_ATTRIBUTE

_MATMUL = {"aten::addmm", "aten::mm", "aten::bmm", "aten::matmul", "aten::linear", "aten::mkldnn_convolution",
           "aten::convolution", "aten::_convolution"}
_ATTENTION = {"aten::_scaled_dot_product_flash_attention_for_cpu", "aten::scaled_dot_product_attention",
              "aten::_scaled_dot_product_attention_math"}


class ComponentClock:
    """CPU time spent inside each hooked module (outermost call only)."""

    def __init__(self, modules: dict[str, torch.nn.Module]):
        self.totals: dict[str, float] = defaultdict(float)
        self._start: dict[str, float] = {}
        self._handles = []
        for name, module in modules.items():
            self._handles.append(module.register_forward_pre_hook(lambda m, a, n=name: self._enter(n)))
            self._handles.append(module.register_forward_hook(lambda m, a, o, n=name: self._exit(n)))

    def _enter(self, name):
        self._start[name] = time.process_time()

    def _exit(self, name):
        self.totals[name] += (time.process_time() - self._start.pop(name)) * 1000

    def reset(self):
        self.totals = defaultdict(float)

    def remove(self):
        for handle in self._handles:
            handle.remove()


class EngineClock:
    """Engine timer (vtprune.engine.timing) in process CPU time."""

    def __init__(self):
        self.totals: dict[str, float] = defaultdict(float)

    def section(self, name):
        clock = self

        class _Section:
            def __enter__(self):
                self.start = time.process_time()

            def __exit__(self, *exc):
                clock.totals[name] += (time.process_time() - self.start) * 1000

        return _Section()


def op_categories(fn) -> dict[str, float]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    out: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        ms = event.self_cpu_time_total / 1000
        if event.key in _MATMUL:
            out["matmul"] += ms
        elif event.key in _ATTENTION:
            out["attention"] += ms
        else:
            out["other ops"] += ms
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llava-cpu-0.5b")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--config", action="append", default=[], help="METHOD:BUDGET, repeatable")
    parser.add_argument("--native", type=int, action="append", default=[], help="native-K token count, repeatable")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    preset = load_preset(args.preset)
    model, processor = build_preset(preset)
    inputs = preset_inputs(preset, processor, dtype=getattr(torch, preset.dtype))
    core = model.model
    components = {"vision tower": core.vision_tower, "projector": core.multi_modal_projector,
                  "decoder": core.language_model, "LM head": model.lm_head}
    clock = ComponentClock(components)

    configs = [("unpruned", None, None)] + [("pruned", *c.split(":")) for c in args.config] + \
              [("native", None, k) for k in args.native]
    runs: dict[str, dict[str, list[float]]] = {}
    flops: dict[str, object] = {}
    ops: dict[str, dict[str, float]] = {}

    def label(kind, method, budget):
        return {"unpruned": "unpruned", "pruned": f"{method} @ {budget}", "native": f"native-{budget}"}[kind]

    def run_once(kind, method, budget, record):
        engine = EngineClock()
        if kind == "pruned":
            vtprune.apply(model, method, budget=int(budget))
            getattr(model, SESSION_ATTRIBUTE).timer = engine
        try:
            clock.reset()
            start_cpu, start_wall = time.process_time(), time.perf_counter()
            if kind == "native":
                native_k_prefill(model, inputs, int(budget))()
            else:
                with torch.inference_mode():
                    model(**inputs, use_cache=True, logits_to_keep=1)
            total_cpu = (time.process_time() - start_cpu) * 1000
            wall = (time.perf_counter() - start_wall) * 1000
            if kind == "pruned":
                stats = vtprune.stats(model).samples[0]
                flops[label(kind, method, budget)] = stats
        finally:
            if kind == "pruned":
                vtprune.remove(model)
        if record:
            entry = runs.setdefault(label(kind, method, budget), defaultdict(list))
            parts = dict(clock.totals)
            parts["engine (pruning)"] = engine.totals.get("engine", 0.0)
            parts["  of which selection"] = engine.totals.get("select", 0.0)
            # the engine runs inside the decoder's pre-hook (pre-LLM) or its layers (in-LLM)
            parts["decoder"] = parts.get("decoder", 0.0) - parts["engine (pruning)"]
            parts["total (CPU)"] = total_cpu
            parts["total (wall)"] = wall
            for key, value in parts.items():
                entry[key].append(value)

    for round_index in range(args.repeats + 1):
        for config in configs:
            run_once(*config, record=round_index > 0)
    for kind, method, budget in configs:
        name = label(kind, method, budget)

        def fn(kind=kind, method=method, budget=budget):
            run_once(kind, method, budget, record=False)

        ops[name] = op_categories(fn)
    clock.remove()

    text = model.config.text_config
    seq = inputs["input_ids"].shape[1]
    visual = int((inputs["input_ids"] == model.config.image_token_id).sum())
    layers = text.num_hidden_layers
    vision = F.vision_flops(model.config, 1)
    projector = F.projector_flops(model.config, visual)

    def llm_gflops(name):
        if name == "unpruned":
            return F.llm_prefill_flops(text, [seq] * layers) / 1e9
        if name.startswith("native-"):
            k = int(name.split("-")[1])
            return F.llm_prefill_flops(text, [seq - visual + k] * layers) / 1e9
        return F.llm_prefill_flops(text, flops[name].layer_lengths) / 1e9

    names = list(runs)
    keys = ["vision tower", "projector", "engine (pruning)", "  of which selection", "decoder", "LM head",
            "total (CPU)", "total (wall)"]
    print(f"# Prefill profile: {preset.name} ({preset.dtype}, {args.threads} thread(s), {seq} tokens, {visual} visual)\n")
    print(f"Command: `python eval/scripts/profile_prefill.py --preset {args.preset} --threads {args.threads} "
          f"--repeats {args.repeats} " + " ".join(f"--config {c}" for c in args.config) + " " +
          " ".join(f"--native {k}" for k in args.native) + "`\n")
    print("Median milliseconds of process CPU time per component (wall for the last row):\n")
    print("| component | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for key in keys:
        cells = [f"{statistics.median(runs[n][key]):.1f}" if runs[n].get(key) else "" for n in names]
        print(f"| {key} | " + " | ".join(cells) + " |")
    gf = [llm_gflops(n) for n in names]
    print("| decoder GFLOPs (analytic) | " + " | ".join(f"{g:.1f}" for g in gf) + " |")
    rates = [g / (statistics.median(runs[n]["decoder"]) / 1000) for n, g in zip(names, gf, strict=True)]
    print("| decoder GFLOP/s | " + " | ".join(f"{r:.0f}" for r in rates) + " |")
    vrate = (vision + projector) / 1e9 / (statistics.median(runs["unpruned"]["vision tower"]) / 1000)
    print(f"\nVision tower + projector: {(vision + projector) / 1e9:.1f} GFLOPs in every configuration "
          f"({vrate:.0f} GFLOP/s unpruned).\n")
    print("Operator self CPU time under torch.profiler (one run each; includes the profiler's overhead, so "
          "compare columns, not absolute values; ms):\n")
    cats = ["matmul", "attention", "other ops"]
    print("| operators | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for cat in cats:
        print(f"| {cat} | " + " | ".join(f"{ops[n].get(cat, 0.0):.1f}" for n in names) + " |")


if __name__ == "__main__":
    main()
