"""One-way dependencies: the reference (`latentDLM_mmdit`) knows nothing of the cycle trainer.

Checked twice: statically over the import graph of every module's source (ast), and at run time
(importing every reference module leaves `cycle_vae_impl` unimported).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "latentDLM_mmdit"
FORBIDDEN = ("cycle_vae_impl", "compat", "bench")


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            names.add(str(node.args[0].value))
    return names


REFERENCE_MODULES = sorted(REFERENCE.rglob("*.py"))


@pytest.mark.parametrize("path", REFERENCE_MODULES, ids=[str(p.relative_to(REPO)) for p in REFERENCE_MODULES])
def test_reference_module_imports_no_cycle_or_suite_code(path):
    bad = sorted(m for m in imported_modules(path) if m.split(".")[0] in FORBIDDEN)
    assert not bad, f"{path.relative_to(REPO)} imports {bad}: the reference must not depend on them"


def test_import_graph_checker_sees_a_planted_import(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text("def f():\n    from cycle_vae_impl.trainers import cycle_vae_trainer\n")
    assert "cycle_vae_impl.trainers" in imported_modules(planted)


def test_importing_the_whole_reference_loads_no_cycle_module():
    modules = [".".join(p.relative_to(REPO).with_suffix("").parts) for p in REFERENCE_MODULES]
    modules = [m.removesuffix(".__init__") for m in modules]
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}:\n    importlib.import_module(m)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('cycle_vae_impl', 'compat'))\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"importing the reference loaded {proc.stdout.strip()}\n{proc.stderr[-2000:]}"


PACKAGES = ("latentDLM_mmdit", "cycle_vae_impl", "compat", "bench")


def module_graph(root: Path, packages=PACKAGES) -> dict[str, set[str]]:
    """Module -> the project modules it imports, function-local imports included (`from a import b`
    counts as importing `a.b` when that is a module)."""
    files = {}
    for package in packages:
        for path in (root / package).rglob("*.py"):
            name = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
            files[name] = path
    graph = {}
    for name, path in files.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets.add(node.module)
                targets.update(f"{node.module}.{alias.name}" for alias in node.names)
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_even_through_function_local_imports():
    """A function-local import must not hide a cycle (it only defers one): the project's modules
    form a DAG with those counted."""
    cycles = import_cycles(module_graph(REPO))
    assert not cycles, f"import cycles (function-local imports included): {cycles}"


def test_cycle_finder_sees_a_planted_cycle(tmp_path):
    package = tmp_path / "compat"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from compat.b import x\n")
    (package / "b.py").write_text("def x():\n    from compat import a\n")
    assert import_cycles(module_graph(tmp_path, ("compat",))) == [["compat.a", "compat.b"]]


# The packages split along a loop's / a file format's concerns: each module may import only those
# before it (the README's Layout says the same order), and none the package's interface (__init__).
SPLIT_PACKAGES = {
    "latentDLM_mmdit.checkpoints": (
        "base", "keys", "safetensors_header", "source", "layout", "nonfinite", "loading", "saving", "convert",
    ),
    "latentDLM_mmdit.settings": ("schema", "upstream_keys", "introspection", "validation"),
    "latentDLM_mmdit.training": (
        "loop_settings", "distributed", "dataloader", "run_dir", "checkpointing", "step", "loop", "cli",
    ),
}  # fmt: skip


def layer_violations(graph: dict[str, set[str]], package: str, order: tuple[str, ...]) -> list[str]:
    """'a imports b' for each module of `package` that imports a later one or the package itself."""
    found = []
    for i, name in enumerate(order):
        allowed = {f"{package}.{earlier}" for earlier in order[:i]}
        for target in sorted(graph.get(f"{package}.{name}", ())):
            if (target == package or target.startswith(package + ".")) and target not in allowed:
                found.append(f"{package}.{name} imports {target}")
    return found


@pytest.mark.parametrize("package", sorted(SPLIT_PACKAGES))
def test_each_module_of_a_split_package_imports_only_those_before_it(package):
    graph = module_graph(REPO)
    order = SPLIT_PACKAGES[package]
    modules = {m.removeprefix(package + ".") for m in graph if m.startswith(package + ".")}
    assert modules - {"__main__"} == set(order), (modules, order)  # a new module is placed in the order
    assert not layer_violations(graph, package, order)


def test_the_layer_order_check_sees_a_planted_upward_import(tmp_path):
    package = tmp_path / "latentDLM_mmdit" / "training"
    package.mkdir(parents=True)
    for name in ("__init__", "loop_settings", "step"):
        (package / f"{name}.py").write_text("")
    (package / "loop_settings.py").write_text("from latentDLM_mmdit.training.step import StepRunner\n")
    graph = module_graph(tmp_path, ("latentDLM_mmdit",))
    found = layer_violations(graph, "latentDLM_mmdit.training", ("loop_settings", "step"))
    assert found == ["latentDLM_mmdit.training.loop_settings imports latentDLM_mmdit.training.step"]
