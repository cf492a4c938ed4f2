"""Frozen model configurations and the named sizes (``tiny``, ``d16`` … ``d36``, ``infinity-2b/8b``).

Everything about a VAR model that the engine, the memory planner and the policies need is derived
from two frozen dataclasses: :class:`VARConfig` (transformer) and :class:`VAEConfig` (multi-scale
VQ-VAE). The official sizes follow ``build_vae_var``: heads = depth, width = 64·depth.

Every named model's config offers what planning reads, whatever the architecture: ``name``,
``geometry`` (:class:`CacheGeometry`), ``resolution``, ``kind`` (the sizing rules,
:mod:`tuner.model.sizing`) and ``engine`` (what runs it: ``var`` or ``infinity``; a model with None
could only be planned). Commands that run a model call :func:`require_engine` (today every named
model has an engine; Infinity: :mod:`tuner.model.infinity_runner`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from tuner.errors import UserError
from tuner.geometry import CacheGeometry
from tuner.model.infinity_config import INFINITY_MODELS
from tuner.options import SAMPLING, SamplingDefaults

PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
PATCH_NUMS_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)


@dataclass(frozen=True)
class VAEConfig:
    """Multi-scale residual VQ-VAE hyperparameters (official: ``vae_ch160v4096z32``)."""

    vocab_size: int = 4096
    z_channels: int = 32
    ch: int = 160
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    share_quant_resi: int = 4
    quant_resi: float = 0.5
    using_sa: bool = True
    using_mid_sa: bool = True
    beta: float = 0.25

    def __post_init__(self) -> None:
        if self.vocab_size <= 0 or self.z_channels <= 0 or self.ch <= 0:
            raise ValueError("VAE vocab_size, z_channels and ch must be positive")
        if not self.ch_mult or any(m <= 0 for m in self.ch_mult):
            raise ValueError("VAE ch_mult must be a non-empty tuple of positive ints")
        if self.ch % 32 != 0:
            raise ValueError(f"VAE ch={self.ch} must be a multiple of 32 (GroupNorm with 32 groups)")

    @property
    def downsample(self) -> int:
        """Spatial reduction factor of the encoder (16 for the official VAE)."""
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(frozen=True)
class VARConfig:
    """VAR transformer hyperparameters. ``embed_dim``/``num_heads`` default to 64·depth / depth."""

    depth: int
    patch_nums: tuple[int, ...] = PATCH_NUMS_256
    num_classes: int = 1000
    embed_dim: int = 0
    num_heads: int = 0
    mlp_ratio: float = 4.0
    shared_aln: bool = False
    attn_l2_norm: bool = True
    norm_eps: float = 1e-6
    cond_drop_rate: float = 0.1

    def __post_init__(self) -> None:
        if self.depth <= 0:
            raise ValueError(f"depth must be positive, got {self.depth}")
        if self.embed_dim == 0:
            object.__setattr__(self, "embed_dim", 64 * self.depth)
        if self.num_heads == 0:
            object.__setattr__(self, "num_heads", self.depth)
        if self.embed_dim % self.num_heads != 0:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if not self.patch_nums or list(self.patch_nums) != sorted(set(self.patch_nums)):
            raise ValueError(f"patch_nums must be strictly increasing, got {self.patch_nums}")
        if self.num_classes <= 0:
            raise ValueError("num_classes must be positive")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def geometry(self) -> CacheGeometry:
        """The cache geometry (scales, token counts, ``seq_len`` L = 680 at 256px): the one type for it."""
        return CacheGeometry.from_var_config(self)


@dataclass(frozen=True)
class ModelConfig:
    """A named model: transformer + tokenizer configuration."""

    name: str
    var: VARConfig
    vae: VAEConfig = field(default_factory=VAEConfig)

    kind: ClassVar[str] = "var"
    engine: ClassVar[str | None] = "var"
    sampling: ClassVar[SamplingDefaults] = SAMPLING  # what --cfg/--top-k/--top-p default to

    @property
    def geometry(self) -> CacheGeometry:
        return self.var.geometry

    @property
    def resolution(self) -> int:
        return self.var.patch_nums[-1] * self.vae.downsample


def _official(name: str, depth: int, patch_nums=PATCH_NUMS_256, shared_aln=False) -> ModelConfig:
    return ModelConfig(name, VARConfig(depth=depth, patch_nums=patch_nums, shared_aln=shared_aln))


TINY_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8)


def tiny_config() -> ModelConfig:
    """The built-in ``tiny`` model: 32×32 images, ×4 VAE, 7 scales (155 tokens), 10 classes."""
    return ModelConfig(
        "tiny",
        VARConfig(depth=6, patch_nums=TINY_PATCH_NUMS, num_classes=10, embed_dim=128, num_heads=4),
        VAEConfig(vocab_size=512, z_channels=16, ch=32, ch_mult=(1, 2, 4), num_res_blocks=1,
                  share_quant_resi=4, using_sa=False, using_mid_sa=True),
    )


NAMED_MODELS = {
    "tiny": tiny_config,
    "d16": lambda: _official("d16", 16),
    "d20": lambda: _official("d20", 20),
    "d24": lambda: _official("d24", 24),
    "d30": lambda: _official("d30", 30),
    "d36": lambda: _official("d36", 36, PATCH_NUMS_512, shared_aln=True),
    **INFINITY_MODELS,  # text-to-image (official files + flan-t5-xl, or random weights)
}


def model_config(name: str) -> Any:
    """Return the named configuration (a :class:`ModelConfig`, or an
    :class:`~tuner.model.infinity_config.InfinityModelConfig`); raises ``KeyError`` with the known names."""
    try:
        return NAMED_MODELS[name]()
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(NAMED_MODELS)}") from None


def default_sampling(name: str) -> SamplingDefaults:
    """The sampling ``--model name`` uses when no flag says otherwise: the model config's ``sampling``
    (VAR's FID settings, or the official Infinity CLI's); an unknown name gets VAR's (its loader
    reports it)."""
    make = NAMED_MODELS.get(name)
    return make().sampling if make is not None else SAMPLING


def engine_models() -> tuple[str, ...]:
    """The named models this version can run (generate, search, bench, calibrate, presets)."""
    return tuple(name for name, make in NAMED_MODELS.items() if make().engine is not None)


def require_engine(name: str) -> None:
    """``UserError`` (one line) when ``--model name`` is a known model that nothing here can run yet.

    Unknown names pass: the caller reports them with the list of known models.
    """
    make = NAMED_MODELS.get(name)
    cfg = make() if make is not None else None
    if cfg is None or cfg.engine is not None:
        return
    raise UserError(f"--model {name} can only be planned in this version (tuner plan --model {name}): the "
                    f"{cfg.kind.capitalize()} engine that would run it is not built yet; to run a model "
                    f"use one of {', '.join(engine_models())}")


def at_sides(cfg: Any, sides: Any) -> Any:
    """``cfg`` generating only the square maps ``sides`` (``--sides``; None: unchanged); one-line
    :class:`UserError` for a VAR model (fixed schedule), a non-square ratio (``--scales`` there) or sides
    that are not the schedule's prefix."""
    if sides is None:
        return cfg
    if cfg.kind != "infinity":
        raise UserError(f"--sides applies to Infinity models only, not --model {cfg.name} (VAR models have "
                        "a fixed schedule)")
    from dataclasses import replace

    if not cfg.is_square:
        from tuner.geometry import format_shapes

        raise UserError(f"--sides names the square maps of the 1:1 schedule; at --aspect {cfg.aspect} pass "
                        f"--scales N (the first N of {format_shapes(cfg.infinity.schedule)})")
    try:
        return replace(cfg, sides=tuple(int(s) for s in sides))
    except ValueError as exc:
        raise UserError(f"--sides: {exc}; pass a prefix such as 1,2,4,6") from None


def at_schedule(cfg: Any, *, sides: Any = None, aspect: Any = None, scales: Any = None) -> Any:
    """``cfg`` at ``--aspect H:W`` (an official ratio; the number of generated scales is kept), then its
    first ``--scales N`` maps or the square ``--sides`` (1:1 only); all None: unchanged. One-line
    :class:`UserError` for a VAR model, an unknown ratio, both ``--sides`` and ``--scales``, or a count
    outside the schedule."""
    flags = (("--aspect", aspect), ("--scales", scales), ("--sides", sides))
    given = [flag for flag, value in flags if value is not None]
    if not given:
        return cfg
    if cfg.kind != "infinity":
        raise UserError(f"{given[0]} applies to Infinity models only, not --model {cfg.name} (VAR models "
                        "have one fixed square schedule)")
    if sides is not None and scales is not None:
        raise UserError("pass --sides (square maps of the 1:1 schedule) or --scales N (the first N maps of "
                        "any ratio), not both")
    if aspect is not None:
        cfg = cfg.at_aspect(parse_aspect(aspect))
    if scales is not None:
        try:
            cfg = cfg.at_scales(int(scales))
        except ValueError as exc:
            raise UserError(f"--scales {scales}: {exc}") from None
    return at_sides(cfg, sides)


def parse_aspect(aspect: Any) -> float:
    """``--aspect H:W`` → the official ``h_div_w`` template (a float passes if it is one); one-line
    :class:`UserError` naming the allowed ratios otherwise."""
    from tuner.model.infinity_schedules import ASPECT_RATIOS, aspect_ratio

    if isinstance(aspect, float) and any(abs(aspect - r) < 1e-9 for r in ASPECT_RATIOS):
        return aspect
    try:
        return aspect_ratio(str(aspect))
    except ValueError as exc:
        raise UserError(f"--aspect {exc}") from None
