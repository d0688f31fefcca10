"""Benchmark sweeps: methods x budgets x models x tasks, one JSONL row per finished cell, resumable.

A *cell* is ``(model, method, budget, task)``. ``method="none"`` is the unpruned model (budget None). Tasks:

``synth``    accuracy on the synthetic VQA test split (:func:`vtprune.bench.accuracy.evaluate_vqa`), per skill,
             plus the prefill FLOPs, equivalent tokens and a short latency measurement on one question
             (``ACCURACY_CELL_REPEATS`` timed runs at most).
             Refused for random-weight models (presets, ``tiny:``): their answers are noise.
``synth_video``  the same on the synthetic *video* QA test split (:mod:`vtprune.synth.video`: 210 mp4 clips of
             16 frames, seven temporal skills; one clip per question through the processor's video path), for
             models that take videos (the bundled ``models/micro-qwen2vl-video``); FLOPs, equivalent tokens and
             latency on one clip. Refused for random-weight models and for models without a video processor.
``latency``  the full latency protocol on one benchmark input (a preset's image size and prompt, or one
             synthetic question): prefill (with the method's selection and the engine's own work timed
             separately), TTFT, per-token decode, end to end, KV-cache bytes, peak memory -- measured in
             interleaved rounds against the unpruned model and, for pre-LLM methods, the native-K input
             (:func:`vtprune.bench.latency.measure_paired`).

Models: ``preset:NAME`` (random weights with real shapes, ``models/presets``), ``tiny:FAMILY`` (a tiny random
model from :mod:`vtprune.testing`), or a local HF directory.

Results file (design.md section 2): each finished cell appends one JSON object and a newline, then
``flush`` + ``fsync``. A re-run with the same output file reads it first, cuts a torn last line (a kill
during a write; only the sweep, the file's writer, does that -- readers never write), and skips every cell
already finished *with the same settings* (:func:`result_key`: the absolute model path, method, budget,
task, method options, every measurement setting that changes the cell's result, and fingerprints of the local
model's files and of the scored test split -- a retrained model is measured again), so after a kill nothing
is lost and nothing is duplicated, while a re-run with another ``--option`` or ``--limit`` computes new rows.
Errored cells are retried; the file stays append-only, so readers take the newest row per key
(:func:`latest_rows`). Every row records the package version, git commit, torch/transformers versions,
device, dtype, thread count, machine load and the exact method options.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import VTPruneError

__all__ = ["Cell", "SweepOptions", "ResultsFile", "plan_cells", "run_cell", "run_sweep", "default_models",
           "default_video_models", "VIDEO_MODEL", "ACCURACY_TASKS",
           "parse_budget", "UNPRUNED", "result_key", "row_key", "latest_rows", "model_spec"]

UNPRUNED = "none"
TASKS = ("synth", "latency", "synth_video")
ACCURACY_TASKS = ("synth", "synth_video")
#: timed runs of the one-question latency an accuracy cell also reports (``--repeats`` caps it; the latency
#: task times ``--repeats`` runs): the accuracy is the cell's result, its latency a short indication
ACCURACY_CELL_REPEATS = 2


def parse_budget(text: str | int | float | None):
    """``"full"``/``"none"``/None -> None (unpruned); ``"64"`` -> 64; ``"0.25"`` -> 0.25. A budget that keeps
    nothing or is not a fraction in (0, 1] (``0``, ``-3``, ``1.5``) raises :class:`~vtprune.BudgetError`."""
    if text is None:
        return None
    if isinstance(text, (int, float)):
        from ..budget import validate_budget

        return validate_budget(text)
    lowered = text.strip().lower()
    if lowered in ("full", "none", ""):
        return None
    try:
        value: int | float = int(lowered)
    except ValueError:
        try:
            value = float(lowered)
        except ValueError:
            raise VTPruneError(f"budget {text!r} is not 'full', an int (tokens) or a float fraction") from None
    from ..budget import validate_budget

    return validate_budget(value)


@dataclass(frozen=True)
class Cell:
    model: str
    method: str
    budget: int | float | None
    task: str

    @property
    def key(self) -> str:
        return json.dumps([self.model, self.method, self.budget, self.task])

    @property
    def label(self) -> str:
        budget = "full" if self.budget is None else self.budget
        return f"{self.model} | {self.method} @ {budget} | {self.task}"


@dataclass
class SweepOptions:
    """How every cell is measured (recorded in each row)."""

    limit: int | None = None           # synth(_video): the first N questions of the test split (None = all)
    batch_size: int = 16               # synth: evaluate_vqa batch size
    repeats: int = 5
    warmup: int = 1
    new_tokens: int = 8
    threads: int | None = None         # torch.set_num_threads in the process running the cells
    device: str = "cpu"
    dtype: str | None = None           # None: the preset's dtype, float32 for directories and tiny models
    native: bool = True                # latency: also time native-K for pre-LLM methods
    paired: bool = True                # latency: interleave the unpruned reference in every cell
    seed: int = 0
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # method -> options
    trust_remote_code: bool = False    # passed to from_pretrained for model directories (never prompts)
    config: str | None = None          # the sweep config file the run came from (recorded, not a result key)
    video_frames: int | None = None    # latency: a video input of this many frames instead of an image

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self) -> None:
        """Refuse settings that would measure nothing (e.g. ``limit=-5``: an "ok" row over 0 questions)."""
        checks = (("limit", self.limit, 1, "the first N questions, or None for all"), ("batch_size", self.batch_size, 1, ""),
                  ("repeats", self.repeats, 1, ""), ("warmup", self.warmup, 0, ""),
                  ("new_tokens", self.new_tokens, 1, ""), ("threads", self.threads, 1, "or None for torch's default"))
        checks += (("video_frames", self.video_frames, 1, "or None for an image input"),)
        for name, value, lowest, hint in checks:
            if value is None and name in ("limit", "threads", "video_frames"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
                raise VTPruneError(f"bench setting {name}={value!r} must be an int >= {lowest}"
                                   + (f" ({hint})" if hint else "") + ".")
        if not isinstance(self.method_options, dict) or not all(isinstance(v, dict)
                                                               for v in self.method_options.values()):
            raise VTPruneError("method_options must map a method name to a dict of its options, e.g. "
                               "{'fastv': {'layer': 3}}.")


#: settings that change the result of every cell / of the cells of one task (see :func:`result_key`)
_COMMON_SETTINGS = ("device", "dtype", "seed")
_TASK_SETTINGS = {"synth": ("limit", "batch_size"), "synth_video": ("limit", "batch_size"),
                  "latency": ("repeats", "warmup", "new_tokens", "threads", "native", "paired", "video_frames")}


def model_spec(model: str) -> str:
    """The canonical spelling of a cell's model: ``tiny:``/``preset:`` specs as they are, a local directory as
    its absolute path (so ``models/x`` and ``/repo/models/x`` are one model), anything else (a hub id) as is."""
    if model.startswith(("tiny:", "preset:")) or not os.path.exists(model):
        return model
    return os.path.abspath(model)


@functools.lru_cache(maxsize=64)
def _default_dtype(model: str) -> str:
    """The dtype a cell runs in when none is given: the preset's, else float32 (cached: called per row)."""
    if model.startswith("preset:"):
        from .presets import load_preset

        try:
            return load_preset(model.split(":", 1)[1]).dtype
        except Exception:  # an unknown preset: its cells fail anyway; keep the key well defined
            return "float32"
    return "float32"


_LARGE_FILE = 64 << 20  # files above this size are fingerprinted by size + first and last MiB


def _file_fingerprint(path: Path, digest) -> None:
    size = path.stat().st_size
    digest.update(f"{path.name}:{size}:".encode())
    with path.open("rb") as handle:
        if size <= _LARGE_FILE:
            digest.update(handle.read())
        else:  # a multi-GB checkpoint shard: hashing all of it at every resume would take minutes
            digest.update(handle.read(1 << 20))
            handle.seek(size - (1 << 20))
            digest.update(handle.read())


@functools.lru_cache(maxsize=64)
def _directory_fingerprint(directory: str, stamp: tuple) -> str:
    """sha256 (16 hex digits) over the files of ``directory`` (names, sizes, contents); ``stamp`` (the files'
    sizes and mtimes) only keys the cache, so a file rewritten in this process is hashed again."""
    digest = hashlib.sha256()
    for path in sorted(Path(directory).rglob("*")):
        if path.is_file() and ".cache" not in path.parts:
            _file_fingerprint(path, digest)
    return digest.hexdigest()[:16]


def _fingerprint(directory: Path) -> str:
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    stamp = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    return _directory_fingerprint(str(directory), stamp)


def inputs_fingerprint(cell: Cell) -> dict[str, str | None]:
    """What a cell's result depends on besides vtprune's code and settings: the weights of a local model
    directory and, for the accuracy tasks, the test split it is scored on (sha256 prefixes; ``None`` for a hub
    id, a preset or a tiny model, whose weights are fixed by name and seed). Part of :func:`result_key`, so a
    retrained model or a re-exported split is measured again instead of reusing an old row."""
    model = model_spec(cell.model)
    weights = _fingerprint(Path(model)) if os.path.isdir(model) else None
    data = None
    if cell.task in ACCURACY_TASKS:
        if cell.task == "synth":
            from ..synth import _repo_data_root as data_root
        else:
            from ..synth.video import video_data_root as data_root
        root = data_root()
        # without the shipped files the split is generated in memory by this version of vtprune
        data = _fingerprint(root / "test") if root is not None else "generated"
    return {"model": weights, "data": data}


_UNRESOLVED = object()


def result_key(cell: Cell, options: SweepOptions, resolved: Any = _UNRESOLVED,
               inputs: dict[str, str | None] | None = None) -> str:
    """Resume key of a cell: everything that changes its row's result. Two runs with the same key would
    measure the same thing, so a finished row with this key is not measured again.

    ``resolved``: the method configuration with every default filled in (``Method.describe()``, as rows record
    it under "options"); by default the one this version of vtprune builds for the cell, so a row made with
    other method defaults (an older vtprune) is measured again instead of being reused. ``inputs``: the model's
    and test split's fingerprints (:func:`inputs_fingerprint`, as rows record them under "inputs"); by default
    the current files'."""
    settings: dict[str, Any] = {name: getattr(options, name) for name in _COMMON_SETTINGS}
    settings["inputs"] = inputs_fingerprint(cell) if inputs is None else inputs
    settings["dtype"] = settings["dtype"] or _default_dtype(cell.model)
    settings["device"] = str(torch.device(settings["device"])) if settings["device"] else "cpu"
    settings.update({name: getattr(options, name) for name in _TASK_SETTINGS.get(cell.task, ())})
    if cell.method != UNPRUNED:
        given = options.method_options or {}
        settings["options"] = given.get(cell.method, {}) if "+" not in cell.method else {
            part: given.get(part, {}) for part in cell.method.split("+")}
        if resolved is _UNRESOLVED:
            try:
                built = _build_methods(cell, options)
                resolved = built[0].describe() if len(built) == 1 else [b.describe() for b in built]
            except VTPruneError:  # a cell that cannot be built errors when it runs; its key stays well defined
                resolved = None
        settings["resolved"] = json.loads(json.dumps(resolved, default=str))
    return json.dumps([model_spec(cell.model), cell.method, cell.budget, cell.task, settings], sort_keys=True,
                      default=str)


def row_key(row: dict[str, Any]) -> str:
    """:func:`result_key` of a written row, from the settings it recorded (rows of older versions, which lack
    some settings, get the defaults)."""
    recorded = row.get("bench") or {}
    known = {name: recorded[name] for name in SweepOptions.__dataclass_fields__ if name in recorded}
    try:
        options = SweepOptions(**known)
    except TypeError:
        options = SweepOptions()
    # a row without "inputs" (an older vtprune) matches no current cell: its model or data are unknown
    return result_key(Cell(row["model"], row["method"], row["budget"], row["task"]), options,
                      resolved=row.get("options"), inputs=row.get("inputs") or {"model": "unknown", "data": "unknown"})


def latest_rows(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The newest row of every key, in the order the keys first appear. The results file is append-only, so a
    retried cell (an errored row measured again) appears twice; the later row replaces the earlier one."""
    newest: dict[str, dict[str, Any]] = {}
    for row in rows:
        key = row_key(row)
        newest.pop(key, None)  # re-insert: the order follows the newest rows
        newest[key] = row
    return list(newest.values())


#: the image model(s) of the default ``vtprune bench`` (task synth). The other bundled image model,
#: ``models/micro-qwen2vl``, is one ``--model models/micro-qwen2vl`` away (its table: eval/results/micro-qwen2vl/):
#: the default run covers the Qwen2-VL family through the video micro-VLM (the same architecture), and with three
#: models it took 7.7 min on an idle 2-core machine, over the 6 min the default run is held to.
DEFAULT_IMAGE_MODELS = ("micro-llava",)


def default_models() -> list[str]:
    """The image micro-VLMs of the default run that are present (``DEFAULT_IMAGE_MODELS``)."""
    from ..loading import bundled_model_dir

    found = [bundled_model_dir(name) for name in DEFAULT_IMAGE_MODELS]
    return [str(path) for path in found if path is not None]


#: the bundled video micro-VLM (``vtprune bench`` without arguments also evaluates it on task synth_video)
VIDEO_MODEL = "micro-qwen2vl-video"


def default_video_models() -> list[str]:
    """The bundled video micro-VLM if present (``models/micro-qwen2vl-video``)."""
    from ..loading import bundled_model_dir

    found = bundled_model_dir(VIDEO_MODEL)
    return [] if found is None else [str(found)]


def plan_cells(models: Sequence[str], methods: Sequence[str], budgets: Sequence, tasks: Sequence[str]) -> list[Cell]:
    """Model-major list of cells: per (model, task) the unpruned cell (if "full" is among the budgets), then
    every method at every other budget."""
    budgets = [parse_budget(b) for b in budgets]
    cells = []
    for model in dict.fromkeys(model_spec(m) for m in models):
        for task in tasks:
            if task not in TASKS:
                raise VTPruneError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
            if None in budgets:
                cells.append(Cell(model, UNPRUNED, None, task))
            for method in methods:
                for budget in budgets:
                    if budget is not None:
                        cells.append(Cell(model, method, budget, task))
    seen, unique = set(), []
    for cell in cells:
        if cell.key not in seen:
            seen.add(cell.key)
            unique.append(cell)
    return unique


# ------------------------------------------------------------------------------------------ results file


class ResultsFile:
    """Append-only JSONL with crash-safe appends and resume.

    :meth:`load` only reads (a torn last line -- a kill during a write -- is skipped and counted in
    :attr:`torn_bytes`); only the writer calls :meth:`repair` to cut it off before appending."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.torn_bytes = 0

    def _parse(self) -> tuple[list[dict[str, Any]], int, int]:
        """(rows, end of the last complete line, file size)."""
        if not self.path.exists():
            return [], 0, 0
        if self.path.is_dir():
            raise VTPruneError(f"{self.path} is a directory, not a JSONL results file; pass the file's path.")
        data = self.path.read_bytes()
        rows, good_end, start = [], 0, 0
        while start < len(data):
            newline = data.find(b"\n", start)
            if newline < 0:  # unterminated tail: an interrupted write
                break
            line = data[start:newline]
            if line.strip():
                try:
                    row = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    if data[newline + 1:].strip():
                        raise VTPruneError(f"{self.path}: line {len(rows) + 1} is not JSON and is not the last "
                                           "line; the file is corrupted (fix or remove that line)") from None
                    break
                if not isinstance(row, dict) or not {"model", "method", "budget", "task"} <= set(row):
                    raise VTPruneError(f"{self.path}: line {len(rows) + 1} is not a vtprune bench row (it needs "
                                       "model, method, budget and task); pass a file written by vtprune bench.")
                rows.append(row)
            good_end = start = newline + 1
        return rows, good_end, len(data)

    def load(self) -> list[dict[str, Any]]:
        """Rows already written, in file order. Never writes: a torn last line is skipped, not removed."""
        rows, good_end, size = self._parse()
        self.torn_bytes = size - good_end
        return rows

    def repair(self) -> int:
        """Cut a torn last line off the file so that appends start on a fresh line; returns the bytes cut.
        Only the sweep that owns the file calls this, before it appends."""
        _, good_end, size = self._parse()
        if good_end < size:
            with open(self.path, "r+b") as handle:
                handle.truncate(good_end)
                handle.flush()
                os.fsync(handle.fileno())
        self.torn_bytes = 0
        return size - good_end

    def check_writable(self) -> None:
        """Fail now, before any cell runs, when rows could not be appended to the file."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8"):
                pass
        except OSError as error:
            raise VTPruneError(f"cannot write the results file {self.path} ({error.strerror or error}); pass "
                               "--out with a writable path.") from None

    def done_keys(self) -> set[str]:
        """Result keys of the rows that finished without error (errored cells are measured again)."""
        return {row_key(r) for r in self.load() if r.get("status", "ok") == "ok"}

    def append(self, row: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(row, sort_keys=False, default=_json_default) + "\n"
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())


def _json_default(value: Any):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)


# ------------------------------------------------------------------------------------------ environment


@functools.lru_cache(maxsize=1)
def _git_commit() -> str | None:
    """The checkout's commit (``-dirty`` with uncommitted changes to tracked files), read once per process:
    the code a sweep runs is the code it imported at its start."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    if not commit:
        return None
    return commit + ("-dirty" if dirty else "")


def environment(device: str, dtype: str) -> dict[str, Any]:
    import transformers

    import vtprune

    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or platform.machine())
    return {
        "vtprune": vtprune.__version__, "git_commit": _git_commit(), "torch": torch.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(), "device": str(dev),
        "device_name": name, "dtype": dtype, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None, "host": platform.node(),
    }


# ------------------------------------------------------------------------------------------ models


@dataclass
class LoadedModel:
    spec: str
    model: Any
    processor: Any
    description: str
    random_weights: bool
    dtype: str
    preset: Any = None
    bench_inputs: Any = None   # the latency input (on device)
    video_inputs: Any = None   # the latency input of task synth_video: one clip question (built on first use)
    vqa_samples: dict = field(default_factory=dict)  # limit -> test samples (loaded once per model)
    vqa_cache: dict = field(default_factory=dict)    # evaluate_vqa's processed inputs, shared by the cells


_MODEL_CACHE: dict[tuple, LoadedModel] = {}


def load_for_bench(spec: str, options: SweepOptions) -> LoadedModel:
    """Load (once per process) the model of a cell."""
    key = (spec, options.device, options.dtype, options.seed, options.video_frames)
    if key in _MODEL_CACHE:
        return _MODEL_CACHE[key]
    _MODEL_CACHE.clear()  # one model resident at a time
    from ..loading import load_model

    if spec.startswith("preset:"):
        from .presets import build_preset, load_preset, preset_inputs

        preset = load_preset(spec.split(":", 1)[1])
        dtype = options.dtype or preset.dtype
        model, processor = build_preset(preset, dtype=dtype, device=options.device, seed=options.seed)
        inputs = preset_inputs(preset, processor, device=options.device, dtype=getattr(torch, dtype),
                               video_frames=options.video_frames)
        what = "" if options.video_frames is None else f", a random {options.video_frames}-frame video"
        loaded = LoadedModel(spec, model, processor, f"{preset.name} (random weights, real shapes{what})", True,
                             dtype, preset=preset, bench_inputs=inputs)
    else:
        dtype = options.dtype or "float32"
        model, processor, description = load_model(spec, dtype=dtype, device=options.device,
                                                   trust_remote_code=options.trust_remote_code)
        if spec.startswith("tiny:"):
            model = model.to(getattr(torch, dtype))
        loaded = LoadedModel(spec, model, processor, description, spec.startswith("tiny:"), dtype)
        loaded.bench_inputs = _synth_inputs(loaded, options) if options.video_frames is None \
            else _clip_inputs(loaded, options)
        _warm_up(loaded)
    _MODEL_CACHE[key] = loaded
    return loaded


def _warm_up(loaded: LoadedModel, rounds: int = 3) -> None:
    """A few untimed short generates right after loading a model directory, so that its first cell does not pay
    for lazy initialisation (kernel selection, allocator growth, first-call imports) in its latency (preset
    models, which are large, rely on each cell's own warm-up)."""
    tokenizer = getattr(loaded.processor, "tokenizer", loaded.processor)
    pad = getattr(tokenizer, "pad_token_id", None)
    with torch.inference_mode():
        for _ in range(rounds):
            loaded.model.generate(**loaded.bench_inputs, max_new_tokens=2, do_sample=False, pad_token_id=pad)


def _test_samples(loaded: LoadedModel, limit: int | None, task: str = "synth") -> list:
    from ..synth import load_test_split
    from ..synth.video import load_video_test_split

    key = (task, limit)
    if key not in loaded.vqa_samples:
        loaded.vqa_samples[key] = (load_video_test_split if task == "synth_video" else load_test_split)(limit=limit)
    return loaded.vqa_samples[key]


def _video_inputs(loaded: LoadedModel, options: SweepOptions):
    """One clip question of the synthetic video test split as the latency / FLOPs input of task synth_video;
    a model whose processor takes no videos is refused."""
    from ..synth.video import load_video_test_split

    if loaded.video_inputs is not None:
        return loaded.video_inputs
    if getattr(loaded.processor, "video_processor", None) is None:
        raise VTPruneError(f"{loaded.spec} takes no videos (its processor has no video processor): task "
                           "synth_video needs a video model, e.g. models/micro-qwen2vl-video")
    clip = load_video_test_split(limit=1)[0]
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": clip.question}]}]
    text = loaded.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = loaded.processor(videos=[clip.frames], text=[text], return_tensors="pt").to(options.device)
    if "pixel_values_videos" in inputs:
        inputs["pixel_values_videos"] = inputs["pixel_values_videos"].to(getattr(torch, loaded.dtype))
    loaded.video_inputs = inputs
    return inputs


def _synth_inputs(loaded: LoadedModel, options: SweepOptions):
    """One synthetic test question as the latency input of a (non-preset) model."""
    from ..synth import load_test_split

    sample = load_test_split(limit=1)[0]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sample.question}]}]
    text = loaded.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = loaded.processor(images=[sample.image], text=[text], return_tensors="pt").to(options.device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(getattr(torch, loaded.dtype))
    return inputs


def _clip_inputs(loaded: LoadedModel, options: SweepOptions):
    """``options.video_frames`` frames of the first shipped synthetic clip and its question, as the latency input
    of a (non-preset) model."""
    from ..video import load_video, shipped_clips, video_inputs

    clip = shipped_clips()[0]
    video = load_video(clip["path"], num_frames=options.video_frames)
    return video_inputs(loaded.processor, video, clip["question"], device=options.device,
                        dtype=getattr(torch, loaded.dtype))


# ------------------------------------------------------------------------------------------ one cell


def _method_stage(name: str) -> str | None:
    from ..api import methods

    info = methods().get(name)  # None for a composition ("a+b") or the unpruned model
    return None if info is None else info.stage


def _stats_summary(stats) -> dict[str, Any]:
    sample = stats.samples[0]
    return {
        "visual_tokens": sample.visual_in,
        "equivalent_tokens": stats.equivalent_tokens,
        "layer_lengths": list(sample.layer_lengths),
        "visual_lengths": list(sample.visual_lengths),
        "kept": [len(stage.kept_positions) for stage in sample.stages],
        "merged": [stage.merged for stage in sample.stages],
        "frame_kept": getattr(sample, "frame_kept", None),
        "flops": sample.flops,
        "flops_unpruned": sample.flops_unpruned,
    }


def _unpruned_stats(model, inputs) -> dict[str, Any] | None:
    """FLOPs and token counts of the unpruned prefill, read from a keep-everything pruning (bitwise the
    unpruned forward) in an untimed run."""
    import vtprune

    for name, info in vtprune.methods().items():
        if info.stage != "pre-llm":
            continue
        try:
            with vtprune.pruned(model, name, budget=1.0), torch.inference_mode():
                model(**inputs, use_cache=False)
                return _stats_summary(vtprune.stats(model))
        except VTPruneError:
            return None
    return None


def run_cell(cell: Cell, options: SweepOptions) -> dict[str, Any]:
    """Measure one cell; returns its row: ``status`` "ok"; "error" with the message of a :class:`VTPruneError`
    (a refusal that would recur on a re-run, e.g. a budget the method cannot reach); or "crash" for any other
    exception -- a bug -- with its message and ``traceback``, so one broken cell does not cost the sweep its other
    cells. Neither kind counts as done: a re-run measures them again, and ``vtprune bench`` exits non-zero when a
    cell crashed."""
    import traceback

    import vtprune

    if options.threads:
        torch.set_num_threads(options.threads)
    started = time.time()
    loaded = load_for_bench(cell.model, options)
    env = environment(options.device, loaded.dtype)
    method_options = dict(options.method_options.get(cell.method, {}))
    row: dict[str, Any] = {
        "model": cell.model, "method": cell.method, "budget": cell.budget, "task": cell.task,
        "model_description": loaded.description, "random_weights": loaded.random_weights,
        "options": None, "status": "ok", "error": None, "bench": options.to_dict(),
        "inputs": inputs_fingerprint(cell),
    }
    try:
        if cell.task in ACCURACY_TASKS and loaded.random_weights:
            raise VTPruneError(f"{cell.model} has random weights: accuracy is not reported for it; use "
                               "--tasks latency")
        if cell.method != UNPRUNED:
            built = _build_methods(cell, options)
            row["options"] = built[0].describe() if len(built) == 1 else [b.describe() for b in built]
            row["stage"] = "+".join(b.stage for b in built)
        else:
            row["options"] = {"method": UNPRUNED}
            row["stage"] = None
        if cell.task in ACCURACY_TASKS:
            row.update(_synth_cell(loaded, cell, options, method_options))
        else:
            row.update(_latency_cell(loaded, cell, options, method_options))
    except VTPruneError as error:
        row["status"], row["error"] = "error", f"{type(error).__name__}: {error}"
    except Exception as error:  # a bug in a method or an adapter: recorded loudly, the sweep goes on
        row["status"], row["error"] = "crash", f"{type(error).__name__}: {error}"
        row["traceback"] = traceback.format_exc()
    finally:
        if vtprune.is_pruned(loaded.model):
            vtprune.remove(loaded.model)
    env["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    env["seconds"] = round(time.time() - started, 3)
    env["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    row["env"] = env
    return row


def _build_methods(cell: Cell, options: SweepOptions) -> list:
    """The configured method(s) of a cell: ``a+b`` composes (as in ``vtprune.apply`` and the lmms-eval model),
    the cell's budget split over the stages by the default rule, each with its own ``--option`` values."""
    from ..budget import split_composed_budget
    from ..registry import build_method, method_class

    names = cell.method.split("+")
    shares = [cell.budget] if len(names) == 1 else split_composed_budget(
        cell.budget, [method_class(name).stage for name in names])
    return [build_method(name, budget=share, seed=options.seed, **(options.method_options or {}).get(name, {}))
            for name, share in zip(names, shares, strict=True)]


def _apply(model, cell: Cell, options: SweepOptions, method_options: dict[str, Any]) -> None:
    import vtprune

    if "+" in cell.method:
        vtprune.apply(model, _build_methods(cell, options))
    else:
        vtprune.apply(model, cell.method, budget=cell.budget, seed=options.seed, **method_options)


def _synth_cell(loaded: LoadedModel, cell: Cell, options: SweepOptions, method_options) -> dict[str, Any]:
    import vtprune

    from .accuracy import evaluate_vqa
    from .latency import measure_latency

    inputs = _video_inputs(loaded, options) if cell.task == "synth_video" else loaded.bench_inputs
    samples = _test_samples(loaded, options.limit, cell.task)
    model = loaded.model
    out: dict[str, Any] = {}
    if cell.method == UNPRUNED:
        out.update(_unpruned_stats(model, inputs) or {})
    else:
        _apply(model, cell, options, method_options)
        with torch.inference_mode():
            model(**inputs, use_cache=False)
        out.update(_stats_summary(vtprune.stats(model)))
    accuracy = evaluate_vqa(model, loaded.processor, samples, batch_size=options.batch_size,
                            inputs_cache=loaded.vqa_cache)
    # a short indication on one question (the latency task is the protocol): at most ACCURACY_CELL_REPEATS
    # timed runs, recorded in the row's latency.repeats
    latency = measure_latency(model, inputs, new_tokens=options.new_tokens, warmup=options.warmup,
                              repeats=min(options.repeats, ACCURACY_CELL_REPEATS))
    out.update(
        accuracy=accuracy.overall, accuracy_stderr=accuracy.stderr, accuracy_per_skill=accuracy.per_skill,
        accuracy_n=accuracy.n, predictions=accuracy.predictions, latency=latency.to_dict(),
    )
    return out


def _latency_cell(loaded: LoadedModel, cell: Cell, options: SweepOptions, method_options) -> dict[str, Any]:
    import vtprune

    from .latency import PrefillRunner, expected_cache_bytes, measure_latency, measure_paired
    from .memory import measure_peak_memory

    model, inputs = loaded.model, loaded.bench_inputs
    dtype = getattr(torch, loaded.dtype)
    out: dict[str, Any] = {}
    if cell.method == UNPRUNED:
        out.update(_unpruned_stats(model, inputs) or {})
        _, memory = measure_peak_memory(lambda: PrefillRunner(model, inputs)(), options.device)
        latency = measure_latency(model, inputs, new_tokens=options.new_tokens, warmup=options.warmup,
                                  repeats=options.repeats)
        out.update(latency=latency.to_dict(), memory=memory.to_dict())
        if latency.kv_cache_lengths:
            out["kv_cache_bytes_expected"] = expected_cache_bytes(model.config, latency.kv_cache_lengths, dtype,
                                                                  inputs["input_ids"].shape[0])
        return out
    _apply(model, cell, options, method_options)
    with torch.inference_mode():
        model(**inputs, use_cache=False)
    summary = _stats_summary(vtprune.stats(model))
    out.update(summary)
    _, memory = measure_peak_memory(lambda: PrefillRunner(model, inputs)(), options.device)
    vtprune.remove(model)
    out["memory"] = memory.to_dict()
    native_k = None
    if options.native and _method_stage(cell.method) == "pre-llm":
        native_k = summary["visual_lengths"][0]  # the visual tokens the decoder sees after the pre-LLM stage
    paired = measure_paired(
        model, inputs, install=lambda: _apply(model, cell, options, method_options),
        uninstall=lambda: vtprune.remove(model), native_k=native_k, unpruned=options.paired,
        new_tokens=options.new_tokens, warmup=options.warmup, repeats=options.repeats,
    )
    out["latency"] = paired.pruned.to_dict()
    out["unpruned_latency"] = None if paired.unpruned is None else paired.unpruned.to_dict()
    out["native_k"] = native_k
    out["native_prefill_ms"] = None if paired.native is None else paired.native.to_dict()
    out["native_prefill_cpu_ms"] = None if paired.native_cpu is None else paired.native_cpu.to_dict()
    batch = inputs["input_ids"].shape[0]
    out["kv_cache_bytes_expected"] = expected_cache_bytes(model.config, summary["layer_lengths"], dtype, batch)
    if summary.get("visual_tokens") is not None and paired.unpruned is not None:
        out["kv_cache_bytes_unpruned"] = paired.unpruned.kv_cache_bytes
    return out


# ------------------------------------------------------------------------------------------ the sweep


def run_sweep(
    cells: Sequence[Cell],
    out: str | Path,
    options: SweepOptions,
    *,
    progress: bool = True,
    use_ray: bool = False,
    jobs: int = 1,
    on_row: Callable[[dict[str, Any]], Any] | None = None,
) -> list[dict[str, Any]]:
    """Run every cell not yet in ``out`` and append its row; returns all rows of ``out`` for these cells.

    ``jobs`` > 1 runs the models' cells in that many worker processes (one model per process at a time, see
    :func:`run_cells_in_processes`); ``use_ray`` runs every cell as a Ray task."""
    _git_commit()  # pin the commit before any cell runs
    options.validate()
    cells = [Cell(model_spec(c.model), c.method, c.budget, c.task) for c in cells]
    results = ResultsFile(out)
    results.check_writable()
    results.repair()  # a kill during a write left a torn last line: cut it before appending
    done = results.done_keys()
    todo = [cell for cell in cells if result_key(cell, options) not in done]
    skipped = len(cells) - len(todo)
    if skipped:
        print(f"bench: {skipped} of {len(cells)} cells already in {out} with the same settings: skipped "
              "(another --out, or other settings, measures them again)")
    with _Progress(len(cells), skipped, enabled=progress) as bar:
        def finished(row: dict[str, Any]) -> None:
            results.append(row)
            bar.advance(Cell(row["model"], row["method"], row["budget"], row["task"]).label)
            if on_row is not None:
                on_row(row)

        if use_ray:
            from .ray_runner import run_cells_with_ray

            run_cells_with_ray(todo, options, finished, on_start=bar.describe)
        elif jobs > 1 and len(todo) > 1:
            run_cells_in_processes(todo, options, finished, jobs=jobs, on_start=bar.describe)
        else:
            for cell in todo:
                bar.describe(cell.label)
                finished(run_cell(cell, options))
    wanted = {result_key(cell, options) for cell in cells}
    return [row for row in latest_rows(results.load()) if row_key(row) in wanted]


def _model_worker(worker: int, options: SweepOptions, threads: int, inbox, queue) -> None:
    """Worker process of :func:`run_cells_in_processes`: asks for a cell (naming the model it has loaded), runs
    it, reports its row on ``queue``, until the parent sends None."""
    import traceback

    torch.set_num_threads(threads)
    try:
        loaded = None
        while True:
            queue.put(("next", (worker, loaded)))
            cell = inbox.get()
            if cell is None:
                break
            queue.put(("start", cell.label))
            row = run_cell(cell, options)
            loaded = cell.model
            row.setdefault("env", {})["runner"] = f"process ({threads} thread{'s' if threads > 1 else ''})"
            queue.put(("row", row))
    except BaseException:  # report, then let the parent raise
        queue.put(("error", traceback.format_exc()))
    finally:
        queue.put(("done", None))


def _next_cell(remaining: dict[str, list[Cell]], loaded: str | None, held: set[str]) -> Cell | None:
    """The next cell for a worker that has ``loaded`` resident: one of that model while any is left, else one of
    the model with the most cells left that no other worker holds (``held``), else of the model with the most
    cells left (two workers then share the model's last cells), else None."""
    if loaded is not None and remaining.get(loaded):
        return remaining[loaded].pop(0)
    left = [(len(cells), -i, model) for i, (model, cells) in enumerate(remaining.items()) if cells]
    if not left:
        return None
    free = [entry for entry in left if entry[2] not in held]
    model = max(free or left)[2]
    return remaining[model].pop(0)


def run_cells_in_processes(cells: Sequence[Cell], options: SweepOptions, finished: Callable[[dict[str, Any]], Any],
                           *, jobs: int, on_start: Callable[[str], Any] | None = None) -> None:
    """Run ``cells`` in up to ``jobs`` spawned worker processes, dealt one cell at a time as workers become free:
    a worker gets the next cell of the model it has loaded while that model has cells left, then moves to the
    model with the most cells left that no other worker is on (loading it; one model resident per worker), and
    when none is left, helps with another worker's model. So the workers stay busy until the end (the cells of
    the models differ in cost) and each model is loaded once per worker at most -- near the end two workers
    may hold the same model (peak memory: ``jobs`` x the largest model; use ``jobs=1`` for large models).
    Rows reach ``finished`` in the parent as cells complete, so the results file has one writer and resume
    works as in a serial sweep. Each worker uses ``options.threads`` torch threads, else an equal share of
    the CPU cores. Latency measured this way shares the machine between the workers: use ``jobs=1`` when the
    timings matter more than the wall time of the sweep (accuracy, FLOPs and token counts are unaffected)."""
    import multiprocessing
    from queue import Empty

    remaining: dict[str, list[Cell]] = {}
    for cell in cells:
        remaining.setdefault(cell.model, []).append(cell)
    jobs = max(1, min(jobs, len(cells)))
    threads = options.threads or max(1, (os.cpu_count() or 1) // jobs)
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    inboxes = [context.Queue() for _ in range(jobs)]
    workers = [context.Process(target=_model_worker, args=(i, options, threads, inboxes[i], queue), daemon=True)
               for i in range(jobs)]
    for worker in workers:
        worker.start()
    holding: dict[int, str | None] = {}
    running, errors = len(workers), []
    try:
        while running:
            try:
                kind, payload = queue.get(timeout=2.0)
            except Empty:  # a worker killed from outside (OOM, signal) never reports "done"
                if not any(worker.is_alive() for worker in workers):
                    codes = [worker.exitcode for worker in workers]
                    errors.append(f"worker processes exited without finishing (exit codes {codes})")
                    break
                continue
            if kind == "next":
                index, loaded = payload
                held = {model for i, model in holding.items() if i != index and model is not None}
                cell = _next_cell(remaining, loaded, held)
                holding[index] = None if cell is None else cell.model
                inboxes[index].put(cell)
            elif kind == "start" and on_start is not None:
                on_start(payload)
            elif kind == "row":
                finished(payload)
            elif kind == "error":
                errors.append(payload)
            elif kind == "done":
                running -= 1
    finally:
        for inbox in inboxes:  # a worker still waiting for a cell (after another's error) stops
            inbox.put(None)
        for worker in workers:
            worker.join(timeout=10)
            if worker.is_alive():
                worker.terminate()
    if errors:
        raise RuntimeError("a bench worker process failed:\n" + "\n".join(errors))


class _Progress:
    """A rich progress bar (cells done / total, elapsed, remaining); silent when disabled."""

    def __init__(self, total: int, done: int, enabled: bool = True):
        self.total, self.done, self.enabled = total, done, enabled
        self._progress = None
        self._task = None

    def __enter__(self):
        if self.enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(TextColumn("[bold]bench[/]"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.description}"))
            self._progress.start()
            self._task = self._progress.add_task("", total=self.total, completed=self.done)
        return self

    def describe(self, text: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, description=text)

    def advance(self, text: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=1, description=f"done: {text}")

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()


def iter_rows(paths: Iterable[str | Path], on_torn: Callable[[Path, int], Any] | None = None) -> list[dict[str, Any]]:
    """Every row of the results files, newest per key (:func:`latest_rows`). Read-only: a torn last line is
    skipped and reported to ``on_torn(path, bytes)``."""
    rows: list[dict[str, Any]] = []
    for path in paths:
        results = ResultsFile(path)
        if not results.path.is_file():
            raise VTPruneError(f"results file {path} not found; pass a JSONL file written by vtprune bench.")
        rows.extend(results.load())
        if results.torn_bytes and on_torn is not None:
            on_torn(results.path, results.torn_bytes)
    return latest_rows(rows)
