"""The in-vision-encoder stage: prune or merge tokens between the blocks of a CLIP / SigLIP vision tower.

Per instance: every encoder layer of the tower gets an instance attribute ``forward`` (a :class:`_LayerForward`,
deleted by ``vtprune.remove``) that runs the block itself on the tokens still alive -- attention on SDPA, with
the log of each token's size added to the attention logits as an additive float mask (ToMe's proportional
attention) where the method asks for it -- and lets the method merge (after attention) or drop (after the block)
tokens.

Layout contract. Between blocks the tower still passes tensors of its original shape [rows, T, d]: every alive
token sits at the slot of its *representative* original token (a merged token at the slot of the token the others
were merged into), removed slots hold zeros. The features reaching the projector therefore keep the shape the
processor's placeholders expect, and the engine drops the placeholders of removed slots before the decoder,
exactly as a pre-LLM stage drops tokens (``session._select_image``). Inside the blocks only the alive tokens
are computed, so the encoder's cost follows the reduced count (``VitRun.layer_lengths``, used by the FLOPs).

Rows are processed per image (the base image and its crops together; every crop keeps its own tokens): a batch
of images gives each image what it would get alone.

Images only: the session refuses a video reaching the encoder of a model pruned in-ViT.

The table ``vit_size`` [rows, patches] (in the projector's coordinates: the CLS column dropped under the
"default" feature strategy) is written to the signal store: the size of the token at each slot, 0 where removed.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import BudgetError, UnsupportedModelError
from .timing import section

#: the signal-store table the stage writes (indexed like every vision signal)
SIZE_TABLE = "vit_size"


@dataclass
class VitCohort:
    """The vision-encoder rows of one image (the base view and its crops), pruned together.

    ``rows``        LongTensor[R]: rows of the tower's batch
    ``slots``       LongTensor[R, t]: original token index (0 = CLS on CLIP) of each current token
    ``size``        [R, t, 1] tokens each current token stands for
    ``target``      tokens per row (protected included) to leave after the feature layer
    ``class_token`` whether token 0 is a [CLS] token (protected)
    ``state``       the method's own per-image state (schedule, cumulative scores)
    """

    rows: torch.Tensor
    slots: torch.Tensor
    size: torch.Tensor
    target: int
    class_token: bool
    feature_index: int
    num_layers: int
    state: dict[str, Any] = field(default_factory=dict)
    #: per layer, the tokens per row through its attention, or (attention, MLP) tokens when it merged in between
    lengths: list = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return int(self.slots.shape[1])


@dataclass
class VitLayerInputs:
    """What a method sees in one block of one cohort: q, k, v [R, H, t, dh] and the softmax scale."""

    index: int
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scale: float


class _RunState(threading.local):
    def __init__(self) -> None:
        self.rows_per_image: list[int] | None = None
        self.cohorts: list[VitCohort] | None = None
        self.active = False
        self.compact: list[torch.Tensor] | None = None  # per cohort [R, t, d] after the last layer
        self.output: torch.Tensor | None = None          # the tensor the last layer returned


class _LayerForward:
    """Instance-attribute ``forward`` of one encoder layer (an object, so ``copy.deepcopy`` follows the model)."""

    def __init__(self, stage: VitStage, index: int, layer: torch.nn.Module, original) -> None:
        self.stage, self.index, self.layer, self.original = stage, index, layer, original

    def __call__(self, hidden_states, *args, **kwargs):
        return self.stage.run_layer(self.index, self.layer, self.original, hidden_states, args, kwargs)


class VitStage:
    """Owns the per-layer wrappers of one pruned model's vision tower and the state of the current vision run."""

    def __init__(self, method, adapter, store, session=None) -> None:
        self.method = method
        self.session = session  # its ``timer`` (set by vtprune.bench) times the method's work as "select"
        self.adapter = adapter
        self.store = store
        self._local = _RunState()
        self.layers = adapter.vit_layers()  # raises UnsupportedModelError with the reason where not supported

    def __deepcopy__(self, memo: dict) -> VitStage:
        import copy

        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        for key, value in vars(self).items():
            setattr(clone, key, _RunState() if key == "_local" else copy.deepcopy(value, memo))
        return clone

    def install(self) -> list[tuple[Any, str]]:
        wrapped = []
        for index, layer in enumerate(self.layers):
            layer.forward = _LayerForward(self, index, layer, layer.forward)
            wrapped.append((layer, "forward"))
        return wrapped

    # -- per vision call ------------------------------------------------------------------------------
    def begin(self, call: dict[str, Any]) -> None:
        """Called when the vision encoder's entry point starts (``call``: its arguments)."""
        self._local.rows_per_image = self.adapter.vision_rows_per_image(call)
        self._local.cohorts = None
        self._local.active = False

    def _start(self, hidden: torch.Tensor) -> None:
        local = self._local
        rows, tokens, _ = hidden.shape
        per_image = local.rows_per_image or [1] * rows
        if sum(per_image) != rows:
            raise UnsupportedModelError(
                f"the vision tower ran on {rows} rows but the images of this call have {sum(per_image)} inputs; "
                "vtprune cannot tell which rows belong to which image."
            )
        class_token = self.adapter.vit_has_class_token()
        offset = self.adapter.vit_patch_offset(self.store)  # 1: the CLS column is not a visual token
        visual_per_row = tokens - offset
        feature_index, num_layers = self.adapter.vit_feature_index(), len(self.layers)
        cohorts, first = [], 0
        for count in per_image:
            k = min(self.method.row_budget(count, visual_per_row), visual_per_row)
            if class_token and offset == 0 and k < 1:
                raise BudgetError("the [CLS] token is kept: a budget of at least 1 token per input is needed.")
            index = torch.arange(first, first + count)
            slots = torch.arange(tokens, device=hidden.device).expand(count, tokens)
            cohort = VitCohort(rows=index, slots=slots, size=hidden.new_ones(count, tokens, 1), target=k + offset,
                               class_token=class_token, feature_index=feature_index, num_layers=num_layers)
            self.method.vit_start(cohort)
            cohorts.append(cohort)
            first += count
        local.cohorts = cohorts
        local.active = any(c.target < tokens or c.state.get("forced", False) for c in cohorts)

    def run_layer(self, index: int, layer, original, hidden: torch.Tensor, args: tuple, kwargs: dict):
        local = self._local
        if index == 0:
            self._start(hidden)
        if not local.active or local.cohorts is None:
            return original(hidden, *args, **kwargs)
        mask = args[0] if args else kwargs.get("attention_mask")
        if mask is not None:
            raise UnsupportedModelError("in-ViT pruning needs a vision tower called without an attention mask.")
        reuse = index > 0 and local.output is hidden and local.compact is not None
        out = hidden.new_zeros(hidden.shape)
        compact = []
        for c_idx, cohort in enumerate(local.cohorts):
            if reuse:
                x = local.compact[c_idx]
            else:  # [R, t, d] gathered from the full-shape tensor
                x = hidden[cohort.rows.to(hidden.device)].gather(
                    1, cohort.slots[..., None].expand(-1, -1, hidden.shape[-1]))
            x = self._block(index, layer, x, cohort)
            out[cohort.rows.to(hidden.device)] = out[cohort.rows.to(hidden.device)].scatter(
                1, cohort.slots[..., None].expand(-1, -1, x.shape[-1]), x)
            compact.append(x)
            if index == cohort.feature_index:
                self._record(cohort, hidden.shape[1])
        local.compact, local.output = compact, out
        return out

    def _block(self, index: int, layer, x: torch.Tensor, cohort: VitCohort) -> torch.Tensor:
        """One CLIP / SigLIP encoder layer on the cohort's alive tokens x [R, t, d]."""
        attn = layer.self_attn
        rows, t, d = x.shape
        heads, head_dim = attn.num_heads, attn.head_dim
        h = layer.layer_norm1(x)
        q = attn.q_proj(h).view(rows, t, heads, head_dim).transpose(1, 2)  # [R, H, t, dh]
        k = attn.k_proj(h).view(rows, t, heads, head_dim).transpose(1, 2)
        v = attn.v_proj(h).view(rows, t, heads, head_dim).transpose(1, 2)
        bias = None
        if self.method.proportional_attention and bool((cohort.size != 1).any()):
            bias = cohort.size.log().to(q.dtype).view(rows, 1, 1, t)  # log(size) of every key
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=attn.scale)  # [R, H, t, dh]
        x = x + attn.out_proj(o.transpose(1, 2).reshape(rows, t, d))
        inputs = VitLayerInputs(index=index, q=q, k=k, v=v, scale=attn.scale)
        timer = getattr(self.session, "timer", None)
        if index <= cohort.feature_index:
            with section(timer, "select"):
                plan = self.method.vit_merge(cohort, inputs)
            if plan is not None:
                from ..selectors.tome import apply_merge

                x, cohort.size = apply_merge(plan, x, cohort.size)
                cohort.slots = cohort.slots.gather(1, plan.keep)
        # tokens through the attention and through the MLP (FLOPs)
        cohort.lengths.append((t, x.shape[1]) if x.shape[1] != t else t)
        x = x + layer.mlp(layer.layer_norm2(x))
        if index <= cohort.feature_index:
            with section(timer, "select"):
                keep = self.method.vit_prune(cohort, inputs)  # [R, t'] current tokens kept, in the new order
            if keep is not None:
                x = x.gather(1, keep[..., None].expand(-1, -1, d))
                cohort.size = cohort.size.gather(1, keep[..., None])
                cohort.slots = cohort.slots.gather(1, keep)
        return x

    def _record(self, cohort: VitCohort, tokens: int) -> None:
        """The size table of the feature layer's output for the cohort's rows (0 = slot removed)."""
        offset = self.adapter.vit_patch_offset(self.store)
        table = self.store.get(SIZE_TABLE)
        rows_total = sum(self._local.rows_per_image or [])
        if table is None or table.shape[0] != rows_total:
            table = torch.zeros(rows_total, tokens - offset)
            self.store[SIZE_TABLE] = table
        sizes = torch.zeros(cohort.rows.numel(), tokens)
        sizes.scatter_(1, cohort.slots.cpu(), cohort.size[..., 0].float().cpu())
        table[cohort.rows] = sizes[:, offset:]

    # -- after the run ---------------------------------------------------------------------------------
    def layer_lengths(self) -> list[list[int]] | None:
        """Per tower row, the tokens entering each encoder layer in the last run (None: nothing was pruned)."""
        local = self._local
        if not local.active or local.cohorts is None:
            return None
        out: list[list[int] | None] = [None] * sum(c.rows.numel() for c in local.cohorts)
        for cohort in local.cohorts:
            for row in cohort.rows.tolist():
                out[row] = list(cohort.lengths)
        return out

    def ran(self) -> bool:
        """Whether the last vision run pruned (False: every image kept all its tokens)."""
        return bool(self._local.active)

    def started(self) -> bool:
        """Whether the wrapped blocks ran since the vision encoder's entry point was last called."""
        return self._local.cohorts is not None

    def clear(self) -> None:
        self._local.cohorts = None
        self._local.compact = None
        self._local.output = None
        self._local.active = False

    def sample_lengths(self, layout, lengths: list[list[int]]) -> list[list[int]]:
        """The per-layer token counts of the tower rows of one sample's images (``layout.image_ids``)."""
        per_image = self._local.rows_per_image or [1] * len(lengths)
        starts = [sum(per_image[:i]) for i in range(len(per_image))]
        ids = layout.image_ids or list(range(len(layout.images)))
        return [lengths[row] for i in ids for row in range(starts[i], starts[i] + per_image[i])]


#: why Qwen-VL vision encoders refuse in-ViT pruning
QWEN_REFUSAL = (
    "in-ViT pruning is not supported on Qwen-VL vision encoders: their blocks attend within windows "
    "(Qwen2.5-VL) laid out on the patch grid, rotate q/k by 2-D RoPE indexed by each patch's grid position, and "
    "the PatchMerger after the last block concatenates fixed 2x2 groups of neighbouring patches into one LLM "
    "token; merging or dropping patches inside the encoder breaks those groups (arbitrary survivors would be "
    "concatenated four at a time). Use a pre-LLM or in-LLM method on this model."
)

#: pre-LLM signals read inside the vision encoder's attention, which the in-ViT stage computes itself
_ATTENTION_SIGNALS = frozenset({"cls_attention", "vit_keys", "vit_cls_hidden", "received_attention",
                                "flat_cls_attention", "flat_keys"})


def check_composition(vit: list, methods: list, adapter) -> None:
    """Refuse compositions the in-ViT stage cannot serve, before anything is installed."""
    from ..errors import VTPruneError
    from ..registry import IN_VIT

    if not vit:
        return
    if len(vit) > 1:
        raise VTPruneError(f"at most one in-ViT method can run per model; got {[m.name for m in vit]}.")
    if methods[0].stage != IN_VIT:
        raise VTPruneError("list the in-ViT method first when composing (in-ViT, then pre-LLM, then in-LLM).")
    method = vit[0]
    adapter.vit_layers()  # raises UnsupportedModelError with the reason where the tower is not supported
    for other in methods[1:]:
        # layer signals ("received_attention@8") count by their kind
        needed = {s.partition("@")[0] for s in (*other.signals, *other.optional_signals)} & _ATTENTION_SIGNALS
        if other.stage == "pre-llm" and {s.partition("@")[0] for s in other.signals} & _ATTENTION_SIGNALS:
            raise VTPruneError(
                f"{other.name!r} reads the vision encoder's attention ({', '.join(sorted(needed))}), which the "
                f"in-ViT stage {method.name!r} replaces with its own block computation over fewer tokens; compose "
                f"{method.name!r} with a pre-LLM method that needs no vision-attention signal (divprune, random) "
                "or with an in-LLM method."
            )
    if getattr(method, "needs_class_token", False) and not adapter.vit_has_class_token():
        raise UnsupportedModelError(
            f"{method.name!r} scores tokens by the vision encoder's [CLS] query and value, and the "
            f"{adapter.family} vision encoder (SigLIP) has no [CLS] token; use 'tome' or a pre-LLM method."
        )
