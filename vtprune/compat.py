"""The one place that touches transformers internals.

vtprune hooks into the HF model classes, so it depends on names that are not public, stable API: forward
keyword names, private helpers, output classes, processor internals. Every such use goes through this module,
which knows how the supported transformers releases differ. When a new release changes one of them, this file
changes and nothing else.

Supported (tested in CI): ``TESTED_RANGE``. What differs inside it:

* the KV-cache keyword: ``past_key_values`` until 5.23; ``cache`` from 5.24 in every model, base model,
  decoder layer, attention module and in ``create_causal_mask`` (the old name stays a deprecated alias of
  the public forwards until 5.40, but hooks and internal calls see only the new name). Output objects carry
  ``.cache`` from 5.24 (``.past_key_values`` is a deprecated property there).
* multimodal outputs: ``MultimodalBaseModelOutputWithPast`` with ``image_outputs`` from 5.24
  (``image_hidden_states`` is deprecated there).

Unchanged across the range, but still internals (listed so that a change is found here): the vision entry point
``get_image_features`` and the pre-encoded ``mm_encoder_outputs`` that ``generate()`` hands to the forward,
``pack_image_features`` / ``image_size_to_num_patches`` (LLaVA-NeXT / OneVision crops), the video entry point
``get_video_features`` and its arguments (``pixel_values_videos``, ``video_grid_thw``, Qwen2.5-VL's
``second_per_grid_ts``), LLaVA-OneVision's per-frame ``apply_pooling``, Qwen's
``get_rope_index`` / ``rope_deltas``, ``get_vision_window_index`` (Qwen2.5-VL), ``apply_rotary_pos_emb_vision``
and ``apply_rotary_pos_emb`` of each modeling module, Qwen3-VL's ``_deepstack_process``, the decoder's
``rotary_emb`` / ``layers`` / ``norm``, the PIL image-processor classes (``<Name>Pil``) and
``VideoProcessorMixin``, and the video loading of ``transformers.video_utils`` (``load_video``, its backends and
``default_sample_indices_fn``; ``VideoMetadata``).
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

import transformers
from packaging.version import Version

#: transformers releases CI runs the whole suite on: the oldest and the newest (lower bound inclusive, upper
#: bound exclusive). pyproject.toml declares the same range.
TESTED_RANGE = ("5.23.0", "5.25")
TRANSFORMERS_VERSION = Version(transformers.__version__)

#: the KV-cache keyword of model / decoder-layer / attention forwards in the installed transformers
CACHE_KWARG = "cache" if TRANSFORMERS_VERSION >= Version("5.24.0.dev0") else "past_key_values"
_CACHE_NAMES = ("cache", "past_key_values")

#: the function of a multimodal model (``model.model``) that runs vision tower + projector on images
IMAGE_FEATURES = "get_image_features"
#: ... and on videos (Qwen-VL, LLaVA-OneVision)
VIDEO_FEATURES = "get_video_features"
#: Qwen3-VL: the language model's function adding deepstack rows to the visual positions' hidden states
DEEPSTACK_INJECTOR = "_deepstack_process"


def supported_range_text() -> str:
    low, high = TESTED_RANGE
    return f"transformers>={low},<{high}"


def version_text() -> str:
    return f"transformers {transformers.__version__} (vtprune is tested with {supported_range_text()})"


def in_tested_range(version: Version | None = None) -> bool:
    """Whether ``version`` (default: the installed transformers) lies in ``TESTED_RANGE``."""
    version = TRANSFORMERS_VERSION if version is None else version
    low, high = (Version(v) for v in TESTED_RANGE)
    return low <= Version(version.base_version) < high


def warn_if_untested() -> None:
    """One warning when the installed transformers is outside the range CI tests."""
    if not in_tested_range():
        warnings.warn(
            f"vtprune was tested with {supported_range_text()}, but transformers {transformers.__version__} is "
            f"installed. Pruning hooks into transformers internals; if a forward fails or reports no pruning, "
            f"install a tested release: pip install '{supported_range_text()}'.",
            UserWarning, stacklevel=3,
        )


# -- KV cache --------------------------------------------------------------------------------------------
def get_cache(kwargs: dict[str, Any]) -> Any:
    """The KV cache passed in forward keyword arguments, under either spelling (callers may still use the old
    name with the public forwards, which rename it inside)."""
    for name in _CACHE_NAMES:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def with_cache(kwargs: dict[str, Any], cache: Any) -> dict[str, Any]:
    """A copy of ``kwargs`` carrying ``cache`` under the installed release's keyword (and no other spelling)."""
    out = {k: v for k, v in kwargs.items() if k not in _CACHE_NAMES}
    out[CACHE_KWARG] = cache
    return out


def cache_kwargs(cache: Any) -> dict[str, Any]:
    """``{keyword: cache}`` for calling a model, layer or mask helper of the installed release."""
    return {CACHE_KWARG: cache}


def output_cache(output: Any) -> Any:
    """The cache an output object returned (``.cache`` from 5.24, ``.past_key_values`` before)."""
    if CACHE_KWARG == "cache":
        return getattr(output, "cache", None)
    return getattr(output, "past_key_values", None)


def cache_layer_tensors(cache: Any) -> list[tuple[Any, Any]]:
    """``(keys, values)`` per decoder layer of a ``Cache`` (``cache.layers[i].keys/.values``; None where a layer
    holds nothing yet); [] for no cache."""
    if cache is None:
        return []
    return [(getattr(layer, "keys", None), getattr(layer, "values", None)) for layer in cache.layers]


def is_dynamic_cache_layer(cache: Any, index: int) -> bool:
    """Whether layer ``index`` of ``cache`` is a plain growing layer (``DynamicLayer``: its keys / values are the
    cached entries and nothing else), whose entries may be replaced by a subset."""
    from transformers.cache_utils import DynamicLayer

    return type(cache.layers[index]) is DynamicLayer


def set_cache_layer_tensors(cache: Any, index: int, keys: Any, values: Any) -> None:
    """Replace the cached keys / values of a ``DynamicLayer`` (see :func:`is_dynamic_cache_layer`)."""
    layer = cache.layers[index]
    layer.keys, layer.values = keys, values


def new_dynamic_cache(config) -> Any:
    return transformers.DynamicCache(config=config)


def create_causal_mask(config, inputs_embeds, attention_mask, cache, position_ids, layer_idx: int | None = None):
    """``transformers.masking_utils.create_causal_mask`` with the installed release's cache keyword."""
    from transformers.masking_utils import create_causal_mask as build

    return build(config=config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                 position_ids=position_ids, layer_idx=layer_idx, **cache_kwargs(cache))


def padding_mask_from_prebuilt(mask, batch: int, length: int, device=None):
    """The 2-D padding mask [batch, length] (1 = real token) behind a prefill mask ``generate`` pre-built for a
    static cache: a 4-D [B, 1, q, kv] tensor (bool: True attends; float: 0 attends) or a dict of them per layer
    type. The last query row attends to every real token up to itself, so its first ``length`` key columns are
    the padding mask (all ones for a dict whose full-attention mask is None: no padding). None when the mask has
    another form."""
    import torch

    if isinstance(mask, dict):
        mask = mask.get("full_attention", next(iter(mask.values()), None))
        if mask is None:  # no padding: the attention implementation needs no mask at all
            return torch.ones(batch, length, dtype=torch.long, device=device)
    if not (torch.is_tensor(mask) and mask.dim() == 4 and mask.shape[-1] >= length):
        return None
    row = mask[:, 0, -1, :length]
    allowed = row if row.dtype == torch.bool else row == 0
    return allowed.long()


# -- multimodal forwards ---------------------------------------------------------------------------------
def encoder_outputs(call: dict[str, Any]) -> dict[str, Any]:
    """The vision encoder outputs ``generate()`` computed before the forward (``mm_encoder_outputs``), by
    modality; empty when the forward encodes its inputs itself."""
    return call.get("mm_encoder_outputs") or {}


def rope_deltas(core) -> Any:
    """Qwen-VL: the per-sample offset between M-RoPE positions and sequence positions of the last prefill."""
    return getattr(core, "rope_deltas", None)


def rope_index(core, *args, **kwargs):
    """Qwen-VL: the model's own M-RoPE index (``get_rope_index``)."""
    return core.get_rope_index(*args, **kwargs)


def seconds_per_grid(call: dict[str, Any]):
    """Qwen2.5-VL: seconds between consecutive temporal groups of each video (``second_per_grid_ts``), or None."""
    return call.get("second_per_grid_ts")


def video_pixels(call: dict[str, Any]):
    """The video pixels of a model or video-encoder call (``pixel_values_videos``), or None."""
    return call.get("pixel_values_videos")


def apply_video_pooling(core, features):
    """LLaVA-OneVision: the model's own per-frame pooling of projected video features, [frames, P, C] ->
    [frames, n, C] (bilinear 2x2 downsampling of each frame's patch grid); any channel count."""
    return core.apply_pooling(features)


def pack_image_features(core, features, image_sizes, **kwargs):
    """LLaVA-NeXT / OneVision: the model's own crop packing (unpadding, newlines)."""
    return core.pack_image_features(features, image_sizes, **kwargs)


def image_size_to_num_patches(family: str):
    """The crop-count helper of the LLaVA-NeXT (``llava_next``) or OneVision (``llava_onevision``) module."""
    module = __import__(f"transformers.models.{family}.modeling_{family}", fromlist=["image_size_to_num_patches"])
    return module.image_size_to_num_patches


def vision_window_index(grid_thw, merge_size: int, window_size: int, patch_size: int):
    """Qwen2.5-VL: the permutation of merger groups into window order."""
    from transformers.vision_utils import get_vision_window_index

    return get_vision_window_index(grid_thw, merge_size, window_size, patch_size)


def modeling_function(module_instance, name: str) -> Any:
    """A module-level function (e.g. ``apply_rotary_pos_emb``) of the modeling file that defines
    ``module_instance``'s class, or None."""
    return getattr(sys.modules.get(type(module_instance).__module__), name, None)


# -- models and processors -------------------------------------------------------------------------------
def model_from_config(model_cls, config, dtype, attn_implementation: str = "sdpa"):
    """A randomly initialised model of ``model_cls`` (``_from_config``: no weights loaded, no download)."""
    return model_cls._from_config(config, attn_implementation=attn_implementation, dtype=dtype)


def processor_accepting(processor_cls, argument: str, accepted_cls, **kwargs):
    """An instance of the real ``processor_cls`` whose ``argument`` is an ``accepted_cls`` instance that the
    processor's own type check (``check_argument_for_proper_class``, through the auto-mappings) would refuse;
    the check is relaxed for that one argument, on the instance, during ``__init__`` only."""
    processor = processor_cls.__new__(processor_cls)

    def check_argument_for_proper_class(argument_name, value):
        if argument_name == argument and isinstance(value, accepted_cls):
            return accepted_cls
        return processor_cls.check_argument_for_proper_class(processor, argument_name, value)

    processor.check_argument_for_proper_class = check_argument_for_proper_class
    try:
        processor_cls.__init__(processor, **kwargs)
    finally:
        del processor.check_argument_for_proper_class
    return processor

def image_processor_class(name: str):
    """The PIL backend of an image processor (``<Name>Pil`` since the 5.x backend split), else ``<Name>``."""
    return getattr(transformers, name + "Pil", None) or getattr(transformers, name)


def video_processor_mixin():
    from transformers.video_processing_utils import VideoProcessorMixin

    return VideoProcessorMixin


# -- video files -----------------------------------------------------------------------------------------
#: the decoders vtprune lets transformers' ``load_video`` use, in order of preference
VIDEO_BACKENDS = ("decord", "pyav")


def video_backend_available(backend: str) -> bool:
    """Whether transformers finds the package behind a ``load_video`` backend (``decord`` or ``pyav``)."""
    from transformers.utils import import_utils

    check = {"decord": "is_decord_available", "pyav": "is_av_available"}[backend]
    return bool(getattr(import_utils, check)())


def load_video(path: str, backend: str, sample_indices_fn):
    """``transformers.video_utils.load_video``: ``(frames [T, H, W, 3] uint8, VideoMetadata)``, the frames
    chosen by ``sample_indices_fn(metadata=...)`` (called with the file's metadata before any frame is
    decoded)."""
    from transformers.video_utils import load_video as hf_load_video

    return hf_load_video(path, backend=backend, sample_indices_fn=sample_indices_fn)


def uniform_frame_indices(metadata, num_frames: int | None = None, fps: float | None = None):
    """transformers' own uniform sampling (``default_sample_indices_fn``): ``num_frames`` evenly spaced frames
    (index ``i * total // num_frames``), or ``fps`` frames per second of the clip."""
    from transformers.video_utils import default_sample_indices_fn

    return default_sample_indices_fn(metadata, num_frames=num_frames, fps=fps)


def video_metadata(**fields):
    """A ``transformers.video_utils.VideoMetadata`` (what ``load_video`` returns and processors read)."""
    from transformers.video_utils import VideoMetadata

    return VideoMetadata(**fields)


#: attribute names of a decoder layer's attention and MLP sublayers (Llama, Qwen2/2.5/3-VL text decoders)
_SUBLAYER_NAMES = {"attention": "self_attn", "mlp": "mlp"}


def decoder_sublayers(layer) -> dict[str, Any]:
    """``{"attention": module, "mlp": module}`` of one decoder layer; a clear error when the layer has no such
    sublayers (a decoder this release of vtprune does not know)."""
    out = {}
    for kind, attr in _SUBLAYER_NAMES.items():
        module = getattr(layer, attr, None)
        if module is None:
            raise TypeError(f"decoder layer {type(layer).__name__} has no `{attr}` sublayer; methods that read "
                            "sublayer inputs/outputs (transprune) do not support this decoder.")
        out[kind] = module
    return out


def sublayer_io(args: tuple, kwargs: dict[str, Any], output: Any) -> tuple[Any, Any]:
    """(input hidden states, output hidden states) [B, L, D] of a sublayer call seen by a forward hook with
    kwargs: the attention is called with ``hidden_states=`` and returns ``(attn_output, attn_weights)``, the
    MLP is called positionally and returns a tensor."""
    before = args[0] if args else kwargs["hidden_states"]
    after = output[0] if isinstance(output, tuple) else output
    return before, after


def attention_implementation(config) -> str:
    """The attention implementation a model runs ("sdpa", "eager", "flash_attention_2", ...)."""
    return getattr(config, "_attn_implementation", None) or "sdpa"
