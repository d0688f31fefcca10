"""Loading models for the command line: a local HF directory / hub id, or the bundled offline default."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import VTPruneError

#: micro-VLMs trained by this project (models/), looked up next to the package and in the working directory
BUNDLED_MODELS = ("micro-llava", "micro-qwen2vl", "micro-qwen2vl-video")


def bundled_model_dir(name: str = "micro-llava") -> Path | None:
    for root in (Path(__file__).resolve().parent.parent / "models", Path.cwd() / "models"):
        candidate = root / name
        if (candidate / "config.json").is_file():
            return candidate
    return None


def _tiny_family(model: str) -> str:
    """The family of a ``tiny:<family>`` spec; raises when :mod:`vtprune.testing` cannot build it."""
    from .testing import FAMILIES

    family = model.split(":", 1)[1]
    if family not in FAMILIES:
        raise VTPruneError(f"--model {model!r}: no tiny model family {family!r}; use one of "
                           f"{', '.join('tiny:' + f for f in FAMILIES)}.")
    return family


def _looks_like_hub_id(model: str) -> bool:
    """``org/name`` (one slash, no path syntax): a hub id that from_pretrained may find in the local cache."""
    parts = model.split("/")
    return (len(parts) == 2 and all(parts) and not model.startswith((".", "~"))
            and all(c.isalnum() or c in "-_." for c in model.replace("/", "")))


def check_model_spec(model: str | None, trust_remote_code: bool = False) -> None:
    """Check a ``--model`` value without loading any weights, so that a bad value fails in milliseconds with a
    message that says what to pass (instead of a traceback after seconds of loading).

    Accepted: None (the bundled model), ``tiny:<family>``, a directory holding an HF ``config.json`` of a
    supported vision-language model, or an ``org/name`` hub id (resolved by ``from_pretrained``; nothing is
    downloaded when ``HF_HUB_OFFLINE=1``). A checkpoint with custom code (``auto_map`` and a model type
    transformers does not know) is refused unless ``trust_remote_code`` is passed explicitly: vtprune never
    lets transformers prompt for it.
    """
    if model is None:
        return
    if model.startswith("tiny:"):
        _tiny_family(model)
        return
    path = Path(model).expanduser()
    if not path.exists():
        if _looks_like_hub_id(model):
            return
        raise VTPruneError(f"--model {model!r}: no such directory; pass a local HF model directory (with "
                           "config.json), tiny:<family>, or omit --model for the bundled micro-VLM.")
    if not path.is_dir():
        raise VTPruneError(f"--model {model!r} is a file, not a model directory; pass the directory that holds "
                           "config.json and the weights.")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise VTPruneError(f"--model {model!r} is not a model directory (no config.json in it); pass the "
                           "directory of an HF checkpoint (save_pretrained output).")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise VTPruneError(f"--model {model!r}: config.json is not readable JSON ({error}); fix or re-save the "
                           "checkpoint.") from None
    if not isinstance(config, dict):
        raise VTPruneError(f"--model {model!r}: config.json does not hold a config object; re-save the checkpoint.")
    _check_model_type(model, config, trust_remote_code)


def _check_model_type(model: str, config: dict, trust_remote_code: bool) -> None:
    """The checkpoint's ``model_type`` must map to a model class vtprune supports; custom code needs consent."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    from .adapters.base import supported_model_classes

    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING_NAMES:
        if config.get("auto_map") and not trust_remote_code:
            raise VTPruneError(f"--model {model!r} needs its own Python code (model_type {model_type!r}, auto_map "
                               "in config.json); vtprune does not run it unless you pass --trust-remote-code.")
        if not config.get("auto_map"):
            raise VTPruneError(f"--model {model!r}: config.json has model_type {model_type!r}, which transformers "
                               "does not know; pass a checkpoint of a supported model.")
        return
    supported = supported_model_classes()
    class_name = MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.get(model_type)
    if class_name not in supported:
        raise VTPruneError(f"--model {model!r} is a {model_type!r} model, which vtprune cannot prune; supported "
                           f"classes: {', '.join(supported)}.")


def check_device(device: str) -> str:
    """``--device``: a torch device string that exists on this machine (``cpu``, ``cuda``, ``cuda:1``, ``mps``)."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise VTPruneError(f"--device {device!r} is not a device; use cpu, cuda, cuda:N or mps.") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise VTPruneError(f"--device {device}: CUDA is not available on this machine; use --device cpu.")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise VTPruneError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                               f"use cuda:0..cuda:{torch.cuda.device_count() - 1}.")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise VTPruneError(f"--device {device}: MPS is not available on this machine; use --device cpu.")
    elif parsed.type not in ("cpu", "cuda", "mps"):
        raise VTPruneError(f"--device {device!r} is not supported here; use cpu, cuda, cuda:N or mps.")
    return str(parsed)


def load_image(path: str):
    """Open ``--image`` fully (so a truncated file fails here, not inside the processor) as RGB.

    PIL's decompression-bomb guard applies: an image above ``PIL.Image.MAX_IMAGE_PIXELS`` is refused (PIL
    only warns up to twice that limit; here it is an error)."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    file = Path(path).expanduser()
    if not file.exists():
        raise VTPruneError(f"--image {path!r}: no such file; pass an image file (PNG, JPEG, ...).")
    if not file.is_file():
        raise VTPruneError(f"--image {path!r} is not a file; pass an image file (PNG, JPEG, ...).")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(file) as image:
                image.load()
                return image.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise VTPruneError(f"--image {path!r} is too large ({error}); downscale it first.") from None
    except UnidentifiedImageError:
        raise VTPruneError(f"--image {path!r} is not an image PIL can read; pass a PNG, JPEG, ... file.") from None
    except (OSError, SyntaxError) as error:  # PIL reports some damaged files as SyntaxError
        raise VTPruneError(f"--image {path!r} cannot be read ({error}); the file may be truncated or "
                           "damaged.") from None


def load_model(model: str | None = None, dtype: str = "float32", device: str = "cpu",
               trust_remote_code: bool = False):
    """Return ``(model, processor, description)``.

    ``model`` may be a local HF-format directory or hub id (loaded with ``from_pretrained``, SDPA attention),
    ``tiny:<family>`` for a random tiny model from :mod:`vtprune.testing`, or None for the bundled default:
    the trained micro-VLM in ``models/micro-llava`` when present, else ``tiny:llava``. The model is put in
    ``dtype`` in every case (a tiny model is built in float32 and converted). ``trust_remote_code`` is passed
    to transformers as given (default False: never run a checkpoint's own code, never prompt).
    """
    if model is None:
        bundled = bundled_model_dir()
        model = str(bundled) if bundled is not None else "tiny:llava"
    torch_dtype = getattr(torch, dtype)
    if model.startswith("tiny:"):
        from .testing import tiny_vlm

        net, processor = tiny_vlm(_tiny_family(model))
        return net.to(device=device, dtype=torch_dtype), processor, f"{model} (random weights, for a smoke run only)"
    from transformers import AutoModelForImageTextToText

    try:
        net = AutoModelForImageTextToText.from_pretrained(model, dtype=torch_dtype, attn_implementation="sdpa",
                                                          trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise VTPruneError(f"cannot load --model {model!r}: {first}") from error
    net = net.to(device).eval()
    processor = load_processor(model, trust_remote_code=trust_remote_code)
    return net, processor, model


def load_processor(path: str | Path, trust_remote_code: bool = False):
    """``AutoProcessor.from_pretrained(path)``; for processors whose video part needs torchvision (Qwen-VL in
    transformers 5.x) and no torchvision installed, the same processor class is built from the saved image
    processor, tokenizer and chat template with a video processor that refuses videos (images work as usual).
    """
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (ValueError, ImportError) as error:  # the video processor class needs torchvision
        if "torchvision" not in str(error).lower():
            raise
    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer

    from .testing import _make_processor, _video_processor

    config_file = Path(path) / "processor_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found; cannot build the processor without torchvision")
    config = json.loads(config_file.read_text())
    processor_cls = getattr(transformers, config["processor_class"])
    image_processor = AutoImageProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    video_attrs = {k: v for k, v in config.get("video_processor", {}).items()
                   if k in ("patch_size", "temporal_patch_size", "merge_size", "size")}
    video_processor = _video_processor(config.get("video_processor", {}).get("video_processor_type", ""),
                                       **video_attrs)
    return _make_processor(processor_cls, image_processor=image_processor, tokenizer=tokenizer,
                           video_processor=video_processor, chat_template=tokenizer.chat_template)


#: model specs whose weights are random (their answers are noise): ``tiny:<family>``, ``preset:<name>``
RANDOM_WEIGHT_SPECS = ("tiny:", "preset:")


def load_any(spec: str, dtype: str, device: str):
    """``(model, processor, description)`` for a model spec of the demo scripts: ``preset:NAME`` builds a shape
    preset of models/presets with random weights (real shapes, nothing downloaded); anything else goes to
    :func:`load_model`."""
    if spec.startswith("preset:"):
        from .bench.presets import build_preset

        model, processor = build_preset(spec.split(":", 1)[1], dtype=dtype, device=device)
        return model, processor, f"{spec} (random weights, real shapes)"
    return load_model(spec, dtype=dtype, device=device)
