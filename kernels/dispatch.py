"""Backend choice and the public ops: one signature, a PyTorch reference and a Triton kernel.

The caller resolves the backend once per run (:func:`resolve_backend`) and passes the resolved name
(``"torch"`` or ``"triton"``) on every call; the ops then only branch. Triton modules are imported
on the first Triton call, so the ``torch`` backend never imports triton.

The package (the ``kernels/`` folder, imported as ``varkv_kernels``) has no ``__init__``: a folder of
that name with one would shadow Hugging Face's ``kernels`` package that transformers imports
(docs/design.md, Kernels). Import the ops from here; :mod:`varkv_kernels.formats` (the storage-format
vocabulary) imports nothing heavy.
"""
from __future__ import annotations

import os

import torch

from varkv_kernels.packed import PackedKV
from varkv_kernels.quant import QuantizedKV
from varkv_kernels.reference import kv_attention_reference, token_scores_reference

BACKENDS = ("auto", "torch", "triton")
_NO_TRITON_ON_CPU = ("the triton backend needs a CUDA GPU, or TRITON_INTERPRET=1 set before start for the "
                     "CPU interpreter; use --attention-backend torch (or auto) otherwise")


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpreted() -> bool:
    """Whether this process's Triton kernels run in the CPU interpreter (imports the kernels)."""
    from varkv_kernels.attention import is_interpreted

    return is_interpreted()


def resolve_backend(name: str, device: str | torch.device) -> str:
    """Turn ``auto``/``torch``/``triton`` into the backend to run on ``device``.

    Parameters
    ----------
    name: ``"auto"`` (Triton on a CUDA device when triton is installed and not in interpreter mode,
        else the PyTorch reference), ``"torch"`` or ``"triton"``.
    device: where the tensors will live (``"cpu"``, ``"cuda"``, ``"cuda:1"``, a ``torch.device``).

    Returns
    -------
    ``"torch"`` or ``"triton"``.

    Raises
    ------
    ValueError: an unknown name, or ``triton`` where it cannot run (one-line message with the fix).
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; use one of {', '.join(BACKENDS)}")
    dev = torch.device(device)
    if name == "torch":
        return "torch"
    if name == "auto":
        if dev.type == "cuda" and _triton_importable() and not triton_interpreted():
            return "triton"
        return "torch"
    if not _triton_importable():
        raise ValueError("the triton backend needs the triton package (pip install triton); "
                         "use --attention-backend torch otherwise")
    if dev.type == "cuda":
        return "triton"
    if dev.type == "cpu" and triton_interpreted():
        return "triton"
    if dev.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1":
        # Set now, but the kernels were defined before: they stay compiled-GPU kernels.
        raise ValueError(_NO_TRITON_ON_CPU + " (TRITON_INTERPRET=1 was set after the kernels were imported)")
    raise ValueError(_NO_TRITON_ON_CPU)


def _default_backend(device: torch.device) -> str:
    return resolve_backend("auto", device)


def _check_attention_args(q, k_cache, v_cache, cache_lens, k_new, v_new) -> None:
    if q.dim() != 4:
        raise ValueError(f"q must be [R, H, Lq, D], got shape {tuple(q.shape)}")
    r, h, lq, d = q.shape
    for name, t in (("k_new", k_new), ("v_new", v_new)):
        if tuple(t.shape) != (r, h, lq, d):
            raise ValueError(f"{name} must have q's shape {(r, h, lq, d)}, got {tuple(t.shape)}")
    if isinstance(k_cache, PackedKV) or isinstance(v_cache, PackedKV):
        _check_packed(k_cache, v_cache, r, h, d)
        k_cache, v_cache = k_cache.store, v_cache.store  # checked below as [R, 1, T, D] buffers
    elif len(k_cache.shape) != 4 or tuple(k_cache.shape[:2]) != (r, h) or k_cache.shape[3] != d:
        raise ValueError(f"k_cache must be [{r}, {h}, C, {d}], got {tuple(k_cache.shape)}")
    if tuple(v_cache.shape) != tuple(k_cache.shape):
        raise ValueError(f"v_cache shape {tuple(v_cache.shape)} differs from k_cache {tuple(k_cache.shape)}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if isinstance(t, QuantizedKV):
            _check_quantized(name, t)
    if tuple(cache_lens.shape) != (r, h) or cache_lens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cache_lens must be int32 [{r}, {h}], got {cache_lens.dtype} "
                         f"{tuple(cache_lens.shape)}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("k_new", k_new), ("v_new", v_new)):
        if not isinstance(t, QuantizedKV) and t.dtype != q.dtype:
            raise ValueError(f"{name} dtype {t.dtype} differs from q's {q.dtype}")


def _check_packed(k_cache, v_cache, r: int, h: int, d: int) -> None:
    """Both caches packed with the same per-head capacities, stores ``[R, 1, Σ_h C_h, D]``."""
    if not (isinstance(k_cache, PackedKV) and isinstance(v_cache, PackedKV)):
        raise ValueError("k_cache and v_cache must both be PackedKV or neither")
    if k_cache.capacities != v_cache.capacities:
        raise ValueError(f"k_cache and v_cache have different head capacities: {k_cache.capacities} vs "
                         f"{v_cache.capacities}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.heads != h:
            raise ValueError(f"{name}: packed for {t.heads} heads, q has {h}")
        want = (r, 1, sum(t.capacities), d)
        if tuple(t.store.shape) != want:
            raise ValueError(f"{name}: packed store must be {list(want)} (rows, 1, Σ_h C_h, head_dim), got "
                             f"{tuple(t.store.shape)}")
        if tuple(t.offsets.shape) != (h + 1,) or t.offsets.dtype != torch.int32:
            raise ValueError(f"{name}: head offsets must be int32 [{h + 1}], got {t.offsets.dtype} "
                             f"{tuple(t.offsets.shape)}")


def _check_quantized(name: str, t: QuantizedKV) -> None:
    r, h, c, d = t.shape
    width = d // 2 if t.fmt == "int4" else d
    want = torch.uint8 if t.fmt == "int4" else torch.int8
    if tuple(t.data.shape) != (r, h, c, width) or t.data.dtype != want:
        raise ValueError(f"{name}: {t.fmt} data must be {want} [{r}, {h}, {c}, {width}], got {t.data.dtype} "
                         f"{tuple(t.data.shape)}")
    if (t.zero is None) != (t.fmt != "int4") or (t.zero is not None and t.zero.shape != t.scale.shape):
        raise ValueError(f"{name}: {t.fmt} needs {'a zero point' if t.fmt == 'int4' else 'no zero point'} "
                         "of the scale's shape")


def kv_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_lens: torch.Tensor,
                 k_new: torch.Tensor, v_new: torch.Tensor, softmax_scale: float, *,
                 backend: str | None = None, uniform_len: int | None = None) -> torch.Tensor:
    """Attention of a scale's queries over a compacted, ragged KV cache plus the scale's own tokens.

    Parameters
    ----------
    q: ``[R, H, Lq, D]`` queries of the current scale.
    k_cache, v_cache: ``[R, H, C, D]`` buffers (``C`` may be 0; any strides) in ``q``'s dtype, or
        :class:`~varkv_kernels.quant.QuantizedKV` (int8 / int4 plus fp16 scales, dequantized on read: in
        registers by the Triton kernel); the first ``cache_lens[r, h]`` tokens are valid. Or a pair of
        :class:`~varkv_kernels.packed.PackedKV` with per-head capacities ``C_h`` (store ``[R, 1, Σ_h C_h, D]``
        in either kind, the same capacities for K and V): head ``h`` reads the first
        ``min(cache_lens[r, h], C_h)`` tokens of its own segment.
    cache_lens: ``[R, H]`` int32, ragged per row and per head, 0 allowed.
    k_new, v_new: ``[R, H, Lq, D]`` the scale's own keys/values, all visible to all its queries.
    softmax_scale: multiplies ``q·kᵀ`` (1.0 for VAR, whose q carries the per-head scale).
    backend: ``"torch"`` or ``"triton"`` as returned by :func:`resolve_backend`; ``None`` resolves
        ``"auto"`` for ``q``'s device on each call.
    uniform_len: optional promise that every ``cache_lens`` entry equals it (torch backend: skips
        the equality check; Triton ignores it).

    Returns
    -------
    ``[R, H, Lq, D]`` in ``q``'s dtype: softmax(q·kᵀ·scale)·v over [valid cache ; new tokens].
    """
    _check_attention_args(q, k_cache, v_cache, cache_lens, k_new, v_new)
    backend = backend or _default_backend(q.device)
    if backend == "torch":
        return kv_attention_reference(q, k_cache, v_cache, cache_lens, k_new, v_new, softmax_scale,
                                      uniform_len=uniform_len)
    if backend == "triton":
        from varkv_kernels.attention import kv_attention_triton

        return kv_attention_triton(q, k_cache, v_cache, cache_lens, k_new, v_new, softmax_scale)
    raise ValueError(f"backend must be 'torch' or 'triton' (see resolve_backend), got {backend!r}")


def token_scores(q_obs: torch.Tensor, keys: torch.Tensor, key_lens: torch.Tensor, softmax_scale: float, *,
                 pool_kernel: int = 0, backend: str | None = None) -> torch.Tensor:
    """Attention mass an observation window of queries puts on each candidate key (ScaleKV scoring).

    Parameters
    ----------
    q_obs: ``[R, H, W, D]`` observation-window queries.
    keys: ``[R, H, N, D]`` candidate keys; the first ``key_lens[r, h]`` are valid.
    key_lens: ``[R, H]`` int32.
    softmax_scale: multiplies ``q·kᵀ`` before the softmax.
    pool_kernel: 0 or 1 for none, else an odd width of a stride-1 same-padded max-pool along N
        over the valid keys.
    backend: as for :func:`kv_attention`.

    Returns
    -------
    ``[R, H, N]`` fp32: ``sum_w softmax_n(q_w·k_n·scale)``, each query's softmax normalized over the
    valid keys; ``-inf`` at invalid positions.
    """
    if q_obs.dim() != 4 or keys.dim() != 4 or tuple(keys.shape[:2]) != tuple(q_obs.shape[:2]) \
            or keys.shape[3] != q_obs.shape[3]:
        raise ValueError(f"q_obs [R, H, W, D] and keys [R, H, N, D] disagree: {tuple(q_obs.shape)} vs "
                         f"{tuple(keys.shape)}")
    if keys.dtype != q_obs.dtype:
        raise ValueError(f"keys dtype {keys.dtype} differs from q_obs's {q_obs.dtype}")
    if tuple(key_lens.shape) != tuple(q_obs.shape[:2]) or key_lens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"key_lens must be int32 {list(q_obs.shape[:2])}, got {key_lens.dtype} "
                         f"{tuple(key_lens.shape)}")
    if pool_kernel < 0 or (pool_kernel > 1 and pool_kernel % 2 == 0):
        raise ValueError(f"pool_kernel must be 0, 1 or an odd width, got {pool_kernel}")
    backend = backend or _default_backend(keys.device)
    if backend == "torch":
        return token_scores_reference(q_obs, keys, key_lens, softmax_scale, pool_kernel=pool_kernel)
    if backend == "triton":
        from varkv_kernels.scoring import token_scores_triton

        return token_scores_triton(q_obs, keys, key_lens, softmax_scale, pool_kernel=pool_kernel)
    raise ValueError(f"backend must be 'torch' or 'triton' (see resolve_backend), got {backend!r}")
