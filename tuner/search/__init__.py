"""The search service (docs/design.md, Search): Optuna driver, Ray workers, SQL storage, MLflow tracking,
export.

The package is also callable: ``tuner.search(mem_target="15%", trials=40)`` runs a search from Python
with ``tuner search``'s configuration and driver (:func:`tuner.search.python_api.search_policy`, also
``tuner.search_policy``). Nothing is imported until it is called.
"""
import sys as _sys
import types as _types


class _CallablePackage(_types.ModuleType):
    def __call__(self, *, progress: bool = False, **flags):
        """``tuner.search(**flags)``: :func:`tuner.search.python_api.search_policy` (its docstring)."""
        from tuner.search.python_api import search_policy

        return search_policy(progress=progress, **flags)


_sys.modules[__name__].__class__ = _CallablePackage
