"""Method registry: one place that knows every pruning method by name.

A method is a class deriving from :class:`Method`, registered with :func:`register_method`. Its class
attributes describe it (stage, signals it needs, paper, default options); its instances hold the options of
one ``vtprune.apply`` call and turn tensors into selections via the pure functions of ``vtprune.selectors``.
"""

from __future__ import annotations

import difflib
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from .budget import Budget, tokens_for, validate_budget
from .errors import DegeneratePruningWarning, MethodOptionError, UnknownMethodError

PRE_LLM = "pre-llm"
IN_LLM = "in-llm"
#: a stage that prunes the visual KV cache at decode steps (vtprune/engine/decode_stage.py)
DECODE = "decode"
#: inside the vision encoder, between its blocks (vtprune/engine/vit_stage.py)
IN_VIT = "in-vit"
POSITION_CONVENTIONS = ("original", "compact")
#: how a pre-LLM method meets a video (``Method.video_policy``): "per_frame" — every frame (Qwen: temporal group)
#: is a :class:`VisualGroup` of its own and the clip's budget is split evenly over the frames (remainder to the
#: earliest); "global" — one VisualGroup over all the clip's tokens; "clip" — the method's ``select_clip`` gets
#: the whole clip as a :class:`VideoClip`
VIDEO_POLICIES = ("per_frame", "global", "clip")
#: a stage that leaves fewer visual tokens than this per image gets a DegeneratePruningWarning
FEW_TOKENS = 4
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


@dataclass
class VisualGroup:
    """The visual tokens a pre-LLM method selects from in one call (one image, or one crop of it).

    ``features``  [N, D]  projected visual tokens (the LLM's input embeddings at those positions)
    ``height``/``width``  the group's patch grid (N == height * width) or None when the group is not a grid
    ``signals``   per-token vision-encoder signals that the method asked for, each with N rows:
                  ``cls_attention`` [N] (CLS→patch attention, or mean received attention without CLS),
                  ``vit_keys`` [N, dk] (head-averaged keys of the feature layer), ``vit_hidden`` [N, dv]
                  (the projector's input), ``vit_cls_hidden`` [N, dv] (the [CLS] state of the feature layer, the same
                  row for every token of a crop; CLIP encoders only)
    ``project``   maps merged vision-space tokens [M, dv] to LLM embeddings [M, D] (the model's projector)
    ``seed``      seed for stochastic methods, derived from the user's seed and the group's place in its sample
    ``index``     the group's place in its image: 0 for the base image (or the only group), 1, 2, ... for crops
                  (a video frame: its frame index)
    ``frame``     the frame index of a per-frame group of a video, None for images and whole-clip groups
    ``instruction``      [T, D] or None: LLM input embeddings of the prompt's text tokens after the image (given
                         only to methods that list the ``"instruction"`` signal)
    ``instruction_ids``  LongTensor[T] or None: their token ids
    """

    features: torch.Tensor
    height: int | None
    width: int | None
    signals: dict[str, torch.Tensor] = field(default_factory=dict)
    project: Any = None
    seed: int = 0
    index: int = 0
    frame: int | None = None
    instruction: torch.Tensor | None = None
    instruction_ids: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return self.features.shape[0]


@dataclass
class VideoClip:
    """One video of one sample, for methods with ``video_policy = "clip"`` (:meth:`Method.select_clip`).

    ``features``    [T, N, D] projected visual tokens (LLM input embeddings), frame-major; N = height * width
    ``height``/``width``  the grid of every frame (after Qwen's 2x2 merger / OneVision's 2x2 pooling)
    ``frames``      T (Qwen: temporal groups of ``temporal_patch_size`` frames)
    ``signals``     the captured vision signals the method asked for, each [T, N, ...] (names as in
                    :class:`VisualGroup`)
    ``project``     maps merged vision-space tokens [M, dv] to LLM embeddings [M, D]
    ``seed``        seed for stochastic methods, derived from the user's seed and the clip's place in its sample
    ``timestamps``  Tensor[T] seconds of each frame, or None when the inputs do not carry them

    A selection over the clip indexes the flattened clip: token ``n`` of frame ``t`` is ``t * N + n``.
    """

    features: torch.Tensor
    height: int
    width: int
    frames: int
    signals: dict[str, torch.Tensor] = field(default_factory=dict)
    project: Any = None
    seed: int = 0
    timestamps: torch.Tensor | None = None

    @property
    def tokens_per_frame(self) -> int:
        return self.features.shape[1]

    @property
    def num_tokens(self) -> int:
        return self.features.shape[0] * self.features.shape[1]

    def flat_features(self) -> torch.Tensor:
        """[T * N, D]: the clip's tokens in selection order."""
        return self.features.reshape(-1, self.features.shape[-1])


@dataclass
class Selection:
    """What a pre-LLM method returns for a group.

    ``keep``     LongTensor[k], ascending: indices (into the group) of the tokens kept as they are
    ``merged``   Tensor[m, D] or None: new tokens in LLM-embedding space
    ``anchors``  LongTensor[m]: index (into the group) whose position each merged token takes
    ``weights``  Tensor[m, N] or None: how each merged token combines the group's tokens (merged token j =
                 sum_i weights[j, i] * token i, in the space the method merges in). Lets per-token inputs that
                 the decoder receives besides the embeddings (Qwen3-VL's deepstack features) follow the
                 merge; a method that merges without weights cannot run on such a model.
    ``order``    LongTensor[m] or None: where each merged token goes relative to its anchor: < 0 right before the
                 token at the anchor, > 0 after it; merged tokens at the same anchor are sorted by this value,
                 then in the order the groups were selected. None: all 1 (right after the anchor).
    ``at_end``   BoolTensor[m] or None: merged tokens placed at the end of the image (anchored at its last
                 placeholder, structural ones included) instead of at their own anchor, e.g. tokens that the
                 official code appends after an AnyRes image's whole crop grid.
    """

    keep: torch.Tensor
    merged: torch.Tensor | None = None
    anchors: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    order: torch.Tensor | None = None
    at_end: torch.Tensor | None = None

    @property
    def num_merged(self) -> int:
        return 0 if self.merged is None else self.merged.shape[0]


class Method:
    """Base class of registered methods. Subclasses set the class attributes and implement ``select``."""

    name: ClassVar[str]
    stage: ClassVar[str] = PRE_LLM
    paper: ClassVar[str] = ""
    signals: ClassVar[tuple[str, ...]] = ()
    #: signals the method uses when the model's adapter provides them (captured only then; never required)
    optional_signals: ClassVar[tuple[str, ...]] = ()
    #: option name -> default value (papers' names)
    options: ClassVar[dict[str, Any]] = {}
    #: budget used when the user passes ``budget=None`` (None: the method derives its paper default itself)
    default_budget: ClassVar[int | float | None] = 64
    #: "per_crop": every crop / base image keeps the same fraction; "equal_per_crop": every crop / base image
    #: keeps the same number of tokens (capped by its size, the rest spread over the others) where each group is
    #: one crop (LLaVA-NeXT), else as "per_crop" (LLaVA-OneVision packs its crops into one group); "global": one
    #: selection over the image
    budget_policy: ClassVar[str] = "per_crop"
    #: the paper's position convention
    default_positions: ClassVar[str] = "original"
    #: whether a pre-LLM stage leaves exactly its budget of tokens (False: at most that many, e.g. pooling)
    exact_count: ClassVar[bool] = True
    #: how a pre-LLM stage meets a video: one of :data:`VIDEO_POLICIES` ("per_frame", "global", "clip")
    video_policy: ClassVar[str] = "per_frame"
    #: None when the method runs on videos, else the reason it cannot (raised, with the method's name, as
    #: :class:`~vtprune.errors.UnsupportedModelError` by the first forward that carries a video)
    video_unsupported: ClassVar[str | None] = None
    #: options that run this method's own stage alone, without its :meth:`companions` (tests check each stage
    #: against its own reference with them)
    solo: ClassVar[dict[str, Any]] = {}
    #: None, or why the method cannot prune an image (it refuses images with that reason; e.g. DyCoke's temporal
    #: merging needs frames)
    image_unsupported: ClassVar[str | None] = None

    def __init__(self, budget: Budget = None, positions: str | None = None, seed: int = 0, **options: Any):
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            accepted = ", ".join(sorted(self.options)) or "none"
            raise MethodOptionError(
                f"method {self.name!r} does not take option(s) {', '.join(unknown)}; "
                f"its options are: {accepted} (plus budget, positions, seed)."
            )
        if positions is None:
            positions = self.default_positions
        if positions not in POSITION_CONVENTIONS:
            raise MethodOptionError(
                f"positions={positions!r} is not a position convention; use one of {POSITION_CONVENTIONS}."
            )
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise MethodOptionError(f"seed must be an int, got {seed!r}.")
        validate_budget(budget)
        self.budget = self.default_budget if budget is None else budget
        self.positions = positions
        self.seed = seed
        self.config = {**self.options, **options}
        self._warned: set[str] = set()
        self.validate_options()
        self._warn_about_budget(explicit=budget is not None)

    def validate_options(self) -> None:
        """Hook for subclasses to check option values (raise MethodOptionError)."""

    def bind(self, tower: VisionTower) -> None:
        """Hook called when the method is installed on a model, before its signals are read: methods whose
        signals depend on the vision encoder (a block index scaled to its depth, CLS or not) set ``signals`` on
        the instance here, or refuse the model (raise UnsupportedModelError / MethodOptionError)."""

    def budget_overrides(self) -> list[str]:
        """Names of the options set on this instance that decide the kept count instead of the budget (e.g.
        FastV's ``ratio``); the user is warned when such an option meets an explicit budget."""
        return []

    def check_model(self, num_layers: int) -> None:
        """Hook called by ``vtprune.apply`` with the model's decoder depth, before anything is installed: refuse
        (MethodOptionError) options the model cannot honour, such as a pruning layer beyond the last layer."""

    def check_image_tokens(self, num_tokens: int) -> int:
        """Called by ``vtprune.apply`` when every image of the model has ``num_tokens`` visual tokens (a
        fixed-resolution model such as LLaVA-1.5), before anything is installed: warn once when this pre-LLM
        stage would keep all of them or fewer than :data:`FEW_TOKENS`, and return how many it keeps (kept plus
        merged). Subclasses refuse options that cannot fit (raise BudgetError / MethodOptionError)."""
        kept = tokens_for(self.budget, num_tokens)
        if kept >= num_tokens and self.budget != 1.0:
            self.warn_once(f"budget={self.budget!r} keeps all {num_tokens} visual tokens of every image of this "
                           "model: nothing is pruned; lower the budget.")
        elif kept < FEW_TOKENS <= num_tokens and not isinstance(self.budget, int):  # ints: warned when built
            self.warn_once(f"budget={self.budget!r} keeps {kept} of the {num_tokens} visual tokens of each image "
                           f"(fewer than {FEW_TOKENS}): the model barely sees the image; raise the budget.")
        return kept

    def warn_once(self, message: str) -> None:
        """A :class:`~vtprune.errors.DegeneratePruningWarning` naming the method, at most once per instance and
        message (a degenerate setting is reported, not repeated on every forward)."""
        if message in self._warned:
            return
        self._warned.add(message)
        warnings.warn(f"vtprune {self.name}: {message}", DegeneratePruningWarning, stacklevel=_caller_level())

    def _warn_about_budget(self, explicit: bool) -> None:
        """Settings known to be degenerate before any forward: an option that overrides an explicit budget, a
        pre-LLM token budget below :data:`FEW_TOKENS` per image."""
        overrides = self.budget_overrides()
        if explicit and overrides:
            shown = ", ".join(f"{name}={self.config[name]!r}" for name in overrides)
            self.warn_once(f"{shown} overrides budget={self.budget!r}: the kept count follows the option, not the "
                           f"budget; drop {' and '.join(overrides)} to prune to the budget, or drop the budget.")
        if self.stage == PRE_LLM and isinstance(self.budget, int) and self.budget < FEW_TOKENS:
            self.warn_once(f"budget={self.budget} keeps at most {self.budget} visual token(s) per image (fewer than "
                           f"{FEW_TOKENS}): the model barely sees the image; raise the budget.")

    def companions(self) -> list[Method]:
        """Further stages this method brings along (e.g. HoliTom's inner-LLM merge, DyCoke's decode-time KV
        pruning): ``vtprune.apply`` installs them right after it, as if they had been composed by hand. Called after
        :meth:`bind`, so the stages may depend on the model (FlowCut's decoder stage runs on AnyRes models only)."""
        return []

    def select(self, group: VisualGroup, k: int) -> Selection:
        raise NotImplementedError(f"{type(self).__name__} is an {self.stage} method without a pre-LLM select()")

    def select_clip(self, clip: VideoClip, k: int) -> Selection:
        """Methods with ``video_policy = "clip"``: keep ``k`` tokens of the whole clip (indices into T * N,
        frame-major; merge ``weights`` [m, T * N])."""
        raise NotImplementedError(f"{type(self).__name__} declares video_policy={self.video_policy!r} "
                                  "without a select_clip()")

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, "budget": self.budget, "positions": self.positions, "seed": self.seed,
                **self.config}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.describe().items() if k != "method")
        return f"{type(self).__name__}({opts})"


def _caller_level() -> int:
    """``stacklevel`` for a warning issued in :meth:`Method.warn_once`: the first frame outside vtprune, torch
    and transformers -- the user's line that called ``apply()``, the model or ``generate()``."""
    import transformers

    skipped = (_PACKAGE_DIR, os.path.dirname(torch.__file__) + os.sep,
               os.path.dirname(transformers.__file__) + os.sep)
    frame, level = sys._getframe(1), 1  # warn_once: level 1 of warnings.warn
    while frame is not None and frame.f_back is not None and frame.f_code.co_filename.startswith(skipped):
        frame, level = frame.f_back, level + 1
    return level


@dataclass(frozen=True)
class VisionTower:
    """What a method may know of the model it is installed on: the adapter's ``family``, the vision encoder's
    block count ``depth`` (None if unknown), the 0-based ``feature_layer`` whose output feeds the projector, and
    whether the encoder has a [CLS] token (``has_cls``)."""

    family: str
    depth: int | None
    feature_layer: int | None
    has_cls: bool


@dataclass(frozen=True)
class MethodInfo:
    name: str
    stage: str
    signals: tuple[str, ...]
    paper: str
    defaults: dict[str, Any]
    default_budget: int | float
    budget_policy: str
    positions: str
    summary: str
    video_policy: str = "per_frame"


_REGISTRY: dict[str, type[Method]] = {}

_POLICY_TEXT = {"per_crop": "per crop (proportional)", "equal_per_crop": "equal per crop", "global": "whole image"}


def methods_markdown(reachable: dict[str, str] | None = None) -> str:
    """The methods table of the README and of ``vtprune methods``, generated from the registry (one source):
    stage, how the budget is applied, default positions, option defaults, signals, paper. ``reachable``
    (method -> text) adds a column with each method's budget range on a given model."""
    infos = registered_methods()
    header = ["method", "stage", "budget applies", "positions", "options (defaults)", "signals", "paper"]
    if reachable is not None:
        header.append("reachable budgets")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for info in infos.values():
        applies = "layer average" if info.stage == "in-llm" else "per ViT input" if info.stage == IN_VIT \
            else "visual KV per decode step" if info.stage == DECODE \
            else _POLICY_TEXT.get(info.budget_policy, info.budget_policy)
        options = ", ".join(f"`{k}={v!r}`" for k, v in info.defaults.items()) or "–"
        cells = [f"`{info.name}`", info.stage, applies, info.positions, options,
                 ", ".join(info.signals) or "–", info.paper]
        if reachable is not None:
            cells.append(reachable.get(info.name, "–"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make a :class:`Method` subclass available by its ``name``."""
    name = getattr(cls, "name", None)
    if not name or not isinstance(name, str):
        raise TypeError(f"{cls.__name__} needs a class attribute `name` to be registered")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"a method named {name!r} is already registered ({_REGISTRY[name].__name__})")
    if getattr(cls, "video_policy", "per_frame") not in VIDEO_POLICIES:
        raise TypeError(f"{cls.__name__}.video_policy={cls.video_policy!r} is not one of {VIDEO_POLICIES}")
    _REGISTRY[name] = cls
    return cls


def method_class(name: str) -> type[Method]:
    _ensure_catalog_loaded()
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        close = difflib.get_close_matches(str(name), list(_REGISTRY), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UnknownMethodError(f"unknown method {name!r}.{hint} Known methods: {known}.") from None


def build_method(method: str | Method, budget: Budget = None, **kwargs: Any) -> Method:
    """A method instance from a registered name (or an instance, returned as is)."""
    if isinstance(method, Method):
        given = sorted(kwargs) + (["budget"] if budget is not None else [])
        if given:
            raise MethodOptionError(
                f"{method!r} is already a configured method object, so {', '.join(given)} would be ignored; "
                f"pass them when building it (vtprune.registry.build_method({method.name!r}, budget=..., ...)), "
                "or pass the method's name instead of the object."
            )
        return method
    if not isinstance(method, str):
        raise UnknownMethodError(
            f"method must be a registered name, a Method object or a list of them; got {type(method).__name__}."
        )
    return method_class(method)(budget=budget, **kwargs)


def registered_methods() -> dict[str, MethodInfo]:
    _ensure_catalog_loaded()
    out = {}
    for name, cls in sorted(_REGISTRY.items()):
        doc = (cls.__doc__ or "").strip().splitlines()
        out[name] = MethodInfo(
            name=name, stage=cls.stage, signals=tuple(cls.signals), paper=cls.paper, defaults=dict(cls.options),
            default_budget=cls.default_budget, budget_policy=cls.budget_policy, positions=cls.default_positions,
            summary=doc[0] if doc else "", video_policy=cls.video_policy,
        )
    return out


def _ensure_catalog_loaded() -> None:
    from . import catalog  # noqa: F401  (registers the built-in methods)
