"""Budget semantics shared by every method.

* ``int``   — equivalent visual tokens **per image**: the visual tokens the LLM processes, averaged over its
  decoder layers (the 64/128/192 convention of the literature). For a single pre-LLM stage it is simply the
  number of kept (content) tokens of each image; structural tokens such as LLaVA-NeXT's row newlines are not
  counted and are kept for every row that still holds a token.
* ``float`` in (0, 1] — a fraction of each image's visual tokens.
* ``None``  — the method's paper default.

A **video** counts as one image whose visual tokens are the whole clip's: an int is the clip's (equivalent)
visual tokens, a float a fraction of them. Pre-LLM methods then spend it by their ``video_policy`` (split
evenly over the frames with :func:`split_equal`, or over the clip at once); in-LLM methods see the clip as one
span.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from .errors import BudgetError

Budget = int | float | None


def validate_budget(budget: Budget) -> Budget:
    """Check the type and range of a budget; return it unchanged."""
    if budget is None:
        return None
    if isinstance(budget, bool) or not isinstance(budget, int | float):
        raise BudgetError(
            f"budget must be an int (visual tokens per image), a float in (0, 1] (fraction of the visual "
            f"tokens) or None (the method's paper default); got {budget!r} of type {type(budget).__name__}."
        )
    if isinstance(budget, int):
        if budget <= 0:
            raise BudgetError(f"budget={budget} keeps no visual token; use a positive int such as 64.")
        return budget
    if not math.isfinite(budget) or not 0.0 < budget <= 1.0:
        raise BudgetError(
            f"budget={budget} is a fraction outside (0, 1]; use e.g. 0.25 to keep a quarter of the visual "
            f"tokens, or an int for an absolute number of tokens per image."
        )
    return float(budget)


def tokens_for(budget: int | float, num_tokens: int) -> int:
    """Number of tokens to keep out of ``num_tokens`` for a validated, non-None budget (at least 1)."""
    if num_tokens <= 0:
        return 0
    if isinstance(budget, int):
        return min(budget, num_tokens)
    return min(num_tokens, max(1, round(budget * num_tokens)))


def split_proportional(total: int, sizes: Sequence[int]) -> list[int]:
    """Split ``total`` over groups proportionally to ``sizes`` (largest remainder; sums to ``total``).

    Used by the per-crop budget policy: LLaVA-NeXT's base image and every crop keep the same fraction.
    No group gets more than its size.
    """
    whole = sum(sizes)
    if whole == 0:
        return [0 for _ in sizes]
    total = min(total, whole)
    exact = [total * s / whole for s in sizes]
    shares = [min(int(math.floor(e)), s) for e, s in zip(exact, sizes, strict=True)]
    # hand out the remainder by largest fractional part (ties: earlier group)
    order = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - shares[i]), i))
    remaining = total - sum(shares)
    for i in order:
        if remaining == 0:
            break
        if shares[i] < sizes[i]:
            shares[i] += 1
            remaining -= 1
    return shares


def split_equal(total: int, sizes: Sequence[int]) -> list[int]:
    """Split ``total`` into equal shares, one per group, whatever the groups' sizes (sums to ``min(total, sum)``).

    Used by the equal-per-crop budget policy (FasterVLM's official LLaVA-NeXT rule: the same top-k in the base
    image and in every crop). The remainder of the division goes to the earliest groups; a group smaller than
    its share keeps all its tokens and what it cannot take is shared equally over the others.
    """
    total = min(total, sum(sizes))
    shares = [0 for _ in sizes]
    open_groups = [i for i, s in enumerate(sizes) if s > 0]
    remaining = total
    while remaining and open_groups:
        base, extra = divmod(remaining, len(open_groups))
        for rank, i in enumerate(open_groups):
            give = min(base + (1 if rank < extra else 0), sizes[i] - shares[i])
            shares[i] += give
            remaining -= give
        open_groups = [i for i in open_groups if shares[i] < sizes[i]]
    return shares


#: default share of a composition's pre-LLM stage: it keeps this many times the budget
PRE_LLM_SHARE = 2


def split_composed_budget(budget: Budget, stages: Sequence[str]) -> list[Budget]:
    """Each stage's budget when one budget is given for a composition (stages: "in-vit" / "pre-llm" / "in-llm").

    Rule: each token-dropping stage before the last keeps twice what the next one keeps (int B → 2B tokens per
    image; fraction f → min(1, 2f), fractions of the image's tokens), and the in-LLM stage brings the
    layer-averaged visual count down to the budget (int B stays B, which in-LLM methods read as equivalent
    tokens per image; f becomes f / min(1, 2f) of what the earlier stages left). So [pre-LLM, in-LLM] gives the
    pre-LLM stage 2B, [in-ViT, pre-LLM] gives the in-ViT stage 2B and the pre-LLM stage B, and [in-ViT,
    pre-LLM, in-LLM] gives 4B, 2B, B. A single-stage list keeps the budget as is. Override with
    ``vtprune.apply(..., stage_budgets=[...])``.
    """
    validate_budget(budget)
    if len(stages) > 1 and "decode" in stages:  # a decode stage keeps its own default; the rest share the budget
        rest = split_composed_budget(budget, [s for s in stages if s != "decode"])
        return [None if stage == "decode" else rest.pop(0) for stage in stages]
    if budget is None or len(stages) < 2:
        return [budget for _ in stages]
    shares: list[Budget] = [None] * len(stages)
    after = budget  # what the following stage keeps, in the image's terms
    for i in range(len(stages) - 1, -1, -1):
        if i == len(stages) - 1:
            shares[i] = budget if stages[i] != "in-llm" else None
            continue
        after = PRE_LLM_SHARE * after if isinstance(after, int) else min(1.0, PRE_LLM_SHARE * after)
        shares[i] = after
    if stages[-1] == "in-llm":
        before = shares[-2]
        shares[-1] = budget if isinstance(budget, int) else budget / before
    return shares
