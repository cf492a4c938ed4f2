"""Train the built-in ``tiny`` model: the multi-scale VQ-VAE, then the VAR transformer.

Same modules as the engine (``tuner.model.vqvae.VQVAE``, ``tuner.model.var.VARTransformer``): no
second implementation. Resumable: every stage checkpoints into ``--workdir`` and a re-run continues
where it stopped. Writes official-format state dicts to ``--assets`` (default: the package's
``tuner/assets/tiny``) and a loss log for the model card.

    python -m experiments.train_tiny --vae-steps 500 --var-steps 1500   # the shipped model (~35 min, 2 cores)
    python -m experiments.train_tiny                       # both stages, longer defaults (1500 / 3000 steps)
    python -m experiments.train_tiny --vae-steps 200 --var-steps 100 --workdir /tmp/t   # smoke run
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from tuner.data.procedural import make_dataset
from tuner.model.config import tiny_config
from tuner.model.loading import build_models

ROOT = Path(__file__).resolve().parent.parent


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeRemainingColumn())


def _lr(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _save(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)  # atomic: an interrupted save never corrupts the resume point


def _load(path: Path) -> dict | None:
    return torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None


def _resume(workdir: Path, stage: str, model: torch.nn.Module, opt: torch.optim.Optimizer,
            log: list | None = None) -> int:
    """Restore ``model`` and ``opt`` from the ``stage`` checkpoint in ``workdir``; the step it reached.

    Returns 0 (and touches nothing) when the stage has no checkpoint yet. With ``log``, the saved
    loss log replaces its contents too: only the first stage passes it, since the log on disk
    already holds the entries of every stage that ran before the interruption.
    """
    if (state := _load(workdir / f"{stage}_stage.pt")) is None:
        return 0
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    if log is not None:
        log[:] = json.loads((workdir / "log.json").read_text()) if (workdir / "log.json").is_file() else []
    return int(state["step"])


def _checkpoint(workdir: Path, stage: str, model: torch.nn.Module, opt: torch.optim.Optimizer, step: int,
                log: list) -> None:
    """Save the ``stage`` resume point (model, optimizer, step) and the loss log into ``workdir``."""
    _save(workdir / f"{stage}_stage.pt", {"model": model.state_dict(), "opt": opt.state_dict(),
                                          "step": torch.tensor(step)})
    (workdir / "log.json").write_text(json.dumps(log))


def _batch_generator(seed: int, n: int, batch: int, done: int) -> torch.Generator:
    """The generator of a stage's batch indices, advanced past the ``done`` batches already trained."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(done):  # replay the batch order so a resumed run sees the same data
        torch.randint(0, n, (batch,), generator=g)
    return g


def train_vae(args, images: torch.Tensor, log: list) -> torch.nn.Module:
    cfg = tiny_config()
    _, vae = build_models(cfg)
    vae.train()
    opt = torch.optim.Adam(vae.parameters(), lr=args.vae_lr, betas=(0.5, 0.9))
    step = _resume(args.workdir, "vae", vae, opt, log)
    g = _batch_generator(args.seed, len(images), args.vae_batch, step)
    with _progress() as prog:
        task = prog.add_task("VQ-VAE", total=args.vae_steps, completed=step, info="")
        while step < args.vae_steps:
            idx = torch.randint(0, len(images), (args.vae_batch,), generator=g)
            x = images[idx]
            for group in opt.param_groups:
                group["lr"] = _lr(step, args.vae_steps, args.vae_lr, 50)
            rec, vq_loss, usage = vae(x)
            rec_loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x)
            loss = rec_loss + vq_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step % args.reset_every == 0 and step < 0.8 * args.vae_steps:
                with torch.no_grad():  # re-seed codes unused since the last reset from real encoder outputs
                    # independent of the batch order
                    rg = torch.Generator().manual_seed(args.seed * 100_003 + step)
                    sample = images[torch.randint(0, len(images), (256,), generator=rg)]
                    vae.quantize.reset_dead_codes(vae.quantize.lookup_inputs(vae.encode_features(sample)),
                                                  generator=rg)
            if step % 10 == 0:
                log.append({"stage": "vae", "step": step, "rec": float(rec_loss), "vq": float(vq_loss),
                            "usage": float(usage)})
                prog.update(task, completed=step, info=f"rec {float(rec_loss):.4f} usage {float(usage):.2f}")
            if step % args.save_every == 0 or step == args.vae_steps:
                _checkpoint(args.workdir, "vae", vae, opt, step, log)
    return vae.eval()


@torch.no_grad()
def tokenize(vae, images: torch.Tensor, batch: int = 512) -> list[torch.Tensor]:
    """Per-scale token ids for every image: list over scales of ``[N, pn*pn]``."""
    parts = [vae.img_to_idxBl(images[i:i + batch]) for i in range(0, len(images), batch)]
    return [torch.cat([p[s] for p in parts]) for s in range(len(parts[0]))]


def train_var(args, vae, tokens: list[torch.Tensor], labels: torch.Tensor, log: list) -> torch.nn.Module:
    cfg = tiny_config()
    var, _ = build_models(cfg)
    var.train()
    decay = [p for n, p in var.named_parameters() if p.dim() >= 2 and "emb" not in n and "pos" not in n]
    no_decay = [p for n, p in var.named_parameters()
                if not (p.dim() >= 2 and "emb" not in n and "pos" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.var_lr, betas=(0.9, 0.95))
    step = _resume(args.workdir, "var", var, opt)
    g = _batch_generator(args.seed + 1, len(labels), args.var_batch, step)
    quant = vae.quantize
    with _progress() as prog:
        task = prog.add_task("VAR", total=args.var_steps, completed=step, info="")
        while step < args.var_steps:
            idx = torch.randint(0, len(labels), (args.var_batch,), generator=g)
            idx_Bl = [t[idx] for t in tokens]
            with torch.no_grad():
                x_in = quant.idxBl_to_var_input(idx_Bl)
            target = torch.cat(idx_Bl, dim=1)
            for group in opt.param_groups:
                group["lr"] = _lr(step, args.var_steps, args.var_lr, 100)
            logits = var(labels[idx], x_in)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(var.parameters(), 2.0)
            opt.step()
            step += 1
            if step % 10 == 0:
                log.append({"stage": "var", "step": step, "ce": float(loss)})
                prog.update(task, completed=step, info=f"ce {float(loss):.3f}")
            if step % args.save_every == 0 or step == args.var_steps:
                _checkpoint(args.workdir, "var", var, opt, step, log)
    return var.eval()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=ROOT / "experiments" / "tiny" / "work")
    ap.add_argument("--assets", type=Path, default=ROOT / "tuner" / "assets" / "tiny")
    ap.add_argument("--images", type=int, default=30000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vae-steps", type=int, default=1500)
    ap.add_argument("--vae-batch", type=int, default=32)
    ap.add_argument("--vae-lr", type=float, default=3e-4)
    ap.add_argument("--reset-every", type=int, default=100)
    ap.add_argument("--var-steps", type=int, default=3000)
    ap.add_argument("--var-batch", type=int, default=64)
    ap.add_argument("--var-lr", type=float, default=1e-3)
    ap.add_argument("--save-every", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.workdir.mkdir(parents=True, exist_ok=True)
    args.assets.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    images, labels = make_dataset(args.images, seed=args.seed)
    log: list = []
    vae = train_vae(args, images, log)
    t_vae = time.time() - t0
    torch.save(vae.state_dict(), args.assets / "vae_tiny.pth")
    tokens = tokenize(vae, images)
    var = train_var(args, vae, tokens, labels, log)
    torch.save(var.state_dict(), args.assets / "var_tiny.pth")
    summary = {"seconds_total": time.time() - t0, "seconds_vae": t_vae, "images": args.images,
               "vae_steps": args.vae_steps, "var_steps": args.var_steps, "threads": args.threads}
    (args.workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    (args.workdir / "log.json").write_text(json.dumps(log))
    print(f"done in {summary['seconds_total'] / 60:.1f} min; weights in {args.assets}")


if __name__ == "__main__":
    main()
