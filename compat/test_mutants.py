"""Teeth: every planted defect in `compat.mutants` is caught by the row meant for it.

Each case applies one mutant and runs that row's checks on the shared context; the row must fail
(an AssertionError, or the error the defect itself raises). A row that skips under a mutant has
not caught it. The results form the kill table the gate prints with `--kill-table`.
"""
from __future__ import annotations

import importlib
import json
import warnings

import pytest

from compat.mutants import MUTANTS

pytestmark = pytest.mark.mutants


@pytest.mark.parametrize("mutant", MUTANTS, ids=[m.name for m in MUTANTS])
def test_mutant_is_caught(ctx, mutant, request):
    row = importlib.import_module(f"compat.test_row_{mutant.row}")
    caught, detail = False, "the row passed"
    with mutant.apply(), warnings.catch_warnings():
        warnings.filterwarnings("error", message="Using a target size")
        try:
            row.run_row(ctx)
        except pytest.skip.Exception as exc:
            detail = f"the row skipped: {exc}"
        except Exception as exc:  # the row's assertion, or the defect's own crash
            caught = True
            lines = str(exc).strip().splitlines()
            detail = f"{type(exc).__name__}: {lines[0] if lines else ''}"
    request.node.user_properties.append(("kill", json.dumps({"mutant": mutant.name, "row": mutant.row, "caught": caught, "detail": detail})))
    assert caught, f"mutant {mutant.name} ({mutant.description}) was not caught by row {mutant.row}: {detail}"
