"""The modules of airlab import each other without a cycle (issue 12), the whole package and not
only the numerics, which are layered grid -> filters -> splines -> spatial -> losses, regularisers,
transforms. Imports inside functions count too: a lazy import only hides a cycle until someone
moves it to the top."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import airlab

ROOT = Path(airlab.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The airlab modules ``path`` imports (a package's ``__init__`` only where it is named)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            target = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
            for a in node.names:  # `from . import splines` names a module
                if f"{target}.{a.name}" in modules:
                    out.add(f"{target}.{a.name}")
                elif target in modules and (node.module or node.level == 0):
                    out.add(target)
    return out - {name}


def _graph() -> dict[str, set[str]]:
    paths = sorted(ROOT.rglob("*.py"))
    modules = {_module_name(p) for p in paths}
    return {_module_name(p): _imports(p, modules) for p in paths}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


NUMERICS = ["airlab.grid", "airlab.filters", "airlab.compiled", "airlab.splines", "airlab.spatial", "airlab.losses",
            "airlab.regularisers", "airlab.pyramid", "airlab.transforms.bspline", "airlab.transforms.wendland",
            "airlab.transforms.velocity", "airlab.transforms.dense"]


def test_numerics_import_no_cycle():
    graph = _graph()
    numerics = {m: graph[m] & set(NUMERICS) for m in NUMERICS}
    assert _cycles(numerics) == []


def test_package_imports_no_cycle():
    """No exceptions: the engine does not import the workflows (``as_image`` is image.py's) and
    the schema does not import the presets (it reads and expands them itself)."""
    assert _cycles(_graph()) == []


def test_cycle_finder_sees_lazy_imports(tmp_path, monkeypatch):
    """The check above can fail: an import inside a function back up the layers is a cycle."""
    package = tmp_path / "airlab"
    (package / "workflows").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "workflows" / "__init__.py").write_text("")
    (package / "registration.py").write_text("def warp():\n    from .workflows.pairwise import as_image\n")
    (package / "workflows" / "pairwise.py").write_text("from ..registration import warp\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", package)
    assert _cycles(_graph()) == [["airlab.registration", "airlab.workflows.pairwise"]]


def test_engine_and_schema_stay_below_what_uses_them():
    graph = _graph()
    assert not any(m.startswith("airlab.workflows") for m in graph["airlab.registration"])
    assert "airlab.pipelines.presets" not in graph["airlab.pipelines.schema"]


def test_numerics_layers():
    graph = _graph()
    assert graph["airlab.grid"] == set()
    assert graph["airlab.filters"] <= {"airlab.grid"}
    assert graph["airlab.compiled_loops"] == set()  # compiled loops: arrays in, arrays out
    assert graph["airlab.compiled"] <= {"airlab.compiled_loops"}
    assert graph["airlab.splines"] <= {"airlab.grid", "airlab.filters", "airlab.compiled"}


@pytest.mark.parametrize("module", ["airlab.grid", "airlab.filters", "airlab.compiled", "airlab.splines",
                                    "airlab.spatial"])
def test_each_numerics_module_imports_first(module):
    """Imported first in a fresh interpreter, each module finds what it needs (a cycle shows as
    an ImportError of a partially initialised module)."""
    out = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def _private_imports(root: Path) -> list[str]:
    """``from X import _name`` and ``module._name`` (a module's private name used from outside it)
    anywhere under ``root``; dunders are public."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                found += [f"{path.name}: from {node.module} import {a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
            elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                  and node.value.id not in ("self", "cls") and node.attr.startswith("_")
                  and not node.attr.startswith("__")):
                found.append(f"{path.name}: {node.value.id}.{node.attr}")
    return found


def test_no_private_name_is_imported_across_modules():
    """Issue 12: a private name is the module's own; whoever needs it needs a public one."""
    assert _private_imports(ROOT) == []


def test_private_name_finder_sees_them(tmp_path):
    (tmp_path / "a.py").write_text("from .b import _helper\nimport c\nc._cache.clear()\nself._x = 1\n")
    assert _private_imports(tmp_path) == ["a.py: from b import _helper", "a.py: c._cache"]


@pytest.mark.parametrize("module", ["registration", "solver", "objective", "optim", "pyramid"])
def test_the_engine_dispatches_on_types_not_attributes(module):
    """Issue 12: the engine asks what a thing is (isinstance), not whether it has an attribute."""
    assert "hasattr(" not in (ROOT / f"{module}.py").read_text(encoding="utf-8")
