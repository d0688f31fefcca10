"""Video files: transformers' load_video (decord, PyAV fallback), uniform sampling by count or fps with frame
times, one clear VideoError for every unusable input before any frame is decoded, processor inputs."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from vtprune import compat, video
from vtprune.errors import VideoError, VTPruneError
from vtprune.video import Video, load_video, save_video, video_inputs

FPS, TOTAL, HEIGHT, WIDTH = 8, 24, 48, 64


def moving_bar(total: int = TOTAL) -> np.ndarray:
    """[T, H, W, 3]: a white 8-px bar that moves 2 px right per frame on black."""
    frames = np.zeros((total, HEIGHT, WIDTH, 3), dtype=np.uint8)
    for t in range(total):
        frames[t, :, 2 * t: 2 * t + 8] = 255
    return frames


def bar_column(frame: np.ndarray) -> int:
    """Left edge of the bright bar in a decoded frame."""
    columns = frame.mean(axis=(0, 2))  # [W]
    return int(np.argmax(columns > 128))


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return save_video(tmp_path_factory.mktemp("clips") / "bar.mp4", moving_bar(), fps=FPS, crf=12)


BACKENDS = [b for b in compat.VIDEO_BACKENDS if compat.video_backend_available(b)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_num_frames_uniform_with_timestamps(clip, backend):
    v = load_video(clip, num_frames=6, backend=backend)
    assert isinstance(v, Video) and v.backend == backend
    assert v.frames.shape == (6, HEIGHT, WIDTH, 3) and v.frames.dtype == np.uint8
    assert v.frame_indices == [i * TOTAL // 6 for i in range(6)] == [0, 4, 8, 12, 16, 20]
    assert v.timestamps == pytest.approx([i / FPS for i in v.frame_indices])
    assert (v.total_frames, v.fps, v.duration) == (TOTAL, FPS, pytest.approx(TOTAL / FPS))
    # the decoded frames are the sampled ones: the bar sits 2 px further right per source frame
    assert [bar_column(f) for f in v.frames] == [2 * i for i in v.frame_indices]


@pytest.mark.parametrize("backend", BACKENDS)
def test_fps_sampling(clip, backend):
    v = load_video(clip, fps=2, backend=backend)  # 3 s clip at 2 fps -> 6 frames, every 4th source frame
    assert v.frame_indices == [0, 4, 8, 12, 16, 20]
    one = load_video(clip, fps=1, backend=backend)
    assert one.timestamps == pytest.approx([0.0, 1.0, 2.0])
    tiny = load_video(clip, fps=0.01, backend=backend)  # shorter than one sample period: one frame
    assert tiny.num_frames == 1


def test_default_is_decord_and_default_count(clip):
    v = load_video(clip)
    assert v.num_frames == video.DEFAULT_NUM_FRAMES
    if compat.video_backend_available("decord"):
        assert v.backend == "decord"


def test_default_count_takes_every_frame_of_a_short_clip(tmp_path):
    short = save_video(tmp_path / "short.mp4", moving_bar(10), fps=FPS)
    assert load_video(short).frame_indices == list(range(10))
    with pytest.raises(VideoError, match="pass num_frames <= 10"):  # asked for explicitly: an error
        load_video(short, num_frames=16)


def test_backends_agree(clip):
    if len(BACKENDS) < 2:
        pytest.skip("needs both decord and PyAV")
    a, b = (load_video(clip, num_frames=4, backend=name) for name in BACKENDS)
    assert a.frame_indices == b.frame_indices
    assert np.abs(a.frames.astype(int) - b.frames.astype(int)).mean() < 2.0


def test_pyav_fallback_warns_once(clip, monkeypatch):
    if not compat.video_backend_available("pyav"):
        pytest.skip("needs PyAV")
    monkeypatch.setattr(compat, "video_backend_available", lambda name: name == "pyav")
    monkeypatch.setattr(video, "_FALLBACK_WARNED", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = load_video(clip, num_frames=3)
        load_video(clip, num_frames=3)
    messages = [str(w.message) for w in caught if "decord" in str(w.message)]
    assert first.backend == "pyav"
    assert len(messages) == 1 and "pip install decord" in messages[0]
    with pytest.raises(VideoError, match="pip install decord"):
        load_video(clip, num_frames=3, backend="decord")


def test_no_backend_at_all(clip, monkeypatch):
    monkeypatch.setattr(compat, "video_backend_available", lambda name: False)
    with pytest.raises(VideoError, match="neither is installed"):
        load_video(clip)


# ------------------------------------------------------------------------------------------ bad inputs


def _junk(tmp):
    path = tmp / "junk.mp4"
    path.write_bytes(b"\x00not a video" * 50)
    return path


def _truncated(tmp, clip):
    data = clip.read_bytes()
    path = tmp / "truncated.mp4"
    path.write_bytes(data[: len(data) // 2])
    return path


def _no_stream(tmp):
    import av

    path = tmp / "nostream.mp4"
    with av.open(str(path), "w") as container:  # a container with an audio stream and no video stream
        stream = container.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), dtype=np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    return path


def _empty(tmp):
    path = tmp / "empty.mp4"
    path.write_bytes(b"")
    return path


BAD = [
    ("missing file", lambda tmp, clip: dict(path=tmp / "nope.mp4"), "does not exist"),
    ("directory", lambda tmp, clip: dict(path=tmp), "not a file"),
    ("empty file", lambda tmp, clip: dict(path=_empty(tmp)), "is empty"),
    ("URL", lambda tmp, clip: dict(path="https://example.com/a.mp4"), "local files only"),
    ("not a video", lambda tmp, clip: dict(path=_junk(tmp)), "corrupt, truncated"),
    ("truncated", lambda tmp, clip: dict(path=_truncated(tmp, clip)), "could not read"),
    ("no video stream", lambda tmp, clip: dict(path=_no_stream(tmp)), "no video stream"),
    ("both num_frames and fps", lambda tmp, clip: dict(path=clip, num_frames=4, fps=1), "not both"),
    ("num_frames 0", lambda tmp, clip: dict(path=clip, num_frames=0), "int >= 1"),
    ("num_frames float", lambda tmp, clip: dict(path=clip, num_frames=2.5), "int >= 1"),
    ("fps negative", lambda tmp, clip: dict(path=clip, fps=-1), "positive"),
    ("fps nan", lambda tmp, clip: dict(path=clip, fps=float("nan")), "positive"),
    ("more frames than the clip", lambda tmp, clip: dict(path=clip, num_frames=TOTAL + 1), f"<= {TOTAL}"),
    ("fps above the clip's", lambda tmp, clip: dict(path=clip, fps=3 * FPS), f"fps <= {FPS}"),
    ("unknown backend", lambda tmp, clip: dict(path=clip, backend="ffmpeg"), "not one of decord, pyav"),
]


@pytest.mark.parametrize("description,kwargs,fragment", BAD, ids=[row[0] for row in BAD])
def test_bad_video_inputs(tmp_path, clip, description, kwargs, fragment):
    args = kwargs(tmp_path, clip)
    backends = BACKENDS if "path" in args and args["path"] != clip else [None]
    for backend in backends:
        call = dict(args)
        if backend is not None:
            call["backend"] = backend
        with pytest.raises(VideoError, match=fragment) as error:
            load_video(call.pop("path"), **call)
        assert isinstance(error.value, VTPruneError)
        assert "\n" not in str(error.value)


def test_fewer_decoded_than_sampled_is_an_error(clip, monkeypatch):
    """A container that claims more frames than it decodes (PyAV then returns fewer): never silently short."""
    real = compat.load_video

    def short(path, backend, sample_indices_fn):
        frames, metadata = real(path, backend, sample_indices_fn)
        return frames[:-1], metadata

    monkeypatch.setattr(compat, "load_video", short)
    with pytest.raises(VideoError, match="where 4 were sampled"):
        load_video(clip, num_frames=4)


def test_checks_before_decoding(clip, monkeypatch):
    """Sampling errors are raised from the metadata, before a frame is decoded."""
    import transformers.video_utils as vu

    calls = []
    for name in ("decord", "pyav"):
        real = vu.VIDEO_DECODERS[name]

        def spy(path, sample_indices_fn, _real=real, **kwargs):
            def wrapped(metadata, **kw):
                calls.append("sample")
                return sample_indices_fn(metadata=metadata, **kw)
            return _real(path, wrapped, **kwargs)

        monkeypatch.setitem(vu.VIDEO_DECODERS, name, spy)
    with pytest.raises(VideoError, match="more than"):
        load_video(clip, num_frames=1000)
    assert calls == ["sample"]


def test_save_video_rejects_odd_sizes(tmp_path):
    with pytest.raises(VideoError, match="even"):
        save_video(tmp_path / "odd.mp4", np.zeros((2, 15, 16, 3), np.uint8))
    with pytest.raises(VideoError, match="uint8"):
        save_video(tmp_path / "float.mp4", np.zeros((2, 16, 16, 3), np.float32))


# --------------------------------------------------------------------------------------- processor inputs


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "llava_onevision"])
def test_video_inputs_through_the_processor(tiny_models, clip, family):
    pytest.importorskip("torchvision")
    model, processor = tiny_models[family]
    v = load_video(clip, num_frames=8)
    inputs = video_inputs(processor, v, "What moves?")
    token = model.config.video_token_id
    visual = int((inputs["input_ids"] == token).sum())
    if family.startswith("qwen"):
        t, h, w = inputs["video_grid_thw"][0].tolist()
        assert t == 8 // 2  # temporal patches of 2 frames
        assert visual == t * h * w // 4
        if family == "qwen2_5_vl":  # the sampled fps (8 of 24 frames at 8 fps = 8/3 fps) sets the time scale
            assert inputs["second_per_grid_ts"].tolist() == pytest.approx([2 / (8 / 3)])
    else:
        assert inputs["pixel_values_videos"].shape[:2] == (1, 8)
        assert visual > 0


def test_max_pixels_caps_qwen_frames_only(tiny_models, clip):
    pytest.importorskip("torchvision")
    _, qwen = tiny_models["qwen2_5_vl"]
    v = load_video(clip, num_frames=4)
    patch = qwen.video_processor.patch_size
    full = video_inputs(qwen, v, "What moves?")["video_grid_thw"][0].tolist()
    cap = full[1] * full[2] * patch * patch // 2  # half the pixels the processor gives a frame by default
    capped = video_inputs(qwen, v, "What moves?", max_pixels=cap)["video_grid_thw"][0].tolist()
    assert capped[0] == full[0] and capped[1] * capped[2] * patch * patch <= cap
    with pytest.raises(VideoError, match="int >= 784"):
        video_inputs(qwen, v, "What moves?", max_pixels=100)
    _, onevision = tiny_models["llava_onevision"]
    with pytest.raises(VideoError, match="drop max_pixels"):
        video_inputs(onevision, v, "What moves?", max_pixels=28 * 28 * 9)


def test_video_inputs_batch_with_text_only(tiny_models, clip):
    pytest.importorskip("torchvision")
    _, processor = tiny_models["qwen2_vl"]
    v = load_video(clip, num_frames=4)
    inputs = video_inputs(processor, [v, None], ["What moves?", "Hello"])
    assert inputs["input_ids"].shape[0] == 2 and inputs["video_grid_thw"].shape[0] == 1
    with pytest.raises(VideoError, match="one per prompt"):
        video_inputs(processor, [v], ["a", "b"])
    with pytest.raises(VideoError, match="Video objects"):
        video_inputs(processor, ["clip.mp4"], ["a"])


# ------------------------------------------------------------------------------------------ shipped clips


def test_shipped_clips_are_reproducible(tmp_path):
    """make_clips.py re-creates the shipped clips (same frames, same clips.json); each loads with its metadata."""
    import importlib.util
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "eval" / "data" / "clips"
    spec = importlib.util.spec_from_file_location("make_clips", root / "make_clips.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(tmp_path)
    assert json.loads((tmp_path / "clips.json").read_text()) == json.loads((root / "clips.json").read_text())
    entries = json.loads((root / "clips.json").read_text())
    assert len(entries) >= 2 and sum((root / e["file"]).stat().st_size for e in entries) < 500_000
    for entry in entries:
        shipped = load_video(root / entry["file"], num_frames=8)
        fresh = load_video(tmp_path / entry["file"], num_frames=8)
        assert (shipped.total_frames, shipped.fps) == (entry["frames"], entry["fps"])
        assert shipped.size == tuple(entry["size"])
        assert np.abs(shipped.frames.astype(int) - fresh.frames.astype(int)).mean() < 1.0
