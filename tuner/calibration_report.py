"""What ``tuner calibrate`` shows of a :class:`~tuner.calibration.Calibration`: tables and heatmaps.

``calibration_markdown`` renders the per-layer key similarity (with its rank) and the ASI per
(layer, scale) as Markdown; ``plot_calibration`` writes three heatmap PNGs. matplotlib and numpy
are imported inside ``plot_calibration`` so the table needs neither.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from tuner.calibration import Calibration


def _fmt(v: float | None, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def calibration_markdown(cal: Calibration) -> str:
    """Markdown tables: per-layer similarity (rank 0 = most cache-demanding) and ASI per (layer, scale)."""
    sims = cal.layer_similarity()
    rank = {layer: i for i, layer in enumerate(sorted(range(cal.num_layers), key=lambda x: (sims[x], x)))}
    scales = range(len(cal.patch_nums))
    lines = [f"# Calibration of {cal.model_name}", "",
             f"checkpoint sha256: {cal.checkpoint_sha256 or 'none (random weights)'}; "
             f"samples {cal.spec.samples}, "
             f"seed {cal.spec.seed}, cfg {cal.spec.cfg}, top-k {cal.spec.top_k}, top-p {cal.spec.top_p}, "
             f"K' = {cal.spec.htk_fraction:g} of the history", "",
             "## Inter-scale key similarity (negative L2; lower = more cache-demanding)", "",
             "| layer | mean | rank | " + " | ".join(f"s{s}" for s in scales) + " |",
             "|---|---|---|" + "---|" * len(cal.patch_nums)]
    for layer, row in enumerate(cal.key_similarity):
        lines.append(f"| {layer} | {sims[layer]:.4f} | {rank[layer]} | " + " | ".join(_fmt(v) for v in row)
                     + " |")
    lines += ["", "## Attention selectivity index (CAR × HTK; low = drafter)", "",
              "| layer | " + " | ".join(f"s{s}" for s in scales) + " |",
              "|---|" + "---|" * len(cal.patch_nums)]
    for layer, row in enumerate(cal.asi):
        lines.append(f"| {layer} | " + " | ".join(_fmt(v, 4) for v in row) + " |")
    return "\n".join(lines) + "\n"


def plot_calibration(cal: Calibration, out_dir: str | Path) -> list[Path]:
    """Heatmap PNGs: key similarity, ASI z-scores (layers × scales) and the layer-mean attention density."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def grid(table) -> "np.ndarray":
        return np.array([[np.nan if v is None else v for v in row] for row in table], dtype=float)

    density = np.array(cal.density, dtype=float).mean(axis=0)
    panels = [("key_similarity.png", grid(cal.key_similarity), "inter-scale key similarity", "scale",
               "layer"),
              ("asi_z.png", grid(cal.asi_z()), "ASI z-score per scale (low = drafter)", "query scale",
               "layer"),
              ("density.png", np.log10(np.where(density > 0, density, np.nan)),
               "log10 attention density (mean over layers)", "key scale", "query scale")]
    paths = []
    for name, data, title, xlabel, ylabel in panels:
        fig, ax = plt.subplots(figsize=(1.0 + 0.45 * data.shape[1], 1.2 + 0.25 * data.shape[0]))
        im = ax.imshow(data, aspect="auto", cmap="viridis")
        fig.colorbar(im, ax=ax)
        ax.set(title=f"{cal.model_name}: {title}", xlabel=xlabel, ylabel=ylabel)
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        paths.append(out / name)
    return paths
