"""An Infinity model behind the interface the product path calls (peer of
:class:`tuner.model.loading.LoadedModel`; docs/design.md, Model engine).

The product path (evaluation, calibration, proxy, bench, generate, grids) never branches on the
model kind: it asks the loaded model for ``num_conditions`` and calls
``generate_chunk(conditions, seed=…, …)``. For VAR a condition is a class id; here it is an index into
the model's prompt set (:mod:`tuner.model.prompts`; the built-in list unless ``--prompts FILE``).

Text features: with real weights, the flan-t5-xl encoder's, as the official inference computes them
(:mod:`tuner.model.text_encoder`); with random weights, seeded stand-ins of the right shape, one per
prompt text (:func:`tuner.model.prompts.stand_in_features`): the prompt only seeds them, it means
nothing to the model.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence

import torch

from tuner.errors import UserError
from tuner.model.generate import GenerationResult
from tuner.model.infinity_config import InfinityModelConfig
from tuner.model.prompts import DEFAULT_PROMPTS, prompts_digest, stand_in_features

STAND_IN_NOTE = ("random weights and no text encoder: each prompt only seeds random text features "
                 "(the images mean nothing)")


@dataclass
class InfinityModel:
    """A ready-to-run Infinity transformer + BSQ-VAE, its prompt set and its identity.

    config: the named model at the generated sides (geometry, resolution and memory follow them).
    prompts: what condition ``i`` means (``prompts[i]``). checkpoint_sha256: None for random weights.
    text_encoder: the loaded T5 (:class:`~tuner.model.text_encoder.T5TextEncoder`) with real weights;
        None: seeded stand-in features.
    """

    config: InfinityModelConfig
    model: torch.nn.Module  # tuner.model.infinity.InfinityTransformer
    vae: torch.nn.Module  # tuner.model.bsq_vae.BSQVAE
    checkpoint_sha256: str | None
    source: str
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    text_encoder: Any = None

    condition_name = "prompt"
    softmax_scale = 1.0  # cosine attention: the learned temperature is folded into q

    @property
    def note(self) -> str | None:
        """What a user must know about the images (None with the real text encoder)."""
        return None if self.text_encoder is not None else STAND_IN_NOTE

    @property
    def num_conditions(self) -> int:
        return len(self.prompts)

    @property
    def conditions_key(self) -> str:
        """What the conditions add to the model's identity in cache keys (the prompt set, and the text
        encoder that turns it into features)."""
        encoder = f"|t5:{self.text_encoder.fingerprint}" if self.text_encoder is not None else ""
        return f"prompts:{prompts_digest(self.prompts)}{encoder}"

    @property
    def device(self) -> torch.device:
        return self.model.cfg_uncond.device

    def describe_condition(self, index: int) -> str:
        return self.prompts[index]

    def text_features(self, conditions: Sequence[int]) -> tuple[torch.Tensor, tuple[int, ...]]:
        """``([B, T, text_channels] on the model's device, lens)`` for prompt indices ``conditions``."""
        a = self.config.infinity
        texts = [self.prompts[int(i)] for i in conditions]
        if self.text_encoder is not None:
            feats, lens = self.text_encoder.encode(texts)
        else:
            feats, lens = stand_in_features(texts, a.text_channels, a.text_maxlen)
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
                        device: str | torch.device = "cpu", prompts: tuple[str, ...] | None = None,
                        weights_dir=None) -> InfinityModel:
    """The named Infinity model at ``config.sides``: random weights, or the official files in
    ``weights_dir`` (else ``$TUNER_WEIGHTS_DIR``; :mod:`tuner.model.infinity_weights`) with the T5
    encoder from its ``flan-t5-xl/`` folder."""
    prompts = tuple(prompts) if prompts else DEFAULT_PROMPTS
    if not random_weights:
        return _load_real(config, weights_dir, device, prompts)
    from tuner.model.infinity import InfinityEngineConfig
    from tuner.model.infinity_loading import random_infinity

    depth = config.infinity.depth
    chunks = 8 if depth % 8 == 0 else 1  # the official grouping where it divides (names only)
    engine = InfinityEngineConfig(config.infinity, sides=config.sides, block_chunks=chunks)
    loaded = random_infinity(engine, config.vae, seed, device, name=config.name)
    source = f"random weights (seed {seed}), random text features"
    return InfinityModel(replace(config), loaded.model, loaded.vae, None, source, prompts)


def _load_real(config: InfinityModelConfig, weights_dir, device, prompts) -> InfinityModel:
    from tuner.model.infinity_loading import load_infinity
    from tuner.model.infinity_weights import check_infinity_weights
    from tuner.model.text_encoder import load_text_encoder

    paths = check_infinity_weights(config.name, weights_dir)
    a = config.infinity
    loaded = load_infinity(paths.model, paths.vae, name=config.name, sides=config.sides, h_div_w=a.h_div_w,
                           pixels=a.pixels, device=device)
    got = loaded.config.infinity
    if (got.codebook_dim, got.text_channels, got.text_maxlen) != (a.codebook_dim, a.text_channels,
                                                                 a.text_maxlen):
        raise UserError(f"{paths.model} predicts {got.codebook_dim} bits from {got.text_channels}-wide "
                        f"text of {got.text_maxlen} tokens, not {config.name}'s {a.codebook_dim} / "
                        f"{a.text_channels} / {a.text_maxlen}; pass the official file")
    encoder = load_text_encoder(paths.text_encoder, max_length=got.text_maxlen,
                                text_channels=got.text_channels, device=device)
    source = f"{paths.model} + {paths.vae.name} + {paths.text_encoder.name}/"
    cfg = replace(config, infinity=got, vae=loaded.config.vae)
    return InfinityModel(cfg, loaded.model, loaded.vae, loaded.checkpoint_sha256, source, prompts, encoder)
