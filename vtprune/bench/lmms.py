"""lmms-eval integration: the ``vtprune`` model and the ``vtprune eval`` front.

The model is registered with lmms-eval through the ``lmms_eval.models`` entry point of this package
(``pyproject.toml``), so after ``pip install vtprune[eval]``::

    python -m lmms_eval --model vtprune \\
        --model_args pretrained=models/micro-llava,method=divprune,budget=64 \\
        --tasks vtprune_synth --include_path eval/lmms_tasks --batch_size 1

It wraps lmms-eval's **own** HF model classes: the ``backend`` model args (default: chosen from the
checkpoint's ``model_type`` -- ``llava_hf`` for LLaVA-1.5 / LLaVA-NeXT / OneVision, ``qwen2_vl`` and
``qwen2_5_vl`` for Qwen) are built exactly as lmms-eval builds them, from the remaining model args
(``pretrained``, ``device``, ``dtype``, ...), and the vtprune method is then applied to the backend's model.
vtprune model args:

``method``        a registered method name, or several joined by ``+`` to compose (``divprune+fastv``)
``budget``        int (equivalent tokens per image), float fraction, or ``none`` (the paper default)
``positions``     ``original`` / ``compact``
``seed``          seed of stochastic methods
``opt_<name>``    a method option, e.g. ``opt_layer=3`` for FastV (values parsed as Python literals)
``backend``       force the lmms-eval model class to wrap

Multi-GPU: lmms-eval's backends shard the data over processes started by ``accelerate``; pruning is applied
in every process, so the same command under ``accelerate launch`` runs data-parallel::

    accelerate launch --num_processes 8 -m lmms_eval --model vtprune \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=visionzip,budget=64 \\
        --tasks vtprune_synth --include_path eval/lmms_tasks --batch_size 1 --output_path results/
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["manifests", "VTPruneLMM", "backend_for", "run_lmms_eval", "TASKS_DIR"]

#: transformers ``model_type`` -> lmms-eval model id of the backend class
_BACKENDS = {
    "llava": "llava_hf",
    "llava_next": "llava_hf",
    "llava_onevision": "llava_hf",
    "qwen2_vl": "qwen2_vl",
    "qwen2_5_vl": "qwen2_5_vl",
    "qwen3_vl": "qwen3_vl",
}
_VTPRUNE_ARGS = ("method", "budget", "positions", "seed", "backend", "stats")

TASKS_DIR = Path(__file__).resolve().parents[2] / "eval" / "lmms_tasks"


def manifests():
    """Entry point of the ``lmms_eval.models`` group: the manifest of the ``vtprune`` model."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id="vtprune", chat_class_path="vtprune.bench.lmms.VTPruneLMM")]


def backend_for(pretrained: str) -> str:
    """lmms-eval model id wrapping the checkpoint at ``pretrained`` (by its config's ``model_type``)."""
    from transformers import AutoConfig

    model_type = AutoConfig.from_pretrained(pretrained).model_type
    if model_type not in _BACKENDS:
        from ..errors import UnsupportedModelError

        raise UnsupportedModelError(f"no lmms-eval backend known for model_type {model_type!r}; pass "
                                    f"backend=<lmms-eval model id> in --model_args (known: {sorted(_BACKENDS)})")
    return _BACKENDS[model_type]


def _parse_value(text: Any) -> Any:
    if not isinstance(text, str):
        return text
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _split_args(args: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(vtprune args, backend args)."""
    ours = {k: args.pop(k) for k in list(args) if k in _VTPRUNE_ARGS or k.startswith("opt_")}
    return ours, args


def _budget(value: Any):
    if value is None or (isinstance(value, str) and value.lower() in ("none", "default", "")):
        return None
    return _parse_value(value) if isinstance(value, str) else value


def _lmms_base():
    from lmms_eval.api.model import lmms

    return lmms


class VTPruneLMM(_lmms_base()):
    """lmms-eval model ``vtprune``: an lmms-eval HF backend with a vtprune method applied (module docstring).

    lmms-eval builds models with :meth:`create_from_arg_string`; it returns an instance of a subclass of the
    backend class (``LlavaHf``, ``Qwen2_5_VL``, ...) whose model is pruned, so generation, batching, chat
    templates and multi-process sharding are lmms-eval's own.
    """

    is_simple = False

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        from lmms_eval import utils
        from lmms_eval.models import get_model

        args = utils.simple_parse_args_string(arg_string)
        ours, backend_args = _split_args(args)
        backend_id = ours.get("backend") or backend_for(str(backend_args.get("pretrained")))
        backend_cls = get_model(backend_id)
        pruned_cls = _pruned_class(backend_cls)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        if ("device_map" in _accepted_kwargs(backend_cls) and "device_map" not in backend_args
                and int(os.environ.get("WORLD_SIZE", "1")) == 1):
            # lmms-eval's default device_map="" is rejected by transformers 5; one process: the device itself
            backend_args["device_map"] = backend_args.get("device") or extra.get("device") or "cpu"
        accepted = _accepted_kwargs(backend_cls)
        extra = {k: v for k, v in extra.items() if k in accepted and k not in backend_args}
        return pruned_cls(vtprune_args=ours, **backend_args, **extra)

    # lmms-eval's abstract interface: never reached, create_from_arg_string returns the backend subclass
    def generate_until(self, requests):  # pragma: no cover
        raise TypeError("build the vtprune lmms-eval model with create_from_arg_string")

    loglikelihood = generate_until_multi_round = generate_until


def _accepted_kwargs(backend_cls) -> set[str]:
    """Named parameters of the backend's ``__init__`` (LlavaHf asserts its ``**kwargs`` are empty)."""
    import inspect

    params = inspect.signature(backend_cls.__init__).parameters
    return {name for name, p in params.items() if p.kind is not inspect.Parameter.VAR_KEYWORD}


_PRUNED_CLASSES: dict[type, type] = {}


def _pruned_class(backend_cls: type) -> type:
    """``backend_cls`` subclass that applies vtprune to its model after the backend's own ``__init__``."""
    if backend_cls in _PRUNED_CLASSES:
        return _PRUNED_CLASSES[backend_cls]

    def __init__(self, vtprune_args: dict[str, Any] | None = None, **kwargs):
        backend_cls.__init__(self, **kwargs)
        self.vtprune_args = dict(vtprune_args or {})
        method = self.vtprune_args.get("method")
        if method and str(method).lower() != "none":
            import vtprune

            names = str(method).split("+")
            options = {k[len("opt_"):]: _parse_value(v) for k, v in self.vtprune_args.items() if k.startswith("opt_")}
            kwargs_apply: dict[str, Any] = {}
            if self.vtprune_args.get("positions"):
                kwargs_apply["positions"] = self.vtprune_args["positions"]
            if self.vtprune_args.get("seed") is not None:
                kwargs_apply["seed"] = int(self.vtprune_args["seed"])
            vtprune.apply(self.model, names[0] if len(names) == 1 else names,
                          budget=_budget(self.vtprune_args.get("budget")), **kwargs_apply, **options)
            self._vtprune_samples = []
            self._vtprune_hook = self.model.register_forward_hook(_stats_collector(self))

    def generate_until(self, requests):
        responses = backend_cls.generate_until(self, requests)
        if self.vtprune_args.get("stats") and getattr(self, "_vtprune_samples", None) is not None:
            _write_stats(self.vtprune_args["stats"], self.vtprune_args, self._vtprune_samples)
        return responses

    cls = type(f"VTPrune{backend_cls.__name__}", (backend_cls,), {
        "__init__": __init__, "generate_until": generate_until, "__module__": __name__,
        "__doc__": f"{backend_cls.__name__} pruned by vtprune"})
    _PRUNED_CLASSES[backend_cls] = cls
    return cls


def _stats_collector(lm):
    """A forward hook that keeps, per prefill, each sample's pruning statistics (visual tokens in, equivalent
    tokens, prefill FLOPs pruned / unpruned)."""
    import vtprune

    last = {"stats": None}

    def collect(module, args, output):
        stats = vtprune.stats(module) if vtprune.is_pruned(module) else None
        if stats is None or stats is last["stats"]:
            return
        last["stats"] = stats
        lm._vtprune_samples.extend(
            {"visual_in": s.visual_in, "equivalent_tokens": s.equivalent_tokens, "flops": s.flops,
             "flops_unpruned": s.flops_unpruned} for s in stats.samples if s.visual_in)

    return collect


def summarize_stats(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over the prefills of a run (what `vtprune eval` adds to lmms-eval's results)."""
    def mean(key):
        values = [s[key] for s in samples if s.get(key) is not None]
        return sum(values) / len(values) if values else None

    flops, full = mean("flops"), mean("flops_unpruned")
    return {"samples": len(samples), "visual_tokens_in": mean("visual_in"),
            "equivalent_tokens": mean("equivalent_tokens"), "prefill_gflops": None if flops is None else flops / 1e9,
            "prefill_gflops_unpruned": None if full is None else full / 1e9,
            "flops_speedup": full / flops if flops and full else None}


def _write_stats(path: str, vtprune_args: dict[str, Any], samples: list[dict[str, Any]]) -> None:
    summary = {"args": {k: v for k, v in vtprune_args.items() if k != "stats"}, **summarize_stats(samples)}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(summary, indent=2, default=str))


def run_lmms_eval(*, model: str | None, method: str | None, budget, tasks: str = "vtprune_synth",
                  limit: int | None = None, output_path: str = "bench_results/lmms_eval", device: str = "cpu",
                  dtype: str = "float32", batch_size: int = 1, extra: list[str] | None = None) -> int:
    """``vtprune eval``: run the lmms-eval CLI (offline) with the ``vtprune`` model; returns its exit code."""
    from ..errors import VTPruneError
    from ..loading import bundled_model_dir

    try:
        import lmms_eval  # noqa: F401
    except ImportError as error:
        raise VTPruneError("vtprune eval needs lmms-eval: pip install 'vtprune[eval]'") from error
    if model is None:
        bundled = bundled_model_dir()
        if bundled is None:
            raise VTPruneError("no bundled micro-llava in models/; pass --model DIR")
        model = str(bundled)
    model_args = [f"pretrained={Path(model).resolve() if Path(model).exists() else model}", f"device={device}",
                  f"dtype={dtype}"]
    stats_path = Path(output_path).resolve() / "vtprune_stats.json"
    if method:
        model_args.append(f"method={method}")
        model_args.append(f"stats={stats_path}")
        if budget is not None:
            model_args.append(f"budget={budget}")
    command = [sys.executable, "-m", "lmms_eval", "--model", "vtprune", "--model_args", ",".join(model_args),
               "--tasks", tasks, "--include_path", str(TASKS_DIR), "--batch_size", str(batch_size),
               "--output_path", str(Path(output_path).resolve()), "--log_samples"]
    if limit is not None:
        command += ["--limit", str(limit)]
    extra = [a for a in (extra or []) if a != "--"]
    command += extra
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    print(" ".join(command))
    started = time.time()
    code = subprocess.call(command, cwd=TASKS_DIR.parents[1], env=env)
    if code != 0:
        print(f"vtprune: error: lmms-eval failed (exit code {code}); see its output above", file=sys.stderr)
        return code
    problem = _results_problem(Path(output_path), started)
    if problem:
        print(f"vtprune: error: lmms-eval exited 0 but {problem}; see its output above", file=sys.stderr)
        return 1
    if method:
        if not stats_path.is_file() or stats_path.stat().st_mtime < started:
            print(f"vtprune: error: the pruned run wrote no statistics ({stats_path})", file=sys.stderr)
            return 1
        stats = json.loads(stats_path.read_text())
        for results_file in (p for p in Path(output_path).rglob("*_results.json") if p.stat().st_mtime >= started):
            data = json.loads(results_file.read_text())
            data["vtprune"] = stats  # this run's own output file: its results now carry the pruning statistics
            results_file.write_text(json.dumps(data, indent=2, default=str))
        print(f"vtprune: {stats['samples']} prefills, {stats['visual_tokens_in']:.1f} visual tokens in -> "
              f"{stats['equivalent_tokens']:.1f} equivalent, prefill {stats['prefill_gflops']:.3f} / "
              f"{stats['prefill_gflops_unpruned']:.3f} GFLOPs (also in the results file under 'vtprune')")
    return 0


def _results_problem(output_path: Path, started: float) -> str | None:
    """Why the lmms-eval run that started at ``started`` did not produce results, or None when it did.

    lmms-eval logs a failing task and still exits 0, so success is judged by what it wrote: a results file
    newer than the start of this run (an older one is a stale result of an earlier run) with task results."""
    fresh = [p for p in output_path.rglob("*_results.json") if p.stat().st_mtime >= started]
    if not fresh:
        return f"wrote no results file under {output_path}"
    for path in fresh:
        try:
            results = json.loads(path.read_text()).get("results") or {}
        except (OSError, ValueError) as error:
            return f"wrote an unreadable results file {path} ({error})"
        if not results:
            return f"wrote no task results in {path}"
    return None
