"""Habits of the unit tests, kept by a check over tests/*.py: tiny models come from
`tests/builders.py`, and every non-zero tolerance, there and in the compat suite (compat/**/*.py
except the table's own module), from the one table, `compat.oracle.TOLERANCES`
(`tol("name")`, `scaled_tol("name", scale)`, `derived_tol("name", ...)`), whose every entry some code reads.

A model constructed in a `test_*` function is allowed: there the constructor is what is tested.
Bit-exact comparisons are written inline as `rtol=0, atol=0`: they are not tolerances."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from compat.oracle import TOLERANCES

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
BUILDERS = TESTS / "builders.py"
MODEL_CLASS = "MultimodalMMDiT"
TOLERANCE_NAMES = ("rtol", "atol")
TEST_FILES = sorted(TESTS.glob("*.py"))
COMPAT_FILES = sorted(p for p in (REPO / "compat").rglob("*.py") if p.name != "oracle.py")
GATE_DEFECTS = TESTS / "gate_defects.py"  # its loosened tolerance table is a planted defect, not a tolerance


def _called_name(call: ast.Call) -> str | None:
    func = call.func
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None


def own_model_builders(source: str) -> list[str]:
    """'line N in f' for each construction of MultimodalMMDiT outside a `test_*` function: at module
    level, in a helper, a fixture or a method, that is a tiny-model builder of the file's own."""
    found = []

    def visit(node: ast.AST, scope: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) and scope == "" else scope
            if isinstance(child, ast.Call) and _called_name(child) == MODEL_CLASS and not scope.startswith("test_"):
                found.append(f"line {child.lineno} in {scope or 'the module'}")
            visit(child, inner)

    visit(ast.parse(source), "")
    return found


def _is_inline_number(value: ast.expr) -> bool:
    """True when the value is, or is computed from, a number written in the file, other than 0."""
    try:
        literal = ast.literal_eval(value)
    except (ValueError, TypeError, SyntaxError):
        literal = None
    if isinstance(literal, (int, float)) and not isinstance(literal, bool):
        return literal != 0
    return any(isinstance(n, ast.Constant) and type(n.value) in (int, float) for n in ast.walk(value))


def inline_tolerances(source: str) -> list[str]:
    """'line N: rtol=...' for each rtol / atol given as a non-zero number written in the file, as a
    keyword (`assert_close(..., atol=1e-6)`, `dict(rtol=1e-5)`) or as a dict key (`{"rtol": 1e-5}`)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        pairs = []
        if isinstance(node, ast.Call):
            pairs = [(kw.arg, kw.value) for kw in node.keywords if kw.arg in TOLERANCE_NAMES]
        elif isinstance(node, ast.Dict):
            pairs = [
                (k.value, v)
                for k, v in zip(node.keys, node.values)
                if isinstance(k, ast.Constant) and k.value in TOLERANCE_NAMES
            ]
        found += [
            f"line {value.lineno}: {name}={ast.unparse(value)}" for name, value in pairs if _is_inline_number(value)
        ]
    return found


@pytest.mark.parametrize("path", [p for p in TEST_FILES if p != BUILDERS], ids=lambda p: p.name)
def test_test_files_build_models_with_the_builders(path):
    found = own_model_builders(path.read_text())
    assert not found, (
        f"{path.name} constructs {MODEL_CLASS} outside a test function ({'; '.join(found)}): "
        "build it with tests.builders.tiny_model (sizes as arguments, their reason in one line)"
    )


@pytest.mark.parametrize(
    "path", [p for p in TEST_FILES + COMPAT_FILES if p != GATE_DEFECTS], ids=lambda p: str(p.relative_to(REPO))
)
def test_test_files_take_tolerances_from_the_table(path):
    found = inline_tolerances(path.read_text())
    assert not found, (
        f"{path.relative_to(REPO)} writes tolerances inline ({'; '.join(found)}): use **tol(name) from "
        "compat.oracle.TOLERANCES, adding a named entry with its reason if none fits"
    )


def test_every_tolerance_entry_is_read():
    sources = "\n".join(
        p.read_text()
        for folder in ("compat", "tests", "bench")
        for p in (REPO / folder).rglob("*.py")
        if p.name != "oracle.py"
    )
    unread = [name for name in TOLERANCES if not re.search(rf"""["']{re.escape(name)}["']""", sources)]
    assert not unread, f"tolerance entries nobody reads: {unread}; remove them from compat/oracle.py"


PLANTED = """
import torch
from latentDLM_mmdit.models.multimodal_mmdit import MultimodalMMDiT

MODEL = MultimodalMMDiT({}, vocab_size=16, latent_dim=4)
CLOSE = dict(rtol=1e-5, atol=0.0)
LOOSE = {"rtol": 0, "atol": 1e-6 * 3}
EXACT = {"rtol": 0, "atol": 0.0}


def make_model(seed):
    torch.manual_seed(seed)
    return MultimodalMMDiT({}, vocab_size=16, latent_dim=4)


class Fixture:
    def build(self):
        return MultimodalMMDiT({}, vocab_size=16, latent_dim=4)


def test_constructor_refuses_a_bad_size(scale):
    MultimodalMMDiT({}, vocab_size=0, latent_dim=4)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, b, **tol("float32_loss"))
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol * scale)
    assert torch.allclose(a, b, atol=-1e-7)
"""


def test_the_checks_see_planted_builders_and_tolerances():
    assert own_model_builders(PLANTED) == ["line 5 in the module", "line 13 in make_model", "line 18 in build"]
    assert inline_tolerances(PLANTED) == ["line 6: rtol=1e-05", "line 7: atol=1e-06 * 3", "line 26: atol=-1e-07"]
