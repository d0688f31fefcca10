"""``vtprune bench --ray``: sweep cells as Ray tasks on a local (or already connected) Ray instance.

Each cell is one task that loads its model in the worker (once per worker process) and returns the same
row :func:`vtprune.bench.sweep.run_cell` returns serially; the driver appends rows to the results file as
tasks finish, so resume works exactly as in a serial sweep. A task asks for one GPU where GPUs exist. On a
CPU-only machine a task asks for ``cpus_per_task`` CPUs (default: all of them), so cells do not time each
other's load; lower it to trade timing fidelity for throughput (accuracy rows are unaffected).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .sweep import Cell, SweepOptions, run_cell


def _run_cell_task(cell: Cell, options: SweepOptions) -> dict[str, Any]:
    row = run_cell(cell, options)
    row.setdefault("env", {})["runner"] = "ray"
    return row


def run_cells_with_ray(
    cells: Sequence[Cell],
    options: SweepOptions,
    finished: Callable[[dict[str, Any]], Any],
    *,
    on_start: Callable[[str], Any] | None = None,
    cpus_per_task: int | None = None,
    address: str | None = None,
) -> None:
    try:
        import ray
    except ImportError as error:  # pragma: no cover - depends on the environment
        from ..errors import VTPruneError

        raise VTPruneError("vtprune bench --ray needs Ray: pip install 'vtprune[ray]' (or pip install ray)") from error
    started_here = not ray.is_initialized()
    if started_here:
        env = {"env_vars": {k: v for k, v in os.environ.items() if k in ("PYTHONPATH", "HF_HUB_OFFLINE")}}
        ray.init(address=address, include_dashboard=False, log_to_driver=False, runtime_env=env,
                 num_cpus=None if address else os.cpu_count())
    try:
        gpus = 1 if torch.cuda.is_available() and options.device.startswith("cuda") else 0
        cpus = cpus_per_task or (1 if gpus else max(int(ray.available_resources().get("CPU", 1)), 1))
        task = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=0)(_run_cell_task)
        pending = {task.remote(cell, options): cell for cell in cells}
        if on_start is not None:
            on_start(f"{len(pending)} cells on Ray ({cpus} CPU{'s' if cpus > 1 else ''}, {gpus} GPU per task)")
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                pending.pop(ref)
                finished(ray.get(ref))
    finally:
        if started_here:
            ray.shutdown()
