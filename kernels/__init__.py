"""Attention over the compressed multi-scale KV cache, and fused token scoring (docs/design.md, Kernels).

Public ops share one signature across backends: :func:`kv_attention`, :func:`token_scores`;
:func:`resolve_backend` picks ``torch`` or ``triton`` once per run. Triton is imported only when the
``triton`` backend is used (``TRITON_INTERPRET=1`` before that runs the kernels on CPU). Importing
this package imports nothing heavy: the ops load :mod:`kernels.dispatch` (and torch) on first access,
so the storage-format vocabulary (:mod:`kernels.formats`) stays cheap to read.
"""
from __future__ import annotations

from typing import Any

__all__ = ["BACKENDS", "kv_attention", "resolve_backend", "token_scores"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from kernels import dispatch

        return getattr(dispatch, name)
    raise AttributeError(f"module 'kernels' has no attribute {name!r}")
