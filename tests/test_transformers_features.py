"""Every transformers feature on a pruned model (design.md invariant 10), for every family.

Modes: ``keep-all`` (a pre-LLM and an in-LLM method whose budget keeps every token: results must equal the
unwrapped model's exactly), ``pre`` (divprune, 4 tokens per image), ``in`` (fastv at layer 1, half the
tokens) and ``pre+in`` (their composition: divprune keeps half, fastv half of those from layer 2). A feature that cannot work pruned is refused with a clear VTPruneError, never a raw traceback.
"""

from __future__ import annotations

import copy
import threading
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

import vtprune
from vtprune import compat
from vtprune.testing import FAMILIES, tiny_image, tiny_inputs

MODES = {
    "keep-all": (["divprune", "fastv"], {"stage_budgets": [1.0, 1.0]}),
    "pre": ("divprune", {"budget": 4}),
    "in": ("fastv", {"budget": 0.5, "layer": 1}),
    "pre+in": (["divprune", "fastv"], {"stage_budgets": [0.5, 0.75]}),
}
NEW = 3


@contextmanager
def maybe_pruned(model, mode):
    if mode is None:
        yield model
        return
    method, options = MODES[mode]
    with vtprune.pruned(model, method, **options):
        yield model


def batch(processor, padding_side="left"):
    return tiny_inputs(processor, [tiny_image(0), tiny_image(1, size=(64, 48))],
                       ["Describe the image.", "What is shown here, briefly?"], padding_side=padding_side)


def both(tiny_models, family, mode, fn):
    """``fn(model)`` unwrapped and under ``mode``: (reference, pruned)."""
    model, _ = tiny_models[family]
    with torch.no_grad():
        reference = fn(model)
        with maybe_pruned(model, mode):
            pruned = fn(model)
    return reference, pruned


def greedy(model, inputs, **kwargs):
    return model.generate(**inputs, max_new_tokens=NEW, do_sample=False, **kwargs)


params = pytest.mark.parametrize("family", FAMILIES)
all_modes = pytest.mark.parametrize("mode", list(MODES))


# -- decoding modes --------------------------------------------------------------------------------------------
@params
@all_modes
def test_sampling_with_top_k_1_is_greedy(tiny_models, family, mode):
    model, processor = tiny_models[family]
    inputs = batch(processor)
    with torch.no_grad(), maybe_pruned(model, mode):
        expected = greedy(model, inputs)
        torch.manual_seed(0)
        sampled = model.generate(**inputs, max_new_tokens=NEW, do_sample=True, top_k=1)
    assert torch.equal(sampled, expected)


@params
@all_modes
def test_beam_search_and_return_sequences(tiny_models, family, mode):
    """generate() encodes the images once and expands the batch: each copy gets its sample's pruning, and the
    beams' first scores are the pruned prefill's."""
    model, processor = tiny_models[family]
    inputs = batch(processor)
    run = dict(max_new_tokens=NEW, num_beams=2, num_return_sequences=2, do_sample=False,
               output_scores=True, return_dict_in_generate=True)
    reference, pruned = both(tiny_models, family, mode, lambda m: m.generate(**inputs, **run))
    with torch.no_grad(), maybe_pruned(model, mode):
        logits = model(**inputs).logits[:, -1]
        single = vtprune.stats(model).samples
        model.generate(**inputs, **run)
        copies = vtprune.stats(model).samples
    if mode == "keep-all":
        assert torch.equal(pruned.sequences, reference.sequences)
        return
    assert len(copies) == 2 * len(single)
    for row, sample in enumerate(copies):
        alone = single[row // 2]
        assert [s.kept_positions.tolist() for s in sample.stages] == [s.kept_positions.tolist() for s in alone.stages]
    first = pruned.scores[0].view(2, 2, -1)[:, 0]  # step 0: beam 0 of each sample = the prefill's log-probs
    torch.testing.assert_close(first, torch.log_softmax(logits.float(), -1), atol=1e-4, rtol=0)


@params
@all_modes
def test_beam_sampling_runs_and_keep_all_equals(tiny_models, family, mode):
    model, processor = tiny_models[family]
    inputs = batch(processor)

    def sample(m):
        torch.manual_seed(0)
        return m.generate(**inputs, max_new_tokens=NEW, num_beams=2, do_sample=True)

    reference, pruned = both(tiny_models, family, mode, sample)
    assert pruned.shape[0] == 2
    if mode == "keep-all":
        assert torch.equal(pruned, reference)


@params
@all_modes
def test_without_kv_cache(tiny_models, family, mode):
    """use_cache=False re-sends the pre-encoded images at every step; a pre-LLM selection does not depend on the
    text, so decoding without a cache gives what decoding with it gives."""
    model, processor = tiny_models[family]
    inputs = batch(processor)
    reference, pruned = both(tiny_models, family, mode, lambda m: greedy(m, inputs, use_cache=False))
    if mode == "keep-all":
        assert torch.equal(pruned, reference)
    elif mode == "pre":
        with torch.no_grad(), maybe_pruned(model, mode):
            assert torch.equal(pruned, greedy(model, inputs))
    else:  # an in-LLM stage: every step is a new prefill, scored by its own last token
        assert pruned.shape == reference.shape


@params
@all_modes
def test_static_cache(tiny_models, family, mode):
    """generate(cache_implementation="static") pre-builds 4-D masks (a dict per layer type on Qwen/OneVision):
    the engine reads the padding back from the prefill mask and builds its own from then on; the cache is
    filled up to the pruned length, so the run equals the dynamic-cache run."""
    model, processor = tiny_models[family]
    inputs = batch(processor)
    run = dict(max_new_tokens=NEW, do_sample=False, output_logits=True, return_dict_in_generate=True)
    if mode == "keep-all":
        reference, pruned = both(tiny_models, family, mode, lambda m: m.generate(**inputs, cache_implementation="static", **run))
        assert torch.equal(pruned.sequences, reference.sequences)
        return
    with torch.no_grad(), maybe_pruned(model, mode):
        dynamic = model.generate(**inputs, **run)
        static = model.generate(**inputs, cache_implementation="static", **run)
    assert torch.equal(static.sequences, dynamic.sequences)
    for a, b in zip(static.logits, dynamic.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_static_cache_without_padding(tiny_models, family):
    """One unpadded prompt: generate hands Qwen a dict of masks whose full-attention entry is None."""
    model, processor = tiny_models[family]
    inputs = tiny_inputs(processor, [tiny_image(0)], ["Describe the image."])
    run = dict(max_new_tokens=NEW, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad(), maybe_pruned(model, "pre"):
        dynamic = model.generate(**inputs, **run)
        static = model.generate(**inputs, cache_implementation="static", **run)
    assert torch.equal(static.sequences, dynamic.sequences)
    for a, b in zip(static.logits, dynamic.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@params
@all_modes
def test_continuing_from_a_returned_cache(tiny_models, family, mode):
    """A forward returns its cache and the caller continues with it (as generate does). M-RoPE models derive a
    decode step's positions from the mask only for a padded batch inside generate, so for them the caller
    continues one unpadded prompt without a mask (the model's documented manual loop)."""
    model, processor = tiny_models[family]
    mrope = family.startswith("qwen")
    inputs = tiny_inputs(processor, [tiny_image(0)], ["Describe the image."]) if mrope else batch(processor)
    if mrope:
        del inputs["attention_mask"]
    with torch.no_grad(), maybe_pruned(model, mode):
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        step = model(**inputs, use_cache=True)
        token = step.logits[:, -1].argmax(-1, keepdim=True)
        extra = {} if mrope else {"attention_mask": torch.cat([inputs["attention_mask"], torch.ones_like(token)], 1)}
        follow = model(input_ids=token, use_cache=True, **extra, **compat.cache_kwargs(compat.output_cache(step)))
    torch.testing.assert_close(step.logits[:, -1], out.logits[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(follow.logits[:, -1], out.logits[1], atol=1e-5, rtol=0)


@params
@all_modes
def test_assisted_decoding(tiny_models, family, mode):
    """Assisted decoding crops the KV cache to unpruned lengths: equal at keep-all, refused when pruned."""
    model, processor = tiny_models[family]
    inputs = tiny_inputs(processor, [tiny_image(0)], ["Describe the image."])
    assistant = copy.deepcopy(model)
    run = dict(max_new_tokens=4, do_sample=False)
    if mode == "keep-all":
        reference, pruned = both(tiny_models, family, mode, lambda m: m.generate(**inputs, assistant_model=assistant, **run))
        assert torch.equal(pruned, reference)
        return
    with torch.no_grad(), maybe_pruned(model, mode):
        try:
            out = model.generate(**inputs, assistant_model=assistant, **run)
        except vtprune.VTPruneError as error:
            assert "assisted" in str(error).lower()
            return
        assert torch.equal(out, model.generate(**inputs, **run))


# -- training --------------------------------------------------------------------------------------------------
def _answer_targets(inputs, answer: int = 4):
    """labels on the last ``answer`` tokens of each (left-padded) row, -100 elsewhere; and the same as
    shift_labels (target of position t = labels[t + 1])."""
    ids = inputs["input_ids"]
    labels = torch.full_like(ids, -100)
    labels[:, -answer:] = ids[:, -answer:]
    return labels, F.pad(labels[:, 1:], (0, 1), value=-100)


@params
@all_modes
def test_labels_and_shift_labels(tiny_models, family, mode):
    """The answer tokens are text at the end of the sequence, so whatever was pruned the loss is the
    cross-entropy of the last logits against them."""
    model, processor = tiny_models[family]
    inputs = batch(processor)
    labels, shift_labels = _answer_targets(inputs)
    with torch.no_grad(), maybe_pruned(model, mode):
        out = model(**inputs)
        by_labels = model(**inputs, labels=labels).loss
        by_shift = model(**inputs, shift_labels=shift_labels).loss
    logits = out.logits[:, -5:-1].float()
    expected = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), inputs["input_ids"][:, -4:].reshape(-1))
    torch.testing.assert_close(by_labels, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(by_shift, expected, atol=1e-5, rtol=1e-5)
    if mode == "keep-all":
        with torch.no_grad():
            assert torch.equal(model(**inputs, labels=labels).loss, by_labels)


@params
@all_modes
def test_inputs_embeds_with_pixel_values(tiny_models, family, mode):
    model, processor = tiny_models[family]
    inputs = batch(processor)
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    by_embeds = {k: v for k, v in inputs.items() if k != "input_ids"} | {"inputs_embeds": embeds}
    with torch.no_grad():
        unwrapped = model(**by_embeds).logits
    with torch.no_grad(), maybe_pruned(model, mode):
        by_ids = model(**inputs).logits
        kept_by_ids = [[s.kept_positions.tolist() for s in smp.stages] for smp in vtprune.stats(model).samples]
        got = model(**by_embeds).logits
        kept = [[s.kept_positions.tolist() for s in smp.stages] for smp in vtprune.stats(model).samples]
    if mode == "keep-all":
        assert torch.equal(got, unwrapped)
    elif mode == "pre" or not family.startswith("qwen"):
        assert kept == kept_by_ids and all(kept)  # (M-RoPE in-LLM: positions differ, so may the scores)
    if not family.startswith("qwen"):  # transformers builds M-RoPE positions from input_ids only
        torch.testing.assert_close(got, by_ids, atol=1e-5, rtol=0)


@params
@all_modes
def test_autograd_reaches_the_vision_tower(tiny_models, family, mode):
    model, processor = tiny_models[family]
    inputs = batch(processor)
    labels, _ = _answer_targets(inputs)
    model.zero_grad(set_to_none=True)
    with maybe_pruned(model, mode):
        model(**inputs, labels=labels).loss.backward()
    vision = [p for name, p in model.named_parameters() if "vision" in name or "visual" in name]
    try:
        assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in vision)
    finally:
        model.zero_grad(set_to_none=True)


@params
@pytest.mark.parametrize("mode", ["pre", "in"])
def test_gradient_checkpointing(tiny_models, family, mode):
    """Pre-LLM pruning trains with gradient checkpointing (equal gradients); in-LLM pruning is refused with it."""
    model, processor = tiny_models[family]
    inputs = batch(processor)
    labels, _ = _answer_targets(inputs)
    head = model.get_output_embeddings().weight

    def grad_of_head():
        model.zero_grad(set_to_none=True)
        with maybe_pruned(model, mode):
            model(**inputs, labels=labels).loss.backward()
        return head.grad.clone()

    model.train()
    try:
        plain = grad_of_head() if mode == "pre" else None
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if mode == "pre":
            torch.testing.assert_close(grad_of_head(), plain, atol=1e-5, rtol=1e-4)
        else:
            with pytest.raises(vtprune.VTPruneError, match="gradient checkpointing"):
                grad_of_head()
    finally:
        model.gradient_checkpointing_disable()
        model.eval()
        model.zero_grad(set_to_none=True)


# -- copies, saving, threads -----------------------------------------------------------------------------------
@params
@pytest.mark.parametrize("mode", ["pre", "in"])
def test_deepcopy_is_an_independent_pruned_model(tiny_models, family, mode):
    model, processor = tiny_models[family]
    inputs = batch(processor)
    with torch.no_grad(), maybe_pruned(model, mode):
        expected = model(**inputs).logits
        clone = copy.deepcopy(model)
    with torch.no_grad():
        reference = model(**inputs).logits
    assert vtprune.is_pruned(clone) and not vtprune.is_pruned(model)
    with torch.no_grad():
        torch.testing.assert_close(clone(**inputs).logits, expected, atol=0, rtol=0)
        assert vtprune.stats(clone).samples[0].stages
        for p in clone.parameters():  # the copy runs on its own weights
            p.add_(0.05)
        changed = clone(**inputs).logits
        assert changed.shape != expected.shape or not torch.allclose(changed, expected)
        torch.testing.assert_close(model(**inputs).logits, reference, atol=0, rtol=0)
    vtprune.remove(clone)
    assert not clone._forward_pre_hooks and not clone._forward_hooks


@params
def test_save_pretrained_saves_the_plain_model(tiny_models, family, tmp_path):
    model, processor = tiny_models[family]
    inputs = batch(processor)
    with torch.no_grad():
        expected = model(**inputs).logits
        with maybe_pruned(model, "pre"):
            model.save_pretrained(tmp_path)
        reloaded = type(model).from_pretrained(tmp_path, attn_implementation="sdpa").eval()
        torch.testing.assert_close(reloaded(**inputs).logits, expected, atol=0, rtol=0)


@pytest.mark.parametrize("family", ["llava", "qwen3_vl"])
@pytest.mark.parametrize("mode", ["pre", "in"])
def test_one_pruned_model_from_several_threads(tiny_models, family, mode):
    """The engine keeps its per-call state per thread: concurrent generate() calls each get their own result."""
    model, processor = tiny_models[family]
    prompts = [tiny_inputs(processor, [tiny_image(i)], ["Describe the image."]) for i in range(3)]
    with torch.no_grad(), maybe_pruned(model, mode):
        expected = [greedy(model, x) for x in prompts]
        failures: list[str] = []

        def work(start: int) -> None:
            try:
                with torch.no_grad():
                    for r in range(4):
                        i = (start + r) % len(prompts)
                        if not torch.equal(greedy(model, prompts[i]), expected[i]):
                            failures.append(f"thread {start}: prompt {i} differs")
            except Exception as error:  # noqa: BLE001  (reported below)
                failures.append(f"thread {start}: {type(error).__name__}: {error}")

        threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not failures, failures


def test_statistics_never_break_inference(tiny_models, monkeypatch):
    """A configuration the FLOPs model does not know: stats().flops is None with one warning, the forward runs."""
    import vtprune.bench.flops as flops

    model, processor = tiny_models["llava"]
    inputs = batch(processor)

    def unknown(*args, **kwargs):
        raise ValueError("unknown text model_type 'mystery'")

    monkeypatch.setattr(flops, "model_prefill_flops", unknown)
    with torch.no_grad(), maybe_pruned(model, "pre"):
        with pytest.warns(UserWarning, match="FLOPs are not available"):
            model(**inputs)
        stats = vtprune.stats(model)
    assert stats.flops is None and stats.samples[0].stages[0].kept_positions.numel() == 4


@pytest.mark.slow
def test_torch_compile_is_refused_not_silently_unpruned(tiny_models):
    """Compiled code skips vtprune's per-call hooks; the guard stops the forward instead of returning the
    unpruned model's output as a pruned one."""
    model, processor = tiny_models["llava"]
    inputs = batch(processor)
    with torch.no_grad(), maybe_pruned(model, "pre"):
        compiled = torch.compile(model, backend="eager")
        with pytest.raises(vtprune.SilentlyUnprunedError, match="torch.compile"):
            compiled(**inputs)
    torch._dynamo.reset()
