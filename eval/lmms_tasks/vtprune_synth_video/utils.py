"""lmms-eval task functions of ``vtprune_synth_video``: the visual is the clip's mp4 path (lmms-eval's video
backends decode it), the prompt is the bare question (the backend applies the model's chat template) and scoring
is vtprune's: exact match after ``vtprune.bench.accuracy.normalize_answer``."""

from pathlib import Path

from vtprune.bench.accuracy import lmms_skill_metrics, mean_of_present
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
    return lmms_skill_metrics(doc, results, VIDEO_SKILLS)


aggregate_skill = mean_of_present
