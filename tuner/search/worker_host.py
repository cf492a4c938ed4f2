"""What runs inside one worker process: an evaluator built once, evaluating policies on request.

The same class serves as a Ray actor (wrapped with ``ray.remote`` by :mod:`tuner.search.workers`)
and, with ``--workers 0``, in the driver process. Requests and results are plain dicts (a comparison
grid's images come back as one numpy array); nothing here imports optuna, mlflow or ray. The
evaluator is built from a factory path (``"pkg.module:function"``) so tests can substitute a light one
without touching the product path.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import sys
import time
import traceback
from typing import Any, Callable


def import_factory(path: str) -> Callable[..., Any]:
    """``"package.module:function"`` → the function (ValueError when it cannot be found)."""
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"evaluator factory module {module_name!r} cannot be imported: {exc}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ValueError(f"evaluator factory {path!r}: module has no attribute {attr!r}") from None


def build_eval_spec(spec_type: type, spec: dict[str, Any]) -> Any:
    """Instantiate the evaluator's ``EvalSpec`` from the driver's plain dict.

    The driver describes an evaluation by ``labels`` and a base ``seed``; the spec type may take
    ``seed`` or one seed per image (``seeds``). Only fields the type declares are passed.
    """
    names = {f.name for f in dataclasses.fields(spec_type)}
    kwargs: dict[str, Any] = {"labels": tuple(int(x) for x in spec["labels"])}
    if "seeds" in names:
        kwargs["seeds"] = tuple(int(spec["seed"]) + i for i in range(len(kwargs["labels"])))
    for key in ("seed", "cfg", "top_k", "top_p", "batch_size"):
        if key in names and key in spec:
            kwargs[key] = spec[key]
    return spec_type(**kwargs)


class WorkerHost:
    """Owns one evaluator (model + full-cache references) for the life of the process."""

    def __init__(self, factory: str, factory_kwargs: dict[str, Any] | None = None,
                 num_threads: int | None = None):
        self.factory = factory
        self.factory_kwargs = dict(factory_kwargs or {})
        self.num_threads = num_threads
        self._evaluator: Any = None
        self._spec_type: type | None = None

    def _build(self) -> Any:
        if self._evaluator is None:
            fn = import_factory(self.factory)
            self._evaluator = fn(**self.factory_kwargs)
            module = sys.modules[fn.__module__]
            spec_type = getattr(module, "EvalSpec", None)
            if spec_type is None:
                from tuner.quality.evaluate import EvalSpec as spec_type  # the product's spec
            self._spec_type = spec_type
            if self.num_threads and "torch" in sys.modules:
                import torch

                torch.set_num_threads(self.num_threads)
        return self._evaluator

    def ready(self) -> dict[str, Any]:
        """Build the evaluator (loads the model) and describe it: model hash, pid, calibration."""
        ev = self._build()
        info: dict[str, Any] = {"model_hash": str(ev.model_hash), "pid": os.getpid()}
        weights = getattr(getattr(ev, "loaded", None), "checkpoint_sha256", None)
        if weights:  # the weights alone (model_hash adds the prompt set and text encoder of Infinity)
            info["checkpoint_sha256"] = str(weights)
        describe = getattr(ev, "describe", None)
        if callable(describe):
            info.update(describe())
        return info

    def proxy(self, request: dict[str, Any], t0: float) -> dict[str, Any]:
        """``{"task_id", "proxy": [{"family", "params"}, ...]}`` → ``{"task_id", "scores", "seconds"}``:
        zero-generation proxy scores (an evaluator without ``proxy_scores`` answers with an error)."""
        try:
            ev = self._build()
            if not callable(getattr(ev, "proxy_scores", None)):
                raise ValueError("this evaluator has no zero-generation proxy")
            scores = ev.proxy_scores([(i["family"], dict(i["params"])) for i in request["proxy"]])
        except Exception as exc:  # noqa: BLE001 - reported to the driver, which goes on without it
            last = traceback.format_exception_only(type(exc), exc)[-1].strip()
            return {"task_id": request["task_id"], "error": last, "pid": os.getpid()}
        return {"task_id": request["task_id"], "scores": [float(x) for x in scores],
                "seconds": time.perf_counter() - t0, "pid": os.getpid()}

    def grid(self, request: dict[str, Any], t0: float) -> dict[str, Any]:
        """``{"task_id", "family", "params", "grid": {labels, seed, cfg, top_k, top_p, max_side}}`` →
        ``{"task_id", "columns": float32 array [N, 3, 3, h, w], "seconds"}``: the same-seed full cache |
        policy | difference images of one comparison grid (an evaluator without ``grid_columns``
        answers with an error)."""
        try:
            ev = self._build()
            if not callable(getattr(ev, "grid_columns", None)):
                raise ValueError("this evaluator renders no images for grids")
            columns = ev.grid_columns(request["family"], dict(request["params"]), dict(request["grid"]))
            array = columns.detach().float().cpu().numpy()
        except Exception as exc:  # noqa: BLE001 - reported to the driver, which goes on without the grid
            last = traceback.format_exception_only(type(exc), exc)[-1].strip()
            return {"task_id": request["task_id"], "error": last, "pid": os.getpid()}
        return {"task_id": request["task_id"], "columns": array, "seconds": time.perf_counter() - t0,
                "pid": os.getpid()}

    def evaluate(self, request: dict[str, Any]) -> dict[str, Any]:
        """Evaluate one policy; errors inside the evaluation come back as an ``error`` string.

        ``request``: ``{"task_id", "family", "params", "eval"}``. Returns ``{"task_id", "metrics",
        "seconds", "pid"}`` or ``{"task_id", "error", "pid"}``. A process that dies never returns:
        the pool notices and retries the request elsewhere.
        """
        t0 = time.perf_counter()
        if "proxy" in request:
            return self.proxy(request, t0)
        if "grid" in request:
            return self.grid(request, t0)
        try:
            ev = self._build()
            spec = build_eval_spec(self._spec_type, request["eval"])
            metrics = ev.evaluate(request["family"], dict(request["params"]), spec)
            clean = {str(k): float(v) for k, v in metrics.items()}
        except Exception as exc:  # noqa: BLE001 - a deterministic failure of this policy: report, do not die
            last = traceback.format_exception_only(type(exc), exc)[-1].strip()
            return {"task_id": request["task_id"], "error": last, "pid": os.getpid()}
        return {"task_id": request["task_id"], "metrics": clean, "seconds": time.perf_counter() - t0,
                "pid": os.getpid()}
