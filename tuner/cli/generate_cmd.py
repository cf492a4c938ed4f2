"""``tuner generate``: images from a model (optionally under a policy file), as PNGs + samples.npz."""
from __future__ import annotations

from typing import Optional

import typer

from tuner.cli import model_opts as mo
from tuner.cli.common import BACKENDS, check_choice, parse_int_list, resolve_backend, resolve_device, torch_dtype, user_errors, writable_dir
from tuner.errors import UserError

DEMO_CLASSES = "207,360,387,974,88,979,417,279"


def register(app: typer.Typer) -> None:
    app.command("generate", help="Generate class-conditional images and write samples.npz + one PNG each.")(generate)


@user_errors
def generate(
    model: str = mo.ModelOpt,
    var_ckpt: Optional[str] = mo.VarCkptOpt,
    vae_ckpt: Optional[str] = mo.VaeCkptOpt,
    weights_dir: Optional[str] = mo.WeightsDirOpt,
    random_weights: bool = mo.RandomWeightsOpt,
    classes: Optional[str] = typer.Option(
        None, "--classes", help="Comma-separated class ids (default: 8 ImageNet demo classes, or every class of a smaller model)."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed (batch i uses seed + i)."),
    cfg: float = typer.Option(1.5, "--cfg", help="Classifier-free guidance strength (ramped over scales)."),
    top_k: int = typer.Option(900, "--top-k", help="Top-k filtering (0 = off; >= vocab keeps all)."),
    top_p: float = typer.Option(0.96, "--top-p", help="Nucleus filtering mass in [0, 1] (0 = off)."),
    policy: Optional[str] = mo.PolicyOpt,
    out: str = typer.Option("samples", "--out", help="Output directory."),
    device: str = mo.DeviceOpt,
    dtype: str = mo.DtypeOpt,
    batch_size: int = typer.Option(16, "--batch-size", help="Images per forward pass."),
    attention_backend: str = mo.BackendOpt,
    upscale: int = typer.Option(0, "--png-upscale", help="Nearest-neighbour PNG upscale (0 = 8x for tiny, else 1)."),
) -> None:
    import torch
    from rich.progress import Progress

    from tuner.images import make_grid, save_png, save_samples
    from tuner.model.generate import generate as run

    mo.check_sampling(cfg, top_k, top_p)
    if batch_size <= 0:
        raise UserError(f"--batch-size {batch_size} must be positive")
    tdtype = torch_dtype(dtype)
    check_choice(attention_backend, BACKENDS, "--attention-backend")
    dev = resolve_device(device)
    out_dir = writable_dir(out)
    loaded = mo.load_model_from_options(model, var_ckpt, vae_ckpt, weights_dir, random_weights, dev)
    n_cls = loaded.config.var.num_classes
    default_classes = DEMO_CLASSES if n_cls == 1000 else ",".join(map(str, range(n_cls)))
    labels = parse_int_list(classes if classes is not None else default_classes, "--classes")
    bad = [c for c in labels if not 0 <= c < n_cls]
    if bad:
        raise UserError(f"--classes {bad[0]} is outside [0, {n_cls}) for model {loaded.config.name}")
    pol, spec = mo.load_policy_option(policy, loaded)
    backend = resolve_backend(attention_backend, dev)

    label_t = torch.tensor(labels, dtype=torch.long, device=dev)
    chunks = list(torch.split(label_t, batch_size))
    images, kv_bytes = [], 0
    with Progress(transient=True, disable=len(chunks) == 1) as progress:
        task = progress.add_task("generating", total=len(chunks))
        for i, chunk in enumerate(chunks):
            res = run(loaded.var, loaded.vae, chunk, seed=seed + i, cfg=cfg, top_k=top_k, top_p=top_p,
                      policy=pol, spec=spec, backend=backend, dtype=tdtype)
            images.append(res.images.cpu())
            kv_bytes = max(kv_bytes, res.kv_bytes_allocated)
            progress.advance(task)
    imgs = torch.cat(images)
    scale = upscale or (8 if loaded.config.resolution <= 64 else 1)
    save_samples(out_dir, imgs, label_t.cpu(), upscale=scale)
    save_png(make_grid(imgs, nrow=min(8, len(imgs))), out_dir / "grid.png", upscale=scale)
    per_image = kv_bytes / min(batch_size, len(labels))
    typer.echo(f"wrote {len(labels)} images of {loaded.config.name} ({loaded.source}) to {out_dir}/ "
               f"(samples.npz, grid.png, one PNG each); policy {pol.family}, "
               f"KV cache {per_image / 2**20:.2f} MiB per image")
