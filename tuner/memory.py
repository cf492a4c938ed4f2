"""Exact KV memory of a plan (design §4), deployment sizing, and the size / memory-target grammar.

KV bytes per image = ``(Σ_l C[l] + max_s n_s) × 2 (K, V) × heads × head_dim × dtype bytes × rows``
with ``C[l] = max_s budgets[l][s]`` and rows = 2 with classifier-free guidance; the ``full`` plan is
the official layout, ``L × layers`` tokens and no workspace. The memory fraction is the ratio of the
two for the same model, dtype and batch. These numbers are what the engine allocates.
"""
from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuner.errors import UserError
from tuner.policies.base import CacheGeometry, CachePlan, KVPolicy, PolicySpec

DTYPE_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4, "float16": 2, "bfloat16": 2, "float32": 4}
GIB = 1 << 30


def dtype_bytes(dtype: Any) -> int:
    """Bytes per element of ``"fp16"``/``"bf16"``/``"fp32"`` (or a torch dtype)."""
    name = str(dtype).replace("torch.", "")
    try:
        return DTYPE_BYTES[name]
    except KeyError:
        raise UserError(f"unknown dtype {dtype!r}; use fp16, bf16 or fp32") from None


def as_geometry(model: Any) -> CacheGeometry:
    """A :class:`CacheGeometry` from a geometry, a ``ModelConfig`` or a ``VARConfig``."""
    if isinstance(model, CacheGeometry):
        return model
    return CacheGeometry.from_var_config(getattr(model, "var", model))


@dataclass(frozen=True)
class MemoryReport:
    """KV memory of one plan. Byte figures are per image unless named ``total``.

    ``resident_bytes_per_scale[s]``: the most K/V bytes holding live tokens at any moment while
    scale ``s`` is computed (layers already done hold their new budget, the others the old one, plus
    the workspace with scale ``s``'s tokens), per image; the allocation itself is constant
    (``kv_bytes_per_image``).
    """

    geometry: CacheGeometry
    plan: CachePlan
    dtype: str
    rows_per_image: int
    batch: int
    bytes_per_token: int  # one token, one layer, K and V, all rows of one image
    capacities: tuple[int, ...]
    workspace_tokens: int
    kv_bytes_per_image: int
    full_kv_bytes_per_image: int
    resident_bytes_per_scale: tuple[int, ...]
    family: str = ""
    params: Any = None

    @property
    def fraction(self) -> float:
        return self.kv_bytes_per_image / self.full_kv_bytes_per_image

    @property
    def kv_bytes_total(self) -> int:
        return self.kv_bytes_per_image * self.batch

    @property
    def kv_tokens(self) -> int:
        return self.kv_bytes_per_image // self.bytes_per_token


def memory_report(plan_or_policy: CachePlan | KVPolicy, model: Any, *, dtype: Any = "fp16", cfg: bool = True,
                  batch: int = 1, spec: PolicySpec | None = None) -> MemoryReport:
    """Plan (if given a policy) and account its KV memory.

    Parameters
    ----------
    plan_or_policy: a :class:`CachePlan` or a policy (planned against ``spec``, default the bare geometry).
    model: ``ModelConfig``, ``VARConfig`` or :class:`CacheGeometry`.
    dtype: K/V element type. cfg: two rows per image (classifier-free guidance). batch: images.

    Raises ``ValueError`` when the plan does not fit the model (or the policy cannot plan).
    """
    g = as_geometry(model)
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    family, params = "", None
    if isinstance(plan_or_policy, CachePlan):
        plan = plan_or_policy
    else:
        plan = plan_or_policy.plan(spec or PolicySpec(g, getattr(model, "name", "")))
        family, params = plan_or_policy.family, plan_or_policy.params()
    plan.validate(g)
    rows = 2 if cfg else 1
    per_token = 2 * g.num_heads * g.head_dim * dtype_bytes(dtype) * rows
    full_tokens = g.seq_len * g.num_layers
    if plan.full:
        caps, workspace = (g.seq_len,) * g.num_layers, 0
    else:
        caps, workspace = plan.capacities(), max(g.scale_lengths)
    return MemoryReport(g, plan, str(dtype).replace("torch.", ""), rows, batch, per_token, caps, workspace,
                        (sum(caps) + workspace) * per_token, full_tokens * per_token,
                        tuple(t * per_token for t in resident_tokens_per_scale(plan, g)), family, params)


def resident_tokens_per_scale(plan: CachePlan, g: CacheGeometry) -> tuple[int, ...]:
    """Peak live tokens (all layers + workspace) during each scale, see :class:`MemoryReport`."""
    out = []
    for s in range(g.num_scales):
        n = g.scale_lengths[s]
        if plan.full:
            out.append(g.num_layers * g.tokens_through(s))
            continue
        before = [plan.budgets[layer][s - 1] if s else 0 for layer in range(g.num_layers)]
        after = [plan.budgets[layer][s] for layer in range(g.num_layers)]
        live = [sum(after[:layer]) + sum(before[layer:]) + n for layer in range(g.num_layers)]
        out.append(max(live + [sum(after)]))
    return tuple(out)


# ---------------------------------------------------------------------------------------- sizing
@functools.lru_cache(maxsize=16)
def model_param_counts(model_cfg: Any) -> tuple[int, int]:
    """(VAR parameters, VQ-VAE parameters), counted on the meta device (no memory, no weights)."""
    import torch

    import tuner.model.var  # noqa: F401  (module-level constants must not be built on the meta device)
    import tuner.model.vqvae  # noqa: F401
    from tuner.model.loading import build_models

    with torch.device("meta"):
        var, vae = build_models(model_cfg, "meta")
    return sum(p.numel() for p in var.parameters()), sum(p.numel() for p in vae.parameters())


@dataclass(frozen=True)
class BatchEstimate:
    """How many images fit on a GPU at once, with every term and assumption spelled out."""

    batch: int
    gpu_mem_bytes: int
    weights_bytes: int
    reserve_bytes: int
    kv_bytes_per_image: int
    activation_bytes_per_image: int
    assumptions: tuple[str, ...]

    def describe(self) -> str:
        mib = 1 << 20
        return "\n".join([
            f"max batch {self.batch} on {self.gpu_mem_bytes / GIB:.1f} GiB: weights {self.weights_bytes / mib:.0f} MiB "
            f"+ reserve {self.reserve_bytes / mib:.0f} MiB + per image (KV {self.kv_bytes_per_image / mib:.1f} MiB "
            f"+ activations {self.activation_bytes_per_image / mib:.1f} MiB)", "assumptions:"]
            + [f"- {a}" for a in self.assumptions])


def max_batch(report: MemoryReport, model_cfg: Any, gpu_mem_bytes: int, dtype: Any = "fp16", *,
              backend: str = "triton", reserve_bytes: int = GIB) -> BatchEstimate:
    """Largest batch whose weights + activations + KV cache fit in ``gpu_mem_bytes``.

    An estimate, not a measurement: the terms and their assumptions are in the result.
    """
    g = report.geometry
    act = dtype_bytes(dtype)
    c = model_cfg.var.embed_dim
    n_last = g.scale_lengths[-1]
    rows = report.rows_per_image
    var_params, vae_params = model_param_counts(model_cfg)
    weights = 4 * (var_params + vae_params)
    hidden = rows * n_last * c * 10 * act
    kv_len = (g.seq_len if report.plan.full else max(report.capacities) + n_last)
    scores = rows * g.num_heads * n_last * kv_len * 4 if backend == "torch" else 0
    logits = rows * n_last * model_cfg.vae.vocab_size * 4 * 2
    res = model_cfg.resolution
    decoder = model_cfg.vae.ch * model_cfg.vae.ch_mult[0] * res * res * act * 4
    per_image = report.kv_bytes_per_image * act // dtype_bytes(report.dtype) + max(hidden + scores + logits, decoder)
    free = gpu_mem_bytes - weights - reserve_bytes
    batch = max(0, free // per_image) if per_image else 0
    assumptions = (
        f"weights in fp32 ({var_params + vae_params:,} parameters), runs in {dtype} under autocast as the official demo",
        f"KV cache in {dtype}, {rows} rows per image (classifier-free guidance), exactly as planned",
        f"transformer activations at the largest scale ({n_last} tokens): 10 × width {c} per token and row in {dtype}",
        "attention scores materialised (torch backend), fp32" if scores else
        "attention scores not materialised (fused Triton kernel)",
        f"logits {rows} rows × {n_last} × vocab {model_cfg.vae.vocab_size} in fp32, plus one sampling copy",
        f"VQ-VAE decoding at {res}px: 4 live maps of {model_cfg.vae.ch * model_cfg.vae.ch_mult[0]} channels; not at the "
        "same time as the transformer activations, the larger of the two counts",
        f"{reserve_bytes / GIB:.2f} GiB reserved for the CUDA context and allocator slack",
    )
    return BatchEstimate(int(batch), int(gpu_mem_bytes), weights, reserve_bytes,
                         report.kv_bytes_per_image * act // dtype_bytes(report.dtype),
                         int(max(hidden + scores + logits, decoder)), assumptions)


# ---------------------------------------------------------------------------------------- grammar
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str) -> int:
    """``"40MiB"`` → 41943040; units B, kB/MB/GB/TB (powers of 1000) and KiB/MiB/GiB/TiB (of 1024)."""
    m = _SIZE.match(str(text))
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _UNITS:
        raise UserError(f"{text!r} is not a size; write a number with a unit, e.g. 40MiB, 1.5GB or 800kB")
    value = round(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise UserError(f"size {text!r} must be positive, e.g. 40MiB")
    return value


@dataclass(frozen=True)
class MemTarget:
    """A memory target: a fraction of the full cache, or absolute KV bytes per image (exactly one).

    ``text`` is how the user wrote it (kept for study names and provenance). The search, preset
    fitting and ``tuner policy check`` all read targets through this one type.
    """

    fraction: float | None = None
    bytes_per_image: int | None = None
    text: str = ""

    def __post_init__(self) -> None:
        if (self.fraction is None) == (self.bytes_per_image is None):
            raise ValueError("a memory target is either a fraction or a byte count")
        if self.fraction is not None and not (math.isfinite(self.fraction) and 0.0 < self.fraction <= 1.0):
            raise ValueError(f"memory target fraction {self.fraction} must be in (0, 1]")
        if self.bytes_per_image is not None and self.bytes_per_image <= 0:
            raise ValueError(f"memory target {self.bytes_per_image} bytes must be positive")

    def fits(self, report: MemoryReport) -> bool:
        """Whether a plan's memory is within the target."""
        return self.violation(report.fraction, report.kv_bytes_per_image) <= 1e-12

    def violation(self, fraction: float, kv_bytes_per_image: float) -> float:
        """Constraint value (<= 0 feasible), relative to the target so units do not matter."""
        if self.fraction is not None:
            return fraction / self.fraction - 1.0
        return kv_bytes_per_image / float(self.bytes_per_image) - 1.0

    def describe(self) -> str:
        if self.fraction is not None:
            return f"{self.fraction:.4g} of the full cache"
        return f"{self.bytes_per_image / 2**20:.4g} MiB per image"


def parse_mem_target(text: str, flag: str = "--mem-target") -> MemTarget:
    """``"15%"`` or ``"0.15"`` (of the full cache) or ``"40MiB"`` (KV bytes per image).

    Errors are one-line ``UserError`` messages that start with ``flag`` and the text given.
    """
    s = str(text).strip()
    where = f"{flag} {text!r}"
    hint = "use a percentage like 15%, a fraction like 0.15 or bytes per image like 40MiB"
    if s.endswith("%"):
        try:
            frac = float(s[:-1]) / 100
        except ValueError:
            raise UserError(f"{where} is not a percentage; {hint}") from None
    elif re.fullmatch(r"[0-9.eE+-]+", s or "x"):
        try:
            frac = float(s)
        except ValueError:
            raise UserError(f"{where} is not a number; {hint}") from None
        if frac > 1:
            raise UserError(f"{where} is more than the full cache; a fraction must be in (0, 1] "
                            f"(for a size add a unit, e.g. {s}MiB)")
    else:
        try:
            return MemTarget(bytes_per_image=parse_size(s), text=str(text).strip())
        except UserError as exc:
            raise UserError(f"{where}: {exc}") from None
    if not (math.isfinite(frac) and 0 < frac <= 1):
        raise UserError(f"{where} is outside (0%, 100%]; {hint}")
    return MemTarget(fraction=frac, text=str(text).strip())


# ---------------------------------------------------------------------------------------- output
def format_plan_table(report: MemoryReport, estimate: BatchEstimate | None = None) -> str:
    """Markdown: memory summary, budgets per layer and scale, and the resident-bytes curve."""
    g, mib = report.geometry, 1 << 20
    head = f"{report.family or 'plan'} {report.params or ''}".strip()
    lines = [f"**{head}**", "",
             f"KV per image: {report.kv_bytes_per_image:,} B ({report.kv_bytes_per_image / mib:.2f} MiB) = "
             f"{100 * report.fraction:.2f}% of the full cache ({report.full_kv_bytes_per_image:,} B); "
             f"{report.dtype}, {report.rows_per_image} rows per image, workspace {report.workspace_tokens} tokens", "",
             "| layer | capacity | " + " | ".join(f"s{s} ({g.patch_nums[s]}²)" for s in range(g.num_scales)) + " |",
             "|---|---|" + "---|" * g.num_scales]
    for layer, row in enumerate(report.plan.budgets):
        lines.append(f"| {layer} | {report.capacities[layer]} | " + " | ".join(str(b) for b in row) + " |")
    lines.append("| resident MiB | | " + " | ".join(f"{b / mib:.2f}" for b in report.resident_bytes_per_scale) + " |")
    if estimate is not None:
        lines += ["", estimate.describe()]
    return "\n".join(lines) + "\n"


def plot_budget_heatmap(plan: CachePlan, path: str | Path, title: str = "") -> Path:
    """PNG heatmap of ``budgets[layer][scale]`` (tokens, annotated)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    data = np.array(plan.budgets, dtype=float)
    fig, ax = plt.subplots(figsize=(1.5 + 0.55 * data.shape[1], 1.0 + 0.28 * data.shape[0]))
    im = ax.imshow(data, aspect="auto", cmap="magma")
    if data.size <= 600:
        for (layer, s), v in np.ndenumerate(data):
            ax.text(s, layer, f"{int(v)}", ha="center", va="center", fontsize=6,
                    color="white" if v < data.max() / 2 else "black")
    fig.colorbar(im, ax=ax, label="tokens kept")
    ax.set(xlabel="scale", ylabel="layer", title=title or "KV budget per layer and scale")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
