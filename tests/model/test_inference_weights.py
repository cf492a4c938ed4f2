"""Loaded weights are frozen for inference, so autocast keeps no low-precision copy of them."""
from __future__ import annotations

import torch

from tests.conftest import small_config
from tuner.model.loading import load_checkpoints, random_models


def test_random_and_loaded_weights_do_not_require_grad(small_ckpts):
    for loaded in (random_models(small_config(), seed=0), load_checkpoints(*small_ckpts)):
        params = list(loaded.var.parameters()) + list(loaded.vae.parameters())
        assert params and not any(p.requires_grad for p in params)
        assert not loaded.var.training and not loaded.vae.training


def test_random_weights_are_reproducible_from_the_seed(small_model):
    """Same seed, same weights (drawn on the model's device; on CPU the stream is unchanged)."""
    again = random_models(small_config(), seed=0)
    for a, b in zip(small_model.var.state_dict().values(), again.var.state_dict().values()):
        assert torch.equal(a, b)
