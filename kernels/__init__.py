"""Attention over the compressed multi-scale KV cache, and fused token scoring (docs/design.md, Kernels).

Public ops share one signature across backends: :func:`kv_attention`, :func:`token_scores`;
:func:`resolve_backend` picks ``torch`` or ``triton`` once per run. Triton is imported only when the
``triton`` backend is used (``TRITON_INTERPRET=1`` before that runs the kernels on CPU).
"""
from kernels.dispatch import BACKENDS, kv_attention, resolve_backend, token_scores

__all__ = ["BACKENDS", "kv_attention", "resolve_backend", "token_scores"]
