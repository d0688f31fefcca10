"""Optional timing of the engine's own work, for the benchmark (``vtprune.bench.latency``).

The engine brackets two kinds of work with :func:`section`:

* ``"select"``  the method's selection itself: ``Method.select`` for pre-LLM methods, ``LayerMethod.score``
  plus the top-k for in-LLM methods, the matching / scoring inside each vision block for in-ViT methods;
* ``"engine"``  everything the engine adds to a prefill (locating the visual tokens, planning, the calls to
  the method, gathering the kept tokens, positions, masks); it contains ``"select"``.

A session's ``timer`` is None unless a benchmark sets it, and then :func:`section` is a no-op
(``contextlib.nullcontext``), so the hook costs one attribute test per call. A timer is any object with a
``section(name)`` method returning a context manager (see :class:`vtprune.bench.latency.SectionClock`).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

_NULL = nullcontext()


def section(timer: Any, name: str) -> AbstractContextManager:
    """``timer.section(name)``, or a no-op context when ``timer`` is None."""
    return _NULL if timer is None else timer.section(name)
