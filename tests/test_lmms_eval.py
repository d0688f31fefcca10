"""lmms-eval integration: the ``vtprune`` lmms-eval model on the ``vtprune_synth`` task, run through the
lmms-eval CLI (via ``vtprune eval``) offline, agrees with vtprune's own evaluator sample by sample."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval")

import vtprune  # noqa: E402
from vtprune.bench.accuracy import evaluate_vqa, normalize_answer  # noqa: E402
from vtprune.loading import bundled_model_dir, load_model  # noqa: E402
from vtprune.synth import load_test_split  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LIMIT = 12


@pytest.fixture(scope="module")
def model_dir(request) -> str:
    """The bundled micro-llava when present, else a tiny random LLaVA saved as an HF directory."""
    bundled = bundled_model_dir("micro-llava")
    if bundled is not None:
        return str(bundled)
    return request.getfixturevalue("saved_tiny_llava")


def test_manifest_registers_the_vtprune_model():
    from lmms_eval.models import get_model

    from vtprune.bench.lmms import VTPruneLMM

    assert get_model("vtprune") is VTPruneLMM


def test_model_args_build_a_pruned_lmms_eval_backend(model_dir):
    from lmms_eval.models.chat.llava_hf import LlavaHf

    from vtprune.bench.lmms import VTPruneLMM

    lm = VTPruneLMM.create_from_arg_string(
        f"pretrained={model_dir},device=cpu,dtype=float32,method=fastv,budget=0.5,opt_layer=1",
        {"batch_size": 1, "device": "cpu"})
    assert isinstance(lm, LlavaHf) and not lm.is_simple
    assert vtprune.is_pruned(lm.model)
    session = lm.model._vtprune_session
    assert session.name == "fastv" and session.layer_method.config["layer"] == 1


@pytest.mark.slow
def test_lmms_eval_cli_accuracy_equals_evaluate_vqa(tmp_path, model_dir):
    out = tmp_path / "lmms"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "hf-datasets")}
    done = subprocess.run(
        [sys.executable, "-m", "vtprune", "eval", "--model", model_dir, "--method", "divprune", "--budget", "0.25",
         "--limit", str(LIMIT), "--output-path", str(out), "--device", "cpu"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    written = json.loads(next(out.rglob("*_results.json")).read_text())
    results = written["results"]["vtprune_synth"]
    stats = written["vtprune"]  # vtprune's statistics of the run, in lmms-eval's results file
    assert stats["samples"] == LIMIT and stats["args"]["method"] == "divprune"
    assert stats["equivalent_tokens"] == pytest.approx(0.25 * stats["visual_tokens_in"])
    assert stats["prefill_gflops"] < stats["prefill_gflops_unpruned"]
    samples = [json.loads(line) for line in next(out.rglob("*_samples_vtprune_synth.jsonl")).read_text().splitlines()]
    samples.sort(key=lambda s: s["doc_id"])
    assert len(samples) == LIMIT

    model, processor, _ = load_model(model_dir)
    questions = load_test_split(limit=LIMIT)
    with vtprune.pruned(model, "divprune", budget=0.25):
        ours = evaluate_vqa(model, processor, questions, batch_size=1)

    for sample, question, prediction in zip(samples, questions, ours.predictions, strict=True):
        assert sample["target"] == question.answer
        response = sample["filtered_resps"]
        response = response[0] if isinstance(response, list) else response
        assert normalize_answer(response) == normalize_answer(prediction), (sample["doc_id"], response, prediction)
    assert results["exact_match,none"] == pytest.approx(ours.overall)
    for skill, value in ours.per_skill.items():
        assert results[f"{skill},none"] == pytest.approx(value)
