"""``vtprune plot``: Pareto plots (PNG, matplotlib) from sweep results.

Per model and task:

* ``synth`` rows (accuracy): accuracy vs prefill FLOPs, vs equivalent visual tokens and vs prefill latency,
  one colour and marker per method, error bars of one binomial standard error, the unpruned model as a star,
  and the Pareto front over all points (no other point is both cheaper and more accurate) as a step line;
* ``latency`` rows (random-weight presets: no accuracy): measured prefill speedup vs the FLOPs-implied
  speedup (with the ``y = x`` and ``y = 0.9 x`` guides of the targets) and prefill latency vs equivalent
  visual tokens, with the native-K prefill of every budget as the physical limit.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .report import summaries

__all__ = ["pareto_front", "plot_rows"]


def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points (cost, quality) not dominated by another with lower-or-equal cost and higher-or-equal quality,
    sorted by cost."""
    best = float("-inf")
    front = []
    for cost, quality in sorted(points, key=lambda p: (p[0], -p[1])):
        if quality > best:
            front.append((cost, quality))
            best = quality
    return front


def _slug(text: str) -> str:
    name = Path(text.split(":", 1)[-1]).name or text
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


_MARKERS = "osD^vP<X>hp8"


def _colors(methods: Sequence[str]) -> dict[str, Any]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if len(methods) <= 10 else "tab20"]
    return {m: cmap(i % cmap.N) for i, m in enumerate(methods)}


def _markers(methods: Sequence[str]) -> dict[str, str]:
    """A marker per method (the unpruned model: a star), so methods differ in shape as well as in colour."""
    pruned = [m for m in methods if m != "none"]
    return {m: "*" if m == "none" else _MARKERS[pruned.index(m) % len(_MARKERS)] for m in methods}


def _scatter_pareto(ax, records, x_key: str, y_key: str, xlabel: str, ylabel: str, colors,
                    label_budgets: bool = False) -> None:
    points = []
    markers = _markers(list(colors))
    for method in colors:
        rows = [r for r in records if r["method"] == method and r.get(x_key) is not None and r.get(y_key) is not None]
        if not rows:
            continue
        xs, ys = [r[x_key] for r in rows], [100 * r[y_key] for r in rows]
        errors = [100 * (r.get(f"{y_key}_stderr") or 0.0) for r in rows]
        marker = markers[method]
        ax.errorbar(xs, ys, yerr=errors if any(errors) else None, color=colors[method], marker=marker,
                    markersize=12 if marker == "*" else 6, linestyle="none", capsize=2, elinewidth=0.8,
                    label="unpruned" if method == "none" else method, zorder=3)
        if label_budgets:
            for r, x, y in zip(rows, xs, ys, strict=True):
                if method != "none":
                    ax.annotate(str(r["budget"]), (x, y), textcoords="offset points", xytext=(4, -9), fontsize=6,
                                color=colors[method])
        points += list(zip(xs, ys, strict=True))
    front = pareto_front(points)
    if len(front) > 1:
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="0.4", linestyle="--",
                linewidth=1, label="Pareto front", zorder=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)


def plot_rows(rows: Sequence[dict[str, Any]], out_dir: str | Path) -> list[Path]:
    """Write the PNGs for ``rows`` into ``out_dir``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = [r for r in summaries(rows) if r.get("status") == "ok"]
    written: list[Path] = []
    for model in dict.fromkeys(r["model"] for r in records):
        for task in dict.fromkeys(r["task"] for r in records if r["model"] == model):
            subset = [r for r in records if r["model"] == model and r["task"] == task]
            methods = list(dict.fromkeys(r["method"] for r in subset))
            colors = _colors(methods)
            if any(r.get("accuracy") is not None for r in subset):
                fig, axes = plt.subplots(1, 3, figsize=(17, 5))
                _scatter_pareto(axes[0], subset, "gflops", "accuracy", "prefill GFLOPs (analytic; labels: budget)",
                                "accuracy (%, ± 1 s.e.)", colors, label_budgets=True)
                _scatter_pareto(axes[1], subset, "equivalent_tokens", "accuracy",
                                "equivalent visual tokens (averaged over decoder layers)", "accuracy (%, ± 1 s.e.)",
                                colors)
                _scatter_pareto(axes[2], subset, "prefill_ms", "accuracy", "prefill latency (ms, median)",
                                "accuracy (%, ± 1 s.e.)", colors)
                axes[2].legend(fontsize=8, loc="lower right")
                fig.suptitle(f"{_slug(model)} - {task}: accuracy vs cost")
                path = out_dir / f"pareto_{_slug(model)}_{task}.png"
            else:
                fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
                ax = axes[0]
                top = 1.0
                for method in methods:
                    for key, filled in (("speedup", True), ("speedup_cpu", False)):
                        pts = [r for r in subset if r["method"] == method and r.get(key) and r.get("flops_speedup")]
                        if not pts:
                            continue
                        ax.scatter([r["flops_speedup"] for r in pts], [r[key] for r in pts], zorder=3,
                                   facecolors=colors[method] if filled else "none", edgecolors=colors[method],
                                   label=method if filled else None)
                        for r in pts:
                            if filled:
                                ax.annotate(str(r["budget"]), (r["flops_speedup"], r[key]), textcoords="offset points",
                                            xytext=(3, 3), fontsize=7)
                        top = max(top, *(r["flops_speedup"] for r in pts), *(r[key] for r in pts))
                ax.scatter([], [], facecolors="none", edgecolors="0.3", label="hollow: process CPU time")
                ax.plot([1, top], [1, top], color="0.3", linewidth=1, label="y = x")
                ax.plot([1, top], [0.9, 0.9 * top], color="0.6", linestyle="--", linewidth=1, label="y = 0.9 x")
                ax.set_xlabel("FLOPs-implied prefill speedup")
                ax.set_ylabel("measured prefill speedup (paired medians; filled: wall time)")
                ax.grid(True, alpha=0.3)
                ax.legend(fontsize=8)
                ax = axes[1]
                # process CPU time where every row has it (CPU runs: independent of the machine's load)
                cpu = all(r.get("prefill_cpu_ms") is not None for r in subset)
                y_key, native_key = ("prefill_cpu_ms", "native_prefill_cpu_ms") if cpu else ("prefill_ms", "native_prefill_ms")
                for method in methods:
                    pts = [r for r in subset if r["method"] == method and r.get(y_key) is not None
                           and r.get("equivalent_tokens") is not None]
                    if pts:
                        ax.scatter([r["equivalent_tokens"] for r in pts], [r[y_key] for r in pts],
                                   color=colors[method], marker="*" if method == "none" else "o",
                                   label="unpruned" if method == "none" else method, zorder=3)
                native = sorted({(r["native_k"], r[native_key]) for r in subset if r.get(native_key) is not None})
                if native:
                    by_k: dict[int, list[float]] = {}
                    for k, ms in native:
                        by_k.setdefault(k, []).append(ms)
                    ks = sorted(by_k)
                    ax.plot(ks, [sorted(by_k[k])[len(by_k[k]) // 2] for k in ks], color="k", marker="x",
                            linestyle=":", label="native-K (physical limit)")
                ax.set_ylabel(f"prefill latency (ms, median{', process CPU time' if cpu else ''})")
                ax.set_xlabel("equivalent visual tokens")
                ax.grid(True, alpha=0.3)
                ax.legend(fontsize=8)
                fig.suptitle(f"{_slug(model)} - {task}: random weights, latency only")
                path = out_dir / f"latency_{_slug(model)}_{task}.png"
            fig.tight_layout()
            fig.savefig(path, dpi=120)
            plt.close(fig)
            written.append(path)
    return written
