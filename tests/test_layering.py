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
