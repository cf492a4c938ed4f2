"""Screenshots of the MLflow UI on a finished study, taken in a real headless Chromium (for the README).

    python -m experiments.mlflow_screenshot --url http://127.0.0.1:5000 --experiment varkv-tiny \
        --study tiny-all-mem25pct --out docs/images

Needs a running ``mlflow server`` on the store the searches wrote, Debian's ``chromium`` and the Python
``playwright`` package (not a project dependency; its own browser download is not used). Writes
``mlflow_study.png`` (the study's parent run with its trial runs), ``mlflow_pareto.png`` (the parent run's
Pareto PNG artifact) and ``mlflow_compare.png`` (the ``pareto.*`` front charts of every study run). Each page
is shot once a run name is on screen, not after a fixed sleep.
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


def tidy(page) -> None:
    """Close the assistant side panel and switch the sidebar to 'Model training' when they are shown."""
    close = page.get_by_role("button", name="Close", exact=True)
    if close.count():
        close.first.click()
    training = page.get_by_role("button", name="Model training", exact=True)
    if training.count():
        training.first.click()


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
    ap.add_argument("--metric", default="fid_vs_full")
    ap.add_argument("--out", default="docs/images")
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
        page.locator('button[data-component-id$="runnamecellrenderer.tsx_46"]').first.click()
        page.get_by_text("trial-0", exact=True).first.wait_for(timeout=TIMEOUT_MS)
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
        page.get_by_placeholder("Search metric charts").fill("pareto.")
        page.get_by_text(f"pareto.{args.metric}").first.wait_for(timeout=TIMEOUT_MS)
        page.wait_for_timeout(1500)  # let the table / charts finish their layout animation
        page.screenshot(path=str(out / "mlflow_compare.png"))
        browser.close()
    print(f"wrote {out}/mlflow_study.png, mlflow_pareto.png, mlflow_compare.png")


if __name__ == "__main__":
    main()
