"""Adapter base: what the engine needs to know about one model family, and nothing about methods."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from .. import compat
from ..engine.layout import SampleLayout
from ..errors import UnsupportedModelError

#: signals the engine itself provides for every family (the layout's grid, decoder q/k attention rows,
#: decoder hidden/key states)
ENGINE_SIGNALS = frozenset({"grid", "decoder_attention", "decoder_states"})


class SignalStore(dict):
    """Per-forward vision signals, keyed by name, each indexed [vision_row, patch_index, ...].

    Capture hooks write only while ``capturing`` is set (between the model call and the decoder call), so the
    projector can be reused afterwards to project merged tokens without overwriting anything.
    """

    def __init__(self) -> None:
        super().__init__()
        self.capturing = False
        self.wanted: set[str] = set()
        self.patch_offset = 0  # index of the first patch token among the vision tower's tokens
        #: arguments of the last vision-encoder call (pixel_values, image_sizes, ...), read by build_layouts
        self.vision_call: dict[str, Any] | None = None


class Adapter:
    """One model family. Subclasses list the transformers class names they handle."""

    family: ClassVar[str]
    model_class_names: ClassVar[tuple[str, ...]]
    #: signals this adapter can capture
    provides: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: nn.Module):
        self.model = model

    # -- structure ---------------------------------------------------------------------------------
    @property
    def config(self):
        return self.model.config

    @property
    def text_config(self):
        return self.model.config.get_text_config(decoder=True)

    @property
    def language_model(self) -> nn.Module:
        return self.model.model.language_model

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.language_model.layers

    # -- per call ----------------------------------------------------------------------------------
    #: (attribute path from the model, method name) of the functions that run the vision encoder. They are
    #: wrapped per instance so that signals are captured and the encoder's arguments recorded, whether the
    #: encoder runs inside forward() or before it (generate() pre-encodes images in transformers 5).
    vision_entry_points: ClassVar[tuple[tuple[str, str], ...]] = (("model", compat.IMAGE_FEATURES),)

    def has_visual_input(self, call: dict[str, Any]) -> bool:
        if call.get("pixel_values") is not None:
            return True
        encoded = compat.encoder_outputs(call)
        return any(value is not None for value in encoded.values())

    def placeholder_token_ids(self) -> list[int]:
        """Token ids the processor expands into visual placeholders (images and videos)."""
        names = ("image_token_id", "image_token_index", "video_token_id", "video_token_index")
        ids = {getattr(self.config, name, None) for name in names}
        return sorted(int(i) for i in ids if i is not None)

    def build_layouts(self, call: dict[str, Any]) -> list[SampleLayout]:
        raise NotImplementedError(f"{type(self).__name__} must implement build_layouts")

    def begin_capture(self, call: dict[str, Any], store: SignalStore) -> None:
        """Called when the vision encoder starts (``call``: its arguments): reset ``store``, start capturing."""
        store.clear()
        store.vision_call = call
        store.capturing = bool(store.wanted)

    def end_capture(self, store: SignalStore) -> None:
        """Called when the vision encoder has returned (capturing is off): post-process the captured signals."""

    def install_signal_hooks(self, store: SignalStore) -> list[Any]:
        """Register the hooks that fill ``store`` with ``store.wanted``; return their handles."""
        return []

    def project(self, vision_hidden: torch.Tensor) -> torch.Tensor:
        """Map vision-space tokens [M, dv] to LLM input embeddings [M, D]."""
        raise NotImplementedError(f"{type(self).__name__} cannot project merged vision tokens")

    # -- decoder-side inputs besides the embeddings ---------------------------------------------------
    #: language-model keyword arguments that carry rows per visual token besides ``inputs_embeds``:
    #: (mask argument [B, L] marking the visual positions, argument holding a list with one [n_visual, D]
    #: tensor per injection point, rows in row-major order of the mask). Qwen3-VL's deepstack features.
    visual_side_inputs: ClassVar[tuple[str, str] | None] = None
    #: (attribute path from the language model, method name) of the function that adds those rows to the
    #: hidden states, called as ``fn(hidden, mask, rows)``; the engine wraps it per instance so that it
    #: receives the mask and rows of the tokens currently in the (pruned) sequence.
    side_input_injector: ClassVar[tuple[str, str] | None] = None

    # -- positions -------------------------------------------------------------------------------------
    #: M-RoPE families: the compact rope index of one pruned image (see vtprune.engine.positions.ImageRule);
    #: None for 1-D RoPE, where compact positions are simply consecutive
    compact_image_positions: ClassVar[Any] = None

    def unpruned_decode_positions(self, call: dict[str, Any], seen_len: int) -> torch.Tensor | None:
        """Position ids the *unpruned* model would use for a decode step that brings none, or None when the
        engine can derive them itself (1-D RoPE: ``seen_len, seen_len + 1, ...``).

        Families that compute positions from the cache length *before* the language model runs (Qwen's
        M-RoPE with ``rope_deltas``) return them here, since the pruned cache is shorter.
        """
        return None

    # -- FLOPs -----------------------------------------------------------------------------------------
    def flops_inputs(self, layout: SampleLayout) -> dict[str, Any]:
        """Vision-side arguments of :func:`vtprune.bench.flops.model_prefill_flops` for one sample."""
        vc = getattr(self.model.config, "vision_config", None)
        per_input = (vc.image_size // vc.patch_size) ** 2 if vc is not None and hasattr(vc, "image_size") else 0
        return {"num_vision_inputs": layout.vision_inputs, "num_projected_tokens": layout.vision_inputs * per_input}

    def check_signals(self, needed: set[str], method_name: str) -> None:
        missing = sorted(set(needed) - set(self.provides) - ENGINE_SIGNALS)
        if missing:
            raise UnsupportedModelError(
                f"method {method_name!r} needs signal(s) {', '.join(missing)}, which the {self.family} adapter "
                f"cannot provide (it provides: {', '.join(self.provides) or 'none'}). Pick another method."
            )


_ADAPTERS: list[type[Adapter]] = []


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    _ADAPTERS.append(cls)
    return cls


def split_image_spans(input_ids: torch.Tensor, image_token_id: int, image_lengths: list[int],
                      span_builder) -> list[SampleLayout]:
    """Per-sample layouts from the image placeholder tokens of a padded batch.

    Images fill the placeholders in row-major order (as the models' ``masked_scatter`` does): image ``i``
    takes the next ``image_lengths[i]`` placeholders; ``span_builder(i, positions)`` makes its span.
    """
    batch_index, positions = (input_ids == image_token_id).nonzero(as_tuple=True)
    batch_index, positions = batch_index.cpu(), positions.cpu()
    if sum(image_lengths) != positions.numel():
        raise UnsupportedModelError(
            f"found {positions.numel()} image tokens in input_ids but the images produce "
            f"{sum(image_lengths)} features; build the inputs with the model's processor."
        )
    layouts = [SampleLayout() for _ in range(input_ids.shape[0])]
    start = 0
    for image_idx, length in enumerate(image_lengths):
        rows = batch_index[start:start + length]
        if rows.numel() and bool((rows != rows[0]).any()):
            raise UnsupportedModelError("an image's tokens span two samples; the inputs are malformed.")
        span = span_builder(image_idx, positions[start:start + length])
        layout = layouts[int(rows[0])]
        layout.images.append(span)
        layout.vision_inputs += span.num_vision_inputs
        start += length
    return layouts


def supported_model_classes() -> list[str]:
    from . import llava, onevision, qwen_vl  # noqa: F401  (register the built-in adapters)

    return sorted(name for cls in _ADAPTERS for name in cls.model_class_names)


def adapter_for(model: nn.Module) -> Adapter:
    supported = supported_model_classes()
    for klass in type(model).__mro__:
        for cls in _ADAPTERS:
            if klass.__name__ in cls.model_class_names:
                return cls(model)
    raise UnsupportedModelError(
        f"vtprune has no adapter for {type(model).__name__}. Supported model classes: {', '.join(supported)}. "
        "Load the model with its conditional-generation class (e.g. LlavaForConditionalGeneration), not the "
        "bare backbone."
    )


def crop_index_features(crops_per_image: list[int], num_patches: int) -> list[torch.Tensor]:
    """Per image [crops, P, 3] "features" (vision row, patch index, 1 = content) to run through a model's own
    packing function (crops, unpadding, newlines), so that the packed result tells where every token came from."""
    out, first_row = [], 0
    patch = torch.arange(num_patches, dtype=torch.float32)
    for count in crops_per_image:
        rows = torch.arange(first_row, first_row + count, dtype=torch.float32)
        out.append(torch.stack(torch.broadcast_tensors(rows[:, None], patch[None, :], torch.ones(1, 1)), dim=-1))
        first_row += count
    return out
