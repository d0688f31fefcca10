"""Video files in, processor inputs out: sampling frames the way the model cards and lmms-eval do.

    from vtprune.video import load_video, video_inputs
    video = load_video("clip.mp4", num_frames=16)        # or fps=1; decord, PyAV when decord is missing
    print(video.timestamps)                              # seconds of each sampled frame
    inputs = video_inputs(processor, video, "What happens in the video?")
    model.generate(**inputs, max_new_tokens=32)

Decoding is transformers' own ``load_video`` (``transformers.video_utils``, through :mod:`vtprune.compat`) with
``backend="decord"``; when decord is not installed, its ``"pyav"`` backend, with one warning that says how to
install decord. vtprune decodes nothing itself.

Sampling is transformers' own uniform sampling (``default_sample_indices_fn``, the sampling of the LLaVA-OneVision
and Qwen-VL model cards and of ``processor.apply_chat_template(..., num_frames=...)``): ``num_frames`` frames at
indices ``i * total // num_frames``, or ``fps`` frames per second of the clip (``max(1, int(duration * fps))``
frames, spread the same way). lmms-eval's loaders spread ``num_frames`` with ``linspace(0, total - 1)`` instead
(the same first frame, the last frame included): at most one source frame apart. The metadata transformers
returns travels with the frames (``video_metadata=`` of the processor), so Qwen2.5-VL's ``second_per_grid_ts``
and Qwen3-VL's timestamps come from the frames actually sampled.

Every check that can fail runs before any frame is decoded: the file exists and is a file, one of
``num_frames`` / ``fps`` (positive), a known backend that is installed; then, from the container's metadata
(read by the backend before decoding), that the clip has frames and enough of them for the request. A file the
backend cannot open (corrupt, truncated, not a video, no video stream) is a :class:`~vtprune.errors.VideoError`
naming the file, the backend and the fix, as is a decode that yields fewer frames than were sampled.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import compat
from .errors import VideoError

__all__ = ["DEFAULT_NUM_FRAMES", "Video", "check_sampling", "clips_dir", "default_backend", "load_video",
           "save_video", "shipped_clips", "video_inputs", "video_prompt"]

#: frames sampled when neither ``num_frames`` nor ``fps`` is given
DEFAULT_NUM_FRAMES = 16

_FALLBACK_WARNED = False


@dataclass
class Video:
    """Sampled frames of one clip and transformers' metadata about them.

    ``frames``: uint8 [T, H, W, 3] (RGB); ``metadata``: the ``transformers.video_utils.VideoMetadata`` of the
    clip (source fps, total frames, duration, ``frames_indices`` of the sampled frames, backend), which the
    processor takes as ``video_metadata``; ``path``: the file.
    """

    frames: np.ndarray
    metadata: Any
    path: Path

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def frame_indices(self) -> list[int]:
        return [int(i) for i in self.metadata.frames_indices]

    @property
    def timestamps(self) -> list[float]:
        """Seconds of each sampled frame in the clip (frame index / source fps)."""
        return [float(t) for t in self.metadata.timestamps]

    @property
    def fps(self) -> float:
        """Frames per second of the source clip."""
        return float(self.metadata.fps)

    @property
    def duration(self) -> float:
        """Seconds of the source clip."""
        return float(self.metadata.duration)

    @property
    def total_frames(self) -> int:
        return int(self.metadata.total_num_frames)

    @property
    def backend(self) -> str:
        return str(self.metadata.video_backend)

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the frames."""
        return int(self.frames.shape[1]), int(self.frames.shape[2])

    def pil_frames(self) -> list:
        from PIL import Image

        return [Image.fromarray(frame) for frame in self.frames]

    def describe(self) -> str:
        """One line: file, sampled frames, their times, the source clip."""
        times = ", ".join(f"{t:.1f}" for t in self.timestamps)
        height, width = self.size
        return (f"{self.path.name}: {self.num_frames} of {self.total_frames} frames at {times} s "
                f"({self.duration:.1f} s at {self.fps:g} fps, {width}x{height}, decoded with {self.backend})")


def clips_dir() -> Path:
    """``eval/data/clips`` of the source checkout (or of the working directory): the shipped synthetic clips."""
    for root in (Path(__file__).resolve().parents[1], Path.cwd()):
        candidate = root / "eval" / "data" / "clips"
        if (candidate / "clips.json").is_file():
            return candidate
    raise VideoError("eval/data/clips (the shipped synthetic clips) was not found next to the vtprune package or "
                     "in the working directory; run from a source checkout or pass a video file.")


def shipped_clips() -> list[dict[str, Any]]:
    """The shipped clips: ``clips.json`` entries (file, question, answer, frames, fps, ...) with ``path`` added."""
    import json

    root = clips_dir()
    entries = json.loads((root / "clips.json").read_text())
    return [{**entry, "path": root / entry["file"]} for entry in entries]


def check_sampling(num_frames: int | None = None, fps: float | None = None) -> None:
    """The sampling arguments alone: at most one of ``num_frames`` (an int >= 1) and ``fps`` (> 0)."""
    if num_frames is not None and fps is not None:
        raise VideoError(f"pass either num_frames ({num_frames}) or fps ({fps}), not both: num_frames samples a "
                         "fixed count over the whole clip, fps a count per second of it.")
    if num_frames is not None and (isinstance(num_frames, bool) or not isinstance(num_frames, (int, np.integer))
                                   or num_frames < 1):
        raise VideoError(f"num_frames must be an int >= 1 (frames sampled over the clip), got {num_frames!r}.")
    if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float, np.number))
                            or not np.isfinite(fps) or fps <= 0):
        raise VideoError(f"fps must be a positive number (frames sampled per second of the clip), got {fps!r}.")


def default_backend() -> str:
    """``"decord"`` when it is installed, else ``"pyav"`` (with one warning saying how to install decord)."""
    global _FALLBACK_WARNED
    if compat.video_backend_available("decord"):
        return "decord"
    if compat.video_backend_available("pyav"):
        if not _FALLBACK_WARNED:
            _FALLBACK_WARNED = True
            warnings.warn("decord is not installed: videos are decoded with PyAV (transformers' 'pyav' backend; "
                          "the same frames, slower on long clips since it decodes every frame up to the last one "
                          "sampled). Install decord for the default backend: pip install decord (or pip install "
                          "'vtprune[video]').", UserWarning, stacklevel=3)
        return "pyav"
    raise VideoError("reading a video needs decord or PyAV, and neither is installed: pip install decord (or pip "
                     "install av).")


def _check_path(path: str | Path) -> Path:
    text = str(path)
    if "://" in text:
        raise VideoError(f"video {text!r} is a URL; vtprune reads local files only (nothing is downloaded at run "
                         "time): download it first and pass the file.")
    file = Path(text).expanduser()
    if not file.exists():
        raise VideoError(f"video file {text!r} does not exist; pass the path of a video file (mp4, avi, mkv, "
                         "webm, ...).")
    if not file.is_file():
        raise VideoError(f"video {text!r} is not a file (a directory?); pass the path of a video file.")
    if file.stat().st_size == 0:
        raise VideoError(f"video file {text!r} is empty (0 bytes); pass a video file with frames.")
    return file


def _check_backend(backend: str | None) -> str:
    if backend is None:
        return default_backend()
    if backend not in compat.VIDEO_BACKENDS:
        raise VideoError(f"video backend {backend!r} is not one of {', '.join(compat.VIDEO_BACKENDS)}.")
    if not compat.video_backend_available(backend):
        package = "decord" if backend == "decord" else "av"
        raise VideoError(f"video backend {backend!r} needs the {package} package: pip install {package} (or pass "
                         "backend=None to use whichever is installed).")
    return backend


def load_video(path: str | Path, num_frames: int | None = None, fps: float | None = None, *,
               backend: str | None = None) -> Video:
    """Sample frames of the video file ``path``: ``num_frames`` spread uniformly over the clip, or ``fps`` frames
    per second of it (neither: :data:`DEFAULT_NUM_FRAMES`, or every frame of a shorter clip). ``backend``: ``"decord"`` (default when installed)
    or ``"pyav"``. Raises :class:`~vtprune.errors.VideoError` on any unusable input (see the module docstring).
    """
    check_sampling(num_frames, fps)
    file = _check_path(path)
    backend = _check_backend(backend)
    default = num_frames is None and fps is None

    def sample(metadata, **_):
        nonlocal num_frames
        total = int(metadata.total_num_frames or 0)
        if default:  # nothing asked: DEFAULT_NUM_FRAMES, or every frame of a shorter clip
            num_frames = min(DEFAULT_NUM_FRAMES, max(total, 1))
        if total <= 0:
            raise VideoError(f"video {str(path)!r} has no frames (its container records 0 frames in the video "
                             "stream); pass a video with frames, or re-encode it (ffmpeg -i IN -c:v libx264 "
                             "OUT.mp4).")
        if fps is not None:
            if not metadata.fps:
                raise VideoError(f"video {str(path)!r} records no frame rate, so it cannot be sampled by fps; "
                                 "pass num_frames instead.")
            wanted = max(1, int(total / metadata.fps * fps))
            if wanted > total:
                raise VideoError(f"fps={fps:g} asks for {wanted} frames but {str(path)!r} has {total} "
                                 f"({metadata.fps:g} fps); pass fps <= {metadata.fps:g}.")
        elif num_frames > total:
            raise VideoError(f"num_frames={num_frames} is more than the {total} frames of {str(path)!r}; pass "
                             f"num_frames <= {total}.")
        return compat.uniform_frame_indices(metadata, num_frames=num_frames, fps=fps)

    try:
        frames, metadata = compat.load_video(str(file), backend=backend, sample_indices_fn=sample)
    except VideoError:
        raise
    except Exception as error:  # the backends raise their own types (DECORDError, av.error.*, IndexError, ...)
        message = " ".join(str(error).split())[:200] or type(error).__name__
        raise VideoError(f"{backend} could not read {str(path)!r} ({type(error).__name__}: {message}); the file is "
                         "corrupt, truncated, not a video or has no video stream. Check it plays, or re-encode it "
                         "(ffmpeg -i IN -c:v libx264 OUT.mp4).") from None
    frames = np.asarray(frames)
    expected = len(metadata.frames_indices)
    if frames.ndim != 4 or frames.shape[0] != expected or frames.shape[-1] != 3:
        raise VideoError(f"{backend} decoded {frames.shape[0] if frames.ndim == 4 else 0} frames of "
                         f"{str(path)!r} where {expected} were sampled (the container claims "
                         f"{metadata.total_num_frames} frames: a truncated file?); re-encode it (ffmpeg -i IN "
                         "-c:v libx264 OUT.mp4) or sample fewer frames.")
    return Video(frames=frames, metadata=metadata, path=file)


def video_prompt(processor, prompt: str, videos: int = 1) -> str:
    """The chat-formatted prompt of one user turn: ``videos`` video placeholders, then ``prompt``."""
    content = [{"type": "video"} for _ in range(videos)] + [{"type": "text", "text": prompt}]
    messages = [{"role": "user", "content": content}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _pixel_cap(processor, max_pixels: int) -> dict[str, Any]:
    """The processor-call ``size`` that caps each frame at ``max_pixels`` (Qwen-VL video processors: the model
    card's ``max_pixels``); other video processors resize frames to a fixed size and take no cap."""
    video_processor = getattr(processor, "video_processor", None)
    if getattr(video_processor, "temporal_patch_size", None) is None:
        raise VideoError(f"max_pixels caps the frames of Qwen-VL video processors; "
                         f"{type(video_processor).__name__} resizes every frame to its vision tower's input size, "
                         "so drop max_pixels.")
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 28 * 28:
        raise VideoError(f"max_pixels must be an int >= 784 (one 28x28 merged patch), got {max_pixels!r}.")
    size = video_processor.size
    shortest = size.get("shortest_edge") if hasattr(size, "get") else getattr(size, "shortest_edge", None)
    return {"size": {"shortest_edge": min(int(shortest or max_pixels), max_pixels), "longest_edge": max_pixels}}


def video_inputs(processor, videos, prompts, *, padding_side: str = "left", device=None, dtype=None,
                 max_pixels: int | None = None):
    """Processor inputs (``BatchFeature``, pt) for clips + prompts: per sample one :class:`Video` (or a list of
    them, or None for a text-only sample) and its prompt; one ``Video`` and one string for a single sample.

    The frames go to the processor as sampled (``do_sample_frames=False``) with their metadata
    (``video_metadata``), so time-aware models (Qwen2.5-VL, Qwen3-VL) see the clip's real frame times.
    ``device`` moves the tensors, ``dtype`` casts the pixels (``pixel_values*``; frame times stay float32).
    ``max_pixels`` (Qwen-VL): the most pixels a frame keeps (the model cards' ``max_pixels``, e.g. 360 * 420)."""
    import torch

    if isinstance(prompts, str):
        prompts, videos = [prompts], [videos]
    if len(videos) != len(prompts):
        raise VideoError(f"got {len(videos)} video entries for {len(prompts)} prompts; pass one per prompt.")
    texts, flat = [], []
    for entry, prompt in zip(videos, prompts, strict=True):
        clips = [] if entry is None else [entry] if isinstance(entry, Video) else list(entry)
        for clip in clips:
            if not isinstance(clip, Video):
                raise VideoError(f"video entries must be vtprune.video.Video objects (load_video(path)), got "
                                 f"{type(clip).__name__}.")
        texts.append(video_prompt(processor, prompt, len(clips)))
        flat.extend(clips)
    kwargs: dict[str, Any] = {"text": texts, "return_tensors": "pt", "padding": True, "padding_side": padding_side}
    if flat:
        kwargs.update(videos=[clip.frames for clip in flat], video_metadata=[clip.metadata for clip in flat],
                      do_sample_frames=False)
        if max_pixels is not None:
            kwargs.update(_pixel_cap(processor, max_pixels))
    inputs = processor(**kwargs)
    if device is not None:
        inputs = inputs.to(device)
    if dtype is not None:
        for key, value in inputs.items():
            if key.startswith("pixel_values") and torch.is_tensor(value) and value.is_floating_point():
                inputs[key] = value.to(dtype)
    return inputs


def save_video(path: str | Path, frames, fps: float = 8.0, *, crf: int = 23) -> Path:
    """Write RGB ``frames`` (uint8 [T, H, W, 3], H and W even) to an H.264 mp4 at ``fps`` with PyAV (``pip
    install av``); ``crf`` is x264's quality (lower: larger and closer to the input). Used for the shipped
    synthetic clips and the tests."""
    from fractions import Fraction

    try:
        import av
    except ImportError:
        raise VideoError("writing a video needs PyAV: pip install av") from None
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or frames.shape[0] < 1:
        raise VideoError(f"frames must be uint8 [T >= 1, H, W, 3], got {frames.dtype} {list(frames.shape)}.")
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        raise VideoError(f"H.264 (yuv420p) needs an even height and width, got {height}x{width}.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000),
                                      options={"crf": str(crf)})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
