"""The public entry points: apply / remove / pruned / methods / stats."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from torch import nn

from . import compat
from .adapters.base import adapter_for
from .budget import Budget, split_composed_budget, tokens_for, validate_budget
from .engine.session import SESSION_ATTRIBUTE, PruneSession
from .errors import MethodOptionError, UnknownMethodError, VTPruneError
from .registry import Method, MethodInfo, build_method, method_class, registered_methods
from .stats import PruneStats


def apply(
    model: nn.Module,
    method: str | Method | Sequence[str | Method],
    budget: Budget = None,
    *,
    positions: str | None = None,
    seed: int | None = None,
    stage_budgets: Sequence[Budget] | None = None,
    **options: Any,
) -> nn.Module:
    """Install visual-token pruning on ``model`` (in place) and return the same object.

    ``method``     a registered name (see :func:`methods`), a configured :class:`Method`, or a list of them
    ``budget``     int = equivalent visual tokens per image; float in (0, 1] = fraction; None = paper default
    ``positions``  "original" or "compact" position ids for the kept tokens (default: the paper's)
    ``seed``       seed of stochastic methods (default 0)
    ``options``    method options with the papers' names (e.g. ``dominant=54, contextual=10`` for visionzip)
    ``stage_budgets``  one budget per method of a composition, overriding the default split of ``budget``
                   (the pre-LLM stage keeps 2 × budget, the in-LLM stage brings the layer average down to the
                   budget; see :func:`vtprune.budget.split_composed_budget`)

    A configured :class:`Method` object keeps its own budget, positions, seed and options: passing any of them
    here for it raises :class:`MethodOptionError` instead of ignoring them. Options the model cannot honour
    (an in-LLM pruning layer at or beyond the decoder's depth) are refused here, before anything is installed.
    Degenerate but valid settings (a stage left with fewer than 4 tokens per image, a budget that keeps
    everything, an option that overrides the budget) run with a :class:`~vtprune.DegeneratePruningWarning`.

    Everything else about the model is unchanged: call ``model(...)`` / ``model.generate(...)`` as usual.
    """
    validate_budget(budget)
    compat.warn_if_untested()
    adapter = adapter_for(model)
    if not isinstance(method, str | Method | list | tuple):
        raise UnknownMethodError(
            f"method must be a registered name, a Method object or a list of them; got {type(method).__name__}. "
            "See vtprune.methods() for the names."
        )
    names = [method] if isinstance(method, str | Method) else list(method)
    if not names:
        raise VTPruneError("method list is empty; pass a method name such as 'divprune'.")
    if len(names) > 1 and options:
        raise VTPruneError(
            "options cannot be passed to vtprune.apply when composing methods; build each method with "
            "vtprune.registry.build_method(name, budget, **options) and pass the list."
        )
    _refuse_settings_for_objects(names, budget, positions, seed, options, stage_budgets)
    split = stage_budgets is None
    if stage_budgets is not None:
        stage_budgets = list(stage_budgets)
        if len(stage_budgets) != len(names):
            raise VTPruneError(
                f"stage_budgets has {len(stage_budgets)} entries for {len(names)} methods; give one per method."
            )
        for value in stage_budgets:
            validate_budget(value)
    else:
        stages = [method_class(m).stage if isinstance(m, str) else m.stage for m in names]
        stage_budgets = split_composed_budget(budget, stages)
    built = [build_method(m, budget=share, positions=positions, seed=0 if seed is None else seed, **options)
             if isinstance(m, str) else build_method(m) for m, share in zip(names, stage_budgets, strict=True)]
    # binds the methods to the model, adds each method's own further stages (companions), checks the composition;
    # installs nothing yet
    session = PruneSession(model, adapter, built)
    stages = session.methods
    num_layers = len(adapter.decoder_layers)
    for m in stages:
        m.check_model(num_layers)
    tokens = _fixed_visual_tokens(model)
    if tokens is not None:
        _check_fixed_images(stages, num_layers, tokens)
    if split:
        _warn_about_split(names, built, budget, stage_budgets)
    session.install()
    return model


def _fixed_visual_tokens(model: nn.Module) -> int | None:
    """Visual tokens of every image when the model fixes them before any input is seen: LLaVA-1.5-style models
    (``model_type`` "llava" with a CLIP/SigLIP tower) resize every image to one resolution, so each image is
    (image_size / patch_size)² patch tokens (+1 with the "full" feature strategy, which keeps the CLS token).
    None for the families whose counts depend on the input (AnyRes crops, dynamic resolution)."""
    config = model.config
    vision = getattr(config, "vision_config", None)
    if getattr(config, "model_type", None) != "llava" or getattr(vision, "model_type", None) not in (
            "clip_vision_model", "siglip_vision_model"):
        return None
    patches = (vision.image_size // vision.patch_size) ** 2
    return patches + 1 if getattr(config, "vision_feature_select_strategy", "default") == "full" else patches


def _check_fixed_images(built: list[Method], num_layers: int, tokens: int) -> None:
    """With a known count of visual tokens per image, run every stage's plan once before installing: an
    unreachable in-LLM budget or visionzip counts that do not fit raise here instead of on every forward, and
    degenerate plans warn at apply(). The per-image plan is the plan of any sample: budgets scale with images."""
    count, exact = tokens, True
    for m in built:
        if m.stage == "in-vit":
            count = min(count, m.budget if isinstance(m.budget, int) else tokens_for(m.budget, count))
        elif m.stage == "pre-llm":
            count, exact = m.check_image_tokens(count), m.exact_count
        elif m.stage == "in-llm" and count and exact:  # after a stage that may keep fewer, the forward decides
            m.schedule(num_layers, count, 1)


def _refuse_settings_for_objects(names: list, budget: Budget, positions, seed, options: dict,
                                 stage_budgets) -> None:
    """A configured method object keeps its own settings: settings passed to ``apply`` that only such objects
    would receive would be silently ignored, so they are refused (in a mixed list they go to the names)."""
    objects = [m for m in names if isinstance(m, Method)]
    if not objects:
        return
    shown = ", ".join(repr(m) for m in objects)
    if len(objects) == len(names):
        given = [name for name, value in (("budget", budget), ("positions", positions), ("seed", seed))
                 if value is not None] + sorted(options)
        if given:
            raise MethodOptionError(
                f"{shown} {'is a configured method object' if len(objects) == 1 else 'are configured method objects'}"
                f" with its own settings, so {', '.join(given)} passed to vtprune.apply would be ignored; build it "
                "with them (vtprune.registry.build_method(name, budget=..., positions=..., **options)) or pass the "
                "method's name."
            )
    if options:
        raise MethodOptionError(f"options {', '.join(sorted(options))} cannot go to the configured method object(s) "
                                f"{shown}; build each method with its own options.")
    if stage_budgets is not None:
        for m, share in zip(names, list(stage_budgets), strict=False):
            if isinstance(m, Method) and share is not None:
                raise MethodOptionError(f"stage_budgets gives {share!r} to the configured method object {m!r}, which "
                                        "keeps its own budget; put None at its place in stage_budgets.")


def _warn_about_split(names: list, built: list[Method], budget: Budget, stage_budgets: list) -> None:
    """The default split of a composition's budget can leave the pre-LLM stage keeping every token (2 × a
    fraction ≥ 1): warn, since that stage then prunes nothing."""
    if len(built) < 2 or budget is None:
        return
    for m, share, name in zip(built, stage_budgets, names, strict=True):
        if isinstance(name, str) and m.stage == "pre-llm" and share == 1.0 and budget != 1.0:
            m.warn_once(f"with budget={budget!r} the composition's pre-LLM stage keeps 2 × {budget!r} ≥ all visual "
                        f"tokens, so {m.name} prunes nothing; pass a budget below 0.5 or stage_budgets=[...].")


def remove(model: nn.Module) -> nn.Module:
    """Remove every hook and attribute vtprune installed; the model behaves exactly as before ``apply``."""
    session = getattr(model, SESSION_ATTRIBUTE, None)
    if session is None:
        raise VTPruneError("this model has no vtprune pruning installed; nothing to remove.")
    session.remove()
    return model


def is_pruned(model: nn.Module) -> bool:
    return getattr(model, SESSION_ATTRIBUTE, None) is not None


@contextmanager
def pruned(model: nn.Module, method, budget: Budget = None, **kwargs: Any) -> Iterator[nn.Module]:
    """Scoped form of :func:`apply`: pruning is removed when the block exits (also on error)."""
    apply(model, method, budget, **kwargs)
    try:
        yield model
    finally:
        remove(model)


def methods() -> dict[str, MethodInfo]:
    """Registered methods: name -> stage, signals needed, paper, defaults."""
    return registered_methods()


def stats(model: nn.Module) -> PruneStats:
    """What the last forward of a pruned model did (the prefill, for ``generate``)."""
    session = getattr(model, SESSION_ATTRIBUTE, None)
    if session is None:
        raise VTPruneError("this model is not pruned; call vtprune.apply(model, method, budget) first.")
    if session.last_stats is None:
        raise VTPruneError("no forward has run since vtprune.apply; call the model (or generate) first.")
    return session.last_stats
