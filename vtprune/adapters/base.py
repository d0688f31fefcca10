"""Adapter base: what the engine needs to know about one model family, and nothing about methods."""

from __future__ import annotations

import threading
from typing import Any, ClassVar

import torch
from torch import nn

from .. import compat
from ..engine.layout import SampleLayout
from ..errors import UnsupportedModelError

#: signals the engine itself provides for every family (the layout's grid, decoder q/k attention rows,
#: decoder hidden/key states)
ENGINE_SIGNALS = frozenset({"grid", "decoder_attention", "decoder_states", "instruction"})


def layer_signal(kind: str, layer: int | str) -> str:
    """Name of a signal taken at one vision-encoder block: ``"<kind>@<layer>"``. ``layer``: the 0-based block
    index (negative counts from the end, like Python indexing), or ``"feature"`` (the block whose output feeds
    the projector)."""
    return f"{kind}@{layer}"


def split_layer_signal(name: str) -> tuple[str, str | None]:
    """``"received_attention@8"`` -> ``("received_attention", "8")``; a plain name -> ``(name, None)``."""
    kind, _, layer = name.partition("@")
    return kind, (layer or None)


class _CaptureState(threading.local):
    def __init__(self) -> None:
        self.tables: dict[str, dict[str, Any]] = {}  # modality -> signal name -> table
        self.capturing = False
        self.patch_offset = 0
        self.modality = IMAGE
        self.vision_calls: dict[str, dict[str, Any]] = {}
        self.vision_outputs: dict[str, Any] = {}
        self.consumed = False
        self.depth = 0


#: the two visual modalities (the keys of ``mm_encoder_outputs``)
IMAGE, VIDEO = "image", "video"


class SignalStore:
    """Per-forward vision signals, keyed by modality and name, each indexed [vision_row, patch_index, ...].

    A forward may run the vision encoder twice, once on its images and once on its videos; each run records
    its own arguments, output and signal tables under its modality. The mapping interface (``store[name]``)
    reads and writes the tables of the modality being captured (``modality``), so adapters' hooks need not
    know which run they are in; the engine reads a modality's table with :meth:`table`.

    Capture hooks write only while ``capturing`` is set (between the model call and the decoder call), so the
    projector can be reused afterwards to project merged tokens without overwriting anything. Everything but
    ``wanted`` is kept per thread (a pruned model may serve several threads; each forward sees its own capture).

    Per thread: ``patch_offset`` (index of the first patch token among the vision tower's tokens),
    ``modality`` (of the run being captured), ``vision_calls`` / ``vision_call`` (arguments of the last
    vision-encoder call per modality / of the current modality: pixel_values, image_sizes, ..., read by
    build_layouts), ``vision_outputs`` / ``vision_output`` (what those calls returned: generate() hands them to
    later forwards as mm_encoder_outputs), ``consumed`` (whether a pruning prefill has used the runs already)
    and ``depth`` (nesting of vision entry points: Qwen3-VL's video entry point calls the image one).
    """

    _PER_THREAD = ("capturing", "patch_offset", "modality", "vision_calls", "vision_outputs", "consumed", "depth")

    def __init__(self) -> None:
        object.__setattr__(self, "_local", _CaptureState())
        object.__setattr__(self, "wanted", set())

    def __getattr__(self, name: str):
        if name in SignalStore._PER_THREAD:
            return getattr(self._local, name)
        raise AttributeError(name)

    def __setattr__(self, name: str, value) -> None:
        if name in SignalStore._PER_THREAD:
            setattr(self._local, name, value)
        else:
            object.__setattr__(self, name, value)

    def __deepcopy__(self, memo: dict) -> SignalStore:
        clone = SignalStore()
        clone.wanted = set(self.wanted)
        return clone

    @property
    def vision_call(self) -> dict[str, Any] | None:
        """Arguments of the vision-encoder run of the current modality."""
        return self._local.vision_calls.get(self._local.modality)

    @property
    def vision_output(self) -> Any:
        return self._local.vision_outputs.get(self._local.modality)

    @vision_output.setter
    def vision_output(self, value: Any) -> None:
        self._local.vision_outputs[self._local.modality] = value

    def start_run(self, modality: str, call: dict[str, Any]) -> None:
        """A vision-encoder run of ``modality`` begins: a new forward (everything before is dropped) unless it
        is the other modality's run of the same forward."""
        local = self._local
        if local.consumed or modality in local.vision_calls:
            local.tables.clear()
            local.vision_calls.clear()
            local.vision_outputs.clear()
            local.consumed = False
        local.modality = modality
        local.tables[modality] = {}
        local.vision_calls[modality] = call
        local.vision_outputs[modality] = None

    def table(self, modality: str, name: str):
        """The signal table ``name`` captured on the ``modality`` run (KeyError if absent)."""
        return self._local.tables[modality][name]

    def has(self, modality: str, name: str) -> bool:
        return name in self._local.tables.get(modality, {})

    # -- mapping of the current modality's signal tables ------------------------------------------------
    def _current(self) -> dict[str, Any]:
        return self._local.tables.setdefault(self._local.modality, {})

    def __getitem__(self, name: str):
        return self._current()[name]

    def __setitem__(self, name: str, value) -> None:
        self._current()[name] = value

    def __contains__(self, name: object) -> bool:
        return name in self._current()

    def get(self, name: str, default=None):
        return self._current().get(name, default)

    def keys(self):
        return self._current().keys()

    def clear(self) -> None:
        """Drop every run's tables, arguments and outputs."""
        self._local.tables.clear()
        self._local.vision_calls.clear()
        self._local.vision_outputs.clear()


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
    #: A function named ``compat.VIDEO_FEATURES`` encodes videos (its run is captured as the "video" modality).
    vision_entry_points: ClassVar[tuple[tuple[str, str], ...]] = (("model", compat.IMAGE_FEATURES),)

    def has_visual_input(self, call: dict[str, Any]) -> bool:
        return bool(self.visual_modalities(call))

    def visual_modalities(self, call: dict[str, Any]) -> set[str]:
        """The modalities ("image", "video") whose inputs this model call carries (pixels or pre-encoded)."""
        encoded = compat.encoder_outputs(call)
        found = {name for name, value in encoded.items() if value is not None and name in (IMAGE, VIDEO)}
        if call.get("pixel_values") is not None:
            found.add(IMAGE)
        if compat.video_pixels(call) is not None:
            found.add(VIDEO)
        return found

    def placeholder_token_ids(self) -> list[int]:
        """Token ids the processor expands into visual placeholders (images and videos)."""
        names = ("image_token_id", "image_token_index", "video_token_id", "video_token_index")
        ids = {getattr(self.config, name, None) for name in names}
        return sorted(int(i) for i in ids if i is not None)

    def placeholder_ids_from_embeds(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """Token ids standing in for ``input_ids`` when only ``inputs_embeds`` were given (as transformers locates
        the placeholders then): a placeholder token's id where a row equals that token's input embedding, -1
        elsewhere. [B, L, D] -> LongTensor[B, L]."""
        ids = torch.tensor(self.placeholder_token_ids(), device=inputs_embeds.device)
        table = self.model.get_input_embeddings()(ids).to(inputs_embeds.dtype)  # [P, D]
        match = (inputs_embeds[:, :, None, :] == table[None, None]).all(-1)  # [B, L, P]
        found = match.any(-1)
        return torch.where(found, ids[match.float().argmax(-1)], torch.full_like(found, -1, dtype=torch.long))

    def build_layouts(self, call: dict[str, Any]) -> list[SampleLayout]:
        raise NotImplementedError(f"{type(self).__name__} must implement build_layouts")

    def begin_capture(self, call: dict[str, Any], store: SignalStore, modality: str = IMAGE) -> None:
        """Called when the vision encoder starts on the images or the videos of a forward (``call``: its
        arguments): start that run in ``store`` and start capturing."""
        store.start_run(modality, call)
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

    # -- in-ViT stage (vtprune/engine/vit_stage.py) ------------------------------------------------------
    def vit_layers(self) -> nn.ModuleList:
        """The vision encoder's blocks an in-ViT method prunes between (CLIP / SigLIP towers)."""
        from ..engine.vit_stage import QWEN_REFUSAL

        if self.family.startswith("qwen"):
            raise UnsupportedModelError(QWEN_REFUSAL)
        raise UnsupportedModelError(f"in-ViT pruning is not supported on the {self.family} vision encoder.")

    def vision_rows_per_image(self, call: dict[str, Any]) -> list[int]:
        """Rows of the vision tower's batch per image of a vision call (base view + crops)."""
        return [1] * int(call["pixel_values"].shape[0])

    # -- FLOPs -----------------------------------------------------------------------------------------
    def flops_inputs(self, layout: SampleLayout) -> dict[str, Any]:
        """Vision-side arguments of :func:`vtprune.bench.flops.model_prefill_flops` for one sample."""
        vc = getattr(self.model.config, "vision_config", None)
        per_input = (vc.image_size // vc.patch_size) ** 2 if vc is not None and hasattr(vc, "image_size") else 0
        return {"num_vision_inputs": layout.vision_inputs, "num_projected_tokens": layout.vision_inputs * per_input}

    # -- vision-encoder blocks ---------------------------------------------------------------------------
    def vision_depth(self) -> int | None:
        """Number of vision-encoder blocks, or None when the family exposes none."""
        return None

    def feature_layer_index(self) -> int | None:
        """0-based index of the vision-encoder block whose output feeds the projector."""
        return None

    def resolve_vision_layer(self, spec: str) -> int:
        """0-based block index of a layer-signal spec (see :func:`layer_signal`)."""
        depth = self.vision_depth()
        if depth is None:
            raise UnsupportedModelError(f"the {self.family} adapter cannot read signals of single vision blocks.")
        if spec == "feature":
            return int(self.feature_layer_index())
        try:
            index = int(spec)
        except ValueError:
            raise UnsupportedModelError(f"vision layer {spec!r} is neither an int nor 'feature'.") from None
        resolved = depth + index if index < 0 else index
        if not 0 <= resolved < depth:
            raise UnsupportedModelError(
                f"vision block {index} does not exist: this {self.family} vision encoder has {depth} blocks "
                f"(indices 0..{depth - 1}); pick a layer inside it."
            )
        return resolved

    def layered_wanted(self, store: SignalStore) -> dict[int, list[tuple[str, str]]]:
        """Block index -> [(kind, signal name)] of the wanted layer signals."""
        out: dict[int, list[tuple[str, str]]] = {}
        for name in sorted(store.wanted):
            kind, spec = split_layer_signal(name)
            if spec is not None:
                out.setdefault(self.resolve_vision_layer(spec), []).append((kind, name))
        return out

    def check_signals(self, needed: set[str], method_name: str) -> None:
        for name in needed:
            if split_layer_signal(name)[1] is not None and split_layer_signal(name)[0] in self.provides:
                self.resolve_vision_layer(split_layer_signal(name)[1])  # an out-of-range block fails here
        needed = {split_layer_signal(name)[0] for name in needed}
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

    Images fill the placeholders in row-major order (as the models' ``masked_scatter`` does): each sample
    takes the next images whose ``image_lengths`` add up to its placeholder count; ``span_builder(i, positions)``
    makes the span of image ``i``. ``generate()`` with ``num_beams`` / ``num_return_sequences`` encodes the images
    once and then repeats every sample ``r`` times (rows ``b*r .. b*r+r-1``) with its own images: such a batch
    holds ``r`` times the placeholders of the encoded images, and each copy gets the spans of its sample's images.
    """
    batch_index, positions = (input_ids == image_token_id).nonzero(as_tuple=True)
    batch_index, positions = batch_index.cpu(), positions.cpu()
    batch = input_ids.shape[0]
    per_row = torch.bincount(batch_index, minlength=batch).tolist()
    total, encoded = sum(per_row), sum(image_lengths)
    repeats = total // encoded if encoded and total % encoded == 0 and total > encoded else 1
    if total != encoded * repeats or batch % repeats:
        raise UnsupportedModelError(
            f"found {total} image tokens in input_ids but the images produce {encoded} features; build the "
            "inputs with the model's processor."
        )
    layouts = [SampleLayout() for _ in range(batch)]
    next_image = 0
    for first in range(0, batch, repeats):
        images, count = [], 0
        while count < per_row[first] and next_image < len(image_lengths):
            images.append(next_image)
            count += image_lengths[next_image]
            next_image += 1
        if count != per_row[first] or any(per_row[row] != count for row in range(first, first + repeats)):
            raise UnsupportedModelError("an image's tokens span two samples; the inputs are malformed.")
        for row in range(first, first + repeats):
            row_positions, start = positions[batch_index == row], 0
            for image_idx in images:
                span = span_builder(image_idx, row_positions[start:start + image_lengths[image_idx]])
                start += image_lengths[image_idx]
                layouts[row].images.append(span)
                layouts[row].image_ids.append(image_idx)
                layouts[row].vision_inputs += span.num_vision_inputs
    return layouts


def merge_modalities(image_layouts: list[SampleLayout] | None,
                     video_layouts: list[SampleLayout] | None) -> list[SampleLayout]:
    """Per sample, the image spans and the video spans of a batch in one layout, in sequence order (either list
    may be None when the call has no input of that modality)."""
    if image_layouts is None or video_layouts is None:
        found = image_layouts if video_layouts is None else video_layouts
        return found if found is not None else []
    merged = []
    for images, videos in zip(image_layouts, video_layouts, strict=True):
        grids = [images.vision_grids or [None] * len(images.images), videos.vision_grids or [None] * len(videos.images)]
        spans = [(span, index, grid) for layout, layout_grids in zip((images, videos), grids, strict=True)
                 for span, index, grid in zip(layout.images, layout.image_ids, layout_grids, strict=True)]
        spans.sort(key=lambda item: int(item[0].positions[0]))
        merged.append(SampleLayout(
            images=[span for span, _, _ in spans], vision_inputs=images.vision_inputs + videos.vision_inputs,
            vision_grids=[grid for _, _, grid in spans if grid is not None], image_ids=[i for _, i, _ in spans],
        ))
    return merged


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
