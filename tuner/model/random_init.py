"""Weights for inference: frozen modules, and random values of any model's shape (benchmarks, tests).

Shared by both engines' loaders (:mod:`tuner.model.loading` for VAR, :mod:`tuner.model.infinity_loading`),
so neither imports the other.
"""
from __future__ import annotations

import math

import torch


def for_inference(*modules: torch.nn.Module) -> None:
    """Freeze loaded weights: weights that require grad make autocast keep an fp16/bf16 copy of every
    weight for the whole run (about 4 GB for d30), memory that no plan counts."""
    for m in modules:
        m.eval().requires_grad_(False)


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give every parameter a random, non-trivial value so that each one affects the output.

    Matrices get ``N(0, 1/fan_in)``, vectors small offsets around their neutral value (1 for norm
    scales), embeddings unit noise, VAR's temperatures ``log 4 ± 0.5``. The VAR head is scaled up
    so logits have a realistic spread for top-k/top-p sampling.
    """
    device = next(module.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)  # on the GPU: d30's 2 GB drawn in a second
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=g, dtype=torch.float32, device=device)
        if name.endswith("scale_mul_1H11"):
            value = math.log(4.0) + 0.5 * noise
        elif p.dim() >= 2 \
                and not name.endswith(("class_emb.weight", "embedding.weight", "lvl_embed.weight")) \
                and "pos_" not in name and "ada_gss" not in name:
            fan_in = p[0].numel()
            value = noise / math.sqrt(fan_in) * (4.0 if name == "head.weight" else 1.0)
        elif name.endswith("weight") and p.dim() == 1 and ("norm" in name):
            value = 1.0 + 0.1 * noise
        elif p.dim() == 1:
            value = 0.05 * noise
        else:
            value = 0.5 * noise
        p.copy_(value.to(p.dtype))
    return module
