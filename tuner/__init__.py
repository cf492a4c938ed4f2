"""varkv-tuner: finds KV-cache allocation policies for next-scale visual autoregressive models.

The Python API (docs/design.md, API; README "Use a policy in your code")::

    import tuner
    model = tuner.load_model("tiny")
    images = tuner.generate(model, [0, 1, 2, 3], policy="policies/tiny-15pct.json")  # [4, 3, 32, 32]

``import tuner`` stays cheap: it holds the version and names the API; the first use of a name
imports :mod:`tuner.api` (and torch) through the module ``__getattr__`` below. Heavy dependencies
(torch, optuna, ray, mlflow, triton) are imported inside the modules that use them.
"""
__version__ = "0.1.0"

# What the API names (tuner.api holds them). ``tuner.search`` is the search subpackage, which is also
# callable: ``tuner.search(mem_target="15%")`` is ``tuner.search_policy(mem_target="15%")``.
__all__ = ["Model", "Policy", "PlanSummary", "SearchSummary", "PolicyHooks", "load_model", "load_policy",
           "generate", "plan", "search_config", "search_policy", "apply_policy"]


def __getattr__(name: str):
    """The lazy facade: ``tuner.load_model`` etc. import :mod:`tuner.api` on first use (PEP 562)."""
    if name in __all__:
        from tuner import api

        return getattr(api, name)
    if name == "search":  # the callable subpackage (Python sets the attribute once it is imported)
        import importlib

        return importlib.import_module("tuner.search")
    raise AttributeError(f"module 'tuner' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
