"""Exceptions with messages that name the problem and the fix."""


class VTPruneError(ValueError):
    """Base class of every error vtprune raises for bad input."""


class UnknownMethodError(VTPruneError):
    pass


class BudgetError(VTPruneError):
    pass


class UnsupportedModelError(VTPruneError):
    pass


class MethodOptionError(VTPruneError):
    pass


class SilentlyUnprunedError(RuntimeError):
    """A pruned model got visual inputs but no pruning stage ran: it would have run unpruned without a word.
    Almost always a transformers internal that vtprune hooks into has changed. Not a bad-input error (not a
    VTPruneError): sweeps stop on it instead of recording a row."""


class DegeneratePruningWarning(UserWarning):
    """Pruning that runs but hardly means what was asked: a stage that keeps fewer than a handful of visual
    tokens per image, a budget that keeps every token, or an option that overrides the budget."""


class VideoError(VTPruneError):
    """A video that cannot be used: missing, unreadable, corrupt or empty file, or bad sampling arguments."""
