"""vtprune: visual-token pruning for vision-language models.

    import vtprune
    model = vtprune.apply(model, "divprune", budget=64)
    out = model.generate(**inputs, max_new_tokens=32)
    print(vtprune.stats(model))
    vtprune.remove(model)
"""

from .api import apply, is_pruned, methods, pruned, remove, stats
from .errors import (
    BudgetError,
    DegeneratePruningWarning,
    MethodOptionError,
    SilentlyUnprunedError,
    UnknownMethodError,
    UnsupportedModelError,
    VTPruneError,
)
from .registry import Method, MethodInfo, Selection, VisualGroup, register_method
from .stats import PruneStats, SampleStats, StageStats

__version__ = "0.1.0"

__all__ = [
    "apply", "remove", "pruned", "methods", "stats", "is_pruned", "register_method", "Method", "MethodInfo",
    "Selection", "VisualGroup", "PruneStats", "SampleStats", "StageStats", "VTPruneError", "BudgetError",
    "UnknownMethodError", "UnsupportedModelError", "MethodOptionError", "SilentlyUnprunedError",
    "DegeneratePruningWarning", "__version__",
]
