"""A policy inside the official VAR code:
``with tuner.apply_policy(var, policy): var.autoregressive_infer_cfg(...)``.

``var`` is an instance of the official ``models.var.VAR`` (FoundationVision/VAR), duck-typed: it has
``patch_nums`` and ``blocks[i].attn``, SelfAttention modules with ``kv_caching(enable)``,
``caching`` / ``cached_k`` / ``cached_v``, the fused ``mat_qkv`` with ``q_bias`` / ``zero_k_bias`` /
``v_bias``, ``attn_l2_norm`` (``scale_mul_1H11``, ``max_scale_mul``), ``scale`` and ``proj``.

While the ``with`` block runs, every attention module's ``forward`` and ``kv_caching`` are replaced
on the instance (the class is untouched). The official loop calls ``kv_caching(True)`` on every block
before its first scale: that starts a run. The first attention call of the run allocates one
:class:`~tuner.model.cache.KVCache` for its rows (2 per image with guidance), preallocated from the
policy's plan, so its bytes are exactly the planner's (:func:`tuner.memory.memory_report`, in the
run's dtype: the autocast dtype under autocast, else the weights'). Each attention call projects
q, k, v as the official code does and hands them to ``KVCache.attend``: attention over the layer's
kept tokens plus the scale's own, then the policy's keep decision and compaction (the engine's own
code, so images equal ``tuner generate --policy`` on the same weights and seeds). The n-th call of
layer ``l`` in a run is scale ``n``. ``kv_caching(False)`` ends the run and frees the cache; the
official ``cached_k`` / ``cached_v`` stay ``None`` throughout (the cache lives in the KVCache).

On exit, normal or by an exception, every patched instance attribute is put back as it was (or
removed, when the instance had none): ``forward``, ``kv_caching``, ``caching``, ``cached_k``,
``cached_v``. A policy for another model (depth, width, heads or patch_nums) is refused before
anything is patched. The official object has no checkpoint file, so the file's checkpoint hash is not
compared: apply a policy to the weights it was tuned on.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from tuner.errors import UserError
from tuner.geometry import CacheGeometry
from tuner.handles import Policy
from tuner.policies.base import CachePlan, KVPolicy, PolicySpec

_MISSING = object()
_PATCHED = ("forward", "kv_caching", "caching", "cached_k", "cached_v")
_ATTN_FIELDS = ("kv_caching", "num_heads", "head_dim", "mat_qkv", "q_bias", "v_bias", "zero_k_bias", "proj",
                "scale", "attn_l2_norm")


def official_geometry(var: Any) -> CacheGeometry:
    """The cache geometry of an official ``VAR`` object (layers, heads, head_dim, patch_nums)."""
    blocks = getattr(var, "blocks", None)
    fix = ("tuner.apply_policy needs an official models.var.VAR (blocks[i].attn SelfAttention modules with "
           "kv_caching, and patch_nums)")
    if blocks is None or not hasattr(var, "patch_nums") or len(blocks) == 0:
        raise UserError(f"{type(var).__name__} is not an official VAR model; {fix}")
    for i, block in enumerate(blocks):
        attn = getattr(block, "attn", None)
        missing = [f for f in _ATTN_FIELDS if not hasattr(attn, f)]
        if missing:
            raise UserError(f"{type(var).__name__}.blocks[{i}].attn lacks {', '.join(missing)}; {fix}")
    attn = blocks[0].attn
    patch_nums = tuple(int(p) for p in var.patch_nums)
    return CacheGeometry(len(blocks), int(attn.num_heads), int(attn.head_dim), patch_nums)


def _describe(g: CacheGeometry) -> str:
    return (f"depth {g.num_layers}, width {g.num_heads * g.head_dim} ({g.num_heads} heads of {g.head_dim}), "
            f"patch_nums {list(g.patch_nums)}")


def resolve_policy(policy: Any, geometry: CacheGeometry) -> tuple[KVPolicy, PolicySpec, str]:
    """``(policy object, spec, label)`` for a policy file path, a :class:`~tuner.handles.Policy` or a
    policy object; a file for another geometry is a one-line :class:`UserError`."""
    if isinstance(policy, (str, Path)):
        policy = Policy.from_file(policy)
    if isinstance(policy, Policy):
        if policy.geometry != geometry:
            raise UserError(f"{policy.path} is a policy for model {policy.spec.model_name} "
                            f"({_describe(policy.geometry)}), this VAR has {_describe(geometry)}; "
                            f"use a policy tuned for this model (tuner search --var-ckpt ... --vae-ckpt ...)")
        return policy.policy, policy.spec, policy.path
    if isinstance(policy, KVPolicy):
        return policy, PolicySpec(geometry), policy.family
    raise UserError(f"apply_policy got a {type(policy).__name__}; pass a policy file path, "
                    "tuner.load_policy(...) or a policy object")


class _Hooked:
    """What stands in for one attention module's method while the hooks are on (identifiable)."""

    def __init__(self, fn, layer: int, attn):
        self.fn, self.layer, self.attn = fn, layer, attn

    def __call__(self, *args, **kwargs):
        return self.fn(self.layer, self.attn, *args, **kwargs)


class _Run:
    """One ``autoregressive_infer_cfg`` call: its cache (allocated on the first attention call) and how
    many times each layer has attended (= the scale of its next call)."""

    def __init__(self, depth: int):
        self.cache = None
        self.calls = [0] * depth


class PolicyHooks:
    """The context manager :func:`apply_policy` returns (see the module docstring).

    After a run: ``kv_bytes_allocated`` (bytes of the K/V buffers it allocated: the planner's
    ``kv_bytes_total`` for its batch and dtype), ``index_bytes_allocated`` (kept-token ids), ``runs``.
    """

    def __init__(self, var: Any, policy: Any, *, backend: str = "auto", check_selection: bool = True):
        self.var = var
        self.geometry = official_geometry(var)
        self.policy, self.spec, self.label = resolve_policy(policy, self.geometry)
        try:
            self.plan: CachePlan = self.policy.plan(self.spec)
            self.plan.validate(self.geometry)
        except ValueError as exc:
            raise UserError(f"{self.label} cannot be planned for this VAR ({exc}); use a policy file made "
                            "for this model") from None
        self.backend, self.check_selection = backend, check_selection
        self.kv_bytes_allocated = self.index_bytes_allocated = self.runs = 0
        self._saved: list[tuple[Any, dict[str, Any]]] = []
        self._run: _Run | None = None

    # ------------------------------------------------------------------ patching
    def __enter__(self) -> "PolicyHooks":
        attns = [block.attn for block in self.var.blocks]
        for i, attn in enumerate(attns):
            if isinstance(attn.__dict__.get("forward"), _Hooked):
                raise UserError(f"blocks[{i}].attn is already under tuner.apply_policy; leave the outer "
                                "`with` before applying another policy")
        try:
            for layer, attn in enumerate(attns):
                self._saved.append((attn, {name: attn.__dict__.get(name, _MISSING) for name in _PATCHED}))
                attn.__dict__["forward"] = _Hooked(self._forward, layer, attn)
                attn.__dict__["kv_caching"] = _Hooked(self._kv_caching, layer, attn)
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, *exc) -> bool:
        self._restore()
        return False

    def _restore(self) -> None:
        for attn, saved in reversed(self._saved):
            for name, value in saved.items():
                if value is _MISSING:
                    attn.__dict__.pop(name, None)
                else:
                    attn.__dict__[name] = value
        self._saved.clear()
        self._run = None

    # ------------------------------------------------------------------ the hooked methods
    def _kv_caching(self, layer: int, attn, enable: bool) -> None:
        attn.caching, attn.cached_k, attn.cached_v = enable, None, None
        if enable and (self._run is None or self._run.cache is not None):
            self._run = _Run(self.geometry.num_layers)
        elif not enable and self._run is not None:
            self._run = None  # frees the cache

    def _forward(self, layer: int, attn, x, attn_bias=None):
        """``x`` ``[rows, n, C]`` → ``[rows, n, C]``, the official SelfAttention with our cache."""
        if not attn.caching or self._run is None:
            return type(attn).forward(attn, x, attn_bias)  # training / no cache: the official code
        if attn_bias is not None:
            raise ValueError("apply_policy: an attention mask while caching is not the official inference "
                             "loop")
        import torch
        import torch.nn.functional as F

        b, n, c = x.shape
        bias = torch.cat((attn.q_bias, attn.zero_k_bias, attn.v_bias))
        qkv = F.linear(input=x, weight=attn.mat_qkv.weight, bias=bias)
        qkv = qkv.view(b, n, 3, attn.num_heads, attn.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(dim=0)  # each [rows, heads, n, head_dim]
        if attn.attn_l2_norm:
            cap = getattr(attn, "max_scale_mul", None)
            if cap is None:
                cap = torch.log(torch.tensor(100.0)).item()
            q = F.normalize(q, dim=-1).mul(attn.scale_mul_1H11.clamp_max(cap).exp())
            k = F.normalize(k, dim=-1)
        out = self._attend(layer, q, k, v, float(attn.scale))
        out = attn.proj(out.transpose(1, 2).reshape(b, n, c))
        drop = getattr(attn, "proj_drop", None)
        return drop(out) if drop is not None else out

    def _attend(self, layer: int, q, k, v, softmax_scale: float):
        run = self._run
        scale = run.calls[layer]
        if scale >= self.geometry.num_scales:
            raise ValueError(f"apply_policy: layer {layer} attended more than the {self.geometry.num_scales} "
                             "scales of patch_nums in one run (call kv_caching(True) before each run)")
        if run.cache is None:
            run.cache = self._allocate(q, rows=q.shape[0])
        if run.cache.scale != scale:
            run.cache.begin_scale(scale)
        run.calls[layer] += 1
        return run.cache.attend(layer, q, k, v, softmax_scale)

    def _allocate(self, q, rows: int):
        """The run's cache, preallocated from the plan in the run's dtype (autocast's, else q's)."""
        import torch

        from varkv_kernels.dispatch import kv_attention
        from tuner.model.cache import KVCache
        from tuner.options import resolve_backend

        device = q.device
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else q.dtype
        backend = resolve_backend(self.backend, str(device))
        cache = KVCache(self.plan, self.geometry, rows=rows, dtype=dtype, device=device, policy=self.policy,
                        attention=kv_attention, backend=backend, check_selection=self.check_selection)
        self.kv_bytes_allocated, self.index_bytes_allocated = cache.kv_bytes, cache.index_bytes
        self.runs += 1
        return cache

    def memory(self, batch: int = 1, dtype: str = "fp16"):
        """The planner's :class:`~tuner.memory.MemoryReport` of this policy on this VAR (CFG rows)."""
        from tuner.memory import memory_report

        return memory_report(self.plan, self.geometry, dtype=dtype, batch=batch)


def apply_policy(var: Any, policy: Any, *, backend: str = "auto",
                 check_selection: bool = True) -> PolicyHooks:
    """Run the official ``VAR.autoregressive_infer_cfg`` under a KV-cache policy, inside a ``with``.

    var: an official ``models.var.VAR`` instance (see the module docstring for what is read).
    policy: a policy file path, :func:`tuner.load_policy`'s handle, or a policy object (planned
        against the bare geometry: families that need calibration want a file).
    backend: attention backend, ``auto`` (Triton on CUDA, PyTorch on CPU), ``torch`` or ``triton``.

    Returns the context manager; ``autoregressive_infer_cfg`` inside it returns the same
    ``[B, 3, H, W]`` images in [0, 1] as ``tuner.generate`` with this policy on the same weights,
    labels and seed. Raises :class:`UserError` (before patching anything) for a policy of another model.
    """
    return PolicyHooks(var, policy, backend=backend, check_selection=check_selection)
