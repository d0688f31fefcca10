"""Sweeps: cells, the crash-safe results file, resume after a kill, tables and plots."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import vtprune
from vtprune.bench import report
from vtprune.bench.plot import pareto_front, plot_rows
from vtprune.bench.sweep import (
    Cell,
    ResultsFile,
    SweepOptions,
    load_for_bench,
    parse_budget,
    plan_cells,
    run_sweep,
)
from vtprune.errors import VTPruneError

REPO = Path(__file__).resolve().parents[1]
FAST = SweepOptions(limit=6, batch_size=6, repeats=1, warmup=0, new_tokens=2, threads=1)


def test_parse_budget():
    assert parse_budget("full") is None and parse_budget("64") == 64 and parse_budget("0.25") == 0.25
    with pytest.raises(VTPruneError):
        parse_budget("lots")


def test_plan_cells_unpruned_first_no_duplicates():
    cells = plan_cells(["m"], ["a", "b"], ["full", "64", "64", "0.5"], ["latency"])
    assert cells[0] == Cell("m", "none", None, "latency")
    assert [(c.method, c.budget) for c in cells[1:]] == [("a", 64), ("a", 0.5), ("b", 64), ("b", 0.5)]
    with pytest.raises(VTPruneError, match="unknown task"):
        plan_cells(["m"], ["a"], ["64"], ["mmmu"])


def test_results_file_reads_past_a_torn_last_line_and_only_repair_cuts_it(tmp_path):
    path = tmp_path / "r.jsonl"
    results = ResultsFile(path)
    results.append({"model": "m", "method": "a", "budget": 1, "task": "latency"})
    with open(path, "a") as handle:
        handle.write('{"model": "m", "method": "b", "bud')  # killed mid-write
    before = path.read_bytes()
    assert [r["method"] for r in results.load()] == ["a"]
    assert path.read_bytes() == before and results.torn_bytes == len('{"model": "m", "method": "b", "bud')
    torn = results.torn_bytes
    assert results.repair() == torn and results.torn_bytes == 0
    assert path.read_text().endswith("}\n")  # the writer cut the torn tail: appends start on a fresh line
    results.append({"model": "m", "method": "b", "budget": 1, "task": "latency"})
    assert [r["method"] for r in results.load()] == ["a", "b"]


def test_results_file_refuses_corruption_in_the_middle(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"model": "m", "method": "a", "budget": 1, "task": "t"}\nnot json\n{"model": "m"}\n')
    with pytest.raises(VTPruneError, match="corrupted"):
        ResultsFile(path).load()


def test_latency_sweep_rows_and_resume(tmp_path):
    out = tmp_path / "r.jsonl"
    cells = plan_cells(["tiny:llava"], ["divprune", "fastv"], ["full", "0.5"], ["latency"])
    rows = run_sweep(cells, out, FAST, progress=False)
    assert [(r["method"], r["budget"]) for r in rows] == [("none", None), ("divprune", 0.5), ("fastv", 0.5)]
    assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows]
    full, divprune, fastv = rows
    env = divprune["env"]
    for key in ("vtprune", "git_commit", "torch", "transformers", "device", "dtype", "threads", "loadavg"):
        assert key in env
    assert env["threads"] == 1 and env["dtype"] == "float32"
    assert divprune["options"] == vtprune.registry.build_method("divprune", budget=0.5).describe()
    assert divprune["native_k"] == divprune["visual_lengths"][0] == 32
    assert divprune["native_prefill_ms"]["n"] == 1 and fastv["native_prefill_ms"] is None  # native-K: pre-LLM only
    assert divprune["flops"] < divprune["flops_unpruned"] == full["flops_unpruned"]
    assert divprune["latency"]["kv_cache_bytes"] == divprune["kv_cache_bytes_expected"]
    assert divprune["latency"]["kv_cache_bytes"] < divprune["unpruned_latency"]["kv_cache_bytes"]
    # resume: nothing left to do, nothing duplicated
    lines_before = out.read_text().count("\n")
    again = run_sweep(cells, out, FAST, progress=False)
    assert out.read_text().count("\n") == lines_before and len(again) == 3
    # a larger sweep only runs the new cells
    more = plan_cells(["tiny:llava"], ["divprune", "random"], ["full", "0.5"], ["latency"])
    rows = run_sweep(more, out, FAST, progress=False)
    assert out.read_text().count("\n") == 4 and {r["method"] for r in rows} == {"none", "divprune", "random"}
    records = report.summaries(rows)
    markdown = report.to_markdown(records)
    assert "pruned/native" in markdown and "divprune" in markdown
    assert report.to_csv(records).splitlines()[0].startswith("model,method,budget")


def test_unreachable_budget_is_recorded_not_raised(tmp_path):
    rows = run_sweep([Cell("tiny:llava", "fastv", 4, "latency")], tmp_path / "r.jsonl", FAST, progress=False)
    assert rows[0]["status"] == "error" and "BudgetError" in rows[0]["error"]
    assert not vtprune.is_pruned(load_for_bench("tiny:llava", FAST).model)  # pruning removed after the error


def test_accuracy_is_refused_for_random_weights(tmp_path):
    rows = run_sweep([Cell("tiny:llava", "none", None, "synth")], tmp_path / "r.jsonl", FAST, progress=False)
    assert rows[0]["status"] == "error" and "random weights" in rows[0]["error"]
    assert "accuracy" not in rows[0]


def test_synth_sweep_reports_accuracy_per_skill_and_plots(tmp_path, saved_tiny_llava):
    cells = plan_cells([saved_tiny_llava], ["divprune", "fastv"], ["full", "0.5"], ["synth"])
    rows = run_sweep(cells, tmp_path / "r.jsonl", FAST, progress=False)
    assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows]
    for row in rows:
        assert row["accuracy_n"] == 6 and 0.0 <= row["accuracy"] <= 1.0
        assert set(row["accuracy_per_skill"]) == {"attribute", "existence", "counting", "spatial", "ocr",
                                                  "fine_detail"}
        assert row["equivalent_tokens"] > 0 and row["flops"] > 0 and row["latency"]["prefill_ms"]["n"] == 1
    assert rows[1]["equivalent_tokens"] < rows[0]["equivalent_tokens"]
    latency_rows = run_sweep(plan_cells(["tiny:llava"], ["divprune"], ["full", "0.5"], ["latency"]),
                             tmp_path / "l.jsonl", FAST, progress=False)
    paths = plot_rows(rows + latency_rows, tmp_path / "plots")
    assert sorted(p.name.split("_")[0] for p in paths) == ["latency", "pareto"]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


#: row fields that do not depend on timing, the machine's load or the runner
DETERMINISTIC = ("model", "method", "budget", "task", "status", "error", "options", "stage", "equivalent_tokens",
                 "visual_lengths", "flops", "accuracy", "accuracy_per_skill", "accuracy_n", "predictions")


@pytest.mark.slow
def test_worker_processes_give_the_serial_rows(tmp_path, saved_tiny_llava):
    """``jobs=2``: each model's cells run in their own spawned process; rows = the serial rows."""
    import shutil

    second = tmp_path / "second-model"
    shutil.copytree(saved_tiny_llava, second)
    cells = plan_cells([saved_tiny_llava, str(second)], ["random", "fastv"], ["full", "0.5"], ["synth"])
    serial = run_sweep(cells, tmp_path / "serial.jsonl", FAST, progress=False)
    parallel = run_sweep(cells, tmp_path / "parallel.jsonl", FAST, progress=False, jobs=2)
    assert all(row["env"]["runner"].startswith("process") for row in parallel)

    def project(rows):
        return {Cell(r["model"], r["method"], r["budget"], r["task"]).key: {k: r.get(k) for k in DETERMINISTIC}
                for r in rows}

    assert len(parallel) == len(cells) and project(parallel) == project(serial)
    assert (tmp_path / "parallel.jsonl").read_text().count("\n") == len(cells)


def test_accuracy_cell_times_at_most_its_short_repeats(tmp_path, saved_tiny_llava):
    """An accuracy cell's one-question latency is an indication: --repeats 5 gives ACCURACY_CELL_REPEATS timed
    runs there, recorded in the row (the latency task times all five)."""
    from dataclasses import replace

    from vtprune.bench.sweep import ACCURACY_CELL_REPEATS

    rows = run_sweep([Cell(saved_tiny_llava, "random", 0.5, "synth")], tmp_path / "r.jsonl",
                     replace(FAST, repeats=5), progress=False)
    assert rows[0]["status"] == "ok", rows[0]["error"]
    assert rows[0]["bench"]["repeats"] == 5 and rows[0]["latency"]["repeats"] == ACCURACY_CELL_REPEATS == 2
    assert len(rows[0]["latency"]["prefill_ms"]["samples"]) == 2


def test_next_cell_keeps_a_worker_on_its_model_and_shares_the_last_one():
    """The process runner's dispatch: a worker stays on the model it has loaded, a free worker takes the model
    with the most cells left that nobody holds, and when every model is held it helps with the biggest one."""
    from vtprune.bench.sweep import _next_cell

    remaining = {m: [Cell(m, "random", b, "synth") for b in range(1, n + 1)] for m, n in (("a", 2), ("b", 5), ("c", 1))}
    first = _next_cell(remaining, None, set())
    assert first.model == "b"                                    # the most cells left
    assert _next_cell(remaining, None, {"b"}).model == "a"       # b is held by the other worker
    assert _next_cell(remaining, "a", {"b"}).model == "a"        # stays on its own model
    assert _next_cell(remaining, "a", {"b"}).model == "c"        # a is done: c is free (b is held)
    assert _next_cell(remaining, "c", {"b"}).model == "b"        # only b is left: share it
    assert [c.budget for c in remaining["b"]] == [3, 4, 5]       # cells are dealt in order
    while any(remaining.values()):
        assert _next_cell(remaining, "b", set()).model == "b"
    assert _next_cell(remaining, "b", set()) is None


def test_default_run_takes_the_questions_of_its_standard_error_target():
    """Without --model/--preset the bench evaluates DEFAULT_RUN_QUESTIONS per task (at most 2.5 points of
    standard error at the default models' recorded full-token accuracies); --limit 0 is every question; with
    --model the default is every question."""
    import json
    import math

    from vtprune.bench.sweep import DEFAULT_IMAGE_MODELS, VIDEO_MODEL
    from vtprune.cli import DEFAULT_RUN_QUESTIONS, _bench_limit, build_parser
    from vtprune.loading import bundled_model_dir

    assert DEFAULT_RUN_QUESTIONS % 6 == 0 and DEFAULT_RUN_QUESTIONS % 7 == 0  # skill-balanced in both tasks
    for name in (*DEFAULT_IMAGE_MODELS, VIDEO_MODEL):
        recorded = json.loads((bundled_model_dir(name) / "eval_results.json").read_text())
        p = recorded["test"]["overall"]
        assert 100 * math.sqrt(p * (1 - p) / DEFAULT_RUN_QUESTIONS) <= 2.5, (name, p)
    parser = build_parser()
    for argv, default_run, expected in ((["bench"], True, DEFAULT_RUN_QUESTIONS), (["bench"], False, None),
                                        (["bench", "--limit", "0"], True, None),
                                        (["bench", "--limit", "50"], True, 50)):
        args = parser.parse_args(argv)
        args.default_run = default_run
        assert _bench_limit(args) == expected, argv


def test_accuracy_spread_names_best_and_worst_per_budget():
    rows = [{"model": "/m/micro-x", "method": m, "budget": b, "task": "synth", "status": "ok", "accuracy": a,
             "accuracy_n": 600} for m, b, a in [("none", None, 0.9), ("random", 0.5, 0.7), ("divprune", 0.5, 0.85),
                                                ("random", 0.125, 0.4), ("divprune", 0.125, 0.75),
                                                ("fastv", 0.125, 0.6)]]
    rows.append({"model": "/m/micro-x", "method": "pdrop", "budget": 0.125, "task": "synth", "status": "error",
                 "error": "BudgetError"})
    spreads = {s["budget"]: s for s in report.accuracy_spread(report.summaries(rows))}
    assert set(spreads) == {0.5, 0.125}
    low = spreads[0.125]
    assert (low["best"], low["worst"], low["methods"], low["n"]) == ("divprune", "random", 3, 600)
    assert low["spread_points"] == pytest.approx(35.0)
    assert "| micro-x | 0.125 | 3 | divprune 75.0 | random 40.0 | 35.0 | 600 |" in report.spread_markdown([low])


def test_pareto_front():
    points = [(1, 50), (2, 40), (2, 60), (3, 60), (4, 70), (0.5, 10)]
    assert pareto_front(points) == [(0.5, 10), (1, 50), (2, 60), (4, 70)]


def _bench_command(model: str, out: Path) -> list[str]:
    return [sys.executable, "-m", "vtprune", "bench", "--model", model, "--limit", "6", "--repeats", "1",
            "--warmup", "0", "--new-tokens", "2", "--threads", "1", "--no-progress", "--out", str(out)]


@pytest.mark.slow
def test_bench_resumes_after_kill_without_loss_or_duplication(tmp_path, saved_tiny_llava):
    """``vtprune bench`` (every registered method at the default budgets) killed mid-sweep, then resumed."""
    out = tmp_path / "r.jsonl"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(_bench_command(saved_tiny_llava, out), cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and (not out.exists() or out.read_text().count("\n") < 3):
            time.sleep(0.05)
        assert proc.poll() is None, "the sweep finished before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    written = out.read_text().count("\n")
    assert written >= 3
    with open(out, "a") as handle:  # as if it had been killed during a write
        handle.write('{"model": "torn')
    done = subprocess.run(_bench_command(saved_tiny_llava, out), cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    from vtprune.bench.sweep import latest_rows

    rows = [json.loads(line) for line in out.read_text().splitlines()]
    finished = [Cell(r["model"], r["method"], r["budget"], r["task"]).key for r in rows if r["status"] == "ok"]
    assert len(finished) == len(set(finished))  # a finished cell is never measured twice
    keys = [Cell(r["model"], r["method"], r["budget"], r["task"]).key for r in latest_rows(rows)]
    expected = plan_cells([saved_tiny_llava], list(vtprune.methods()), ["full", "0.5", "0.25", "0.125"], ["synth"])
    assert len(keys) == len(set(keys)) == len(expected)  # errored cells were retried: the newest row counts
    assert set(keys) == {c.key for c in expected}
    assert (out.with_suffix(".md")).read_text().count("\n") > len(expected)
    assert "acc % ± s.e." in done.stdout and "counting" in out.with_suffix(".md").read_text()


def test_cli_bench_without_model_uses_the_bundled_models(tmp_path, saved_tiny_llava, monkeypatch, capsys):
    import vtprune.bench.sweep as sweep
    from vtprune.cli import main

    monkeypatch.setattr(sweep, "default_models", lambda: [saved_tiny_llava])
    monkeypatch.setattr(sweep, "default_video_models", lambda: [])
    out = tmp_path / "r.jsonl"
    assert main(["bench", "--methods", "random,fastv", "--limit", "6", "--repeats", "1", "--warmup", "0",
                 "--new-tokens", "2", "--threads", "1", "--no-progress", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    # default budgets: full, 50%, 25%, 12.5%; default task: synth (accuracy)
    assert sorted((r["method"], r["budget"]) for r in rows) == sorted(
        [("none", None)] + [(m, b) for m in ("random", "fastv") for b in (0.5, 0.25, 0.125)])
    assert all(r["task"] == "synth" and r["model"] == saved_tiny_llava for r in rows)
    printed = capsys.readouterr().out
    assert "vtprune bench: 7 cells" in printed and "fastv" in printed and "random" in printed
    header = (tmp_path / "r.md").read_text().splitlines()[0]
    for column in ("acc %", "attribute", "fine_detail", "eq. tokens", "prefill GFLOPs", "prefill ms"):
        assert column in header
    assert (tmp_path / "r.csv").exists()


def test_cli_bench_runs_a_composition(tmp_path, saved_tiny_llava, capsys):
    """``a+b`` composes in bench as in vtprune.apply / run / the lmms-eval model: the default budget split, each
    stage in the row's options and stats."""
    from vtprune.cli import main

    out = tmp_path / "r.jsonl"
    assert main(["bench", "--model", saved_tiny_llava, "--methods", "divprune+fastv", "--budgets", "0.5",
                 "--limit", "4", "--no-progress", "--out", str(out)]) == 0
    row = next(json.loads(line) for line in out.read_text().splitlines() if "+" in json.loads(line)["method"])
    assert row["status"] == "ok" and row["stage"] == "pre-llm+in-llm"
    assert [o["method"] for o in row["options"]] == ["divprune", "fastv"]
    assert [o["budget"] for o in row["options"]] == [1.0, 0.5]  # the pre-LLM stage keeps 2 x 50 %, capped at all
    assert "divprune+fastv" in capsys.readouterr().out


def test_cli_bench_without_any_model_says_what_to_pass(monkeypatch, tmp_path):
    import vtprune.bench.sweep as sweep
    from vtprune.cli import main

    monkeypatch.setattr(sweep, "default_models", lambda: [])
    monkeypatch.setattr(sweep, "default_video_models", lambda: [])
    assert main(["bench", "--out", str(tmp_path / "r.jsonl")]) == 2


# -- resume keys: every setting that changes a cell's result ---------------------------------------------------


def _fake_cells(monkeypatch, failing: set[str] = frozenset()) -> list[tuple]:
    """Replace run_cell by a recorder that writes a minimal row at once (no model): resume logic only.
    Cells of the methods in ``failing`` get an error row."""
    import vtprune.bench.sweep as sweep

    ran: list[tuple] = []

    def run_cell(cell, options):
        ran.append((cell.model, cell.method, cell.budget, options.limit))
        status = "error" if cell.method in failing else "ok"
        described = {"method": "none"} if cell.method == sweep.UNPRUNED else [
            b.describe() for b in sweep._build_methods(cell, options)][0]  # what run_cell records
        return {"model": cell.model, "method": cell.method, "budget": cell.budget, "task": cell.task,
                "status": status, "error": "BudgetError: x" if status == "error" else None,
                "options": described, "bench": options.to_dict(), "inputs": sweep.inputs_fingerprint(cell),
                "env": {}}

    monkeypatch.setattr(sweep, "run_cell", run_cell)
    return ran


def test_resume_keys_on_every_setting_that_changes_a_result(tmp_path, monkeypatch, capsys):
    ran = _fake_cells(monkeypatch)
    (tmp_path / "models" / "m").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "r.jsonl"
    base = SweepOptions(limit=6, batch_size=6, repeats=1, warmup=0, new_tokens=2, threads=1)

    def sweep(model="models/m", **changes):
        ran.clear()
        options = SweepOptions(**{**base.to_dict(), **changes})
        rows = run_sweep(plan_cells([model], ["fastv", "divprune"], ["full", "0.5"], ["synth"]), out, options,
                         progress=False)
        return len(ran), rows

    count, rows = sweep()
    assert count == 3 and {r["model"] for r in rows} == {str(tmp_path / "models" / "m")}  # stored absolute
    capsys.readouterr()
    assert sweep(model=str(tmp_path / "models" / "m"))[0] == 0  # absolute vs relative: the same cells
    assert "3 of 3 cells already in" in capsys.readouterr().out
    assert sweep(dtype="float32", device="cpu")[0] == 0  # the defaults spelt out: the same settings
    assert sweep(repeats=3)[0] == 0  # not a setting of accuracy cells
    assert sweep(limit=12)[0] == 3
    assert sweep(batch_size=3)[0] == 3
    assert sweep(seed=1)[0] == 3
    count, rows = sweep(method_options={"fastv": {"layer": 1}})
    assert count == 1 and ran[0][1] == "fastv"  # only the cell whose options changed
    assert len(rows) == 3 and out.read_text().count("\n") == 3 + 3 + 3 + 3 + 1


def test_rows_made_with_other_method_defaults_are_measured_again(tmp_path, monkeypatch):
    """A row records its method's resolved configuration; when a later vtprune resolves the same cell to other
    defaults (e.g. a method's default positions changed), the old row is not reused."""
    ran = _fake_cells(monkeypatch)
    out = tmp_path / "r.jsonl"
    cells = plan_cells(["tiny:llava"], ["fastv"], ["0.5"], ["latency"])
    run_sweep(cells, out, FAST, progress=False)
    assert run_sweep(cells, out, FAST, progress=False) and ran.count(ran[0]) == 1  # same defaults: reused
    older = out.read_text().replace('"positions": "original"', '"positions": "compact"')
    assert older != out.read_text()
    out.write_text(older)
    ran.clear()
    run_sweep(cells, out, FAST, progress=False)
    assert [cell[1] for cell in ran] == ["fastv"]


def test_a_retrained_model_or_a_new_test_split_is_measured_again(tmp_path, monkeypatch):
    """Rows record fingerprints of the local model's files and of the scored test split; when either changes
    (a retrained micro-VLM, a re-exported split) the old rows are not reused. Rows without fingerprints (an
    older vtprune) are measured again too."""
    import vtprune.synth

    ran = _fake_cells(monkeypatch)
    model = tmp_path / "models" / "m"
    model.mkdir(parents=True)
    (model / "model.safetensors").write_bytes(b"weights v1")
    split = tmp_path / "data"
    (split / "test").mkdir(parents=True)
    (split / "test" / "metadata.jsonl").write_text('{"id": 0}\n')
    monkeypatch.setattr(vtprune.synth, "_repo_data_root", lambda: split)
    out = tmp_path / "r.jsonl"
    cells = plan_cells([str(model)], ["random"], ["0.5"], ["synth"])
    run_sweep(cells, out, FAST, progress=False)
    run_sweep(cells, out, FAST, progress=False)
    assert len(ran) == 1  # unchanged inputs: the row is reused
    (model / "model.safetensors").write_bytes(b"weights v2")  # same size, other content
    run_sweep(cells, out, FAST, progress=False)
    assert len(ran) == 2
    (split / "test" / "metadata.jsonl").write_text('{"id": 1}\n')
    run_sweep(cells, out, FAST, progress=False)
    run_sweep(cells, out, FAST, progress=False)
    assert len(ran) == 3
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len({json.dumps(r["inputs"], sort_keys=True) for r in rows}) == 3
    older = "".join(json.dumps({k: v for k, v in r.items() if k != "inputs"}) + "\n" for r in rows)
    out.write_text(older)
    run_sweep(cells, out, FAST, progress=False)
    assert len(ran) == 4


def test_errored_cells_are_retried_and_replace_the_error_row(tmp_path, monkeypatch):
    from vtprune.bench.sweep import latest_rows

    out = tmp_path / "r.jsonl"
    cells = plan_cells(["tiny:llava"], ["fastv", "divprune"], ["0.5"], ["latency"])
    ran = _fake_cells(monkeypatch, failing={"fastv"})
    run_sweep(cells, out, FAST, progress=False)
    ran = _fake_cells(monkeypatch)  # the cause is fixed
    rows = run_sweep(cells, out, FAST, progress=False)
    assert [cell[1] for cell in ran] == ["fastv"]  # only the errored cell ran again
    assert [(r["method"], r["status"]) for r in rows] == [("divprune", "ok"), ("fastv", "ok")]
    assert out.read_text().count("\n") == 3  # append-only: the error row stays in the file ...
    assert len(latest_rows(ResultsFile(out).load())) == 2  # ... and readers take the newest row per cell


def test_unwritable_out_is_found_before_the_first_cell(tmp_path, monkeypatch):
    ran = _fake_cells(monkeypatch)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(VTPruneError, match="cannot write the results file"):
        run_sweep(plan_cells(["tiny:llava"], ["fastv"], ["0.5"], ["latency"]), blocker / "r.jsonl", FAST,
                  progress=False)
    assert ran == []
    with pytest.raises(VTPruneError, match="limit=-5"):
        run_sweep([], tmp_path / "r.jsonl", SweepOptions(limit=-5), progress=False)


def test_cli_bench_tables_hold_every_row_of_the_file(tmp_path, monkeypatch):
    """A second run into the same file with other budgets: the tables list the rows of both runs."""
    from vtprune.cli import main

    _fake_cells(monkeypatch)
    out = tmp_path / "r.jsonl"
    common = ["bench", "--model", "tiny:llava", "--tasks", "latency", "--methods", "fastv", "--repeats", "1",
              "--warmup", "0", "--new-tokens", "2", "--threads", "1", "--no-progress", "--out", str(out)]
    assert main([*common, "--budgets", "full,0.5"]) == 0
    assert main([*common, "--budgets", "0.25"]) == 0
    csv_lines = (tmp_path / "r.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + 3 and out.read_text().count("\n") == 3
    markdown = (tmp_path / "r.md").read_text()
    assert "| 0.5 |" in markdown and "| 0.25 |" in markdown and "| full |" in markdown


def test_sweep_config_runs_every_seed_and_option_combination(tmp_path, saved_tiny_llava, capsys):
    from vtprune.cli import main

    config = tmp_path / "sweep.yaml"
    out = tmp_path / "r.jsonl"
    config.write_text(f"models: [{saved_tiny_llava}]\nmethods: [fastv]\nbudgets: [0.5]\ntasks: [synth]\n"
                      f"seeds: [0, 1]\noptions:\n  fastv: {{layer: [1, 2]}}\nlimit: 4\nout: {out}\n")
    assert main(["bench", "--config", str(config), "--no-progress"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    pruned = [r for r in rows if r["method"] == "fastv"]
    assert sorted((r["bench"]["seed"], r["bench"]["method_options"]["fastv"]["layer"]) for r in pruned) == [
        (0, 1), (0, 2), (1, 1), (1, 2)]
    assert {r["bench"]["config"] for r in rows} == {str(config.resolve())}
    printed = capsys.readouterr().out
    assert "fastv(layer=1)" in printed and "fastv(layer=2)" in printed
    assert main(["bench", "--config", str(config), "--no-progress"]) == 0  # resume: nothing measured again
    assert out.read_text().count("\n") == len(rows)


@pytest.mark.parametrize("text, message", [
    ("modelz: [x]\n", "unknown key"),
    ("seeds: zero\n", "seeds must be a list"),
    ("options: [1]\n", "options must map"),
    ("methods: [fastv\n", "not valid YAML"),
])
def test_sweep_config_errors(tmp_path, text, message, capsys):
    from vtprune.cli import main

    config = tmp_path / "sweep.yaml"
    config.write_text(text)
    assert main(["bench", "--config", str(config)]) == 2
    assert message in capsys.readouterr().err


def test_sweep_config_and_flag_for_the_same_setting_is_refused(tmp_path, capsys):
    from vtprune.cli import main

    config = tmp_path / "sweep.yaml"
    config.write_text("methods: [fastv]\n")
    assert main(["bench", "--config", str(config), "--methods", "divprune"]) == 2
    assert "set it in one place" in capsys.readouterr().err


# -- task synth_video: the video micro-model in the default bench ----------------------------------------------


@pytest.fixture(scope="module")
def saved_tiny_qwen2vl(tmp_path_factory) -> str:
    """A tiny random Qwen2-VL (real video processor) saved as an HF directory: stands in for the bundled video
    micro-VLM."""
    pytest.importorskip("torchvision")
    from vtprune.testing import tiny_vlm

    path = tmp_path_factory.mktemp("tiny-qwen2vl")
    model, processor = tiny_vlm("qwen2_vl")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


def test_cli_bench_without_model_also_runs_the_video_model(tmp_path, saved_tiny_llava, saved_tiny_qwen2vl,
                                                            monkeypatch, capsys):
    import vtprune.bench.sweep as sweep
    from vtprune.cli import main
    from vtprune.synth.video import VIDEO_SKILLS

    monkeypatch.setattr(sweep, "default_models", lambda: [saved_tiny_llava])
    monkeypatch.setattr(sweep, "default_video_models", lambda: [saved_tiny_qwen2vl])
    out = tmp_path / "r.jsonl"
    assert main(["bench", "--methods", "frames,divprune", "--limit", "7", "--repeats", "1", "--warmup", "0",
                 "--new-tokens", "2", "--threads", "1", "--no-progress", "--jobs", "1", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    video = [r for r in rows if r["task"] == "synth_video"]
    assert {r["model"] for r in video} == {saved_tiny_qwen2vl}
    assert all(r["task"] == "synth" for r in rows if r["model"] == saved_tiny_llava)
    # default video budgets: full, 50 %, 25 %, 10 %
    assert sorted((r["method"], r["budget"]) for r in video) == sorted(
        [("none", None)] + [(m, b) for m in ("frames", "divprune") for b in (0.5, 0.25, 0.1)])
    for row in video:
        assert row["status"] == "ok", row["error"]
        assert row["accuracy_n"] == 7 and set(row["accuracy_per_skill"]) == set(VIDEO_SKILLS)
        assert row["flops"] > 0 and row["latency"]["prefill_ms"]["median"] > 0
    full = next(r for r in video if r["method"] == "none")
    quarter = next(r for r in video if r["method"] == "frames" and r["budget"] == 0.25)
    assert full["visual_tokens"] == quarter["visual_tokens"] > 0
    assert quarter["equivalent_tokens"] < 0.3 * full["equivalent_tokens"] and quarter["flops"] < full["flops"]
    markdown = (tmp_path / "r.md").read_text()
    assert "### task synth_video" in markdown and "brief_ocr" in markdown and "### task synth" in markdown


def test_synth_video_refuses_a_model_without_videos(tmp_path, saved_tiny_llava):
    rows = run_sweep([Cell(saved_tiny_llava, "none", None, "synth_video")], tmp_path / "r.jsonl", FAST,
                     progress=False)
    assert rows[0]["status"] == "error" and "takes no videos" in rows[0]["error"]


def test_a_crashing_cell_is_recorded_the_sweep_goes_on_and_the_command_fails(tmp_path, monkeypatch, capsys):
    """A bug (any exception but a VTPruneError refusal) in one cell: the row says "crash" with the traceback, the
    other cells run, the row is not done (a re-run measures it again), and `vtprune bench` exits 1 naming it."""
    from vtprune.catalog import pre_llm
    from vtprune.cli import main

    def broken(features, k):
        raise RuntimeError("selector bug for the test")

    monkeypatch.setattr(pre_llm, "divprune_select", broken)
    out = tmp_path / "r.jsonl"
    cells = plan_cells(["tiny:llava"], ["divprune", "random"], ["0.5"], ["latency"])
    rows = run_sweep(cells, out, FAST, progress=False)
    by_method = {r["method"]: r for r in rows}
    assert by_method["random"]["status"] == "ok"
    crashed = by_method["divprune"]
    assert crashed["status"] == "crash" and crashed["error"] == "RuntimeError: selector bug for the test"
    assert "broken" in crashed["traceback"] and "latency" not in crashed
    assert not vtprune.is_pruned(load_for_bench("tiny:llava", FAST).model)
    assert "CRASH" in report.to_markdown(report.summaries(rows))
    capsys.readouterr()
    code = main(["bench", "--model", "tiny:llava", "--tasks", "latency", "--methods", "divprune,random",
                 "--budgets", "0.5", "--repeats", "1", "--warmup", "0", "--new-tokens", "1", "--out", str(out),
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "1 cell(s) crashed" in err and "divprune @ 0.5 (latency): RuntimeError" in err
    assert [r["method"] for r in ResultsFile(out).load()].count("divprune") == 2  # measured again, not reused
