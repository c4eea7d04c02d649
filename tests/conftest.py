"""Shared fixtures: tiny checkpoints built in the test (no downloads), the xp backends, GPU skip."""

from __future__ import annotations

import os

import numpy as np
import pytest

from ops.backend import gpu_available
from surgery import demo


def pytest_collection_modifyitems(config, items):
    if gpu_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device visible to CuPy")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _backends():
    wanted = os.environ.get("SURGERY_TEST_BACKENDS", "numpy,cupy").split(",")
    out = ["numpy"] if "numpy" in wanted else []
    if "cupy" in wanted and gpu_available():
        out.append("cupy")
    return out


@pytest.fixture(params=_backends())
def xp(request):
    """numpy always; cupy too when a GPU is present (SURGERY_TEST_BACKENDS selects)."""
    if request.param == "cupy":
        import cupy

        return cupy
    return np


@pytest.fixture
def tiny_ckpt(tmp_path):
    """Factory: ``tiny_ckpt(name="base", **kw)`` writes a tiny Llama checkpoint, returns its dir."""

    def make(name: str = "base", **kw):
        return demo.tiny_llama(tmp_path / name, **kw)

    return make


@pytest.fixture
def tiny_gpt2(tmp_path):
    def make(name: str = "gpt2", **kw):
        return demo.tiny_gpt2(tmp_path / name, **kw)

    return make
