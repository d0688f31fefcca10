"""Shared fixtures: tiny models built once per test session, and a guard that un-prunes them after each test."""

from __future__ import annotations

import pytest
import torch

import vtprune
from vtprune.testing import tiny_vlm


class TinyModels:
    """Lazily built ``(model, processor)`` per family, shared by every test of the session."""

    def __init__(self) -> None:
        self._built: dict[str, tuple[torch.nn.Module, object]] = {}

    def __getitem__(self, family: str):
        if family not in self._built:
            self._built[family] = tiny_vlm(family, seed=0)
        return self._built[family]

    def models(self):
        return [model for model, _ in self._built.values()]


@pytest.fixture(scope="session", autouse=True)
def _single_thread():
    """The tiny models run in microseconds per op on one thread; with several OpenMP threads the per-op
    synchronisation dominates (on a 2-core CI box a tiny linear took ~15 ms instead of ~20 µs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_models() -> TinyModels:
    return TinyModels()


@pytest.fixture(scope="session")
def saved_tiny_llava(tmp_path_factory) -> str:
    """A tiny random LLaVA saved as an HF directory (stands in for a bundled micro-VLM)."""
    from vtprune.testing import tiny_vlm

    path = tmp_path_factory.mktemp("tiny-llava")
    model, processor = tiny_vlm("llava")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


@pytest.fixture(autouse=True)
def _unprune_shared_models(request):
    """A failing test must not leave pruning installed on a shared model (later tests would cascade)."""
    yield
    if "tiny_models" not in request.fixturenames:
        return
    for model in request.getfixturevalue("tiny_models").models():
        if vtprune.is_pruned(model):
            vtprune.remove(model)
