"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL (``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``,
``Qwen3VLForConditionalGeneration``), image path.

What the three share: a ViT without CLS token that runs on all patches of all images as one packed sequence
(attention per image), a ``PatchMerger`` that turns every 2 x 2 group of patches (consecutive in the ViT
sequence) into one LLM token, and a decoder with 3-D multimodal RoPE whose position ids come from the
model's rope index (``get_rope_index``; decoding continues with ``rope_deltas``). The engine handles the
3-D positions (:mod:`vtprune.engine.positions`); this adapter locates the image tokens and captures signals.

Signals, all per merged (LLM) token:

* ``cls_attention``: there is no CLS token, so the score of a patch is the mean attention it receives at the
  last ViT block (the merger's input): mean over heads and over every query of its image, from that block's
  q/k after the vision rotary embedding (the tower keeps its attention implementation). A merged token's
  score is the mean over its 2 x 2 patches. Qwen2.5-VL runs its blocks in window order (``window_index``);
  the order is undone before grouping.
* ``vit_keys``: the last block's keys (before the vision rotary embedding, head-averaged), averaged over each
  2 x 2 group.
* ``vit_hidden``: the merger's input, the 4 patch states of each group concatenated ([4 * dv]);
  :meth:`project` runs the merger on merged states.

Qwen3-VL also adds *deepstack* features (ViT states of early blocks, merged) to the hidden states of its
first decoder layers at the visual positions. The engine keeps them aligned with the pruned sequence: kept
tokens keep their rows, merged tokens get the same combination of rows as their embedding (the method's
merge weights), and an explicit error is raised where that is impossible.

Videos are not pruned yet: a forward with video inputs raises :class:`~vtprune.errors.UnsupportedModelError`.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import compat
from ..engine.layout import ImageSpan, SampleLayout, TokenGroup
from ..errors import UnsupportedModelError
from ..selectors.cls_attention import mean_received_attention
from .base import Adapter, SignalStore, register_adapter, split_image_spans


def _call_arg(args: tuple, kwargs: dict, name: str, index: int = 0):
    return kwargs[name] if name in kwargs else (args[index] if len(args) > index else None)


def _per_image(values: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """[sum lengths, ...] -> [images, max length, ...], zero-padded (indexed [image, merged token])."""
    parts = torch.split(values, lengths)
    out = values.new_zeros(len(lengths), max(lengths), *values.shape[1:])
    for i, part in enumerate(parts):
        out[i, : part.shape[0]] = part
    return out


def qwen_compact_image(grid: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Qwen-VL's rope index for the kept tokens of one pruned image (``positions="compact"``).

    The model's rope index gives an image of t x h x w merged tokens the ids (start + t_i, start + h_i,
    start + w_i) and lets the next token start ``max(h, w)`` later. A pruned image is no longer a full grid, so
    its kept tokens are placed on the smallest grid that keeps their row and column order: a token's height
    index is the rank of its row among the image's rows that still hold a kept token (merged tokens count at
    their anchor), its width index likewise among the columns, and the temporal index keeps its offset from
    the first kept frame (0 for still images); the next token comes ``max(kept rows, kept columns)`` later.
    For a pruned sub-grid (``uniform``, ``pool``) this is exactly the rope index of an image with that grid;
    for an unpruned image it is the model's own.

    ``grid`` LongTensor[3, m]: the (t, h, w) ids of the kept tokens -> (offsets [3, m], advance).
    """
    temporal = grid[0] - grid[0].min()
    height = torch.unique(grid[1], return_inverse=True)[1]  # rank among the kept rows
    width = torch.unique(grid[2], return_inverse=True)[1]  # rank among the kept columns
    advance = max(int(height.max()) + 1, int(width.max()) + 1)
    return torch.stack([temporal, height, width]), advance


class _QwenVLAdapter(Adapter):
    provides = ("cls_attention", "vit_keys", "vit_hidden", "grid", "received_attention")
    compact_image_positions = staticmethod(qwen_compact_image)
    #: whether the ViT runs its blocks in window order (Qwen2.5-VL)
    windowed: bool = False

    @property
    def visual(self):
        return self.model.model.visual

    def vision_depth(self) -> int:
        return len(self.visual.blocks)

    def feature_layer_index(self) -> int:
        return len(self.visual.blocks) - 1  # the merger reads the last block's output

    @property
    def merge_size(self) -> int:
        return int(self.config.vision_config.spatial_merge_size)

    def has_visual_input(self, call: dict[str, Any]) -> bool:
        encoded = compat.encoder_outputs(call)
        if call.get("pixel_values_videos") is not None or encoded.get("video") is not None:
            raise UnsupportedModelError(
                f"vtprune prunes {type(self.model).__name__} images only; video inputs are not supported yet. "
                "Remove the pruning (vtprune.remove) to run videos."
            )
        return super().has_visual_input(call)

    # -- layout ----------------------------------------------------------------------------------------
    def _grids(self, call: dict[str, Any]) -> list[tuple[int, int, int]]:
        grid = call.get("image_grid_thw")
        if grid is None:
            raise UnsupportedModelError("Qwen-VL inputs need image_grid_thw; build them with the model's processor.")
        return [tuple(int(x) for x in row) for row in grid.tolist()]

    def build_layouts(self, call: dict[str, Any]) -> list[SampleLayout]:
        grids = self._grids(call)
        merge = self.merge_size
        lengths = [t * h * w // merge**2 for t, h, w in grids]

        def span(image_idx: int, positions: torch.Tensor) -> ImageSpan:
            t, h, w = grids[image_idx]
            if t != 1:
                raise UnsupportedModelError(f"image {image_idx} has {t} temporal patches; only still images are pruned.")
            height, width = h // merge, w // merge
            index = torch.arange(height * width)
            group = TokenGroup(members=index, height=height, width=width,
                               vision_row=torch.full_like(index, image_idx), patch_index=index)
            return ImageSpan(positions=positions, structural=torch.zeros_like(index, dtype=torch.bool),
                             row=index // width, groups=[group])

        layouts = split_image_spans(call["input_ids"], self.config.image_token_id, lengths, span)
        for layout in layouts:
            layout.vision_grids = [grids[i] for i in layout.image_ids]
        return layouts

    # -- signals ---------------------------------------------------------------------------------------
    def _merged_lengths(self, store: SignalStore) -> list[int]:
        return [t * h * w // self.merge_size**2 for t, h, w in self._grids(store.vision_call)]

    def _raster_order(self, store: SignalStore, num_patches: int) -> torch.Tensor | None:
        """Permutation putting the last block's patch sequence back in raster (merger-group) order, or None."""
        if not self.windowed:
            return None
        vc = self.config.vision_config
        grid = store.vision_call["image_grid_thw"]
        window_index, _ = compat.vision_window_index(grid.cpu(), vc.spatial_merge_size, vc.window_size, vc.patch_size)
        units = torch.argsort(window_index)  # raster unit u sits at window position units[u]
        group = self.merge_size**2
        order = (units[:, None] * group + torch.arange(group)[None, :]).reshape(-1)
        if order.numel() != num_patches:
            raise UnsupportedModelError("the Qwen2.5-VL window index does not match the ViT sequence.")
        return order

    def _grouped(self, values: torch.Tensor, store: SignalStore) -> torch.Tensor:
        """[N patches, ...] in block order -> [M merged, group, ...] in raster order."""
        order = self._raster_order(store, values.shape[0])
        if order is not None:
            values = values[order.to(values.device)]
        return values.reshape(-1, self.merge_size**2, *values.shape[1:])

    def install_signal_hooks(self, store: SignalStore) -> list[Any]:
        handles = []
        if store.wanted & {"cls_attention", "vit_keys"}:
            attention = self.visual.blocks[-1].attn

            def on_attention(module, args, kwargs):
                if not store.capturing:
                    return
                with torch.no_grad():
                    self._capture_attention(module, args, kwargs, store)

            handles.append(attention.register_forward_pre_hook(on_attention, with_kwargs=True))
        if "vit_hidden" in store.wanted:

            def on_merger(module, args, kwargs):
                if store.capturing:
                    hidden = _call_arg(args, kwargs, "x").detach()  # [N, dv] in block order
                    grouped = self._grouped(hidden, store)  # [M, group, dv]
                    store["vit_hidden"] = _per_image(grouped.flatten(1), self._merged_lengths(store))

            handles.append(self.visual.merger.register_forward_pre_hook(on_merger, with_kwargs=True))
        for index, wanted in self.layered_wanted(store).items():

            def on_block(module, args, kwargs, wanted=wanted):
                if not store.capturing:
                    return
                with torch.no_grad():
                    for _, name in wanted:  # received_attention is the only layer signal of this family
                        store[name] = self._received_attention(module, args, kwargs, store)

            handles.append(self.visual.blocks[index].attn.register_forward_pre_hook(on_block, with_kwargs=True))
        return handles

    def _received_attention(self, module, args, kwargs, store: SignalStore) -> torch.Tensor:
        """[images, M] mean attention each merged token's patches receive at this block: per attention segment
        of the block (the whole image, or a window on Qwen2.5-VL's windowed blocks), mean over heads and over the
        segment's queries, after the vision rotary embedding; then the mean over each 2 x 2 merger group."""
        hidden = _call_arg(args, kwargs, "hidden_states")  # [N, dv] after norm1
        cu_seqlens = kwargs["cu_seqlens"] if "cu_seqlens" in kwargs else args[1]
        cos, sin = kwargs["position_embeddings"] if "position_embeddings" in kwargs else args[2]
        n = hidden.shape[0]
        q, k, _ = module.qkv(hidden).reshape(n, 3, module.num_heads, -1).permute(1, 0, 2, 3).unbind(0)  # [N, H, dh]
        q, k = compat.modeling_function(module, "apply_rotary_pos_emb_vision")(q, k, cos, sin)
        scores = torch.empty(n, dtype=torch.float32, device=hidden.device)
        bounds = cu_seqlens.tolist()
        for start, end in zip(bounds[:-1], bounds[1:], strict=True):
            scores[start:end] = mean_received_attention(
                q[start:end].transpose(0, 1), k[start:end].transpose(0, 1), module.scaling)
        return _per_image(self._grouped(scores, store).mean(dim=1), self._merged_lengths(store))

    def _capture_attention(self, module, args, kwargs, store: SignalStore) -> None:
        hidden = _call_arg(args, kwargs, "hidden_states")  # [N, dv] after norm1
        cu_seqlens = kwargs["cu_seqlens"] if "cu_seqlens" in kwargs else args[1]
        cos, sin = kwargs["position_embeddings"] if "position_embeddings" in kwargs else args[2]
        n = hidden.shape[0]
        q, k, _ = module.qkv(hidden).reshape(n, 3, module.num_heads, -1).permute(1, 0, 2, 3).unbind(0)  # [N, H, dh]
        lengths = self._merged_lengths(store)
        if "vit_keys" in store.wanted:
            keys = self._grouped(k.mean(dim=1), store).mean(dim=1)  # [M, dh]: head mean, then 2x2 group mean
            store["vit_keys"] = _per_image(keys, lengths)
        if "cls_attention" in store.wanted:
            rotary = compat.modeling_function(module, "apply_rotary_pos_emb_vision")
            q, k = rotary(q, k, cos, sin)
            scores = torch.empty(n, dtype=torch.float32, device=hidden.device)
            bounds = cu_seqlens.tolist()
            for start, end in zip(bounds[:-1], bounds[1:], strict=True):  # the block's attention segments
                scores[start:end] = mean_received_attention(
                    q[start:end].transpose(0, 1), k[start:end].transpose(0, 1), module.scaling)
            store["cls_attention"] = _per_image(self._grouped(scores, store).mean(dim=1), lengths)

    def project(self, vision_hidden: torch.Tensor) -> torch.Tensor:
        """Merged merger inputs [m, group * dv] -> LLM tokens [m, D] (the PatchMerger)."""
        merger = self.visual.merger
        group = self.merge_size**2
        return merger(vision_hidden.reshape(-1, vision_hidden.shape[-1] // group).to(self.visual.dtype))

    # -- positions / FLOPs -----------------------------------------------------------------------------
    def unpruned_decode_positions(self, call: dict[str, Any], seen_len: int) -> torch.Tensor | None:
        """Without an attention mask the model derives decode positions from the cache length, which is the
        pruned length here: give it the unpruned ones (``seen_len + step + rope_deltas``)."""
        deltas = compat.rope_deltas(self.model.model)
        if call.get("position_ids") is not None or call.get("attention_mask") is not None or deltas is None:
            return None
        tokens = call.get("input_ids") if call.get("input_ids") is not None else call.get("inputs_embeds")
        if tokens is None:
            return None
        batch, steps = tokens.shape[:2]
        if deltas.shape[0] != batch:
            deltas = deltas.repeat_interleave(batch // deltas.shape[0], dim=0)
        positions = torch.arange(seen_len, seen_len + steps, device=tokens.device).view(1, 1, -1)
        return positions.expand(3, batch, steps) + deltas.to(tokens.device).view(1, batch, 1)

    def flops_inputs(self, layout: SampleLayout) -> dict[str, Any]:
        grids = list(layout.vision_grids)
        projected = sum(t * h * w for t, h, w in grids) // self.merge_size**2
        return {"num_vision_inputs": len(grids), "num_projected_tokens": projected, "grid_thw": grids}


@register_adapter
class Qwen2VLAdapter(_QwenVLAdapter):
    family = "qwen2_vl"
    model_class_names = ("Qwen2VLForConditionalGeneration",)


@register_adapter
class Qwen2_5_VLAdapter(_QwenVLAdapter):  # noqa: N801  (the transformers class name)
    family = "qwen2_5_vl"
    model_class_names = ("Qwen2_5_VLForConditionalGeneration",)
    windowed = True


@register_adapter
class Qwen3VLAdapter(_QwenVLAdapter):
    family = "qwen3_vl"
    model_class_names = ("Qwen3VLForConditionalGeneration",)
    visual_side_inputs = ("visual_pos_masks", "deepstack_visual_embeds")
    side_input_injector = ("", compat.DEEPSTACK_INJECTOR)
