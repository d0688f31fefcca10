"""The printed bench summary fits a 100-column terminal; the paper-style table is % of the unpruned accuracy."""

from __future__ import annotations

import io
from pathlib import Path

from rich.console import Console

from vtprune.bench import report
from vtprune.bench.sweep import iter_rows

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "eval" / "results" / "micro-bench" / "results.jsonl"


def _records():
    return report.summaries(iter_rows([COMMITTED]))


def test_compact_table_fits_100_columns(monkeypatch):
    records = _records()
    buffer = io.StringIO()
    monkeypatch.setattr("rich.console.Console", lambda *a, **k: Console(file=buffer, **{**k, "width": 100}))
    report.print_table(records, title="bench")
    lines = buffer.getvalue().splitlines()
    table_lines = [line for line in lines if line[:1] in "┏┃┡│└"]
    assert len(table_lines) >= len([r for r in records if r.get("status") == "ok"])
    assert max(len(line) for line in table_lines) <= 100
    headers, body = report.compact_table(records)
    assert headers == ["model", "method", "budget", "eq. tok", "acc % ± s.e.", "GFLOPs", "prefill ms", "speedup"]
    full = next(row for row in body if row[0] == "micro-llava" and row[1] == "none")
    assert full[4] == "91.4 ± 1.9" and full[-1] == "1.00 F"  # the default run: 210 questions


def test_paper_table_is_percent_of_unpruned():
    records = [
        {"model": "m", "method": "none", "budget": "full", "status": "ok", "accuracy": 0.80},
        {"model": "m", "method": "a", "budget": 0.5, "status": "ok", "accuracy": 0.60},
        {"model": "m", "method": "a", "budget": 0.25, "status": "ok", "accuracy": 0.40},
        {"model": "m", "method": "b", "budget": 0.5, "status": "ok", "accuracy": 0.84},
        {"model": "m", "method": "b", "budget": 0.25, "status": "error", "error": "BudgetError: x"},
    ]
    text = report.paper_markdown(records)
    assert "| method | 50 % | 25 % |" in text
    assert "| a | 75.0 | 50.0 |" in text
    assert "| b | 105.0 | – |" in text
    assert "unpruned: 80.0 %" in text
    assert report.paper_markdown([r for r in records if r["method"] != "none"]) == ""


def test_plot_gives_every_method_its_own_marker_and_colour():
    from vtprune.bench.plot import _colors, _markers

    methods = ["none"] + [f"method{i}" for i in range(10)]
    markers, colors = _markers(methods), _colors(methods)
    assert markers["none"] == "*"
    assert len({markers[m] for m in methods[1:]}) == 10
    assert len({tuple(colors[m]) for m in methods}) == len(methods)
