"""Video from the command line and the demo scripts: ``vtprune run --video``, the frame strip of ``--show``,
``vtprune bench --video-frames``, and eval/demos/video_*.py at small settings (tiny models, shipped clips)."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

import vtprune
from vtprune.cli import main
from vtprune.video import load_video, shipped_clips, video_inputs
from vtprune.viz import strip

pytest.importorskip("torchvision")  # HF video processors need it

ROOT = Path(__file__).resolve().parents[1]
CLIP = str(ROOT / "eval" / "data" / "clips" / "moving_square.mp4")


def _demo(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "eval" / "demos" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_run_video_prints_answer_tokens_per_frame_and_prefill(tmp_path, capsys):
    show = tmp_path / "strip.png"
    code = main(["run", "--model", "tiny:qwen2_vl", "--video", CLIP, "--frames", "8", "--method", "divprune",
                 "--budget", "0.25", "--max-new-tokens", "2", "--device", "cpu", "--show", str(show)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "random weights: answers are noise" in out
    assert "Which direction does the red square move" in out and "(reference: right)" in out
    assert re.search(r"^answer: ", out, flags=re.M)
    visual, equivalent, frames = re.search(r"visual tokens: (\d+) -> ([\d.]+) equivalent tokens; per frame: ([\d ]+)",
                                           out).groups()
    per_frame = [int(n) for n in frames.split()]
    assert len(per_frame) == 8 // 2  # Qwen2-VL: one temporal group per 2 frames
    assert sum(per_frame) == round(float(equivalent)) == round(0.25 * int(visual))
    assert re.search(r"prefill: [\d.]+ ms \(to the first token\)", out)
    assert "prefill FLOPs:" in out and "kept tokens per frame drawn to" in out
    assert Image.open(show).size[0] > 200


def test_run_video_fps_on_onevision_with_merging(tmp_path, capsys):
    code = main(["run", "--model", "tiny:llava_onevision", "--video", CLIP, "--fps", "1", "--method", "visionzip",
                 "--budget", "0.25", "--max-new-tokens", "1", "--device", "cpu", "--show", str(tmp_path / "s.png")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "8 of 64 frames at 0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0 s" in out  # 8 s clip at 1 fps
    assert len(re.search(r"per frame: ([\d ]+)", out).group(1).split()) == 8  # one group per frame
    assert "merged" in out


def test_run_video_default_model(capsys, monkeypatch):
    import vtprune.cli as cli
    from vtprune.loading import bundled_model_dir

    bundled = bundled_model_dir(cli.VIDEO_MICRO_MODEL)
    expected = str(bundled) if bundled is not None else cli.VIDEO_TINY_MODEL
    assert cli.default_video_model() == expected
    if bundled is not None:  # the bundled model is exercised by its own tests; here only the choice matters
        return
    code = main(["run", "--video", CLIP, "--frames", "4", "--method", "random", "--budget", "0.5",
                 "--max-new-tokens", "1", "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0 and "tiny:qwen2_vl" in out and "answers are noise" in out


def test_strip_draws_one_panel_per_frame_and_stage(tiny_models):
    model, processor = tiny_models["llava_onevision"]
    video = load_video(CLIP, num_frames=6)
    inputs = video_inputs(processor, video, "What moves?")
    with vtprune.pruned(model, "divprune", budget=0.5), torch.no_grad():
        model(**inputs)
        one_stage = strip(model, inputs, video, columns=4)
        wide = strip(model, inputs, video, columns=8)
    assert one_stage.width < wide.width and one_stage.height > wide.height  # 6 panels: 4 + 2 rows vs one row
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", vtprune.DegeneratePruningWarning)  # tiny model: few tokens per stage
        with vtprune.pruned(model, ["divprune", "fastv"], budget=0.5), torch.no_grad():
            model(**inputs)
            two_stages = strip(model, inputs, video, columns=8)
    assert two_stages.height > wide.height  # one block of panels per stage
    image_inputs = processor(images=[video.pil_frames()[0]], text=["<image>hi"], return_tensors="pt")
    with vtprune.pruned(model, "divprune", budget=0.5), torch.no_grad():
        model(**image_inputs)
        with pytest.raises(ValueError, match="no video tokens"):
            strip(model, image_inputs, video)


def test_bench_video_frames_on_a_tiny_model(tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    code = main(["bench", "--model", "tiny:qwen2_vl", "--tasks", "latency", "--video-frames", "4", "--methods",
                 "divprune", "--budgets", "full,0.25", "--repeats", "1", "--warmup", "0", "--new-tokens", "2",
                 "--out", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    rows = {row["method"]: row for row in map(json.loads, out.read_text().splitlines())}
    assert all(row["status"] == "ok" and row["bench"]["video_frames"] == 4 for row in rows.values())
    pruned = rows["divprune"]
    assert pruned["visual_tokens"] == 128 and pruned["equivalent_tokens"] == 32
    assert pruned["frame_kept"] is not None and sum(pruned["frame_kept"]) == 32
    assert pruned["native_k"] == 32 and pruned["native_prefill_ms"]["n"] == 1
    assert pruned["flops"] < pruned["flops_unpruned"]
    table = (tmp_path / "r.md").read_text()
    assert "video frames" in table and "visual tokens" in table


def test_demo_methods_side_by_side(tmp_path, capsys):
    rows = _demo("video_methods").main(["--model", "tiny:qwen2_vl", "--frames", "4", "--methods", "divprune,random",
                                         "--repeats", "1", "--max-new-tokens", "1", "--device", "cpu",
                                         "--out", str(tmp_path)])
    assert [r["method"] for r in rows] == ["none", "divprune", "random"]
    assert all(r["equivalent"] == 0.25 * rows[0]["visual"] for r in rows[1:])
    assert all(r["gflops"] < rows[0]["gflops"] and r["prefill_ms"] > 0 for r in rows[1:])
    assert (tmp_path / "strip_divprune.png").is_file() and (tmp_path / "strip_random.png").is_file()
    assert "random weights" in (tmp_path / "results.md").read_text().lower()


def test_demo_long_clip_sweep(tmp_path):
    pytest.importorskip("matplotlib")
    rows = _demo("video_long_clip").main(["--model", "tiny:qwen2_vl", "--frames", "4,8", "--repeats", "1",
                                           "--memory-limit", "10000", "--device", "cpu", "--out", str(tmp_path)])
    assert [r["frames"] for r in rows] == [4, 8]
    assert rows[1]["visual"] == 2 * rows[0]["visual"]
    assert all(r["full"]["status"] == r["pruned"]["status"] == "ok" for r in rows)
    assert all(r["kept"] == 0.25 * r["visual"] for r in rows)
    table = (tmp_path / "long_clip.md").read_text()
    assert "| yes | yes |" in table and (tmp_path / "long_clip.png").is_file()


def test_demo_long_clip_records_out_of_memory(monkeypatch, tiny_models):
    demo = _demo("video_long_clip")
    model, processor = tiny_models["qwen2_vl"]
    inputs = video_inputs(processor, load_video(CLIP, num_frames=4), "hi")

    def no_memory(fn, device):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(demo, "measure_peak_memory", no_memory)
    assert demo.measure(model, inputs, 1, "cpu") == {"status": "OOM", "prefill_ms": None, "peak_mib": None}


def test_real_checkpoint_recipe_commands_parse():
    """Every command of the real-checkpoint recipe (eval/demos/README.md) is accepted by its parser."""
    import vtprune.cli as cli

    text = (ROOT / "eval" / "demos" / "README.md").read_text()
    blocks = re.findall(r"^```bash\n(.*?)^```", text, flags=re.M | re.S)
    commands = [line.split(" #", 1)[0].strip() for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    commands = [c for c in commands if c and not c.startswith("#")]
    checked = 0
    for command in commands:
        argv = shlex.split(command)
        if argv[0] == "vtprune":
            cli.build_parser().parse_args(argv[1:])
        elif argv[0] == "python" and argv[1].startswith("eval/demos/"):
            _demo(Path(argv[1]).stem).build_parser().parse_args(argv[2:])
        else:
            continue
        checked += 1
    assert checked >= 4
    assert "llava-hf/llava-onevision-qwen2-0.5b-ov-hf" in text and "Qwen/Qwen2.5-VL-3B-Instruct" in text


def test_shipped_clip_questions():
    clips = shipped_clips()
    assert {c["file"] for c in clips} >= {"moving_square.mp4"} and all(c["path"].is_file() for c in clips)
