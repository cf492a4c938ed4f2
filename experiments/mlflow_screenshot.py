"""Screenshots of the MLflow UI on a finished study, taken in a real headless Chromium (for the README).

    python -m experiments.mlflow_screenshot --url http://127.0.0.1:5000 --experiment varkv-tiny \
        --study tiny-all-mem25pct --out docs/images

Needs a running ``mlflow server`` on the store the searches wrote, Debian's ``chromium`` and the Python
``playwright`` package (not a project dependency; its own browser download is not used). Writes
``mlflow_study.png`` (the study's parent run with its trial runs), ``mlflow_pareto.png`` (the parent run's
Pareto PNG artifact), ``mlflow_compare.png`` (the ``pareto.*`` front charts of every study run),
``mlflow_grids.png`` (the chart view of the study's Pareto trials, ticked, charts filtered to ``grid``:
the one image chart, widened to half the chart area and without the run parameters, shows their same-seed
image grids side by side) and ``mlflow_grid_artifact.png`` (the parent run's ``grids/winner.png``). With
``--dashboard URL`` of a running ``optuna-dashboard`` on the study's storage, also ``optuna_dashboard.png``
(the study page) and ``optuna_dashboard_trials.png`` (its trial table with the user attributes). Each
page is shot once a run name (or the study name) is on screen, not after a fixed sleep.
"""
from __future__ import annotations

import argparse
import json
import urllib.parse
import urllib.request
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 60_000


def api(url: str, path: str, body: dict) -> dict:
    req = urllib.request.Request(f"{url}/api/2.0/mlflow/{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.load(resp)


def study_runs(url: str, experiment: str, study: str) -> tuple[str, str]:
    """(experiment id, parent run id) of ``study``, read through the server's REST API."""
    with urllib.request.urlopen(f"{url}/api/2.0/mlflow/experiments/get-by-name?"
                                + urllib.parse.urlencode({"experiment_name": experiment}),
                                timeout=30) as resp:
        exp_id = json.load(resp)["experiment"]["experiment_id"]
    runs = api(url, "runs/search", {"experiment_ids": [exp_id], "max_results": 1,
                                    "filter": f"tags.`tuner.study` = '{study}' and "
                                              "tags.`tuner.role` = 'study'"})
    if not runs.get("runs"):
        raise SystemExit(f"no study run {study!r} in experiment {experiment!r} at {url}")
    return exp_id, runs["runs"][0]["info"]["run_id"]


def exported_trial(board: str, study_id: int) -> int | None:
    """The trial number in the study's ``exported_policy`` attribute, read through the dashboard's API."""
    with urllib.request.urlopen(f"{board}/api/studies/{study_id}", timeout=30) as resp:
        attrs = {a["key"]: a["value"] for a in json.load(resp)["user_attrs"]}
    return json.loads(attrs.get("exported_policy", "{}")).get("trial")


def tidy(page) -> None:
    """Close the assistant side panel and switch the sidebar to 'Model training' when they are shown."""
    close = page.get_by_role("button", name="Close", exact=True)
    if close.count():
        close.first.click()
    training = page.get_by_role("button", name="Model training", exact=True)
    if training.count():
        training.first.click()


def chart_view(page) -> None:
    """Switch the runs page to its chart view (switching the sidebar to 'Model training' shows the table)."""
    mode = page.locator('input[name="runs-view-mode"][value="CHART"]')
    if not mode.is_checked():
        page.locator('label:has(input[name="runs-view-mode"][value="CHART"])').click()


def expand_parent(page) -> None:
    """Expand the first parent run of the runs table to show its trial runs (unless it is already: the page
    keeps that state)."""
    page.wait_for_timeout(1000)
    if not page.get_by_text("trial-", exact=False).first.is_visible():
        page.locator('button[data-component-id$="runnamecellrenderer.tsx_46"]').first.click()
    page.get_by_text("trial-", exact=False).first.wait_for(timeout=TIMEOUT_MS)


def widen_image_chart(page, card) -> None:
    """Hide the run parameters of image chart ``card`` and resize it to half the chart area, the tallest
    height: each run is then a 192 px thumbnail, next to each other (the parameters, one long line per run,
    would put every run on a row of its own)."""
    card.get_by_role("button").nth(1).click()  # the card's menu
    page.get_by_role("menuitem", name="Configure").click()
    page.get_by_text("Show run parameters").click()
    page.get_by_role("button", name="Save changes").click()
    page.wait_for_timeout(1000)
    box = card.bounding_box()  # 1/3 of the area; the resize handle snaps to 1..5 columns, 300..500 px
    x, y = box["x"] + box["width"] - 3, box["y"] + box["height"] - 3
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + 40, y + 40, steps=5)
    page.mouse.move(box["x"] + 1.5 * box["width"], y + 400, steps=20)
    page.mouse.up()
    page.wait_for_timeout(1000)


def show_metric_columns(page, names: list[str],
                        hide: tuple[str, ...] = ("Dataset", "Source", "Models")) -> None:
    """Tick ``names`` (metrics or tags) in the Columns menu and untick the empty default ``hide`` columns."""
    page.get_by_role("button", name="Columns", exact=True).click()
    for name in hide:
        page.get_by_role("dialog").get_by_text(name, exact=True).first.click()
    search = page.get_by_placeholder("Search columns")
    for name in names:
        search.fill(name)
        page.get_by_role("dialog").get_by_text(name, exact=True).first.click()
    page.keyboard.press("Escape")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:5000")
    ap.add_argument("--experiment", default="varkv-tiny")
    ap.add_argument("--study", default="tiny-all-mem25pct", help="study (parent run) shown expanded")
    ap.add_argument("--metric", default="psnr")  # the search's default metric
    ap.add_argument("--out", default="docs/images")
    ap.add_argument("--dashboard", default=None, help="URL of an optuna-dashboard on the study's storage")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    url = args.url.rstrip("/")
    exp_id, run_id = study_runs(url, args.experiment, args.study)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})

        # 1. the study's runs: filter on its tag, expand the parent run to show the trial runs
        flt = urllib.parse.quote(f"tags.`tuner.study` = '{args.study}'")
        page.goto(f"{url}/#/experiments/{exp_id}/runs?searchFilter={flt}")
        page.get_by_text(args.study).first.wait_for(timeout=TIMEOUT_MS)
        tidy(page)
        page.get_by_text(args.study).first.wait_for(timeout=TIMEOUT_MS)
        expand_parent(page)
        show_metric_columns(page, ["memory_fraction", args.metric, "psnr", "tuner.pareto"])
        page.get_by_text("trial-0", exact=True).first.wait_for(timeout=TIMEOUT_MS)
        page.wait_for_timeout(1500)  # let the table / charts finish their layout animation
        page.screenshot(path=str(out / "mlflow_study.png"))

        # 2. the parent run's Pareto PNG artifact
        page.goto(f"{url}/#/experiments/{exp_id}/runs/{run_id}/artifacts/pareto/pareto.png")
        page.get_by_text("pareto/pareto.png").first.wait_for(timeout=TIMEOUT_MS)
        tidy(page)
        page.wait_for_function("Array.from(document.images).some(i => i.complete && i.naturalWidth > 300)",
                               timeout=TIMEOUT_MS)  # the artifact preview has loaded
        page.wait_for_timeout(1500)  # let the table / charts finish their layout animation
        page.screenshot(path=str(out / "mlflow_pareto.png"))

        # 3. every study's front: chart view of the parent runs, charts filtered to pareto.*
        flt = urllib.parse.quote("tags.`tuner.role` = 'study'")
        page.goto(f"{url}/#/experiments/{exp_id}/runs?compareRunsMode=CHART&searchFilter={flt}")
        page.get_by_text(args.study).first.wait_for(timeout=TIMEOUT_MS)
        tidy(page)
        chart_view(page)
        page.get_by_placeholder("Search metric charts").fill("pareto.")
        page.get_by_text(f"pareto.{args.metric}").first.wait_for(timeout=TIMEOUT_MS)
        page.wait_for_timeout(1500)  # let the table / charts finish their layout animation
        page.screenshot(path=str(out / "mlflow_compare.png"))

        # 4. same-seed image grids of the study's front trials, ticked, side by side (image key "grid")
        flt = urllib.parse.quote(f"tags.`tuner.study` = '{args.study}' and tags.`tuner.pareto` = 'true'")
        page.goto(f"{url}/#/experiments/{exp_id}/runs?compareRunsMode=CHART&searchFilter={flt}")
        page.get_by_text(args.study).first.wait_for(timeout=TIMEOUT_MS)
        tidy(page)
        page.get_by_text(args.study).first.wait_for(timeout=TIMEOUT_MS)
        expand_parent(page)
        chart_view(page)
        page.get_by_placeholder("Search metric charts").fill("grid")
        card = page.locator('[data-testid="experiment-view-compare-runs-card"]').first
        card.wait_for(timeout=TIMEOUT_MS)
        page.wait_for_timeout(2000)  # the card re-renders once its images are listed
        widen_image_chart(page, card)
        trials = page.locator('[role="row"]', has=page.get_by_text("trial-", exact=False))
        for i in range(min(3, trials.count())):
            trials.nth(i).get_by_role("checkbox").first.check()
        page.evaluate("document.activeElement && document.activeElement.blur()")  # no focus ring
        page.wait_for_function("Array.from(document.images).filter(i => i.complete && i.naturalWidth > 100)"
                               ".length >= 2", timeout=TIMEOUT_MS)
        page.wait_for_timeout(1500)
        page.screenshot(path=str(out / "mlflow_grids.png"))
        shots = ["mlflow_study.png", "mlflow_pareto.png", "mlflow_compare.png", "mlflow_grids.png"]

        # 5. the study run's overview grid artifact
        page.goto(f"{url}/#/experiments/{exp_id}/runs/{run_id}/artifacts/grids/winner.png")
        page.get_by_text("grids/winner.png").first.wait_for(timeout=TIMEOUT_MS)
        tidy(page)
        page.wait_for_function("Array.from(document.images).some(i => i.complete && i.naturalWidth > 300)",
                               timeout=TIMEOUT_MS)
        page.wait_for_timeout(1500)
        page.screenshot(path=str(out / "mlflow_grid_artifact.png"))
        shots.append("mlflow_grid_artifact.png")

        # 6. optuna-dashboard on the study's storage: the study page and its trial table
        if args.dashboard:
            board = args.dashboard.rstrip("/")
            with urllib.request.urlopen(f"{board}/api/studies", timeout=30) as resp:
                ids = [s["study_id"] for s in json.load(resp)["study_summaries"]
                       if s["study_name"] == args.study]
            if not ids:
                raise SystemExit(f"no study {args.study!r} in the dashboard at {board}")
            page.goto(f"{board}/dashboard/studies/{ids[0]}")
            page.get_by_text(args.study).first.wait_for(timeout=TIMEOUT_MS)
            page.wait_for_timeout(2500)  # plots
            page.screenshot(path=str(out / "optuna_dashboard.png"))
            page.goto(f"{board}/dashboard/studies/{ids[0]}/trials")
            page.get_by_text("metrics").first.wait_for(timeout=TIMEOUT_MS)
            exported = exported_trial(board, ids[0])
            if exported is not None:  # open the trial the policy file was exported from
                page.get_by_text(f"Trial {exported}", exact=True).first.click()
                page.get_by_text(f"Trial {exported} (trial_id").first.wait_for(timeout=TIMEOUT_MS)
            page.wait_for_timeout(1500)
            page.screenshot(path=str(out / "optuna_dashboard_trials.png"))
            shots += ["optuna_dashboard.png", "optuna_dashboard_trials.png"]
        browser.close()
    print(f"wrote {', '.join(str(out / name) for name in shots)}")


if __name__ == "__main__":
    main()
