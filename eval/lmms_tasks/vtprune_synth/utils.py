"""lmms-eval task functions of ``vtprune_synth``: the prompt is the bare question (the backend applies the
model's chat template, as vtprune's own evaluator does) and scoring is vtprune's: exact match after
``vtprune.bench.accuracy.normalize_answer``."""

from vtprune.bench.accuracy import normalize_answer


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    prediction = results[0].text if hasattr(results[0], "text") else results[0]
    correct = float(normalize_answer(str(prediction).strip()) == normalize_answer(doc["answer"]))
    # per-skill metrics carry None for other skills; aggregate_skill averages the present values
    out = {"exact_match": correct}
    for skill in ("attribute", "existence", "counting", "spatial", "ocr", "fine_detail"):
        out[skill] = correct if doc["skill"] == skill else None
    return out


def aggregate_skill(values):
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else float("nan")
