"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL (``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``,
``Qwen3VLForConditionalGeneration``): images and videos.

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

Videos: the ViT runs on ``temporal_patch_size`` (2) frames at a time, so a video of F frames has T = F / 2
temporal groups ("frames" below), each an h x w grid of merged tokens; the layout gives every temporal group
its own :class:`~vtprune.engine.layout.TokenGroup` (frame-major, raster order inside). The rope index gives
the token (t, h, w) of group t the ids (start + t * interval, start + h, start + w): interval 1 on Qwen2-VL,
``tokens_per_second * second_per_grid_ts`` on Qwen2.5-VL (the frame times of the layout are
``t * second_per_grid_ts``). Qwen3-VL writes a timestamp (text, ``<1.5 seconds>``) and vision start/end tokens
before each temporal group and indexes every group as a one-frame image; its video span is therefore not
contiguous (the text between frames is never pruned) and its frame times stay in that text (None in the
layout). Signals of video tokens come from the ViT run on the videos (attention segments are one temporal
group each), indexed like the images' but in tables of their own.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from .. import compat
from ..engine.layout import ImageSpan, SampleLayout, TokenGroup
from ..errors import UnsupportedModelError
from ..selectors.cls_attention import mean_received_attention
from .base import IMAGE, VIDEO, Adapter, SignalStore, merge_modalities, register_adapter, split_image_spans


def _call_arg(args: tuple, kwargs: dict, name: str, index: int = 0):
    return kwargs[name] if name in kwargs else (args[index] if len(args) > index else None)


def _per_image(values: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """[sum lengths, ...] -> [images, max length, ...], zero-padded (indexed [image, merged token])."""
    parts = torch.split(values, lengths)
    out = values.new_zeros(len(lengths), max(lengths), *values.shape[1:])
    for i, part in enumerate(parts):
        out[i, : part.shape[0]] = part
    return out


def qwen_compact_image(grid: torch.Tensor, frame: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Qwen-VL's rope index for the kept tokens of one pruned image (``positions="compact"``).

    The model's rope index gives an image of t x h x w merged tokens the ids (start + t_i, start + h_i,
    start + w_i) and lets the next token start ``max(h, w)`` later. A pruned image is no longer a full grid, so
    its kept tokens are placed on the smallest grid that keeps their row and column order: a token's height
    index is the rank of its row among the image's rows that still hold a kept token (merged tokens count at
    their anchor), its width index likewise among the columns, and the temporal index keeps its offset from
    the first kept frame (0 for still images); the next token comes ``max(kept rows, kept columns)`` later.
    For a pruned sub-grid (``uniform``, ``pool``) this is exactly the rope index of an image with that grid;
    for an unpruned image it is the model's own.

    A video (``frame`` LongTensor[m]: the temporal group of each kept token, several of them): each temporal
    group is placed on its own kept sub-grid (ranks among the rows / columns that hold a kept token *of that
    group*), the temporal index keeps its offset from the first kept group (time scaling included, so the time
    order and spacing stay), and the next token comes ``max`` over the groups of their sub-grid's extent later.
    Unpruned, this is again the model's own index.

    ``grid`` LongTensor[3, m]: the (t, h, w) ids of the kept tokens -> (offsets [3, m], advance).
    """
    temporal = grid[0] - grid[0].min()
    if frame is not None:
        height, width = torch.empty_like(grid[1]), torch.empty_like(grid[2])
        advance = 0
        for value in torch.unique(frame).tolist():
            rows = frame == value
            height[rows] = torch.unique(grid[1, rows], return_inverse=True)[1]
            width[rows] = torch.unique(grid[2, rows], return_inverse=True)[1]
            advance = max(advance, int(height[rows].max()) + 1, int(width[rows].max()) + 1)
        return torch.stack([temporal, height, width]), advance
    height = torch.unique(grid[1], return_inverse=True)[1]  # rank among the kept rows
    width = torch.unique(grid[2], return_inverse=True)[1]  # rank among the kept columns
    advance = max(int(height.max()) + 1, int(width.max()) + 1)
    return torch.stack([temporal, height, width]), advance


class _QwenVLAdapter(Adapter):
    provides = ("cls_attention", "vit_keys", "vit_hidden", "grid", "received_attention")
    compact_image_positions = staticmethod(qwen_compact_image)
    vision_entry_points = (("model", compat.IMAGE_FEATURES), ("model", compat.VIDEO_FEATURES))
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

    # -- layout ----------------------------------------------------------------------------------------
    @staticmethod
    def _grid_key(modality: str) -> str:
        return "video_grid_thw" if modality == VIDEO else "image_grid_thw"

    def _grids(self, call: dict[str, Any], modality: str = IMAGE) -> list[tuple[int, int, int]]:
        grid = call.get(self._grid_key(modality))
        if grid is None:
            raise UnsupportedModelError(f"Qwen-VL {modality} inputs need {self._grid_key(modality)}; build them "
                                        "with the model's processor.")
        return [tuple(int(x) for x in row) for row in grid.tolist()]

    def build_layouts(self, call: dict[str, Any]) -> list[SampleLayout]:
        modalities = self.visual_modalities(call)
        merge = self.merge_size
        per_modality: dict[str, list[SampleLayout]] = {}
        for modality in (IMAGE, VIDEO):
            if modality not in modalities:
                continue
            grids = self._grids(call, modality)
            lengths = [t * h * w // merge**2 for t, h, w in grids]
            if modality == IMAGE:
                span = functools.partial(self._image_span, grids)
                token = self.config.image_token_id
            else:
                span = functools.partial(self._video_span, grids, self._frame_seconds(call, len(grids)))
                token = self.config.video_token_id
            layouts = split_image_spans(call["input_ids"], token, lengths, span)
            for layout in layouts:
                layout.vision_grids = [grids[i] for i in layout.image_ids]
            per_modality[modality] = layouts
        return merge_modalities(per_modality.get(IMAGE), per_modality.get(VIDEO))

    def _image_span(self, grids, image_idx: int, positions: torch.Tensor) -> ImageSpan:
        t, h, w = grids[image_idx]
        if t != 1:
            raise UnsupportedModelError(f"image {image_idx} has {t} temporal patches; only still images are expected.")
        height, width = h // self.merge_size, w // self.merge_size
        index = torch.arange(height * width)
        group = TokenGroup(members=index, height=height, width=width,
                           vision_row=torch.full_like(index, image_idx), patch_index=index)
        return ImageSpan(positions=positions, structural=torch.zeros_like(index, dtype=torch.bool),
                         row=index // width, groups=[group])

    def _video_span(self, grids, seconds: list[float | None], video_idx: int, positions: torch.Tensor) -> ImageSpan:
        t, h, w = grids[video_idx]
        height, width = h // self.merge_size, w // self.merge_size
        per_frame = height * width
        groups = []
        for frame in range(t):  # one group per temporal group, frame-major like the ViT's and the merger's output
            members = torch.arange(frame * per_frame, (frame + 1) * per_frame)
            groups.append(TokenGroup(members=members, height=height, width=width,
                                     vision_row=torch.full_like(members, video_idx), patch_index=members))
        index = torch.arange(t * per_frame)
        times = None if seconds[video_idx] is None else torch.arange(t, dtype=torch.float32) * seconds[video_idx]
        return ImageSpan(positions=positions, structural=torch.zeros_like(index, dtype=torch.bool),
                         row=index // width, groups=groups, kind="video", frame_times=times)

    @staticmethod
    def _frame_seconds(call: dict[str, Any], videos: int) -> list[float | None]:
        """Seconds between temporal groups of each video (Qwen2.5-VL's ``second_per_grid_ts``), None if unknown."""
        seconds = compat.seconds_per_grid(call)
        if seconds is None:
            return [None] * videos
        values = seconds.tolist() if torch.is_tensor(seconds) else list(seconds)
        if not videos or len(values) % videos:
            return [None] * videos
        # generate() with beams / several returned sequences repeats every entry r times (rows of a sample)
        return [float(v) for v in values[::len(values) // videos]]

    # -- signals ---------------------------------------------------------------------------------------
    def _merged_lengths(self, store: SignalStore) -> list[int]:
        return [t * h * w // self.merge_size**2 for t, h, w in self._grids(store.vision_call, store.modality)]

    def _raster_order(self, store: SignalStore, num_patches: int) -> torch.Tensor | None:
        """Permutation putting the last block's patch sequence back in raster (merger-group) order, or None."""
        if not self.windowed:
            return None
        vc = self.config.vision_config
        grid = store.vision_call[self._grid_key(store.modality)]
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
