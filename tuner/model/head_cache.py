"""The per-head half of :class:`~tuner.model.cache.KVCache`: layers whose heads keep different numbers
of tokens (``CachePlan.head_budgets``; docs/design.md, Model engine and Memory).

Layout: per layer a K and a V :class:`~varkv_kernels.packed.PackedKV` of ``Σ_h C[l][h]`` tokens per row in
the layer's storage format (``C[l][h] = max_s head_budgets[l][s][h]``, no padding to the largest
head), one int32 ``[H + 1]`` offsets tensor shared by K, V and the kept-token ids, and the ids
themselves packed the same way. The workspace for the current scale's new K/V stays the cache's
(``[R, H, max_s n_s, D]``). Head ``h`` holds ``head_budgets[l][s-1][h]`` tokens when scale ``s``
attends; right after, the policy chooses per head (ragged :class:`~tuner.policies.base.SelectionState`)
and every head is compacted into its own segment in one gather per buffer part.
"""
from __future__ import annotations

import torch

from varkv_kernels.packed import PackedKV
from tuner.model import kv_store
from tuner.policies.base import CacheGeometry, CachePlan, KVPolicy, SelectionState


class PackedLayers:
    """Packed per-head buffers of every layer, their current per-head lengths, and compaction."""

    def __init__(self, plan: CachePlan, geometry: CacheGeometry, rows: int, formats: tuple[str, ...],
                 dtype: torch.dtype, device: torch.device):
        g, h = geometry, geometry.num_heads
        self.plan, self.geometry, self.rows, self.dtype, self.device = plan, g, rows, dtype, device
        self.k, self.v, self.pos = [], [], []
        for layer, fmt in enumerate(formats):
            caps = plan.head_capacities(layer, h)
            k = kv_store.allocate_heads(fmt, rows, caps, g.head_dim, dtype, device)
            self.k.append(k)
            self.v.append(kv_store.allocate_heads(fmt, rows, caps, g.head_dim, dtype, device, k.offsets))
            # Global token ids of what each head keeps (metadata, reported apart from KV bytes).
            ids = torch.empty(rows, 1, sum(caps), dtype=torch.int32, device=device)
            self.pos.append(PackedKV(ids, k.offsets, caps))
        self.head_lens = [(0,) * h for _ in range(g.num_layers)]
        self._lens_t = [self._lens_tensor((0,) * h) for _ in range(g.num_layers)]

    @property
    def index_bytes(self) -> int:
        """Kept-token ids plus one offsets tensor per layer."""
        return sum(p.store.numel() * 4 + p.offsets.numel() * 4 for p in self.pos)

    def _lens_tensor(self, lens: tuple[int, ...]) -> torch.Tensor:
        t = torch.tensor(lens, dtype=torch.int32, device=self.device)
        return t.view(1, -1).expand(self.rows, -1).contiguous()

    def lens(self, layer: int) -> torch.Tensor:
        """``[R, H]`` int32: what each head of ``layer`` holds now (built once per compaction)."""
        return self._lens_t[layer]

    def kept_positions(self, layer: int) -> torch.Tensor:
        """``[R, H, max_h len]`` int64 global ids each head of ``layer`` holds, ``-1`` after its own."""
        lens = self.head_lens[layer]
        out = torch.full((self.rows, self.geometry.num_heads, max(lens)), -1, dtype=torch.int64,
                         device=self.device)
        for h, n in enumerate(lens):
            if n:
                out[:, h, :n] = self.pos[layer].segment(h, n)[:, 0].long()
        return out

    def candidate_positions(self, layer: int, scale: int) -> torch.Tensor:
        """``[R, H, max_h len + n_s]`` int64: per head its kept ids then the scale's, ``-1`` after them
        (the ragged candidate axis of :class:`SelectionState`)."""
        g, lens = self.geometry, self.head_lens[layer]
        start, n = g.scale_starts[scale], g.scale_lengths[scale]
        out = torch.full((self.rows, g.num_heads, max(lens) + n), -1, dtype=torch.int64, device=self.device)
        new = torch.arange(start, start + n, dtype=torch.int64, device=self.device)
        for h, o in enumerate(lens):
            if o:
                out[:, h, :o] = self.pos[layer].segment(h, o)[:, 0].long()
            out[:, h, o:o + n] = new
        return out

    def state(self, layer: int, scale: int, q, kn, vn, softmax_scale: float, backend: str) -> SelectionState:
        """The ragged selection state of ``layer`` after ``scale``'s attention (old K/V dequantized)."""
        g, lens = self.geometry, self.head_lens[layer]
        keep = self.plan.head_budget(layer, scale, g.num_heads)
        return SelectionState(
            layer=layer, scale=scale, budget=max(keep), geometry=g,
            positions=self.candidate_positions(layer, scale), queries=q,
            k_old=kv_store.read_heads(self.k[layer], lens, self.dtype),
            v_old=kv_store.read_heads(self.v[layer], lens, self.dtype), k_new=kn, v_new=vn,
            softmax_scale=softmax_scale, backend=backend, head_budgets=keep, old_lens=lens)

    def keep(self, layer: int, scale: int, q, kn, vn, softmax_scale: float, backend: str, policy: KVPolicy,
             check: bool) -> None:
        """Ask the policy (when some head keeps some but not all of its candidates) and compact."""
        g, old = self.geometry, self.head_lens[layer]
        keep = self.plan.head_budget(layer, scale, g.num_heads)
        n = kn.shape[2]
        cand = tuple(o + n for o in old)
        if all(k in (0, c) for k, c in zip(keep, cand)):
            # Nothing to choose: every head keeps all its candidates or none.
            j = torch.arange(max(keep), dtype=torch.int64, device=self.device)
            idx = j.view(1, 1, -1).expand(self.rows, g.num_heads, -1)
        else:
            state = self.state(layer, scale, q, kn, vn, softmax_scale, backend)
            idx = policy.select(state).to(self.device)
            if check:
                idx = check_head_indices(idx, keep, cand, old, self.rows, policy)
            elif idx.dim() == 1:
                idx = idx.view(1, 1, -1).expand(self.rows, g.num_heads, -1)
        if max(keep):
            moves = kv_store.head_moves(self.k[layer], old, n, idx, keep)
            kv_store.compact_heads(self.k[layer], kn, moves)
            kv_store.compact_heads(self.v[layer], vn, moves)
            start = g.scale_starts[scale]
            new_ids = torch.arange(start, start + n, dtype=torch.int32, device=self.device)
            kv_store.compact_heads(self.pos[layer], new_ids.expand(self.rows, g.num_heads, n), moves)
        self.head_lens[layer] = keep
        self._lens_t[layer] = self._lens_tensor(keep)


def check_head_indices(idx: torch.Tensor, keep: tuple[int, ...], cand: tuple[int, ...], old: tuple[int, ...],
                       rows: int, policy) -> torch.Tensor:
    """``ValueError`` unless ``idx`` answers a ragged selection (see ``KVPolicy.select``); returns it as
    ``[R, H, k_max]`` (a ``[k]`` answer, allowed when all heads are alike, expanded)."""
    name, heads, k_max = type(policy).__name__, len(keep), max(keep)
    if idx.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name}.select returned dtype {idx.dtype}, expected int64")
    alike = len(set(keep)) == 1 and len(set(old)) == 1
    if idx.dim() == 1 and alike and idx.shape[0] == k_max:
        idx = idx.view(1, 1, -1).expand(rows, heads, -1)
    if idx.dim() != 3 or tuple(idx.shape) != (rows, heads, k_max):
        raise ValueError(f"{name}.select returned shape {tuple(idx.shape)}, expected [{rows}, {heads}, "
                         f"{k_max}] under per-head budgets {list(keep)} (head h's first budgets[h] entries)")
    j = torch.arange(k_max, device=idx.device)
    used = j.view(1, -1) < torch.tensor(keep, device=idx.device).view(-1, 1)  # [H, k_max]
    limit = torch.tensor(cand, device=idx.device).view(1, -1, 1)
    if not bool((((idx >= 0) & (idx < limit)) | ~used).all()):
        raise ValueError(f"{name}.select returned indices outside a head's candidates "
                         f"(per head: {list(cand)})")
    if k_max > 1 and not bool(((idx[..., 1:] > idx[..., :-1]) | ~used[:, 1:]).all()):
        raise ValueError(f"{name}.select must return unique indices sorted ascending in each head's first "
                         "head_budgets[h] entries")
    return idx.long()
