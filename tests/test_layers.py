"""The package's layers, read from its imports (every one, function-level and TYPE_CHECKING ones included):
no import circle, and no module importing one from a floor above it or from a sibling folder on its floor.
Floors: runtime; model, data, cloud; convert; train; serve, checks; perf. The run config imports light."""

import ast
import subprocess
import sys

from tests.helpers import ROOT

PACKAGE = ROOT / "lightjax"
FLOORS = {"runtime": 0, "model": 1, "data": 1, "cloud": 1, "convert": 2, "train": 3, "serve": 4, "checks": 4,
          "perf": 5}


def _module(path):
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module(p): p for p in PACKAGE.rglob("*.py")}


def _imports(path):
    """The lightjax modules `path` imports (a name imported from a module counts as that module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            while name.startswith("lightjax.") and name not in MODULES:
                name = name.rpartition(".")[0]
            if name.startswith("lightjax."):
                found.add(name)
    return found


GRAPH = {m: _imports(p) - {m} for m, p in MODULES.items()}


def _folder(module):
    return module.split(".")[1]


def test_every_module_lives_in_a_layer_folder():
    assert sorted({_folder(m) for m in MODULES if m != "lightjax"}) == sorted(FLOORS)


def test_imports_point_down_the_floors():
    wrong = [f"{m} -> {d}" for m, deps in GRAPH.items() if m != "lightjax" for d in deps
             if FLOORS[_folder(d)] > FLOORS[_folder(m)]
             or (FLOORS[_folder(d)] == FLOORS[_folder(m)] and _folder(d) != _folder(m))]
    assert not wrong, wrong


def test_no_import_circles():
    done, path = set(), []

    def visit(module):
        if module in path:
            raise AssertionError(" -> ".join(path[path.index(module):] + [module]))
        if module in done:
            return
        path.append(module)
        for dep in sorted(GRAPH[module]):
            visit(dep)
        path.pop()
        done.add(module)

    for module in sorted(GRAPH):
        visit(module)


def test_a_config_file_imports_light():
    """Every config file imports lightjax.train.config: that must not pull in JAX, Flax or Jinja."""
    code = ("import sys, runpy; runpy.run_path('configs/baseline.py')['get_config'](); "
            "print(sorted(m for m in ('jax', 'flax', 'jinja2', 'tensorflow_datasets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
