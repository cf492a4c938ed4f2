"""Progress of calibration on stderr: plain, throttled lines when stderr is not a terminal (a pipe, a CI
log), through ``tuner calibrate`` and ``tuner presets``; the throttle itself on a fake clock."""
from __future__ import annotations

import re

import pytest

from tests.test_cli_generate import ckpt_args, run
from tuner.cli.progress import PlainLines, format_count

LINE = re.compile(r"^calibrating \w+: [\d.]+/2 images \(\d+%\), (\d+ s elapsed|done in [\d.]+ s)$")


@pytest.fixture(autouse=True)
def _plain_stderr(tmp_path, monkeypatch):
    """A fresh calibration cache, and nothing that makes rich call a captured stream a terminal."""
    monkeypatch.setenv("TUNER_CACHE_DIR", str(tmp_path / "cache"))
    for key in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        monkeypatch.delenv(key, raising=False)


def progress_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("calibrating ")]


@pytest.mark.parametrize("command", ["calibrate", "presets"])
def test_calibration_progress_lines_on_a_non_terminal_stderr(command, tmp_path, small_ckpts):
    extra = ["--samples", "2"] if command == "calibrate" else ["--calibration-samples", "2"]
    r = run(command, *ckpt_args(small_ckpts), *extra, "--out", tmp_path / "out", "--device", "cpu")
    assert r.exit_code == 0, r.output
    lines = progress_lines(r.stderr)
    assert len(lines) >= 2, r.stderr  # the first update and the end, whatever the speed
    assert all(LINE.match(ln) for ln in lines), lines
    assert re.match(r"calibrating d2: 2/2 images \(100%\), done in ", lines[-1]), lines
    assert "calibrating" not in r.stdout  # stdout keeps the command's own output only
    again = run(command, *ckpt_args(small_ckpts), *extra, "--out", tmp_path / "out2", "--device", "cpu")
    assert again.exit_code == 0 and progress_lines(again.stderr) == []  # cached: nothing to report


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_plain_lines_first_every_ten_percent_at_most_every_five_seconds_and_the_end():
    clock, out = Clock(), []
    p = PlainLines("calibrating d16", 16, "images", out.append, clock=clock)
    p.update(0.01)  # first update: printed at once
    clock.t += 1
    p.update(8)  # half of it, but 1 s after the last line: held back
    clock.t += 5
    p.update(8.5)  # >= 10% more and >= 5 s since the last line
    clock.t += 6
    p.update(8.6)  # 5 s passed, but not 10% more
    clock.t += 31
    p.update(8.7)  # heartbeat: 30 s without a line and the count moved
    clock.t += 40
    p.update(8.7)  # nothing moved: no heartbeat
    clock.t += 1
    p.update(16)  # the end: always
    p.update(16)  # once
    assert out == ["calibrating d16: 0.0/16 images (0%), 0 s elapsed",
                   "calibrating d16: 8.5/16 images (53%), 6 s elapsed",
                   "calibrating d16: 8.7/16 images (54%), 43 s elapsed",
                   "calibrating d16: 16/16 images (100%), done in 84.0 s"]


def test_format_count():
    assert format_count(3) == "3" and format_count(3.0) == "3" and format_count(3.44) == "3.4"
