"""The engine: one object per pruned model that owns hooks, positions, masks, the KV-cache view and stats.

Hooks (all per instance, all removed by :meth:`PruneSession.remove`):

* a forward pre-hook on the top-level model notes whether this call carries images (a prefill to prune);
* adapter hooks on the vision tower / projector capture the signals the methods asked for;
* a forward pre-hook on the language model replaces ``inputs_embeds``, ``attention_mask`` and
  ``position_ids`` by the pruned, re-padded batch at prefill, and during cached decoding translates the
  caller's (unpruned) mask and positions to the pruned cache;
* a forward hook on the top-level model computes the loss on the kept positions when labels were given.
"""

from __future__ import annotations

import copy
import functools
import inspect
import threading
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import compat
from ..adapters.base import ENGINE_SIGNALS, IMAGE, VIDEO, Adapter, SignalStore
from ..budget import split_equal, split_proportional, tokens_for
from ..engine.decode_stage import DecodeStage
from ..engine.layer_stage import (
    LayerRun,
    Segment,
    cut_cache_to_final,
    decode_segment_inputs,
    prune_at_layer,
    real_columns,
)
from ..engine.layout import ImageSpan, SampleLayout, TokenGroup
from ..engine.positions import layer_rows
from ..engine.sequence import PrunedBatch, SamplePlan, assemble
from ..engine.side_inputs import MergedRows, gather_side_rows, merged_side_rows, visual_row_index
from ..engine.timing import section
from ..engine.vit_stage import SIZE_TABLE, VitStage, check_composition
from ..errors import SilentlyUnprunedError, UnsupportedModelError, VTPruneError
from ..registry import (
    DECODE,
    IN_LLM,
    IN_VIT,
    PRE_LLM,
    VIDEO_POLICIES,
    Method,
    Selection,
    VideoClip,
    VisionTower,
    VisualGroup,
)
from ..stats import PruneStats, SampleStats, StageStats, merged_positions

SESSION_ATTRIBUTE = "_vtprune_session"


#: loss keyword arguments of the HF causal-LM loss passed through to it as given
_LOSS_KWARGS = ("num_items_in_batch", "ignore_index")


@dataclass
class _Targets:
    """The caller's training targets, held back from the model and applied to the pruned sequence."""

    labels: torch.Tensor | None
    shift_labels: torch.Tensor | None
    loss_kwargs: dict[str, Any]


@dataclass
class _Prefill:
    call: dict[str, Any]


@dataclass
class _DecodeState:
    """Bookkeeping that maps the caller's unpruned coordinates onto the pruned cache."""

    cache: Any                    # the Cache object filled by the pruned prefill
    cache_len: int                # tokens in the cache (pruned coordinates)
    prompt_len: int               # unpruned prefill length (columns of the caller's mask before decoding)
    seen_len: int                 # unpruned tokens seen so far (prompt + decoded)
    prompt_mask: torch.Tensor     # [B, Lp] mask of the pruned prefill
    position_shift: torch.Tensor  # [..., B] unwrapped position - pruned position


@dataclass
class _SideInputs:
    """The unpruned per-visual-token decoder inputs of the current prefill (Qwen3-VL deepstack)."""

    mask: torch.Tensor               # [B, L] visual positions
    rows: list[torch.Tensor]         # per injection point [n_visual, D]
    merged: list[MergedRows | None]  # per sample: rows of its pre-LLM merged tokens


@dataclass
class _MergeRecord:
    """How one group's merged tokens were built (for side inputs): original positions and weights."""

    anchors: torch.Tensor           # LongTensor[m] anchor positions
    group_positions: torch.Tensor   # LongTensor[N] positions of the group's tokens
    weights: torch.Tensor | None    # [m, N] or None when the method gave none


def _alive_subgroup(group: TokenGroup, alive: torch.Tensor) -> TokenGroup:
    """The tokens of ``group`` still alive after an in-ViT stage (a grid only when all are)."""
    keep = alive[group.members]
    if bool(keep.all()):
        return group
    return TokenGroup(group.members[keep], None, None, group.vision_row[keep], group.patch_index[keep])


def _set_frame_kept(sample: SampleStats, layout: SampleLayout, source: torch.Tensor,
                    merged: torch.Tensor | None) -> None:
    """``sample.frame_kept``: per frame of the sample's videos, the tokens of the final sequence that are its kept
    content tokens or merged tokens anchored in it. ``source`` [n]: original position of each token of the final
    sequence (a merged token: its anchor's), ``merged`` [n] flags the merged ones (None: none)."""
    videos = layout.videos
    if not videos:
        return
    if merged is None:
        merged = torch.zeros_like(source, dtype=torch.bool)
    counts, frames = [], []
    for video in videos:
        inside = torch.isin(source, video.positions)
        span_index = torch.searchsorted(video.positions, source[inside])
        counted = ~video.structural[span_index] | merged[inside]  # kept content tokens, merged tokens
        per_frame = torch.bincount(video.frame_of()[span_index][counted], minlength=video.num_frames)
        counts.extend(int(c) for c in per_frame)
        frames.append(video.num_frames)
    sample.frame_kept, sample.video_frames = counts, frames


def _mix_seed(seed: int, *parts: int) -> int:
    value = seed & 0xFFFFFFFF
    for part in parts:
        value = (value * 1_000_003 + part + 1) & 0x7FFFFFFF
    return value


def _bound_call(signature: inspect.Signature, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The arguments of a call by parameter name, with the ``**kwargs`` catch-all flattened in (callers may use
    a deprecated keyword, e.g. ``past_key_values``, that the forward renames inside)."""
    call = signature.bind_partial(*args, **kwargs).arguments
    extra = call.pop("kwargs", None)
    return {**call, **extra} if isinstance(extra, dict) else call


class _CallState(threading.local):
    """What the engine keeps between the hooks of one forward (and between the forwards of one ``generate``),
    one per thread: one pruned model can serve several threads at once, each call seeing only its own state."""

    def __init__(self) -> None:
        self.pending: _Prefill | None = None
        self.labels: _Targets | None = None        # targets of the current call, for the loss on kept positions
        self.final_columns: list | None = None     # in-LLM pruning: the columns the last layer ran on
        self.decode: _DecodeState | None = None
        self.batch: PrunedBatch | None = None
        self.side: _SideInputs | None = None
        self.merge_records: list[list[_MergeRecord]] = []
        self.run: LayerRun | None = None
        self.run_mask: torch.Tensor | None = None
        self.run_layouts: list[SampleLayout] = []
        self.run_samples: list[SampleStats] = []
        self.segments: list[Segment] = []
        self.step: tuple | None = None
        self.layouts: list[SampleLayout] = []


class _PerThread:
    """A session attribute stored in the session's :class:`_CallState` (``self._x`` -> ``self._local.x``)."""

    def __set_name__(self, owner, name: str) -> None:
        self.field = name.lstrip("_")

    def __get__(self, session, owner=None):
        return self if session is None else getattr(session._local, self.field)

    def __set__(self, session, value) -> None:
        setattr(session._local, self.field, value)


class _Wrapper:
    """A per-instance stand-in for a transformers function (instance attribute shadowing the class method,
    deleted on remove): ``session.<handler>(original, args, kwargs)``. An object rather than a closure, so that
    ``copy.deepcopy`` of a pruned model gives the copy a wrapper bound to the copy's session and module."""

    def __init__(self, session: PruneSession, handler: str, original) -> None:
        self.session, self.handler, self.original = session, handler, original
        self.signature = inspect.signature(original)
        self.__wrapped__ = original  # inspect.signature (used by generate to filter arguments) sees the original
        self.__name__ = getattr(original, "__name__", handler)
        self.__doc__ = getattr(original, "__doc__", None)

    def __call__(self, *args, **kwargs):
        call = _bound_call(self.signature, args, kwargs)  # the arguments by name
        return getattr(self.session, self.handler)(self.original, call, args, kwargs)


class PruneSession:
    _pending = _PerThread()
    _labels = _PerThread()
    _final_columns = _PerThread()
    _decode = _PerThread()
    _batch = _PerThread()
    _side = _PerThread()
    _merge_records = _PerThread()
    _run = _PerThread()
    _run_mask = _PerThread()
    _run_layouts = _PerThread()
    _run_samples = _PerThread()
    _segments = _PerThread()
    _step = _PerThread()
    _layouts = _PerThread()

    def __init__(self, model: nn.Module, adapter: Adapter, methods: list[Method]):
        self.model = model
        self.adapter = adapter
        tower = VisionTower(adapter.family, adapter.vision_depth(), adapter.feature_layer_index(),
                            "vit_cls_hidden" in adapter.provides)
        for m in methods:
            m.bind(tower)  # before the checks: a method's signals (and its companions) may depend on the model
        # each method's own further stages right after it (e.g. HoliTom's inner merge, FlowCut's AnyRes LLM stage)
        staged = []
        for m in methods:
            companions = m.companions()
            for c in companions:
                c.bind(tower)
            staged += [m, *companions]
        methods = staged
        self.methods = methods
        pre = [m for m in methods if m.stage == PRE_LLM]
        if len(pre) > 1:
            raise VTPruneError(
                f"at most one pre-LLM method can run per model; got {[m.name for m in pre]}. Compose a pre-LLM "
                "method with in-LLM methods instead."
            )
        layer = [m for m in methods if m.stage == IN_LLM]
        if len(layer) > 1:
            raise VTPruneError(
                f"at most one in-LLM method can run per model; got {[m.name for m in layer]}. Compose one "
                "pre-LLM method with one in-LLM method."
            )
        if layer and pre and methods.index(layer[0]) < methods.index(pre[0]):
            raise VTPruneError("list the pre-LLM method before the in-LLM method when composing.")
        vit = [m for m in methods if m.stage == IN_VIT]
        check_composition(vit, methods, adapter)
        self.vit_method = vit[0] if vit else None
        self.pre_method = pre[0] if pre else None
        self.layer_method = layer[0] if layer else None
        self.decode_stage = self._build_decode_stage(methods, adapter)
        self._local = _CallState()
        self.store = SignalStore()
        self.store.wanted = {s for m in methods for s in m.signals} - ENGINE_SIGNALS
        self._optional = {s for m in methods for s in m.optional_signals if s in adapter.provides} - self.store.wanted
        self.store.wanted |= self._optional
        for m in methods:
            adapter.check_signals(set(m.signals), m.name)
        #: the in-ViT stage (None without an in-ViT method); refuses unsupported towers here, before installing
        self.vit_stage = VitStage(self.vit_method, adapter, self.store, self) if self.vit_method is not None else None
        self._handles: list[Any] = []
        self._signature = inspect.signature(model.forward)
        self._flops_warned = False
        self.last_stats: PruneStats | None = None
        #: None, or a timer with ``section(name)`` set by vtprune.bench to time the engine's and the method's
        #: own work separately (see engine/timing.py)
        self.timer: Any = None

    def _build_decode_stage(self, methods: list[Method], adapter: Adapter) -> DecodeStage | None:
        """The engine side of the method with stage DECODE, if any."""
        found = [m for m in methods if m.stage == DECODE]
        if not found:
            return None
        if len(found) > 1:
            raise VTPruneError(f"at most one decode stage can run per model; got {[m.name for m in found]}.")
        if self.layer_method is not None:
            raise VTPruneError(
                f"{found[0].name!r} prunes the KV cache while decoding and cannot be composed with the in-LLM method "
                f"{self.layer_method.name!r} (its layers cache different tokens); compose it with a pre-LLM method."
            )
        return DecodeStage(found[0], adapter.decoder_layers, adapter.language_model.config)

    @property
    def name(self) -> str:
        return "+".join(m.name for m in self.methods)

    # -- install / remove ----------------------------------------------------------------------------
    def install(self) -> None:
        if hasattr(self.model, SESSION_ATTRIBUTE):
            raise VTPruneError("this model is already pruned; call vtprune.remove(model) before applying again.")
        self._wrapped, self._handles = [], []
        try:
            lm = self.adapter.language_model
            self._wrap_vision_entry_points()
            if self.vit_stage is not None:
                self._wrapped += self.vit_stage.install()
            self._wrap_side_input_injector()
            self._handles += [
                self.model.register_forward_pre_hook(self._on_model_call, with_kwargs=True),
                self.model.register_forward_hook(self._on_model_return, with_kwargs=True),
                lm.register_forward_pre_hook(self._on_language_model_call, with_kwargs=True),
            ]
            self._handles += self.adapter.install_signal_hooks(self.store)
            if self.layer_method is not None:
                self._handles.append(lm.register_forward_hook(self._on_language_model_return))
                for index, layer in enumerate(self.adapter.decoder_layers):
                    hook = functools.partial(self._on_decoder_layer, index)
                    self._handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
                layers = self.adapter.decoder_layers
                for index in self.layer_method.observed_layers(len(layers)):
                    for kind, sublayer in compat.decoder_sublayers(layers[index]).items():
                        hook = functools.partial(self._on_sublayer, index, kind)
                        self._handles.append(sublayer.register_forward_hook(hook, with_kwargs=True))
            if self.decode_stage is not None:  # after the engine's own hooks: sees the cache's coordinates
                self._handles.append(lm.register_forward_pre_hook(self._on_decode_step, with_kwargs=True))
                for index, layer in enumerate(self.adapter.decoder_layers):
                    hook = functools.partial(self._on_decode_layer, index)
                    self._handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
        except BaseException:
            self.remove()  # nothing half-installed stays behind
            raise
        setattr(self.model, SESSION_ATTRIBUTE, self)

    def _internal(self, root: nn.Module, path: str, name: str):
        """(owner, function) of the transformers internal ``root.<path>.<name>`` the engine wraps; a clear error
        when this transformers release has no such function."""
        owner = root
        try:
            for part in path.split(".") if path else []:
                owner = getattr(owner, part)
            return owner, getattr(owner, name)
        except AttributeError:
            dotted = ".".join(p for p in (type(root).__name__, path, name) if p)
            raise UnsupportedModelError(
                f"{type(self.model).__name__}: vtprune hooks into {dotted}, which this transformers release does "
                f"not have: {compat.version_text()}. Install a tested release (pip install "
                f"'{compat.supported_range_text()}')."
            ) from None

    def _wrap_vision_entry_points(self) -> None:
        """Per-instance wrappers (instance attributes shadowing the class methods; deleted on remove)."""
        for path, name in self.adapter.vision_entry_points:
            owner, original = self._internal(self.model, path, name)
            handler = "_run_video" if name == compat.VIDEO_FEATURES else "_run_vision"
            setattr(owner, name, _Wrapper(self, handler, original))
            self._wrapped.append((owner, name))

    def _run_video(self, original, call: dict[str, Any], args: tuple, kwargs: dict[str, Any]):
        return self._run_vision(original, call, args, kwargs, modality=VIDEO)

    def _run_vision(self, original, call: dict[str, Any], args: tuple, kwargs: dict[str, Any],
                    modality: str = IMAGE):
        """The vision encoder on the images (or videos) of a forward, with the adapter capturing the signals the
        methods asked for (``call``: its arguments by name). An entry point called from inside another (Qwen3-VL
        encodes videos through its image entry point) belongs to the outer run."""
        store = self.store
        if store.depth:
            return original(*args, **kwargs)
        self.adapter.begin_capture(call, store, modality)
        if self.vit_stage is not None:
            if modality == VIDEO:
                raise UnsupportedModelError(
                    f"the in-ViT method {self.vit_method.name!r} prunes images only; a video reached the vision "
                    "encoder. Use a pre-LLM or in-LLM method for videos."
                )
            self.vit_stage.begin(call)
        store.depth += 1
        try:
            output = original(*args, **kwargs)
        finally:
            store.depth -= 1
            store.capturing = False
        self.adapter.end_capture(store)
        store.vision_output = output
        return output

    def _wrap_side_input_injector(self) -> None:
        """Per-instance wrapper of the function that adds per-visual-token rows (Qwen3-VL deepstack) to the
        hidden states: during a pruned prefill it receives the mask and rows of the tokens now present."""
        if self.adapter.side_input_injector is None:
            return
        path, name = self.adapter.side_input_injector
        owner, original = self._internal(self.adapter.language_model, path, name)
        setattr(owner, name, _Wrapper(self, "_inject_side_inputs", original))
        self._wrapped.append((owner, name))

    def _inject_side_inputs(self, original, call: dict[str, Any], args: tuple, kwargs: dict[str, Any]):
        hidden, mask, rows = list(call.values())[:3]
        side = self._side
        columns = self._current_columns(hidden.shape[0], hidden.shape[1]) if side is not None else None
        if columns is None:
            return original(hidden, mask, rows)
        point = next((i for i, r in enumerate(side.rows) if r is rows), None)
        if point is None or mask is not side.mask:
            raise VTPruneError("the decoder's side inputs changed during the forward; cannot align them.")
        mask, rows = gather_side_rows(side.mask, rows, point, columns, side.merged, hidden.shape[1])
        return original(hidden, mask, rows)

    def _current_columns(self, batch: int, width: int):
        """Per sample (slots, source, merged) of the hidden states now in the decoder, or None if unpruned."""
        run = self._run
        if run is not None and run.segments:
            slots = real_columns(run.segments[-1].prompt_mask, batch, width, run.segments[-1].prompt_mask.device)
            return list(zip(slots, run.source, run.merged, strict=True))
        if self._batch is not None:
            return list(zip(self._batch.slots, self._batch.source, self._batch.merged, strict=True))
        return None

    def __deepcopy__(self, memo: dict) -> PruneSession:
        """A session for the copied model (``copy.deepcopy(pruned_model)``): hooks, wrappers and adapter follow
        the copy through ``memo``; the per-call state starts empty."""
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        for key, value in vars(self).items():
            setattr(clone, key, _CallState() if key == "_local" else copy.deepcopy(value, memo))
        return clone

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for owner, name in getattr(self, "_wrapped", []):
            if name in vars(owner):
                delattr(owner, name)
        self._wrapped = []
        self.store.clear()
        self._pending = self._decode = self._batch = self._labels = self._run = self._step = self._side = None
        self._segments = []
        if self.decode_stage is not None:
            self.decode_stage.reset()
        if getattr(self.model, SESSION_ATTRIBUTE, None) is self:
            delattr(self.model, SESSION_ATTRIBUTE)

    # -- hooks ---------------------------------------------------------------------------------------
    def _on_model_call(self, module, args, kwargs):
        call = _bound_call(self._signature, args, kwargs)
        self._pending = None
        self._batch = None
        self._labels = None
        self._final_columns = None
        if not self.adapter.has_visual_input(call):
            self._refuse_unrecognised_visual_input(call)
            return self._unpruned_decode_positions(call, args, kwargs)
        self._refuse_video_if_unsupported(call)
        if call.get("input_ids") is None:
            if call.get("inputs_embeds") is None:
                raise VTPruneError("a forward with images needs input_ids or inputs_embeds.")
            call["input_ids"] = self.adapter.placeholder_ids_from_embeds(call["inputs_embeds"])
        self._pending = _Prefill(call=call)
        if call.get("labels") is not None or call.get("shift_labels") is not None:
            # the loss is computed on the kept positions in _on_model_return (the language-model hook consumes
            # _pending before the model returns, so the targets are kept apart)
            if any(name in call and name not in kwargs for name in ("labels", "shift_labels")):
                raise VTPruneError("pass labels as a keyword argument to a pruned model.")
            self._labels = _Targets(labels=call.get("labels"), shift_labels=call.get("shift_labels"),
                                    loss_kwargs={k: call[k] for k in _LOSS_KWARGS if call.get(k) is not None})
            kwargs = {k: v for k, v in kwargs.items() if k != "shift_labels"}
            if "labels" in kwargs:
                kwargs["labels"] = None
            return args, kwargs
        return None

    def _refuse_unrecognised_visual_input(self, call: dict[str, Any]) -> None:
        """A prefill whose input_ids hold image/video placeholder tokens although no visual input was found in
        the call: the inputs arrived under a name vtprune does not know, and the forward would run unpruned."""
        input_ids, cache = call.get("input_ids"), compat.get_cache(call)
        if input_ids is None or cache is not None and cache.get_seq_length():
            return
        placeholders = self.adapter.placeholder_token_ids()
        found = int(torch.isin(input_ids, torch.tensor(placeholders, device=input_ids.device)).sum()) \
            if placeholders else 0
        if found:
            raise self._unpruned_error(
                f"input_ids hold {found} image/video placeholder tokens but no visual input was found among the "
                f"call's arguments ({', '.join(sorted(call))})"
            )

    def _unpruned_error(self, what: str) -> SilentlyUnprunedError:
        return SilentlyUnprunedError(
            f"{type(self.model).__name__} pruned with {self.name!r}: {what}, so this forward would run unpruned. "
            f"A transformers internal vtprune hooks into has probably changed: {compat.version_text()}. "
            f"Install a tested release (pip install '{compat.supported_range_text()}') or call "
            "vtprune.remove(model) to run without pruning. (torch.compile also bypasses vtprune's hooks: a "
            "pruned model runs uncompiled.)"
        )

    def _unpruned_decode_positions(self, call: dict[str, Any], args: tuple, kwargs: dict[str, Any]):
        """A decode step on the pruned cache whose positions the model would derive from the cache length:
        pass the unpruned ones explicitly (the language-model hook then maps them to the pruned cache)."""
        state = self._decode
        cache = compat.get_cache(call)
        if state is None or cache is not state.cache or cache.get_seq_length() != state.cache_len:
            return None
        positions = self.adapter.unpruned_decode_positions(call, state.seen_len)
        if positions is None or "position_ids" in call and call["position_ids"] is not None:
            return None
        if "position_ids" not in kwargs and len(args) > list(self._signature.parameters).index("position_ids"):
            return None
        return args, {**kwargs, "position_ids": positions}

    def _on_language_model_call(self, module, args, kwargs):
        self.store.capturing = False
        self._side = None
        pending, self._pending = self._pending, None
        cache = compat.get_cache(kwargs)
        cached = 0 if cache is None else cache.get_seq_length()
        if pending is not None:
            if cached:
                raise VTPruneError("a forward with images on a non-empty KV cache is not supported by vtprune.")
            if self.layer_method is not None and torch.is_grad_enabled() and self.model.training and getattr(
                    self.model, "is_gradient_checkpointing", False):
                raise VTPruneError(
                    f"{self.layer_method.name!r} prunes inside the decoder, and gradient checkpointing re-runs decoder "
                    "layers in the backward pass without vtprune's per-layer inputs. Disable gradient "
                    "checkpointing (model.gradient_checkpointing_disable()) or train with a pre-LLM method."
                )
            with section(self.timer, "engine"):
                new_kwargs = self._prefill(module, pending, kwargs)
                if self.decode_stage is not None:
                    new_kwargs = self._begin_decode_stage(module, new_kwargs)
            return args, new_kwargs
        state = self._decode
        if state is not None and cache is state.cache and cached != state.cache_len:
            self._decode = None
            raise VTPruneError(
                f"the pruned KV cache holds {cached} tokens where vtprune expected {state.cache_len}: it was changed "
                "outside vtprune (cropped by assisted / speculative decoding, or reused by another call), so "
                "positions and masks can no longer be mapped. Assisted decoding is not supported on a pruned "
                "model; start a new generate() for a new prompt."
            )
        if state is not None and cache is state.cache:
            return args, self._continue(state, kwargs)
        self._decode = None
        if not cached:  # a new forward without images
            self._record_text_only(kwargs)
        return None

    def _on_model_return(self, module, args, kwargs, output):
        unconsumed, self._pending = self._pending, None
        if unconsumed is not None:
            self._labels = None
            raise self._unpruned_error(
                "the call carried visual inputs but the engine's language-model hook never ran the pruning prefill"
            )
        targets, self._labels = self._labels, None
        self.store.capturing = False
        if targets is None or output is None or getattr(output, "logits", None) is None:
            return None
        columns = self._final_columns
        if columns is None and self._batch is not None:
            columns = list(zip(self._batch.slots, self._batch.source, self._batch.merged, strict=True))
        output.loss = self._loss(module, output.logits, targets, columns)
        return output

    # -- prefill -------------------------------------------------------------------------------------
    def _prefill(self, lm: nn.Module, pending: _Prefill, kwargs: dict[str, Any]) -> dict[str, Any]:
        embeds = kwargs["inputs_embeds"]  # [B, L, D]
        batch, length, _ = embeds.shape
        mask = kwargs.get("attention_mask")
        if mask is not None and not (torch.is_tensor(mask) and mask.dim() == 2):
            mask = self._padding_mask(mask, batch, length, embeds.device)
            kwargs = {**kwargs, "attention_mask": mask}
        real = mask.bool() if mask is not None else torch.ones(batch, length, dtype=torch.bool, device=embeds.device)
        position_ids = kwargs.get("position_ids")
        if position_ids is None:  # what the decoder itself would use
            position_ids = torch.arange(length, device=embeds.device).expand(batch, length)
        modalities = self.adapter.visual_modalities(pending.call)
        if not self._vision_run_matches(pending.call, modalities):
            raise VTPruneError(
                "vtprune did not see the vision encoder run for this forward (were pre-computed image or video "
                "features passed?); pass pixel_values / pixel_values_videos so the visual tokens can be located and "
                "scored."
            )
        vision_args: dict[str, Any] = {}
        for modality in (IMAGE, VIDEO):  # the encoder calls' arguments (grids, sizes) complete the model call's
            if modality in modalities:
                vision_args.update(self.store.vision_calls[modality])
        layouts = self.adapter.build_layouts({**pending.call, **vision_args})
        self._layouts = layouts
        if not any(layout.num_visual for layout in layouts):
            raise self._unpruned_error("the call carried visual inputs but no visual token was found in input_ids")
        self.store.consumed = True
        plans, samples = [], []
        self._merge_records = []
        for b, layout in enumerate(layouts):
            if self.pre_method is not None or self.vit_stage is not None:
                if self.pre_method is not None:
                    self._instruction_source = (pending.call.get("input_ids"), b, real[b])  # "instruction" signal
                plan, sample = self._plan_sample(layout, embeds[b], real[b])
            else:
                kept = torch.nonzero(real[b]).flatten()
                plan = SamplePlan(keep=kept, last=int(kept[-1]) if kept.numel() else -1)
                sample = SampleStats(visual_in=layout.num_visual)
                self._merge_records.append([])
            plan.image_of = layout.image_index(length).to(embeds.device)
            plan.frame_of = layout.frame_index(length).to(embeds.device)
            plans.append(plan)
            samples.append(sample)
        self._side = self._record_side_inputs(kwargs)
        changed = any(p.length < int(real[b].sum()) or p.merged is not None for b, p in enumerate(plans))
        new_kwargs = dict(kwargs)
        num_layers = len(self.adapter.decoder_layers)
        pad_left = not (mask is not None and bool((mask[:, -1] == 0).any()) and not bool((mask[:, 0] == 0).any()))
        if self.layer_method is not None:
            return self._prefill_with_layer_stage(lm, kwargs, embeds, mask, real, position_ids, layouts, plans,
                                                  samples, changed, pad_left)
        if not changed:  # nothing pruned: leave the call untouched (bitwise-identical results)
            for b, sample in enumerate(samples):
                self._finish_sample_stats(sample, int(real[b].sum()), num_layers, layouts[b], kwargs)
                _set_frame_kept(sample, layouts[b], torch.nonzero(real[b]).flatten().cpu(), None)
            self.last_stats = PruneStats(self.name, samples)
            self._decode = None
            return new_kwargs
        pruned = assemble(embeds, position_ids, plans, self._drop_positions(), pad_left,
                          self.adapter.compact_image_positions)
        self._batch = pruned
        pruned_mask = pruned.attention_mask
        needs_mask = mask is not None or bool((pruned_mask == 0).any())
        cache = self._cache_for(lm, kwargs)
        new_kwargs.update(
            inputs_embeds=pruned.inputs_embeds,
            attention_mask=pruned_mask if needs_mask else None,
            position_ids=pruned.position_ids,
        )
        new_kwargs = compat.with_cache(new_kwargs, cache)
        self._decode = None if cache is None else _DecodeState(
            cache=cache, cache_len=pruned.inputs_embeds.shape[1], prompt_len=length, seen_len=length,
            prompt_mask=pruned_mask, position_shift=pruned.position_shift,
        )
        for b, sample in enumerate(samples):
            self._finish_sample_stats(sample, plans[b].length, num_layers, layouts[b], kwargs)
            _set_frame_kept(sample, layouts[b], pruned.source[b].cpu(), pruned.merged[b].cpu())
        self.last_stats = PruneStats(self.name, samples)
        return new_kwargs

    @staticmethod
    def _padding_mask(mask, batch: int, length: int, device) -> torch.Tensor:
        """The 2-D padding mask [B, length] the engine works with, recovered from the 4-D / per-layer-type mask
        ``generate`` pre-builds for a static cache; the language model then builds its own masks from it."""
        padding = compat.padding_mask_from_prebuilt(mask, batch, length, device)
        if padding is None:
            raise VTPruneError(
                "vtprune needs the attention mask as a 2-D padding mask (batch, sequence), or the 4-D mask "
                f"generate() builds; got {type(mask).__name__} {tuple(getattr(mask, 'shape', ()))}."
            )
        return padding

    def _vision_run_matches(self, call: dict[str, Any], modalities: set[str]) -> bool:
        """Whether the captured vision runs (one per modality the call carries) belong to this forward: runs not
        used by any forward yet, or the runs whose outputs this forward carries again (``generate(use_cache=
        False)`` re-sends the pre-encoded images / videos at every step; the encoder ran once, before the first
        step)."""
        store = self.store
        if not modalities or any(m not in store.vision_calls for m in modalities):
            return False
        if not store.consumed:
            return True
        carried = compat.encoder_outputs(call)
        return all(store.vision_outputs.get(m) is not None and carried.get(m) is store.vision_outputs[m]
                   for m in modalities)

    def _refuse_video_if_unsupported(self, call: dict[str, Any]) -> None:
        """A method that cannot run on video refuses a forward that carries videos, before the model runs."""
        if VIDEO not in self.adapter.visual_modalities(call):
            return
        for method in self.methods:
            if method.video_unsupported:
                raise UnsupportedModelError(
                    f"method {method.name!r} cannot prune videos: {method.video_unsupported} Use a method that "
                    "supports video (see vtprune.methods()), or call vtprune.remove(model) to run videos unpruned."
                )

    def _record_side_inputs(self, kwargs: dict[str, Any]) -> _SideInputs | None:
        """The prefill's per-visual-token side inputs, with the rows of the pre-LLM merged tokens."""
        names = self.adapter.visual_side_inputs
        if names is None or kwargs.get(names[0]) is None or not kwargs.get(names[1]):
            return None
        mask, rows = kwargs[names[0]], list(kwargs[names[1]])
        index = visual_row_index(mask)
        merged: list[MergedRows | None] = []
        for b, records in enumerate(self._merge_records):
            if not records:
                merged.append(None)
                continue
            if any(record.weights is None for record in records):
                raise UnsupportedModelError(
                    f"method {self.pre_method.name!r} adds merged tokens without merge weights, so "
                    f"{type(self.model).__name__}'s per-token {names[1]} cannot follow them. Use a method that "
                    "returns Selection.weights, or one that only drops tokens."
                )
            anchors = torch.cat([record.anchors for record in records])
            order = torch.argsort(anchors)
            if bool((anchors[order][1:] == anchors[order][:-1]).any()):
                raise UnsupportedModelError("two merged tokens share an anchor; their side inputs cannot be told apart.")
            point_rows = [  # per injection point [m, D], in anchor order
                torch.cat([merged_side_rows(point, index[b], record.group_positions, record.weights)
                           for record in records])[order.to(point.device)]
                for point in rows
            ]
            merged.append(MergedRows(anchors=anchors[order], rows=point_rows))
        return _SideInputs(mask=mask, rows=rows, merged=merged)

    @staticmethod
    def _cache_for(lm: nn.Module, kwargs: dict[str, Any]):
        """The caller's cache, or the DynamicCache the decoder would create itself (created here so that the
        engine can recognise it in later decode steps)."""
        cache = compat.get_cache(kwargs)
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = getattr(lm.config, "use_cache", False)
        if cache is None and use_cache:
            cache = compat.new_dynamic_cache(lm.config)
        return cache

    # -- decode stage --------------------------------------------------------------------------------
    def _begin_decode_stage(self, lm: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
        """After a prefill: tell the decode stage which cache columns hold each sample's visual content tokens
        (kept and merged ones after a pre-LLM stage). Creates the cache the decoder would create, so that the
        stage recognises it in the decode steps."""
        cache = compat.get_cache(kwargs)
        if cache is None:
            cache = self._cache_for(lm, kwargs)
            if cache is not None:
                kwargs = compat.with_cache(kwargs, cache)
        embeds = kwargs["inputs_embeds"]
        mask = kwargs.get("attention_mask")
        mask = mask if torch.is_tensor(mask) and mask.dim() == 2 else None
        columns = []
        for b, layout in enumerate(self._layouts):
            content = torch.cat([img.positions[~img.structural] for img in layout.images]) if layout.images \
                else torch.empty(0, dtype=torch.long)
            if self._batch is not None:
                visual = torch.isin(self._batch.source[b].cpu(), content) | self._batch.merged[b].cpu()
                columns.append(self._batch.slots[b][visual.to(self._batch.slots[b].device)].to(embeds.device))
            else:
                columns.append(content.to(embeds.device))
        self.decode_stage.begin(cache, columns, mask, embeds.shape[1])
        return kwargs

    def _on_decode_step(self, module, args, kwargs):
        self.decode_stage.on_language_model_call(kwargs)

    def _on_decode_layer(self, index: int, module, args, kwargs):
        return self.decode_stage.on_decoder_layer(index, args, kwargs)

    # -- in-LLM stage --------------------------------------------------------------------------------
    def _prefill_with_layer_stage(self, lm, kwargs, embeds, mask, real, position_ids, layouts, plans, samples,
                                  changed, pad_left) -> dict[str, Any]:
        batch, length, _ = embeds.shape
        new_kwargs = dict(kwargs)
        cache = self._cache_for(lm, kwargs)
        if changed:
            pruned = assemble(embeds, position_ids, plans, self._drop_positions(), pad_left,
                              self.adapter.compact_image_positions)
            self._batch = pruned
            lm_mask, lm_positions, shift = pruned.attention_mask, pruned.position_ids, pruned.position_shift
            sources, merged = pruned.source, pruned.merged
            new_kwargs.update(inputs_embeds=pruned.inputs_embeds, attention_mask=lm_mask, position_ids=lm_positions)
        else:
            lm_mask, shift = mask, position_ids.new_zeros(position_ids.shape[:-1])
            sources = [torch.nonzero(real[b]).flatten() for b in range(batch)]
            merged = [torch.zeros_like(src, dtype=torch.bool) for src in sources]
            new_kwargs.update(position_ids=position_ids)
        new_kwargs = compat.with_cache(new_kwargs, cache)
        visual, text, schedules, structural = [], [], [], []
        num_layers = len(self.adapter.decoder_layers)
        for b, layout in enumerate(layouts):
            content = torch.cat([img.positions[~img.structural] for img in layout.images]) if layout.images \
                else torch.empty(0, dtype=torch.long)
            is_visual = torch.isin(sources[b].cpu(), content) | merged[b].cpu()
            visual.append(is_visual)
            is_placeholder = torch.isin(sources[b].cpu(), layout.visual_positions())
            text.append(~is_placeholder & ~merged[b].cpu())
            # merged tokens sit at their anchor, a placeholder position: they are in both counts already
            structural.append(int(is_placeholder.sum()) - int(is_visual.sum()))
            count = int(is_visual.sum())
            schedules.append(self.layer_method.schedule(num_layers, count, len(layout.images)) if count else [])
        source = [s.cpu() for s in sources]
        lm_embeds = new_kwargs["inputs_embeds"]
        lm_real = torch.zeros(lm_embeds.shape[:2], dtype=torch.bool, device=lm_embeds.device)
        lm_visual, lm_text = torch.zeros_like(lm_real), torch.zeros_like(lm_real)
        for b, cols in enumerate(real_columns(lm_mask, batch, lm_embeds.shape[1], lm_embeds.device)):
            lm_real[b, cols] = True
            lm_visual[b, cols[visual[b].to(cols.device)]] = True
            lm_text[b, cols[text[b].to(cols.device)]] = True
        extra = {}
        if self.layer_method.vision_signals:
            extra["vision"] = self._column_signals(layouts, length, source, [m.cpu() for m in merged],
                                                   self.layer_method.vision_signals)
        with section(self.timer, "select"):
            prepared = self.layer_method.prepare(lm_embeds, lm_real, lm_visual, lm_text, source, **extra)
        self._run = LayerRun(
            method=self.layer_method, schedules=schedules, source=source, visual=visual,
            merged=[m.cpu() for m in merged], pad_left=pad_left, structural=structural, text=text,
            prepared=prepared, stages=[[] for _ in range(batch)], timer=self.timer,
            position_ids=new_kwargs["position_ids"], image_of=[p.image_of.cpu() for p in plans],
            frame_of=[p.frame_of.cpu() for p in plans],
            patch_of=[layout.patch_index(length) for layout in layouts],
            image_rule=self.adapter.compact_image_positions, side=self._side,
        )
        self._run_mask = lm_mask
        self._run_layouts, self._run_samples = layouts, samples
        self._segments = []
        self._decode = None if cache is None else _DecodeState(
            cache=cache, cache_len=new_kwargs["inputs_embeds"].shape[1], prompt_len=length, seen_len=length,
            prompt_mask=lm_mask if lm_mask is not None else torch.ones(batch, length, dtype=torch.long,
                                                                          device=embeds.device),
            position_shift=shift,
        )
        return new_kwargs

    def _column_signals(self, layouts: list[SampleLayout], length: int, sources: list[torch.Tensor],
                        merged: list[torch.Tensor], names) -> list[dict[str, torch.Tensor]]:
        """Per sample ``{name: Tensor[n_b] float32}``: the captured vision signal of each real column (``sources``:
        its original position), NaN for text, structural and merged columns (LayerMethod.vision_signals)."""
        out = []
        for b, layout in enumerate(layouts):
            values = {}
            for name in names:
                by_position = torch.full((length,), float("nan"))
                for image in layout.images:
                    modality = VIDEO if image.is_video else IMAGE
                    if not self.store.has(modality, name):
                        raise VTPruneError(f"signal {name!r} was not captured during the {modality} encoder's "
                                           "forward.")
                    table = self.store.table(modality, name)
                    for group in image.groups:
                        rows = table[group.vision_row.to(table.device), group.patch_index.to(table.device)]
                        by_position[image.positions[group.members]] = rows.float().cpu()
                column = by_position[sources[b]]
                column[merged[b]] = float("nan")
                values[name] = column
            out.append(values)
        return out

    def _on_decoder_layer(self, index: int, module, args, kwargs):
        run = self._run
        if run is not None:  # prefill
            hidden = args[0] if args else kwargs["hidden_states"]
            if any(layer == index for sched in run.schedules for layer, _ in sched):
                current = run.segments[-1] if run.segments else None
                # language-model-level ids: the decoder layers of M-RoPE models only receive a text row, or None
                position_ids = current.position_ids if current else run.position_ids
                position_embeddings = current.position_embeddings if current else kwargs["position_embeddings"]
                with section(self.timer, "engine"):
                    segment = prune_at_layer(run, self.adapter.language_model, index, hidden, position_ids,
                                             position_embeddings, self._run_mask, compat.get_cache(kwargs))
                if segment is not None:
                    hidden = segment.hidden
                    self._run_mask = segment.prompt_mask
                    args = (hidden, *args[1:]) if args else args
                    if not args:
                        kwargs = {**kwargs, "hidden_states": hidden}
            segment = run.segments[-1] if run.segments else None
            if segment is not None:
                kwargs = {**kwargs, "attention_mask": segment.attention_mask,
                          "position_embeddings": segment.position_embeddings,
                          "position_ids": layer_rows(segment.position_ids)}
            # layer ``index``'s input, (cos, sin) and language-model-level position ids (DART re-rotates keys)
            run.previous = (hidden, kwargs["position_embeddings"],
                            segment.position_ids if segment is not None else run.position_ids)
            run.history.append([(len(src), int(vis.sum()) + extra)
                                for src, vis, extra in zip(run.source, run.visual, run.structural, strict=True)])
            return args, kwargs
        if self._step is None or not self._segments:
            return None
        active = [seg for seg in self._segments if seg.layer <= index]
        if not active:
            return None
        segment = active[-1]
        hidden = args[0] if args else kwargs["hidden_states"]
        if segment.layer == index:
            tail, decoded, positions, cache = self._step
            decode_segment_inputs(segment, self.adapter.language_model, hidden, tail, decoded, positions,
                                  kwargs["position_embeddings"], cache)
        return args, {**kwargs, "attention_mask": segment.attention_mask,
                      "position_embeddings": segment.position_embeddings,
                      "position_ids": layer_rows(segment.position_ids)}

    def _on_sublayer(self, index: int, kind: str, module, args, kwargs, output):
        """Forward hook on an observed sublayer: hands its input/output to the method during the prefill."""
        run = self._run
        if run is None:  # decoding, or a call the in-LLM stage does not handle
            return None
        before, after = compat.sublayer_io(args, kwargs, output)
        batch, length = before.shape[:2]
        real = torch.zeros(batch, length, dtype=torch.bool, device=before.device)
        for b, cols in enumerate(real_columns(self._run_mask, batch, length, before.device)):
            real[b, cols] = True
        with section(self.timer, "select"):
            run.method.observe(index, kind, before.detach(), after.detach(), real, run.source, run.prepared)
        return None

    def _on_language_model_return(self, module, args, output):
        run, self._run = self._run, None
        self._step = None
        if run is None:
            return None
        cut_from = self.layer_method.cache_cut_from(len(self.adapter.decoder_layers)) if run.segments else None
        if cut_from is not None and self._decode is not None:  # the method's decoding stage (MustDrop)
            cut = cut_cache_to_final(run, self._decode.cache, cut_from)
            if cut is not None:
                run.segments = cut
            elif not compat.is_dynamic_cache_layer(self._decode.cache, cut_from):
                self.layer_method.warn_once(
                    f"the {type(self._decode.cache).__name__} has fixed per-layer buffers, so the decoding stage's "
                    "KV-cache cut does not run: each layer decodes from the cache of what it processed; use the "
                    "default dynamic cache for the cut, or pass cut_cache=False to silence this.")
        if run.segments:  # the loss reads the logits of the sequence the last segment left
            mask = run.segments[-1].prompt_mask
            slots = real_columns(mask, mask.shape[0], mask.shape[1], mask.device)
            self._final_columns = list(zip(slots, run.source, run.merged, strict=True))
            first = run.segments[0]
            if first.layer == 0 and self._decode is not None:
                # a stage before layer 0 (FrameFusion's first merge) shortened every layer's cache, the first one
                # included: the decode bookkeeping follows layer 0's cache (the language model's own mask is
                # replaced by the segments' in every layer; its width must match that cache)
                self._decode.cache_len = first.prompt_mask.shape[1]
                self._decode.prompt_mask = first.prompt_mask
        elif self._batch is None:  # nothing was pruned: decoding is the plain model's
            self._decode = None
        num_layers = len(self.adapter.decoder_layers)
        if len(run.history) != num_layers:
            raise self._unpruned_error(
                f"the in-LLM stage saw {len(run.history)} of the decoder's {num_layers} layers run"
            )
        self._segments = run.segments
        for segment in self._segments:
            segment.hidden = None  # the prefill's pruned hidden states are not needed any more
        for b, sample in enumerate(self._run_samples):
            sample.layer_lengths = [run.history[i][b][0] for i in range(num_layers)]
            sample.visual_lengths = [run.history[i][b][1] for i in range(num_layers)]
            sample.stages.extend(run.stages[b])
            _set_frame_kept(sample, self._run_layouts[b], run.source[b], run.merged[b])
            unpruned = sample.layer_lengths[0] - sample.visual_lengths[0] + sample.visual_in
            sample.flops, sample.flops_unpruned = self._flops(self._run_layouts[b], sample.layer_lengths, unpruned)
        self.last_stats = PruneStats(self.name, self._run_samples)
        return None

    def _plan_sample(self, layout: SampleLayout, embeds: torch.Tensor, real: torch.Tensor):
        """Kept positions and merged tokens of one sample [L, D] (padding excluded)."""
        keep = real.clone()
        merged, anchors, orders = [], [], []
        kept_visual, num_merged = [], 0
        self._merge_records.append([])
        vit_kept, vit_merged, vit_merged_at = [], 0, []
        if self.vit_stage is not None and not self.vit_stage.started():
            raise self._unpruned_error(f"the in-ViT stage {self.vit_method.name!r} saw no vision-encoder block run")
        for image_idx, image in enumerate(layout.images):
            alive, sizes = self._vit_alive(image, layout.image_ids[image_idx] if layout.image_ids else image_idx)
            if alive is not None:
                whole = alive & (sizes == 1) | image.structural & self._rows_alive(image, alive)
                vit_kept.append(image.positions[whole])
                vit_merged += int((sizes > 1).sum())
                vit_merged_at.append(image.positions[alive & (sizes > 1)])
            if self.pre_method is None:
                span_keep = torch.ones(image.num_tokens, dtype=torch.bool) if alive is None else \
                    alive | image.structural & self._rows_alive(image, alive)
                image_merged = image_anchors = image_order = None
            else:
                span_keep, image_merged, image_anchors, image_order = self._select_image(image, image_idx, embeds,
                                                                                         alive)
            keep[image.positions[~span_keep].to(keep.device)] = False
            kept_visual.append(image.positions[span_keep])
            if image_merged is not None:
                merged.append(image_merged)
                anchors.append(image.positions[image_anchors])
                orders.append(image_order)
                num_merged += image_merged.shape[0]
        real_positions = torch.nonzero(real).flatten()
        plan = SamplePlan(
            keep=torch.nonzero(keep).flatten(),
            merged=torch.cat(merged) if merged else None,
            merged_anchors=torch.cat(anchors).to(embeds.device) if anchors else None,
            merged_order=torch.cat(orders) if orders else None,
            last=int(real_positions[-1]) if real_positions.numel() else -1,
        )
        kept_positions = torch.sort(torch.cat(kept_visual)).values if kept_visual else torch.empty(0, dtype=torch.long)
        sample = SampleStats(visual_in=layout.num_visual)
        if self.vit_method is not None:
            # in-ViT: the positions of the tokens kept whole (row newlines included); ``merged`` counts the merged
            # tokens, each at the position of its representative patch
            vit_positions = torch.sort(torch.cat(vit_kept)).values if vit_kept else layout.visual_positions()
            sample.stages.append(StageStats(name=self.vit_method.name, layer=0, kept_positions=vit_positions,
                                            merged=vit_merged, visual_out=int(vit_positions.numel()) + vit_merged,
                                            merged_positions=merged_positions(vit_merged_at)))
        if self.pre_method is not None:
            sample.stages.append(StageStats(
                name=self.pre_method.name, layer=0, kept_positions=kept_positions, merged=num_merged,
                visual_out=int(kept_positions.numel()) + num_merged,
                merged_positions=merged_positions([a.cpu() for a in anchors]),
            ))
        return plan, sample

    def _drop_positions(self) -> str:
        """The position convention of the stages that drop tokens before the decoder (pre-LLM, else in-ViT)."""
        return (self.pre_method or self.vit_method).positions

    def _vit_alive(self, image: ImageSpan, image_id: int):
        """(BoolTensor[n] over the image's span: content tokens alive after the in-ViT stage, sizes [n]) or
        (None, None) when no in-ViT stage pruned this forward."""
        if self.vit_stage is None or SIZE_TABLE not in self.store:
            return None, None
        table = self.store[SIZE_TABLE]
        sizes = torch.zeros(image.num_tokens)
        for group in image.groups:
            sizes[group.members] = table[group.vision_row, group.patch_index].float()
        if bool((sizes != sizes.round()).any()):
            raise UnsupportedModelError(
                f"{type(self.model).__name__} blended vision tokens after the encoder (LLaVA-OneVision downsamples a "
                f"large image's crop grid), which mixes removed and kept tokens of the in-ViT stage "
                f"{self.vit_method.name!r}; use a smaller image (fewer crops) or a pre-LLM method."
            )
        return (sizes > 0) & ~image.structural, sizes

    @staticmethod
    def _rows_alive(image: ImageSpan, alive: torch.Tensor) -> torch.Tensor:
        """BoolTensor[n]: tokens whose row still holds an alive content token (row newlines follow their row)."""
        return torch.isin(image.row, image.row[alive])

    def _select_image(self, image: ImageSpan, image_idx: int, embeds: torch.Tensor, alive: torch.Tensor | None = None):
        """Run the pre-LLM method on one image (``alive``: the tokens an in-ViT stage left, or None). Returns
        (BoolTensor[n] kept over the span, merged, anchors (span indices), placement of the merged tokens at their
        anchors)."""
        method = self.pre_method
        span_keep = torch.zeros(image.num_tokens, dtype=torch.bool)
        span_keep[image.structural] = True
        content = image.num_content
        method.check_image_tokens(content)  # warns once about a degenerate budget (keeps all / very few)
        adaptive = method.budget is None  # the method decides its count per group (PruMerge's outliers)
        budget = content if adaptive else tokens_for(method.budget, content)
        if alive is None and budget >= content and not adaptive:
            return torch.ones(image.num_tokens, dtype=torch.bool), None, None, None
        if alive is not None and budget >= int(alive.sum()) and not adaptive:  # the in-ViT stage left no more
            return alive | image.structural & self._rows_alive(image, alive), None, None, None
        jobs = self._video_jobs(image, image_idx, embeds, budget) if image.is_video \
            else self._image_jobs(image, image_idx, embeds, budget, alive)
        merged, anchors, orders, row_anchors = [], [], [], []
        for group, k, run in jobs:
            if k >= group.size and not adaptive:
                span_keep[group.members] = True
                continue
            if k == 0:
                continue
            with section(self.timer, "select"):
                selection = run(k)
            self._check_selection(selection, group.size, k)
            span_keep[group.members[selection.keep.cpu()]] = True
            if selection.num_merged:
                merged.append(selection.merged)
                group_anchors = group.members[selection.anchors.cpu()]
                at_end = selection.at_end.cpu() if selection.at_end is not None \
                    else torch.zeros(selection.num_merged, dtype=torch.bool)
                row_anchors.append(group_anchors[~at_end])  # only tokens standing in a row keep it alive
                anchors.append(torch.where(at_end, image.num_tokens - 1, group_anchors))
                orders.append(selection.order.cpu().long() if selection.order is not None
                              else torch.ones(selection.num_merged, dtype=torch.long))
                self._merge_records[-1].append(_MergeRecord(
                    anchors=image.positions[anchors[-1]], group_positions=image.positions[group.members],
                    weights=selection.weights,
                ))
        anchor_span = torch.cat(anchors) if anchors else torch.empty(0, dtype=torch.long)
        row_span = torch.cat(row_anchors) if row_anchors else torch.empty(0, dtype=torch.long)
        # structural tokens (row newlines) stay for every row that still holds a token
        alive_rows = torch.cat([image.row[span_keep & ~image.structural], image.row[row_span]])
        span_keep[image.structural] = torch.isin(image.row[image.structural], alive_rows)
        if not anchors:
            return span_keep, None, None, None
        return span_keep, torch.cat(merged), anchor_span, torch.cat(orders)

    def _image_jobs(self, image: ImageSpan, image_idx: int, embeds: torch.Tensor, budget: int,
                    alive: torch.Tensor | None = None):
        """(group, kept count, selection function) per group of an image, by the method's budget policy
        (``alive``: the tokens an in-ViT stage left, among which the method selects; None: all)."""
        method = self.pre_method
        groups = [TokenGroup.concat(image.groups)] if method.budget_policy == "global" else image.groups
        if alive is not None:
            groups = [g for g in (_alive_subgroup(g, alive) for g in groups) if g.size]
        # equal shares where every group is one crop of its own (LLaVA-NeXT); LLaVA-OneVision's high-resolution
        # group packs several crops into one grid, so its image keeps the proportional split
        rows = [torch.unique(g.vision_row) for g in groups]
        one_crop_each = all(r.numel() == 1 for r in rows) and torch.cat(rows).unique().numel() == len(groups)
        split = split_equal if method.budget_policy == "equal_per_crop" and one_crop_each else split_proportional
        shares = split(budget, [g.size for g in groups])
        return [(group, k, functools.partial(self._select_group, image, group, embeds, image_idx, group_idx))
                for group_idx, (group, k) in enumerate(zip(groups, shares, strict=True))]

    def _video_jobs(self, image: ImageSpan, image_idx: int, embeds: torch.Tensor, budget: int):
        """The same for a video, by the method's ``video_policy``: "per_frame" (one group per frame, the budget
        split evenly, remainder to the earliest frames), "global" (one group over the clip) or "clip" (the whole
        clip to ``select_clip``)."""
        method = self.pre_method
        policy = method.video_policy
        if policy == "per_frame":
            shares = split_equal(budget, [g.size for g in image.groups])
            return [(group, k, functools.partial(self._select_group, image, group, embeds, image_idx, t, frame=t))
                    for t, (group, k) in enumerate(zip(image.groups, shares, strict=True))]
        whole = TokenGroup.concat(image.groups)
        if policy == "global":
            return [(whole, budget, functools.partial(self._select_group, image, whole, embeds, image_idx, 0))]
        if policy == "clip":
            return [(whole, budget, functools.partial(self._select_clip, image, whole, embeds, image_idx))]
        raise VTPruneError(f"method {method.name!r} has video_policy={policy!r}; use one of {VIDEO_POLICIES}.")

    def _select_group(self, image: ImageSpan, group: TokenGroup, embeds: torch.Tensor, image_idx: int,
                      group_idx: int, k: int, frame: int | None = None) -> Selection:
        group_input = self._visual_group(image, group, embeds, image_idx, group_idx)
        group_input.frame = frame
        return self.pre_method.select(group_input, k)

    def _select_clip(self, image: ImageSpan, whole: TokenGroup, embeds: torch.Tensor, image_idx: int,
                     k: int) -> Selection:
        """``select_clip`` on one video: its frames as a [T, N, ...] clip (``whole``: the frames' tokens, frame-major)."""
        frames = len(image.groups)
        first = image.groups[0]
        if any((g.height, g.width, g.size) != (first.height, first.width, first.size) for g in image.groups):
            raise UnsupportedModelError("the frames of this video have different grids; a clip needs equal frames.")
        flat = self._visual_group(image, whole, embeds, image_idx, 0)
        clip = VideoClip(
            features=flat.features.reshape(frames, first.size, -1), height=first.height, width=first.width,
            frames=frames, signals={name: value.reshape(frames, first.size, *value.shape[1:])
                                    for name, value in flat.signals.items()},
            project=flat.project, seed=flat.seed, timestamps=image.frame_times,
        )
        return self.pre_method.select_clip(clip, k)

    def _visual_group(self, image: ImageSpan, group: TokenGroup, embeds: torch.Tensor, image_idx: int,
                      group_idx: int) -> VisualGroup:
        positions = image.positions[group.members].to(embeds.device)
        signals = {}
        modality = VIDEO if image.is_video else IMAGE
        for name in self.store.wanted:
            captured = self.store.has(modality, name)
            if not captured and name in self._optional:
                continue  # an optional signal this forward has not (e.g. the [CLS] state under "full" features)
            if not captured:
                raise VTPruneError(f"signal {name!r} was not captured during the {modality} encoder's forward.")
            table = self.store.table(modality, name)
            signals[name] = table[group.vision_row.to(table.device), group.patch_index.to(table.device)]
        instruction, instruction_ids = None, None
        if "instruction" in self.pre_method.signals:
            instruction, instruction_ids = self._instruction(image, embeds)
        return VisualGroup(
            features=embeds[positions], height=group.height, width=group.width, signals=signals,
            project=self.adapter.project, seed=_mix_seed(self.pre_method.seed, image_idx, group_idx), index=group_idx,
            instruction=instruction, instruction_ids=instruction_ids,
        )

    def _instruction(self, image: ImageSpan, embeds: torch.Tensor):
        """Embeddings [T, D] and ids [T] of the sample's real text tokens after ``image`` (the instruction), or of
        all its real text tokens when none follows the image."""
        input_ids, b, real = self._instruction_source
        text = real.clone()
        text[image.positions.to(real.device)] = False
        if input_ids is not None:  # no other image / video placeholder is text
            placeholders = torch.tensor(self.adapter.placeholder_token_ids(), device=input_ids.device)
            text &= ~torch.isin(input_ids[b], placeholders).to(real.device)
        after = text.clone()
        after[: int(image.positions[-1]) + 1] = False
        chosen = torch.nonzero(after if bool(after.any()) else text).flatten()
        ids = input_ids[b, chosen.to(input_ids.device)] if input_ids is not None else None
        return embeds[chosen.to(embeds.device)], ids

    def _check_selection(self, selection: Selection, size: int, k: int) -> None:
        keep = selection.keep
        if keep.numel() + selection.num_merged > k or (keep.numel() and (int(keep.min()) < 0 or int(keep.max()) >= size)):
            raise RuntimeError(
                f"method {self.pre_method.name!r} returned {keep.numel()} kept + {selection.num_merged} merged "
                f"tokens for a budget of {k} out of {size}; this is a bug in the method."
            )

    # -- decode --------------------------------------------------------------------------------------
    def _continue(self, state: _DecodeState, kwargs: dict[str, Any]) -> dict[str, Any]:
        embeds = kwargs["inputs_embeds"]
        batch, steps, _ = embeds.shape
        mask = kwargs.get("attention_mask")
        if mask is not None and not (torch.is_tensor(mask) and mask.dim() == 2):
            # a decode mask generate() pre-built for a static cache: its causal cut follows the (pruned) cache's
            # length, not the caller's positions, so it cannot be read back; decoded tokens are always real, so
            # the pruned prompt's mask followed by ones is the mask (as for a call without one)
            mask = None
            kwargs = {**kwargs, "attention_mask": None}
        if mask is not None:
            if mask.dim() != 2 or mask.shape[1] != state.seen_len + steps:
                raise VTPruneError(
                    f"decoding a pruned model needs the unpruned 2-D attention mask ({state.seen_len + steps} "
                    f"columns), got shape {tuple(mask.shape)}."
                )
            mask = torch.cat([state.prompt_mask, mask[:, state.prompt_len:]], dim=1)
        elif bool((state.prompt_mask == 0).any()):
            tail = state.prompt_mask.new_ones(batch, state.seen_len - state.prompt_len + steps)
            mask = torch.cat([state.prompt_mask, tail], dim=1)
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            position_ids = torch.arange(state.seen_len, state.seen_len + steps, device=embeds.device).expand(batch, steps)
        position_ids = position_ids - state.position_shift.unsqueeze(-1)
        if self._segments:
            given = kwargs.get("attention_mask")
            tail = given[:, state.prompt_len:] if given is not None else None
            self._step = (tail, state.seen_len - state.prompt_len, position_ids, state.cache)
        state.seen_len += steps
        state.cache_len += steps
        return {**kwargs, "attention_mask": mask, "position_ids": position_ids}

    # -- stats ---------------------------------------------------------------------------------------
    def _finish_sample_stats(self, sample: SampleStats, length: int, num_layers: int, layout: SampleLayout,
                             kwargs: dict[str, Any]) -> None:
        visual = sample.stages[-1].visual_out if sample.stages else sample.visual_in
        sample.layer_lengths = [length] * num_layers
        sample.visual_lengths = [visual] * num_layers
        unpruned_length = length - visual + sample.visual_in
        sample.flops, sample.flops_unpruned = self._flops(layout, sample.layer_lengths, unpruned_length)

    def _flops(self, layout: SampleLayout, layer_lengths: list[int], unpruned_length: int):
        """Analytic prefill FLOPs (pruned, unpruned) of one sample, or (None, None) with one warning when the
        FLOPs model does not know this configuration: statistics never break inference."""
        from ..bench.flops import model_prefill_flops

        num_layers = len(layer_lengths)
        try:
            vision = self.adapter.flops_inputs(layout)
            lengths = self.vit_stage.layer_lengths() if self.vit_stage is not None else None
            vit = {} if lengths is None else {"vit_layer_lengths": self.vit_stage.sample_lengths(layout, lengths)}
            pruned = model_prefill_flops(self.model.config, layer_lengths, logits_positions=layer_lengths[-1]
                                         if layer_lengths else 0, **vision, **vit)
            full = model_prefill_flops(self.model.config, [unpruned_length] * num_layers,
                                       logits_positions=unpruned_length, **vision)
        except Exception as error:  # noqa: BLE001  (any failure of the statistics must not abort the forward)
            if not self._flops_warned:
                self._flops_warned = True
                warnings.warn(f"vtprune: prefill FLOPs are not available for {type(self.model).__name__} "
                              f"({type(error).__name__}: {error}); stats().flops is None. Pruning is unaffected.",
                              UserWarning, stacklevel=2)
            return None, None
        return pruned.total, full.total

    def _record_text_only(self, kwargs: dict[str, Any]) -> None:
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            return
        mask = kwargs.get("attention_mask")
        lengths = mask.sum(-1).tolist() if mask is not None and mask.dim() == 2 else [embeds.shape[1]] * embeds.shape[0]
        num_layers = len(self.adapter.decoder_layers)
        samples = []
        for length in lengths:
            sample = SampleStats(visual_in=0)
            self._finish_sample_stats(sample, int(length), num_layers, SampleLayout(), kwargs)
            samples.append(sample)
        self.last_stats = PruneStats(self.name, samples)

    # -- loss ----------------------------------------------------------------------------------------
    def _loss(self, model: nn.Module, logits: torch.Tensor, targets: _Targets, columns) -> torch.Tensor:
        """Causal-LM loss of the sequence the decoder ran, with each column's target taken from the caller's
        (unpruned) targets: a column predicts the next column that is still in the sequence, i.e. the token at
        its original position p_next, whose target sits in ``shift_labels[p_next - 1]`` (= ``labels[p_next]``).
        Merged tokens have no target; the last real column keeps its own (what followed it in the input).

        ``columns``: per sample (slots in the logits, original position of each slot, merged flags), or None
        when nothing was pruned (the caller's targets apply unchanged)."""
        vocab = self.adapter.text_config.vocab_size
        labels, shift = targets.labels, targets.shift_labels
        if columns is None:
            return model.loss_function(logits=logits, labels=labels, shift_labels=shift, vocab_size=vocab,
                                       **targets.loss_kwargs)
        if shift is None:  # shift_labels[t] = labels[t + 1]
            shift = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
        pruned = torch.full(logits.shape[:2], -100, dtype=shift.dtype, device=logits.device)
        for b, (slot, src, merged) in enumerate(columns):
            src, merged = src.to(shift.device), merged.to(shift.device)
            if not src.numel():
                continue
            values = torch.cat([shift[b, src[1:] - 1], shift[b, src[-1:]]])
            values[:-1][merged[1:]] = -100  # the next column is a merged token: nothing to predict
            pruned[b, slot.to(logits.device)] = values.to(logits.device)
        return model.loss_function(logits=logits, labels=None, shift_labels=pruned, vocab_size=vocab,
                                   **targets.loss_kwargs)
