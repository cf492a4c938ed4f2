"""Budget arithmetic and token-selection rules shared by the policy families.

Budget helpers work on a :class:`~tuner.policies.base.CacheGeometry` and return plain ints, so plans
are computed without torch. Selection helpers take a :class:`~tuner.policies.base.SelectionState`
and return what ``KVPolicy.select`` must return: int64 indices into the candidates (the layer's kept
tokens followed by the current scale's tokens), unique and sorted ascending, exactly
``state.budget`` of them, shaped ``[k]`` (shared by all rows and heads) or ``[R, H, k]``.

Every rule also works per head under per-head budgets (``state.ragged``, see
:class:`~tuner.policies.base.SelectionState`): head ``h`` applies the rule to its own ``n_h``
candidates with its own budget ``k_h`` and the answer is ``[R, H, max_h k_h]``, each head's choice
first in its rows, the tail filled with 0 (ignored by the engine, but in range for any gather). On a
state whose heads are all alike, the per-head answer holds the same tokens as the uniform one.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

from tuner.policies.base import CacheGeometry

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from tuner.policies.base import SelectionState

SELECTION_RULES = ("recent", "sink_recent", "scores")


def rule_description(rule: str, *, sink_tokens: int = 0, window_size: int = 16, pool_kernel: int = 5) -> dict:
    """The canonical description of :func:`select_by_rule`'s behaviour (``KVPolicy.selection``): only
    the arguments the rule reads, so families that select alike describe it alike."""
    if rule == "recent":
        return {"rule": "recent"}
    if rule == "sink_recent":
        return {"rule": "sink_recent", "sink_tokens": int(sink_tokens)}
    if rule == "scores":
        return {"rule": "scores", "window_size": int(window_size), "pool_kernel": int(pool_kernel)}
    raise ValueError(f"unknown selection rule {rule!r}; known: {', '.join(SELECTION_RULES)}")


# ---------------------------------------------------------------------------------------- budgets
def round_half_up(x: float) -> int:
    """Round to the nearest int, halves up (Python's ``round`` rounds halves to even)."""
    return int(math.floor(x + 0.5))


def kept_scales_tokens(geometry: CacheGeometry, scale: int, window: int, sink_scales: int = 0) -> int:
    """Tokens of scales ``{0..sink_scales-1} ∪ {scale-window+1..scale}`` (only scales ``<= scale``)."""
    kept = set(range(min(sink_scales, scale + 1))) | set(range(max(0, scale - window + 1), scale + 1))
    return sum(geometry.scale_lengths[i] for i in kept)


def scale_window_row(geometry: CacheGeometry, window: int, sink_scales: int = 0,
                     cap: int | None = None) -> tuple[int, ...]:
    """Budgets of one layer that keeps its sink scales and the last ``window`` scales, at most ``cap`` tokens.

    The last scale's budget is 0: no later scale reads it. The row is always valid: the kept set of
    scale ``s`` is a subset of the kept set of ``s-1`` plus scale ``s`` itself.
    """
    row = []
    for s in range(geometry.num_scales - 1):
        b = kept_scales_tokens(geometry, s, window, sink_scales)
        row.append(b if cap is None else min(b, cap))
    return tuple(row) + (0,)


def clip_row(geometry: CacheGeometry, wanted: Sequence[int]) -> tuple[int, ...]:
    """Clip wanted budgets to what the layer can hold: ``0 <= b[s] <= min(T_s, b[s-1] + n_s)``."""
    out, prev = [], 0
    for s, w in enumerate(wanted):
        b = max(0, min(int(w), geometry.tokens_through(s), prev + geometry.scale_lengths[s]))
        out.append(b)
        prev = b
    return tuple(out)


def share_budget(total: int, caps: Sequence[int]) -> list[int]:
    """Split ``total`` tokens as evenly as possible with item ``i`` getting at most ``caps[i]``.

    Water-filling: items with small caps are saturated first and their surplus goes to the others.
    Deterministic (ties by index; the last items in cap order take the rounding remainder). The
    result sums to ``min(total, sum(caps))``.
    """
    out = [0] * len(caps)
    remaining = max(0, int(total))
    order = sorted(range(len(caps)), key=lambda i: (caps[i], i))
    for rank, i in enumerate(order):
        give = min(int(caps[i]), remaining // (len(caps) - rank))
        out[i] = give
        remaining -= give
    return out


def check_int(name: str, value, low: int, allow_none: bool = False) -> None:
    """``ValueError`` unless ``value`` is an int ``>= low`` (or ``None`` when allowed)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def check_fraction(name: str, value, low_open: bool = True, allow_none: bool = False) -> None:
    """``ValueError`` unless ``value`` is a number in ``(0, 1]`` (``[0, 1]`` with ``low_open=False``)."""
    if value is None and allow_none:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value > 1 or value < 0 or (low_open and value == 0):
        interval = "(0, 1]" if low_open else "[0, 1]"
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")


def check_pool_kernel(value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0 or (value > 0 and value % 2 == 0):
        raise ValueError(f"pool_kernel must be 0 (no pooling) or an odd integer >= 1, got {value!r}")


# ---------------------------------------------------------------------------------------- selection
def head_counts(state: "SelectionState") -> tuple["torch.Tensor", "torch.Tensor"]:
    """``(k, n)``: per-head budgets and candidate counts as int64 ``[H]`` tensors (ragged states)."""
    import torch

    dev = state.positions.device
    return (torch.tensor(state.head_budgets, dtype=torch.int64, device=dev),
            torch.tensor(state.candidate_lens, dtype=torch.int64, device=dev))


def _finish(idx: "torch.Tensor", k: "torch.Tensor") -> "torch.Tensor":
    """Zero the tail (``j >= k_h``) of per-head choices ``[..., H, k_max]``."""
    import torch

    j = torch.arange(idx.shape[-1], device=idx.device)
    return torch.where(j < k.unsqueeze(-1), idx, 0)


def recent_indices(state: "SelectionState") -> "torch.Tensor":
    """``[k]``: the ``budget`` most recent candidates (candidates are ordered by position).

    Ragged: ``[R, H, k_max]``, head ``h`` its ``k_h`` most recent of its ``n_h``.
    """
    import torch

    n, k = state.n_candidates, state.budget
    if state.ragged:
        kh, nh = head_counts(state)
        j = torch.arange(k, dtype=torch.int64, device=kh.device)
        idx = _finish(j + (nh - kh).unsqueeze(-1), kh)  # [H, k]
        return idx.expand(state.positions.shape[0], -1, -1)
    return torch.arange(n - k, n, dtype=torch.int64, device=state.positions.device)


def sink_recent_indices(state: "SelectionState", sink_tokens: int) -> "torch.Tensor":
    """Sink tokens (global position ``< sink_tokens``) first, then the most recent candidates.

    Candidates are sorted by position, so the sinks are a prefix: slot ``j`` of the ``k`` kept ones is
    candidate ``j`` while ``j < a`` (``a`` = sinks present, at most ``k``), else ``n - k + j``.
    Returns ``[k]`` when every row and head has the same number of sinks (the usual case), else
    ``[R, H, k]``.
    """
    import torch

    n, k = state.n_candidates, state.budget
    if state.ragged:  # per head: the sinks among its valid candidates, its own k_h and n_h
        kh, nh = head_counts(state)
        pos = state.positions
        a = ((pos >= 0) & (pos < sink_tokens)).sum(dim=-1)
        a = torch.minimum(a, kh.view(1, -1)).unsqueeze(-1)  # [R, H, 1]
        j = torch.arange(k, dtype=torch.int64, device=pos.device)
        return _finish(torch.where(j < a, j, j + (nh - kh).view(1, -1, 1)), kh)
    a = (state.positions < sink_tokens).sum(dim=-1).clamp(max=k)  # [R, H]
    j = torch.arange(k, dtype=torch.int64, device=state.positions.device)
    if bool((a == a.flatten()[0]).all()):
        a0 = int(a.flatten()[0])
        return torch.where(j < a0, j, j + (n - k))
    a = a.unsqueeze(-1)
    return torch.where(j < a, j, j + (n - k))


def observation_window(shape: int | tuple[int, int], n_new: int, window_size: int) -> list[int]:
    """Current-scale tokens whose queries score the candidates (ScaleKV's observation window).

    ``shape``: the current map, ``(h, w)`` (or its side when square; ``n_new = h·w``). Small maps
    (``n_new <= window_size``) use all their tokens. Otherwise a ``g × g`` grid (``g =
    isqrt(window_size)``) spread over the ``h × w`` map: rows are cut into ``g`` bands of ``h // g``
    and columns into ``g`` of ``w // g``, and the centre cell of each patch is taken, as in the
    released ScaleKV code (square maps); a side shorter than ``g`` gives each of its rows (columns)
    one band. If fewer than ``window_size`` cells are chosen the most recent unused tokens pad the
    window. Returns sorted raster indices into the current scale.
    """
    if n_new <= window_size:
        return list(range(n_new))
    h, w = (shape, shape) if isinstance(shape, int) else shape
    g = math.isqrt(window_size)

    def centres(side: int) -> list[int]:
        cell = max(1, side // g)
        return [i * cell + (cell - 1) // 2 for i in range(min(g, side))]

    chosen = {r * w + c for r in centres(h) for c in centres(w)}
    pad = n_new - 1
    while len(chosen) < window_size:
        if pad not in chosen:
            chosen.add(pad)
        pad -= 1
    return sorted(chosen)


def score_indices(state: "SelectionState", window_size: int = 16, pool_kernel: int = 5) -> "torch.Tensor":
    """``[R, H, k]``: per (row, head) top-``k`` candidates by observation-window attention mass.

    Window queries (:func:`observation_window`) attend to all candidates with the true softmax
    (``varkv_kernels.dispatch.token_scores``: attention mass per candidate summed over the window queries, 1-D
    max-pooled with ``pool_kernel`` over the candidate order). The window's own tokens are always
    kept (when the budget is smaller than the window, the best-scored window tokens).
    """
    import torch

    scores, cols = window_scores(state, window_size, pool_kernel)
    # Scores are attention masses (>= 0): lifting the window above the maximum keeps it first in
    # the ranking while preserving its internal order.
    lift = scores.amax(dim=-1, keepdim=True) + 1.0
    if not state.ragged:
        scores[..., cols] = scores[..., cols] + lift
        return scores.topk(state.budget, dim=-1).indices.sort(dim=-1).values.to(torch.int64)
    r, h = scores.shape[:2]
    scores.scatter_add_(2, cols.expand(r, h, -1), lift.expand(r, h, cols.shape[-1]))
    return top_per_head(state, scores)


def window_scores(state: "SelectionState", window_size: int = 16,
                  pool_kernel: int = 5) -> tuple["torch.Tensor", "torch.Tensor"]:
    """``(scores [R, H, n] fp32, cols)``: the observation window's attention mass on every candidate
    (ragged: ``-inf`` after each head's valid prefix) and the window's candidate columns (``[W]``, or
    ``[H, W]`` when ragged: each head's window sits after its own old tokens)."""
    import torch
    from varkv_kernels.dispatch import token_scores

    r, h = state.queries.shape[:2]
    shape = state.geometry.shapes[state.scale]
    win = torch.tensor(observation_window(shape, state.n_new, window_size), dtype=torch.int64,
                       device=state.queries.device)
    q_obs = state.queries.index_select(2, win)
    keys = state.keys
    if state.ragged:
        _, nh = head_counts(state)
        key_lens = nh.to(torch.int32).view(1, -1).expand(r, h).contiguous()
        cols = (win.view(1, -1) + torch.tensor(state.old_lens, device=win.device).view(-1, 1))  # [H, W]
    else:
        key_lens = torch.full((r, h), state.n_candidates, dtype=torch.int32, device=keys.device)
        cols = win + state.n_old
    scores = token_scores(q_obs, keys, key_lens, state.softmax_scale, pool_kernel=pool_kernel,
                          backend=state.backend).float().clone()
    return scores, cols


def top_per_head(state: "SelectionState", scores: "torch.Tensor") -> "torch.Tensor":
    """``[R, H, k_max]``: each head's ``k_h`` best-scored candidates, sorted, tail zeroed (ragged
    states; non-ragged: every head's ``budget`` best). Padding must score ``-inf``."""
    import torch

    n, k = state.n_candidates, state.budget
    top = scores.topk(k, dim=-1).indices
    if not state.ragged:
        return top.sort(dim=-1).values.to(torch.int64)
    kh, _ = head_counts(state)
    # A head's k_h best are the first k_h of its top-k_max; the rest of the row sorts behind them (n
    # is above every index) and is zeroed.
    j = torch.arange(k, device=top.device)
    top = torch.where(j < kh.view(1, -1, 1), top, n).sort(dim=-1).values
    return _finish(top, kh.view(1, -1)).to(torch.int64)


def select_by_rule(state: "SelectionState", rule: str, *, sink_tokens: int = 0, window_size: int = 16,
                   pool_kernel: int = 5) -> "torch.Tensor":
    """Dispatch on a rule name of :data:`SELECTION_RULES`."""
    if rule == "recent":
        return recent_indices(state)
    if rule == "sink_recent":
        return sink_recent_indices(state, sink_tokens)
    if rule == "scores":
        return score_indices(state, window_size, pool_kernel)
    raise ValueError(f"unknown selection rule {rule!r}; known: {', '.join(SELECTION_RULES)}")
