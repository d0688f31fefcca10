"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): images and videos.

A SigLIP tower without CLS token, an MLP projector and a Qwen2 decoder (1-D RoPE). An image is the base view
(27 x 27 tokens at 384 px) followed by the AnyRes crops packed as one unpadded grid with an image-newline
token closing every row; when that grid exceeds ``anyres_max_N`` crops' worth of tokens it is bilinearly
downsampled (the packed tokens are then blends of neighbouring patches). A sample with several images gets
no crops: each image is its base view plus one newline token.

Layout: the model's own ``pack_image_features`` run on index tensors gives each token's place (so it always
matches the model's packing); an image has two groups, the base view and the high-resolution grid (one grid,
whatever the crop count), and newline tokens are structural (kept while their row holds a token).

Videos: every sampled frame runs through the tower at the base resolution (27 x 27 patches at 384 px), is
projected, and its grid is pooled 2 x 2 bilinearly (``apply_pooling``: 14 x 14 = 196 tokens per frame at
384 px); the clip's frames follow each other and one image-newline token closes the video. Layout: one group
per frame (its pooled grid), the newline structural (kept while any token of the clip survives). Signals of
video tokens are captured per frame like the base view's and pooled with the model's own ``apply_pooling``,
so each pooled token has the interpolated signal of its patches; ``vit_hidden`` is the projector's input
pooled the same way (merged tokens are projected from it).

Signals: there is no CLS token, so ``cls_attention`` is the mean attention each patch receives at the
feature layer (mean over heads and over every query of its crop, from q/k; the tower stays on SDPA).
Signals are captured per crop and then packed exactly like the features (``pack_image_features`` on the
signal tensors), so every packed token — downsampled ones included — has the signal of its own mix of
patches (scores and keys interpolated like the features).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .. import compat
from ..engine.layout import ImageSpan, SampleLayout, TokenGroup
from ..errors import UnsupportedModelError
from ..selectors.cls_attention import mean_received_attention
from .base import (
    IMAGE,
    VIDEO,
    SignalStore,
    crop_index_features,
    merge_modalities,
    register_adapter,
    split_image_spans,
)
from .llava import _ClipLlavaAdapter


def _pad_rows(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Stack [n_i, ...] tensors into [len, max n_i, ...], zero-padded."""
    longest = max(t.shape[0] for t in tensors)
    out = tensors[0].new_zeros(len(tensors), longest, *tensors[0].shape[1:])
    for i, t in enumerate(tensors):
        out[i, : t.shape[0]] = t
    return out


@register_adapter
class LlavaOnevisionAdapter(_ClipLlavaAdapter):
    family = "llava_onevision"
    model_class_names = ("LlavaOnevisionForConditionalGeneration",)
    provides = ("cls_attention", "vit_keys", "vit_hidden", "grid", "received_attention")  # SigLIP: no [CLS]

    vision_entry_points = (("model", compat.IMAGE_FEATURES), ("model", compat.VIDEO_FEATURES))

    @staticmethod
    def _attention_scores(module, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """[rows, T] mean attention each token receives (SigLIP has no CLS): mean over heads and queries, from the
        attention module's queries and keys [rows, T, H, dh]."""
        rows = queries.shape[0]
        return torch.stack([
            mean_received_attention(queries[r].transpose(0, 1), keys[r].transpose(0, 1), module.scale)
            for r in range(rows)
        ])

    # -- the model's own image bookkeeping ---------------------------------------------------------------
    def _crops_per_image(self, call: dict[str, Any]) -> list[int]:
        image_size_to_num_patches = compat.image_size_to_num_patches("llava_onevision")
        image_sizes = call["image_sizes"]
        batch_num_images = call.get("batch_num_images")
        if batch_num_images is None:
            patching = [True] * len(image_sizes)
        else:
            patching = [int(n) == 1 for n in batch_num_images for _ in range(int(n))]
        return [
            image_size_to_num_patches(image_size=size, grid_pinpoints=self.config.image_grid_pinpoints,
                                      patch_size=self.config.vision_config.image_size) if patch else 1
            for size, patch in zip(image_sizes, patching, strict=True)
        ]

    def _pack(self, call: dict[str, Any], features: list[torch.Tensor], newline: torch.Tensor) -> list[torch.Tensor]:
        """``pack_image_features`` of the model: per image [crops, P, C] -> [n, C]."""
        image_sizes = call["image_sizes"]
        ratio = call.get("vision_aspect_ratio") or self.config.vision_aspect_ratio
        packed, _ = compat.pack_image_features(
            self.model.model, features, image_sizes.cpu() if torch.is_tensor(image_sizes) else image_sizes,
            image_newline=newline, vision_aspect_ratio=ratio,
        )
        return packed

    def end_capture(self, store: SignalStore) -> None:
        """Pack the per-crop signals like the features: tables indexed [image, token of the image's span]."""
        names = [name for name in ("cls_attention", "vit_keys", "vit_hidden", "vit_size") if name in store]
        names += sorted(name for name in store.keys() if "@" in name)  # layer signals, e.g. received_attention@8
        if not names:
            return
        call = store.vision_call
        scalar = {name for name in names if store[name].dim() == 2}  # [crops, P] scores
        if store.modality == VIDEO:  # every frame pooled like its features: tables [videos * frames, n, ...]
            for name in names:
                table = store[name].float()
                column = table[..., None] if name in scalar else table  # [rows, P, c]
                pooled = compat.apply_video_pooling(self.model.model, column)  # [rows, n, c]
                store[name] = (pooled[..., 0] if name in scalar else pooled).to(store[name].dtype)
            return
        columns = [store[name].float()[..., None] if name in scalar else store[name].float()
                   for name in names]  # each [crops, P, c]
        widths = [c.shape[-1] for c in columns]
        joined = torch.cat(columns, dim=-1)  # [crops, P, sum c]
        per_image = list(torch.split(joined, self._crops_per_image(call), dim=0))
        packed = self._pack(call, per_image, joined.new_zeros(joined.shape[-1]))  # per image [n, sum c]
        table = _pad_rows(packed)  # [images, max n, sum c]
        for name, part in zip(names, torch.split(table, widths, dim=-1), strict=True):
            dtype = store[name].dtype
            store[name] = (part[..., 0] if name in scalar else part).to(dtype)

    def vision_rows_per_image(self, call: dict[str, Any]) -> list[int]:
        return self._crops_per_image(call)

    # -- layout --------------------------------------------------------------------------------------------
    def build_layouts(self, call: dict[str, Any]) -> list[SampleLayout]:
        modalities = self.visual_modalities(call)
        images = self._image_layouts(call) if IMAGE in modalities else None
        videos = self._video_layouts(call) if VIDEO in modalities else None
        return merge_modalities(images, videos)

    def _pooled_side(self) -> int:
        """Side of a video frame's token grid after the model's 2 x 2 pooling."""
        vc = self.config.vision_config
        return math.ceil(vc.image_size // vc.patch_size / 2)

    def _video_layouts(self, call: dict[str, Any]) -> list[SampleLayout]:
        pixels = compat.video_pixels(call)
        if pixels is None:
            raise UnsupportedModelError("LLaVA-OneVision video inputs need pixel_values_videos; build them with the "
                                        "model's processor.")
        if self._feature_strategy(call) != "full":
            raise UnsupportedModelError("LLaVA-OneVision videos are pruned under vision_feature_select_strategy="
                                        "'full' (the checkpoints' setting) only.")
        videos, frames = int(pixels.shape[0]), int(pixels.shape[1])
        side = self._pooled_side()
        per_frame = side * side
        length = frames * per_frame + 1  # the frames' pooled grids, then one newline

        def span(video_idx: int, positions: torch.Tensor) -> ImageSpan:
            groups = []
            for frame in range(frames):
                members = torch.arange(frame * per_frame, (frame + 1) * per_frame)
                groups.append(TokenGroup(members, side, side, torch.full_like(members, video_idx * frames + frame),
                                         members - frame * per_frame))
            structural = torch.zeros(length, dtype=torch.bool)
            structural[-1] = True
            return ImageSpan(positions, structural, torch.zeros(length, dtype=torch.long), groups, kind="video")

        layouts = split_image_spans(call["input_ids"], self.config.video_token_id, [length] * videos, span)
        for layout in layouts:
            layout.vision_inputs = frames * len(layout.images)
        return layouts

    def _image_layouts(self, call: dict[str, Any]) -> list[SampleLayout]:
        crops = self._crops_per_image(call)
        num_patches = self._patches_per_row() - (1 if self._feature_strategy(call) == "default" else 0)
        index_features = crop_index_features(crops, num_patches)
        packed = self._pack(call, index_features, torch.tensor([-1.0, -1.0, 0.0]))
        spans = [self._image_span(image_idx, p, count > 1, num_patches)
                 for image_idx, (p, count) in enumerate(zip(packed, crops, strict=True))]
        layouts = self._split_spans(call, [s.num_tokens for s in spans],
                                    lambda i, positions: ImageSpan(positions, spans[i].structural, spans[i].row,
                                                                   spans[i].groups))
        # vision-encoder inputs per sample (FLOPs): the crops of its images, in order
        for layout in layouts:
            layout.vision_inputs = sum(crops[i] for i in layout.image_ids)
        return layouts

    @staticmethod
    def _image_span(image_idx: int, packed: torch.Tensor, has_crops: bool, num_patches: int) -> ImageSpan:
        """packed [n, 3]: (vision row, patch index, content) per token; newline tokens have content 0."""
        structural = packed[:, 2] < 0.5
        row = torch.cumsum(structural.long(), 0) - structural.long()  # a newline closes the row it ends
        side = math.isqrt(num_patches)
        base_grid = (side, side) if side * side == num_patches else (None, None)
        base = torch.arange(num_patches)
        groups = [TokenGroup(base, *base_grid, torch.full_like(base, image_idx), base)]
        if has_crops:
            row[:num_patches] = -1  # the base view has no newline tokens
            high = torch.nonzero(~structural[num_patches:]).flatten() + num_patches
            height = int(structural[num_patches:].sum())
            width = high.numel() // height if height else 0
            if height * width != high.numel():
                raise UnsupportedModelError("the packed LLaVA-OneVision crops do not form a grid; unexpected layout.")
            groups.append(TokenGroup(high, height, width, torch.full_like(high, image_idx), high))
        return ImageSpan(torch.empty(0, dtype=torch.long), structural, row, groups)
