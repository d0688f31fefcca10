"""Is a video method's accuracy on the video micro-VLM limited by the method or by the saliency signal it reads?

Runs the synthetic video test split through ``models/micro-qwen2vl-video`` (Qwen2-VL, 16 frames -> 8 temporal
groups x 16 tokens) with each method twice: as registered, and with the ``cls_attention`` signal negated (the
method object's ``select_clip`` gets a copy of the clip whose saliency is multiplied by -1; nothing else changes,
no class is patched). If negating the saliency helps a lot, the vision encoder's attention ranks the tokens
backwards on this model and the method's machinery (segments, merging, positions) is not what fails. Also prints,
for HoliTom, how many tokens are left after its temporal merging (its budget is a cap: ρ' = min(ρ / left, 1)).

    python eval/scripts/video_saliency_probe.py --limit 70 --methods fastvid,holitom,visionzip_video \\
        --budgets 0.5,0.25,0.1
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

import vtprune
from vtprune.bench.accuracy import evaluate_vqa
from vtprune.registry import method_class
from vtprune.selectors.video import frame_similarity, holitom_windows
from vtprune.synth.video import load_video_test_split


def negated(name: str, budget: float, **options):
    """The method ``name`` as an object whose clip selection sees -cls_attention."""
    method = method_class(name)(budget=budget, **options)
    original = method.select_clip

    def select_clip(clip, k):
        signals = dict(clip.signals)
        signals["cls_attention"] = -signals["cls_attention"]
        return original(dataclasses.replace(clip, signals=signals), k)

    method.select_clip = select_clip  # this instance only
    return method


def holitom_left(model, processor, samples, tau: float = 0.8) -> list[int]:
    """Per clip: the tokens HoliTom's temporal windows leave (T·N − saved), from the clip's own LLM features."""
    left = []
    captured = {}

    def spy(clip, k):
        features = clip.features.float()
        _, saved = holitom_windows(frame_similarity(features), tau)
        captured["left"] = int(clip.num_tokens - saved)
        return original(clip, k)

    method = method_class("holitom")(budget=0.5, inner=False)
    original = method.select_clip
    method.select_clip = spy
    with vtprune.pruned(model, method), torch.no_grad():
        for s in samples:
            messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": s.question}]}]
            text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            model(**processor(videos=[s.frames], text=[text], return_tensors="pt"))
            left.append(captured["left"])
    return left


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/micro-qwen2vl-video")
    parser.add_argument("--limit", type=int, default=70)
    parser.add_argument("--methods", default="fastvid,holitom,visionzip_video")
    parser.add_argument("--budgets", default="0.5,0.25,0.1")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = AutoModelForImageTextToText.from_pretrained(args.model, attn_implementation="sdpa").eval()
    processor = AutoProcessor.from_pretrained(args.model)
    samples = load_video_test_split(limit=args.limit)
    cache: dict = {}
    full = evaluate_vqa(model, processor, samples, inputs_cache=cache).overall
    print(f"| method | budget | accuracy % | with -saliency % | equivalent tokens |\n|---|---|---|---|---|\n"
          f"| full | 1.0 | {100 * full:.1f} | | |")
    for name in args.methods.split(","):
        for budget in (float(b) for b in args.budgets.split(",")):
            with vtprune.pruned(model, name, budget=budget):
                plain = evaluate_vqa(model, processor, samples, inputs_cache=cache).overall
                eq = statistics.mean(s.equivalent_tokens for s in vtprune.stats(model).samples)
            with vtprune.pruned(model, negated(name, budget)):
                flipped = evaluate_vqa(model, processor, samples, inputs_cache=cache).overall
            print(f"| {name} | {budget} | {100 * plain:.1f} | {100 * flipped:.1f} | {eq:.1f} (last batch) |",
                  flush=True)
    if "holitom" in args.methods.split(","):
        left = holitom_left(model, processor, samples)
        print(f"\nHoliTom: tokens left after temporal merging per clip (of {8 * 16}): mean {statistics.mean(left):.1f}, "
              f"min {min(left)}, max {max(left)}; clips with left <= 64 (budget 0.5 saturates): "
              f"{sum(x <= 64 for x in left)}/{len(left)}; left <= 32 (0.25): {sum(x <= 32 for x in left)}/{len(left)}")


if __name__ == "__main__":
    main()
