"""Token sampling with the official semantics (top-k, then top-p, then one multinomial draw).

The random-number call order matters for reproducing official images: exactly one
``torch.multinomial`` call per scale over all ``B·l`` rows, with the run's seeded generator.
"""
from __future__ import annotations

import torch


def filter_top_k_top_p_(logits_BlV: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """Mask logits in place: keep those >= the k-th largest, then the nucleus of mass ``top_p``.

    The nucleus drops tokens whose ascending cumulative probability is <= ``1 - top_p`` and always
    keeps the most likely token. ``logits_BlV`` is ``[B, l, V]``; returns the same tensor.
    """
    if 0 < top_k < logits_BlV.shape[-1]:  # k >= vocab keeps everything (and topk would fail)
        kth = logits_BlV.topk(top_k, largest=True, sorted=False, dim=-1)[0].amin(dim=-1, keepdim=True)
        logits_BlV.masked_fill_(logits_BlV < kth, -torch.inf)
    if top_p > 0:
        sorted_logits, sorted_idx = logits_BlV.sort(dim=-1, descending=False)
        drop_sorted = sorted_logits.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
        drop_sorted[..., -1:] = False
        logits_BlV.masked_fill_(drop_sorted.scatter(sorted_idx.ndim - 1, sorted_idx, drop_sorted), -torch.inf)
    return logits_BlV


def sample_tokens(logits_BlV: torch.Tensor, top_k: int, top_p: float,
                  generator: torch.Generator | None) -> torch.Tensor:
    """Sample one token per position: ``[B, l, V]`` logits → ``[B, l]`` int64 indices.

    Filters ``logits_BlV`` in place (as the official sampler does).
    """
    b, n, vocab = logits_BlV.shape
    filter_top_k_top_p_(logits_BlV, top_k, top_p)
    probs = logits_BlV.softmax(dim=-1).view(-1, vocab)
    return torch.multinomial(probs, num_samples=1, replacement=True, generator=generator).view(b, n)


def guided_logits(logits_2BlV: torch.Tensor, batch: int, cfg: float, scale_index: int,
                  num_scales: int) -> torch.Tensor:
    """Classifier-free guidance with VAR's linear ramp: ``t = cfg · s / (S - 1)``.

    ``logits_2BlV`` holds the conditional rows ``[0, B)`` then the unconditional rows ``[B, 2B)``.
    """
    ratio = scale_index / (num_scales - 1) if num_scales > 1 else 0.0
    t = cfg * ratio
    return (1 + t) * logits_2BlV[:batch] - t * logits_2BlV[batch:]
