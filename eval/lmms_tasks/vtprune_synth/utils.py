"""lmms-eval task functions of ``vtprune_synth``: the prompt is the bare question (the backend applies the
model's chat template, as vtprune's own evaluator does) and scoring is vtprune's: exact match after
``vtprune.bench.accuracy.normalize_answer``."""

from vtprune.bench.accuracy import lmms_skill_metrics, mean_of_present
from vtprune.synth import SKILLS


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    return lmms_skill_metrics(doc, results, SKILLS)


aggregate_skill = mean_of_present
