"""An Infinity model behind the interface the product path calls (peer of
:class:`tuner.model.loading.LoadedModel`; docs/design.md, Model engine).

The product path (evaluation, calibration, proxy, bench, generate, grids) never branches on the
model kind: it asks the loaded model for ``num_conditions`` and calls
``generate_chunk(conditions, seed=…, …)``. For VAR a condition is a class id; here it is an index into
the model's prompt set (:mod:`tuner.model.prompts`; the built-in list unless ``--prompts FILE``).

Text features: with random weights, seeded stand-ins of the right shape, one per prompt text
(:func:`tuner.model.prompts.stand_in_features`): the prompt only seeds them, it means nothing to the
model. Real weights need the flan-t5-xl encoder, which this version does not load
(:func:`require_random_weights`).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch

from tuner.errors import UserError
from tuner.model.generate import GenerationResult
from tuner.model.infinity_config import InfinityModelConfig
from tuner.model.prompts import DEFAULT_PROMPTS, prompts_digest, stand_in_features

STAND_IN_NOTE = ("random weights and no text encoder: each prompt only seeds random text features "
                 "(the images mean nothing)")


def require_random_weights(name: str) -> None:
    """One-line :class:`UserError`: real Infinity weights need the T5 encoder, not loadable yet."""
    raise UserError(f"--model {name} with real weights needs the flan-t5-xl text encoder, which this "
                    "version does not load yet (planned: the optional extra 'infinity', transformers + "
                    "sentencepiece); use --random-weights (seeded random text features) or tuner plan")


@dataclass
class InfinityModel:
    """A ready-to-run Infinity transformer + BSQ-VAE, its prompt set and its identity.

    config: the named model at the generated sides (geometry, resolution and memory follow them).
    prompts: what condition ``i`` means (``prompts[i]``). checkpoint_sha256: None for random weights.
    """

    config: InfinityModelConfig
    model: torch.nn.Module  # tuner.model.infinity.InfinityTransformer
    vae: torch.nn.Module  # tuner.model.bsq_vae.BSQVAE
    checkpoint_sha256: str | None
    source: str
    prompts: tuple[str, ...] = DEFAULT_PROMPTS

    condition_name = "prompt"
    softmax_scale = 1.0  # cosine attention: the learned temperature is folded into q
    note = STAND_IN_NOTE

    @property
    def num_conditions(self) -> int:
        return len(self.prompts)

    @property
    def conditions_key(self) -> str:
        """What the conditions add to the model's identity in cache keys (the prompt set)."""
        return f"prompts:{prompts_digest(self.prompts)}"

    @property
    def device(self) -> torch.device:
        return self.model.cfg_uncond.device

    def describe_condition(self, index: int) -> str:
        return self.prompts[index]

    def text_features(self, conditions: Sequence[int]) -> tuple[torch.Tensor, tuple[int, ...]]:
        """``([B, T, text_channels] on the model's device, lens)`` for prompt indices ``conditions``."""
        a = self.config.infinity
        feats, lens = stand_in_features([self.prompts[int(i)] for i in conditions], a.text_channels,
                                        a.text_maxlen)
        return feats.to(self.device), lens

    def generate_chunk(self, conditions: Sequence[int] | torch.Tensor, *, seed: int | None, cfg: float,
                       top_k: int, top_p: float, **engine) -> GenerationResult:
        """One batch: images ``[B, 3, H, W]`` of prompts ``conditions`` (indices), seeded ``seed``.

        ``engine``: policy, spec, backend, dtype, observer, audit, as
        :func:`tuner.model.infinity_generate.generate_infinity` takes them.
        """
        from tuner.model.infinity_generate import generate_infinity

        ids = [int(i) for i in (conditions.tolist() if isinstance(conditions, torch.Tensor) else conditions)]
        bad = [i for i in ids if not 0 <= i < self.num_conditions]
        if bad:
            raise UserError(f"prompt index {bad[0]} is outside the {self.num_conditions} prompts of "
                            f"{self.config.name}")
        text, lens = self.text_features(ids)
        return generate_infinity(self.model, self.vae, text, lens, seed=seed, cfg=cfg, top_k=top_k,
                                 top_p=top_p, **engine)


def load_infinity_model(config: InfinityModelConfig, *, random_weights: bool, seed: int = 0,
                        device: str | torch.device = "cpu",
                        prompts: tuple[str, ...] | None = None) -> InfinityModel:
    """The named Infinity model (at ``config.sides``) with random weights; real weights refused."""
    from tuner.model.infinity import InfinityEngineConfig
    from tuner.model.infinity_loading import random_infinity

    if not random_weights:
        require_random_weights(config.name)
    depth = config.infinity.depth
    chunks = 8 if depth % 8 == 0 else 1  # the official grouping where it divides (names only)
    engine = InfinityEngineConfig(config.infinity, sides=config.sides, block_chunks=chunks)
    loaded = random_infinity(engine, config.vae, seed, device, name=config.name)
    source = f"random weights (seed {seed}), random text features"
    return InfinityModel(replace(config), loaded.model, loaded.vae, None, source,
                         tuple(prompts) if prompts else DEFAULT_PROMPTS)
