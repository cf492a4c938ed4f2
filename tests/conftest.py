"""Shared fixtures: a small official-format model (random weights, written as checkpoints)."""
from __future__ import annotations

import os

# Environment for the whole test session, set before any kernel module is imported.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("MPLBACKEND", "Agg")

import torch  # noqa: E402  (only to ask whether a GPU exists)

# Triton kernels run under the CPU interpreter when there is no GPU; the variable must be set before
# any @triton.jit decorator runs, i.e. before varkv_kernels.attention / varkv_kernels.scoring are imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from tuner.model.config import ModelConfig, VAEConfig, VARConfig  # noqa: E402


def small_config(depth: int = 2, patch_nums=(1, 2, 3, 4), shared_aln: bool = False) -> ModelConfig:
    """A model with the official architecture at toy size (head_dim 64 like the official models)."""
    return ModelConfig(
        f"small-d{depth}",
        VARConfig(depth=depth, patch_nums=patch_nums, num_classes=10, embed_dim=64 * depth, num_heads=depth,
                  shared_aln=shared_aln),
        VAEConfig(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2), num_res_blocks=1, share_quant_resi=4,
                  using_sa=True, using_mid_sa=True),
    )


@pytest.fixture(scope="session")
def small_model():
    from tuner.model.loading import random_models

    torch.manual_seed(0)
    return random_models(small_config(), seed=0)


@pytest.fixture(scope="session")
def small_ckpts(tmp_path_factory, small_model):
    d = tmp_path_factory.mktemp("ckpts")
    var_p, vae_p = d / "var_small.pth", d / "vae_small.pth"
    torch.save(small_model.var.state_dict(), var_p)
    torch.save(small_model.vae.state_dict(), vae_p)
    return var_p, vae_p
