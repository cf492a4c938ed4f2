"""Frozen configurations of Infinity (text-to-image next-scale models) and the named sizes.

Facts from the official code, FoundationVision/Infinity @4c27bbb (MIT): ``infinity/models/infinity.py``
and ``basic.py`` (the transformer), ``tools/run_infinity.py`` (the sizes and how inference holds the
weights), ``infinity/models/bsq_vae/`` (the tokenizer). ``tuner plan`` sizes memory from these shapes.
The engine (``tuner/model/infinity*.py``, ``bsq_vae.py``) runs them; the commands reach it through
:class:`tuner.model.infinity_runner.InfinityModel` (official files and the T5 encoder, or random weights).
``infinity-test`` is a small model of ours (depth 2, 96² over sides 1 2 4 6) for tests and CPU runs.
Every official aspect ratio plans and runs (``h_div_w``; non-square maps give an ``(h, w)`` geometry).

Only self-attention keeps a KV cache (text enters by cross-attention, recomputed from the prompt), so
the cache geometry is the image tokens of the scale schedule: ``depth`` layers × ``num_heads`` ×
``head_dim`` over :func:`tuner.model.infinity_schedules.infinity_schedule`. Nothing here imports torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import ClassVar

from tuner.geometry import CacheGeometry
from tuner.model.infinity_schedules import aspect_name, image_size, infinity_schedule
from tuner.options import INFINITY_SAMPLING, SamplingDefaults


@dataclass(frozen=True)
class InfinityConfig:
    """The Infinity transformer (text-to-image path, ``shared_aln=True``, the official inference flags).

    ``codebook_dim``: bits per token the transformer reads and predicts (the VAE's ``embed_dim``, ×4
    with spatial patchify: 32 for 2B, 4·14 = 56 for 8B); the bitwise head has ``2·codebook_dim``
    outputs. ``text_channels`` / ``text_maxlen``: the T5 features (2048, 512 tokens).
    ``h_div_w`` / ``pixels``: the scale schedule (:func:`~tuner.model.infinity_schedules.infinity_schedule`).
    """

    depth: int
    embed_dim: int
    num_heads: int
    mlp_ratio: float = 4.0
    codebook_dim: int = 32
    text_channels: int = 2048
    text_maxlen: int = 512
    h_div_w: float = 1.0
    pixels: str = "1M"

    def __post_init__(self) -> None:
        if min(self.depth, self.embed_dim, self.num_heads, self.codebook_dim, self.text_channels,
               self.text_maxlen) <= 0:
            raise ValueError("Infinity depth, embed_dim, num_heads, codebook_dim and text sizes must be "
                             "positive")
        if self.embed_dim % self.num_heads != 0:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        infinity_schedule(self.h_div_w, self.pixels)  # raises ValueError for an unknown schedule

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def ffn_hidden(self) -> int:
        """``F = round(C · mlp_ratio / 256) · 256`` (the official FFN width: 8192 for 2B, 14336 for 8B)."""
        return round(self.embed_dim * self.mlp_ratio / 256) * 256

    @property
    def schedule(self) -> tuple[tuple[int, int], ...]:
        """``(h, w)`` token map per scale."""
        return infinity_schedule(self.h_div_w, self.pixels)

    @property
    def geometry(self) -> CacheGeometry:
        """The self-attention cache geometry over the whole schedule (``(h, w)`` maps; square at 1:1)."""
        return CacheGeometry.from_shapes(self.depth, self.num_heads, self.head_dim, self.schedule)

    def block_params(self) -> int:
        """Parameters of one block, ``8C² + 2CF + F + 15C + H`` (C width, F FFN width, H heads):

        self-attention ``W_qkv`` 3C² (no bias) + q and v biases 2C + ``W_o`` C² + C + a per-head
        cosine-attention scale H; cross-attention (the text already projected to C) ``W_q`` C² + C,
        ``W_kv`` 2C² (no bias), v bias C, ``W_o`` C² + C; the GELU FFN 2CF + F + C; the LayerNorm
        before cross-attention 2C; the AdaLN gains ``ada_gss`` 6C (the 6 modulations are shared).
        """
        c, f, h = self.embed_dim, self.ffn_hidden, self.num_heads
        return 8 * c * c + 2 * c * f + f + 15 * c + h

    def other_params(self) -> int:
        """Parameters outside the blocks, ``T·Ct + Ct + 10C² + 3C·Ct + 3dC + 30C + 2d``
        (T = text_maxlen, Ct = text channels, d = codebook_dim):

        the learned unconditional text ``T × Ct``; text RMSNorm Ct; the attention pool that makes the
        start token (a learned query C, ``W_kv`` 2C·Ct, v bias C, ``W_o`` C² + C); the text MLP for
        cross-attention ``Ct·C + C + C² + C``; the start position C; 15 level embeddings 15C; the word
        embedding ``d·C + C``; the shared AdaLN map 6C² + 6C; the head's AdaLN 2C² + 2C; the bitwise
        head ``C·2d + 2d``.
        """
        c, ct, d, t = self.embed_dim, self.text_channels, self.codebook_dim, self.text_maxlen
        return t * ct + ct + 10 * c * c + 3 * c * ct + 3 * d * c + 30 * c + 2 * d

    def param_count(self) -> int:
        """All transformer parameters: ``depth · block_params + other_params`` (8B: 8,375,791,824, the
        "model size: 8.38B" the official notebook prints)."""
        return self.depth * self.block_params() + self.other_params()


@dataclass(frozen=True)
class BSQVAEConfig:
    """The official BSQ tokenizer (``vae_model`` in ``bsq_vae/vae.py``): a Flux-style conv autoencoder
    (``base_ch`` 128, 2 ResNet blocks per level, no attention) and a parameter-free multi-scale BSQ.

    ``patch_size``: pixels per latent cell (16; 8 with spatial patchify, whose 2×2 cells make one
    transformer token). ``codebook_dim``: bits per latent cell (32 for 2B's d32 VAE, 14 for 8B's).
    """

    codebook_dim: int = 32
    patch_size: int = 16
    base_ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4, 4)
    num_res_blocks: int = 2

    def __post_init__(self) -> None:
        if self.patch_size not in (8, 16) or min(self.codebook_dim, self.base_ch, self.num_res_blocks) <= 0:
            raise ValueError("BSQ-VAE patch_size must be 8 or 16 and its sizes positive")

    @property
    def decoder_out_channels(self) -> int:
        """Channels of the decoder's full-resolution level (``base_ch · ch_mult[0]``)."""
        return self.base_ch * self.ch_mult[0]

    def param_count(self) -> int:
        """Encoder + decoder parameters, counted from the official constructor (``flux_vqgan.py``):
        a conv ``k×k`` from ``i`` to ``o`` channels has ``i·o·k² + o``, a GroupNorm ``2·ch``, a ResNet
        block ``i → o`` two norms, two 3×3 convs and a 1×1 shortcut when ``i != o``; the encoder
        downsamples (a strided 3×3 conv) below ``log2(patch_size)`` levels, the decoder upsamples
        (nearest + 3×3 conv) at levels ``1 … log2(patch_size)``."""
        def conv(i: int, o: int, k: int) -> int:
            return i * o * k * k + o

        def res(i: int, o: int) -> int:
            return 2 * i + conv(i, o, 3) + 2 * o + conv(o, o, 3) + (conv(i, o, 1) if i != o else 0)

        ch, mult, levels = self.base_ch, self.ch_mult, len(self.ch_mult)
        steps = self.patch_size.bit_length() - 1  # log2(patch_size)
        enc = conv(3, ch, 3)
        block_in = ch
        for lvl in range(levels):
            block_in, out = ch * ((1,) + mult)[lvl], ch * mult[lvl]
            enc += res(block_in, out) + sum(res(out, out) for _ in range(self.num_res_blocks - 1))
            block_in = out
            if lvl < steps:
                enc += conv(block_in, block_in, 3)
        enc += 2 * res(block_in, block_in) + 2 * block_in + conv(block_in, self.codebook_dim, 3)
        block_in = ch * mult[-1]
        dec = conv(self.codebook_dim, block_in, 3) + 2 * res(block_in, block_in)
        for lvl in reversed(range(levels)):
            out = ch * mult[lvl]
            for _ in range(self.num_res_blocks + 1):
                dec += res(block_in, out)
                block_in = out
            if 1 <= lvl <= steps:
                dec += conv(block_in, block_in, 3)
        dec += 2 * block_in + conv(block_in, 3, 3)
        return enc + dec


@dataclass(frozen=True)
class T5EncoderConfig:
    """The text encoder: the encoder of google/flan-t5-xl (T5 v1.1 XL: gated-GELU FFN, no biases,
    relative position buckets in the first layer), loaded by the official inference in fp16."""

    d_model: int = 2048
    d_ff: int = 5120
    num_layers: int = 24
    num_heads: int = 32
    d_kv: int = 64
    vocab_size: int = 32128
    relative_buckets: int = 32

    def wo_params(self) -> int:
        """The FFN output projections ``wo`` (``L · d_ff · d``): transformers keeps them in fp32 when it
        loads T5 in fp16 (``T5PreTrainedModel._keep_in_fp32_modules``)."""
        return self.num_layers * self.d_ff * self.d_model

    def param_count(self) -> int:
        """``V·d + L·(4·d·h·d_kv + 3·d·d_ff + 2d) + buckets·h + d``: embeddings, per layer q/k/v/o,
        wi_0/wi_1/wo and two RMSNorms, the relative-position bias and the final RMSNorm (1,223,527,424)."""
        d, inner = self.d_model, self.num_heads * self.d_kv
        layer = 4 * d * inner + 3 * d * self.d_ff + 2 * d
        return self.vocab_size * d + self.num_layers * layer + self.relative_buckets * self.num_heads + d


@dataclass(frozen=True)
class InfinityModelConfig:
    """A named Infinity model: transformer, tokenizer and text encoder. A peer of
    :class:`tuner.model.config.ModelConfig` for everything that plans (``geometry``, ``resolution``,
    sizing) and runs (``engine``).

    The aspect ratio is the transformer's ``infinity.h_div_w`` (an official template, 1.0 = 1:1;
    :meth:`at_aspect`). ``sides``: the heights of the generated scales, the first ``N`` of that
    ratio's schedule (at 1:1 the square sides: ``--sides 1,2,4,6`` is a 96² image; :meth:`at_scales`
    takes the first ``N`` of any ratio); ``None``: the whole schedule. Geometry, resolution and memory
    follow them.
    """

    name: str
    infinity: InfinityConfig
    vae: BSQVAEConfig = field(default_factory=BSQVAEConfig)
    text_encoder: T5EncoderConfig = field(default_factory=T5EncoderConfig)
    sides: tuple[int, ...] | None = None

    kind: ClassVar[str] = "infinity"
    engine: ClassVar[str | None] = "infinity"
    sampling: ClassVar[SamplingDefaults] = INFINITY_SAMPLING  # the official CLI's cfg 3 / top-p 0.97

    def __post_init__(self) -> None:
        if self.sides is not None:
            full = tuple(h for h, _ in self.infinity.schedule)
            if not self.sides or tuple(self.sides) != full[:len(self.sides)]:
                what = "sides" if self.is_square else f"heights (the {self.aspect} schedule's)"
                raise ValueError(f"{what} {','.join(map(str, self.sides))} are not a prefix of {self.name}'s "
                                 f"schedule {','.join(map(str, full))}")
            object.__setattr__(self, "sides", tuple(int(s) for s in self.sides))

    @property
    def aspect(self) -> str:
        """``H:W`` of the ratio (``"1:1"``, ``"2:1"`` …)."""
        return aspect_name(self.infinity.h_div_w)

    @property
    def is_square(self) -> bool:
        return all(h == w for h, w in self.infinity.schedule)

    @property
    def schedule(self) -> tuple[tuple[int, int], ...]:
        """``(h, w)`` per generated scale (the first ``len(sides)`` when set)."""
        full = self.infinity.schedule
        return full if self.sides is None else full[:len(self.sides)]

    @property
    def geometry(self) -> CacheGeometry:
        a = self.infinity
        return CacheGeometry.from_shapes(a.depth, a.num_heads, a.head_dim, self.schedule)

    @property
    def resolution(self) -> int:
        """Image height in pixels (square schedules: also the width; :attr:`image_hw` for both)."""
        return self.image_hw[0]

    @property
    def image_hw(self) -> tuple[int, int]:
        """``(height, width)`` of the generated image in pixels."""
        return image_size(self.schedule)

    def at_scales(self, n: int) -> "InfinityModelConfig":
        """The first ``n`` scales of this ratio's schedule; ``ValueError`` outside ``1 … len(schedule)``."""
        full = self.infinity.schedule
        if not 1 <= int(n) <= len(full):
            raise ValueError(f"the {self.aspect} schedule of {self.name} has {len(full)} scales; ask for 1 "
                             f"to {len(full)}")
        return replace(self, sides=tuple(h for h, _ in full[:int(n)]))

    def at_aspect(self, h_div_w: float) -> "InfinityModelConfig":
        """The same model at another official ratio, generating as many scales as now (all of them when
        the whole schedule is generated); ``ValueError`` for a ratio without a template."""
        arch = replace(self.infinity, h_div_w=float(h_div_w))
        n = None if self.sides is None else len(self.sides)
        out = replace(self, infinity=arch, sides=None)
        return out if n is None else out.at_scales(n)


def _named(name: str, depth: int, width: int, heads: int, vae: BSQVAEConfig) -> InfinityModelConfig:
    bits = vae.codebook_dim * (4 if vae.patch_size == 8 else 1)  # spatial patchify: 2×2 cells per token
    return InfinityModelConfig(name, InfinityConfig(depth=depth, embed_dim=width, num_heads=heads,
                                                    codebook_dim=bits), vae)


def infinity_2b() -> InfinityModelConfig:
    """Infinity-2B at 1024² (1:1): 32 blocks, width 2048, 16 heads of 128; the d32 BSQ-VAE
    (``infinity_vae_d32_reg.pth``, 32 bits per token, patch 16)."""
    return _named("infinity-2b", 32, 2048, 16, BSQVAEConfig(codebook_dim=32, patch_size=16))


def infinity_8b() -> InfinityModelConfig:
    """Infinity-8B at 1024² (1:1): 40 blocks, width 3584, 28 heads of 128; the 14-bit BSQ-VAE with
    spatial patchify (``infinity_vae_d56_f8_14_patchify.pth``: patch 8, 2×2 cells = 56 bits per token)."""
    vae = BSQVAEConfig(codebook_dim=14, patch_size=8, ch_mult=(1, 2, 4, 4))
    return _named("infinity-8b", 40, 3584, 28, vae)


def infinity_test() -> InfinityModelConfig:
    """Ours, for tests and CPU runs (random weights): 2 blocks, width 128, 4 heads of 32, 8 bits per
    token, 128-wide text of up to 32 tokens, a small patch-16 BSQ-VAE; 96² over sides 1 2 4 6 (57
    tokens). Its sizing still counts a flan-t5-xl encoder (the named models' rule)."""
    arch = InfinityConfig(depth=2, embed_dim=128, num_heads=4, codebook_dim=8, text_channels=128,
                          text_maxlen=32)
    vae = BSQVAEConfig(codebook_dim=8, patch_size=16, base_ch=32, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1)
    return InfinityModelConfig("infinity-test", arch, vae, sides=(1, 2, 4, 6))


INFINITY_MODELS = {"infinity-2b": infinity_2b, "infinity-8b": infinity_8b, "infinity-test": infinity_test}
