"""The Infinity engine against the official code itself: same random weights, seeds and text features.

    python -m experiments.infinity_official_check --official DIR   # -> experiments/infinity/official_check.md

``DIR`` is a checkout of FoundationVision/Infinity (MIT; the directory holding ``infinity/models``).
Nothing of it is copied here: for every configuration a subprocess imports the official package,
builds the official ``Infinity`` (depth 2, 2 block chunks, width 64, 4 heads, 256-wide text) and a
small official ``vae_model`` (base channels 32, one residual block), draws random weights with
:func:`tuner.model.loading.randomize_`, saves both state dicts in the official format, runs the
official ``autoregressive_infer_cfg`` on CPU in fp32, then loads the saved files through our strict
loader and runs :func:`tuner.model.infinity_generate.generate_infinity` with the same seed and
features. The table compares the sampled bits of every scale and the decoded images. A configuration
is a prefix of the 1:1 schedule (``sides``) or the first ``scales`` maps of another official ratio
(``aspect``): that schedule is what both sides generate (``scale_schedule`` of the official call), RoPE
normalised to the ratio's 1M map on both.

What the official code needs and a CPU lacks is replaced by plain stand-ins written to a temporary
directory: ``flash_attn``'s varlen kernel by per-prompt ``scaled_dot_product_attention`` (what it
computes), ``einops.rearrange`` for the two patterns the path uses, empty modules for ``timm``,
``safetensors``, ``imageio``, ``torchvision`` and ``pytz`` (imported, not used on this path). The fused
norm helpers run their plain Python bodies (``__wrapped__`` of their ``torch.compile``). One edit is
applied to the official path, our one documented deviation: its cross-attention's cast to bf16 in an
fp32 run is skipped (``docs/design.md``, Model engine).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# name -> flags of one configuration (sides, or aspect + scales; prompt lengths, guidance, sampling,
# patchify)
CONFIGS = {
    "official CLI: cfg 3 on the logits, ragged prompts": dict(sides="1,2,4,6,8", lens="10,6"),
    "guidance on the last block's output, top-k 1": dict(sides="1,2,4,6", lens="7,7", cfg=4.0, layer=-1,
                                                         top_k=1, top_p=0.0),
    "top-p 0.5, three prompts": dict(sides="1,2,4,6", lens="5,3,9", top_p=0.5),
    "no guidance (cfg 1)": dict(sides="1,2,4,6", lens="8,4", cfg=1.0),
    "8B layout (spatial patchify)": dict(sides="1,2,4,6", lens="6,4", patchify=1),
    "7 scales, 256² image": dict(sides="1,2,4,6,8,12,16", lens="9,5"),
    "2:1, its first 5 scales (160 × 80 image)": dict(aspect="2:1", scales=5, lens="9,5"),
    "1:2, 8B layout, guidance on the last block": dict(aspect="1:2", scales=4, lens="6,4", patchify=1,
                                                      layer=-1),
}
STUBS = {
    "flash_attn/__init__.py": '''import torch, torch.nn.functional as F
def flash_attn_func(*a, **k):
    raise RuntimeError("not on the inference path")
def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                    dropout_p=0.0, softmax_scale=None):
    out = []
    for i in range(len(cu_seqlens_q) - 1):
        q0, q1, k0, k1 = (int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1]), int(cu_seqlens_k[i]),
                          int(cu_seqlens_k[i + 1]))
        out.append(F.scaled_dot_product_attention(q[q0:q1].transpose(0, 1), kv[k0:k1, 0].transpose(0, 1),
                                                  kv[k0:k1, 1].transpose(0, 1), scale=softmax_scale)
                   .transpose(0, 1))
    return torch.cat(out)
''',
    "einops/__init__.py": '''def rearrange(t, pattern, **kw):
    if pattern == "... c d -> ... (c d)":
        return t.reshape(*t.shape[:-2], -1)
    if pattern == "b ... d -> b d ...":
        return t.movedim(-1, 1)
    raise NotImplementedError(pattern)
def reduce(*a, **k):
    raise NotImplementedError
pack = unpack = reduce
''',
    "timm/__init__.py": "",
    "timm/models/__init__.py": "def register_model(f):\n    return f\n",
    "timm/models/layers.py": '''import torch.nn as nn
class DropPath(nn.Identity):
    def __init__(self, *a, **k):
        super().__init__()
def drop_path(x, *a, **k):
    return x
''',
    "timm/loss.py": "class SoftTargetCrossEntropy:\n    pass\n",
    "safetensors/__init__.py": "",
    "safetensors/torch.py": "def load_file(*a, **k):\n    raise RuntimeError('not used')\n",
    "imageio/__init__.py": "",
    "torchvision/__init__.py": "transforms = None\n",
    "pytz.py": "",
}


def write_stubs(where: Path) -> None:
    for rel, text in STUBS.items():
        path = where / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def run_one(official: Path, stubs: Path, work: Path, flags: dict) -> dict:
    """One configuration in a fresh interpreter (the official modules are patched in place)."""
    argv = [sys.executable, "-m", "experiments.infinity_official_one", "--work", str(work)]
    for k, v in flags.items():
        argv += [f"--{k}", str(v)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(official), str(stubs)])}
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"configuration {flags} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--official", required=True, help="checkout of FoundationVision/Infinity")
    ap.add_argument("--out", default=str(ROOT / "experiments" / "infinity" / "official_check.md"))
    args = ap.parse_args(argv)
    official = Path(args.official)
    if not (official / "infinity" / "models" / "infinity.py").is_file():
        raise SystemExit(f"error: {official} is not a checkout of FoundationVision/Infinity "
                         "(no infinity/models/infinity.py); pass --official DIR")
    commit = subprocess.run(["git", "-C", str(official), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip() or "unknown"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        stubs = Path(tmp) / "stubs"
        write_stubs(stubs)
        for name, flags in CONFIGS.items():
            r = run_one(official, stubs, Path(tmp), flags)
            rows.append((name, flags, r))
            print(f"{name}: bits equal {r['bits_equal']}, image max |diff| {r['image_max_diff']:.2e}")
    lines = ["# Infinity engine vs the official `autoregressive_infer_cfg` (CPU, fp32)", "",
             f"Official code: FoundationVision/Infinity @{commit}. Command: `python -m "
             "experiments.infinity_official_check --official DIR`. Depth-2 random official-format weights "
             "(64 wide, 4 heads, 256-wide text features, small BSQ-VAE), seed 42 for sampling, the same "
             "random text features on both sides; our side loads the official state dicts strictly.", "",
             "| configuration | scales (sides, or h×w maps) | prompts (tokens) | scales with equal bits "
             "| bits compared | image max \\|diff\\| |", "|---|---|---|---|---|---|"]
    for name, flags, r in rows:
        maps = flags.get("sides") or " ".join(f"{h}×{w}" for h, w in r["maps"])
        lines.append(f"| {name} | {maps} | {flags['lens']} | {r['equal_scales']}/{r['scales']} "
                     f"| {r['bits']:,} | {r['image_max_diff']:.1e} |")
    lines += ["", "Equal bits at every scale mean the two runs sampled the same tokens from the same "
              "generator stream; the images then differ only by float rounding (0 here: the same "
              "operations in the same order). The official GPU run draws from a CUDA generator, so GPU "
              "images are compared with GPU images, not with these."]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
