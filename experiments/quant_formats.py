"""Which quantization layout for the cached K and V? Measured on the tiny model's real keys and values.

    python -m experiments.quant_formats           # -> experiments/quant/formats.md

Captures every layer's K/V of a full-cache run (16 images, seed 7; the K/V each scale attends to)
and, per candidate layout, the relative error of K and V and of the attention output of every
(layer, scale) against the unquantized cache (the current scale's own tokens stay exact, as in the
engine). Layouts: per (token, head) vector, symmetric or asymmetric (min/max with a zero point);
per channel over the tokens of each scale (KIVI's key layout, which needs token groups). Bits per
element count the fp16 side values at tiny's head_dim 32.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def _levels(bits: int) -> int:
    return 2 ** bits - 1


def per_vector(x: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """Round trip with one scale (and zero point) per vector along the last dim."""
    if symmetric:
        q = 2 ** (bits - 1) - 1
        s = (x.abs().amax(-1, keepdim=True) / q).to(torch.float16).float()
        return (x / s.clamp_min(1e-30)).round().clamp(-q, q) * s
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    z = lo.to(torch.float16).float()
    s = ((hi - z) / _levels(bits)).to(torch.float16).float()
    return ((x - z) / s.clamp_min(1e-30)).round().clamp(0, _levels(bits)) * s + z


def per_channel(x: torch.Tensor, bits: int, starts: list[int]) -> torch.Tensor:
    """Round trip with one asymmetric scale per channel over the tokens of each scale (dim 2)."""
    out = torch.empty_like(x)
    for a, b in zip(starts[:-1], starts[1:]):
        out[:, :, a:b] = per_vector(x[:, :, a:b].transpose(-1, -2), bits, False).transpose(-1, -2)
    return out


def main(argv=None) -> None:
    from tuner.model.generate import generate
    from tuner.model.loading import load_model

    torch.manual_seed(0)
    m = load_model("tiny")
    g = m.config.var.geometry
    records = []
    generate(m.var, m.vae, torch.arange(10).repeat(2)[:16], seed=7, audit=records.append)
    last = {r.layer: r for r in records if r.scale == g.num_scales - 1}  # K/V of every token
    starts = [g.scale_starts[s] for s in range(g.num_scales)] + [g.seq_len]
    d = g.head_dim
    layouts = {  # name -> (bits per element incl. fp16 side values, K round trip, V round trip)
        "int8 symmetric per vector (shipped)": (8 + 16 / d, lambda k: per_vector(k, 8, True),
                                                lambda v: per_vector(v, 8, True)),
        "int8 asymmetric per vector": (8 + 32 / d, lambda k: per_vector(k, 8, False),
                                       lambda v: per_vector(v, 8, False)),
        "int4 symmetric per vector": (4 + 16 / d, lambda k: per_vector(k, 4, True),
                                      lambda v: per_vector(v, 4, True)),
        "int4 asymmetric per vector (shipped)": (4 + 32 / d, lambda k: per_vector(k, 4, False),
                                                 lambda v: per_vector(v, 4, False)),
        "int4 K per channel (KIVI) + V asymmetric per vector": (
            4 + 32 / d, lambda k: per_channel(k, 4, starts), lambda v: per_vector(v, 4, False)),
    }
    rows = []
    for name, (bits, fk, fv) in layouts.items():
        k_err = v_err = o_err = o_norm = kn = vn = 0.0
        for layer in last:
            # the full K/V of this layer: earlier scales from the records, the last scale's own
            ks = torch.cat([r.k_new for r in records if r.layer == layer], dim=2).float()
            vs = torch.cat([r.v_new for r in records if r.layer == layer], dim=2).float()
            kq, vq = fk(ks), fv(vs)
            k_err += float((kq - ks).pow(2).sum())
            v_err += float((vq - vs).pow(2).sum())
            kn += float(ks.pow(2).sum())
            vn += float(vs.pow(2).sum())
            for r in records:
                if r.layer != layer or r.scale == 0:
                    continue
                a, b = starts[r.scale], starts[r.scale + 1]
                k_mix = torch.cat((kq[:, :, :a], ks[:, :, a:b]), 2)
                v_mix = torch.cat((vq[:, :, :a], vs[:, :, a:b]), 2)
                sdpa = torch.nn.functional.scaled_dot_product_attention
                ref = sdpa(r.q.float(), ks[:, :, :b], vs[:, :, :b], scale=r.softmax_scale)
                got = sdpa(r.q.float(), k_mix, v_mix, scale=r.softmax_scale)
                o_err += float((got - ref).pow(2).sum())
                o_norm += float(ref.pow(2).sum())
        rows.append((name, bits, (k_err / kn) ** 0.5, (v_err / vn) ** 0.5, (o_err / o_norm) ** 0.5))
    lines = ["# Which layout for quantized K/V (tiny, real keys and values)", "",
             "Command: `python -m experiments.quant_formats`. A full-cache run of 16 images (seed 7) is "
             "captured; every layout round-trips every layer's K and V; errors are relative RMS over all "
             "layers (K, V) and over every (layer, scale) attention output with the earlier scales "
             f"quantized and the scale's own tokens exact, as the engine does. head_dim {d}; bits per "
             "element include the fp16 scales / zero points.", "",
             "| layout | bits / element | K rel. error | V rel. error | attention output rel. error |",
             "|---|---|---|---|---|"]
    lines += [f"| {n} | {b:.2f} | {ke:.4f} | {ve:.4f} | {oe:.4f} |" for n, b, ke, ve, oe in rows]
    out = ROOT / "experiments" / "quant" / "formats.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    kept = ""
    marker = "<!-- hand-written conclusion below: kept when the table is regenerated -->"
    if out.is_file() and marker in out.read_text():
        kept = marker + out.read_text().split(marker, 1)[1]
    out.write_text("\n".join(lines) + "\n\n" + kept)
    print(out.read_text())


if __name__ == "__main__":
    main(sys.argv[1:])
