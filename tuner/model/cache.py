"""The KV cache of one generation run: preallocated from a plan, compacted per layer (docs/design.md,
Model engine and Memory).

Layout: per layer a persistent K and V buffer ``[rows, heads, C[l], head_dim]`` with
``C[l] = max_s budgets[l][s]``, in the layer's storage format (``plan.layer_formats``: the
compute dtype, or int8 / int4 plus fp16 scales, see :mod:`tuner.model.kv_store`), and one
workspace shared by all layers for the current scale's new K/V (``max_s n_s`` tokens, always in
the compute dtype). Attention of scale ``s`` at layer ``l`` reads the layer's kept tokens
plus the workspace; right after it, the policy chooses what the layer keeps and the buffer is
compacted in place — per layer, so the current scale never sits in every layer at once.

The ``full`` plan is laid out like the official code: every layer's buffer holds all ``L`` tokens
and the new tokens are written straight into it (no workspace).

A plan with per-head budgets (``plan.head_budgets``) packs each layer's heads without padding
(:mod:`tuner.model.head_cache`): the layers' buffers are :class:`~varkv_kernels.packed.PackedKV`, which
the attention function reads like any other buffer, and the keep step selects per head.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from tuner.model import kv_store
from tuner.model.head_cache import PackedLayers
from tuner.policies.base import CacheGeometry, CachePlan, KVPolicy, SelectionState

AttentionFn = Callable[..., torch.Tensor]
Observer = Callable[[int, int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


@dataclass(frozen=True)
class AttendRecord:
    """One attention call as the cache reports it, for audits (``KVCache(audit=...)``).

    q, k_new, v_new, out: ``[rows, heads, n_s, head_dim]``. kept_positions: ``[rows, heads, length]``
    int64 global token ids the cache says the layer held when scale ``scale`` attended (what a
    correct cache attends to besides the current scale's own tokens). kept_lens: per-head plans only,
    what each head held (``length = max``; ``kept_positions`` is ``-1`` after a head's own).
    """

    layer: int
    scale: int
    q: torch.Tensor
    k_new: torch.Tensor
    v_new: torch.Tensor
    kept_positions: torch.Tensor
    out: torch.Tensor
    softmax_scale: float
    kept_lens: tuple[int, ...] | None = None


Audit = Callable[[AttendRecord], None]


class KVCache:
    """Owner of all cache memory of a run; ``attend`` is the only entry point of attention.

    Parameters
    ----------
    plan, geometry: the policy's static budgets and the model's cache geometry.
    rows: sequences per forward (2 per image with classifier-free guidance).
    policy: called (``select``) whenever a layer (per-head plans: a head) keeps some but not all of its
        candidates.
    attention: ``kv_attention``-compatible function (see :mod:`kernels`); ``backend`` is passed on.
    observer: optional ``f(layer, scale, q, k_all, v_all, positions)`` for calibration statistics.
    audit: optional ``f(AttendRecord)`` after every attention call (the tests' compressed-engine oracle).
    """

    def __init__(self, plan: CachePlan, geometry: CacheGeometry, rows: int, dtype: torch.dtype,
                 device: torch.device | str, policy: KVPolicy, attention: AttentionFn,
                 backend: str = "torch", observer: Observer | None = None, check_selection: bool = True,
                 audit: Audit | None = None):
        plan.validate(geometry)
        self.plan, self.geometry, self.policy = plan, geometry, policy
        self.rows, self.dtype, self.device = rows, dtype, torch.device(device)
        self.attention, self.backend, self.observer, self.audit = attention, backend, observer, audit
        self.check_selection = check_selection
        g = geometry
        shape = (rows, g.num_heads)
        caps = [g.seq_len] * g.num_layers if plan.full else list(plan.capacities())
        self.formats = plan.layer_formats(g.num_layers)
        self.heads = PackedLayers(plan, g, rows, self.formats, dtype, self.device) if plan.per_head else None
        if self.heads is not None:
            self.k, self.v = self.heads.k, self.heads.v
        else:
            self.k = [kv_store.allocate(f, *shape, c, g.head_dim, dtype, device)
                      for f, c in zip(self.formats, caps)]
            self.v = [kv_store.allocate(f, *shape, c, g.head_dim, dtype, device)
                      for f, c in zip(self.formats, caps)]
        self.lens = [0] * g.num_layers  # per-head plans: the longest head's (``heads.head_lens``: each)
        if plan.full:
            self.ws_k = self.ws_v = None
            self.pos = None
        else:
            n_max = max(g.scale_lengths)
            self.ws_k = torch.empty(*shape, n_max, g.head_dim, dtype=dtype, device=device)
            self.ws_v = torch.empty(*shape, n_max, g.head_dim, dtype=dtype, device=device)
            # Global token ids of what each layer keeps (metadata, reported apart from KV bytes);
            # per-head plans keep theirs packed in ``heads``.
            self.pos = None if self.heads is not None else [
                torch.empty(*shape, c, dtype=torch.int32, device=device) for c in caps]
        self.scale = -1

    # ------------------------------------------------------------------ accounting
    @property
    def kv_bytes(self) -> int:
        """Bytes of every K/V buffer this cache allocated (layer buffers + workspace)."""
        total = sum(kv_store.nbytes(t) for t in (*self.k, *self.v))
        if self.ws_k is not None:
            total += 2 * self.ws_k.numel() * self.ws_k.element_size()
        return total

    @property
    def index_bytes(self) -> int:
        """Bytes of the kept-token id buffers (0 for the full layout; per-head: plus the head offsets)."""
        if self.heads is not None:
            return self.heads.index_bytes
        return sum(t.numel() * t.element_size() for t in self.pos) if self.pos else 0

    def kept_positions(self, layer: int) -> tuple[torch.Tensor, tuple[int, ...] | None]:
        """``(ids, lens)``: the global ids ``[rows, heads, n]`` int64 ``layer`` holds now and, for
        per-head plans, each head's count (ids ``-1`` after it; ``None``: every head holds ``n``)."""
        if self.heads is not None:
            return self.heads.kept_positions(layer), self.heads.head_lens[layer]
        return self._positions(layer, self.lens[layer])[:, :, :self.lens[layer]], None

    # ------------------------------------------------------------------ the hook
    def begin_scale(self, scale: int) -> None:
        self.scale = scale

    def _lens_tensor(self, length: int) -> torch.Tensor:
        return torch.full((self.rows, self.geometry.num_heads), length, dtype=torch.int32, device=self.device)

    def attend(self, layer: int, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
               softmax_scale: float) -> torch.Tensor:
        """Attention of the current scale at ``layer``, then the policy's keep decision.

        q, k_new, v_new: ``[rows, heads, n_s, head_dim]``. Returns ``[rows, heads, n_s, head_dim]``.
        """
        s, n = self.scale, k_new.shape[2]
        if n != self.geometry.scale_lengths[s]:
            raise ValueError(f"scale {s} has {self.geometry.scale_lengths[s]} tokens, got {n}")
        kb, vb, length = self.k[layer], self.v[layer], self.lens[layer]
        q = q.to(self.dtype)
        if self.plan.full and self.formats[layer] != "compute":
            # Official layout, quantized: the scale attends to its own tokens unquantized (they are
            # this forward's activations) and stores them quantized after attention.
            kn, vn = k_new.to(self.dtype), v_new.to(self.dtype)
        elif self.plan.full:
            kb[:, :, length:length + n].copy_(k_new)
            vb[:, :, length:length + n].copy_(v_new)
            kn, vn = kb[:, :, length:length + n], vb[:, :, length:length + n]
        else:
            self.ws_k[:, :, :n].copy_(k_new)
            self.ws_v[:, :, :n].copy_(v_new)
            kn, vn = self.ws_k[:, :, :n], self.ws_v[:, :, :n]
        if self.heads is not None:  # ragged per head: the buffers are packed, lengths per head
            out = self.attention(q, kb, vb, self.heads.lens(layer), kn, vn, softmax_scale,
                                 backend=self.backend, uniform_len=None)
        else:
            out = self.attention(q, kb, vb, self._lens_tensor(length), kn, vn, softmax_scale,
                                 backend=self.backend, uniform_len=length)
        if self.observer is not None:
            self._observe(layer, q, kn, vn, length)
        if self.audit is not None:
            kept, kept_lens = self.kept_positions(layer)
            self.audit(AttendRecord(layer, s, q, k_new, v_new, kept, out, softmax_scale, kept_lens))
        if self.heads is not None:
            self.heads.keep(layer, s, q, kn, vn, softmax_scale, self.backend, self.policy,
                            self.check_selection)
            self.lens[layer] = self.plan.budgets[layer][s]
        elif self.plan.full:
            if self.formats[layer] != "compute":
                kv_store.write(kb, length, kn)
                kv_store.write(vb, length, vn)
            self.lens[layer] = length + n
        else:
            self._keep(layer, q, kn, vn, length, softmax_scale)
        return out

    # ------------------------------------------------------------------ compaction
    def _positions(self, layer: int, length: int) -> torch.Tensor:
        start = self.geometry.scale_starts[self.scale]
        n = self.geometry.scale_lengths[self.scale]
        new = torch.arange(start, start + n, device=self.device, dtype=torch.int64)
        new = new.view(1, 1, n).expand(self.rows, self.geometry.num_heads, n)
        if self.pos is None:  # full layout: positions are 0..length-1
            old = torch.arange(length, device=self.device, dtype=torch.int64)
            old = old.view(1, 1, length).expand(self.rows, self.geometry.num_heads, length)
        else:
            old = self.pos[layer][:, :, :length].long()
        return torch.cat((old, new), dim=2)

    def _observe(self, layer: int, q, kn, vn, length: int) -> None:
        if self.heads is not None:  # the ragged candidates: per head a valid prefix, positions -1 after
            state = self.heads.state(layer, self.scale, q, kn, vn, 1.0, self.backend)
            self.observer(layer, self.scale, q, state.keys, state.values, state.positions)
            return
        if self.plan.full and self.formats[layer] == "compute":
            k_all = self.k[layer][:, :, :length + kn.shape[2]]
            v_all = self.v[layer][:, :, :length + vn.shape[2]]
        else:
            k_all = torch.cat((kv_store.read(self.k[layer], length, self.dtype), kn), dim=2)
            v_all = torch.cat((kv_store.read(self.v[layer], length, self.dtype), vn), dim=2)
        self.observer(layer, self.scale, q, k_all, v_all, self._positions(layer, length))

    def _keep(self, layer: int, q, kn, vn, length: int, softmax_scale: float) -> None:
        budget = self.plan.budgets[layer][self.scale]
        n = kn.shape[2]
        kb, vb, pos = self.k[layer], self.v[layer], self.pos[layer]
        if budget == length + n:  # keep everything: append the new scale
            kv_store.write(kb, length, kn)
            kv_store.write(vb, length, vn)
            start = self.geometry.scale_starts[self.scale]
            pos[:, :, length:budget] = torch.arange(start, start + n, device=self.device, dtype=torch.int32)
        elif budget > 0:
            state = SelectionState(
                layer=layer, scale=self.scale, budget=budget, geometry=self.geometry,
                positions=self._positions(layer, length), queries=q,
                k_old=kv_store.read(kb, length, self.dtype), v_old=kv_store.read(vb, length, self.dtype),
                k_new=kn, v_new=vn,
                softmax_scale=softmax_scale, backend=self.backend,
            )
            idx = self.policy.select(state)
            if self.check_selection:
                _check_indices(idx, budget, length + n, self.rows, self.geometry.num_heads, self.policy)
            if idx.dim() == 1:
                self._compact_shared(idx.to(self.device), layer, kn, vn, length, state.positions)
            else:
                self._compact_per_head(idx.to(self.device), layer, kn, vn, length, state.positions)
        self.lens[layer] = budget

    def _compact_shared(self, idx, layer, kn, vn, length, positions) -> None:
        pos = self.pos[layer]
        n_old = int((idx < length).sum())
        old, new = idx[:n_old], idx[n_old:] - length
        # Sorted indices: old survivors first, moved towards the front, then the chosen new tokens.
        kv_store.compact_shared(self.k[layer], old, kn[:, :, new])
        kv_store.compact_shared(self.v[layer], old, vn[:, :, new])
        pos[:, :, :idx.numel()] = positions[:, :, idx].to(torch.int32)

    def _compact_per_head(self, idx, layer, kn, vn, length, positions) -> None:
        k = idx.shape[-1]
        # Each (row, head) keeps its own tokens: gather from the candidates (transient copy).
        kv_store.compact_per_head(self.k[layer], length, kn, idx)
        kv_store.compact_per_head(self.v[layer], length, vn, idx)
        self.pos[layer][:, :, :k] = positions.gather(2, idx).to(torch.int32)


def _check_indices(idx: torch.Tensor, budget: int, n_cand: int, rows: int, heads: int, policy) -> None:
    name = type(policy).__name__
    if idx.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name}.select returned dtype {idx.dtype}, expected int64")
    if idx.dim() not in (1, 3) or idx.shape[-1] != budget or (idx.dim() == 3
                                                              and tuple(idx.shape[:2]) != (rows, heads)):
        raise ValueError(f"{name}.select returned shape {tuple(idx.shape)}, expected [{budget}] or "
                         f"[{rows}, {heads}, {budget}]")
    if budget and (int(idx.min()) < 0 or int(idx.max()) >= n_cand):
        raise ValueError(f"{name}.select returned indices outside [0, {n_cand})")
    if budget > 1 and not bool((idx[..., 1:] > idx[..., :-1]).all()):
        raise ValueError(f"{name}.select must return unique indices sorted ascending")
