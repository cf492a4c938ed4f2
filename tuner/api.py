"""The Python API (docs/design.md, API), what ``import tuner`` names lazily.

Three lines from ``import tuner`` to images with a policy file::

    import tuner
    model = tuner.load_model("tiny")
    images = tuner.generate(model, [0, 1, 2, 3], policy="policies/tiny-15pct.json")  # [4, 3, 32, 32]

and for a text-to-image model ``tuner.generate(tuner.load_model("infinity-2b", weights_dir=DIR),
prompts=["a red fox in snow"])``.

Every function runs the code the matching command runs: :func:`generate` is ``tuner generate``
(same engine, batches, seeds: equal images), :func:`plan` is ``tuner plan`` (same figures),
:func:`search_policy` (also ``tuner.search(...)``: the search package is callable) builds ``tuner
search``'s :class:`~tuner.search.config.SearchConfig` and runs the same driver, and
:func:`apply_policy` (:mod:`tuner.dropin`) applies a policy to the official VAR code. Bad input
raises :class:`~tuner.errors.UserError` with the CLI's one-line messages.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from tuner.dropin import PolicyHooks, apply_policy
from tuner.errors import UserError
from tuner.handles import Model, Policy
from tuner.search.python_api import SearchSummary, search_config, search_policy

__all__ = ["Model", "Policy", "PlanSummary", "SearchSummary", "PolicyHooks", "load_model", "load_policy",
           "generate", "plan", "search_config", "search_policy", "apply_policy"]
# (and tuner.search, the callable search package)


def load_model(name_or_paths: str | Sequence[str | Path] = "tiny", *, var_ckpt: str | Path | None = None,
               vae_ckpt: str | Path | None = None, weights_dir: str | Path | None = None,
               random_weights: bool = False, seed: int = 0, device: str = "cpu",
               dtype: str = "fp32", sides: Sequence[int] | None = None, aspect: str | None = None,
               scales: int | None = None) -> Model:
    """A model ready to generate, as ``--model`` / ``--var-ckpt`` + ``--vae-ckpt`` / ``--random-weights``
    load it.

    name_or_paths: a named model (``tiny`` built in; ``d16`` ... ``d36`` from ``weights_dir`` or
        ``$TUNER_WEIGHTS_DIR``; ``infinity-2b``/``-8b``/``-test`` from a ``weights_dir`` laid out as the
        official ``weights/`` with ``flan-t5-xl/``), or ``(var_ckpt, vae_ckpt)``: official-format VAR
        state dicts (depth, width and VAE channels read from their tensor shapes).
    random_weights: weights of the named model's shape drawn from ``seed`` (no files needed; Infinity
        then reads seeded stand-in text features, and its images mean nothing).
    device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``. dtype: ``fp32``, ``fp16`` or ``bf16``, the compute
        dtype of :func:`generate` (non-fp32 runs under autocast over fp32 weights).
    sides, aspect, scales: Infinity's schedule, as ``--sides 1,2,4,6`` / ``--aspect 2:1`` / ``--scales N``.
    """
    from tuner.model.loading import load_model as load
    from tuner.options import DTYPE_NAMES, check_choice, resolve_device

    check_choice(dtype, DTYPE_NAMES, "dtype")
    name = name_or_paths
    if not isinstance(name_or_paths, str):
        paths = list(name_or_paths)
        if len(paths) != 2 or var_ckpt is not None or vae_ckpt is not None:
            raise UserError("pass a model name, or (var_ckpt, vae_ckpt) as two paths, or var_ckpt= and "
                            "vae_ckpt=")
        (var_ckpt, vae_ckpt), name = paths, "tiny"
    dev = resolve_device(device)
    loaded = load(name, var_ckpt=var_ckpt, vae_ckpt=vae_ckpt, weights_dir=weights_dir,
                  random_weights=random_weights, seed=seed, device=dev,
                  sides=None if sides is None else tuple(sides), aspect=aspect, scales=scales)
    transformer = loaded.var if loaded.config.kind == "var" else loaded.model
    return Model(loaded.config, transformer, loaded.vae, loaded.checkpoint_sha256, loaded.source, dev, dtype,
                 runner=loaded)


def load_policy(path: str | Path, model: Model | None = None) -> Policy:
    """Load and check a policy file (schema, budgets re-planned from its parameters, memory figures).

    With ``model`` the file must be a policy for it (name, depth, heads, patch_nums, and the
    checkpoint hash when both are known); otherwise :class:`UserError` names the mismatch.
    """
    if model is None:
        return Policy.from_file(path)
    return Policy.from_file(path, model.config, model.checkpoint_sha256)


def _checked(policy: Policy | str | Path, model_config: Any, checkpoint_sha256: str | None) -> Policy:
    """``policy`` checked for the model (a handle checked for it already is returned as it is)."""
    if isinstance(policy, Policy):
        if policy.checked_for == (model_config.name, checkpoint_sha256):
            return policy
        policy = policy.path
    if not isinstance(policy, (str, Path)):
        raise UserError(f"policy must be a policy file path or tuner.load_policy(...), not "
                        f"{type(policy).__name__}")
    return Policy.from_file(policy, model_config, checkpoint_sha256)


def generate(model: Model, classes: int | Sequence[int] | Any = None, *,
             prompts: str | Sequence[str] | None = None, policy: Policy | str | Path | None = None,
             seed: int = 0, cfg: float | None = None, top_k: int | None = None, top_p: float | None = None,
             batch_size: int = 16, backend: str = "auto"):
    """Images of ``classes`` (VAR) or ``prompts`` (Infinity) under ``policy`` (default: the full cache),
    exactly as ``tuner generate`` (``--classes`` / ``--prompt``) makes them.

    classes: class ids (a list, a 1-D tensor or one int), each in ``[0, model.num_classes)``.
    prompts: a text-to-image model's prompts (one string or a list; surrounding spaces dropped).
    seed: batch ``i`` (``batch_size`` images each, in order) samples with seed ``seed + i``.
    cfg, top_k, top_p: guidance strength and token filtering (0 = off); None: the model's own
        (VAR: cfg 1.5 ramped over the scales, 900, 0.96; Infinity: the official CLI's cfg 3, 900, 0.97).
    backend: attention backend, ``auto`` (Triton on CUDA, PyTorch on CPU), ``torch`` or ``triton``.

    Returns ``[N, 3, H, W]`` float32 on the CPU, values in [0, 1] (``H = W = model.resolution`` for a
    square schedule).
    """
    import torch

    from tuner.model.generate import DTYPES, generate_batches
    from tuner.options import check_sampling, check_seed, resolve_backend

    own = model.config.sampling
    cfg, top_k, top_p = (own.cfg if cfg is None else cfg, own.top_k if top_k is None else top_k,
                         own.top_p if top_p is None else top_p)
    check_sampling(cfg, top_k, top_p)
    check_seed(seed, flag="seed")
    if batch_size <= 0:
        raise UserError(f"batch_size {batch_size} must be positive")
    runner, labels = _conditions(model, classes, prompts)
    from tuner.policies.base import PolicySpec
    from tuner.policies.full import FullPolicy

    if policy is None:
        pol, spec = FullPolicy(), PolicySpec(model.geometry, model.name)
    else:
        checked = _checked(policy, model.config, model.checkpoint_sha256)
        pol, spec = checked.policy, PolicySpec(model.geometry, model.name, checked.spec.calibration)
    label_t = torch.tensor(labels, dtype=torch.long, device=model.device)
    engine = (runner, None) if runner is not None else (model.var, model.vae)
    images, _ = generate_batches(*engine, label_t, batch_size, seed, cfg=cfg, top_k=top_k,
                                 top_p=top_p, policy=pol, spec=spec,
                                 backend=resolve_backend(backend, model.device), dtype=DTYPES[model.dtype])
    return images


def _conditions(model: Model, classes: Any, prompts: Any) -> tuple[Any, list[int]]:
    """``(runner, condition ids)``: VAR's class ids (runner None: the modules run), or an Infinity
    runner holding ``prompts`` and their indices (``classes`` there index the model's own prompt set)."""
    if model.kind == "var":
        if prompts is not None:
            raise UserError(f"prompts need a text-to-image model (infinity-test, infinity-2b, infinity-8b); "
                            f"{model.name} is class-conditional: pass classes")
        if classes is None:
            raise UserError(f"pass classes: ids in [0, {model.num_classes}) for model {model.name}")
        labels = [int(classes)] if isinstance(classes, int) else [int(c) for c in classes]
        bad = [c for c in labels if not 0 <= c < model.num_classes]
        if not labels or bad:
            raise UserError(f"classes {bad[:1] or '[]'} must be ids in [0, {model.num_classes}) for model "
                            f"{model.name}")
        return None, labels
    if (prompts is None) == (classes is None):
        raise UserError(f"{model.name} is text-to-image: pass prompts (a string or a list of them), or "
                        "classes as indices into the model's prompt set, not both")
    runner = model.runner
    if prompts is not None:
        from dataclasses import replace

        from tuner.model.prompts import MAX_PROMPT_CHARS

        given = [prompts] if isinstance(prompts, str) else list(prompts)
        bad = next((q for q in given if not isinstance(q, str) or not q.strip() or len(q) > MAX_PROMPT_CHARS),
                   None)
        if not given or bad is not None:
            raise UserError(f"prompt {str(bad)[:40]!r} must be non-empty text of at most {MAX_PROMPT_CHARS} "
                            "characters")
        runner = replace(runner, prompts=tuple(q.strip() for q in given))
        return runner, list(range(len(given)))
    labels = [int(classes)] if isinstance(classes, int) else [int(c) for c in classes]
    bad = [c for c in labels if not 0 <= c < runner.num_conditions]
    if not labels or bad:
        raise UserError(f"classes {bad[:1] or '[]'} must index {model.name}'s {runner.num_conditions} "
                        "prompts; or pass prompts")
    return runner, labels


@dataclass(frozen=True)
class PlanSummary:
    """:func:`plan`'s figures, the same as ``tuner plan --json`` prints (bytes are per image unless named).

    fraction: KV bytes over the full cache's, both counted 16-bit (docs/design.md, Memory).
    kv_bytes_total: ``kv_bytes_per_image × batch``. resident_bytes_per_scale: live K/V bytes while each
    scale runs. max_batch: the largest batch for ``gpu_mem`` (None without it); ``estimate`` holds its
    terms and assumptions, ``report`` the full :class:`~tuner.memory.MemoryReport`.
    """

    model: str
    family: str
    dtype: str
    batch: int
    kv_bytes_per_image: int
    kv_bytes_total: int
    full_kv_bytes_per_image: int
    fraction: float
    resident_bytes_per_scale: tuple[int, ...]
    capacities: tuple[int, ...]
    kv_formats: tuple[str, ...]
    max_batch: int | None
    report: Any
    estimate: Any = None

    def table(self) -> str:
        """The markdown ``tuner plan`` prints (budgets per layer and scale, resident curve, max batch)."""
        from tuner.memory import format_plan_table

        return format_plan_table(self.report, self.estimate)


def plan(model: Model | str, policy: Policy | str | Path, *, batch: int = 1, gpu_mem: str | int | None = None,
         dtype: str = "fp16") -> PlanSummary:
    """Memory of ``policy`` on ``model`` before anything is generated (no weights needed for a name).

    model: a :class:`Model` or a model name (``d30``). policy: a policy file path or handle.
    batch: images per forward. gpu_mem: GPU memory, ``"80GiB"`` (``--gpu-mem``'s grammar) or bytes,
    to size the max batch. dtype: compute dtype of unquantized K/V (fp32, fp16, bf16).
    """
    from tuner.mem_target import parse_size
    from tuner.memory import max_batch, memory_report
    from tuner.model.config import model_config
    from tuner.options import DTYPE_NAMES, check_choice
    from tuner.policies.base import PolicySpec

    check_choice(dtype, DTYPE_NAMES, "dtype")
    if batch < 1:
        raise UserError(f"batch {batch} must be at least 1")
    if isinstance(model, str):
        try:
            cfg, sha = model_config(model), None
        except KeyError as exc:
            raise UserError(f"{exc.args[0]}; pass one of them") from None
    else:
        cfg, sha = model.config, model.checkpoint_sha256
    checked = _checked(policy, cfg, sha)
    spec = PolicySpec(checked.geometry, cfg.name, checked.spec.calibration)
    try:
        report = memory_report(checked.policy, cfg, dtype=dtype, batch=batch, spec=spec)
    except ValueError as exc:
        raise UserError(f"policy does not fit {cfg.name}: {exc}") from None
    gpu_bytes = parse_size(gpu_mem) if isinstance(gpu_mem, str) else gpu_mem
    estimate = max_batch(report, cfg, gpu_bytes, dtype) if gpu_bytes is not None else None
    return PlanSummary(cfg.name, checked.family, dtype, batch, report.kv_bytes_per_image,
                       report.kv_bytes_total,
                       report.full_kv_bytes_per_image, report.fraction, report.resident_bytes_per_scale,
                       report.capacities, report.plan.layer_formats(report.geometry.num_layers),
                       estimate.batch if estimate is not None else None, report, estimate)
