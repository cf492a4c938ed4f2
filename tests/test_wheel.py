"""The built wheel is the product: installed non-editable into a fresh virtual environment, it holds
the search spaces, the presets and the tiny model, and ``tuner search`` runs from it on tiny.

The fresh environment gets the dependencies through a ``.pth`` line naming this environment's
site-packages (nothing is downloaded). Python does not run the ``.pth`` files of a directory named
that way, so this checkout's editable install stays invisible: the test checks that ``tuner`` is
imported from the new environment.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the tracked files (setuptools' build/ stays out of the checkout)."""
    out, src = tmp_path_factory.mktemp("dist"), tmp_path_factory.mktemp("src") / "varkv-tuner"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True).stdout
    for name in filter(None, files.decode().split("\0")):
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(out), str(src)], check=True, timeout=600)
    (path,) = out.glob("varkv_tuner-*.whl")
    return path


def test_the_wheel_holds_the_data_files(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    spaces = {n for n in names if n.startswith("search_spaces/") and n.endswith(".yaml")}
    assert spaces == {f"search_spaces/{f.name}" for f in (ROOT / "search_spaces").glob("*.yaml")}
    assert "search_spaces/all.yaml" in spaces
    assert any(n.startswith("tuner/assets/tiny/") for n in names)
    assert any(n.startswith("tuner/assets/presets/tiny/") for n in names)
    assert not any(n.startswith(("tests/", "experiments/")) for n in names)


def test_the_wheel_holds_every_module(wheel):
    """pyproject.toml lists the packages one by one (kernels/ installs as varkv_kernels): a package left
    off the list, or a kernel module, would be missing from the wheel and fail only on import."""
    names = set(zipfile.ZipFile(wheel).namelist())
    files = subprocess.run(["git", "ls-files", "tuner", "kernels", "search_spaces"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split()
    modules = {("varkv_kernels/" + f.removeprefix("kernels/")) if f.startswith("kernels/") else f
               for f in files if f.endswith(".py")}
    assert modules - names == set()
    assert not any(n.startswith("kernels/") for n in names)


def test_search_runs_from_a_non_editable_install(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    (Path(site) / "deps-from-the-test-environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q",
                    str(wheel)], check=True, timeout=300)
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "TUNER_WEIGHTS_DIR", "MLFLOW_TRACKING_URI")}
    where = subprocess.run([str(py), "-c",
                            "import tuner, search_spaces; print(tuner.__file__, search_spaces.__file__)"],
                           cwd=work, env=env, check=True, capture_output=True, text=True).stdout.split()
    assert all(p.startswith(site) for p in where), where
    res = subprocess.run([str(venv / "bin" / "tuner"), "search", "--mem-target", "15%", "--trials", "2",
                          "--samples", "2", "--final-samples", "2", "--workers", "0", "--no-progress",
                          "--mlflow-uri", "none"],
                         cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "policy written to" in res.stdout + res.stderr
    assert list((work / "runs").glob("*/policy_tiny_15pct.json"))
