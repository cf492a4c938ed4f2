"""Exact KV memory of a plan (docs/design.md, Memory) and deployment sizing (the target grammar:
:mod:`tuner.mem_target`).

KV bytes per image = ``Σ_l C[l] × b(f_l) + max_s n_s × b(compute)`` with ``C[l] = max_s budgets[l][s]``
and ``b(f)`` the bytes of one token in one layer (K and V, every head, rows = 2 with classifier-free
guidance) in the layer's storage format ``f``: ``2 × rows × heads × vector_bytes(f)``, where an
unquantized vector is ``head_dim × dtype bytes`` and a quantized one its codes plus fp16 scales
(:mod:`varkv_kernels.quant`). With per-head budgets a layer holds ``Σ_h C[l][h]`` (token, head) vectors
(``C[l][h] = max_s head_budgets[l][s][h]``, packed without padding), each ``b(f_l) / heads``; a
uniform plan is the special case ``C[l][h] = C[l]``, so its figures are the same either way. The
``full`` plan is the official layout, ``L × layers`` tokens and no workspace. These numbers are
what the engine allocates in a run of that dtype.

The memory *fraction* always uses 16-bit K/V as the reference, whatever the run computes in: the full
cache and every compute-format buffer count 2 bytes per element, int8 and int4 their own bytes. So an
fp32 CPU run cannot make int8 look like a 4x saving: int8 is about half the 16-bit cache.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from varkv_kernels.formats import REFERENCE_BITS, format_info
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
    """A :class:`CacheGeometry` from a geometry or any config with a ``geometry`` (a named model's
    ``ModelConfig`` / ``InfinityModelConfig``, a ``VARConfig``)."""
    if isinstance(model, CacheGeometry):
        return model
    return model.geometry


@dataclass(frozen=True)
class MemoryReport:
    """KV memory of one plan. Byte figures are per image unless named ``total``.

    ``resident_bytes_per_scale[s]``: the most K/V bytes holding live tokens at any moment while
    scale ``s`` is computed (layers already done hold their new budget, the others the old one, plus
    the workspace with scale ``s``'s tokens), per image; the allocation itself is constant
    (``kv_bytes_per_image``).

    ``bytes_per_token`` is one unquantized token (one layer, K and V, all rows of one image) in
    ``dtype``; ``layer_token_bytes[l]`` the same in layer ``l``'s format. ``reference_*`` are the
    16-bit-reference figures the ``fraction`` is computed from (equal to the others in fp16/bf16).
    ``capacities[l]`` is the layer's largest head's capacity; per-head plans also give every head's,
    ``head_capacities[l][h]`` (empty for uniform plans), which is what the bytes count.
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
    formats: tuple[str, ...] = ()
    layer_token_bytes: tuple[int, ...] = ()
    reference_kv_bytes_per_image: int = 0
    reference_full_kv_bytes_per_image: int = 0
    head_capacities: tuple[tuple[int, ...], ...] = ()

    @property
    def fraction(self) -> float:
        """KV bytes over the full cache's, both counted with 16-bit unquantized elements."""
        return self.reference_kv_bytes_per_image / self.reference_full_kv_bytes_per_image

    @property
    def kv_bytes_total(self) -> int:
        return self.kv_bytes_per_image * self.batch


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
    formats = plan.layer_formats(g.num_layers)
    elt, ref_elt = dtype_bytes(dtype), REFERENCE_BITS // 8

    def token_bytes(fmt: str, compute_bytes: int) -> int:
        return 2 * g.num_heads * rows * format_info(fmt).vector_bytes(g.head_dim, compute_bytes)

    per_token, ref_token = token_bytes("compute", elt), token_bytes("compute", ref_elt)
    layer_bytes = tuple(token_bytes(f, elt) for f in formats)
    ref_layer_bytes = tuple(token_bytes(f, ref_elt) for f in formats)
    full_tokens = g.seq_len * g.num_layers
    if plan.full:
        caps, workspace = (g.seq_len,) * g.num_layers, 0
        vectors = tuple(g.seq_len * g.num_heads for _ in range(g.num_layers))
    else:
        caps, workspace = plan.capacities(), max(g.scale_lengths)
        vectors = tuple(plan.capacity_vectors(layer, g.num_heads) for layer in range(g.num_layers))

    def total(per_layer: tuple[int, ...], ws_token: int) -> int:
        # (token, head) vectors × the bytes of one (token_bytes are a multiple of the head count)
        return sum(n * b // g.num_heads for n, b in zip(vectors, per_layer)) + workspace * ws_token

    head_caps = tuple(plan.head_capacities(layer, g.num_heads) for layer in range(g.num_layers)) \
        if plan.per_head else ()
    return MemoryReport(g, plan, str(dtype).replace("torch.", ""), rows, batch, per_token, caps, workspace,
                        total(layer_bytes, per_token), full_tokens * per_token,
                        resident_bytes_per_scale(plan, g, layer_bytes, per_token), family, params,
                        plan.formats, layer_bytes, total(ref_layer_bytes, ref_token), full_tokens * ref_token,
                        head_caps)


def resident_bytes_per_scale(plan: CachePlan, g: CacheGeometry, layer_bytes: tuple[int, ...],
                             workspace_token_bytes: int) -> tuple[int, ...]:
    """Peak live K/V bytes (all layers + workspace) during each scale, see :class:`MemoryReport`.

    layer_bytes[l]: one token of layer ``l`` in its format (all heads); workspace_token_bytes: one
    unquantized token. Per-head plans count each head's kept tokens.
    """
    out = []
    for s in range(g.num_scales):
        n = g.scale_lengths[s]
        if plan.full:
            out.append(g.tokens_through(s) * sum(layer_bytes))
            continue
        layers, heads = range(g.num_layers), g.num_heads

        def held(layer: int, scale: int) -> int:  # bytes of the (token, head) vectors the layer holds
            return plan.kept_vectors(layer, scale, heads) * layer_bytes[layer] // heads if scale >= 0 else 0

        before = [held(layer, s - 1) for layer in layers]
        after = [held(layer, s) for layer in layers]
        ws = n * workspace_token_bytes
        live = [sum(after[:layer]) + sum(before[layer:]) + ws for layer in range(g.num_layers)]
        out.append(max(live + [sum(after)]))
    return tuple(out)


# ---------------------------------------------------------------------------------------- sizing
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
            f"max batch {self.batch} on {self.gpu_mem_bytes / GIB:.1f} GiB: "
            f"weights {self.weights_bytes / mib:.0f} MiB + reserve {self.reserve_bytes / mib:.0f} MiB "
            f"+ per image (KV {self.kv_bytes_per_image / mib:.1f} MiB "
            f"+ activations {self.activation_bytes_per_image / mib:.1f} MiB)", "assumptions:"]
            + [f"- {a}" for a in self.assumptions])


def max_batch(report: MemoryReport, model_cfg: Any, gpu_mem_bytes: int, dtype: Any = "fp16", *,
              backend: str = "triton", reserve_bytes: int = GIB) -> BatchEstimate:
    """Largest batch whose weights + activations + KV cache fit in ``gpu_mem_bytes``.

    An estimate, not a measurement: the terms and their assumptions are in the result.
    """
    from tuner.model.sizing import model_sizing

    g = report.geometry
    act = dtype_bytes(dtype)
    size = model_sizing(model_cfg)
    c = size.width
    n_last = g.scale_lengths[-1]
    rows = report.rows_per_image
    weights = size.weights_bytes
    hidden = rows * n_last * c * 10 * act
    kv_len = (g.seq_len if report.plan.full else max(report.capacities) + n_last)
    scores = rows * g.num_heads * n_last * kv_len * 4 if backend == "torch" else 0
    logits = rows * n_last * size.logits_per_token * 4 * 2
    res = size.resolution
    img_h, img_w = size.image_hw or (res, res)
    decoder = size.decoder_channels * img_h * img_w * act * 4
    # The report may be in another dtype than the deployment: re-count its plan in ``dtype``
    # (quantized layers cost the same in both).
    kv = memory_report(report.plan, g, dtype=dtype, cfg=rows == 2).kv_bytes_per_image
    per_image = kv + max(hidden + scores + logits, decoder)
    free = gpu_mem_bytes - weights - reserve_bytes
    batch = max(0, free // per_image) if per_image else 0
    assumptions = (
        f"{size.weights_note}, runs in {dtype} under autocast as the official demo",
        f"KV cache in {dtype} (quantized layers: their codes + fp16 scales), {rows} rows per image "
        "(classifier-free guidance), exactly as planned",
        f"transformer activations at the largest scale ({n_last} tokens): 10 × width {c} per token "
        f"and row in {dtype}",
        "attention scores materialised (torch backend), fp32" if scores else
        "attention scores not materialised (fused Triton kernel)",
        f"logits {rows} rows × {n_last} × {size.logits_note} in fp32, plus one sampling copy",
        f"{size.decoder_name} decoding at {res if img_h == img_w else f'{img_h}×{img_w} '}px: 4 live maps of "
        f"{size.decoder_channels} channels; "
        "not at the same time as the transformer activations, the larger of the two counts",
        f"{reserve_bytes / GIB:.2f} GiB reserved for the CUDA context and allocator slack",
    )
    return BatchEstimate(int(batch), int(gpu_mem_bytes), weights, reserve_bytes,
                         kv,
                         int(max(hidden + scores + logits, decoder)), assumptions)


# ---------------------------------------------------------------------------------------- output
def _scale_label(g: CacheGeometry, s: int) -> str:
    """A scale's map in a table header: ``4²`` (square) or ``4×2`` (h × w)."""
    h, w = g.shapes[s]
    return f"{h}²" if h == w else f"{h}×{w}"


def format_plan_table(report: MemoryReport, estimate: BatchEstimate | None = None) -> str:
    """Markdown: memory summary, budgets per layer and scale, and the resident-bytes curve."""
    g, mib = report.geometry, 1 << 20
    head = f"{report.family or 'plan'} {report.params or ''}".strip()
    lines = [f"**{head}**", "",
             f"KV per image: {report.kv_bytes_per_image:,} B ({report.kv_bytes_per_image / mib:.2f} MiB) = "
             f"{100 * report.fraction:.2f}% of the full 16-bit cache ({report.full_kv_bytes_per_image:,} B); "
             f"{report.dtype}, {report.rows_per_image} rows per image, "
             f"workspace {report.workspace_tokens} tokens; storage {format_summary(report.formats)}", "",
             "| layer | format | capacity | "
             + " | ".join(f"s{s} ({_scale_label(g, s)})" for s in range(g.num_scales)) + " |",
             "|---|---|---|" + "---|" * g.num_scales]
    formats = report.plan.layer_formats(g.num_layers)
    for layer, row in enumerate(report.plan.budgets):
        lines.append(f"| {layer} | {formats[layer]} | {report.capacities[layer]} | "
                     + " | ".join(str(b) for b in row) + " |")
    lines.append("| resident MiB | | | "
                 + " | ".join(f"{b / mib:.2f}" for b in report.resident_bytes_per_scale) + " |")
    if report.head_capacities:  # per-head plans: the budgets above are each layer's largest head
        lines += ["", "Per-head capacities (tokens; the layer stores their sum, the budgets above are its "
                  "largest head's):", "",
                  "| layer | Σ heads | " + " | ".join(f"h{h}" for h in range(g.num_heads)) + " |",
                  "|---|---|" + "---|" * g.num_heads]
        lines += [f"| {layer} | {sum(caps)} | " + " | ".join(str(c) for c in caps) + " |"
                  for layer, caps in enumerate(report.head_capacities)]
    if estimate is not None:
        lines += ["", estimate.describe()]
    return "\n".join(lines) + "\n"


def format_summary(formats: tuple[str, ...]) -> str:
    """``compute`` / ``int8`` (one format everywhere) or ``int8 ×4, int4 ×2`` (per layer, in order of
    first appearance); an empty tuple is ``compute`` everywhere."""
    if not formats or len(set(formats)) == 1:
        return f"{formats[0] if formats else 'compute'} (every layer)"
    counts: dict[str, int] = {}
    for f in formats:
        counts[f] = counts.get(f, 0) + 1
    return ", ".join(f"{f} ×{n}" for f, n in counts.items()) + " layers"


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
