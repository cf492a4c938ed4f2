"""Kernel tests: Triton runs in the CPU interpreter when no GPU is visible.

``TRITON_INTERPRET=1`` has to be in the environment before ``varkv_kernels.attention`` /
``varkv_kernels.scoring`` define their ``@triton.jit`` kernels, so it is set here, before any kernel
module is imported (the top-level ``tests/conftest.py`` does the same for the whole session).
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture
def triton_device() -> str:
    """Device the Triton tests run on: the GPU when there is one, else the CPU interpreter."""
    pytest.importorskip("triton")
    from varkv_kernels.dispatch import triton_interpreted

    if torch.cuda.is_available() and not triton_interpreted():
        return "cuda"
    if not triton_interpreted():
        pytest.skip("Triton kernels were defined without TRITON_INTERPRET=1 and there is no GPU")
    return "cpu"
