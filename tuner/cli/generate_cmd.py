"""``tuner generate``: images from a model (optionally under a policy file), as PNGs + samples.npz."""
from __future__ import annotations

from typing import List, Optional

import typer

from tuner.cli import model_opts as mo
from tuner.cli.common import torch_dtype, user_errors
from tuner.errors import UserError
from tuner.options import (
    BACKENDS,
    DTYPE_NAMES,
    check_choice,
    check_sampling,
    check_seed,
    parse_int_list,
    resolve_backend,
    resolve_device,
)
from tuner.paths import check_writable_dir, writable_dir
from tuner.threads import apply_threads, check_threads

DEMO_CLASSES = "207,360,387,974,88,979,417,279"
DEMO_PROMPTS = 8  # Infinity without --prompt/--prompts: the first 8 built-in prompts


def register(app: typer.Typer) -> None:
    app.command("generate", help="Generate images (class-conditional VAR, or text-to-image Infinity from "
                                 "--prompt/--prompts) and write samples.npz + one PNG each.")(generate)


@user_errors
def generate(
    model: str = mo.ModelOpt,
    var_ckpt: Optional[str] = mo.VarCkptOpt,
    vae_ckpt: Optional[str] = mo.VaeCkptOpt,
    weights_dir: Optional[str] = mo.WeightsDirOpt,
    random_weights: bool = mo.RandomWeightsOpt,
    classes: Optional[str] = typer.Option(
        None, "--classes", help="Comma-separated class ids (default: 8 ImageNet demo classes, or every "
                                "class of a smaller model). VAR only."),
    prompt: List[str] = typer.Option([], "--prompt", help="Infinity only: a prompt (repeat for more; "
                                     "default: the first 8 built-in prompts). With --random-weights it only "
                                     "seeds random text features, deterministically."),
    prompts: Optional[str] = mo.PromptsOpt,
    sides: Optional[str] = mo.SidesOpt,
    aspect: Optional[str] = mo.AspectOpt,
    scales: Optional[int] = mo.ScalesOpt,
    seed: int = typer.Option(0, "--seed", help="Sampling seed (batch i uses seed + i)."),
    cfg: Optional[float] = typer.Option(None, "--cfg", help="Classifier-free guidance strength (default: "
                                        "the model's own: 1.5 ramped over the scales for VAR, 3 at every "
                                        "scale for Infinity)."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Top-k filtering (0 = off; >= vocab keeps "
                                        "all; default 900; on Infinity's bits only 1 acts)."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Nucleus filtering mass in [0, 1] (0 = off; "
                                          "default 0.96 for VAR, 0.97 for Infinity)."),
    policy: Optional[str] = mo.PolicyOpt,
    out: str = typer.Option("samples", "--out", help="Output directory."),
    device: str = mo.DeviceOpt,
    dtype: str = mo.DtypeOpt,
    batch_size: int = typer.Option(16, "--batch-size", help="Images per forward pass."),
    attention_backend: str = mo.BackendOpt,
    upscale: int = typer.Option(0, "--png-upscale", help="Nearest-neighbour PNG upscale (0 = 8x for tiny, "
                                "else 1)."),
    threads: Optional[int] = mo.ThreadsOpt,
) -> None:
    # Every check first (cheap ones before torch is even imported); the output directory is made
    # only once all of them passed, so bad input leaves nothing behind.
    check_threads(threads)
    cfg, top_k, top_p = _sampling(model, cfg, top_k, top_p)
    requested = _check_flags(cfg, top_k, top_p, seed, batch_size, upscale, dtype, attention_backend, out,
                             classes)
    prompt_set = _prompt_set(model, prompt, prompts, classes)
    mo.check_schedule_options(sides, aspect, scales)

    apply_threads(threads)
    tdtype = torch_dtype(dtype)
    dev = resolve_device(device)
    loaded = mo.load_model_from_options(model, var_ckpt, vae_ckpt, weights_dir, random_weights, dev,
                                        sides=sides, aspect=aspect, scales=scales, prompts=prompt_set)
    labels = _labels(requested, loaded, prompt_set is not None)
    pol, spec = mo.load_policy_option(policy, loaded)
    backend = resolve_backend(attention_backend, dev)
    out_dir = writable_dir(out)

    label_t, imgs, kv_bytes = _generate_batches(loaded, labels, dev, batch_size, seed, cfg=cfg, top_k=top_k,
                                                top_p=top_p, policy=pol, spec=spec, backend=backend,
                                                dtype=tdtype)
    _write_images(out_dir, imgs, label_t, upscale, loaded)
    per_image = kv_bytes / min(batch_size, len(labels))
    typer.echo(f"wrote {len(labels)} images of {loaded.config.name} ({loaded.source}) to {out_dir}/ "
               f"(samples.npz, grid.png, one PNG each); policy {pol.family}, "
               f"KV cache {per_image / 2**20:.2f} MiB per image")
    if loaded.note:
        typer.echo(f"note: {loaded.note}")


def _sampling(model: str, cfg: Optional[float], top_k: Optional[int],
              top_p: Optional[float]) -> tuple[float, int, float]:
    """The flags given, and the model's own defaults for the others (VAR's FID settings, Infinity's CLI's)."""
    from tuner.model.config import default_sampling

    own = default_sampling(model)
    return (own.cfg if cfg is None else cfg, own.top_k if top_k is None else top_k,
            own.top_p if top_p is None else top_p)


def _check_flags(cfg: float, top_k: int, top_p: float, seed: int, batch_size: int, upscale: int, dtype: str,
                 attention_backend: str, out: str, classes: Optional[str]) -> Optional[list[int]]:
    """Every flag check that needs no model (and no torch); returns the ``--classes`` ids, if given."""
    check_sampling(cfg, top_k, top_p)
    check_seed(seed)
    if batch_size <= 0:
        raise UserError(f"--batch-size {batch_size} must be positive")
    if upscale < 0:
        raise UserError(f"--png-upscale {upscale} must be >= 1 (or 0: 8x for tiny, else 1)")
    check_choice(dtype, DTYPE_NAMES, "--dtype")
    check_choice(attention_backend, BACKENDS, "--attention-backend")
    check_writable_dir(out, "--out")
    return parse_int_list(classes, "--classes") if classes is not None else None


def _prompt_set(model: str, prompt: list[str], prompts: Optional[str],
                classes: Optional[str]) -> Optional[tuple[str, ...]]:
    """The prompts of ``--prompt`` / ``--prompts FILE`` (None: neither given); refused for a
    class-conditional model, with ``--classes``, or both at once."""
    from tuner.model.config import NAMED_MODELS, model_config
    from tuner.model.prompts import MAX_PROMPT_CHARS, read_prompts

    text_model = model in NAMED_MODELS and model_config(model).kind == "infinity"
    given = "--prompt" if prompt else "--prompts" if prompts is not None else None
    if given and not text_model:
        raise UserError(f"{given} needs a text-to-image model (infinity-test, infinity-2b, infinity-8b); "
                        f"--model {model} is class-conditional: pass --classes")
    if text_model and classes is not None:
        raise UserError(f"--classes: --model {model} is text-to-image; pass --prompt TEXT or --prompts FILE")
    if prompt and prompts is not None:
        raise UserError("pass --prompt TEXT (repeatable) or --prompts FILE, not both")
    if prompts is not None:
        return read_prompts(prompts)
    if not prompt:
        return None
    bad = next((q for q in prompt if not q.strip() or len(q) > MAX_PROMPT_CHARS), None)
    if bad is not None:
        raise UserError(f"--prompt {bad[:40]!r} must be non-empty text of at most {MAX_PROMPT_CHARS} "
                        "characters")
    return tuple(q.strip() for q in prompt)


def _labels(requested: Optional[list[int]], loaded, prompts_given: bool = False) -> list[int]:
    """The conditions: ``--classes``, else the demo classes (ImageNet) or every class; for a
    text-to-image model every given prompt, else the first built-in ones; range-checked."""
    if loaded.condition_name == "prompt":
        return list(range(loaded.num_conditions if prompts_given else min(DEMO_PROMPTS,
                                                                          loaded.num_conditions)))
    n_cls = loaded.num_conditions
    labels = requested if requested is not None else (
        parse_int_list(DEMO_CLASSES, "--classes") if n_cls == 1000 else list(range(n_cls)))
    bad = [c for c in labels if not 0 <= c < n_cls]
    if bad:
        raise UserError(f"--classes {bad[0]} is outside [0, {n_cls}) for model {loaded.config.name}")
    return labels


def _generate_batches(loaded, labels: list[int], dev, batch_size: int, seed: int, **sampling):
    """Generate ``labels`` in batches (batch ``i`` seeded ``seed + i``) with a progress bar.

    ``sampling``: the keyword arguments of :func:`tuner.model.generate.generate` shared by every batch.
    Returns ``(labels tensor, images on the CPU, largest KV bytes allocated by one batch)``.
    """
    import torch
    from rich.progress import Progress

    from tuner.model.generate import generate_batches

    label_t = torch.tensor(labels, dtype=torch.long, device=dev)
    n_batches = -(-len(labels) // batch_size)
    with Progress(transient=True, disable=n_batches == 1) as progress:
        task = progress.add_task("generating", total=n_batches)
        images, kv_bytes = generate_batches(loaded, None, label_t, batch_size, seed,
                                            on_batch=lambda: progress.advance(task), **sampling)
    return label_t, images, kv_bytes


def _write_images(out_dir, imgs, label_t, upscale: int, loaded) -> None:
    """Write samples.npz, one PNG per image and grid.png (``upscale`` 0: 8x for tiny, else 1)."""
    from tuner.images import make_grid, save_png, save_samples

    scale = upscale or (8 if loaded.config.resolution <= 64 else 1)
    save_samples(out_dir, imgs, label_t.cpu(), upscale=scale, condition=loaded.condition_name)
    if loaded.condition_name == "prompt":  # what each prompt index meant
        lines = [loaded.describe_condition(int(i)) for i in label_t.tolist()]
        (out_dir / "prompts.txt").write_text("\n".join(lines) + "\n")
    save_png(make_grid(imgs, nrow=min(8, len(imgs))), out_dir / "grid.png", upscale=scale)
