"""The judge's own teeth: each planted defect of `tests/gate_defects.py` (one or more per gate
module) is caught by its guard, which passes unplanted (the control), and fails planted for the
intended reason (its expected text, or the row's verdict in compat-matrix.json).

Each run is a pytest subprocess with the defect planted by the `gate_defects` plugin for the whole
session, so a defect reaches every module that imported the planted function.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gate_defects import ENV, FALSE_ALARM, FALSE_PASS, SELF_CHECK, WRONG_VERDICT, gate_defects

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
GATE_MODULES = (
    "compat/gate.py",
    "compat/outcomes.py",
    "compat/observe.py",
    "compat/draw_capture.py",
    "compat/subjects.py",
    "compat/trainer_spec.py",
    "compat/inputs.py",
    "compat/harness.py",
    "compat/terms.py",
    "compat/oracle.py",
    "compat/trajectories.py",
    "latentDLM_mmdit/checkpoints/nonfinite.py",
)
DEFECTS = gate_defects()


def run_guard(guard: tuple[str, ...], defect: str | None, report: Path) -> tuple[int, str, dict | None]:
    """(exit code, output, the matrix when the guard is in compat/) of the guard's tests."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), str(REPO)]))
    env.pop(ENV, None)
    if defect is not None:
        env[ENV] = defect
    in_compat = guard[0].startswith("compat")
    args = [*guard, "-p", "gate_defects", "-p", "no:cacheprovider", "-q", "-x", "-p", "no:randomly"]
    if in_compat:
        args += ["--compat-report", str(report)]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    matrix_file = report / "compat-matrix.json"
    matrix = json.loads(matrix_file.read_text()) if in_compat and matrix_file.is_file() else None
    return proc.returncode, proc.stdout + proc.stderr, matrix


@functools.cache
def control(guard: tuple[str, ...], folder: str) -> tuple[int, str, dict | None]:
    return run_guard(guard, None, Path(folder) / "control")


def row_of(matrix: dict | None, row: str) -> dict:
    assert matrix is not None, "the guard wrote no compat-matrix.json"
    return next(r for r in matrix["rows"] if r["id"] == row)


def test_every_gate_module_has_a_planted_defect():
    assert {d.module for d in DEFECTS.values()} >= set(GATE_MODULES)
    for d in DEFECTS.values():
        assert d.direction in (FALSE_PASS, FALSE_ALARM, WRONG_VERDICT, SELF_CHECK), d.name
        assert (REPO / d.module).is_file() and (REPO / d.guard[0].split("::")[0]).exists(), d.name


@pytest.mark.slow
@pytest.mark.parametrize("name", list(DEFECTS), ids=list(DEFECTS))
def test_planted_gate_defect_is_caught_by_its_guard(name, tmp_path_factory):
    defect = DEFECTS[name]
    shared = tmp_path_factory.getbasetemp() / "gate-defect-controls" / name
    code, output, matrix = control(defect.guard, str(shared))
    assert code == 0, f"control: the guard {defect.guard} fails without the defect:\n{output[-3000:]}"
    if defect.row is not None:
        assert row_of(matrix, defect.row)["verdict"] in ("OK", "REVIEW"), row_of(matrix, defect.row)
    code, output, matrix = run_guard(defect.guard, name, tmp_path_factory.mktemp(name))
    if defect.row is None:
        assert code == 1, f"{name} ({defect.direction}) was not caught: {defect.guard} exits {code}\n{output[-3000:]}"
        assert defect.expect in output, f"{name}: caught, but not by the intended assertion:\n{output[-3000:]}"
        return
    row = row_of(matrix, defect.row)
    assert (row["verdict"], row.get("not_run_kind")) == (defect.verdict, defect.kind), (
        f"{name} ({defect.direction}) was not caught by row {defect.row}: {row['verdict']}: {row['measured'][:600]}"
    )
    assert defect.expect in row["measured"], f"{name}: {defect.row} changed for another reason: {row['measured'][:600]}"
