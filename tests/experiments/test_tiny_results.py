"""experiments/tiny_results.py end to end on a few images: the table a reader of experiments/tiny/results.md
trusts."""
from __future__ import annotations

import csv
import importlib
import math

import pytest


def load_script():
    """The script as ``python -m experiments.tiny_results`` imports it (repository root on sys.path)."""
    return importlib.import_module("experiments.tiny_results")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """One run on 4 images per seed set, into a directory whose results.md already has a hand-written
    conclusion."""
    mp = pytest.MonkeyPatch()
    mp.setenv("TUNER_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    tr = load_script()
    out = tmp_path_factory.mktemp("results")
    (out / "results.md").write_text(f"old table\n\n{tr.CONCLUSION}\n## My reading\nkeep me\n")
    tr.main(["--samples", "4", "--batch-size", "4", "--threads", "1", "--out", str(out)])
    mp.undo()
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    return tr, out, rows


def test_every_family_is_fitted_under_each_target(results):
    tr, _, rows = results
    policies = [r for r in rows if r["policy"] in tr.FAMILIES]
    assert {(r["policy"], float(r["target"])) for r in policies} == {
        (name, t) for name in tr.FAMILIES for t in tr.TARGETS}
    for r in policies:
        # Fitted, not guessed: at or under the target and within a few tokens' worth of it.
        assert float(r["target"]) - 0.02 < float(r["memory_fraction"]) <= float(r["target"]) + 1e-9
        assert float(r["psnr"]) > 10 and 0 < float(r["ssim"]) < 1


def test_noise_floor_rows_give_three_other_seed_distances(results):
    tr, _, rows = results
    floor = [r for r in rows if r["policy"].startswith("full cache")]
    assert [r["policy"] for r in floor] == [tr.NOISE.format("B"), tr.NOISE.format("C")]
    b, c = floor
    # Row B's unpaired column is FD(A, B), the same set pair as its paired FD(B, A).
    assert float(b["fid_vs_full"]) == pytest.approx(float(b["fid_vs_full_unpaired"]), rel=1e-6)
    # Three different pairs of independent seed sets: three different, positive distances.
    dists = [float(b["fid_vs_full"]), float(c["fid_vs_full"]), float(c["fid_vs_full_unpaired"])]
    assert all(d > 0 and math.isfinite(d) for d in dists) and len(set(dists)) == 3


def test_markdown_keeps_the_conclusion_and_plot_is_written(results):
    _, out, _ = results
    md = (out / "results.md").read_text()
    assert "old table" not in md and md.endswith("## My reading\nkeep me\n")
    assert "FD(A-B) = " in md and "--samples 4" in md
    assert (out / "results.png").stat().st_size > 10_000
