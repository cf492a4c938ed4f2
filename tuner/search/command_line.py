"""A resolved :class:`~tuner.search.config.SearchConfig` written back as the ``tuner search`` command
that reproduces it: the resume hint printed when a search is interrupted.

Every field that differs from its default is written, plus the ones that name the study and where it
lives (model, study name, storage, output directory, MLflow URI), so the hint resumes the same study
from any directory. ``tests/search/test_resume_command.py`` parses the hint back through the real CLI
for a config with every field set, so a new field without a flag here fails a test.
"""
from __future__ import annotations

import dataclasses
import shlex
from typing import Any

# config field -> flag, where the flag is not "--" + the field name with dashes
FLAG_OF = {"quality_limit": "--fid-limit", "timeout_s": "--timeout", "backend": "--attention-backend",
           "trial_timeout_s": "--trial-timeout"}
BOOLEAN_OFF = {"presets": "--no-presets", "fit_memory": "--no-fit"}  # field default True -> flag when False
BOOLEAN_ON = {"random_weights": "--random-weights"}  # field default False -> flag when True
TRI_STATE = {"grids": ("--grids", "--no-grids")}  # field default None (automatic) -> flag when True / False
ALWAYS = ("model", "study_name", "storage", "out", "mlflow_uri", "trials")


def _text(value: Any) -> str:
    if isinstance(value, float):
        return repr(value)  # round-trips exactly (0.96, not 0.9600000000000001 or 0.96 rounded)
    return str(value)


def config_argv(cfg: Any) -> list[str]:
    """``["tuner", "search", ...]`` for ``cfg``."""
    argv = ["tuner", "search"]
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    for f in dataclasses.fields(cfg):
        name, value = f.name, getattr(cfg, f.name)
        if name == "family" and cfg.space:
            continue  # --space overrides --family
        if name not in ALWAYS and value == defaults[name]:
            continue
        if name in BOOLEAN_OFF:
            if not value:
                argv.append(BOOLEAN_OFF[name])
            continue
        if name in BOOLEAN_ON:
            if value:
                argv.append(BOOLEAN_ON[name])
            continue
        if name in TRI_STATE:
            if value is not None:
                argv.append(TRI_STATE[name][0 if value else 1])
            continue
        if value is None:
            continue
        flag = FLAG_OF.get(name, "--" + name.replace("_", "-"))
        if name == "mem_target":
            argv += [flag, value.text]
        elif name == "sides":
            argv += [flag, ",".join(map(str, value))]
        elif name == "evaluator_kwargs":
            for key, item in value:
                argv += ["--evaluator-arg", f"{key}={item}"]
        else:
            argv += [flag, _text(value)]
    return argv


def resume_command(cfg: Any) -> str:
    """The shell command that continues this study (quoted for a POSIX shell)."""
    return " ".join(shlex.quote(part) for part in config_argv(cfg))
