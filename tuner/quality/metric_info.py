"""The quality metrics a policy is judged by: names, directions and bounds, in one place.

Every consumer reads this table: the search's ``--metric`` choices and objective signs, the
placeholder told for never-measured trials, ``tuner policy check``'s tolerances, and the columns of
the comparison tables. A metric added to the evaluator is added here once.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MetricInfo:
    """One metric of :func:`tuner.quality.evaluate.PolicyEvaluator.evaluate`'s result."""

    name: str
    higher_is_better: bool
    worst: float  # no real evaluation is worse: the value told for a trial that was never measured
    paired: bool  # per-image against the full cache on the same seeds (else a distance between image sets)
    description: str

    @property
    def min_samples(self) -> int:
        """Fewest images at which the metric separates policies (paired: any; see the constant below)."""
        return 2 if self.paired else MIN_DISTRIBUTION_SAMPLES

    @property
    def se_key(self) -> str | None:
        """Key of its standard error in an evaluation's metrics (paired metrics only)."""
        return f"{self.name}_se" if self.paired else None


# Distribution metrics (Fréchet distances between image sets) are noise below this many images: at 8
# the 128-d covariances have rank 7. Measured on tiny (experiments/search/fidelity.md): the smallest
# N at which fid_vs_full orders two 15% policies of really different quality the same way on four
# disjoint seed sets, by more than twice its standard error.
MIN_DISTRIBUTION_SAMPLES = 256


METRICS: dict[str, MetricInfo] = {m.name: m for m in (
    MetricInfo("fid_vs_full", False, 100.0, False,
               "Fréchet distance to the full cache's images (same seeds)"),
    MetricInfo("delta_fid", False, 100.0, False,
               "FID of the policy minus FID of the full cache (reference set)"),
    MetricInfo("fid", False, 100.0, False, "FID against the reference set"),
    MetricInfo("psnr", True, 0.0, True, "PSNR against the full cache's image, dB"),
    MetricInfo("ssim", True, 0.0, True, "SSIM against the full cache's image"),
    MetricInfo("feat_dist", False, 1e6, True,
               "squared distance between the image's features and the full cache's (same seed)"),
)}

# Columns of the comparison tables: memory first, then every quality metric, then time.
# No latency: one timing per policy on a shared machine is warm-up and noise (`tuner bench` measures it
# with warm-up and repeats).
TABLE_COLUMNS = ("memory_fraction", "kv_bytes_per_image", "fid_vs_full", "delta_fid", "psnr", "psnr_se",
                 "ssim", "feat_dist")


def higher_is_better(name: str) -> bool:
    """Direction of a metric; KeyError for an unknown name."""
    return METRICS[name].higher_is_better
