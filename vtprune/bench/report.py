"""Tables from sweep rows: one summary record per row, written as CSV or Markdown, printed with rich.

Derived columns (all from the row itself, never from another run):

``speedup``         unpruned prefill / pruned prefill (medians of the interleaved rounds of the same cell)
``flops_speedup``   FLOPs-implied speedup = unpruned prefill FLOPs / pruned prefill FLOPs
``efficiency``      speedup / flops_speedup (1.0 = the wall clock follows the FLOPs)
``vs_native``       pruned prefill / native-K prefill (pre-LLM methods; 1.0 = the physical limit)
``select_pct``      the method's selection as % of the pruned prefill
``decode_ratio``    pruned / unpruned per-token decode
``*_cpu``           the same ratios from process CPU time instead of wall time (CPU runs): on a shared machine
                    the wall time of a one-thread run grows whenever another process holds the core, its CPU
                    time does not, so the CPU-time ratios are the load-independent ones
``kv_ratio``        pruned / unpruned KV-cache bytes; ``kv_expected`` = the cache a dense KV of the kept tokens
                    would hold, so measured == expected means the cache is exactly proportional to the kept tokens
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from typing import Any

__all__ = ["summarize", "summaries", "to_csv", "to_markdown", "print_table", "accuracy_spread", "spread_markdown",
           "SKILL_ORDER"]

SKILL_ORDER = ("attribute", "existence", "counting", "spatial", "ocr", "fine_detail",
               # task synth_video (vtprune.synth.video.VIDEO_SKILLS)
               "static_attribute", "appearance", "brief_ocr", "motion", "temporal_order", "color_change")


def _median(block: Any) -> float | None:
    if isinstance(block, dict) and block.get("median") is not None:
        return float(block["median"])
    return None


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _method_label(row: dict[str, Any]) -> str:
    """The method, with the options the sweep set for it (``fastv(layer=1)``), so that the rows of an option
    grid stay apart in the tables."""
    given = ((row.get("bench") or {}).get("method_options") or {})
    parts = row["method"].split("+")
    labels = []
    for part in parts:
        options = given.get(part) or {}
        labels.append(part + ("(" + ",".join(f"{k}={v}" for k, v in sorted(options.items())) + ")" if options else ""))
    return "+".join(labels)


def summarize(row: dict[str, Any]) -> dict[str, Any]:
    """Flat record of one row (numbers, not formatted)."""
    latency = row.get("latency") or {}
    unpruned = row.get("unpruned_latency") or {}
    env = row.get("env") or {}
    prefill = _median(latency.get("prefill_ms"))
    ref_prefill = _median(unpruned.get("prefill_ms"))
    decode = _median(latency.get("decode_ms"))
    ref_decode = _median(unpruned.get("decode_ms"))
    select = _median(latency.get("select_ms"))
    native = _median(row.get("native_prefill_ms"))
    flops, flops_full = row.get("flops"), row.get("flops_unpruned")
    kv = latency.get("kv_cache_bytes")
    kv_ref = unpruned.get("kv_cache_bytes") or row.get("kv_cache_bytes_unpruned")
    speedup = _ratio(ref_prefill, prefill)
    flops_speedup = _ratio(flops_full, flops)
    prefill_cpu = _median(latency.get("prefill_cpu_ms"))
    select_cpu = _median(latency.get("select_cpu_ms"))
    speedup_cpu = _ratio(_median(unpruned.get("prefill_cpu_ms")), prefill_cpu)
    record = {
        "model": row["model"], "method": _method_label(row),
        "budget": "full" if row["budget"] is None else row["budget"],
        "task": row["task"], "status": row.get("status"), "stage": row.get("stage"),
        "video_frames": (row.get("bench") or {}).get("video_frames"),
        "visual_tokens": row.get("visual_tokens"), "equivalent_tokens": row.get("equivalent_tokens"),
        "gflops": None if flops is None else flops / 1e9,
        "accuracy": row.get("accuracy"), "accuracy_stderr": row.get("accuracy_stderr"),
        "accuracy_n": row.get("accuracy_n"),
        "prefill_ms": prefill,
        "prefill_p25": (latency.get("prefill_ms") or {}).get("p25"),
        "prefill_p75": (latency.get("prefill_ms") or {}).get("p75"),
        "unpruned_prefill_ms": ref_prefill, "speedup": speedup, "flops_speedup": flops_speedup,
        "efficiency": _ratio(speedup, flops_speedup),
        "native_k": row.get("native_k"), "native_prefill_ms": native, "vs_native": _ratio(prefill, native),
        "select_ms": select, "select_pct": None if _ratio(select, prefill) is None else 100 * select / prefill,
        "engine_ms": _median(latency.get("engine_ms")),
        "ttft_ms": _median(latency.get("ttft_ms")),
        "decode_ms": decode, "unpruned_decode_ms": ref_decode, "decode_ratio": _ratio(decode, ref_decode),
        "e2e_ms": _median(latency.get("e2e_ms")), "new_tokens": latency.get("new_tokens"),
        "prefill_cpu_ms": prefill_cpu, "speedup_cpu": speedup_cpu, "efficiency_cpu": _ratio(speedup_cpu, flops_speedup),
        "native_prefill_cpu_ms": _median(row.get("native_prefill_cpu_ms")),
        "vs_native_cpu": _ratio(prefill_cpu, _median(row.get("native_prefill_cpu_ms"))),
        "select_pct_cpu": None if _ratio(select_cpu, prefill_cpu) is None else 100 * select_cpu / prefill_cpu,
        "decode_ratio_cpu": _ratio(_median(latency.get("decode_cpu_ms")), _median(unpruned.get("decode_cpu_ms"))),
        "kv_mib": None if kv is None else kv / 2**20, "kv_ratio": _ratio(kv, kv_ref),
        "kv_expected_mib": None if row.get("kv_cache_bytes_expected") is None else row["kv_cache_bytes_expected"] / 2**20,
        "peak_mib": None if not row.get("memory") else row["memory"]["delta_bytes"] / 2**20,
        "tensor_peak_mib": None if not (row.get("memory") or {}).get("tensor_peak_bytes") else
        row["memory"]["tensor_peak_bytes"] / 2**20,
        "threads": env.get("threads"), "load": None if not env.get("loadavg") else env["loadavg"][0],
        "error": row.get("error"),
    }
    for skill, value in (row.get("accuracy_per_skill") or {}).items():
        record[f"acc_{skill}"] = value
    return record


def summaries(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per row, grouped by model (first appearance) and task; within a group the unpruned record
    first, then methods by name, budgets from the largest (rows of parallel workers arrive interleaved)."""
    records = [summarize(row) for row in rows]
    first_seen: dict[tuple[str, str], int] = {}
    for i, r in enumerate(records):
        first_seen.setdefault((r["model"], r["task"]), i)
    return sorted(records, key=lambda r: (first_seen[(r["model"], r["task"])], r["method"] != "none", r["method"],
                                          -_budget_order(r["budget"])))


def _columns(records: Sequence[dict[str, Any]], task: str | None) -> list[tuple[str, str, str]]:
    """(key, header, format) of the columns that have data."""
    skills = [s for s in SKILL_ORDER if any(f"acc_{s}" in r for r in records)]
    skills += sorted({k[4:] for r in records for k in r if k.startswith("acc_")} - set(skills))
    columns = [("model", "model", "model"), ("video_frames", "video frames", "s"), ("method", "method", "s"),
               ("budget", "budget", "s"), ("equivalent_tokens", "eq. tokens", ".1f"), ("gflops", "prefill GFLOPs", ".4g")]
    if any(r.get("accuracy") is not None for r in records):
        columns += [("accuracy", "acc %", "pct"), ("accuracy_stderr", "± (s.e.)", "pct")]
        columns += [(f"acc_{s}", s, "pct") for s in skills]
    columns += [("prefill_ms", "prefill ms", ".1f"), ("flops_speedup", "FLOPs speedup", ".2f"),
                ("speedup", "speedup", ".2f"), ("efficiency", "speedup/FLOPs", ".2f"),
                ("native_prefill_ms", "native-K ms", ".1f"), ("vs_native", "pruned/native", ".3f"),
                ("select_ms", "select ms", ".2f"), ("select_pct", "select %", ".2f"),
                ("decode_ms", "decode ms/tok", ".1f"), ("decode_ratio", "decode ratio", ".3f"),
                ("prefill_cpu_ms", "prefill CPU ms", ".1f"), ("efficiency_cpu", "speedup/FLOPs (CPU)", ".2f"),
                ("vs_native_cpu", "pruned/native (CPU)", ".3f"), ("select_pct_cpu", "select % (CPU)", ".2f"),
                ("decode_ratio_cpu", "decode ratio (CPU)", ".3f"),
                ("kv_mib", "KV MiB", ".2f"), ("kv_expected_mib", "KV expected MiB", ".2f"),
                ("kv_ratio", "KV ratio", ".3f"), ("peak_mib", "peak MiB", ".0f"), ("tensor_peak_mib", "tensor peak MiB", ".0f"), ("load", "load", ".2f")]
    if any(r.get("video_frames") is not None for r in records):  # video rows: the clip's visual tokens too
        columns.insert(4, ("visual_tokens", "visual tokens", "s"))
    return [c for c in columns if c[0] in ("model", "method", "budget") or any(r.get(c[0]) is not None for r in records)]


def _short_model(spec: str) -> str:
    """``preset:NAME`` -> ``NAME``; a directory path -> its last component."""
    if spec.startswith("preset:"):
        return spec[len("preset:"):]
    return spec.rstrip("/").rsplit("/", 1)[-1] if "/" in spec else spec


def _fmt(value: Any, fmt: str) -> str:
    if value is None:
        return ""
    if fmt == "model":
        return _short_model(str(value))
    if fmt == "s":
        return str(value)
    if fmt == "pct":
        return f"{100 * value:.1f}"
    return format(value, fmt)


def _table(records: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    ok = [r for r in records if r.get("status") == "ok"]
    columns = _columns(ok, None)
    body = [[_fmt(r.get(key), fmt) for key, _, fmt in columns] for r in ok]
    return [header for _, header, _ in columns], body


def _errors(records: Sequence[dict[str, Any]]) -> list[str]:
    """One line per cell that did not run: refusals ("error") by their message, crashes (bugs) marked CRASH."""
    return [f"{_short_model(r['model'])} {r['method']} @ {r['budget']}: "
            f"{'CRASH (a bug; traceback in results.jsonl) ' if r.get('status') == 'crash' else ''}{r.get('error')}"
            for r in records if r.get("status") != "ok"]


def to_csv(records: Sequence[dict[str, Any]]) -> str:
    """Every field of every record (unformatted numbers)."""
    keys: list[str] = []
    for r in records:
        keys.extend(k for k in r if k not in keys)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=keys)
    writer.writeheader()
    for r in records:
        writer.writerow({k: r.get(k) for k in keys})
    return buffer.getvalue()


def to_markdown(records: Sequence[dict[str, Any]]) -> str:
    """One table (records of several tasks: one table per task, under a heading, each with its own skill
    columns), then the cells that did not run."""
    tasks = list(dict.fromkeys(r["task"] for r in records if r.get("status") == "ok")) or [None]
    lines: list[str] = []
    for task in tasks:
        headers, body = _table([r for r in records if task is None or r["task"] == task])
        if len(tasks) > 1:
            lines += [f"### task {task}", ""]
        lines += ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in line) + " |" for line in body]
        if len(tasks) > 1:
            lines.append("")
    errors = _errors(records)
    if errors:
        lines += ["", "Cells that did not run:", ""] + [f"- {e}" for e in errors]
    return "\n".join(lines) + "\n"


def compact_table(records: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """The printed summary: model, method, budget, equivalent tokens, accuracy ± s.e., prefill GFLOPs, prefill
    ms and speedup (measured where latency was timed, else the FLOPs ratio, marked "F"). Fits 100 columns; every
    other column is in the markdown / CSV files."""
    ok = [r for r in records if r.get("status") == "ok"]
    has_acc = any(r.get("accuracy") is not None for r in ok)
    has_ms = any(r.get("prefill_ms") is not None for r in ok)
    headers = ["model", "method", "budget", "eq. tok", *(["acc % ± s.e."] if has_acc else []), "GFLOPs",
               *(["prefill ms"] if has_ms else []), "speedup"]
    body = []
    for r in ok:
        acc = f"{100 * r['accuracy']:.1f} ± {100 * (r.get('accuracy_stderr') or 0):.1f}" \
            if r.get("accuracy") is not None else ""
        measured = r.get("speedup")
        speedup = f"{measured:.2f}" if measured is not None else (
            f"{r['flops_speedup']:.2f} F" if r.get("flops_speedup") is not None else "")
        frames = f" ({r['video_frames']} frames)" if r.get("video_frames") is not None else ""
        body.append([_short_model(r["model"]) + frames, r["method"], str(r["budget"]), _fmt(r.get("equivalent_tokens"), ".1f"),
                     *([acc] if has_acc else []), _fmt(r.get("gflops"), ".3f"),
                     *([_fmt(r.get("prefill_ms"), ".1f")] if has_ms else []), speedup])
    return headers, body


def paper_markdown(records: Sequence[dict[str, Any]]) -> str:
    """Methods x budgets per model, accuracy as % of the unpruned model's (how papers print it); empty when no
    record has accuracy or a model has no unpruned row."""
    ok = [r for r in records if r.get("status") == "ok" and r.get("accuracy") is not None]
    out = []
    for model in dict.fromkeys(r["model"] for r in ok):
        rows = [r for r in ok if r["model"] == model]
        full = next((r["accuracy"] for r in rows if r["method"] == "none"), None)
        if not full:
            continue
        budgets = sorted({r["budget"] for r in rows if r["method"] != "none"}, key=_budget_order, reverse=True)
        cells = {(r["method"], r["budget"]): r for r in rows}
        lines = [f"**{_short_model(model)}** (unpruned: {100 * full:.1f} % = 100)", "",
                 "| method | " + " | ".join(_budget_label(b) for b in budgets) + " |",
                 "|---|" + "---|" * len(budgets)]
        for method in sorted({r["method"] for r in rows} - {"none"}):
            values = [f"{100 * cells[(method, b)]['accuracy'] / full:.1f}" if (method, b) in cells else "–"
                      for b in budgets]
            lines.append(f"| {method} | " + " | ".join(values) + " |")
        out.append("\n".join(lines))
    if not out:
        return ""
    return ("Accuracy as % of the unpruned model's (– : not run, see the reasons under the main table).\n\n"
            + "\n\n".join(out) + "\n")


def _budget_label(budget: Any) -> str:
    value = _budget_order(budget)
    return f"{100 * value:g} %" if isinstance(budget, float) or (0 < value < 1) else str(budget)


def print_table(records: Sequence[dict[str, Any]], title: str | None = None, full: bool = False) -> None:
    """The compact summary (:func:`compact_table`), or every column with ``full=True``; then the cells that
    did not run, with their reasons."""
    from rich.console import Console
    from rich.table import Table

    headers, body = _table(records) if full else compact_table(records)
    caption = None if full else ("speedup: measured prefill speedup vs the unpruned model; 'F': from prefill "
                                 "FLOPs (no unpruned timing in this run). Every column: the .md/.csv files.")
    table = Table(title=title, caption=caption, show_lines=False)
    for header in headers:
        table.add_column(header, justify="left" if header in ("model", "method") else "right")
    for line in body:
        table.add_row(*line)
    # the compact table is laid out for 100 columns; in a narrower terminal rich wraps it
    console = Console(width=max(160, 12 * len(headers))) if full else (
        Console() if Console().is_terminal else Console(width=100))
    console.print(table)
    for error in _errors(records):
        console.print(f"[yellow]not run[/]: {error}")


# ------------------------------------------------------------------------------------------ discrimination


def accuracy_spread(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per model and pruned budget: the most and the least accurate method and the spread between them in
    accuracy points -- whether the task tells methods apart at that budget."""
    groups: dict[tuple[str, Any], list[dict[str, Any]]] = {}
    for r in records:
        if r.get("status") == "ok" and r.get("accuracy") is not None and r["budget"] != "full":
            groups.setdefault((r["model"], r["budget"]), []).append(r)
    spreads = []
    for (model, budget), group in sorted(groups.items(), key=lambda item: (item[0][0], -_budget_order(item[0][1]))):
        best = max(group, key=lambda r: r["accuracy"])
        worst = min(group, key=lambda r: r["accuracy"])
        spreads.append({
            "model": model, "model_name": _short_model(model), "budget": budget, "methods": len(group),
            "n": best.get("accuracy_n"),
            "best": best["method"], "best_accuracy": best["accuracy"],
            "worst": worst["method"], "worst_accuracy": worst["accuracy"],
            "spread_points": 100 * (best["accuracy"] - worst["accuracy"]),
        })
    return spreads


def _budget_order(budget: Any) -> float:
    """Sort key of a budget within one model: fractions and token counts by size, "full" above all."""
    try:
        return float(budget)
    except (TypeError, ValueError):
        return float("inf")


def spread_markdown(spreads: Sequence[dict[str, Any]]) -> str:
    lines = ["| model | budget | methods run | best | worst | spread (points) | questions |", "|---|---|---|---|---|---|---|"]
    for s in spreads:
        lines.append(f"| {s['model_name']} | {s['budget']} | {s['methods']} | {s['best']} "
                     f"{100 * s['best_accuracy']:.1f} | {s['worst']} {100 * s['worst_accuracy']:.1f} | "
                     f"{s['spread_points']:.1f} | {s['n']} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ targets

#: the benchmark targets of the latency protocol (the budget they apply to: 64 equivalent tokens)
TARGETS = {
    "pruned_vs_native": 1.05,      # pre-LLM: pruned prefill <= 1.05 x native-K prefill
    "select_pct": 2.0,             # selection <= 2% of the pruned prefill
    "efficiency_pre": 0.90,        # measured speedup >= 0.9 x FLOPs-implied (pre-LLM)
    "efficiency_in": 0.85,         # ... >= 0.85 x (in-LLM)
    "decode_ratio": 1.0,           # pruned decode per token <= unpruned
}


def check_targets(records: Sequence[dict[str, Any]], budget: Any = 64, clock: str = "cpu") -> list[dict[str, Any]]:
    """Pass/fail of every target for the ``latency`` records at ``budget``.

    ``clock="cpu"`` judges the timing targets on process CPU time (load-independent, CPU runs), ``"wall"``
    on wall time. KV: the measured cache must equal the dense cache of the kept tokens (proportional).
    """
    suffix = "_cpu" if clock == "cpu" else ""
    out = []
    for r in records:
        if r.get("task") != "latency" or r.get("status") != "ok" or r.get("method") == "none" or r["budget"] != budget:
            continue
        stage = r.get("stage")
        checks: dict[str, tuple[Any, bool | None]] = {}
        vs_native = r.get(f"vs_native{suffix}") if stage == "pre-llm" else None
        checks["pruned/native <= 1.05 (pre-LLM)"] = (
            vs_native, None if vs_native is None else vs_native <= TARGETS["pruned_vs_native"])
        select = r.get(f"select_pct{suffix}")
        checks["select % <= 2"] = (select, None if select is None else select <= TARGETS["select_pct"])
        eff = r.get(f"efficiency{suffix}")
        bound = TARGETS["efficiency_pre" if stage == "pre-llm" else "efficiency_in"]
        checks["speedup / FLOPs-implied >= 0.9 (pre) / 0.85 (in)"] = (eff, None if eff is None else eff >= bound)
        decode = r.get(f"decode_ratio{suffix}")
        checks["decode pruned/unpruned <= 1"] = (decode, None if decode is None else decode <= TARGETS["decode_ratio"])
        kv, expected, kv_ratio = r.get("kv_mib"), r.get("kv_expected_mib"), r.get("kv_ratio")
        checks["KV = dense cache of kept tokens (ratio to unpruned)"] = (
            kv_ratio, None if kv is None or expected is None else abs(kv - expected) < 1e-9)
        out.append({"model": r["model"], "method": r["method"], "budget": r["budget"], "stage": stage,
                    "checks": checks})
    return out


def targets_markdown(results: Sequence[dict[str, Any]]) -> str:
    if not results:
        return ""
    names = list(dict.fromkeys(name for r in results for name in r["checks"]))
    lines = ["| method | stage | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for r in results:
        cells = []
        for name in names:
            value, ok = r["checks"].get(name, (None, None))
            if ok is None:
                cells.append("n/a")
                continue
            shown = f"{value:.3f}" if isinstance(value, float) else str(value)
            cells.append(f"{shown} {'pass' if ok else '**MISS**'}")
        lines.append(f"| {r['method']} | {r['stage']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
