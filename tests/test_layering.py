"""The package's import structure holds what docs/design.md says about it.

- No import circle between modules (every ``import``, module level or inside a function, counts).
- No import from a lower layer to a higher one: the layers are the ``layers`` block of
  docs/design.md, read by this test, so the document and the code cannot drift apart.
- The model, the policies and quality never import optuna, ray or mlflow.
- ``tuner --help`` and ``import tuner`` (the lazy API facade) import none of the heavy libraries.
"""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Import name -> source folder: the Triton kernels in kernels/ install as varkv_kernels (pyproject.toml).
PACKAGES = {"tuner": "tuner", "varkv_kernels": "kernels", "search_spaces": "search_spaces"}
HEAVY = ("torch", "optuna", "ray", "mlflow", "triton", "sqlalchemy", "numpy", "matplotlib")
SEARCH_STACK = ("optuna", "ray", "mlflow")


def _units(name: str, path: Path) -> list[tuple[str, ast.AST]]:
    """The import-bearing units of a module: the module itself and, for a package ``__init__``, its
    lazy module ``__getattr__`` (PEP 562) as a unit of its own, ``<package>.__getattr__``.

    Why apart: ``import tuner`` runs only the package's top level (the version and the names it
    offers); its ``__getattr__`` imports the API (the top layer) when a name is first used, after the
    package has been initialised. Counted as the package's own import, every module that reads
    ``tuner.__version__`` would sit in a circle with the API, and layer 0 would import the top layer;
    as a unit of its own, docs/design.md places it where it acts (the top layer).
    """
    tree = ast.parse(path.read_text(), str(path))
    if path.name != "__init__.py":
        return [(name, tree)]
    lazy = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "__getattr__"]
    tree.body = [n for n in tree.body if n not in lazy]
    return [(name, tree)] + [(f"{name}.__getattr__", fn) for fn in lazy]


def module_imports() -> dict[str, set[str]]:
    """Module name -> the project modules it imports (``from a import b`` counts a.b when it is one).

    A package's lazy ``__getattr__`` is a unit of its own (see :func:`_units`)."""
    files = {}
    for package, folder in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            name = ".".join((package, *path.relative_to(ROOT / folder).with_suffix("").parts))
            files[name.removesuffix(".__init__")] = path
    units = [unit for name, path in files.items() for unit in _units(name, path)]
    out: dict[str, set[str]] = {}
    for name, tree in units:
        deps: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for target in targets:
                if target in files and target != name:
                    deps.add(target)
                    break
        out[name] = deps
    return out


def third_party_imports(package_dir: Path) -> set[str]:
    names = set()
    for path in package_dir.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
            elif isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
    return names


def design_layers() -> list[list[str]]:
    """The ``layers`` block of docs/design.md: one line per layer, lowest first, group names."""
    text = (ROOT / "docs" / "design.md").read_text()
    block = re.search(r"```layers\n(.*?)```", text, re.S)
    assert block, "docs/design.md has no ```layers block"
    layers = []
    for line in block.group(1).splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            layers.append(line.split(":", 1)[1].split())
    return layers


def group_of(module: str, groups: set[str]) -> str:
    """The longest layer group that is ``module`` or a package above it."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in groups:
            return ".".join(parts[:n])
    raise AssertionError(f"{module} is in no layer of docs/design.md; add it there")


def test_no_import_circle():
    graph = module_imports()
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert cycles == [], f"import circles: {cycles}"


def test_no_import_from_a_lower_layer_to_a_higher_one():
    layers = design_layers()
    rank = {group: i for i, layer in enumerate(layers) for group in layer}
    groups = set(rank)
    upward = defaultdict(set)
    for module, deps in module_imports().items():
        mine = rank[group_of(module, groups)]
        for dep in deps:
            dep_group = group_of(dep, groups)
            if rank[dep_group] > mine:
                upward[module].add(dep)
    assert dict(upward) == {}, f"imports from a lower layer to a higher one: {dict(upward)}"


def test_model_policies_and_quality_never_import_the_search_stack():
    for package in ("model", "policies", "quality"):
        found = third_party_imports(ROOT / "tuner" / package) & set(SEARCH_STACK)
        assert not found, f"tuner/{package} imports {found}"


def test_help_needs_no_heavy_import():
    code = ("import sys\nfrom tuner.cli import main\ntry:\n    main(['--help'])\n"
            "except SystemExit:\n    pass\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "[]", res.stdout[-500:]


def test_import_tuner_needs_no_heavy_import():
    """``import tuner`` runs the package's top level only: the API behind it loads on first use."""
    code = f"import sys, tuner\nprint(sorted(m for m in {HEAVY!r} + ('tuner.api',) if m in sys.modules))"
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "[]", res.stdout[-500:]
