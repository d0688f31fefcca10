"""LLaVA-1.5 (``LlavaForConditionalGeneration``) and LLaVA-NeXT (``LlavaNextForConditionalGeneration``).

Both use a CLIP-style vision tower with a CLS token and a per-token MLP projector. The visual signals come
from forward pre-hooks on one vision attention module (the layer whose output feeds the projector) and on the
projector; the CLS attention row is computed from that layer's q/k, so the tower keeps running on SDPA.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

from .. import compat
from ..engine.layout import ImageSpan, SampleLayout, TokenGroup
from ..errors import UnsupportedModelError
from ..selectors.cls_attention import cls_attention_scores, mean_received_attention
from .base import Adapter, SignalStore, crop_index_features, register_adapter, split_image_spans


def _call_arg(args: tuple, kwargs: dict, name: str, index: int = 0):
    return kwargs[name] if name in kwargs else (args[index] if len(args) > index else None)


class _ClipLlavaAdapter(Adapter):
    provides = ("cls_attention", "vit_keys", "vit_hidden", "vit_cls_hidden", "grid", "received_attention",
                "flat_cls_attention", "flat_keys")

    # -- vision tower ------------------------------------------------------------------------------
    def _feature_strategy(self, call: dict[str, Any]) -> str:
        return call.get("vision_feature_select_strategy") or self.config.vision_feature_select_strategy

    def _feature_layer_index(self) -> int:
        """Index of the encoder layer whose output is ``hidden_states[vision_feature_layer]``."""
        feature_layer = self.config.vision_feature_layer
        num_layers = self.config.vision_config.num_hidden_layers
        if not isinstance(feature_layer, int):
            raise UnsupportedModelError(
                f"vision_feature_layer={feature_layer!r} (several layers) is not supported for vision signals; "
                "use a method that needs no vision-encoder signal (e.g. divprune, random, pool)."
            )
        index = num_layers + feature_layer if feature_layer < 0 else feature_layer - 1
        if not 0 <= index < num_layers:
            raise UnsupportedModelError(f"vision_feature_layer={feature_layer} selects no encoder layer.")
        return index

    def _vision_layers(self):
        tower = self.model.model.vision_tower
        vision_model = getattr(tower, "vision_model", tower)
        return vision_model.encoder.layers

    def vision_depth(self) -> int:
        return len(self._vision_layers())

    def feature_layer_index(self) -> int:
        return self._feature_layer_index()

    def _patches_per_row(self) -> int:
        vc = self.config.vision_config
        return (vc.image_size // vc.patch_size) ** 2

    def begin_capture(self, call: dict[str, Any], store: SignalStore, modality: str = "image") -> None:
        super().begin_capture(call, store, modality)
        # signals are indexed like the projector's input: without the CLS token under the "default" strategy
        store.patch_offset = 1 if self._feature_strategy(call) == "default" else 0

    def install_signal_hooks(self, store: SignalStore) -> list[Any]:
        handles = []
        if store.wanted & {"cls_attention", "vit_keys"}:
            attention = self._vision_layers()[self._feature_layer_index()].self_attn
            handles += self._projection_hooks(attention, store, self._on_feature_qk)
        if "vit_cls_hidden" in store.wanted:
            layer = self._vision_layers()[self._feature_layer_index()]

            def on_feature_layer(module, args, output):
                # the [CLS] state of the feature layer (hidden_states[vision_feature_layer][:, 0]), which the
                # "default" strategy drops before the projector; under "full" it is a visual token already
                if not store.capturing or store.patch_offset != 1:
                    return
                hidden = output[0] if isinstance(output, tuple) else output  # [rows, T, dv]
                patches = hidden.shape[1] - 1
                # one row per image / crop, repeated over its patches so that it is indexed like every signal
                store["vit_cls_hidden"] = hidden[:, :1].detach().expand(-1, patches, -1)

            handles.append(layer.register_forward_hook(on_feature_layer))
        if "vit_hidden" in store.wanted:

            def on_projector(module, args, kwargs):
                if store.capturing:
                    store["vit_hidden"] = _call_arg(args, kwargs, "image_features").detach()

            projector = self.model.model.multi_modal_projector
            handles.append(projector.register_forward_pre_hook(on_projector, with_kwargs=True))
        for index, wanted in self.layered_wanted(store).items():
            attention = self._vision_layers()[index].self_attn
            received = [name for kind, name in wanted if kind == "received_attention"]
            others = [(kind, name) for kind, name in wanted if kind != "received_attention"]
            if others:
                hook = functools.partial(self._on_layer_attention, store, others)
                handles.append(attention.register_forward_pre_hook(hook, with_kwargs=True))
            if received:  # from the block's own q/k projections (forward hooks: nothing is computed twice)
                handles += self._received_attention_hooks(attention, store, received)
        return handles

    @staticmethod
    def _projection_hooks(attention, store: SignalStore, consume) -> list[Any]:
        """Forward hooks on ``attention.q_proj`` / ``k_proj`` that hand the block's own queries and keys
        ([rows, T, H, dh] each, whatever order the two are called in) to ``consume(attention, store, q, k)``, so the
        signals cost no second projection. Queries and keys pair up only when computed from the same input tensor
        (another hook's CLS-only query, or a projection of an earlier call, never pairs)."""
        pending: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

        def on_projection(kind, module, args, output):
            if not store.capturing:
                return
            source = args[0] if args else None
            other = pending.pop("k" if kind == "q" else "q", None)
            if other is None or other[0] is not source or other[1].shape != output.shape:
                pending.clear()
                pending[kind] = (source, output)
                return
            q, k = (output, other[1]) if kind == "q" else (other[1], output)
            rows, tokens, _ = k.shape
            shape = (rows, tokens, attention.num_heads, attention.head_dim)
            with torch.no_grad():
                consume(attention, store, q.detach().view(shape), k.detach().view(shape))

        return [attention.q_proj.register_forward_hook(functools.partial(on_projection, "q")),
                attention.k_proj.register_forward_hook(functools.partial(on_projection, "k"))]

    def _on_feature_qk(self, module, store: SignalStore, queries: torch.Tensor, keys: torch.Tensor) -> None:
        """``cls_attention`` / ``vit_keys`` of the feature layer from its queries and keys [rows, T, H, dh]."""
        offset = store.patch_offset
        if "cls_attention" in store.wanted:
            store["cls_attention"] = self._attention_scores(module, queries, keys)[:, offset:]
        if "vit_keys" in store.wanted:
            store["vit_keys"] = keys.mean(dim=2)[:, offset:]  # [rows, P, dh], head-averaged

    @staticmethod
    def _received_attention_hooks(attention, store: SignalStore, names: list[str]) -> list[Any]:
        """``received_attention`` [rows, P]: the mean attention each token receives in this block, mean over heads
        and over every query of its image / crop ([CLS] query included), from the outputs of the block's own
        ``q_proj`` and ``k_proj`` (the attention module calls q_proj before k_proj)."""
        queries: dict[str, torch.Tensor] = {}

        def on_queries(module, args, output):
            if store.capturing:
                queries["q"] = output

        def on_keys(module, args, output):
            q = queries.pop("q", None)
            if not store.capturing or q is None or q.shape != output.shape:  # e.g. another hook's CLS-only query
                return
            with torch.no_grad():
                rows, tokens, _ = output.shape
                heads, head_dim = attention.num_heads, attention.head_dim
                q = q.view(rows, tokens, heads, head_dim)
                k = output.view(rows, tokens, heads, head_dim)
                scores = torch.stack([
                    mean_received_attention(q[r].transpose(0, 1), k[r].transpose(0, 1), attention.scale)
                    for r in range(rows)
                ])[:, store.patch_offset:]
                for name in names:
                    store[name] = scores

        return [attention.q_proj.register_forward_hook(on_queries), attention.k_proj.register_forward_hook(on_keys)]

    @staticmethod
    def _on_layer_attention(store: SignalStore, wanted: list[tuple[str, str]], module, args, kwargs) -> None:
        """Signals of one vision block (``<kind>@<layer>`` names), from its q/k, patch tokens only:

        ``flat_cls_attention`` [rows, P]: the [CLS] row of
        ``softmax(q k^T / sqrt(C))`` with q, k the full-width projections (one head spanning all C channels);
        ``flat_keys`` [rows, P, C]: the full-width keys;
        ``cls_attention`` [rows, P]: the [CLS] row of the block's own multi-head attention, mean over heads (as the
        feature layer's ``cls_attention``, at another block)."""
        if not store.capturing:
            return
        hidden = _call_arg(args, kwargs, "hidden_states")  # [rows, T, C] after layer_norm1
        offset = store.patch_offset
        with torch.no_grad():
            rows, tokens, width = hidden.shape
            keys = module.k_proj(hidden)  # [rows, T, C]
            for kind, name in wanted:
                if kind == "flat_cls_attention":
                    cls_query = module.q_proj(hidden[:, :1])  # [rows, 1, C]
                    logits = (cls_query.float() @ keys.float().transpose(1, 2)) * width**-0.5  # [rows, 1, T]
                    store[name] = torch.softmax(logits, dim=-1)[:, 0, offset:]
                elif kind == "flat_keys":
                    store[name] = keys[:, offset:].detach()
                elif kind == "cls_attention":
                    shape = (rows, tokens, module.num_heads, module.head_dim)
                    heads = keys.view(shape)  # [rows, T, H, dh]
                    queries = module.q_proj(hidden[:, :1]).view(rows, 1, *shape[2:])  # the [CLS] query only
                    store[name] = _ClipLlavaAdapter._attention_scores(module, queries, heads)[:, offset:]

    @staticmethod
    def _attention_scores(module, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """[rows, T] attention of the CLS query (token 0) to every token, head-averaged, from the attention
        module's queries and keys [rows, T, H, dh]."""
        rows = queries.shape[0]
        cls_query = queries[:, 0]  # [rows, H, dh]
        return torch.stack(
            [cls_attention_scores(cls_query[r], keys[r].transpose(0, 1), module.scale) for r in range(rows)]
        )

    def project(self, vision_hidden: torch.Tensor) -> torch.Tensor:
        return self.model.model.multi_modal_projector(vision_hidden)

    # -- in-ViT stage ------------------------------------------------------------------------------
    def vit_layers(self):
        layers = self._vision_layers()
        attn = layers[0].self_attn
        if not all(hasattr(attn, name) for name in ("q_proj", "k_proj", "v_proj", "out_proj", "scale")) or not all(
                hasattr(layers[0], name) for name in ("layer_norm1", "layer_norm2", "mlp")):
            raise UnsupportedModelError(f"{type(layers[0]).__name__}: not a CLIP/SigLIP encoder layer; in-ViT "
                                        "pruning needs one.")
        self._feature_layer_index()  # a single feature layer (raises otherwise)
        return layers

    def vit_feature_index(self) -> int:
        return self._feature_layer_index()

    def vit_has_class_token(self) -> bool:
        return self.config.vision_config.model_type == "clip_vision_model"

    def vit_patch_offset(self, store: SignalStore) -> int:
        return store.patch_offset

    # -- layout ------------------------------------------------------------------------------------
    def _split_spans(self, call, image_lengths: list[int], spans_builder) -> list[SampleLayout]:
        return split_image_spans(call["input_ids"], self.config.image_token_id, image_lengths, spans_builder)


@register_adapter
class LlavaAdapter(_ClipLlavaAdapter):
    family = "llava"
    model_class_names = ("LlavaForConditionalGeneration",)

    def build_layouts(self, call: dict[str, Any]) -> list[SampleLayout]:
        strategy = self._feature_strategy(call)
        num_patches = self._patches_per_row() + (0 if strategy == "default" else 1)
        side = math.isqrt(num_patches)
        height = width = side if side * side == num_patches else None
        num_images = call["pixel_values"].shape[0]  # the vision call's pixel_values: [images, 3, H, W]
        index = torch.arange(num_patches)

        def span(image_idx: int, positions: torch.Tensor) -> ImageSpan:
            group = TokenGroup(
                members=index, height=height, width=width,
                vision_row=torch.full((num_patches,), image_idx), patch_index=index,
            )
            return ImageSpan(
                positions=positions, structural=torch.zeros(num_patches, dtype=torch.bool),
                row=index // side if height else torch.zeros(num_patches, dtype=torch.long), groups=[group],
            )

        return self._split_spans(call, [num_patches] * num_images, span)


@register_adapter
class LlavaNextAdapter(_ClipLlavaAdapter):
    """AnyRes: the base image, then the crops as one unpadded grid with an image-newline token after each row.

    The layout is obtained by running the model's own ``pack_image_features`` on index tensors, so it always
    matches the model's packing (crop order, unpadding, newline placement).
    """

    family = "llava_next"
    model_class_names = ("LlavaNextForConditionalGeneration",)

    def vision_rows_per_image(self, call: dict[str, Any]) -> list[int]:
        image_size_to_num_patches = compat.image_size_to_num_patches("llava_next")
        return [image_size_to_num_patches(image_size=size, grid_pinpoints=self.config.image_grid_pinpoints,
                                          patch_size=self.config.vision_config.image_size)
                for size in call["image_sizes"]]

    def build_layouts(self, call: dict[str, Any]) -> list[SampleLayout]:
        image_size_to_num_patches = compat.image_size_to_num_patches("llava_next")
        strategy = self._feature_strategy(call)
        if strategy != "default":
            raise UnsupportedModelError(
                "LLaVA-NeXT with vision_feature_select_strategy='full' is not supported; use 'default'."
            )
        image_sizes = call["image_sizes"]
        num_patches = self._patches_per_row()
        side = math.isqrt(num_patches)
        crops_per_image = [
            image_size_to_num_patches(
                image_size=size, grid_pinpoints=self.config.image_grid_pinpoints,
                patch_size=self.config.vision_config.image_size,
            )
            for size in image_sizes
        ]
        index_features = crop_index_features(crops_per_image, num_patches)
        newline_marker = torch.tensor([-1.0, -1.0, 0.0])
        packed, _ = compat.pack_image_features(
            self.model.model, index_features, image_sizes.cpu() if torch.is_tensor(image_sizes) else image_sizes,
            vision_feature_select_strategy=strategy, image_newline=newline_marker,
        )
        spans = [self._image_span(p, crops > 1, num_patches, side) for p, crops in zip(packed, crops_per_image, strict=True)]
        return self._split_spans(call, [s.num_tokens for s in spans], lambda i, positions: _with_positions(
            spans[i], positions))

    @staticmethod
    def _image_span(packed: torch.Tensor, has_crops: bool, num_patches: int, side: int) -> ImageSpan:
        # packed: [n, 3] rows of (vision row, patch index, is_content)
        structural = packed[:, 2] == 0
        vision_row = packed[:, 0].round().long()
        patch = packed[:, 1].round().long()
        row = torch.cumsum(structural.long(), 0) - structural.long()  # newline closes the row it ends
        if has_crops:
            row[:num_patches] = -1  # the base image has no newline tokens
        groups = []
        content_rows = vision_row[~structural]
        for r in torch.unique(content_rows).tolist():  # base image first, then the crops
            members = torch.nonzero((vision_row == r) & ~structural).flatten()
            patch_index = patch[members]
            height = int(torch.unique(patch_index // side).numel())
            width = int(torch.unique(patch_index % side).numel())
            groups.append(TokenGroup(members, height, width, torch.full_like(members, r), patch_index))
        return ImageSpan(torch.empty(0, dtype=torch.long), structural, row, groups)


def _with_positions(span: ImageSpan, positions: torch.Tensor) -> ImageSpan:
    return ImageSpan(positions, span.structural, span.row, span.groups)
