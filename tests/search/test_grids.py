"""Same-seed image grids at export (tuner/search/grids.py): rendered by the real engine, logged to MLflow
on the winner's and the front's trial runs (image key ``grid``) and on the study run (artifacts only), and
never in the way of the result."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest

from tests.search.helpers import config
from tuner.image_grid import CELL, GridLayout, difference
from tuner.images import to_uint8
from tuner.search import grids as G


@pytest.fixture
def one_thread():
    """The real evaluator on one torch thread (two threads on a busy 2-core machine run ~10x slower);
    the process's setting is restored afterwards."""
    import torch

    before = torch.get_num_threads()
    yield 1
    torch.set_num_threads(before)


def _png(path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def _cell(arr: np.ndarray, layout: GridLayout, row: int, col: int) -> np.ndarray:
    top, left, bottom, right = layout.box(row, col)
    return arr[top:bottom, left:right]


def _enlarged(image_hw3: np.ndarray, k: int) -> np.ndarray:
    return image_hw3.repeat(k, axis=0).repeat(k, axis=1)


def _artifacts(client, run_id: str, path: str) -> set[str]:
    return {a.path for a in client.list_artifacts(run_id, path)}


def _image_keys(client, run_id: str) -> set[str]:
    """The run's MLflow image keys (``client.log_image(key=...)`` writes ``images/<key>+step+...``)."""
    return {p.split("/", 1)[1].split("+step+", 1)[0] for p in _artifacts(client, run_id, "images")}


def _no_grid_images_on(client, parent: str) -> None:
    """The study run holds its grids as artifacts only: no ``grid*`` image key (no extra image charts)."""
    assert not {k for k in _image_keys(client, parent) if k.startswith("grid")}
    assert "mlflow.loggedImages" not in client.get_run(parent).data.tags


def test_grid_labels_and_spread():
    assert G.grid_labels(10) == [1, 3, 6, 8]
    assert G.grid_labels(1000) == [125, 375, 625, 875]
    assert G.grid_labels(2) == [0, 1]
    assert G.spread(list(range(20)), 4) == [0, 6, 13, 19]
    assert G.spread([1, 2], 8) == [1, 2]
    assert G.safe_name("sink_window@ams + int8") == "sink_window_ams_int8"


@pytest.mark.slow  # builds the real tiny evaluator
def test_a_keep_everything_policy_has_a_zero_difference_column(tmp_path, one_thread):
    """The worker request, on the real tiny evaluator: full and a window over every scale give the same
    images as the full cache, so the grid's third column is black and the first two are equal."""
    import torch

    from tuner.image_grid import comparison_grid, save_grid_png
    from tuner.search.worker_host import WorkerHost

    host = WorkerHost("tuner.quality.evaluate:build_evaluator", {"model": "tiny", "device": "cpu"},
                      num_threads=one_thread)
    spec = {"labels": G.grid_labels(10), "seed": G.GRID_SEED, "cfg": 1.5, "top_k": 900, "top_p": 0.96,
            "max_side": CELL}
    for family, params in (("full", {}), ("window", {"window": 99})):
        res = host.evaluate({"task_id": G.TASK_BASE, "family": family, "params": params, "grid": spec})
        assert "error" not in res, res
        cols = res["columns"]
        assert cols.shape == (4, 3, 3, 32, 32) and cols.dtype == np.float32
        assert np.array_equal(cols[:, 0], cols[:, 1]) and not cols[:, 2].any()
        grid, layout = comparison_grid(torch.from_numpy(cols))
        arr = _png(save_grid_png(grid, tmp_path / f"{family}.png"))
        for row in range(4):
            assert not _cell(arr, layout, row, 2).any()


@pytest.mark.slow
def test_grids_of_a_real_search_are_in_mlflow_and_equal_the_engine(tmp_path, one_thread):
    """A search on tiny with the real evaluator and a real local MLflow store (SQLite + artifact folder):
    the exported trial's child run and the study run hold the grid PNG (4 rows x 3 columns of 128 px);
    the full-cache column equals ``tuner.generate`` with the full cache, the policy column
    ``tuner.generate`` with the exported policy file and the difference column their x4 difference, bit
    for bit, on the grid's classes and seed. (No presets: the winner is then always a trial; the
    presets' grids are checked with the fake evaluator below.)"""
    from mlflow.tracking import MlflowClient

    import tuner
    from tuner.search.config import resolve_config
    from tuner.search.driver import run_search

    uri = f"sqlite:///{tmp_path / 'ml.db'}"
    cfg = resolve_config(model="tiny", mem_target="15%", family="all", trials=3, samples=2, min_samples=2,
                         final_samples=2, final_top_k=2, workers=0, device="cpu", mlflow_uri=uri,
                         out=str(tmp_path / "run"), eval_batch_size=8, proxy_candidates=0, presets=False,
                         seed=0, threads=one_thread)
    assert cfg.grids is None and cfg.grids_enabled  # on by default with tracking
    result = run_search(cfg, progress=False)
    assert result.policy_path is not None
    provenance = json.loads(result.policy_path.read_text())["provenance"]
    number, parent = provenance["trial"], provenance["mlflow_run_id"]
    assert number is not None

    client = MlflowClient(uri)
    winner_run = _trial_run(client, cfg, parent, number)
    assert _artifacts(client, winner_run, "grids") == {f"grids/trial_{number}.png"}
    assert _image_keys(client, winner_run) == {"grid"}
    assert "grids/winner.png" in _artifacts(client, parent, "grids")
    _no_grid_images_on(client, parent)

    layout = GridLayout(rows=len(G.grid_labels(10)), cell=CELL)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    winner_png = _png(client.download_artifacts(winner_run, f"grids/trial_{number}.png", str(tmp_path / "a")))
    overview = _png(client.download_artifacts(parent, "grids/winner.png", str(tmp_path / "b")))
    assert winner_png.shape == (*layout.size, 3) == (4 * 130 + 2, 3 * 130 + 2, 3)
    assert np.array_equal(winner_png, overview)

    model = tuner.load_model("tiny")
    labels = G.grid_labels(model.num_classes)
    full = tuner.generate(model, labels, seed=G.GRID_SEED, batch_size=len(labels))
    policy = tuner.generate(model, labels, seed=G.GRID_SEED, batch_size=len(labels),
                            policy=result.policy_path)
    k = CELL // model.config.resolution
    columns = zip(to_uint8(full), to_uint8(policy), to_uint8(difference(full, policy)))
    for row, (f, p, d) in enumerate(columns):
        assert np.array_equal(_cell(winner_png, layout, row, 0), _enlarged(f, k))
        assert np.array_equal(_cell(winner_png, layout, row, 1), _enlarged(p, k))
        assert np.array_equal(_cell(winner_png, layout, row, 2), _enlarged(d, k))
    assert not np.array_equal(full.numpy(), policy.numpy())  # a 15% policy changes the images
    for png in (cfg.out_dir / "grids").glob("*.png"):
        assert png.stat().st_size < 300_000 and _png(png).shape == winner_png.shape


def _trial_run(client, cfg, parent: str, number: int) -> str:
    exp = client.get_experiment_by_name(cfg.experiment)
    runs = client.search_runs([exp.experiment_id], filter_string=(
        f"tags.mlflow.parentRunId = '{parent}' and tags.`tuner.trial` = '{number}'"))
    assert len(runs) == 1
    return runs[0].info.run_id


def test_front_and_preset_grids_go_to_their_runs(tmp_path):
    """With images from the fake evaluator: every preset of the final comparison has its grid on the
    study run (an artifact, no image key), every front trial (and the exported one, when a trial) on
    its own run (artifact and image key ``grid``)."""
    from mlflow.tracking import MlflowClient

    from tuner.search.objective import Objective
    from tuner.search.report import front_records

    uri = f"sqlite:///{tmp_path / 'ml.db'}"
    cfg = config(tmp_path, mlflow_uri=uri, trials=6, evaluator="tests.search.fake_eval:build_with_grids")
    result, text = _run_quiet(cfg)
    assert result.policy_path is not None and "warning" not in text
    client = MlflowClient(uri)
    parent = result.mlflow_run_id
    presets = [row["policy"] for row in result.comparison[1:-1]]
    assert presets
    on_parent = _artifacts(client, parent, "grids")
    assert on_parent == {"grids/winner.png"} | {f"grids/preset_{G.safe_name(p)}.png" for p in presets}
    front = G.spread(front_records(result.records, Objective.from_config(cfg)), G.MAX_FRONT)
    trial = json.loads(result.policy_path.read_text())["provenance"]["trial"]
    numbers = {r.number for r in front} | ({trial} if trial is not None else set())
    assert front
    for n in numbers:
        run = _trial_run(client, cfg, parent, n)
        assert _artifacts(client, run, "grids") == {f"grids/trial_{n}.png"}
        assert _image_keys(client, run) == {"grid"}
    _no_grid_images_on(client, parent)
    written = sorted(p.name for p in (cfg.out_dir / "grids").glob("*.png"))
    assert written == sorted({p.rsplit("/", 1)[1] for p in on_parent} | {f"trial_{n}.png" for n in numbers})
    layout = GridLayout(rows=len(G.grid_labels(10)), cell=CELL)  # 8-px images enlarged x16
    assert _png(cfg.out_dir / "grids" / "winner.png").shape == (*layout.size, 3)
    assert f"image grids: {len(written)} written to" in text


def _run_quiet(cfg):
    from rich.console import Console

    from tuner.search.driver import run_search

    buf = io.StringIO()
    result = run_search(cfg, console=Console(file=buf, width=300, soft_wrap=True), progress=False)
    return result, buf.getvalue()


def test_an_evaluator_without_images_warns_and_the_result_stands(tmp_path):
    """The fake evaluator renders nothing: every grid fails, the search still exports and logs its
    reports, and the warning says why."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'ml.db'}"
    cfg = config(tmp_path, mlflow_uri=uri, trials=4)
    result, text = _run_quiet(cfg)
    assert result.policy_path is not None and result.policy_path.is_file()
    assert "image grid(s) not rendered: ValueError: this evaluator renders no images for grids" in text
    assert "image grids:" not in text and not (cfg.out_dir / "grids").exists()
    client = MlflowClient(uri)
    assert _artifacts(client, result.mlflow_run_id, "grids") == set()
    assert "policy" in {a.path for a in client.list_artifacts(result.mlflow_run_id)}


def test_no_grids_renders_nothing(tmp_path):
    cfg = config(tmp_path, mlflow_uri=f"sqlite:///{tmp_path / 'ml.db'}", trials=3, grids=False)
    assert not cfg.grids_enabled
    result, text = _run_quiet(cfg)
    assert result.policy_path is not None
    assert "image grids" not in text and not (cfg.out_dir / "grids").exists()
    assert not config(tmp_path, out=tmp_path / "r2").grids_enabled  # --mlflow-uri none: off by default
    assert config(tmp_path, out=tmp_path / "r3", grids=True).grids_enabled  # asked for: PNGs only


def test_help_explains_the_switch():
    from typer.testing import CliRunner

    from tests.search.cli_entry import app

    res = CliRunner().invoke(app, ["search", "--help"], env={"COLUMNS": "200", "TERM": "dumb"})
    assert res.exit_code == 0
    assert "--grids" in res.output and "--no-grids" in res.output
    assert "full cache | policy" in " ".join(res.output.split())
