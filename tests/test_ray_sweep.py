"""``vtprune bench --ray``: a small sweep as Ray tasks on a local Ray instance gives the serial rows."""

from __future__ import annotations

import pytest

pytest.importorskip("ray")

from vtprune.bench.sweep import SweepOptions, plan_cells, run_sweep  # noqa: E402

#: the fields of a row that do not depend on timing or on the machine's state
DETERMINISTIC = ("model", "method", "budget", "task", "status", "error", "options", "stage", "visual_tokens",
                 "equivalent_tokens", "layer_lengths", "visual_lengths", "kept", "merged", "flops", "flops_unpruned",
                 "native_k", "kv_cache_bytes_expected")


@pytest.mark.slow
def test_ray_sweep_gives_the_serial_rows(tmp_path):
    options = SweepOptions(repeats=1, warmup=0, new_tokens=2, threads=1)
    cells = plan_cells(["tiny:llava"], ["divprune", "fastv", "visionzip"], ["full", "0.5", "4"], ["latency"])
    serial = run_sweep(cells, tmp_path / "serial.jsonl", options, progress=False)
    distributed = run_sweep(cells, tmp_path / "ray.jsonl", options, progress=False, use_ray=True)
    assert len(serial) == len(distributed) == len(cells)
    assert all(row["env"].get("runner") == "ray" for row in distributed)

    def project(rows):
        out = {}
        for row in rows:
            kept = {k: row.get(k) for k in DETERMINISTIC}
            kept["kv_cache_bytes"] = (row.get("latency") or {}).get("kv_cache_bytes")
            out[(row["method"], row["budget"])] = kept
        return out

    assert project(distributed) == project(serial)
    # resume works the same way for the Ray runner: only the errored cells (fastv @ 4 cannot reach its budget)
    # run again, and their new rows replace the old ones
    errored = sum(row["status"] != "ok" for row in distributed)
    assert errored >= 1
    again = run_sweep(cells, tmp_path / "ray.jsonl", options, progress=False, use_ray=True)
    assert (tmp_path / "ray.jsonl").read_text().count("\n") == len(cells) + errored and len(again) == len(cells)
