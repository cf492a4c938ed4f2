"""Shared pieces of the search tests: a toy space file, configs with the fake evaluator, log reading."""
from __future__ import annotations

import json
import sys
from pathlib import Path

TOY_SPACE = """\
schema_version: 1
families:
  toy:
    params:
      window: {type: int, low: 1, high: "num_scales - 1"}
      odd_layers_half: {type: categorical, choices: [false, true]}
      tag: {type: categorical, choices: [a, b, c]}
"""
ROOT = Path(__file__).resolve().parents[2]


def toy_space(tmp_path: Path, text: str = TOY_SPACE) -> str:
    p = tmp_path / "toy.yaml"
    if not p.exists():
        p.write_text(text)
    return str(p)


def config(tmp_path: Path, **kw):
    """A resolved SearchConfig on the toy space with the fake evaluator, in-process, no MLflow."""
    from tuner.search.config import resolve_config

    out = Path(kw.pop("out", tmp_path / "run"))
    ev_kwargs = {"log": str(out.parent / f"{out.name}-evals.log"), **kw.pop("evaluator_kwargs", {})}
    defaults = dict(model="tiny", mem_target="40%", space=toy_space(tmp_path), trials=10, workers=0,
                    samples=4, final_samples=6, final_top_k=2, device="cpu", mlflow_uri="none", seed=0,
                    evaluator="tests.search.fake_eval:build", evaluator_kwargs=ev_kwargs, out=str(out))
    defaults.update(kw)
    return resolve_config(**defaults)


def counted(trials) -> list:
    """Finished trials that count toward --trials: not interrupted, not a duplicate of an earlier trial
    (a policy the study had already screened, answered from the cache)."""
    return [t for t in trials if t.state.name in ("COMPLETE", "FAIL", "PRUNED")
            and "interrupted" not in t.user_attrs and "duplicate_of" not in t.user_attrs]


def eval_log(cfg) -> list[dict]:
    path = Path(dict(cfg.evaluator_kwargs)["log"])
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def cli_args(cfg_kwargs: dict) -> list[str]:
    """Command line of ``python -m tests.search.cli_entry search`` for keyword flags."""
    args = [sys.executable, "-m", "tests.search.cli_entry", "search"]
    for key, value in cfg_kwargs.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, dict):
            for k, v in value.items():
                args += [flag, f"{k}={v}"]
        elif value is True:
            args.append(flag)
        else:
            args += [flag, str(value)]
    return args
