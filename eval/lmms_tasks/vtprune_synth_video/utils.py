"""lmms-eval task functions of ``vtprune_synth_video``: the visual is the clip's mp4 path (lmms-eval's video
backends decode it), the prompt is the bare question (the backend applies the model's chat template) and scoring
is vtprune's: exact match after ``vtprune.bench.accuracy.normalize_answer``."""

from pathlib import Path

from vtprune.bench.accuracy import normalize_answer
from vtprune.synth.video import VIDEO_SKILLS

_RELATIVE = Path("eval") / "data" / "synth_video" / "test"
_REPO = Path(__file__).resolve().parents[3]


def doc_to_visual(doc):
    for directory in (Path.cwd() / _RELATIVE, _REPO / _RELATIVE):
        path = directory / doc["video"]
        if path.is_file():
            return [str(path)]
    raise FileNotFoundError(f"clip {doc['video']} not found under {_RELATIVE} (run lmms-eval from the repository "
                            f"root, or re-create the split: python -m vtprune.synth.video --out eval/data/synth_video)")


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    prediction = results[0].text if hasattr(results[0], "text") else results[0]
    correct = float(normalize_answer(str(prediction).strip()) == normalize_answer(doc["answer"]))
    # per-skill metrics carry None for other skills; aggregate_skill averages the present values
    out = {"exact_match": correct}
    for skill in VIDEO_SKILLS:
        out[skill] = correct if doc["skill"] == skill else None
    return out


def aggregate_skill(values):
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else float("nan")
