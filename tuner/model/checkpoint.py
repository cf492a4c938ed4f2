"""Reading official-format checkpoints safely and inferring the model shape from tensor shapes.

Every failure becomes a one-line :class:`~tuner.errors.UserError` naming the file and the fix.
Files are read with ``torch.load(..., weights_only=True)``: no pickled code is ever executed.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch

from tuner.errors import UserError
from tuner.model.config import PATCH_NUMS_256, PATCH_NUMS_512, VAEConfig, VARConfig

KNOWN_SCHEDULES = (PATCH_NUMS_256, PATCH_NUMS_512)


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_failure_reason(path: Path, exc: Exception) -> str:
    """A short reason for a failed ``torch.load(weights_only=True)``, without torch's page of advice.

    torch wraps every refusal of the safe unpickler in a long "Weights only load failed..." text whose
    useful part is the line after "WeightsUnpickler error:"; a file that is not a zip archive is
    either truncated, not a checkpoint at all, or a legacy (pre-1.6) pickle.
    """
    import zipfile

    text = str(exc)
    detail = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|Check the documentation|$)", text, re.S)
    glob = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if glob:
        return f"it holds a pickled Python object ({glob.group(1)}), not only tensors, and is never unpickled"
    if not zipfile.is_zipfile(path):
        return "not a zip-format torch checkpoint: truncated, corrupt or not a checkpoint"
    if detail:
        return detail.group(1).splitlines()[0][:120]
    return (text.strip().splitlines() or [type(exc).__name__])[0][:120]


def read_state_dict(path: str | Path, what: str, flag: str = "",
                    inner: str | None = None) -> dict[str, torch.Tensor]:
    """Load a plain state dict (``name -> Tensor``) from ``path``.

    ``what`` names the checkpoint for messages (e.g. "VAR"), ``flag`` the option that sets it (none
    for a path given in Python). ``inner``: the key of a wrapper dict that holds it (e.g. ``"vae"``);
    any single-key wrapper is unwrapped too.
    """
    with_flag = f" with {flag}" if flag else ""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} checkpoint not found: {p}; pass an existing file{with_flag}")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, random bytes, pickled code objects...
        raise UserError(f"{p} is not a readable PyTorch checkpoint ({load_failure_reason(p, exc)}); "
                        f"re-download or re-save it{' and pass it' + with_flag if flag else ''}") from None
    if inner is not None and isinstance(obj, dict) and isinstance(obj.get(inner), dict):
        obj = obj[inner]
    elif isinstance(obj, dict) and len(obj) == 1 and isinstance(next(iter(obj.values())), dict):
        obj = next(iter(obj.values()))  # {"model": state_dict} / {"state_dict": ...} wrappers
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        fix = f"pass a {what} state dict{with_flag}" if flag else f"pass the official {what} file"
        raise UserError(f"{p} does not hold a state dict of tensors; {fix}")
    return obj


def looks_like_vae(sd: dict) -> bool:
    return any(k.startswith(("encoder.", "decoder.", "quantize.")) for k in sd)


def looks_like_var(sd: dict) -> bool:
    return "class_emb.weight" in sd or any(k.startswith("blocks.") for k in sd)


def _require_kind(sd: dict, source: str, kind: str, marker: str, other: str, looks_like_other,
                  swap: str, fix: str) -> None:
    """Raise a :class:`UserError` unless ``sd`` holds the ``marker`` tensor of a ``kind`` checkpoint.

    The two model files are easy to swap on the command line, so that case gets its own message.
    """
    if marker not in sd:
        if looks_like_other(sd):
            raise UserError(f"{source} holds a {other} state dict, not a {kind} one; swap the files: {swap}")
        raise UserError(f"{source} is not a {kind} checkpoint (no {marker}); pass {fix}")


def _count_indexed(sd: dict, pattern: str) -> int:
    """``1 + max(i)`` over the keys matching ``pattern`` (group 1 is ``i``); ``ValueError`` if none."""
    return 1 + max(int(m.group(1)) for k in sd if (m := re.match(pattern, k)))


def infer_var_config(sd: dict[str, torch.Tensor],
                     source: str = "VAR checkpoint") -> tuple[VARConfig, int, int]:
    """Infer ``(VARConfig, vae_z, vocab)`` from an official-format VAR state dict."""
    _require_kind(sd, source, "VAR", "class_emb.weight", "VQ-VAE", looks_like_vae,
                  "--var-ckpt takes var_d*.pth, --vae-ckpt takes vae_*.pth", "var_d<N>.pth")
    try:
        classes, c = sd["class_emb.weight"].shape
        depth = _count_indexed(sd, r"blocks\.(\d+)\.")
        l2 = "blocks.0.attn.scale_mul_1H11" in sd
        heads = int(sd["blocks.0.attn.scale_mul_1H11"].shape[1]) if l2 else c // 64
        num_scales = sd["lvl_embed.weight"].shape[0]
        seq_len = sd["pos_1LC"].shape[1]
        mlp_ratio = sd["blocks.0.ffn.fc1.weight"].shape[0] / c
        vae_z, vocab = sd["word_embed.weight"].shape[1], sd["head.weight"].shape[0]
    except (KeyError, ValueError) as exc:
        raise UserError(f"{source} is missing VAR tensors ({exc}); pass an official var_d<N>.pth") from None
    patch_nums = _infer_patch_nums(sd, num_scales, seq_len, source)
    cfg = VARConfig(depth=depth, patch_nums=patch_nums, num_classes=classes - 1, embed_dim=c, num_heads=heads,
                    mlp_ratio=mlp_ratio, shared_aln="shared_ada_lin.1.weight" in sd, attn_l2_norm=l2)
    return cfg, vae_z, vocab


def _infer_patch_nums(sd: dict, num_scales: int, seq_len: int, source: str) -> tuple[int, ...]:
    if "lvl_1L" in sd:  # level id per token: counts per level are pn**2
        counts = torch.bincount(sd["lvl_1L"].flatten().long(), minlength=num_scales).tolist()
        pns = tuple(int(round(n ** 0.5)) for n in counts)
        if all(p * p == n for p, n in zip(pns, counts)):
            return pns
    for sched in KNOWN_SCHEDULES:
        if len(sched) == num_scales and sum(p * p for p in sched) == seq_len:
            return sched
    raise UserError(f"{source}: cannot infer the scale schedule ({num_scales} scales, {seq_len} tokens); "
                    "the checkpoint needs its lvl_1L buffer")


def infer_vae_config(sd: dict[str, torch.Tensor], source: str = "VAE checkpoint") -> VAEConfig:
    """Infer a :class:`VAEConfig` from an official-format VQ-VAE state dict."""
    _require_kind(sd, source, "VQ-VAE", "quantize.embedding.weight", "VAR", looks_like_var,
                  "--vae-ckpt takes vae_*.pth, --var-ckpt takes var_d*.pth", "vae_*.pth")
    try:
        vocab, z = sd["quantize.embedding.weight"].shape
        ch = sd["decoder.conv_out.weight"].shape[1]
        levels = _count_indexed(sd, r"decoder\.up\.(\d+)\.")
        ch_mult = tuple(sd[f"decoder.up.{i}.block.0.conv2.weight"].shape[0] // ch for i in range(levels))
        blocks = _count_indexed(sd, r"decoder\.up\.0\.block\.(\d+)\.")
        n_phi = sum(1 for k in sd if re.fullmatch(r"quantize\.quant_resi\.qresi_ls\.\d+\.weight", k))
        per_scale = "quantize.quant_resi.0.weight" in sd  # share_quant_resi=0: one Phi per scale
        has_phi = n_phi or per_scale or "quantize.quant_resi.qresi.weight" in sd
    except (KeyError, ValueError) as exc:
        raise UserError(f"{source} is missing VQ-VAE tensors ({exc}); pass an official vae_*.pth") from None
    return VAEConfig(
        vocab_size=vocab, z_channels=z, ch=ch, ch_mult=ch_mult, num_res_blocks=blocks - 1,
        share_quant_resi=0 if per_scale else (n_phi or 1),
        quant_resi=0.5 if has_phi else 0.0,  # no Phi tensors: the residual conv was disabled
        using_sa=f"decoder.up.{levels - 1}.attn.0.qkv.weight" in sd,
        using_mid_sa="decoder.mid.attn_1.qkv.weight" in sd,
    )


def load_strict(module: torch.nn.Module, sd: dict[str, torch.Tensor], source: str,
                tolerate: tuple[str, ...] = ()) -> None:
    """``load_state_dict(strict=True)`` with a one-line error listing the first problems.

    ``tolerate`` names keys whose shape may differ (the module handles them, e.g. the VAE's
    ``quantize.ema_vocab_hit_SV`` whose first dim is the number of scales).
    """
    expected = module.state_dict()
    missing = [k for k in expected if k not in sd]
    extra = [k for k in sd if k not in expected]
    shaped = [f"{k} {tuple(sd[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
              if k in sd and k not in tolerate and tuple(sd[k].shape) != tuple(v.shape)]
    problems = []
    if missing:
        problems.append(f"missing keys {_first(missing)}")
    if extra:
        problems.append(f"unexpected keys {_first(extra)}")
    if shaped:
        problems.append(f"mis-shaped {_first(shaped)}")
    if problems:
        raise UserError(f"{source} does not match the model: {'; '.join(problems)}; "
                        "pass an unmodified official-format checkpoint")
    module.load_state_dict(sd, strict=True)


def _first(items: list[str], n: int = 3) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more
