"""The Infinity transformer (text-to-image next-scale model), state-dict compatible with the official
``infinity_2b_reg.pth`` / ``infinity_8b_weights`` checkpoints.

Facts from FoundationVision/Infinity @4c27bbb (``infinity/models/infinity.py``, MIT), with the flags
the official inference (``tools/run_infinity.py``, ``scripts/infer.sh``) builds it with: text
conditioning (``text_channels`` T5 features), ``shared_aln=True``, ``fused_norm=True``, bit labels,
``rope2d_each_sa_layer=1``, ``rope2d_normalized_by_hw=2``, ``add_lvl_embeding_only_first_block=1``,
``block_chunks=8`` (which names the blocks ``block_chunks.{c}.module.{j}``; it changes nothing else
when the level embedding is added before the first block only).

Text path: the T5 features are RMS-normalised; an attention pool (one learned query per head) makes
the start token ``sos`` [R, C], which is also the AdaLN condition; an MLP projects them to the width
for the blocks' cross-attention. This module holds the weights and the per-scale forward; the
scale loop, guidance and sampling are :mod:`tuner.model.infinity_generate`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from tuner.geometry import CacheGeometry
from tuner.model.infinity_blocks import AdaLNBeforeHead, CrossAttention, CrossAttnBlock, FastRMSNorm, TextKV
from tuner.model.infinity_config import InfinityConfig
from tuner.model.infinity_rope import rope_table
from tuner.model.infinity_schedules import infinity_schedule

if TYPE_CHECKING:  # pragma: no cover
    from tuner.model.cache import KVCache

NUM_LEVEL_EMBEDDINGS = 15  # the official ``lvl_embed`` table size, whatever the schedule


@dataclass(frozen=True)
class InfinityEngineConfig:
    """What the engine builds: the architecture, the generated schedule and the checkpoint layout.

    arch: depth, width, heads, bits and text sizes (:class:`InfinityConfig`); its ``h_div_w`` picks
        the official schedule of ``(h, w)`` maps (any template: 1:1, 2:1, 1:2, 4:3 …) and fixes the
        RoPE normalisation, the last map of that ratio's 1M schedule.
    sides: the heights of the generated maps, the first ``N`` of ``arch.schedule`` (at 1:1 the square
        sides, e.g. ``(1, 2, 4, 6, 8)`` for a 128² test image; at 2:1 ``(1, 2, 4, 6, 10)`` is 1x1 2x2
        4x2 6x3 10x5, a 160 × 80 image); ``None``: all of ``arch.schedule``.
    block_chunks: how the official module groups the blocks (8 for 2B and 8B); ``depth`` must be a
        multiple. Only the parameter names (``block_chunks.{c}.module.{j}``) depend on it; the official
        inference loop needs more than one chunk (with one, the official module names its blocks
        ``blocks.{i}``, which this engine does not read).
    """

    arch: InfinityConfig
    sides: tuple[int, ...] | None = None
    block_chunks: int = 1

    def __post_init__(self) -> None:
        full = self.arch.schedule
        if self.sides is not None:
            prefix = tuple(h for h, _ in full[:len(self.sides)])
            if not self.sides or tuple(self.sides) != prefix:
                raise ValueError(f"sides {self.sides} are not a prefix of the official schedule's heights "
                                 f"{tuple(h for h, _ in full)}")
        if self.block_chunks < 1 or self.arch.depth % self.block_chunks:
            raise ValueError(f"depth {self.arch.depth} is not a multiple of block_chunks {self.block_chunks}")

    @classmethod
    def first_scales(cls, arch: InfinityConfig, n: int, block_chunks: int = 1) -> "InfinityEngineConfig":
        """The first ``n`` maps of ``arch.schedule`` (``ValueError`` outside ``1 … len(schedule)``)."""
        full = arch.schedule
        if not 1 <= n <= len(full):
            raise ValueError(f"the schedule has {len(full)} scales, not {n}")
        return cls(arch, tuple(h for h, _ in full[:n]), block_chunks)

    @property
    def schedule(self) -> tuple[tuple[int, int], ...]:
        """``(h, w)`` per generated scale."""
        return self.arch.schedule if self.sides is None else self.arch.schedule[:len(self.sides)]

    @property
    def rope_last_hw(self) -> tuple[int, int]:
        """The map RoPE positions are spread over: the last scale of the ratio's 1M schedule
        (64×64 at 1:1, 90×45 at 2:1), whatever prefix or pixel count is generated."""
        return infinity_schedule(self.arch.h_div_w, "1M")[-1]

    @property
    def geometry(self) -> CacheGeometry:
        a = self.arch
        return CacheGeometry.from_shapes(a.depth, a.num_heads, a.head_dim, self.schedule)


class _Chunk(nn.Module):
    """The official ``MultipleLayers``: a group of blocks under ``module``."""

    def __init__(self, blocks: list[CrossAttnBlock]):
        super().__init__()
        self.module = nn.ModuleList(blocks)


def _pool_heads(text_channels: int, width: int) -> int:
    """Heads of the attention pool: the official ``TextAttentivePool`` uses ``Ct / 128`` heads (``Ct / 64``
    above width 4096), each of width ``C / heads``."""
    heads = text_channels // (64 if width > 4096 else 128)
    if heads < 1 or width % heads:
        raise ValueError(f"text_channels {text_channels} and width {width} give no valid attention pool "
                         "(needs text_channels >= 128 and width divisible by text_channels // 128)")
    return heads


class InfinityTransformer(nn.Module):
    """Parameter names match the official ``Infinity`` (loads its state dicts with ``strict=True``)."""

    def __init__(self, cfg: InfinityEngineConfig):
        super().__init__()
        self.cfg = cfg
        a = cfg.arch
        c, ct, d = a.embed_dim, a.text_channels, a.codebook_dim
        self.cfg_uncond = nn.Parameter(torch.zeros(a.text_maxlen, ct))
        self.text_norm = FastRMSNorm(ct)
        self.text_proj_for_sos = nn.Module()
        self.text_proj_for_sos.ca = CrossAttention(c, ct, _pool_heads(ct, c), for_attn_pool=True)
        self.text_proj_for_ca = nn.Sequential(nn.Linear(ct, c), nn.GELU(approximate="tanh"), nn.Linear(c, c))
        self.pos_start = nn.Parameter(torch.zeros(1, 1, c))
        self.lvl_embed = nn.Embedding(NUM_LEVEL_EMBEDDINGS, c)
        self.word_embed = nn.Linear(d, c)
        self.shared_ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(c, 6 * c))
        per = a.depth // cfg.block_chunks
        self.block_chunks = nn.ModuleList(
            _Chunk([CrossAttnBlock(c, a.num_heads, a.ffn_hidden) for _ in range(per)])
            for _ in range(cfg.block_chunks))
        self.head_nm = AdaLNBeforeHead(c)
        self.head = nn.Linear(c, 2 * d)
        if len(cfg.schedule) > NUM_LEVEL_EMBEDDINGS:
            raise ValueError(f"{len(cfg.schedule)} scales exceed the {NUM_LEVEL_EMBEDDINGS} level embeddings")
        self._rope_tables: dict[torch.device, torch.Tensor] = {}

    @property
    def blocks(self) -> list[CrossAttnBlock]:
        """All blocks in order (chunk by chunk)."""
        return [b for chunk in self.block_chunks for b in chunk.module]

    # ------------------------------------------------------------------ text conditioning
    def encode_text(self, text: TextKV) -> tuple[torch.Tensor, torch.Tensor, TextKV]:
        """Rows' packed T5 features → ``(sos [R, C], gss [R, 1, 6, C], text for cross-attention)``.

        ``sos`` (the attention pool of the normalised text) is the first scale's token and the
        condition of the head's AdaLN; ``gss`` the shared AdaLN modulations every block adds to its own.
        """
        normed = TextKV(self.text_norm(text.kv), text.lens)
        sos = self.text_proj_for_sos.ca(None, normed).squeeze(1)
        ca = TextKV(self.text_proj_for_ca(normed.kv), text.lens)
        gss = self.shared_ada_lin(sos.float()).float().view(-1, 1, 6, self.cfg.arch.embed_dim)
        return sos, gss, ca

    def first_input(self, sos: torch.Tensor) -> torch.Tensor:
        """``[R, 1, C]``: the start token plus its learned position."""
        return sos.unsqueeze(1) + self.pos_start

    def embed_bits(self, codes_BLd: torch.Tensor) -> torch.Tensor:
        """The next scale's input: ``[B, n, d]`` accumulated codes → ``[B, n, C]``."""
        return self.word_embed(codes_BLd)

    def rope(self, device: torch.device | str) -> torch.Tensor:
        """``[2, L, head_dim/2]`` float32 cos/sin of every token of the generated schedule.

        Built once on the CPU (as the official table is) and kept per device: not a buffer, so the
        state dict stays the official one."""
        device = torch.device(device)
        if device not in self._rope_tables:
            table = rope_table(self.cfg.arch.head_dim, self.cfg.schedule, self.cfg.rope_last_hw)
            self._rope_tables[device] = table.to(device)
        return self._rope_tables[device]

    # ------------------------------------------------------------------ one scale
    def run_blocks(self, x: torch.Tensor, si: int, gss: torch.Tensor, text: TextKV, rope: torch.Tensor,
                   cache: "KVCache", cfg_hook=None) -> torch.Tensor:
        """Scale ``si``'s tokens ``[R, n, C]`` through every block (the level embedding first).

        rope: this scale's slice ``[2, n, head_dim/2]``. ``cfg_hook(layer, x) -> x``: optional, after
        each block (guidance on a hidden state, the official ``cfg_insertion_layer < 0``).
        """
        x = x + self.lvl_embed.weight[si]
        for i, block in enumerate(self.blocks):
            x = block(x, gss, text, rope, cache, i)
            if cfg_hook is not None:
                x = cfg_hook(i, x)
        return x

    def logits(self, x: torch.Tensor, sos: torch.Tensor) -> torch.Tensor:
        """``[R, n, C]`` → fp32 bit logits ``[R, n, 2·d]`` (``[bits, 2 classes]`` interleaved; fp32 as
        the official ``get_logits``)."""
        return self.head(self.head_nm(x.float(), sos.float())).float()


def pack_text(features: torch.Tensor, lens: list[int] | tuple[int, ...]) -> TextKV:
    """``[B, T, Ct]`` padded features and per-row lengths → the packed :class:`TextKV`."""
    if len(lens) != features.shape[0] or min(lens) < 1 or max(lens) > features.shape[1]:
        raise ValueError(f"text lengths {list(lens)} do not fit features of shape {tuple(features.shape)}")
    return TextKV(torch.cat([f[:n] for f, n in zip(features, lens)]), tuple(int(n) for n in lens))


def with_unconditional(text: TextKV, cfg_uncond: torch.Tensor) -> TextKV:
    """Append one unconditional row per prompt: the learned ``cfg_uncond`` cut to that prompt's length."""
    if max(text.lens) > cfg_uncond.shape[0]:
        raise ValueError(f"a prompt of {max(text.lens)} tokens exceeds the model's {cfg_uncond.shape[0]}")
    un = torch.cat([cfg_uncond[:n] for n in text.lens]).to(text.kv.dtype)
    return TextKV(torch.cat((text.kv, un)), text.lens + text.lens)


def interpolate_codes(codes: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """``[B, d, 1, h, w]`` → ``[B, d, 1, H, W]``: the official trilinear resize (bilinear, T = 1)."""
    return F.interpolate(codes, size=(1, *hw), mode="trilinear")
