"""Decode-time pruning of the visual KV cache: at each decode step, layers from ``layer`` on attend to a per-step
*view* of the cache (the text, the decoded tokens and the visual entries the method keeps), gathered from the full
cache, so attention over the visual span costs what the kept entries cost. The full cache is still stored (a
later step may keep other entries, as DyCoke does); nothing is masked in place.

How a step runs (one :class:`DecodeStage` per pruned model, state per thread):

* at the prefill the session calls :meth:`DecodeStage.begin` with the cache and, per sample, the cache columns
  that hold visual content tokens (images, video frames, pre-LLM merged tokens);
* the language-model pre-hook of a decode step (one new token per row on that cache) arms the step and builds its
  2-D mask over the cache;
* the pre-hook of decoder layer ``layer − 1`` records that layer's input; the pre-hook of decoder layer ``layer``
  computes the current token's attention at layer ``layer − 1`` over the cached keys (from q/k, as
  :func:`~vtprune.engine.attention_rows.attention_over_keys`; no eager attention), asks the method which visual
  entries to keep, and builds the gather index [B, K] and its mask;
* layers ``layer`` and later receive a cache proxy whose ``update`` stores the new key/value in the real cache and
  returns the gathered view, and the matching attention mask. Positions are untouched: cached keys carry their
  RoPE already.

Beam search reorders the method's per-row memory with the cache (``cache.reorder_cache`` is wrapped on that cache
instance while the stage follows it, and unwrapped when a new prefill starts or the model is unpruned).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .. import compat
from .attention_rows import attention_over_keys

__all__ = ["DecodeStage", "DecodeStep"]

#: room left at the end of a gathered view's buffers for the entries of later decode steps (at least this many, or
#: an eighth of the view); a full buffer doubles
SPARE = 32


@dataclass
class DecodeStep:
    """What a decode-stage method sees at one decode step.

    ``index``      decode steps since the prefill (0 = the first forward after it)
    ``attention``  [B, V] float32: the current token's head-mean attention at layer ``layer − 1`` over each
                   sample's visual cache entries (softmax over the whole visible cache; 0 at padding entries)
    ``valid``      [B, V] bool: which of the V entries are real for each sample
    ``previous``   per sample: the visual entries (indices into 0..V) kept at the previous step, None = all
    ``memory``     the method's own per-row tensors ([B, ...]) kept across the steps of one generation; the
                   engine reorders them with the cache under beam search
    """

    index: int
    attention: torch.Tensor
    valid: torch.Tensor
    previous: list[torch.Tensor | None]
    memory: dict[str, torch.Tensor] = field(default_factory=dict)


class _View:
    """The gathered view of the cache for the current kept set, kept across decode steps.

    ``prompt`` [B, W]: per sample, the prompt's cache columns attended to (its text and kept visual entries,
    ascending; rows shorter than W padded with their last column and masked out); ``allowed`` [B, W] bool or None
    (all real). The view of a layer is those W prompt columns followed by every decoded entry. Each layer's
    gathered keys/values live in a buffer with spare room at the end: a decode step appends its new entry there
    and attention reads a slice, so the prompt part is gathered once per kept set, not once per step (DyCoke
    re-selects only when the attention pattern changes)."""

    def __init__(self, kept: list, rows: list[torch.Tensor], prompt_len: int):
        self.kept = kept                      # per sample: kept visual entries (None = all)
        self.rows = rows                      # per sample: the prompt's cache columns attended to, ascending
        self.prompt_len = prompt_len
        batch, width = len(rows), max(r.numel() for r in rows)
        device = rows[0].device
        prompt = torch.zeros(batch, width, dtype=torch.long, device=device)
        allowed = torch.zeros(batch, width, dtype=torch.bool, device=device)
        for b, r in enumerate(rows):
            prompt[b, :r.numel()] = r
            if r.numel():
                prompt[b, r.numel():] = r[-1]  # padding repeats a real column, masked out
            allowed[b, :r.numel()] = True
        self.prompt = prompt
        self.allowed = None if bool(allowed.all()) else allowed
        self.buffers: dict[int, list] = {}   # layer -> [keys [B, Hkv, cap, dh], values, filled]
        self.mask: Any = None                 # the layers' attention mask of the current step (built once)
        self.mask_for: int = -1               # the cache length ``mask`` was built for

    def update(self, cache: Any, key_states, value_states, layer_idx: int, *args, **kwargs):
        keys, values = cache.update(key_states, value_states, layer_idx, *args, **kwargs)
        batch, heads, length, dim = keys.shape
        prompt_len = self.prompt_len
        width = self.prompt.shape[1] + length - prompt_len  # entries of the view after this step
        entry = self.buffers.get(layer_idx)
        new = key_states.shape[2]
        if entry is not None and entry[2] + new == width and entry[0].shape[:2] == (batch, heads):
            kbuf, vbuf, filled = entry
            if width > kbuf.shape[2]:  # out of room: double it
                kbuf = torch.cat([kbuf, torch.empty_like(kbuf)], dim=2)
                vbuf = torch.cat([vbuf, torch.empty_like(vbuf)], dim=2)
            kbuf[:, :, filled:width] = key_states
            vbuf[:, :, filled:width] = value_states
        else:  # a new kept set (or a layer not seen yet): gather the prompt part, copy the decoded entries
            capacity = width + max(SPARE, width // 8)
            kbuf = keys.new_empty(batch, heads, capacity, dim)
            vbuf = values.new_empty(batch, heads, capacity, dim)
            index = self.prompt.to(keys.device)[:, None, :, None].expand(batch, heads, self.prompt.shape[1], dim)
            prompt_width = self.prompt.shape[1]
            kbuf[:, :, :prompt_width] = keys[:, :, :prompt_len].gather(2, index)
            vbuf[:, :, :prompt_width] = values[:, :, :prompt_len].gather(2, index)
            kbuf[:, :, prompt_width:width] = keys[:, :, prompt_len:]
            vbuf[:, :, prompt_width:width] = values[:, :, prompt_len:]
        self.buffers[layer_idx] = [kbuf, vbuf, width]
        return kbuf[:, :, :width], vbuf[:, :, :width]

    def same_kept(self, kept: list) -> bool:
        return len(kept) == len(self.kept) and all(
            (a is None and b is None) or (a is not None and b is not None and (a is b or torch.equal(a, b)))
            for a, b in zip(kept, self.kept, strict=True))

    def reorder(self, beam_idx: torch.Tensor) -> None:
        order = beam_idx.tolist()
        self.kept = [self.kept[r] for r in order]
        self.rows = [self.rows[r] for r in order]
        self.prompt = self.prompt[beam_idx.to(self.prompt.device)]
        if self.allowed is not None:
            self.allowed = self.allowed[beam_idx.to(self.allowed.device)]
        for entry in self.buffers.values():
            entry[0] = entry[0].index_select(0, beam_idx.to(entry[0].device))
            entry[1] = entry[1].index_select(0, beam_idx.to(entry[1].device))
        self.mask, self.mask_for = None, -1


class _GatheredCache:
    """A stand-in for the real cache during one decode step of the layers from ``layer`` on: ``update`` stores the
    new key/value in the real cache as usual and returns the gathered view ``[B, Hkv, K, dh]`` (see :class:`_View`)."""

    def __init__(self, cache: Any, view: _View):
        self._cache = cache
        self._view = view

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return self._view.update(self._cache, key_states, value_states, layer_idx, *args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._cache, name)


class _Reorder:
    """Per-instance stand-in for ``cache.reorder_cache`` (beam search): reorders the cache, then the stage's rows."""

    def __init__(self, stage: DecodeStage, original):
        self.stage, self.original = stage, original

    def __call__(self, beam_idx: torch.Tensor):
        out = self.original(beam_idx)
        self.stage._reorder(beam_idx)
        return out


@dataclass
class _State:
    cache: Any
    cache_len: int                  # tokens in the cache
    prompt_len: int                 # cache columns of the prompt
    prompt_mask: torch.Tensor       # [B, Lp] 2-D mask of the prompt's cache columns
    visual: torch.Tensor            # [B, V] cache columns of the visual entries (padded with 0)
    valid: torch.Tensor             # [B, V] bool
    other: list[torch.Tensor]       # per sample: real prompt columns that are not visual
    step: int = 0
    previous: list = field(default_factory=list)
    memory: dict = field(default_factory=dict)
    fresh: bool = True              # set by the prefill, which the language-model hook then lets pass
    active: bool = False            # the current forward is a decode step the stage prunes
    mask2d: torch.Tensor | None = None
    captured: tuple | None = None   # (hidden, position_embeddings) entering layer ``layer - 1``
    view: _View | None = None       # the gathered view of the current kept set (lives while the set is unchanged)
    use_view: bool = False          # the current step's layers from ``layer`` on attend to ``view``
    views: int = 0                  # gathered views built in this generation (one per change of the kept set)
    history: list = field(default_factory=list)  # per step: kept visual entries per sample
    columns: list = field(default_factory=list)  # per step: None (whole cache) or (prompt rows, cache length)


class DecodeStage:
    """The engine side of a decode-stage method (see the module docstring). ``method`` provides ``decode_layer(num
    layers)`` and ``decide(step) -> list[LongTensor | None]`` (kept visual entries per sample, None = all)."""

    def __init__(self, method, decoder_layers: list[nn.Module], config):
        self.method = method
        self.layers = decoder_layers
        self.layer = method.decode_layer(len(decoder_layers))
        if not 1 <= self.layer < len(decoder_layers):
            raise ValueError(f"decode-stage layer {self.layer} must be in [1, {len(decoder_layers) - 1}]")
        self.config = config
        self._local = threading.local()

    # -- state ------------------------------------------------------------------------------------------
    @property
    def state(self) -> _State | None:
        return getattr(self._local, "state", None)

    def _set(self, state: _State | None) -> None:
        old = self.state
        if old is not None and old.cache is not (state.cache if state is not None else None):
            reorder = vars(old.cache).get("reorder_cache")
            if isinstance(reorder, _Reorder) and reorder.stage is self:
                del old.cache.reorder_cache
        self._local.state = state

    def reset(self) -> None:
        """Forget the current generation (a new prefill, a forward without visual tokens, or ``remove``)."""
        self._set(None)

    @property
    def step_columns(self) -> list[list[torch.Tensor | None]]:
        """Per decode step of the last generation: per sample, the cache columns that layers from ``layer`` on
        attended to (None: the whole cache)."""
        state = self.state
        if state is None:
            return []
        out = []
        for step in state.columns:
            if step is None:
                out.append([None] * state.visual.shape[0])
                continue
            rows, length = step
            out.append([torch.cat([r, torch.arange(state.prompt_len, length, device=r.device)]) for r in rows])
        return out

    @property
    def history(self) -> list[list[int]]:
        """Per decode step of the last generation: the visual KV entries each sample attended to from ``layer``
        on."""
        state = self.state
        return [] if state is None else [list(step) for step in state.history]

    def begin(self, cache: Any, visual_columns: list[torch.Tensor], prompt_mask: torch.Tensor | None,
              prompt_len: int) -> None:
        """A prefill ran with ``cache``; ``visual_columns``: per sample, the cache columns of its visual entries."""
        if cache is None or not any(c.numel() for c in visual_columns):
            self.reset()
            return
        batch = len(visual_columns)
        device = visual_columns[0].device
        if prompt_mask is None:
            prompt_mask = torch.ones(batch, prompt_len, dtype=torch.long, device=device)
        width = max(c.numel() for c in visual_columns)
        visual = torch.zeros(batch, width, dtype=torch.long, device=device)
        valid = torch.zeros(batch, width, dtype=torch.bool, device=device)
        other = []
        for b, cols in enumerate(visual_columns):
            visual[b, :cols.numel()] = cols
            valid[b, :cols.numel()] = True
            real = torch.nonzero(prompt_mask[b].to(device)).flatten()
            other.append(real[~torch.isin(real, cols)])
        state = _State(cache=cache, cache_len=prompt_len, prompt_len=prompt_len, prompt_mask=prompt_mask,
                       visual=visual, valid=valid, other=other, previous=[None] * batch)
        self._set(state)
        original = getattr(cache, "reorder_cache", None)
        if original is not None and not isinstance(vars(cache).get("reorder_cache"), _Reorder):
            cache.reorder_cache = _Reorder(self, original)

    def _reorder(self, beam_idx: torch.Tensor) -> None:
        state = self.state
        if state is None:
            return
        rows = beam_idx.tolist()
        state.previous = [state.previous[r] for r in rows]
        state.memory = {k: v[beam_idx.to(v.device)] for k, v in state.memory.items()}
        state.prompt_mask = state.prompt_mask[beam_idx.to(state.prompt_mask.device)]
        state.visual = state.visual[beam_idx.to(state.visual.device)]
        state.valid = state.valid[beam_idx.to(state.valid.device)]
        state.other = [state.other[r] for r in rows]
        if state.view is not None:
            state.view.reorder(beam_idx)

    # -- hooks ------------------------------------------------------------------------------------------
    def on_language_model_call(self, kwargs: dict[str, Any]) -> None:
        """Language-model pre-hook (after the session's, so ``kwargs`` are in cache coordinates)."""
        state = self.state
        if state is None:
            return
        state.active, state.use_view, state.captured = False, False, None
        if state.fresh:  # the prefill itself
            state.fresh = False
            return
        cache = compat.get_cache(kwargs)
        if cache is not state.cache or cache.get_seq_length() != state.cache_len:
            self.reset()  # another cache, or this one changed outside the stage: nothing to follow
            return
        embeds = kwargs.get("inputs_embeds")
        steps = embeds.shape[1] if embeds is not None else kwargs["input_ids"].shape[1]
        batch = state.visual.shape[0]
        new_len = state.cache_len + steps
        mask = kwargs.get("attention_mask")
        if not (torch.is_tensor(mask) and mask.dim() == 2 and mask.shape == (batch, new_len)):
            tail = state.prompt_mask.new_ones(batch, new_len - state.prompt_len)
            mask = torch.cat([state.prompt_mask, tail], dim=1)
        state.cache_len = new_len
        state.active = steps == 1  # several new tokens at once (a continued prompt) attend to the full cache
        state.mask2d = mask

    def on_decoder_layer(self, index: int, args: tuple, kwargs: dict[str, Any]):
        state = self.state
        if state is None or not state.active or index < self.layer - 1:
            return None
        if index == self.layer - 1:
            hidden = args[0] if args else kwargs["hidden_states"]
            state.captured = (hidden, kwargs["position_embeddings"])
            return None
        if index == self.layer:
            state.use_view = self._select(state)
        if not state.use_view:
            return None
        view = state.view
        cache = compat.get_cache(kwargs)
        new_kwargs = compat.with_cache(kwargs, _GatheredCache(cache, view))
        if view.mask_for != state.cache_len:  # once per step, shared by the layers
            view.mask = self._layer_mask(view, state.cache_len, kwargs.get("attention_mask"))
            view.mask_for = state.cache_len
        new_kwargs["attention_mask"] = view.mask
        return args, new_kwargs

    # -- the step's selection ---------------------------------------------------------------------------
    def _select(self, state: _State):
        hidden, position_embeddings = state.captured
        keys = compat.cache_layer_tensors(state.cache)[self.layer - 1][0][:, :, :state.cache_len]  # [B, Hkv, L, dh]
        mask2d = state.mask2d.to(keys.device).bool()
        probs = attention_over_keys(self.layers[self.layer - 1], hidden, position_embeddings, keys, mask2d,
                                    average_heads=True)[:, -1]  # [B, L]
        visual = state.visual.to(probs.device)
        attention = torch.where(state.valid.to(probs.device), probs.gather(1, visual), torch.zeros((), device=probs.device))
        step = DecodeStep(index=state.step, attention=attention, valid=state.valid, previous=state.previous,
                          memory=state.memory)
        kept = self.method.decide(step)
        state.step += 1
        counts = state.valid.sum(dim=1).tolist()
        kept = [None if k is not None and k.numel() >= n else k for k, n in zip(kept, counts, strict=True)]
        state.previous = kept
        state.history.append([n if k is None else int(k.numel()) for k, n in zip(kept, counts, strict=True)])
        if all(k is None for k in kept):
            state.columns.append(None)
            state.view = None
            return False
        if state.view is None or not state.view.same_kept(kept):  # a new kept set: a new view
            device = keys.device
            rows = []
            for b in range(len(kept)):
                cols = state.visual[b, state.valid[b]] if kept[b] is None else state.visual[b, kept[b]]
                rows.append(torch.sort(torch.cat([state.other[b].to(device), cols.to(device)])).values)
            state.view = _View(kept, rows, state.prompt_len)
            state.views += 1
        state.columns.append((state.view.rows, state.cache_len))
        return True

    def _layer_mask(self, view: _View, cache_len: int, original):
        """The attention mask of the gathered view (its prompt part, then every decoded entry), in the form the
        layer's attention expects: None when every entry is visible (a single query attends to all of them), else
        [B, 1, 1, K] boolean (SDPA) or additive float (eager)."""
        if view.allowed is None:
            return None
        decoded = view.allowed.new_ones(view.allowed.shape[0], cache_len - view.prompt_len)
        mask = torch.cat([view.allowed, decoded], dim=1)[:, None, None, :]
        floating = (torch.is_tensor(original) and original.is_floating_point()) or (
            original is None and compat.attention_implementation(self.config) == "eager")
        if floating:
            dtype = original.dtype if torch.is_tensor(original) else torch.float32
            return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
        return mask
