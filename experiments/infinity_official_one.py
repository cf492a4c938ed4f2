"""One configuration of :mod:`experiments.infinity_official_check` (run by it in a fresh interpreter,
with the official checkout and the stand-in modules on ``PYTHONPATH``). Prints one JSON line."""
from __future__ import annotations

import argparse
import inspect
import json
import textwrap
from pathlib import Path

import torch

TEXT_CHANNELS, TEXT_MAXLEN = 256, 16


def patch_official() -> None:
    """Plain bodies of the compiled norms; cross-attention without the bf16 cast (our deviation)."""
    import infinity.models.basic as basic
    import infinity.models.fused_op as fused

    for name in ("fused_rms_norm", "fused_ada_layer_norm", "fused_ada_rms_norm"):
        fn = getattr(fused, name)
        setattr(fused, name, getattr(fn, "__wrapped__", fn))
    src = textwrap.dedent(inspect.getsource(basic.CrossAttention.forward))
    if "if q_compact.dtype == torch.float32:" not in src:
        raise SystemExit("the official CrossAttention.forward changed; review the bf16-cast edit")
    ns: dict = {}
    exec(src.replace("if q_compact.dtype == torch.float32:", "if False:"), basic.__dict__, ns)
    basic.CrossAttention.forward = ns["forward"]


def official_models(patchify: bool):
    """The official transformer and a small official BSQ-VAE, random weights."""
    from infinity.models.bsq_vae import vae as vae_module
    from infinity.models.infinity import Infinity

    from tuner.model.loading import randomize_

    # the official vae_model() with fewer channels and residual blocks (its other arguments unchanged)
    src = inspect.getsource(vae_module.vae_model).replace("base_ch=128", "base_ch=32") \
        .replace("num_res_blocks=2", "num_res_blocks=1")
    ns: dict = {}
    exec(src, vae_module.__dict__, ns)
    bits = 4 if patchify else 8
    mult = [1, 2, 2, 2] if patchify else [1, 1, 2, 2, 2]
    vae = ns["vae_model"](None, "dynamic", bits, 2 ** bits, patch_size=8 if patchify else 16,
                          encoder_ch_mult=mult, decoder_ch_mult=mult)
    randomize_(vae, 5).eval()
    model = Infinity(vae_local=vae, text_channels=TEXT_CHANNELS, text_maxlen=TEXT_MAXLEN, shared_aln=True,
                     raw_scale_schedule=None, checkpointing="full-block", customized_flash_attn=False,
                     fused_norm=True, pad_to_multiplier=128, use_flex_attn=False,
                     add_lvl_embeding_only_first_block=1, use_bit_label=1, rope2d_each_sa_layer=1,
                     rope2d_normalized_by_hw=2, pn="1M", apply_spatial_patchify=int(patchify),
                     inference_mode=True, train_h_div_w_list=[1.0], depth=2, embed_dim=64, num_heads=4,
                     mlp_ratio=4, block_chunks=2)
    randomize_(model, 7).eval()
    return model, vae, bits


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", required=True)
    ap.add_argument("--sides", default="1,2,4")
    ap.add_argument("--aspect", default=None, help="an official ratio H:W (with --scales instead of --sides)")
    ap.add_argument("--scales", type=int, default=None, help="the first N maps of the --aspect schedule")
    ap.add_argument("--lens", default="10,6")
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--top_k", type=int, default=900)
    ap.add_argument("--top_p", type=float, default=0.97)
    ap.add_argument("--layer", type=int, default=0)
    ap.add_argument("--patchify", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    patch_official()
    from infinity.utils.dynamic_resolution import dynamic_resolution_h_w

    from tuner.model.infinity_generate import generate_infinity, random_text
    from tuner.model.infinity_loading import load_infinity

    model, vae, bits = official_models(bool(args.patchify))
    work = Path(args.work)
    torch.save(model.state_dict(), work / "model.pth")
    torch.save({"vae": vae.state_dict()}, work / "vae.pth")
    lens = [int(n) for n in args.lens.split(",")]
    h_div_w = 1.0
    if args.aspect is not None:  # the first --scales maps of the official schedule of that ratio
        from tuner.model.infinity_schedules import aspect_ratio

        h_div_w = aspect_ratio(args.aspect)
        schedule = [(1, h, w) for _, h, w in dynamic_resolution_h_w[h_div_w]["1M"]["scales"][:args.scales]]
    else:
        schedule = [(1, s, s) for s in (int(s) for s in args.sides.split(","))]
    full = [(1, h, w) for _, h, w in dynamic_resolution_h_w[h_div_w]["1M"]["scales"]]
    # a prefix of the 1M schedule: RoPE stays normalised to the ratio's 1M map, as in our engine
    model.rope2d_freqs_grid[str(tuple(schedule))] = model.rope2d_freqs_grid[str(tuple(full))]
    text, _ = random_text(len(lens), TEXT_CHANNELS, max(lens), seed=1)
    packed = torch.cat([f[:n] for f, n in zip(text, lens)])
    cu = torch.nn.functional.pad(torch.tensor(lens, dtype=torch.int32).cumsum(0), (1, 0)).to(torch.int32)

    seen_bits, seen_images = [], []  # what the official loop samples and decodes
    lfq, decode = vae.quantizer.lfq, vae.decode
    to_codes = lfq.indices_to_codes
    lfq.indices_to_codes = lambda idx, label_type="int_label", project_out=True: (
        seen_bits.append(idx.clone()), to_codes(idx, label_type, project_out))[1]
    vae.decode = lambda z: (lambda img: (seen_images.append(img.clone()), img)[1])(decode(z))
    with torch.no_grad():
        model.autoregressive_infer_cfg(
            vae=vae, scale_schedule=schedule, label_B_or_BLT=(packed, lens, cu, max(lens)), B=len(lens),
            g_seed=42, cfg_list=[args.cfg] * len(schedule), tau_list=[1.0] * len(schedule), top_k=args.top_k,
            top_p=args.top_p, returns_vemb=1, cfg_insertion_layer=[args.layer], vae_type=bits, ret_img=True,
            inference_mode=True)
    reference = (seen_images[0] + 1) / 2

    loaded = load_infinity(work / "model.pth", work / "vae.pth", h_div_w=h_div_w, scales=len(schedule))
    assert loaded.engine.schedule == tuple((h, w) for _, h, w in schedule)
    ours = generate_infinity(loaded.model, loaded.vae, text, lens, seed=42, cfg=args.cfg, top_k=args.top_k,
                             top_p=args.top_p, cfg_insertion_layer=args.layer)
    equal = 0
    for mine, theirs in zip(ours.tokens, seen_bits):
        theirs = theirs.squeeze(1)  # [B, h', w', bits]
        if args.patchify:  # the official bits are per latent cell; ours per token (2×2 cells)
            theirs = torch.nn.functional.pixel_unshuffle(theirs.permute(0, 3, 1, 2).float(), 2) \
                .permute(0, 2, 3, 1).long()
        equal += int(torch.equal(mine, theirs.reshape(mine.shape)))
    print(json.dumps({"scales": len(schedule), "equal_scales": equal, "bits_equal": equal == len(schedule),
                      "maps": [[h, w] for _, h, w in schedule], "bits": sum(t.numel() for t in ours.tokens),
                      "image_max_diff": float((ours.images - reference).abs().max())}))


if __name__ == "__main__":
    main()
