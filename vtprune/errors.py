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
