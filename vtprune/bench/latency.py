"""Wall-clock latency of (pruned) VLM forwards: prefill, time to first token, per-token decode, end to end.

What is measured, per call of :func:`measure_latency`:

``prefill``     one forward of the whole model on the prompt (vision tower, projector, pruning, decoder,
                LM head on the last position), with a KV cache: ``model(**inputs, use_cache=True,
                logits_to_keep=1)`` -- the work ``generate`` does before its first token.
``select``      the part of that prefill spent in the method's own selection (``Method.select`` /
                ``LayerMethod.score``), timed inside the engine (see :mod:`vtprune.engine.timing`);
``engine``      everything vtprune adds to the prefill (layouts, planning, selection, gathers, masks).
``ttft``        ``generate`` from the call to the first token's logits (prefill + generate's overhead).
``decode``      per generated token after the first: the interval between consecutive logits in one
                ``generate`` call (median over all intervals of all repeats).
``e2e``         the whole ``generate`` call for ``new_tokens`` tokens (``min_new_tokens`` = ``max_new_tokens``,
                so EOS never cuts a run short).

Protocol: ``warmup`` untimed runs, then ``repeats`` (>= 5 by default) timed runs; each result keeps every
sample and reports the median and the spread (min, max, quartiles). On CUDA the clock is a pair of
``torch.cuda.Event`` s with a ``synchronize`` before reading; on CPU it is ``time.perf_counter``.

:func:`native_k_prefill` times the *physical limit* of pre-LLM pruning to ``k`` tokens: the same model on
an input that has only ``k`` visual tokens from the start -- the vision tower and projector run on the full
image exactly as before, and the decoder and LM head run on the text plus the first ``k`` visual features,
with no pruning machinery at all.
"""

from __future__ import annotations

import inspect
import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .. import compat

__all__ = [
    "Timing",
    "Clock",
    "SectionClock",
    "StepClock",
    "LatencyResult",
    "PairedLatency",
    "PrefillRunner",
    "GenerateRunner",
    "time_call",
    "measure_latency",
    "measure_paired",
    "native_k_prefill",
    "native_k_inputs",
]


# ------------------------------------------------------------------------------------------- summaries


@dataclass
class Timing:
    """Repeated measurements of one quantity, in milliseconds."""

    samples: list[float]

    @property
    def n(self) -> int:
        return len(self.samples)

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else float("nan")

    @property
    def min(self) -> float:
        return min(self.samples) if self.samples else float("nan")

    @property
    def max(self) -> float:
        return max(self.samples) if self.samples else float("nan")

    def quantile(self, q: float) -> float:
        """Linear-interpolated quantile ``q`` in [0, 1]."""
        if not self.samples:
            return float("nan")
        ordered = sorted(self.samples)
        pos = q * (len(ordered) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(ordered) - 1)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)

    @property
    def spread(self) -> float:
        """Inter-quartile range relative to the median (0.05 = the middle half lies within 5%)."""
        med = self.median
        return (self.quantile(0.75) - self.quantile(0.25)) / med if med else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {"median": self.median, "p25": self.quantile(0.25), "p75": self.quantile(0.75), "min": self.min,
                "max": self.max, "n": self.n, "samples": [round(s, 4) for s in self.samples]}


# --------------------------------------------------------------------------------------------- clocks


def _device_of(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


class Clock:
    """Start/stop timing of a code region: CUDA events on a CUDA device, ``perf_counter`` otherwise.

    On CPU every mark also reads the process CPU time (``time.process_time``): with one torch thread it equals
    the wall time of an idle machine, and unlike the wall time it does not grow while other processes hold
    the cores, so on a shared machine it is the load-independent measure (:meth:`cpu_ms`).
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.cuda = torch.device(device).type == "cuda"

    def mark(self):
        """A point in time: a recorded CUDA event, or ``(perf_counter, process_time)``."""
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter(), time.process_time()

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def elapsed_ms(self, start, end) -> float:
        """Milliseconds between two marks (call :meth:`synchronize` first on CUDA)."""
        if self.cuda:
            return float(start.elapsed_time(end))
        return (end[0] - start[0]) * 1000.0

    def cpu_ms(self, start, end) -> float | None:
        """Process CPU milliseconds between two marks (None on CUDA)."""
        if self.cuda:
            return None
        return (end[1] - start[1]) * 1000.0


class SectionClock:
    """The engine's timer (``session.timer``): accumulates the time spent in named sections per forward.

    On CUDA it records events and never synchronises inside the forward; :meth:`totals` synchronises.
    Nested sections of different names are allowed (``engine`` contains ``select``).
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.clock = Clock(device)
        self._marks: dict[str, list[tuple[Any, Any]]] = {}

    @contextmanager
    def section(self, name: str):
        start = self.clock.mark()
        try:
            yield
        finally:
            self._marks.setdefault(name, []).append((start, self.clock.mark()))

    def reset(self) -> None:
        self._marks = {}

    def totals(self) -> dict[str, float]:
        """Milliseconds per section since the last :meth:`reset`."""
        self.clock.synchronize()
        return {name: sum(self.clock.elapsed_ms(a, b) for a, b in marks) for name, marks in self._marks.items()}

    def cpu_totals(self) -> dict[str, float]:
        """CPU milliseconds per section (empty on CUDA)."""
        if self.clock.cuda:
            return {}
        return {name: sum(self.clock.cpu_ms(a, b) for a, b in marks) for name, marks in self._marks.items()}


class StepClock:
    """A ``generate`` logits processor that marks the time each new token's logits are ready.

    It returns the scores unchanged. Mark ``i`` follows the forward that produced token ``i``: mark 0
    ends the prefill, mark ``i > 0`` ends decode step ``i``.
    """

    def __init__(self, clock: Clock):
        self.clock = clock
        self.marks: list[Any] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.marks.append(self.clock.mark())
        return scores


def time_call(fn: Callable[[], Any], *, device: torch.device | str = "cpu", warmup: int = 1,
              repeats: int = 5) -> Timing:
    """Median-ready timings of ``fn()`` (``warmup`` untimed calls first)."""
    clock = Clock(device)
    for _ in range(warmup):
        fn()
    clock.synchronize()
    samples = []
    for _ in range(repeats):
        start = clock.mark()
        fn()
        end = clock.mark()
        clock.synchronize()
        samples.append(clock.elapsed_ms(start, end))
    return Timing(samples)


# ------------------------------------------------------------------------------------------ kv cache


def cache_bytes(cache: Any) -> int:
    """Bytes held by the key and value tensors of a transformers ``Cache`` (every layer)."""
    return sum(t.numel() * t.element_size() for keys, values in compat.cache_layer_tensors(cache)
               for t in (keys, values) if t is not None)


def cache_lengths(cache: Any) -> list[int]:
    """Tokens cached per decoder layer."""
    return [int(keys.shape[-2]) if keys is not None else 0 for keys, _ in compat.cache_layer_tensors(cache)]


def expected_cache_bytes(text_config: Any, layer_lengths: list[int], dtype: torch.dtype, batch: int = 1) -> int:
    """What a dense cache of ``layer_lengths[i]`` tokens per layer holds: 2 (k, v) x kv_heads x head_dim."""
    tc = getattr(text_config, "text_config", None) or text_config
    heads = int(tc.num_attention_heads)
    kv_heads = int(getattr(tc, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(tc, "head_dim", None) or tc.hidden_size // heads)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    return sum(2 * batch * n * kv_heads * head_dim * itemsize for n in layer_lengths)


# -------------------------------------------------------------------------------------------- results

_QUANTITIES = ("prefill", "select", "engine", "ttft", "decode", "e2e")


@dataclass
class LatencyResult:
    """All timings in milliseconds (see the module docstring for what each one covers).

    ``cpu`` holds the same quantities in process CPU time (CPU devices only; see :class:`Clock`).
    """

    prefill: Timing
    select: Timing | None = None
    engine: Timing | None = None
    ttft: Timing | None = None
    decode: Timing | None = None
    e2e: Timing | None = None
    cpu: dict[str, Timing] = field(default_factory=dict)
    new_tokens: int = 0
    kv_cache_bytes: int = 0
    kv_cache_lengths: list[int] = field(default_factory=list)
    warmup: int = 1
    repeats: int = 5

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in _QUANTITIES:
            value = getattr(self, name)
            out[f"{name}_ms"] = None if value is None else value.to_dict()
        for name in _QUANTITIES:
            value = self.cpu.get(name)
            out[f"{name}_cpu_ms"] = None if value is None else value.to_dict()
        out.update(new_tokens=self.new_tokens, kv_cache_bytes=self.kv_cache_bytes,
                   kv_cache_lengths=list(self.kv_cache_lengths), warmup=self.warmup, repeats=self.repeats)
        return out


def _session(model: nn.Module):
    from ..engine.session import SESSION_ATTRIBUTE

    return getattr(model, SESSION_ATTRIBUTE, None)


class PrefillRunner:
    """One timed prefill of ``model`` on ``inputs`` per call.

    Returns ``(times, output)``: ``times`` maps ``prefill`` (and, when the model is pruned, ``select`` and
    ``engine``, see :mod:`vtprune.engine.timing`) to ``(wall_ms, cpu_ms)`` (``cpu_ms`` None on CUDA).
    """

    def __init__(self, model: nn.Module, inputs: dict[str, Any]):
        self.model, self.inputs = model, inputs
        self.clock = Clock(_device_of(model))
        self.extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}

    def __call__(self):
        session = _session(self.model)
        sections = SectionClock(_device_of(self.model)) if session is not None else None
        previous = None if session is None else session.timer
        try:
            if session is not None:
                session.timer = sections
            self.clock.synchronize()
            start = self.clock.mark()
            with torch.inference_mode():
                out = self.model(**self.inputs, use_cache=True, **self.extra)
            end = self.clock.mark()
            self.clock.synchronize()
        finally:
            if session is not None:
                session.timer = previous
        times = {"prefill": (self.clock.elapsed_ms(start, end), self.clock.cpu_ms(start, end))}
        if sections is not None:
            wall, cpu = sections.totals(), sections.cpu_totals()
            for name in ("select", "engine"):
                times[name] = (wall.get(name, 0.0), cpu.get(name, 0.0) if not self.clock.cuda else None)
        return times, out


class GenerateRunner:
    """One timed greedy ``generate`` of exactly ``new_tokens`` tokens per call.

    Returns ``{"ttft": (wall, cpu), "e2e": (wall, cpu), "decode": [(wall, cpu), ...]}``.
    """

    def __init__(self, model: nn.Module, inputs: dict[str, Any], new_tokens: int):
        if new_tokens < 1:
            raise ValueError(f"new_tokens must be >= 1, got {new_tokens}")
        self.model, self.inputs, self.new_tokens = model, inputs, new_tokens
        self.clock = Clock(_device_of(model))

    def __call__(self):
        from transformers import LogitsProcessorList

        steps = StepClock(self.clock)
        self.clock.synchronize()
        start = self.clock.mark()
        with torch.inference_mode():
            self.model.generate(**self.inputs, max_new_tokens=self.new_tokens, min_new_tokens=self.new_tokens,
                                do_sample=False, logits_processor=LogitsProcessorList([steps]))
        end = self.clock.mark()
        self.clock.synchronize()
        if not steps.marks:
            raise RuntimeError("generate produced no token; cannot time it")
        c = self.clock
        return {
            "ttft": (c.elapsed_ms(start, steps.marks[0]), c.cpu_ms(start, steps.marks[0])),
            "e2e": (c.elapsed_ms(start, end), c.cpu_ms(start, end)),
            "decode": [(c.elapsed_ms(a, b), c.cpu_ms(a, b)) for a, b in zip(steps.marks, steps.marks[1:], strict=False)],
        }


class _Collector:
    """Accumulates runner outputs into a :class:`LatencyResult`."""

    def __init__(self, warmup: int, repeats: int, new_tokens: int):
        self.warmup, self.repeats, self.new_tokens = warmup, repeats, new_tokens
        self.wall: dict[str, list[float]] = {name: [] for name in _QUANTITIES}
        self.cpu: dict[str, list[float]] = {name: [] for name in _QUANTITIES}
        self.kv_cache_bytes = 0
        self.kv_cache_lengths: list[int] = []

    def _add(self, name: str, pair) -> None:
        wall, cpu = pair
        self.wall[name].append(wall)
        if cpu is not None:
            self.cpu[name].append(cpu)

    def prefill(self, sample) -> None:
        times, out = sample
        for name, pair in times.items():
            self._add(name, pair)
        cache = compat.output_cache(out)
        self.kv_cache_bytes = cache_bytes(cache)
        self.kv_cache_lengths = cache_lengths(cache) if cache is not None else []

    def generate(self, sample) -> None:
        self._add("ttft", sample["ttft"])
        self._add("e2e", sample["e2e"])
        for pair in sample["decode"]:
            self._add("decode", pair)

    def finish(self) -> LatencyResult:
        def timing(values):
            return Timing(values) if values else None

        return LatencyResult(
            prefill=Timing(self.wall["prefill"]), select=timing(self.wall["select"]), engine=timing(self.wall["engine"]),
            ttft=timing(self.wall["ttft"]), decode=timing(self.wall["decode"]), e2e=timing(self.wall["e2e"]),
            cpu={name: Timing(values) for name, values in self.cpu.items() if values},
            new_tokens=self.new_tokens, kv_cache_bytes=self.kv_cache_bytes,
            kv_cache_lengths=self.kv_cache_lengths, warmup=self.warmup, repeats=self.repeats,
        )


def measure_latency(
    model: nn.Module,
    inputs: dict[str, Any],
    *,
    new_tokens: int = 8,
    warmup: int = 1,
    repeats: int = 5,
) -> LatencyResult:
    """Time ``model`` (pruned or not, as it is) on ``inputs`` (a processor's output, on the model's device).

    ``new_tokens`` = 0 skips the ``generate`` measurements (prefill only).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    collector = _Collector(warmup, repeats, new_tokens)
    prefill = PrefillRunner(model, inputs)
    for i in range(warmup + repeats):
        sample = prefill()
        if i >= warmup:
            collector.prefill(sample)
        del sample
    if new_tokens > 0:
        generate = GenerateRunner(model, inputs, new_tokens)
        for i in range(warmup + repeats):
            sample = generate()
            if i >= warmup:
                collector.generate(sample)
    return collector.finish()


@dataclass
class PairedLatency:
    """A pruned configuration and its references, measured in interleaved rounds (see :func:`measure_paired`)."""

    pruned: LatencyResult
    unpruned: LatencyResult | None = None
    native: Timing | None = None     # native-K prefill (wall)
    native_cpu: Timing | None = None  # native-K prefill (process CPU time; CPU devices)
    native_k: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"pruned": self.pruned.to_dict(), "unpruned": None if self.unpruned is None else self.unpruned.to_dict(),
                "native_k": self.native_k, "native_prefill_ms": None if self.native is None else self.native.to_dict(),
                "native_prefill_cpu_ms": None if self.native_cpu is None else self.native_cpu.to_dict()}


def _prefill_and_generate(model: nn.Module, inputs: dict[str, Any], new_tokens: int, collector) -> None:
    """One prefill and (``new_tokens`` > 0) one generate, recorded in ``collector`` (None: warm-up, untimed)."""
    sample = PrefillRunner(model, inputs)()
    if collector is not None:
        collector.prefill(sample)
    del sample
    if new_tokens > 0:
        sample = GenerateRunner(model, inputs, new_tokens)()
        if collector is not None:
            collector.generate(sample)


def measure_paired(
    model: nn.Module,
    inputs: dict[str, Any],
    *,
    install: Callable[[], Any],
    uninstall: Callable[[], Any],
    native_k: int | None = None,
    unpruned: bool = True,
    new_tokens: int = 8,
    warmup: int = 1,
    repeats: int = 5,
) -> PairedLatency:
    """Time the pruned model against its references in interleaved rounds.

    Each round runs, in this order: ``install()``, the pruned prefill and generate, ``uninstall()``, then the
    unpruned prefill and generate (``unpruned=True``) and the native-K prefill (``native_k``). A load change
    on a shared machine then hits the pruned run and its references alike, so their ratios (speedup,
    pruned/native) are far steadier than ratios of separately measured medians. ``model`` must be unpruned
    when called and is left unpruned.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    pruned_c = _Collector(warmup, repeats, new_tokens)
    ref_c = _Collector(warmup, repeats, new_tokens) if unpruned else None
    native_fn = native_k_prefill(model, inputs, native_k) if native_k is not None else None
    clock = Clock(_device_of(model))
    native_ms: list[float] = []
    native_cpu: list[float] = []
    for i in range(warmup + repeats):
        timed = i >= warmup
        install()
        try:
            _prefill_and_generate(model, inputs, new_tokens, pruned_c if timed else None)
        finally:
            uninstall()
        if ref_c is not None:
            _prefill_and_generate(model, inputs, new_tokens, ref_c if timed else None)
        if native_fn is not None:
            clock.synchronize()
            start = clock.mark()
            native_fn()
            end = clock.mark()
            clock.synchronize()
            if timed:
                native_ms.append(clock.elapsed_ms(start, end))
                if not clock.cuda:
                    native_cpu.append(clock.cpu_ms(start, end))
    return PairedLatency(pruned=pruned_c.finish(), unpruned=None if ref_c is None else ref_c.finish(),
                         native=Timing(native_ms) if native_fn is not None else None,
                         native_cpu=Timing(native_cpu) if native_cpu else None, native_k=native_k)


# ------------------------------------------------------------------------------------------- native-K


def _is_video(inputs: dict[str, Any]) -> bool:
    """Whether the visual input of ``inputs`` is a video (``pixel_values_videos``, no image pixels)."""
    return inputs.get("pixel_values_videos") is not None and inputs.get("pixel_values") is None


def _image_token_id(config: Any, video: bool = False) -> int:
    """The placeholder id of an image (or, with ``video``, of a video) in the input ids."""
    names = ("video_token_id", "video_token_index") if video else ("image_token_id", "image_token_index")
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    kind = "video" if video else "image"
    raise ValueError(f"{type(config).__name__} has no {kind}_token_id; native-K needs the {kind} placeholder id")


def _language_parts(model: nn.Module):
    """(decoder, lm_head, input embedding) of a conditional-generation VLM."""
    from ..adapters.base import adapter_for

    try:
        lm = adapter_for(model).language_model
    except Exception:  # families without a vtprune adapter yet
        lm = model.model.language_model
    return lm, model.get_output_embeddings(), model.get_input_embeddings()


def native_k_inputs(model: nn.Module, inputs: dict[str, Any], k: int) -> dict[str, torch.Tensor]:
    """The decoder inputs of a sequence whose image has only ``k`` visual tokens from the start.

    Keeps every text token and the first ``k`` image placeholders of each sample (batch rows must hold the
    same number of image tokens), with their embeddings; the vision features are filled in by
    :func:`native_k_prefill`. Returns ``input_ids`` [B, L'], ``attention_mask`` [B, L'] and ``visual`` [B, L']
    (bool, the kept placeholder columns). A video input (``pixel_values_videos``) keeps the first ``k`` video
    placeholders: its first frames (frame-major order).
    """
    ids = inputs["input_ids"]
    is_image = ids == _image_token_id(model.config, video=_is_video(inputs))
    counts = is_image.sum(-1)
    if bool((counts != counts[0]).any()):
        raise ValueError("native-K needs the same number of image tokens in every row of the batch")
    if k > int(counts[0]):
        raise ValueError(f"k={k} exceeds the {int(counts[0])} image tokens of the input")
    rank = torch.cumsum(is_image.long(), dim=-1)  # 1-based index of each image token within its row
    keep = ~is_image | (rank <= k)
    rows = keep.sum(-1)
    if bool((rows != rows[0]).any()):  # pragma: no cover - same counts imply same lengths
        raise ValueError("rows of different lengths after dropping image tokens")
    new_ids = ids[keep].view(ids.shape[0], -1)
    mask = inputs.get("attention_mask")
    new_mask = mask[keep].view(ids.shape[0], -1) if mask is not None else torch.ones_like(new_ids)
    return {"input_ids": new_ids, "attention_mask": new_mask, "visual": is_image[keep].view(ids.shape[0], -1)}


def _flatten_features(out: Any) -> torch.Tensor:
    feats = getattr(out, "pooler_output", None)
    if feats is None:
        feats = out
    if isinstance(feats, (list, tuple)):
        feats = torch.cat([f.reshape(-1, f.shape[-1]) for f in feats])
    return feats.reshape(-1, feats.shape[-1])


def native_k_prefill(model: nn.Module, inputs: dict[str, Any], k: int) -> Callable[[], torch.Tensor]:
    """A function running the native-K prefill of ``model`` on ``inputs`` (see the module docstring).

    The returned callable runs: the model's own ``get_image_features`` on the full image (vision tower +
    projector, same cost as in the pruned and the unpruned forward; for a video ``get_video_features`` on every
    frame, incl. OneVision's pooling), the input embedding of the shortened sequence with the first ``k``
    feature rows of each sample in its visual slots, the decoder with a fresh KV cache, and the LM head on the
    last position. It returns the last-position logits.
    """
    lm, lm_head, embed = _language_parts(model)
    core = getattr(model, "model", model)
    entry = compat.VIDEO_FEATURES if _is_video(inputs) else compat.IMAGE_FEATURES
    get_features = getattr(core, entry, None) or getattr(model, entry)
    accepted = set(inspect.signature(get_features).parameters)
    vision_kwargs = {name: value for name, value in inputs.items()
                     if name in accepted and name not in ("input_ids", "attention_mask")}
    short = native_k_inputs(model, inputs, k)
    batch = short["input_ids"].shape[0]

    def run() -> torch.Tensor:
        with torch.inference_mode():
            feats = _flatten_features(get_features(**vision_kwargs))  # [total visual tokens, D]
            per_sample = feats.shape[0] // batch
            chosen = feats.view(batch, per_sample, -1)[:, :k].reshape(-1, feats.shape[-1])
            embeds = embed(short["input_ids"])
            embeds = embeds.masked_scatter(short["visual"].unsqueeze(-1), chosen.to(embeds.dtype))
            hidden = lm(inputs_embeds=embeds, attention_mask=short["attention_mask"], use_cache=True)
            hidden = hidden.last_hidden_state if hasattr(hidden, "last_hidden_state") else hidden[0]
            return lm_head(hidden[:, -1:])

    return run
